"""The one vision-transformer core that every hf_mim model is built from.

Parameter names follow the reference implementations (timm, BEiT, MAE): ``patch_embed.proj``,
``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``attn.q_bias``/``attn.v_bias``, ``gamma_1``,
``mlp.fc1`` ... so that published weights convert by a near-identity key map.

This file ships with every checkpoint (``trust_remote_code``): it imports only torch,
transformers, the standard library and its sibling files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def to_2tuple(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    height, width = value
    return (int(height), int(width))


def grid_size_for(image_size: int | Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, int]:
    """Patch grid (rows, cols) of an image, with a clear error when the size does not divide."""
    (height, width), (ph, pw) = to_2tuple(image_size), to_2tuple(patch_size)
    if height % ph or width % pw:
        raise ValueError(
            f"Image size {height}x{width} is not divisible by the patch size {ph}x{pw}. "
            f"Resize or crop the images to a multiple of the patch size (for example "
            f"{height - height % ph or ph}x{width - width % pw or pw})."
        )
    return (height // ph, width // pw)


# ---------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position tables (MAE)
# ---------------------------------------------------------------------------------------------


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[len(positions), dim] table laid out as [sin | cos], frequencies 1 / 10000^(2i/dim)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # [P, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # [P, dim]


def sincos_2d_table(grid_size: Sequence[int], dim: int, cls_token: bool = True) -> torch.Tensor:
    """The MAE position table: [cls? + rows*cols, dim] in float32, computed in float64.

    The first half of the channels encodes the column index, the second half the row index
    (row-major patch order); the CLS row is all zeros.
    """
    if dim % 4:
        raise ValueError(f"A 2-D sin-cos table needs a width divisible by 4, got {dim}.")
    rows, cols = to_2tuple(grid_size)
    row_index = torch.arange(rows).repeat_interleave(cols)  # [rows*cols]
    col_index = torch.arange(cols).repeat(rows)  # [rows*cols]
    table = torch.cat([sincos_1d(col_index, dim // 2), sincos_1d(row_index, dim // 2)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)
    return table.float()


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int], num_prefix: int = 1):
    """Bicubic resize of a learned absolute position table [1, prefix + old_rows*old_cols, D]."""
    old_grid, new_grid = to_2tuple(old_grid), to_2tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]  # [1, P, D], [1, N, D]
    dim = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2)  # [1, D, rows, cols]
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)  # [1, P + rows*cols, D]


# ---------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------


def patchify(pixel_values: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, rows*cols, ph*pw*C], each patch vector ordered (row, col, channel)."""
    batch, channels, height, width = pixel_values.shape
    ph, pw = to_2tuple(patch_size)
    rows, cols = grid_size_for((height, width), (ph, pw))
    patches = pixel_values.reshape(batch, channels, rows, ph, cols, pw)
    patches = patches.permute(0, 2, 4, 3, 5, 1)  # [B, rows, cols, ph, pw, C]
    return patches.reshape(batch, rows * cols, ph * pw * channels)


