"""Loss functions of the MIM methods, as pure functions of tensors.

This file ships with every checkpoint (``trust_remote_code``): torch and stdlib only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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
