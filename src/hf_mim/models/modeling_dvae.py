"""The DALL-E discrete VAE (Ramesh et al., 2021): BEiT v1's image tokenizer.

Encoder: 7x7 conv, groups of residual blocks (``id_path + res_path / n_layers**2``) with 2x
max-pooling between groups, ReLU, 1x1 conv to the vocabulary logits. Decoder: 1x1 conv from the
(soft) one-hot codes, groups of residual blocks with nearest 2x upsampling, ReLU, 1x1 conv to the
location and log-scale of a logit-Laplace distribution per pixel value.

Module names follow the published code (``blocks.group_1.block_1.res_path.conv_1``), with
PyTorch's ``weight``/``bias`` for its ``w``/``b``; transformers' ``FlavaImageCodebook`` is the same
encoder with extra ``.group.``/``.path.`` levels. The tokenizer interface shared by hf_mim's
tokenizers: ``get_codebook_indices`` ([0, 1] RGB in, [B, h, w] ids out), ``vocab_size``,
``token_grid`` and ``decode``; each tokenizer applies its own pixel map.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_dvae import DvaeConfig
from .losses import dvae_loss, gumbel_temperature, kl_weight_at
from .remote_code import HubCodeMixin
from .visual_tokenizer import VisualTokenizerMixin, check_token_ids

logger = logging.get_logger(__name__)


def map_pixels(pixels: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps]: the support of the logit-Laplace distribution (DALL-E's map)."""
    return (1 - 2 * eps) * pixels + eps


def unmap_pixels(pixels: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1]."""
    return ((pixels - eps) / (1 - 2 * eps)).clamp(0.0, 1.0)


def conv2d_fp16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding) -> torch.Tensor:
    """A convolution as the published code computes it on CUDA: fp16 input and weights, fp16 output.

    PyTorch's cuDNN path accumulates fp16 convolutions in fp32, rounds to fp16, then adds the bias
    in fp16. On CPU, where half convolutions are ~20x slower, the same roundings are applied around
    an fp32 convolution; results then differ from a GPU only by summation order.
    """
    x, weight = x.half(), weight.half()
    if x.device.type == "cpu":
        out = F.conv2d(x.float(), weight.float(), None, padding=padding).half()
    else:
        out = F.conv2d(x, weight, None, padding=padding)
    return out + bias.half().view(-1, 1, 1)


class DvaeConv2d(nn.Conv2d):
    """Same-padded convolution; `half_precision` switches to the reference's fp16 computation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, half_precision: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2)
        self.half_precision = half_precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.half_precision:
            return conv2d_fp16(x, self.weight, self.bias, self.padding)
        return super().forward(x.to(self.weight.dtype))


class DvaeBlock(nn.Module):
    """`id_path(x) + res_path(x) / n_layers**2`; res_path is ReLU-conv four times at width out/4.

    Encoder blocks use kernels (3, 3, 3, 1), decoder blocks (1, 3, 3, 3); id_path is a 1x1 conv only
    when the width changes.
    """

    def __init__(self, in_size: int, out_size: int, num_layers: int, kernels: Sequence[int], half: bool):
        super().__init__()
        hidden = out_size // 4
        self.post_gain = 1 / num_layers**2
        self.id_path = DvaeConv2d(in_size, out_size, 1, half) if in_size != out_size else nn.Identity()
        widths = [in_size, hidden, hidden, hidden, out_size]
        layers = OrderedDict()
        for i, kernel in enumerate(kernels):
            layers[f"relu_{i + 1}"] = nn.ReLU()
            layers[f"conv_{i + 1}"] = DvaeConv2d(widths[i], widths[i + 1], kernel, half)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def build_group(widths: tuple[int, int], num_blocks: int, num_layers: int, kernels, half, resample) -> nn.Sequential:
    """`num_blocks` blocks (the first changes the width), then `resample` ("pool"/"upsample") if given."""
    in_size, out_size = widths
    layers = OrderedDict(
        (f"block_{i + 1}", DvaeBlock(in_size if i == 0 else out_size, out_size, num_layers, kernels, half))
        for i in range(num_blocks)
    )
    if resample == "pool":
        layers["pool"] = nn.MaxPool2d(kernel_size=2)
    elif resample == "upsample":
        layers["upsample"] = nn.Upsample(scale_factor=2, mode="nearest")
    return nn.Sequential(layers)


