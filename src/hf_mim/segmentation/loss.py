"""Class-balanced cross-entropy for UperNet, and the Trainer that applies it.

Why: transformers' UperNet ends in conv -> BatchNorm -> ReLU -> 1x1 classifier. When one class
covers most pixels (the digit scenes: ~90% background), its gradient dominates the first steps and
every channel of that last ReLU learns to fire for it; a rare class's pixels then sit at "all
channels off", where the logits are the classifier's bias alone (P(digit) stuck near 0.45 on the
ink task) and no gradient flows back through the ReLUs to move them. Measured on the digit
scenes with a 16-channel head: 40-77% of the digit pixels in that state from step 50 to 250, so the
argmax stays background. Weighting each class by 1 / sqrt(its pixel frequency) (a common remedy
for imbalanced segmentation, softer than full inverse frequency) gives the rare classes a gradient
of their own from the first step; on the same runs no digit pixel was left in that state.

The weights come from the training masks (counted by `data.check_mask_values`, in the pass that
checks them) and apply to the main and the auxiliary head, as UperNet's own loss does (auxiliary at
`auxiliary_loss_weight`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from ..finetuning.trainer import FinetuningTrainer


def balanced_class_weights(pixel_counts: np.ndarray) -> torch.Tensor:
    """[K] pixel counts per class -> [K] weights 1 / sqrt(frequency), scaled so that a pixel's mean
    weight is 1 (the loss keeps its unweighted size). A class absent from the masks counts as one
    pixel: it gets the largest weight, which matters only if it appears."""
    counts = np.maximum(np.asarray(pixel_counts, dtype=np.float64), 1.0)
    frequency = counts / counts.sum()
    weights = frequency ** -0.5
    weights /= (weights * frequency).sum()
    return torch.tensor(weights, dtype=torch.float32)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                           ignore_index: int) -> torch.Tensor:
    """logits [B, K, h, w] (upsampled bilinearly to the labels' size, as UperNet does) and labels
    [B, H, W] -> the weighted mean cross-entropy over the labelled pixels."""
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return nn.functional.cross_entropy(logits, labels, weight=weights.to(logits.device, logits.dtype),
                                       ignore_index=ignore_index)


class SegmentationTrainer(FinetuningTrainer):
    """`FinetuningTrainer` whose loss, with `class_weights` ([K]), is the class-weighted
    cross-entropy of UperNet's main and auxiliary logits; without, UperNet's own loss."""

    def __init__(self, *args, class_weights: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights = class_weights

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.class_weights is None or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        segmenter = self.accelerator.unwrap_model(model)
        config, labels = segmenter.config, inputs["labels"]  # labels [B, H, W]
        auxiliary = {}  # UperNet returns only the main logits: the auxiliary head's are caught on the way
        hook = None
        if segmenter.auxiliary_head is not None:
            hook = segmenter.auxiliary_head.register_forward_hook(
                lambda module, args, output: auxiliary.update(logits=output))
        try:
            outputs = model(pixel_values=inputs["pixel_values"])
        finally:
            if hook is not None:
                hook.remove()
        loss = weighted_cross_entropy(outputs.logits, labels, self.class_weights, config.loss_ignore_index)
        if "logits" in auxiliary:
            loss = loss + config.auxiliary_loss_weight * weighted_cross_entropy(
                auxiliary["logits"], labels, self.class_weights, config.loss_ignore_index)
        if not return_outputs:
            return loss
        return loss, SemanticSegmenterOutput(loss=loss, logits=outputs.logits, hidden_states=outputs.hidden_states,
                                             attentions=outputs.attentions)


__all__ = ["SegmentationTrainer", "balanced_class_weights", "weighted_cross_entropy"]
