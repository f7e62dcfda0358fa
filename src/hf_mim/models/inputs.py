"""Checks of the inputs every pre-training model shares: the patch mask and per-patch class labels.

This file ships with every checkpoint (``trust_remote_code``): torch and stdlib only.
"""

from __future__ import annotations

import torch


def check_bool_masked_pos(bool_masked_pos: torch.Tensor, batch: int, grid: tuple[int, int],
                          hint: str = "Generate the mask for the patch grid of the images you pass.") -> torch.Tensor:
    """[B, N] or [B, rows, cols] mask (True / 1 = masked) -> [B, N] bool in row-major patch order."""
    rows, cols = grid
    if tuple(bool_masked_pos.shape) not in ((batch, rows * cols), (batch, rows, cols)):
        raise ValueError(
            f"bool_masked_pos has shape {list(bool_masked_pos.shape)}, expected [{batch}, {rows * cols}] (or "
            f"[{batch}, {rows}, {cols}]) for a batch of {batch} images of {rows}x{cols} patches. {hint}"
        )
    mask = bool_masked_pos.reshape(batch, rows * cols)
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("bool_masked_pos must be boolean (or integer 0/1), True = masked.")
        mask = mask.bool()
    return mask


def check_patch_labels(labels: torch.Tensor, batch: int, grid: tuple[int, int], num_classes: int, what: str,
                       head: str, shape_hint: str, range_hint: str) -> torch.Tensor:
    """The class of ALL patches (visual tokens, mean colours), [B, N] or [B, rows, cols] -> [B, N] long,
    each in [0, num_classes). `what` names the classes, `head` the model's classes ("the head has 512");
    the hints say how to build right ones."""
    rows, cols = grid
    if tuple(labels.shape) not in ((batch, rows * cols), (batch, rows, cols)):
        raise ValueError(f"labels has shape {list(labels.shape)}, expected the {what} of every patch, "
                         f"[{batch}, {rows * cols}]{shape_hint}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integer {what}, got dtype {labels.dtype}.")
    labels = labels.reshape(batch, rows * cols).long()
    if torch.compiler.is_compiling():  # reading values back is a graph break; eager runs keep the clear error
        return labels
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels hold {what} in [{low}, {high}] but {head}. {range_hint}")
    return labels


def equal_mask_counts(mask: torch.Tensor) -> int:
    """The number of masked patches of every sample of `mask` [B, N] bool; they must all be equal (MAE's
    encoder drops the masked patches, and a batch needs one sequence length)."""
    counts = mask.sum(dim=1)  # [B]
    if bool((counts != counts[0]).any()):
        raise ValueError(
            f"bool_masked_pos masks {sorted(set(counts.tolist()))} patches in different samples, but MAE drops the "
            "masked patches from the encoder's sequence, so every sample must mask the same number. Use the image "
            "processor's 'random' mask generator (a fixed mask_ratio), or pass `noise` instead."
        )
    return int(counts[0])


__all__ = ["check_bool_masked_pos", "check_patch_labels", "equal_mask_counts"]
