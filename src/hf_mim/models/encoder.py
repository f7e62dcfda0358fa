"""The one ViT encoder that every hf_mim family configures instead of assembling its own.

A family's encoder class mixes in :class:`VitEncoderMixin` and calls :meth:`build_embeddings` and
:meth:`build_trunk` in ``__init__`` (registering anything of its own, e.g. BEiT's shared relative
position bias, in between), then :meth:`encode` in ``forward``. Two choices configure it:

- the position scheme: ``"sincos"`` (MAE's fixed 2-D table, a non-persistent buffer regenerated for
  any grid; a trained parameter started from it with ``learned=True``), ``"learned"`` (a trained
  table, bicubically resized for other grids) or ``"relative"`` (no absolute table: the family
  passes its relative position bias to the blocks through ``block_args``);
- the masking mode: ``"drop"`` (MAE: masked patches leave the sequence, after their positions are
  added), ``"replace"`` (BEiT: masked patch embeddings become the mask token, before positions) or
  ``"corrupt"`` (ViT-MPP: BERT-style 80/10/10 corruption, before positions). One input names the
  masked patches everywhere: ``bool_masked_pos`` [B, N], True = masked.

Every family's `*PreTrainedModel` derives from :class:`VitPreTrainedModel`, which holds what they share
(pixel input, gradient checkpointing, the attention kernels), so a family states only its own.

The modules live on the encoder itself with the reference names (``patch_embed``, ``cls_token``,
``mask_token``, ``pos_embed``, ``pos_drop``, ``blocks``, ``norm``), so the state-dict keys of every
family stay those of the reference checkpoints and of the converters.

This file ships with every checkpoint (``trust_remote_code``): torch, transformers and its siblings only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel

from .masking import corrupt_patch_embeddings, gather_tokens
from .remote_code import HubCodeMixin
from .vit_core import BlockOutputs, PatchEmbed, grid_size_for, resize_pos_embed, run_blocks, sincos_2d_table

POSITION_SCHEMES = ("sincos", "learned", "relative")
MASKING_MODES = ("drop", "replace", "corrupt")


class EncodedTokens(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, 1+K, D]: CLS first; K = N, or the kept patches when dropping
    hidden_states: tuple[torch.Tensor, ...] | None  # the embeddings and each block's output (before the norm)
    attentions: tuple[torch.Tensor, ...] | None  # each block's attention probabilities [B, H, 1+K, 1+K]
    corruption_branch: torch.Tensor | None  # [B, N] what each patch became ("corrupt" mode only)


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; choose one of {list(choices)}.")
    return value


class VitPreTrainedModel(HubCodeMixin, PreTrainedModel):
    """The base of a family of the shared encoder; the family sets `hub_auto_map`, `config_class`,
    `base_model_prefix`, `_no_split_modules`, `_init_weights`, and any kernel it cannot run."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True