class DvaeEncoder(nn.Module):
    """Mapped pixels [B, C, H, W] -> logits [B, vocab, H/f, W/f] with f = 2**(num_groups - 1)."""

    def __init__(self, config: DvaeConfig):
        super().__init__()
        half, groups = config.reference_fp16, config.num_groups
        num_layers = groups * config.num_blocks_per_group
        widths = [config.hidden_size * 2**g for g in range(groups)]  # 256, 512, 1024, 2048
        blocks = OrderedDict(input=DvaeConv2d(config.input_channels, widths[0], 7, half))
        for g in range(groups):
            blocks[f"group_{g + 1}"] = build_group(
                (widths[max(g - 1, 0)], widths[g]), config.num_blocks_per_group, num_layers, (3, 3, 3, 1), half,
                "pool" if g < groups - 1 else None,
            )
        # The reference keeps the last conv in fp32 (use_float16=False): logits and argmax are fp32.
        blocks["output"] = nn.Sequential(
            OrderedDict(relu=nn.ReLU(), conv=DvaeConv2d(widths[-1], config.vocab_size, 1, half_precision=False))
        )
        self.blocks = nn.Sequential(blocks)

    def forward(self, mapped_pixels: torch.Tensor) -> torch.Tensor:
        return self.blocks(mapped_pixels)  # [B, vocab, h, w]


class DvaeDecoder(nn.Module):
    """(Soft) one-hot codes [B, vocab, h, w] -> stats [B, 2C, h*f, w*f]: location | log-scale."""

    def __init__(self, config: DvaeConfig):
        super().__init__()
        half, groups = config.reference_fp16, config.num_groups
        num_layers = groups * config.decoder_num_blocks_per_group
        widths = [config.decoder_hidden_size * 2 ** (groups - 1 - g) for g in range(groups)]  # 2048 ... 256
        # The reference keeps the first conv (over the 8192 one-hot channels) in fp32.
        blocks = OrderedDict(input=DvaeConv2d(config.vocab_size, config.decoder_init_size, 1, half_precision=False))
        for g in range(groups):
            blocks[f"group_{g + 1}"] = build_group(
                (config.decoder_init_size if g == 0 else widths[g - 1], widths[g]),
                config.decoder_num_blocks_per_group, num_layers, (1, 3, 3, 3), half,
                "upsample" if g < groups - 1 else None,
            )
        blocks["output"] = nn.Sequential(
            OrderedDict(relu=nn.ReLU(), conv=DvaeConv2d(widths[-1], 2 * config.input_channels, 1, half))
        )
        self.blocks = nn.Sequential(blocks)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """The input conv applied to one-hot codes, as a lookup: [B, h, w] -> [B, decoder_init_size, h, w]."""
        conv = self.blocks.input
        table = conv.weight[:, :, 0, 0].t()  # [vocab, init]
        return (F.embedding(indices, table) + conv.bias).permute(0, 3, 1, 2)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.blocks(codes).float()  # [B, 2C, H, W]

    def from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.blocks[1:](self.embed(indices)).float()  # [B, 2C, H, W]


@dataclass
class DvaeOutput(ModelOutput):
    """loss: the relaxed -ELB per pixel value (see `losses.dvae_loss`); reconstruction_loss (mean per
    pixel value) and kl_loss (mean KL to the uniform prior per latent cell, nats); logits [B, vocab, h, w];
    reconstruction [B, C, H, W]: the decoder's median image in [0, 1]."""

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None


