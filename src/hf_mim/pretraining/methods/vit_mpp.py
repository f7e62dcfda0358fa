"""ViT masked patch prediction (Dosovitskiy et al., 2021): predict the 3-bit mean colour of corrupted patches.

    python examples/pretrain.py --method vit_mpp          # no tokenizer: the targets come from the pixels
"""

from __future__ import annotations

import dataclasses

import torch
from torchvision.transforms.v2 import functional as TF

from ...cli import option
from ...models import VitMppConfig, VitMppForPreTraining
from ...models.losses import mean_color_targets
from ...models.masking import random_patch_selection
from ...training.method import CropOptions, crop_and_flip, processor_pixels
from . import register_method
from .masked_prediction import MaskedPredictionMethod


@dataclasses.dataclass
class VitMppOptions(CropOptions):
    _argument_group_name = "ViT-MPP options (--method vit_mpp)"
    mask_ratio: float | None = option(help="fraction of patches corrupted (default: the config's, 0.5)")


@register_method
class VitMppMethod(MaskedPredictionMethod):
    name = "vit_mpp"
    title = "ViT masked patch prediction"
    summary = "ViT masked patch prediction (Dosovitskiy et al., 2021): predict corrupted patches' mean colours."
    config_class = VitMppConfig
    model_class = VitMppForPreTraining
    # The ViT paper: Adam, lr 2e-4 at batch 4096, 10k of 1M steps warm-up, cosine, clipping at norm 1;
    # it gives no weight decay for this run: 0.05 as the other MIM methods.
    defaults = {"base_learning_rate": 2e-4 * 256 / 4096, "adam_beta1": 0.9, "adam_beta2": 0.999,
                "weight_decay": 0.05, "warmup_steps": 0.01, "max_grad_norm": 1.0}
    options_class = VitMppOptions

    def __init__(self, args):
        super().__init__(args)
        self.crop_min_scale = self.options.crop_min_scale or 0.2

    def config_knobs(self) -> dict:
        knobs = super().config_knobs()
        if self.options.mask_ratio is not None:
            knobs["mask_ratio"] = self.options.mask_ratio
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
        augment = crop_and_flip(self.image_size, scale=(self.crop_min_scale, 1.0))
        mean, std = processor.image_mean, processor.image_std

        def transform(image, generator):
            pixels = augment(image)  # [C, H, W] in [0, 1]
            return self.example(pixels, TF.normalize(pixels, mean, std), generator)

        return transform

    def fast_views(self, processor):
        from ...fast_data import FastViews, PixelView

        view = PixelView("pixel_values", self.image_size, "bicubic", processor.image_mean, processor.image_std,
                         unit_key="unit_pixel_values")
        config, num_patches = self.config, self.num_patches

        def finish(batch):  # the colour targets from the unnormalised pixels, as example() does
            pixels = batch.pop("unit_pixel_values")  # [B, C, H, W] in [0, 1]
            return {**batch, "mean_color_targets": mean_color_targets(pixels, config.patch_size, config.color_bits)}

        return FastViews((view,), scale=(self.crop_min_scale, 1.0), finish=finish, extras=lambda generator: {
            "bool_masked_pos": random_patch_selection(1, num_patches, config.mask_ratio, generator)[0]})

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
        from ..visualize import color_class_palette

        return color_class_palette(self.config.num_channels, self.config.color_bits)

    def recipe(self) -> dict:
        config = self.config
        return {"mask_ratio": config.mask_ratio, "replace_prob": config.replace_prob, "random_prob": config.random_prob,
                "color_bits": config.color_bits, "crop_min_scale": self.crop_min_scale}  # the option's name


__all__ = ["VitMppMethod", "VitMppOptions"]