def unpatchify(
    patches: torch.Tensor, patch_size: int | Sequence[int], grid_size: Sequence[int], num_channels: int
) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, rows*cols, ph*pw*C] -> [B, C, rows*ph, cols*pw]."""
    batch, length, width = patches.shape
    (ph, pw), (rows, cols) = to_2tuple(patch_size), to_2tuple(grid_size)
    if length != rows * cols or width != ph * pw * num_channels:
        raise ValueError(
            f"Cannot unpatchify [{batch}, {length}, {width}] into a {rows}x{cols} grid of "
            f"{ph}x{pw}x{num_channels} patches."
        )
    image = patches.reshape(batch, rows, cols, ph, pw, num_channels)
    image = image.permute(0, 5, 1, 3, 2, 4)  # [B, C, rows, ph, cols, pw]
    return image.reshape(batch, num_channels, rows * ph, cols * pw)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens [B, rows*cols, D]; any channel count, any grid."""

    def __init__(self, patch_size: int | Sequence[int], num_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.num_channels = num_channels
        self.proj = nn.Conv2d(num_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def grid_size(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"Expected pixel_values of shape [batch, {self.num_channels}, height, width], got "
                f"{list(pixel_values.shape)}. Convert the images to {self.num_channels} channels "
                f"(or build the model with num_channels={pixel_values.shape[1] if pixel_values.ndim == 4 else '?'})."
            )
        return grid_size_for(pixel_values.shape[-2:], self.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.grid_size(pixel_values)  # validates channels and divisibility
        return self.proj(pixel_values).flatten(2).transpose(1, 2)  # [B, N, D]


# ---------------------------------------------------------------------------------------------
# Transformer block
# ---------------------------------------------------------------------------------------------


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention; `attention_mask` is an additive bias broadcastable to [B, H, N, N]."""
    weights = torch.matmul(query, key.transpose(-2, -1)) * scaling  # [B, H, N, N]
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = weights.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2)  # [B, N, H, Dh]
    return output, weights


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection.

    ``qkv_bias`` gives the timm/MAE layout (one bias on the fused Linear); ``qv_bias`` gives the
    BEiT layout (separate ``q_bias`` and ``v_bias``, no key bias). The kernel is chosen by
    ``config._attn_implementation`` at call time (sdpa, eager, flash, flex), so
    ``model.set_attn_implementation(...)`` switches every block at once.
    """

    is_causal = False

    def __init__(self, config, dim: int, num_heads: int, qkv_bias: bool = True, qv_bias: bool = False,
                 attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Width {dim} is not divisible by the number of attention heads {num_heads}.")
        self.config = config
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias and not qv_bias)
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, output_attentions: bool = False):
        """[B, N, D] -> [B, N, D]; with `output_attentions`, (output, attention probabilities [B, H, N, N]).
        The maps need the softmax formed explicitly: those calls run the eager kernel whatever
        `_attn_implementation` says (as transformers' models do); the others keep the fast kernel."""
        batch, length, dim = x.shape
        bias = self.qkv.bias
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])  # k has no bias
        qkv = F.linear(x, self.qkv.weight, bias)  # [B, N, 3D]
        qkv = qkv.reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # [B, H, N, Dh] each
        if attn_bias is not None:
            attn_bias = attn_bias.to(query.dtype)
        attention: Callable = (
            eager_attention if output_attentions
            else ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        )
        out, weights = attention(
            self, query, key, value, attn_bias,
            dropout=self.attn_drop if self.training else 0.0, scaling=self.scaling,
        )  # [B, N, H, Dh], [B, H, N, N] (eager)
        out = self.proj(out.reshape(batch, length, dim))  # [B, N, D]
        return (out, weights) if output_attentions else out


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(GradientCheckpointingLayer):
    """Pre-norm transformer block: ``x + drop_path(gamma_1 * attn(norm1(x)))``, same for the MLP.

    ``layer_scale_init=None`` means no layer scale (MAE); BEiT uses 0.1 (base) or 1e-5 (large).
    """

    def __init__(self, config, dim: int, num_heads: int, mlp_dim: int, *, qkv_bias: bool = True,
                 qv_bias: bool = False, layer_scale_init: float | None = None, drop_path: float = 0.0,
                 drop: float = 0.0, attn_drop: float = 0.0, act: str = "gelu", eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(config, dim, num_heads, qkv_bias=qkv_bias, qv_bias=qv_bias, attn_drop=attn_drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, act=act, drop=drop)
        self.drop_path = DropPath(drop_path)
        self.drop = nn.Dropout(drop)
        if layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, output_attentions: bool = False):
        """[B, N, D] -> [B, N, D]; with `output_attentions`, (output, attention probabilities [B, H, N, N])."""
        attn = self.attn(self.norm1(x), attn_bias, output_attentions=output_attentions)
        attn, weights = attn if output_attentions else (attn, None)
        attn = self.drop(attn)  # [B, N, D]
        x = x + self.drop_path(attn if self.gamma_1 is None else self.gamma_1 * attn)
        mlp = self.mlp(self.norm2(x))  # [B, N, D]
        x = x + self.drop_path(mlp if self.gamma_2 is None else self.gamma_2 * mlp)
        return (x, weights) if output_attentions else x


class BlockOutputs(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, T, D], after the final norm when there is one
    hidden_states: tuple[torch.Tensor, ...] | None  # the input and each block's output (before the norm)
    attentions: tuple[torch.Tensor, ...] | None  # each block's attention probabilities [B, H, T, T]


def run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, norm: nn.Module | None, output_hidden_states: bool, *block_args,
    output_attentions: bool = False,
) -> BlockOutputs:
    """The encoder trunk every model shares: tokens [B, T, D] through `blocks` (each called as
    `block(x, *block_args)`, e.g. BEiT's shared relative bias), then the final `norm` when there is
    one. With `output_hidden_states`, the input and each block's output (before the norm), and with
    `output_attentions` each block's attention maps, as transformers returns them."""
    hidden_states = [x] if output_hidden_states else None
    attentions = [] if output_attentions else None
    for block in blocks:
        if output_attentions:
            x, weights = block(x, *block_args, output_attentions=True)  # [B, T, D], [B, H, T, T]
            attentions.append(weights)
        else:
            x = block(x, *block_args)  # [B, T, D]
        if output_hidden_states:
            hidden_states.append(x)
    if norm is not None:
        x = norm(x)
    return BlockOutputs(x, tuple(hidden_states) if output_hidden_states else None,
                        tuple(attentions) if output_attentions else None)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate per block, linearly increasing from 0 to `rate` (timm/BEiT/MAE)."""
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def vit_blocks(config, width: int, depth: int, heads: int, mlp_dim: int, drop_path: float,
               **block_options) -> nn.ModuleList:
    """`depth` plain ViT blocks (MAE's encoder and decoder, ViT-MPP, VQ-KD's ViTs) with the config's
    qkv_bias, dropouts, activation and LayerNorm eps, the drop-path rate rising from 0 to `drop_path`;
    `block_options` go to every :class:`Block` as well (VQ-KD: ``qv_bias``)."""
    return nn.ModuleList(
        Block(
            config, width, heads, mlp_dim, qkv_bias=config.qkv_bias, drop_path=rate,
            drop=config.hidden_dropout_prob, attn_drop=config.attention_probs_dropout_prob,
            act=config.hidden_act, eps=config.layer_norm_eps, **block_options,
        )
        for rate in drop_path_rates(drop_path, depth)
    )


__all__ = [
    "Attention", "Block", "BlockOutputs", "DropPath", "Mlp", "PatchEmbed", "drop_path_rates", "grid_size_for", "patchify",
    "resize_pos_embed", "run_blocks", "sincos_2d_table", "to_2tuple", "unpatchify", "vit_blocks",
]