class DvaeTokenizer(VisualTokenizerMixin, HubCodeMixin, PreTrainedModel):
    """The DALL-E dVAE as an image tokenizer (`get_codebook_indices`, `decode`) and as a trainable
    model: `forward` returns the Gumbel-softmax training loss (in eval mode, with argmax codes)."""

    hub_auto_map = {"AutoModel": "modeling_dvae.DvaeTokenizer"}
    pixel_mapping = "applies its own map (0.8 * x + 0.1)"
    channels_field = "input_channels"
    config_class = DvaeConfig
    config: DvaeConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["DvaeBlock"]

    def __init__(self, config: DvaeConfig):
        super().__init__(config)
        self.encoder = DvaeEncoder(config)
        self.decoder = DvaeDecoder(config) if config.with_decoder else None
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The reference init: weights normal(0, 1/sqrt(fan_in)), biases 0."""
        if isinstance(module, DvaeConv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            init.normal_(module.weight, std=fan_in**-0.5)
            init.zeros_(module.bias)

    # ------------------------------------------------------------------ tokenizer interface

    def token_grid(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """(h, w) of the token grid for an image of `image_size` (int or (height, width))."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        factor = self.config.downsample_factor
        if height % factor or width % factor:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by the tokenizer's downsampling factor {factor}. "
                f"Resize the tokenizer view to a multiple of {factor} (BEiT uses 112 for a 14x14 grid)."
            )
        return (height // factor, width // factor)

    def get_codebook_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB [B, C, H, W] -> logits [B, vocab, h, w] (fp32 in both precision modes)."""
        self.check_pixels(pixel_values)
        return self.encoder(map_pixels(pixel_values.float(), self.config.logit_laplace_eps)).float()

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """[0, 1] RGB [B, C, H, W] -> token ids [B, h, w] (argmax, no Gumbel noise)."""
        return self.get_codebook_logits(pixel_values).argmax(dim=1)

    @torch.no_grad()
    def get_codebook_probs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.get_codebook_logits(pixel_values).softmax(dim=1)  # [B, vocab, h, w]

    def require_decoder(self) -> DvaeDecoder:
        if self.decoder is None:
            raise ValueError(
                "This tokenizer has no decoder (with_decoder=False, e.g. converted from FlavaImageCodebook or an "
                "encoder only). Convert it again with the reference decoder: --decoder decoder.pkl."
            )
        return self.decoder

    def stats_to_pixels(self, stats: torch.Tensor) -> torch.Tensor:
        """Decoder stats [B, 2C, H, W] -> the distribution's median image in [0, 1]."""
        loc = stats[:, : self.config.input_channels]
        return unmap_pixels(torch.sigmoid(loc), self.config.logit_laplace_eps)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> images [B, C, h*f, w*f] in [0, 1]."""
        decoder = self.require_decoder()
        return self.stats_to_pixels(decoder.from_indices(check_token_ids(indices, self.vocab_size)))

    # ------------------------------------------------------------------ training

    def schedule_values(self, step: int | None) -> tuple[float, float]:
        """(temperature, kl_weight) at optimizer update `step`; None = after annealing."""
        config = self.config
        if step is None:
            return config.temperature_end, config.kl_weight
        return (
            gumbel_temperature(step, config.temperature_start, config.temperature_end,
                               config.temperature_anneal_steps, config.anneal_schedule),
            kl_weight_at(step, config.kl_weight, config.kl_warmup_steps, config.anneal_schedule),
        )

    def sample_codes(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Training: Gumbel-softmax sample (hard one-hot with the relaxed gradient if straight_through);
        eval: the one-hot argmax. [B, vocab, h, w] -> [B, vocab, h, w]."""
        if self.training:
            return F.gumbel_softmax(logits, tau=temperature, hard=self.config.straight_through, dim=1)
        return F.one_hot(logits.argmax(dim=1), self.vocab_size).permute(0, 3, 1, 2).to(logits.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor,
        step: int | None = None,
        temperature: float | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DvaeOutput:
        """`step` drives the temperature and KL-weight schedules (None: their final values);
        `temperature` overrides the scheduled one."""
        decoder = self.require_decoder()
        if self.training and self.config.reference_fp16:
            logger.warning_once("Training a DvaeTokenizer with reference_fp16=True rounds every conv to fp16; "
                                "set reference_fp16=False and use mixed precision instead.")
        scheduled_temperature, kl_weight = self.schedule_values(step)
        logits = self.get_codebook_logits(pixel_values)  # [B, vocab, h, w]
        codes = self.sample_codes(logits, scheduled_temperature if temperature is None else temperature)
        stats = decoder(codes)  # [B, 2C, H, W]
        target = map_pixels(pixel_values.float(), self.config.logit_laplace_eps)  # [B, C, H, W]
        losses = dvae_loss(stats, target, logits, kl_weight, self.config.reconstruction_loss)
        return DvaeOutput(
            loss=losses.total, reconstruction_loss=losses.reconstruction, kl_loss=losses.kl,
            logits=logits, reconstruction=self.stats_to_pixels(stats),
        )


__all__ = ["DvaeTokenizer", "map_pixels", "unmap_pixels"]
