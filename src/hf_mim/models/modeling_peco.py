"""The PeCo tokenizer (Dong et al., 2023): a VQGAN-style convolutional VQ-VAE trained with a perceptual loss.

  pixels [0, 1] -> 2x - 1 -> encoder (residual conv blocks, 2x downsampling between levels, f = 16 by
  default) -> quant_conv (1x1, float32) -> quantize (the shared EMA quantizer: l2-normalised, nearest
  code by cosine, straight-through) -> post_quant_conv (1x1) -> decoder -> pixels in [-1, 1]
  -> (x + 1) / 2

Only the VQ-VAE itself lives here (it ships with the checkpoint). Its forward returns the terms it
can compute alone (pixel loss, commitment loss); the perceptual network and the discriminator are
never part of the model: ``hf_mim.tokenizer_training.peco_losses.PecoLoss`` combines everything.

Module names follow VQGAN (``encoder.down.0.block.0.norm1``, ``encoder.mid.attn_1``,
``decoder.up.3.upsample.conv``, ``quant_conv``, ``post_quant_conv``); this is not a port of its code.
The tokenizer interface shared by hf_mim's tokenizers: ``get_codebook_indices`` ([0, 1] RGB in,
[B, h, w] ids out), ``vocab_size``, ``token_grid`` and ``decode`` (ids -> [0, 1] images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_peco import PecoConfig
from .quantizer import EmaVectorQuantizer
from .remote_code import HubCodeMixin
from .visual_tokenizer import VisualTokenizerMixin, check_token_ids


@dataclass
class PecoOutput(ModelOutput):
    """reconstruction [B, C, H, W]: the decoder's image on the [0, 1] scale, NOT clamped (the losses and
    their gradients see it as it is); pixel_loss: mean L1 or L2 distance over every value in the model's
    [-1, 1] space (unweighted); commitment_loss: the quantizer's (already times commitment_weight);
    indices [B, h, w]; codebook_usage, perplexity, dead_codes: the quantizer's metrics for this batch (all
    processes in training). Perceptual and adversarial terms: ``PecoLoss``."""

    reconstruction: torch.FloatTensor | None = None
    pixel_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None
    dead_codes: torch.LongTensor | None = None


def pixel_distance(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over every value of |prediction - target| ("l1") or its square ("l2"), in float32."""
    difference = prediction.float() - target.float()
    if kind == "l1":
        return difference.abs().mean()
    if kind == "l2":
        return difference.pow(2).mean()
    raise ValueError(f"pixel loss must be 'l1' or 'l2', got {kind!r}.")


def conv_float32(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A convolution computed in float32 whatever the weights' dtype or autocast (the features the
    quantizer compares with its float32 codebook; the weights are normally kept float32 anyway)."""
    with torch.autocast(x.device.type, enabled=False):
        bias = None if conv.bias is None else conv.bias.float()
        return F.conv2d(x.float(), conv.weight.float(), bias, conv.stride, conv.padding)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, out, H, W]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # [B, out, H, W]
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1-conv projections), added to the input."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C], scale C^-0.5
        out = out[:, 0].transpose(1, 2).reshape(batch, channels, height, width)  # [B, C, H, W]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """3x3 convolution with stride 2 after padding one row and column at the bottom/right: H -> H / 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # [B, C, H/2, W/2]


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 convolution: H -> 2H."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


class Level(nn.Module):
    """One resolution level: residual blocks, each followed by attention when `attention`, then the
    optional resampling (`downsample` in the encoder, `upsample` in the decoder)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, config: PecoConfig, attention: bool,
                 resample: type[nn.Module] | None):
        super().__init__()
        groups, dropout = config.norm_num_groups, config.dropout
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, dropout) for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels, groups) for _ in range(num_blocks if attention else 0))
        if resample is Downsample:
            self.downsample = Downsample(out_channels)
        elif resample is Upsample:
            self.upsample = Upsample(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[index](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class MidBlock(nn.Module):
    """Residual block, attention (when enabled), residual block, at the lowest resolution."""

    def __init__(self, channels: int, config: PecoConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, config.norm_num_groups, config.dropout)
        use_attention = config.attention_at_lowest_resolution
        self.attn_1 = AttnBlock(channels, config.norm_num_groups) if use_attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, config.norm_num_groups, config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def level_widths(config: PecoConfig) -> list[int]:
    return [config.hidden_size * multiplier for multiplier in config.channel_multipliers]


class PecoEncoder(nn.Module):
    """[-1, 1] pixels [B, C, H, W] -> features [B, code_dim, H/f, W/f]."""

    def __init__(self, config: PecoConfig):
        super().__init__()
        widths = level_widths(config)
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.num_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(widths[max(i - 1, 0)], width, config.num_res_blocks, config,
                  attention=config.attention_at_lowest_resolution and i == last,
                  resample=Downsample if i < last else None)
            for i, width in enumerate(widths)
        )
        self.mid = MidBlock(widths[-1], config)
        self.norm_out = group_norm(widths[-1], config.norm_num_groups)
        self.conv_out = nn.Conv2d(widths[-1], config.code_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # [B, width_0, H, W]
        for level in self.down:
            x = level(x)  # down to [B, width_last, H/f, W/f]
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))  # [B, code_dim, H/f, W/f]


class PecoDecoder(nn.Module):
    """Codes [B, code_dim, h, w] -> [-1, 1]-scale pixels [B, C, h*f, w*f]. `up[i]` is resolution level i
    (the encoder's `down[i]` mirrored, one block more), run from the lowest resolution up."""

    def __init__(self, config: PecoConfig):
        super().__init__()
        widths = level_widths(config)
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.code_dim, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], config)
        self.up = nn.ModuleList(
            Level(widths[min(i + 1, last)], width, config.num_res_blocks + 1, config,
                  attention=config.attention_at_lowest_resolution and i == last,
                  resample=Upsample if i > 0 else None)
            for i, width in enumerate(widths)
        )
        self.norm_out = group_norm(widths[0], config.norm_num_groups)
        self.conv_out = nn.Conv2d(widths[0], config.num_channels, 3, padding=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(codes))  # [B, width_last, h, w]
        for level in reversed(self.up):
            x = level(x)  # up to [B, width_0, H, W]
        return self.conv_out(F.silu(self.norm_out(x)))  # [B, C, H, W]


