"""Loss functions of the MIM methods, as pure functions of tensors.

This file ships with every checkpoint (``trust_remote_code``): torch and stdlib only.
"""

from __future__ import annotations

import torch


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm_pix target: per patch, subtract the mean and divide by sqrt(unbiased var + eps)."""
    mean = patches.mean(dim=-1, keepdim=True)  # [B, L, 1]
    var = patches.var(dim=-1, keepdim=True, unbiased=True)  # [B, L, 1]
    return (patches - mean) / (var + eps) ** 0.5


def masked_mse_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    pred, target: [B, L, P]; mask: [B, L] with 1 = removed (the only patches that count).
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, L]
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
