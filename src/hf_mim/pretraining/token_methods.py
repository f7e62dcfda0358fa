"""Pre-training methods that classify masked patches: BEiT, BEiT v2 and PeCo predict the visual token a
frozen image tokenizer gives each masked patch; ViT masked patch prediction predicts its mean colour.

    python examples/pretrain.py --method beit --tokenizer path/to/dvae        # DALL-E dVAE targets
    python examples/pretrain.py --method beitv2 --tokenizer path/to/vqkd      # VQ-KD targets + CLS head
    python examples/pretrain.py --method peco --tokenizer path/to/peco        # PeCo (perceptual VQ-VAE) targets
    python examples/pretrain.py --method vit_mpp                              # 3-bit mean colours, no tokenizer

The three token methods share :class:`TokenPredictionMethod` (they differ by presets, recipe defaults and
which tokenizer the reference uses); all four share :class:`MaskedPredictionMethod` (loss, per-image
evaluation sums, accuracy logging and the prediction figure). See shared/reference/MIM_SPEC.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import ClassVar

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from transformers import AutoConfig, AutoModel

from ..cards import hub_id
from ..models import BEiTConfig, BEiTForMaskedImageModeling, DvaeConfig, PecoConfig, VqkdConfig
from ..models import VitMppConfig, VitMppForPreTraining
from ..models.losses import mean_color_targets
from ..models.masking import BlockwiseMaskGenerator, build_mask_generator, random_patch_selection
from ..models.vit_core import grid_size_for, to_2tuple
from .methods import PretrainingMethod, crop_and_flip, processor_pixels, register_method
from .overrides import apply_config_overrides

logger = logging.getLogger(__name__)

BICUBIC, LANCZOS = v2.InterpolationMode.BICUBIC, v2.InterpolationMode.LANCZOS
# What `--tokenizer` must offer (hf_mim's DvaeTokenizer, VqkdTokenizer and PecoTokenizer all do).
TOKENIZER_INTERFACE = ("get_codebook_indices", "vocab_size", "token_grid")
TOKENIZER_PRECISIONS = ("bf16", "fp32", "reference_fp16")
# BEiT's masking counts are given for its 14x14 grid (75 patches, blocks of at least 16) and scaled to others.
BEIT_REFERENCE_GRID = (14, 14)

# Sizes shared by the presets of the BEiT family (the model is the same for BEiT, BEiT v2 and PeCo).
DEMO_SHAPE = dict(image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=512)  # 32x32 digits -> 8x8 patches; learns in minutes on two CPU cores
LARGE_SHAPE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)

# BEiT v1's recipe (MIM_SPEC): lr 1.5e-3 at batch 2048 as a base lr per 256 images, 10 of 800 epochs warm-up.
BEIT_DEFAULTS = {"base_learning_rate": 1.5e-3 * 256 / 2048, "adam_beta1": 0.9, "adam_beta2": 0.999,
                 "weight_decay": 0.05, "warmup_steps": 10 / 800, "max_grad_norm": 3.0,
                 # per-step cosine down to 1e-5, as the reference
                 "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-5}}


# ---------------------------------------------------------------------------------------------
# The frozen tokenizer
# ---------------------------------------------------------------------------------------------


class FrozenTokenizer:
    """A trained image tokenizer used as a fixed target function: frozen, in eval mode, under no_grad.

    It is deliberately not an attribute of the model: `save_pretrained` never sees it, and it is never
    passed to `accelerator.prepare` (a DDP/FSDP wrapper would try to synchronise gradients it does
    not have). :meth:`to` puts it on the training device. With `autocast_bf16` it runs in bf16
    autocast on CUDA (fp32 elsewhere); the dVAE's reference fp16 mode lives in its own config."""

    def __init__(self, model: torch.nn.Module, source: str, revision: str | None, autocast_bf16: bool):
        self.model = model.requires_grad_(False).eval()
        self.source, self.revision, self.autocast_bf16 = source, revision, autocast_bf16

    @property
    def vocab_size(self) -> int:
        return int(self.model.vocab_size)

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def precision(self) -> str:
        """How the targets are actually computed on the tokenizer's current device (recorded in the card)."""
        if getattr(self.model.config, "reference_fp16", False):
            return "reference_fp16"
        on_cuda = next(self.model.parameters()).device.type == "cuda"
        return "bf16 autocast" if self.autocast_bf16 and on_cuda else str(next(self.model.parameters()).dtype)

    def to(self, device) -> FrozenTokenizer:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] pixels in [0, 1] (the tokenizer applies its own pixel map) -> token ids [B, N] long."""
        bf16 = self.autocast_bf16 and pixels.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            ids = self.model.get_codebook_indices(pixels)  # [B, rows, cols]
        return ids.flatten(1).long()  # [B, N], row-major as the model's patches


def read_tokenizer_config(source: str, revision: str | None, hub_kwargs: dict):
    """A missing local folder is named as such, not reported as an unknown Hub repository."""
    if not os.path.isdir(os.path.expanduser(source)):
        looks_local = source.startswith(("/", "./", "../", "~")) or source.count("/") > 1
        if looks_local:
            raise FileNotFoundError(f"--tokenizer {source}: no such folder. Pass the folder train_tokenizer.py "
                                    "wrote (for example outputs/tokenizer-vqkd) or a Hub id.")
    try:
        return AutoConfig.from_pretrained(source, revision=revision, **hub_kwargs)
    except OSError as error:
        if os.path.isdir(os.path.expanduser(source)):
            raise
        raise FileNotFoundError(f"--tokenizer {source}: no such folder, and no Hub repository of that name could be "
                                f"loaded ({error}). Pass the folder train_tokenizer.py wrote (for example "
                                "outputs/tokenizer-vqkd) or a Hub id.") from error


def load_frozen_tokenizer(source: str, revision: str | None, precision: str, hub_kwargs: dict) -> FrozenTokenizer:
    """`AutoModel.from_pretrained(source)`, checked to be an image tokenizer and frozen."""
    config = read_tokenizer_config(source, revision, hub_kwargs)
    is_dvae = config.model_type == DvaeConfig.model_type
    if precision == "reference_fp16" and not is_dvae:
        raise ValueError(
            f"--tokenizer_precision reference_fp16 is the DALL-E dVAE's fp16 mode, but {source} is a "
            f"{config.model_type!r} tokenizer. Use bf16 (autocast on CUDA) or fp32."
        )
    if is_dvae:
        # The saved flag would run fp16 convolutions under our bf16 autocast: the precision option decides.
        config.reference_fp16 = precision == "reference_fp16"
    # fp32 weights whatever the saved dtype: bf16 comes from autocast, fp16 from the dVAE's own mode.
    model = AutoModel.from_pretrained(source, config=config, revision=revision, dtype=torch.float32, **hub_kwargs)
    missing = [name for name in TOKENIZER_INTERFACE if not hasattr(model, name)]
    if missing:
        raise ValueError(
            f"--tokenizer {source} loads as {type(model).__name__}, which is not an image tokenizer (it has no "
            f"{missing}). Pass an hf_mim DvaeTokenizer, VqkdTokenizer or PecoTokenizer saved with save_pretrained."
        )
    # A Hub tokenizer is recorded at the commit actually loaded; a local folder has no revision.
    commit = getattr(model.config, "_commit_hash", None)
    recorded = (commit or revision or "main") if hub_id(source) else None
    return FrozenTokenizer(model, source, recorded, autocast_bf16=precision == "bf16")


def tokenizer_input_size(tokenizer: FrozenTokenizer, patch_grid: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the tokenizer view: the tokenizer's own image size when its config has one
    (VQ-KD, PeCo), else the patch grid times its downsampling factor (the fully convolutional dVAE:
    14x14 patches -> 112 px). Raises when the tokenizer's token grid is not the model's patch grid."""
    config = tokenizer.model.config
    if getattr(config, "image_size", None) is not None:
        size = to_2tuple(config.image_size)
    elif getattr(config, "downsample_factor", None):
        factor = config.downsample_factor
        size = (patch_grid[0] * factor, patch_grid[1] * factor)
    else:
        raise ValueError(f"Cannot tell the input size of the tokenizer {tokenizer.source}: its config has neither "
                         "image_size nor downsample_factor.")
    token_grid = tuple(tokenizer.model.token_grid(size))
    if token_grid != tuple(patch_grid):
        raise ValueError(
            f"The tokenizer {tokenizer.source} turns its {size[0]}x{size[1]} px input into a "
            f"{token_grid[0]}x{token_grid[1]} token grid, but the model has a {patch_grid[0]}x{patch_grid[1]} patch "
            "grid: each patch needs exactly one token. Use a tokenizer made for this grid, or change --image_size / "
            "--patch_size so that image_size / patch_size equals the token grid."
        )
    return size


