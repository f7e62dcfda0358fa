"""Loss functions of the MIM methods, as pure functions of tensors.

This file ships with every checkpoint (``trust_remote_code``): torch and stdlib only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm_pix target: per patch, subtract the mean and divide by sqrt(unbiased var + eps)."""
    mean = patches.mean(dim=-1, keepdim=True)  # [B, L, 1]
    var = patches.var(dim=-1, keepdim=True, unbiased=True)  # [B, L, 1]
    return (patches - mean) / (var + eps) ** 0.5


def masked_mse_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    pred, target: [B, L, P]; mask: [B, L] with 1 = removed (the only patches that count).
    """
    return masked_mse_losses(pred, target, mask)[0]


def masked_mse_losses(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the batch's :func:`masked_mse_loss`, each sample's mean over its own masked patches [B]), from the
    same per-patch errors."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, L]
    mask = mask.to(per_patch.dtype)
    per_sample_sum = (per_patch * mask).sum(dim=-1)  # [B]
    per_sample_count = mask.sum(dim=-1)  # [B]
    loss = per_sample_sum.sum() / per_sample_count.sum().clamp_min(1.0)
    return loss, per_sample_sum / per_sample_count.clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# DALL-E dVAE: Gumbel-softmax relaxation with a uniform prior (Ramesh et al., 2021, appendix A)
# ---------------------------------------------------------------------------------------------


def annealed_value(step: int, start: float, end: float, steps: int, schedule: str = "cosine") -> float:
    """`start` at step 0 moving to `end` at `steps` (and after): half-cosine or linear in step/steps."""
    if schedule not in ("cosine", "linear"):
        raise ValueError(f"schedule must be 'cosine' or 'linear', got {schedule!r}.")
    progress = 1.0 if steps <= 0 else min(max(step, 0) / steps, 1.0)
    if schedule == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return start + (end - start) * progress


def gumbel_temperature(
    step: int, start: float = 1.0, end: float = 1.0 / 16, anneal_steps: int = 150_000, schedule: str = "cosine"
) -> float:
    """The relaxation temperature at optimizer update `step` (paper: 1 -> 1/16 over 150,000 updates)."""
    return annealed_value(step, start, end, anneal_steps, schedule)


def kl_weight_at(step: int, kl_weight: float = 6.6, warmup_steps: int = 5000, schedule: str = "cosine") -> float:
    """The KL weight beta at update `step`: 0 rising to `kl_weight` over `warmup_steps` (paper: 6.6, 5,000)."""
    return annealed_value(step, 0.0, kl_weight, warmup_steps, schedule)


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(q || uniform) in nats of q = softmax(logits) along `dim`: sum q log q + log K, one per position."""
    log_q = torch.log_softmax(logits.float(), dim=dim)  # [..., K, ...]
    return (log_q.exp() * log_q).sum(dim=dim) + math.log(logits.shape[dim])