class VitEncoderMixin:
    """Patch embedding, CLS (and mask) token, positions, blocks and final norm, for an ``nn.Module``."""

    position_scheme: str = "learned"
    masking_mode: str | None = None

    def build_embeddings(self, config, *, width: int | None = None, patch_size=None, num_channels: int | None = None,
                         grid_size: tuple[int, int] | None = None, position_scheme: str, masking_mode: str | None,
                         use_mask_token: bool = True, learned: bool = False,
                         embedding_dropout: float | None = None) -> None:
        """Registers patch_embed, cls_token, mask_token ("replace" / "corrupt" with `use_mask_token`; None
        otherwise), pos_embed (None for "relative") and pos_drop (identity without `embedding_dropout`).
        Sizes default to the config's (`grid_size`: its image's patch grid)."""
        width = config.hidden_size if width is None else width
        self.position_scheme = check_choice(position_scheme, POSITION_SCHEMES, "position scheme")
        self.masking_mode = None if masking_mode is None else check_choice(masking_mode, MASKING_MODES, "masking mode")
        self.grid_size = grid_size or grid_size_for(config.image_size, config.patch_size)
        self.patch_embed = PatchEmbed(patch_size or config.patch_size, num_channels or config.num_channels, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        has_mask_token = use_mask_token and masking_mode in ("replace", "corrupt")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width)) if has_mask_token else None
        self.build_position_table(width, learned)
        self.pos_drop = nn.Dropout(embedding_dropout) if embedding_dropout is not None else nn.Identity()

    def build_position_table(self, width: int, learned: bool) -> None:
        num_positions = 1 + self.grid_size[0] * self.grid_size[1]
        if self.position_scheme == "relative":
            self.pos_embed = None
        elif self.position_scheme == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, width))
        elif learned:  # sin-cos start, then trained (MAE fine-tuning)
            self.pos_embed = nn.Parameter(sincos_2d_table(self.grid_size, width).unsqueeze(0))
        else:  # fixed: never saved, so a checkpoint can neither lose nor zero it
            self.register_buffer("pos_embed", sincos_2d_table(self.grid_size, width).unsqueeze(0), persistent=False)

    def build_trunk(self, blocks: nn.ModuleList, norm: nn.Module | None) -> None:
        self.blocks = blocks
        self.norm = norm

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def position_table(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor | None:
        """[1, 1+rows*cols, D] in `like`'s dtype: the stored table; for another grid a fresh sin-cos one
        or the trained table resized bicubically; None without absolute positions."""
        if self.pos_embed is None:
            return None
        if grid == self.grid_size:
            return self.pos_embed.to(like.dtype)
        if isinstance(self.pos_embed, nn.Parameter):
            return resize_pos_embed(self.pos_embed, self.grid_size, grid).to(like.dtype)
        return sincos_2d_table(grid, self.pos_embed.shape[-1]).unsqueeze(0).to(like)

    def mask_patch_embeddings(self, tokens: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None):
        """"replace" / "corrupt": patch embeddings [B, N, D] with the `mask` [B, N] ones changed, and the
        corruption branch [B, N] (None when replacing)."""
        if self.mask_token is None:
            raise ValueError(f"{type(self).__name__} was built without a mask token (classification, backbone); "
                             "do not pass bool_masked_pos.")
        if self.masking_mode == "replace":
            return torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens), None
        config = self.config
        tokens, branch, _ = corrupt_patch_embeddings(
            tokens, self.mask_token, mask, generator, config.replace_prob, config.random_prob)
        return tokens, branch

    def embed(self, pixel_values: torch.Tensor, mask: torch.Tensor | None = None,
              generator: torch.Generator | None = None,
              ids_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, 1+K, D]: patch tokens (masked ones replaced or corrupted), positions added, only the
        `ids_keep` ones kept ("drop"; K = N without), CLS prepended, dropout; and the corruption branch
        [B, N] when corrupting. The patches are dropped before the CLS is prepended: no copy of the whole
        sequence is made only to be gathered from."""
        grid = self.patch_embed.grid_size(pixel_values)
        tokens = self.patch_embed(pixel_values)  # [B, N, D]
        branch = None
        if mask is not None:
            tokens, branch = self.mask_patch_embeddings(tokens, mask, generator)  # [B, N, D]
        cls = self.cls_token.to(tokens.dtype)  # [1, 1, D]
        positions = self.position_table(grid, tokens)  # [1, 1+N, D] or None
        if positions is not None:
            cls, tokens = cls + positions[:, :1], tokens + positions[:, 1:]
        if ids_keep is not None:
            tokens = gather_tokens(tokens, ids_keep)  # [B, K, D]
        x = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # [B, 1+K, D]
        return self.pos_drop(x), branch

    def check_masking_inputs(self, mask: torch.Tensor | None, ids_keep: torch.Tensor | None) -> None:
        """The masking input of this encoder's mode, never one it would ignore."""
        name = type(self).__name__
        if (mask is not None or ids_keep is not None) and self.masking_mode is None:
            raise ValueError(f"{name} does not mask patches; do not pass bool_masked_pos.")
        if ids_keep is not None and self.masking_mode != "drop":
            raise ValueError(f"{name} masks by {self.masking_mode!r}, not by dropping patches: pass `mask`.")
        if mask is not None and self.masking_mode == "drop":
            raise ValueError(f"{name} drops the masked patches: pass `ids_keep` (the kept patches, in order; "
                             "masking.masking_from_mask builds them from a mask), not `mask`.")

    def encode(self, pixel_values: torch.Tensor, *, mask: torch.Tensor | None = None,
               ids_keep: torch.Tensor | None = None, generator: torch.Generator | None = None, block_args: tuple = (),
               output_hidden_states: bool | None = None, output_attentions: bool | None = None) -> EncodedTokens:
        """The whole encoder. `mask` [B, N] bool (checked; True = masked) for "replace" / "corrupt";
        `ids_keep` [B, K] the patches to keep, in order, for "drop". `block_args` go to every block."""
        self.check_masking_inputs(mask, ids_keep)
        config = self.config
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        x, branch = self.embed(pixel_values, mask, generator, ids_keep)  # [B, 1+K, D]
        trunk: BlockOutputs = run_blocks(
            self.blocks, x, self.norm, output_hidden_states, *block_args, output_attentions=output_attentions)
        return EncodedTokens(*trunk, corruption_branch=branch)


__all__ = ["EncodedTokens", "MASKING_MODES", "POSITION_SCHEMES", "VitEncoderMixin"]