# ---------------------------------------------------------------------------------------------
# Data: the same crop for the model and the tokenizer
# ---------------------------------------------------------------------------------------------


def unit_float(image) -> torch.Tensor:
    """PIL image or uint8 tensor -> [C, H, W] float32 in [0, 1]."""
    return TF.to_dtype(TF.to_image(image), torch.float32, scale=True)


class TwoViewCrop:
    """BEiT's augmentation with its tokenizer view: colour jitter and a horizontal flip of the (PIL)
    image, then ONE RandomResizedCrop box resized twice, to the model's size (bicubic) and to the
    tokenizer's (LANCZOS for the dVAE, as the reference; bicubic for VQ-KD). Both views are
    [C, H, W] floats in [0, 1], not normalised. Randomness comes from torch's global RNG, which the
    data pipeline seeds per example."""

    def __init__(self, size, tokenizer_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), color_jitter: float = 0.4,
                 flip: bool = True, interpolation=BICUBIC, tokenizer_interpolation=LANCZOS):
        self.size, self.tokenizer_size = to_2tuple(size), to_2tuple(tokenizer_size)
        self.interpolation, self.tokenizer_interpolation = interpolation, tokenizer_interpolation
        shared = [v2.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter else []
        self.shared = v2.Compose(shared + ([v2.RandomHorizontalFlip()] if flip else []))
        self.crop = v2.RandomResizedCrop(self.size, scale=scale, ratio=ratio)  # only its box sampling is used

    def crop_box(self, image) -> dict[str, int]:
        """One random box {top, left, height, width} in the image's pixels."""
        return self.crop.make_params([image])

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.shared(image)
        box = self.crop_box(image)
        return (self.view(image, box, self.size, self.interpolation),  # [C, H, W]
                self.view(image, box, self.tokenizer_size, self.tokenizer_interpolation))  # [C, h, w]

    @staticmethod
    def view(image, box: dict[str, int], size: tuple[int, int], interpolation) -> torch.Tensor:
        return unit_float(TF.resized_crop(image, **box, size=list(size), interpolation=interpolation, antialias=True))


def add_crop_arguments(group, default_scale: tuple[float, float]) -> None:
    group.add_argument("--min_crop_scale", type=float, default=default_scale[0],
                       help=f"RandomResizedCrop's smallest area fraction (default: {default_scale[0]})")


# ---------------------------------------------------------------------------------------------
# Shared by every masked-patch classification method
# ---------------------------------------------------------------------------------------------


def masked_prediction_sums(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                           prefix: str = "") -> dict[str, torch.Tensor]:
    """Per-image sums [B] of the cross-entropy and of the correct predictions over the masked patches.
    logits [M, V] are in row-major order of `mask` [B, N] (as the models return them); targets [B, N]."""
    image_of_token = mask.nonzero()[:, 0]  # [M], sample index of each masked patch
    masked_targets = targets[mask]  # [M]
    losses = F.cross_entropy(logits.float(), masked_targets, reduction="none")  # [M]
    correct = (logits.argmax(dim=-1) == masked_targets).float()  # [M]
    zeros = torch.zeros(mask.shape[0], device=logits.device)  # [B]
    return {f"{prefix}loss_sum": zeros.index_add(0, image_of_token, losses),
            f"{prefix}correct": zeros.index_add(0, image_of_token, correct)}


class AccuracyMeter:
    """Masked-patch accuracy of the training micro-batches since the last log, summed on the device
    (no synchronisation per step) and reduced over processes when read."""

    def __init__(self):
        self.sums = None  # [2] float64: accuracy sum, micro-batches

    def add(self, accuracy: torch.Tensor) -> None:
        value = torch.stack([accuracy.detach().double(), torch.ones((), dtype=torch.float64, device=accuracy.device)])
        self.sums = value if self.sums is None else self.sums + value

    def flush(self, accelerator) -> dict[str, float]:
        if self.sums is None:
            return {}
        sums = accelerator.reduce(self.sums, reduction="sum") if accelerator is not None else self.sums
        self.sums = None
        total, count = sums.tolist()
        return {"masked_accuracy": total / max(count, 1.0)}


class MaskedPredictionMethod(PretrainingMethod):
    """A model that classifies its masked patches: `forward_masked` gives the model output (loss,
    logits [M, V] of the masked patches, accuracy), the targets of all patches [B, N] and the mask."""

    # Heads whose logits are scored: output field -> prefix of its metrics (BEiT v2 adds its CLS head).
    heads: ClassVar[dict[str, str]] = {"logits": ""}

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.accelerator = None
        self.train_accuracy = AccuracyMeter()

    def setup(self, accelerator) -> None:
        self.accelerator = accelerator

    def forward_masked(self, model, batch: dict, evaluation: bool = False):
        """(output, targets [B, N], mask [B, N] bool)."""
        raise NotImplementedError

    def training_loss(self, model, batch):
        output, _, _ = self.forward_masked(model, batch)
        self.train_accuracy.add(output.accuracy)
        return output.loss

    def step_metrics(self) -> dict[str, float]:
        return self.train_accuracy.flush(self.accelerator)

    def eval_sums(self, model, batch):
        output, targets, mask = self.forward_masked(model, batch, evaluation=True)
        sums = {"masked_patches": mask.sum(-1).float()}  # [B]
        for field, prefix in self.heads.items():
            sums.update(masked_prediction_sums(getattr(output, field), targets, mask, prefix))
        return sums

    def eval_metrics(self, sums):
        masked = max(sums["masked_patches"], 1.0)  # no masked patch: zeros, not NaN
        metrics = {"loss": sum(sums[f"{prefix}loss_sum"] for prefix in self.heads.values()) / masked}
        for prefix in self.heads.values():
            metrics[f"{prefix}accuracy"] = sums[f"{prefix}correct"] / masked
            if len(self.heads) > 1:  # the loss is a sum: give each part
                metrics[f"{prefix or 'mim_'}loss"] = sums[f"{prefix}loss_sum"] / masked
        return metrics

    def palette(self) -> torch.Tensor:
        """[V, 3] display colour of each class."""
        raise NotImplementedError

    def save_reconstructions(self, model, batch, processor, path, draw=True):
        from .visualize import save_token_predictions, to_display

        with torch.no_grad():
            output, targets, mask = self.forward_masked(model, batch, evaluation=True)
        if not draw:
            return False
        predictions = torch.full_like(targets, -1)  # [B, N], -1 = visible
        predictions[mask] = output.logits.argmax(dim=-1)
        images = to_display(batch["pixel_values"], processor.image_mean, processor.image_std)  # [B, H, W, C]
        return save_token_predictions(path, images, mask, targets, predictions, self.grid_size, self.palette(),
                                      f"{self.name} on held-out images (fixed evaluation masks)")


# ---------------------------------------------------------------------------------------------
# BEiT, BEiT v2, PeCo: visual tokens of a frozen tokenizer
# ---------------------------------------------------------------------------------------------


class TokenPredictionMethod(MaskedPredictionMethod):
    """BEiT's masked image modeling: blockwise masks, a frozen tokenizer's ids of a second view of the
    same crop as targets, cross-entropy over the masked patches. Subclasses set presets, recipe
    defaults and the tokenizer the reference uses."""

    config_class = BEiTConfig
    model_class = BEiTForMaskedImageModeling
    mask_generator = "blockwise"
    defaults = BEIT_DEFAULTS
    # The reference decays the mask token (only pos_embed, cls_token, 1-D parameters and biases are exempt).
    no_weight_decay_names = ("cls_token", "pos_embed")
    crop_scale: ClassVar[tuple[float, float]] = (0.08, 1.0)
    tokenizer_interpolation: ClassVar = LANCZOS
    # Tokenizer model types of the reference recipe; `require_expected_tokenizer`: anything else is an error.
    expected_tokenizers: ClassVar[tuple[str, ...]] = ()
    require_expected_tokenizer: ClassVar[bool] = False
    tokenizer_hint: ClassVar[str] = ""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        if not args.tokenizer:
            raise ValueError(
                f"--method {self.name} predicts the codes of a frozen image tokenizer: pass --tokenizer PATH_OR_ID "
                f"({self.tokenizer_hint})."
            )
        self.tokenizer: FrozenTokenizer | None = None  # loaded by build_model
        self.tokenizer_size: tuple[int, int] | None = None  # the tokenizer view's size, set with the config

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(f"{cls.name} options (--method {cls.name})")
        group.add_argument("--tokenizer", help=f"the frozen tokenizer giving the targets, a folder or Hub id "
                           f"({cls.tokenizer_hint}); loaded with AutoModel, --trust_remote_code applies")
        group.add_argument("--tokenizer_revision", help="branch, tag or commit of a Hub tokenizer (default: main)")
        group.add_argument("--tokenizer_precision", choices=TOKENIZER_PRECISIONS, default="bf16",
                           help="bf16: autocast on CUDA (fp32 elsewhere); fp32; reference_fp16: the DALL-E dVAE's "
                                "fp16 convolutions, as BEiT's published targets (near-tie argmaxes differ)")
        group.add_argument("--num_mask_patches", type=int,
                           help="patches masked per image (default: BEiT's 75 of 14x14, scaled to the grid)")
        group.add_argument("--min_mask_patches_per_block", type=int,
                           help="smallest block (default: BEiT's 16 of 14x14, scaled to the grid)")
        group.add_argument("--max_mask_patches_per_block", type=int, help="largest block (default: no limit)")
        add_crop_arguments(group, cls.crop_scale)
        group.add_argument("--color_jitter", type=float, default=0.4,
                           help="brightness/contrast/saturation jitter shared by both views (0: off)")

    # ------------------------------------------------------------------ model and tokenizer

    def build_model(self, default_preset: str):
        args = self.args
        hub = {"token": args.token, "cache_dir": args.cache_dir, "trust_remote_code": args.trust_remote_code}
        self.tokenizer = load_frozen_tokenizer(args.tokenizer, args.tokenizer_revision, args.tokenizer_precision, hub)
        self.check_tokenizer_type()
        return super().build_model(default_preset)

    def check_tokenizer_type(self) -> None:
        if not self.expected_tokenizers or self.tokenizer.model_type in self.expected_tokenizers:
            return
        message = (f"--method {self.name} uses a {' or '.join(self.expected_tokenizers)} tokenizer in its reference "
                   f"recipe, but {self.tokenizer.source} is a {self.tokenizer.model_type!r} one.")
        if self.require_expected_tokenizer:
            raise ValueError(f"{message} Pass {self.tokenizer_hint}, or use --method beit for other tokenizers.")
        logger.warning("%s Training goes on with its codes as targets.", message)

    def checked_config(self, config, source: str, overrides: dict):
        """Also: a new model takes the tokenizer's vocab_size; its token grid must be the patch grid."""
        user_overrides = apply_config_overrides(self.args.config_overrides)
        if "vocab_size" not in user_overrides and source in self.presets:
            overrides = {**overrides, "vocab_size": self.tokenizer.vocab_size}
        config = super().checked_config(config, source, overrides)
        self.check_vocab_size(config.vocab_size, source, "vocab_size" in user_overrides)
        grid = grid_size_for(self.args.image_size or config.image_size, config.patch_size)
        self.tokenizer_size = tokenizer_input_size(self.tokenizer, grid)
        return config

    def check_vocab_size(self, vocab_size: int, source: str, overridden: bool) -> None:
        codes, name = self.tokenizer.vocab_size, self.tokenizer.source
        if vocab_size == codes:
            return
        if overridden:
            raise ValueError(f"--config_overrides vocab_size={vocab_size} conflicts with the {codes} codes of the "
                             f"tokenizer {name}: drop vocab_size (a new model takes the tokenizer's), or use a "
                             f"tokenizer with {vocab_size} codes.")
        raise ValueError(
            f"{source} predicts {vocab_size} visual tokens (vocab_size) but the tokenizer {name} has {codes} codes. "
            f"Use the tokenizer this model was trained with, or start a new model from a preset "
            f"(--config_name {sorted(self.presets)[0]}: vocab_size is taken from the tokenizer)."
        )

    def setup(self, accelerator) -> None:
        super().setup(accelerator)
        self.tokenizer.to(accelerator.device)

    def card_tokenizer(self) -> tuple[str | None, str | None]:
        return self.tokenizer.source, self.tokenizer.revision

    # ------------------------------------------------------------------ data

    def mask_generator_kwargs(self) -> dict:
        """BEiT's blockwise counts (75 of 14x14, blocks of at least 16) scaled to the grid, unless given."""
        args = self.args
        scaled = BlockwiseMaskGenerator.scaled(self.grid_size, BEIT_REFERENCE_GRID)
        count = args.num_mask_patches or scaled.num_masking_patches
        return {"num_masking_patches": count,
                "min_num_patches": args.min_mask_patches_per_block or min(scaled.min_num_patches, count),
                "max_num_patches": args.max_mask_patches_per_block}

    def build_masks(self):
        """Callable generator -> [N] bool, True = masked."""
        return build_mask_generator(self.mask_generator, self.grid_size, **self.mask_generator_kwargs())

    def train_transform(self, processor):
        views = TwoViewCrop(self.image_size, self.tokenizer_size, scale=(self.args.min_crop_scale, 1.0),
                            color_jitter=self.args.color_jitter, tokenizer_interpolation=self.tokenizer_interpolation)
        masks, mean, std = self.build_masks(), processor.image_mean, processor.image_std

        def transform(image, generator):
            pixels, tokenizer_pixels = views(image)  # [C, H, W], [C, h, w] in [0, 1]
            return {"pixel_values": TF.normalize(pixels, mean, std), "tokenizer_pixel_values": tokenizer_pixels,
                    "bool_masked_pos": masks(generator)}  # [N]

        return transform

    def eval_transform(self, processor):
        masks, size, interpolation = self.build_masks(), list(self.tokenizer_size), self.tokenizer_interpolation

        def transform(image, generator):
            tokenizer_pixels = unit_float(TF.resize(image, size, interpolation=interpolation, antialias=True))
            return {"pixel_values": processor_pixels(processor, image),  # [C, H, W]
                    "tokenizer_pixel_values": tokenizer_pixels,  # [C, h, w] in [0, 1], the whole image
                    "bool_masked_pos": masks(generator)}  # [N], the same every evaluation

        return transform

    # ------------------------------------------------------------------ loss

    def forward_masked(self, model, batch, evaluation=False):
        targets = self.tokenizer(batch["tokenizer_pixel_values"])  # [B, N] token ids, no grad
        mask = batch["bool_masked_pos"].bool()  # [B, N]
        output = model(pixel_values=batch["pixel_values"], bool_masked_pos=mask, labels=targets)
        return output, targets, mask

    def palette(self) -> torch.Tensor:
        from .visualize import token_palette

        return token_palette(self.config.vocab_size)

    def recipe(self) -> dict:
        masking = self.mask_generator_kwargs()
        return {"tokenizer": self.tokenizer.source, "tokenizer_revision": self.tokenizer.revision,
                "tokenizer_type": self.tokenizer.model_type, "tokenizer_precision": self.tokenizer.precision,
                "tokenizer_image_size": self.tokenizer_size, "vocab_size": self.config.vocab_size,
                "num_mask_patches": masking["num_masking_patches"],
                "min_mask_patches_per_block": masking["min_num_patches"],
                "max_mask_patches_per_block": masking["max_num_patches"],
                "crop_scale": (self.args.min_crop_scale, 1.0), "color_jitter": self.args.color_jitter}


@register_method
class BeitMethod(TokenPredictionMethod):
    name = "beit"
    summary = "BEiT (Bao et al., 2022): predict a frozen dVAE's visual tokens of blockwise-masked patches."
    presets = {"beit-demo": DEMO_SHAPE, "beit-base": {},  # ViT-B/16 (BEiTConfig's defaults)
               "beit-large": {**LARGE_SHAPE, "layer_scale_init_value": 1e-5}}
    expected_tokenizers = (DvaeConfig.model_type,)
    tokenizer_hint = ("the DALL-E dVAE as a DvaeTokenizer, e.g. converted with `python -m hf_mim.convert dalle`; "
                      "any hf_mim tokenizer works")


@register_method
class Beitv2Method(TokenPredictionMethod):
    name = "beitv2"
    summary = "BEiT v2 (Peng et al., 2022): predict VQ-KD tokens, plus the CLS-aggregation head's loss."
    presets = {
        "beitv2-demo": {**DEMO_SHAPE, "use_cls_pretext_head": True, "cls_head_early_layer": 3},  # 3 of 4 blocks
        "beitv2-base": {"use_cls_pretext_head": True},  # ViT-B/16, head on block 9 of 12
        "beitv2-large": {**LARGE_SHAPE, "layer_scale_init_value": 1e-5, "use_cls_pretext_head": True,
                         "cls_head_early_layer": 21},
    }
    defaults = {**BEIT_DEFAULTS, "warmup_steps": 10 / 1600}  # 10 warm-up epochs of 1600
    crop_scale = (0.2, 1.0)
    tokenizer_interpolation = BICUBIC  # the VQ-KD view is 224 px bicubic, the model's own resampling
    heads = {"logits": "", "cls_head_logits": "cls_head_"}
    expected_tokenizers = (VqkdConfig.model_type,)
    tokenizer_hint = "a VqkdTokenizer, e.g. converted with `python -m hf_mim.convert vqkd`; any hf_mim tokenizer works"

    def checked_config(self, config, source, overrides):
        config = super().checked_config(config, source, overrides)
        if not config.use_cls_pretext_head:
            raise ValueError(f"{source} has no BEiT v2 CLS-aggregation head (use_cls_pretext_head=False): use "
                             "--method beit for it, or add --config_overrides use_cls_pretext_head=True.")
        return config

    def recipe(self) -> dict:
        return {**super().recipe(), "cls_head_early_layer": self.config.cls_head_early_layer,
                "cls_head_depth": self.config.cls_head_depth}


@register_method
class PecoMethod(TokenPredictionMethod):
    name = "peco"
    summary = "PeCo (Dong et al., 2023): BEiT's masked image modeling with a perceptual VQ-VAE's tokens."
    presets = {"peco-demo": DEMO_SHAPE, "peco-base": {},
               "peco-large": {**LARGE_SHAPE, "layer_scale_init_value": 1e-5}}
    expected_tokenizers = (PecoConfig.model_type,)
    require_expected_tokenizer = True  # the tokenizer is what makes it PeCo
    tokenizer_hint = "a PecoTokenizer trained with examples/train_tokenizer.py"


# ---------------------------------------------------------------------------------------------
# ViT masked patch prediction: 3-bit mean colours
# ---------------------------------------------------------------------------------------------


@register_method
class VitMppMethod(MaskedPredictionMethod):
    name = "vit_mpp"
    summary = "ViT masked patch prediction (Dosovitskiy et al., 2021): predict corrupted patches' mean colours."
    config_class = VitMppConfig
    model_class = VitMppForPreTraining
    # The ViT paper: Adam, lr 2e-4 at batch 4096, 10k of 1M steps warm-up, cosine, clipping at norm 1;
    # it gives no weight decay for this run: 0.05 as the other MIM methods.
    defaults = {"base_learning_rate": 2e-4 * 256 / 4096, "adam_beta1": 0.9, "adam_beta2": 0.999,
                "weight_decay": 0.05, "warmup_steps": 0.01, "max_grad_norm": 1.0}
    presets = {"vit_mpp-demo": DEMO_SHAPE, "vit_mpp-base": {}, "vit_mpp-large": LARGE_SHAPE}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("ViT-MPP options (--method vit_mpp)")
        group.add_argument("--mask_ratio", type=float,
                           help="fraction of patches corrupted (default: the config's, 0.5)")
        add_crop_arguments(group, (0.2, 1.0))

    def config_knobs(self) -> dict:
        knobs = super().config_knobs()
        if self.args.mask_ratio is not None:
            knobs["mask_ratio"] = self.args.mask_ratio
        return knobs

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    def example(self, pixels: torch.Tensor, normalized: torch.Tensor, generator) -> dict[str, torch.Tensor]:
        """The tensors of one example from its [0, 1] pixels [C, H, W] and the model input [C, H, W]."""
        config = self.config
        return {
            "pixel_values": normalized,
            # The targets need the UNNORMALISED pixels the model never sees; bicubic may overshoot [0, 1].
            "mean_color_targets": mean_color_targets(pixels[None].clamp(0, 1), config.patch_size,
                                                     config.color_bits)[0],  # [N] long
            "bool_masked_pos": random_patch_selection(1, self.num_patches, config.mask_ratio, generator)[0],  # [N]
        }

    def train_transform(self, processor):
        augment = crop_and_flip(self.image_size, scale=(self.args.min_crop_scale, 1.0))
        mean, std = processor.image_mean, processor.image_std

        def transform(image, generator):
            pixels = augment(image)  # [C, H, W] in [0, 1]
            return self.example(pixels, TF.normalize(pixels, mean, std), generator)

        return transform

    def eval_transform(self, processor):
        def transform(image, generator):
            pixels = processor(image, do_normalize=False, return_tensors="pt")["pixel_values"][0]  # [C, H, W]
            return self.example(pixels, processor_pixels(processor, image), generator)

        return transform

    def forward_masked(self, model, batch, evaluation=False):
        # Training draws the 80/10/10 corruption from torch's RNG, which the loop reseeds per micro-batch;
        # evaluation uses a fixed generator so that every evaluation corrupts alike.
        generator = torch.Generator().manual_seed(self.args.seed) if evaluation else None
        targets, mask = batch["mean_color_targets"], batch["bool_masked_pos"].bool()  # [B, N] each
        output = model(pixel_values=batch["pixel_values"], bool_masked_pos=mask, labels=targets, generator=generator)
        return output, targets, mask

    def palette(self) -> torch.Tensor:
        from .visualize import color_class_palette

        return color_class_palette(self.config.num_channels, self.config.color_bits)

    def recipe(self) -> dict:
        config = self.config
        return {"mask_ratio": config.mask_ratio, "replace_prob": config.replace_prob, "random_prob": config.random_prob,
                "color_bits": config.color_bits, "crop_scale": (self.args.min_crop_scale, 1.0)}


__all__ = [
    "Beitv2Method", "BeitMethod", "FrozenTokenizer", "MaskedPredictionMethod", "PecoMethod", "TokenPredictionMethod",
    "TwoViewCrop", "VitMppMethod", "load_frozen_tokenizer", "masked_prediction_sums", "tokenizer_input_size",
]