def logit_laplace_nll(target: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise -log density of the logit-Laplace distribution at `target` in (0, 1):
    log(2b) + log x + log(1-x) + |logit(x) - loc| / b, with b = exp(log_scale)."""
    target, loc, log_scale = target.float(), loc.float(), log_scale.float()
    log_x, log_1mx = torch.log(target), torch.log1p(-target)
    return math.log(2.0) + log_scale + log_x + log_1mx + (log_x - log_1mx - loc).abs() * torch.exp(-log_scale)


class DvaeLoss(NamedTuple):
    total: torch.Tensor  # (sum recon + beta * sum KL) / number of pixel values: the paper's -ELB per value
    reconstruction: torch.Tensor  # mean per pixel value (nats for logit-Laplace, squared error for MSE)
    kl: torch.Tensor  # mean per latent position, nats


def dvae_loss(
    stats: torch.Tensor, target: torch.Tensor, logits: torch.Tensor, kl_weight: float,
    reconstruction: str = "logit_laplace",
) -> DvaeLoss:
    """The dVAE objective of one batch.

    stats [B, 2C, H, W]: decoder output, channels [:C] the logit-Laplace location, [C:] its log-scale;
    target [B, C, H, W]: the input pixels already mapped into (eps, 1-eps) (the model's pixel map);
    logits [B, K, h, w]: encoder logits. "mse" compares sigmoid(location) with the mapped target.
    The KL sum is weighted against the reconstruction SUM, as in the paper's ELB, then both are
    divided by the number of pixel values, so `kl_weight` keeps the paper's meaning (6.6).
    """
    channels = target.shape[1]
    loc, log_scale = stats[:, :channels], stats[:, channels:]  # [B, C, H, W] each
    if reconstruction == "logit_laplace":
        per_value = logit_laplace_nll(target, loc, log_scale)  # [B, C, H, W]
    elif reconstruction == "mse":
        per_value = (torch.sigmoid(loc.float()) - target.float()).pow(2)  # [B, C, H, W]
    else:
        raise ValueError(f"reconstruction must be 'logit_laplace' or 'mse', got {reconstruction!r}.")
    kl = kl_to_uniform(logits, dim=1)  # [B, h, w]
    total = (per_value.sum() + kl_weight * kl.sum()) / per_value.numel()
    return DvaeLoss(total=total, reconstruction=per_value.mean(), kl=kl.mean())


# ---------------------------------------------------------------------------------------------
# Classification over masked positions (BEiT's visual tokens, ViT-MPP's mean colours)
# ---------------------------------------------------------------------------------------------


class MaskedTokenLoss(NamedTuple):
    """Cross-entropy and accuracy over the masked tokens: of the batch (scalars) and of each sample [B]."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    per_sample_loss: torch.Tensor
    per_sample_accuracy: torch.Tensor


def masked_token_losses(logits: torch.Tensor, targets: torch.Tensor, samples: torch.Tensor, batch: int) -> MaskedTokenLoss:
    """logits [M, V] and targets [M] of the M masked tokens of the batch; samples [M]: the sample of each.

    The batch values are sums over tokens divided by max(M, 1), so a batch without a masked patch gives 0
    (with the graph kept) instead of the NaN of an empty mean; a sample's values are the mean over its own
    masked tokens (0 without any). Both come from the same per-token losses.
    """
    per_token = F.cross_entropy(logits.float(), targets, reduction="none")  # [M]
    correct = (logits.detach().argmax(dim=-1) == targets).float()  # [M]
    count = max(targets.numel(), 1)
    zeros = per_token.new_zeros(batch)  # [B]
    tokens_per_sample = zeros.index_add(0, samples, torch.ones_like(per_token)).clamp_min(1.0)  # [B]
    return MaskedTokenLoss(
        loss=per_token.sum() / count, accuracy=correct.sum() / count,
        per_sample_loss=zeros.index_add(0, samples, per_token) / tokens_per_sample,
        per_sample_accuracy=zeros.index_add(0, samples, correct) / tokens_per_sample,
    )


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, accuracy) over all M masked tokens of the batch: logits [M, V], targets [M]."""
    result = masked_token_losses(logits, targets, torch.zeros_like(targets), 1)
    return result.loss, result.accuracy


# ---------------------------------------------------------------------------------------------
# ViT masked patch prediction: the mean colour of each patch as a class
# ---------------------------------------------------------------------------------------------

# Pixels this far outside [0, 1] (resampling overshoot) are accepted; their level is clamped.
COLOR_RANGE_TOLERANCE = 0.01


def num_color_classes(num_channels: int, bits: int = 3) -> int:
    """(2**bits)**channels: 512 for RGB at 3 bits (ViT), 8 for one channel."""
    return (2**bits) ** num_channels


def mean_color_targets(pixel_values: torch.Tensor, patch_size, bits: int = 3) -> torch.Tensor:
    """ViT's masked-patch-prediction target: the quantised mean colour of every patch, [B, N] long.

    `pixel_values` [B, C, H, W] are UNNORMALISED pixels in [0, 1] (before the mean/std
    normalisation the model input gets). Per patch and channel, mean m (computed in float64);
    level = min(floor(m * 2**bits), 2**bits - 1), so m = 1.0 is the top level; class =
    sum_c level_c * (2**bits)**(C-1-c), i.e. r*64 + g*8 + b for RGB at 3 bits (first channel most
    significant). Patches are in the model's row-major order; `patch_size` is an int or (h, w).
    """
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be [batch, channels, height, width], got {list(pixel_values.shape)}.")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values has dtype {pixel_values.dtype}; pass floats in [0, 1] (uint8 images: `.float() / 255`)."
        )
    if bits < 1:
        raise ValueError(f"bits must be at least 1 (ViT uses 3), got {bits}.")
    low, high = float(pixel_values.min()), float(pixel_values.max())
    if low < -COLOR_RANGE_TOLERANCE or high > 1 + COLOR_RANGE_TOLERANCE:
        raise ValueError(
            f"Mean-colour targets need unnormalised pixels in [0, 1], got values in [{low:.3g}, {high:.3g}]. "
            "Compute them before the mean/std normalisation (or undo it: x * std + mean)."
        )
    batch, channels, height, width = pixel_values.shape
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else (int(patch_size[0]), int(patch_size[1]))
    if height % ph or width % pw:
        raise ValueError(f"Image size {height}x{width} is not divisible by the patch size {ph}x{pw}.")
    patches = pixel_values.double().reshape(batch, channels, height // ph, ph, width // pw, pw)
    means = patches.mean(dim=(3, 5)).flatten(2)  # [B, C, N]
    levels = 2**bits
    level = torch.floor(means * levels).clamp(0, levels - 1).long()  # [B, C, N]
    weights = levels ** torch.arange(channels - 1, -1, -1, device=level.device)  # [C], first channel most significant
    return (level * weights[None, :, None]).sum(dim=1)  # [B, N]
