"""Figures of what a pre-trained model does with held-out images (matplotlib, Agg backend)."""

from __future__ import annotations

import torch

from ..models.losses import normalize_patches
from ..models.vit_core import grid_size_for, patchify, unpatchify

NORM_PIX_NOTE = ("norm_pix_loss: the model predicts per-patch normalised pixels; shown un-normalised with the TRUE "
                 "mean/std of each original patch (this leaks per-patch brightness and contrast)")


def to_display(pixel_values: torch.Tensor, mean, std) -> torch.Tensor:
    """[B, C, H, W] normalised -> [B, H, W, C] in [0, 1] (grey images stay [B, H, W, 1])."""
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixel_values.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def unnormalize_with_true_stats(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Invert `normalize_patches` using the mean and unbiased variance of the TARGET patches."""
    mean = target.mean(dim=-1, keepdim=True)  # [B, L, 1]
    var = target.var(dim=-1, keepdim=True, unbiased=True)  # [B, L, 1]
    return pred * (var + eps) ** 0.5 + mean


def mae_panels(pixel_values, pred, mask, config) -> dict[str, torch.Tensor]:
    """Normalised-pixel images [B, C, H, W]: original, masked (removed patches at the mean colour,
    i.e. 0), reconstruction, and reconstruction with the visible patches pasted back."""
    patch_size = config.patch_size
    grid = grid_size_for(pixel_values.shape[-2:], patch_size)
    target = patchify(pixel_values.float(), patch_size)  # [B, L, p*p*C]
    pred = pred.float()
    if config.norm_pix_loss:
        pred = unnormalize_with_true_stats(pred, target)
    removed = mask.float().unsqueeze(-1)  # [B, L, 1]
    channels = pixel_values.shape[1]
    return {
        "original": pixel_values.float(),
        "masked": unpatchify(target * (1 - removed), patch_size, grid, channels),
        "reconstruction": unpatchify(pred, patch_size, grid, channels),
        "reconstruction + visible": unpatchify(target * (1 - removed) + pred * removed, patch_size, grid, channels),
    }


def save_mae_reconstructions(path, pixel_values, pred, mask, config, mean, std, max_images: int = 8) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(max_images, len(pixel_values))
    panels = mae_panels(pixel_values[:count].cpu(), pred[:count].cpu(), mask[:count].cpu(), config)
    figure, axes = plt.subplots(count, len(panels), figsize=(2.0 * len(panels), 2.0 * count + 0.8), squeeze=False)
    for column, (title, images) in enumerate(panels.items()):
        shown = to_display(images, mean, std)
        for row in range(count):
            axis = axes[row][column]
            image = shown[row]
            axis.imshow(image[..., 0] if image.shape[-1] == 1 else image.numpy(), cmap="gray" if image.shape[-1] == 1 else None)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(title, fontsize=9)
    ratio = float(mask[:count].float().mean())
    title = f"MAE on held-out images, {ratio:.0%} of patches removed (fixed evaluation masks)"
    if config.norm_pix_loss:
        title += "\n" + NORM_PIX_NOTE
    figure.suptitle(title, fontsize=8 if config.norm_pix_loss else 10, wrap=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def normalized_target(pixel_values: torch.Tensor, patch_size) -> torch.Tensor:
    """What a norm_pix_loss model regresses, for tests and notebooks."""
    return normalize_patches(patchify(pixel_values, patch_size))


__all__ = ["mae_panels", "save_mae_reconstructions", "unnormalize_with_true_stats"]
