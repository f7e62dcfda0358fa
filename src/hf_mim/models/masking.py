"""Masking: which patches a MIM model hides. Pure functions and small seedable generators.

This file ships with every checkpoint (``trust_remote_code``): torch, numpy and stdlib only.
"""

from __future__ import annotations

import torch


def check_mask_ratio(mask_ratio: float) -> float:
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}. MAE uses 0.75.")
    return float(mask_ratio)


def random_masking(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking, driven by uniform `noise` [B, L].

    Keeps the `int(L * (1 - mask_ratio))` patches with the smallest noise. Returns
    ``ids_keep`` [B, K] (kept patch indices, in shuffled order), ``mask`` [B, L] (1 = removed,
    in the original patch order) and ``ids_restore`` [B, L] (inverse of the shuffle).
    """
    batch, length = noise.shape
    len_keep = int(length * (1 - check_mask_ratio(mask_ratio)))
    if len_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of {length}; lower it.")
    ids_shuffle = torch.argsort(noise, dim=1)  # [B, L] ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, L]
    ids_keep = ids_shuffle[:, :len_keep]  # [B, K]
    mask = (ids_restore >= len_keep).to(noise.dtype)  # [B, L], 1 = removed
    return ids_keep, mask, ids_restore


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens [B, L, D], ids [B, K] -> [B, K, D]."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
