"""What the masked-patch classification methods share: BEiT, BEiT v2 and PeCo predict the visual token a
frozen image tokenizer gives each masked patch (:class:`TokenPredictionMethod`); ViT masked patch
prediction predicts its mean colour. All of them train on the model's loss and evaluate on the sums of
its per-sample losses and accuracies (:class:`MaskedPredictionMethod`). See shared/reference/MIM_SPEC.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import ClassVar, Literal

import torch
from torchvision.transforms.v2 import functional as TF

from ...cli import option
from ...models import BEiTConfig, BEiTForMaskedImageModeling
from ...models.masking import BlockwiseMaskGenerator, build_mask_generator
from ...models.vit_core import grid_size_for
from ...training.method import CropOptions, TrainingMethod, processor_pixels
from ...training.overrides import apply_config_overrides
from .token_targets import (
    LANCZOS, TOKENIZER_PRECISIONS, FrozenTokenizer, TargetHealth, TwoViewCrop, load_frozen_tokenizer,
    tokenizer_input_size, unit_float,
)

logger = logging.getLogger(__name__)

# BEiT's masking counts are given for its 14x14 grid (75 patches, blocks of at least 16) and scaled to others.
BEIT_REFERENCE_GRID = (14, 14)
# BEiT v1's recipe (MIM_SPEC): lr 1.5e-3 at batch 2048 as a base lr per 256 images, 10 of 800 epochs warm-up.
BEIT_DEFAULTS = {"base_learning_rate": 1.5e-3 * 256 / 2048, "adam_beta1": 0.9, "adam_beta2": 0.999,
                 "weight_decay": 0.05, "warmup_steps": 10 / 800, "max_grad_norm": 3.0,
                 # per-step cosine down to 1e-5, as the reference
                 "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-5}}


@dataclasses.dataclass
class TokenTargetOptions(CropOptions):
    """Options of the methods that predict a frozen tokenizer's codes (each method names its group)."""

    tokenizer: str | None = option(help="the frozen tokenizer giving the targets, a folder or Hub id; loaded with "
                                        "AutoModel, --trust_remote_code applies")
    tokenizer_revision: str | None = option(help="branch, tag or commit of a Hub tokenizer (default: main)")
    tokenizer_precision: Literal[TOKENIZER_PRECISIONS] = option(
        "reference", help="reference (default): as the papers computed the targets: a converted DALL-E dVAE's fp16 "
                          "convolutions (as its config says), VQ-KD under fp16 autocast on CUDA, else fp32; fp32; "
                          "bf16 / fp16: autocast on CUDA (fp32 elsewhere); reference_fp16: force the dVAE's fp16 "
                          "convolutions. Near-tie argmaxes differ between them; the run logs which is in force")
    num_mask_patches: int | None = option(help="patches masked per image (default: BEiT's 75 of 14x14, scaled to "
                                               "the grid)")
    min_mask_patches_per_block: int | None = option(help="smallest block (default: BEiT's 16 of 14x14, scaled to "
                                                         "the grid)")
    max_mask_patches_per_block: int | None = option(help="largest block (default: no limit)")
    color_jitter: float = option(0.4, help="brightness/contrast/saturation jitter shared by both views (0: off)")
    allow_degenerate_targets: bool = option(
        False, help="train even when the tokenizer gives (nearly) every patch the same code (refused by default: "
                    "a collapsed tokenizer makes the accuracy meaningless)")


# ---------------------------------------------------------------------------------------------
# Shared by every masked-patch classification method
# ---------------------------------------------------------------------------------------------


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


