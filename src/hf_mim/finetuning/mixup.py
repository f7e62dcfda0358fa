"""Batch-level MixUp / CutMix (torchvision.transforms.v2) and label smoothing -> soft targets.

As in timm's `Mixup` used by the BEiT and MAE fine-tuning recipes: each training batch is mixed with
probability `prob`; when both MixUp and CutMix are enabled one of them is picked per batch (CutMix
with probability `switch_prob`); the partner of every image is the batch rolled by one; CutMix's
weight is the area actually pasted. Label smoothing then gives ``(1 - s) * target + s / K``; mixing
is linear, so smoothing before or after mixing gives the same targets.

The result [B, K] float goes to the model as `labels`: hf_mim classifiers take soft targets
(cross-entropy with probabilities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


class SoftTargets:
    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 smoothing: float = 0.0, prob: float = 1.0, switch_prob: float = 0.5):
        for name, value in (("--mixup", mixup_alpha), ("--cutmix", cutmix_alpha)):
            if value < 0:
                raise ValueError(f"{name} is the Beta(alpha, alpha) parameter and must be >= 0 (0 = off), got {value}.")
        for name, value, high in (("--smoothing", smoothing, 1.0), ("--mixup_prob", prob, 1.0),
                                  ("--mixup_switch_prob", switch_prob, 1.0)):
            if not 0 <= value <= high:
                raise ValueError(f"{name} must be in [0, {high}], got {value}.")
        self.num_classes, self.smoothing, self.prob, self.switch_prob = num_classes, smoothing, prob, switch_prob
        self.mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None

    @property
    def active(self) -> bool:
        return self.mixup is not None or self.cutmix is not None or self.smoothing > 0

    def pick(self) -> v2.Transform | None:
        """The mixing transform for this batch, or None (no mixing)."""
        if self.mixup is None and self.cutmix is None:
            return None
        if self.prob < 1 and torch.rand(()).item() >= self.prob:
            return None
        if self.mixup is None or self.cutmix is None:
            return self.mixup or self.cutmix
        return self.cutmix if torch.rand(()).item() < self.switch_prob else self.mixup

    def __call__(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [B, C, H, W], integer labels [B] -> mixed pixels, soft targets [B, K] (float32)."""
        if labels.is_floating_point():
            raise ValueError("SoftTargets takes integer class ids; the labels are already soft.")
        transform = self.pick()
        if transform is None:
            targets = F.one_hot(labels.long(), self.num_classes).float()  # [B, K]
        else:
            pixel_values, targets = transform(pixel_values, labels.long())  # [B, C, H, W], [B, K]
            targets = targets.float()
        if self.smoothing > 0:
            targets = targets * (1.0 - self.smoothing) + self.smoothing / self.num_classes
        return pixel_values, targets


__all__ = ["SoftTargets"]
