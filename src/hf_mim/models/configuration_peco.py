"""Configuration of the PeCo tokenizer: a VQ-VAE trained with a perceptual loss (Dong et al., 2023)."""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .quantizer import EmaVectorQuantizer
from .vit_core import to_2tuple

PIXEL_LOSSES = ("l1", "l2")
FEATURE_NORMS = ("l2", "layer_norm", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Default channel multipliers per downsampling factor: VQGAN's f16 (1,1,2,2,4) and f8 (1,2,2,4) ImageNet
# models, and the same pattern shortened for the small factors that tests use.
DEFAULT_CHANNEL_MULTIPLIERS = {1: (1,), 2: (1, 2), 4: (1, 2, 4), 8: (1, 2, 2, 4), 16: (1, 1, 2, 2, 4)}


@strict
class PecoConfig(PreTrainedConfig):
    r"""The PeCo tokenizer (Dong et al., "PeCo: Perceptual Codebook for BERT Pre-training of Vision
    Transformers", AAAI 2023): a convolutional VQ-VAE whose token grid is the ViT patch grid.

    Confirmed by the paper: a discrete VQ-VAE with 8192 codes trained with its usual objective plus a
    perceptual loss between deep features, at several depths, of a frozen SELF-SUPERVISED vision
    transformer (MoCo v3 ViT in the paper). No code or weights were released: every other setting
    below is this project's choice (VQGAN's f16 ImageNet architecture and loss weights where it has
    one), kept as a config field.

    Architecture (ours): ``downsample_factor`` (16: 224 px -> 14 x 14 tokens, one per 16 x 16 ViT
    patch; a power of 2); level l has width ``hidden_size * channel_multipliers[l]`` and
    ``num_res_blocks`` residual blocks (the decoder one more, as VQGAN), a 2x down/upsampling between
    levels, so ``len(channel_multipliers) == log2(downsample_factor) + 1`` (None: VQGAN's (1, 1, 2, 2, 4)
    for 16, (1, 2, 2, 4) for 8, shorter for smaller factors); ``attention_at_lowest_resolution``:
    single-head self-attention after every block of the lowest level and in the middle block;
    GroupNorm with ``norm_num_groups`` groups (eps 1e-6); ``dropout`` in the residual blocks.

    Codebook (ours, the shared ``quantizer.EmaVectorQuantizer``: l2-normalised codes, nearest code by
    cosine, EMA updates after a k-means initialisation, straight-through gradients): ``code_dim`` 256,
    ``num_codes`` 8192 (the paper's), ``commitment_weight`` 0.25 (VQ-VAE's beta), ``decay``,
    ``kmeans_init``, ``kmeans_iters``, ``dead_code_restart``, ``dead_code_threshold``,
    ``usage_warning_threshold``.

    Training losses (ours; DATA only: none of these is needed to tokenize, and neither the perceptual
    network nor the discriminator is ever part of the tokenizer or its checkpoint; see
    ``hf_mim.tokenizer_training.peco_losses.PecoLoss`` for the exact formulas):
      * pixels: ``pixel_loss`` "l1" or "l2" (mean over every value, in the model's [-1, 1] pixel space,
        as VQGAN) times ``pixel_loss_weight``;
      * perceptual: ``perceptual_weight`` times the sum over ``perceptual_layers`` (indices of
        ``hidden_states``: 0 = the embeddings, k = the output of block k) of
        ``perceptual_layer_weights`` (None: 1 each) times the mean squared distance between the
        ``perceptual_feature_norm``-normalised patch tokens of the input and of the reconstruction;
        the network is loaded by ``hf_mim.tokenizer_training.load_feature_network_for(config)`` from
        ``perceptual_network_name_or_path`` (a self-supervised ViT id or directory), at
        ``perceptual_input_size`` (None: the tokenizer's image size), normalised with its image
        processor's mean/std or else ``perceptual_image_mean/std``;
      * adversarial (VQGAN): ``use_adversarial``, a PatchGAN discriminator (``discriminator_hidden_size``
        first width, ``discriminator_num_layers`` strided layers) with the hinge loss, active from
        optimizer step ``adversarial_start_step`` on, weighted by ``adversarial_weight`` times, when
        ``adaptive_adversarial_weight``, VQGAN's ratio of gradient norms at the decoder's last layer.

    Example:

    ```python
    >>> from hf_mim import PecoConfig, PecoTokenizer
    >>> tokenizer = PecoTokenizer(PecoConfig(hidden_size=32, num_res_blocks=1, norm_num_groups=8, num_codes=512))
    ```
    """

    model_type = "hf_mim_peco"

    image_size: int | list[int] | tuple[int, int] = 224
    num_channels: int = 3
    downsample_factor: int = 16
    # encoder / decoder
    hidden_size: int = 128
    channel_multipliers: list[int] | tuple[int, ...] | None = None
    num_res_blocks: int = 2
    attention_at_lowest_resolution: bool = True
    norm_num_groups: int = 32
    dropout: float | int = 0.0
    # codebook
    code_dim: int = 256
    num_codes: int = 8192
    decay: float = 0.99
    kmeans_init: bool = True
    kmeans_iters: int = 10
    commitment_weight: float | int = 0.25
    dead_code_restart: bool = False
    dead_code_threshold: int = 100
    usage_warning_threshold: float | int = 0.5
    # training losses (data only)
    pixel_loss: str = "l1"
    pixel_loss_weight: float | int = 1.0
    perceptual_network_name_or_path: str | None = None
    perceptual_layers: list[int] | tuple[int, ...] = (3, 6, 9, 12)
    perceptual_layer_weights: list[float | int] | tuple[float | int, ...] | None = None
    perceptual_weight: float | int = 1.0
    perceptual_feature_norm: str = "l2"
    perceptual_input_size: int | list[int] | tuple[int, int] | None = None
    perceptual_image_mean: list[float] | tuple[float, ...] = IMAGENET_MEAN
    perceptual_image_std: list[float] | tuple[float, ...] = IMAGENET_STD
    use_adversarial: bool = False
    adversarial_weight: float | int = 0.8
    adversarial_start_step: int = 250_001
    adaptive_adversarial_weight: bool = True
    discriminator_hidden_size: int = 64
    discriminator_num_layers: int = 3

    def __post_init__(self, **kwargs):
        if self.channel_multipliers is None and self.downsample_factor in DEFAULT_CHANNEL_MULTIPLIERS:
            self.channel_multipliers = list(DEFAULT_CHANNEL_MULTIPLIERS[self.downsample_factor])
        super().__post_init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.num_codes

    @property
    def layer_weights(self) -> list[float]:
        """One weight per perceptual layer (1 each when `perceptual_layer_weights` is None)."""
        weights = self.perceptual_layer_weights
        return [1.0] * len(self.perceptual_layers) if weights is None else [float(w) for w in weights]

    def validate_architecture(self):
        super().validate_architecture()
        self.validate_autoencoder()
        EmaVectorQuantizer.check_settings(
            self.num_codes, self.code_dim, self.decay, self.kmeans_iters, self.commitment_weight,
            self.dead_code_threshold, self.usage_warning_threshold,
        )
        self.validate_losses()

    def validate_autoencoder(self) -> None:
        factor = self.downsample_factor
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"downsample_factor must be a power of 2 (16 for a 224 px -> 14x14 grid), got {factor}.")
        levels = int(math.log2(factor)) + 1
        multipliers = self.channel_multipliers
        if multipliers is None or len(multipliers) != levels:
            example = list(DEFAULT_CHANNEL_MULTIPLIERS.get(factor) or (1, 1, 2, 2, 4) + (4,) * (levels - 5))
            raise ValueError(
                f"downsample_factor={factor} needs {levels} channel multipliers (one per resolution level), got "
                f"{multipliers}: set channel_multipliers, e.g. {example}."
            )
        for name in ("hidden_size", "num_res_blocks", "norm_num_groups", "num_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        widths = [self.hidden_size * m for m in multipliers]
        if min(multipliers) < 1 or any(width % self.norm_num_groups for width in widths):
            raise ValueError(
                f"The level widths hidden_size * channel_multipliers = {widths} must be positive multiples of "
                f"norm_num_groups={self.norm_num_groups} (GroupNorm): change hidden_size or norm_num_groups."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        self.token_grid(self.image_size)

    def token_grid(self, image_size: int | list[int] | tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the token grid for an image of `image_size` (int or (height, width))."""
        height, width = to_2tuple(image_size)
        factor = self.downsample_factor
        if height % factor or width % factor or min(height, width) < 1:
            raise ValueError(
                f"Image size {height}x{width} is not a positive multiple of the PeCo tokenizer's downsampling factor "
                f"{factor}: resize the tokenizer view to a multiple of {factor} (224 px gives 14x14 tokens at 16)."
            )
        return (height // factor, width // factor)

    def validate_losses(self) -> None:
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {self.pixel_loss!r}.")
        if self.perceptual_feature_norm not in FEATURE_NORMS:
            raise ValueError(f"perceptual_feature_norm must be one of {FEATURE_NORMS}, got "
                             f"{self.perceptual_feature_norm!r}.")
        layers = list(self.perceptual_layers)
        if not layers or min(layers) < 0 or len(set(layers)) != len(layers):
            raise ValueError(
                f"perceptual_layers must be distinct hidden-state indices >= 0 (0 = embeddings, k = block k's "
                f"output), got {layers}; ours: [3, 6, 9, 12] of a 12-block ViT."
            )
        if self.perceptual_layer_weights is not None and len(self.perceptual_layer_weights) != len(layers):
            raise ValueError(
                f"perceptual_layer_weights has {len(self.perceptual_layer_weights)} values for {len(layers)} "
                f"perceptual_layers {layers}: give one weight per layer, or None for 1 each."
            )
        weights = {"pixel_loss_weight": self.pixel_loss_weight, "perceptual_weight": self.perceptual_weight,
                   "adversarial_weight": self.adversarial_weight}
        weights.update({f"perceptual_layer_weights[{i}]": w for i, w in enumerate(self.layer_weights)})
        negative = [f"{name}={value}" for name, value in weights.items() if value < 0]
        if negative:
            raise ValueError(f"Loss weights must not be negative: {', '.join(negative)}.")
        for name in ("perceptual_image_mean", "perceptual_image_std"):
            if len(getattr(self, name)) != self.num_channels:
                raise ValueError(f"{name} has {len(getattr(self, name))} values, expected one per channel "
                                 f"({self.num_channels}).")
        if min(self.perceptual_image_std) <= 0:
            raise ValueError(f"perceptual_image_std must be positive, got {list(self.perceptual_image_std)}.")
        if self.perceptual_input_size is not None and min(to_2tuple(self.perceptual_input_size)) < 1:
            raise ValueError(f"perceptual_input_size must be a positive size, got {self.perceptual_input_size}.")
        if self.adversarial_start_step < 0:
            raise ValueError(f"adversarial_start_step must be >= 0, got {self.adversarial_start_step}.")
        if self.discriminator_hidden_size < 1 or self.discriminator_num_layers < 1:
            raise ValueError(
                f"discriminator_hidden_size ({self.discriminator_hidden_size}) and discriminator_num_layers "
                f"({self.discriminator_num_layers}) must be at least 1 (VQGAN: 64 and 3)."
            )


# Named architectures of the PeCo tokenizer (`--config_name peco-base` of train_tokenizer.py).
PRESETS = {
    # 32 px digits, 4x downsampling -> 8x8 tokens (the MAE demo's patch grid), 64 codes; perceptual blocks 1-2.
    "peco-demo": dict(image_size=32, downsample_factor=4, hidden_size=16, channel_multipliers=[1, 2, 2],
                      num_res_blocks=1, attention_at_lowest_resolution=False, norm_num_groups=8, code_dim=16,
                      num_codes=64, perceptual_layers=[1, 2]),
    "peco-base": {},  # ours: VQGAN f16 (224 px -> 14x14), 8192 x 256 codes, perceptual blocks 3/6/9/12
}


__all__ = ["PecoConfig"]