class MaskedPredictionMethod(TrainingMethod):
    """A model that classifies its masked patches: `forward_masked` gives the model output (loss,
    logits [M, V] of the masked patches, accuracy), the targets of all patches [B, N] and the mask."""

    # Heads whose logits are scored: output field -> prefix of its metrics and of its per-sample output
    # fields (BEiT v2 adds its CLS head: cls_head_logits, cls_head_per_sample_loss, ...).
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

    def step_metrics(self, model) -> dict[str, float]:
        return self.train_accuracy.flush(self.accelerator)

    def eval_sums(self, model, batch):
        """The model's per-sample losses and accuracies, weighted by each image's masked patches."""
        output, _, mask = self.forward_masked(model, batch, evaluation=True)
        masked = mask.sum(-1).float()  # [B]
        sums = {"masked_patches": masked}
        for prefix in self.heads.values():
            sums[f"{prefix}loss_sum"] = getattr(output, f"{prefix}per_sample_loss") * masked  # [B]
            sums[f"{prefix}correct"] = getattr(output, f"{prefix}per_sample_accuracy") * masked  # [B]
        return sums

    def eval_metrics(self, sums):
        masked = max(sums["masked_patches"], 1.0)  # no masked patch: zeros, not NaN
        metrics = {"loss": sums["loss_sum"] / masked}  # the model's loss: every head's
        for prefix in self.heads.values():
            metrics[f"{prefix}accuracy"] = sums[f"{prefix}correct"] / masked
        if len(self.heads) > 1:  # the loss is a sum: give each part
            extra = [prefix for prefix in self.heads.values() if prefix]
            for prefix in extra:
                metrics[f"{prefix}loss"] = sums[f"{prefix}loss_sum"] / masked
            metrics["mim_loss"] = (sums["loss_sum"] - sum(sums[f"{prefix}loss_sum"] for prefix in extra)) / masked
        return metrics

    def palette(self) -> torch.Tensor:
        """[V, 3] display colour of each class."""
        raise NotImplementedError

    def save_reconstructions(self, model, batch, processor, path, draw=True):
        from ..visualize import save_token_predictions, to_display

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
    needs_tokenizer = True
    defaults = BEIT_DEFAULTS
    # The reference decays the mask token (only pos_embed, cls_token, 1-D parameters and biases are exempt).
    no_weight_decay_names = ("cls_token", "pos_embed")
    crop_scale: ClassVar[tuple[float, float]] = (0.08, 1.0)
    tokenizer_interpolation: ClassVar = LANCZOS
    # Tokenizer model types of the reference recipe; `require_expected_tokenizer`: anything else is an error.
    expected_tokenizers: ClassVar[tuple[str, ...]] = ()
    require_expected_tokenizer: ClassVar[bool] = False
    tokenizer_hint: ClassVar[str] = ""

    @classmethod
    def options_from(cls, args):
        options = super().options_from(args)
        if not options.tokenizer:  # checked when parsing, not after the data has loaded
            raise ValueError(
                f"--method {cls.name} predicts the codes of a frozen image tokenizer: pass --tokenizer PATH_OR_ID "
                f"({cls.tokenizer_hint})."
            )
        return options

    def __init__(self, args):
        super().__init__(args)
        self.crop_min_scale = self.options.crop_min_scale or self.crop_scale[0]
        self.tokenizer: FrozenTokenizer | None = None  # loaded by build_model
        self.tokenizer_size: tuple[int, int] | None = None  # the tokenizer view's size, set with the config
        self.target_health: TargetHealth | None = None  # measures the first batches' targets (set by setup)

    # ------------------------------------------------------------------ model and tokenizer

    def build_model(self, default_preset: str):
        args, options = self.args, self.options
        hub = {"token": args.token, "cache_dir": args.cache_dir, "trust_remote_code": args.trust_remote_code}
        self.tokenizer = load_frozen_tokenizer(options.tokenizer, options.tokenizer_revision,
                                               options.tokenizer_precision, hub)
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
        if "vocab_size" not in user_overrides and source in self.presets():
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
            f"(--config_name {self.presets()[0]}: vocab_size is taken from the tokenizer)."
        )

    def setup(self, accelerator) -> None:
        super().setup(accelerator)
        self.tokenizer.to(accelerator.device)
        self.target_health = TargetHealth(self.tokenizer.vocab_size, self.tokenizer.source,
                                          allow_degenerate=self.options.allow_degenerate_targets)

    def card_tokenizer(self) -> tuple[str | None, str | None]:
        return self.tokenizer.source, self.tokenizer.revision

    # ------------------------------------------------------------------ data

    def mask_generator_kwargs(self) -> dict:
        """BEiT's blockwise counts (75 of 14x14, blocks of at least 16) scaled to the grid, unless given."""
        options = self.options
        scaled = BlockwiseMaskGenerator.scaled(self.grid_size, BEIT_REFERENCE_GRID)
        count = options.num_mask_patches or scaled.num_mask_patches
        return {"num_mask_patches": count,  # the option names, also in the saved image processor
                "min_mask_patches_per_block": (options.min_mask_patches_per_block
                                               or min(scaled.min_mask_patches_per_block, count)),
                "max_mask_patches_per_block": options.max_mask_patches_per_block}

    def build_masks(self):
        """Callable generator -> [N] bool, True = masked."""
        return build_mask_generator(self.mask_generator, self.grid_size, **self.mask_generator_kwargs())

    def train_transform(self, processor):
        views = TwoViewCrop(self.image_size, self.tokenizer_size, scale=(self.crop_min_scale, 1.0),
                            color_jitter=self.options.color_jitter, tokenizer_interpolation=self.tokenizer_interpolation)
        masks, mean, std = self.build_masks(), processor.image_mean, processor.image_std

        def transform(image, generator):
            pixels, tokenizer_pixels = views(image)  # [C, H, W], [C, h, w] in [0, 1]
            return {"pixel_values": TF.normalize(pixels, mean, std), "tokenizer_pixel_values": tokenizer_pixels,
                    "bool_masked_pos": masks(generator)}  # [N]

        return transform

    def fast_views(self, processor):
        from ...fast_data import FastViews, PixelView

        masks, mean, std = self.build_masks(), processor.image_mean, processor.image_std
        views = (PixelView("pixel_values", self.image_size, "bicubic", mean, std),
                 PixelView("tokenizer_pixel_values", self.tokenizer_size, self.tokenizer_interpolation.value))
        return FastViews(views, scale=(self.crop_min_scale, 1.0), color_jitter=self.options.color_jitter,
                         jitter_and_flip_first=True, extras=lambda generator: {"bool_masked_pos": masks(generator)})

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
        if not evaluation and self.target_health is not None:
            self.target_health.add(targets, self.accelerator)  # refuses a collapsed tokenizer's targets
        mask = batch["bool_masked_pos"].bool()  # [B, N]
        output = model(pixel_values=batch["pixel_values"], bool_masked_pos=mask, labels=targets)
        return output, targets, mask

    def palette(self) -> torch.Tensor:
        from ..visualize import token_palette

        return token_palette(self.config.vocab_size)

    def recipe(self) -> dict:
        masking = self.mask_generator_kwargs()
        return {"tokenizer": self.tokenizer.source, "tokenizer_revision": self.tokenizer.revision,
                "tokenizer_type": self.tokenizer.model_type, "tokenizer_precision": self.tokenizer.precision,
                "tokenizer_image_size": self.tokenizer_size, "vocab_size": self.config.vocab_size,
                **masking,
                "crop_min_scale": self.crop_min_scale, "color_jitter": self.options.color_jitter}


__all__ = ["BEIT_DEFAULTS", "MaskedPredictionMethod", "TokenPredictionMethod", "TokenTargetOptions"]