class PecoTokenizer(VisualTokenizerMixin, HubCodeMixin, PreTrainedModel):
    """PeCo's VQ-VAE tokenizer: ``get_codebook_indices`` for MIM targets, ``decode`` back to images,
    ``forward`` for training (reconstruction, pixel and commitment losses, codebook EMA step)."""

    hub_auto_map = {"AutoModel": "modeling_peco.PecoTokenizer"}
    pixel_mapping = "maps [0, 1] to [-1, 1] itself (and the perceptual network applies its own normalisation)"
    config_class = PecoConfig
    config: PecoConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["ResnetBlock", "AttnBlock"]
    # The codebook's k-means/EMA updates and the projection into the code space run in float32.
    _keep_in_fp32_modules_strict = ["quantize", "quant_conv"]

    def __init__(self, config: PecoConfig):
        super().__init__(config)
        self.encoder = PecoEncoder(config)
        self.quant_conv = nn.Conv2d(config.code_dim, config.code_dim, 1)
        self.quantize = EmaVectorQuantizer(
            config.num_codes, config.code_dim, decay=config.decay, kmeans_init=config.kmeans_init,
            kmeans_iters=config.kmeans_iters, commitment_weight=config.commitment_weight,
            dead_code_restart=config.dead_code_restart, dead_code_threshold=config.dead_code_threshold,
            usage_warning_threshold=config.usage_warning_threshold,
        )
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.code_dim, 1)
        self.decoder = PecoDecoder(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default init (VQGAN keeps it): convolutions kaiming-uniform(a=sqrt(5)) with biases
        uniform in +-1/sqrt(fan_in), GroupNorm 1 and 0; the quantizer gets a fresh random codebook."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            fan_in = module.weight[0].numel()
            init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5)
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, EmaVectorQuantizer):
            module.reset_state(init.copy_)

    # ------------------------------------------------------------------ tokenizer interface

    def token_grid(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """(h, w) of the token grid for an image of `image_size` (int or (height, width))."""
        return self.config.token_grid(image_size)

    def encode_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB [B, C, H, W] -> features before quantization [B, h, w, code_dim], float32."""
        self.check_pixels(pixel_values)
        return self.encode_checked_pixels(pixel_values)

    def encode_checked_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.encoder.conv_in.weight
        hidden = self.encoder((2.0 * pixel_values - 1.0).to(weight.dtype))  # [B, code_dim, h, w]
        return conv_float32(self.quant_conv, hidden).permute(0, 2, 3, 1)  # [B, h, w, code_dim] float32

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """[0, 1] RGB [B, C, H, W] -> token ids [B, h, w] (nearest code by cosine; no codebook update)."""
        return self.quantize.encode(self.encode_features(pixel_values))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors [B, h, w, code_dim] -> [-1, 1]-scale pixels [B, C, h*f, w*f] (not clamped)."""
        weight = self.post_quant_conv.weight
        # contiguous: a permuted (channels-last) input gives the conv weight channels-last gradients, which
        # DDP then copies into its buckets on every step ("grad strides do not match").
        codes = codes.permute(0, 3, 1, 2).to(weight.dtype).contiguous()  # [B, code_dim, h, w]
        hidden = self.post_quant_conv(codes)  # [B, code_dim, h, w]
        return self.decoder(hidden)  # [B, C, H, W]

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> images [B, C, h*f, w*f] in [0, 1] (float32, clamped)."""
        decoded = self.decode_codes(self.quantize.decode_indices(check_token_ids(indices, self.vocab_size)))  # [B, C, H, W]
        return ((decoded.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's output convolution weight: where VQGAN's adaptive adversarial weight compares
        the gradient norms of the reconstruction and adversarial losses."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------ training

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs) -> PecoOutput:
        """[0, 1] RGB [B, C, H, W] -> PecoOutput. In training mode each call also takes one EMA step of the
        codebook (k-means initialisation on the first call): call it once per optimizer step."""
        self.check_pixels(pixel_values)
        features = self.encode_checked_pixels(pixel_values)  # [B, h, w, code_dim] float32
        quantized = self.quantize(features)  # straight-through codes [B, h, w, code_dim], indices [B, h, w]
        decoded = self.decode_codes(quantized.quantized)  # [B, C, H, W] on the [-1, 1] scale
        pixel_loss = pixel_distance(decoded, 2.0 * pixel_values - 1.0, self.config.pixel_loss)
        if not bool(torch.isfinite(pixel_loss)):
            raise FloatingPointError(
                "The PeCo pixel loss is NaN or inf: the decoder's output is not finite (the encoder and the quantizer "
                "were fine). Lower the learning rate or train in bf16/fp32 rather than fp16."
            )
        return PecoOutput(
            reconstruction=(decoded + 1.0) / 2.0, pixel_loss=pixel_loss, commitment_loss=quantized.commitment_loss,
            indices=quantized.indices, codebook_usage=quantized.codebook_usage, perplexity=quantized.perplexity,
            dead_codes=quantized.dead_codes,
        )


__all__ = ["PecoOutput", "PecoTokenizer", "pixel_distance"]
