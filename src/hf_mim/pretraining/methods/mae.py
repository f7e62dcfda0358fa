"""MAE (He et al., 2022): reconstruct the pixels of randomly masked patches.

    python examples/pretrain.py --method mae --mask_ratio 0.75 --norm_pix_loss
"""

from __future__ import annotations

import dataclasses

import torch

from ...cli import option
from ...models import MaeConfig, MaeForPreTraining
from ...training.method import TrainingMethod, processor_pixels, training_augmentation
from . import register_method


@dataclasses.dataclass
class MaeOptions:
    _argument_group_name = "MAE options (--method mae)"
    mask_ratio: float | None = option(help="fraction of patches removed (default: the config's, 0.75)")
    norm_pix_loss: bool | None = option(help="regress per-patch normalised pixels (default: the config's)")


@register_method
class MaeMethod(TrainingMethod):
    name = "mae"
    title = "MAE"
    summary = "MAE (He et al., 2022): reconstruct the pixels of randomly masked patches."
    config_class = MaeConfig
    model_class = MaeForPreTraining
    options_class = MaeOptions
    defaults = {"base_learning_rate": 1.5e-4, "adam_beta1": 0.9, "adam_beta2": 0.95, "weight_decay": 0.05,
                "warmup_steps": 0.05, "max_grad_norm": None}
    # The reference (timm's param_groups_weight_decay, no skip list) decays cls_token and mask_token too.
    no_weight_decay_names = ()

    def config_knobs(self) -> dict:
        knobs = super().config_knobs()
        for name in ("mask_ratio", "norm_pix_loss"):
            if getattr(self.options, name) is not None:
                knobs[name] = getattr(self.options, name)
        return knobs

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    def train_transform(self, processor):
        augment = training_augmentation(self.image_size, processor.image_mean, processor.image_std)
        num_patches = self.num_patches

        def transform(image, generator):
            # `noise` [L] decides the masked patches (argsort), reproducibly from the per-example generator.
            return {"pixel_values": augment(image), "noise": torch.rand(num_patches, generator=generator)}

        return transform

    def fast_views(self, processor):
        from ...fast_data import FastViews, PixelView

        view = PixelView("pixel_values", self.image_size, "bicubic", processor.image_mean, processor.image_std)
        num_patches = self.num_patches
        return FastViews((view,), scale=(0.2, 1.0),  # training_augmentation's
                         extras=lambda generator: {"noise": torch.rand(num_patches, generator=generator)})

    def eval_transform(self, processor):
        num_patches = self.num_patches

        def transform(image, generator):
            return {"pixel_values": processor_pixels(processor, image),
                    "noise": torch.rand(num_patches, generator=generator)}

        return transform

    def training_loss(self, model, batch):
        return model(pixel_values=batch["pixel_values"], noise=batch["noise"]).loss

    def eval_sums(self, model, batch):
        output = model(pixel_values=batch["pixel_values"], noise=batch["noise"])
        masked = output.mask.float().sum(-1)  # [B]
        return {"loss_sum": output.per_sample_loss * masked, "masked_patches": masked}  # [B] each

    def eval_metrics(self, sums):
        return {"loss": sums["loss_sum"] / max(sums["masked_patches"], 1.0)}

    def save_reconstructions(self, model, batch, processor, path, draw=True):
        from ..visualize import save_mae_reconstructions

        with torch.no_grad():
            output = model(pixel_values=batch["pixel_values"], noise=batch["noise"])
        return draw and save_mae_reconstructions(
            path, batch["pixel_values"], output.logits, output.mask, self.config, processor.image_mean,
            processor.image_std,
        )

    def recipe(self) -> dict:
        return {"mask_ratio": self.config.mask_ratio, "norm_pix_loss": self.config.norm_pix_loss}


__all__ = ["MaeMethod", "MaeOptions"]
