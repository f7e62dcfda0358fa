"""Figures of what a pre-trained model does with held-out images (matplotlib, Agg backend)."""

from __future__ import annotations

import torch

from ..models.vit_core import grid_size_for, patchify, unpatchify

# The loss covers the removed patches only: what the model outputs at visible ones was never trained.
VISIBLE_PATCHES_NOTE = "the loss covers removed patches only: the reconstruction of visible patches is untrained"
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
    title = (f"MAE on held-out images, {ratio:.0%} of patches removed (fixed evaluation masks)\n"
             + VISIBLE_PATCHES_NOTE)
    if config.norm_pix_loss:
        title += "\n" + NORM_PIX_NOTE
    figure.suptitle(title, fontsize=8, wrap=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def token_palette(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """[V, 3] a fixed random colour per visual token (ids carry no order, so neither do the colours)."""
    return torch.rand(vocab_size, 3, generator=torch.Generator().manual_seed(seed))


def color_class_palette(num_channels: int, bits: int = 3) -> torch.Tensor:
    """[(2**bits)**C, 3] the colour each ViT-MPP class stands for (the centre of its level per channel,
    first channel most significant, as `losses.mean_color_targets`)."""
    levels = 2**bits
    classes = torch.arange(levels**num_channels)  # [K]
    digits = torch.stack([(classes // levels**(num_channels - 1 - c)) % levels for c in range(num_channels)], -1)
    colors = (digits.float() + 0.5) / levels  # [K, C]
    return colors.expand(-1, 3) if num_channels == 1 else colors[:, :3]


def token_panels(images, mask, targets, predictions, grid, palette, patch_size) -> dict[str, torch.Tensor]:
    """[B, H, W, 3] display images: the input, the input with its masked patches grey, the target map, the
    predictions on masked patches (pale blue: visible), and which of those are right (green) or wrong (red)."""
    rows, cols = grid

    def to_map(values: torch.Tensor) -> torch.Tensor:  # [B, N, 3] -> [B, rows, cols, 3]
        return values.reshape(len(values), rows, cols, 3)

    def upsample(maps: torch.Tensor) -> torch.Tensor:  # [B, rows, cols, 3] -> [B, H, W, 3]
        return maps.repeat_interleave(patch_size[0], 1).repeat_interleave(patch_size[1], 2)

    shown = mask.unsqueeze(-1)  # [B, N, 1]
    # Pale blue, not white, for visible patches: white is a class colour of ViT-MPP (and of the digits' paper).
    visible, green, red = torch.tensor([0.75, 0.85, 1.0]), torch.tensor([0.2, 0.7, 0.2]), torch.tensor([0.9, 0.2, 0.2])
    right = torch.where((predictions == targets).unsqueeze(-1), green, red)  # [B, N, 3]
    rgb = images.expand(-1, -1, -1, 3) if images.shape[-1] == 1 else images  # [B, H, W, 3]
    return {
        "input": rgb,
        "masked": torch.where(upsample(to_map(shown.expand(-1, -1, 3))), torch.tensor(0.5), rgb),
        "targets": to_map(palette[targets]),
        "predicted (masked)": to_map(torch.where(shown, palette[predictions.clamp_min(0)], visible)),
        "right / wrong": to_map(torch.where(shown, right, visible)),
    }


def save_token_predictions(path, images, mask, targets, predictions, grid, palette, title, max_images: int = 8) -> bool:
    """Figure of a token-predicting model on held-out images. images [B, H, W, C] in [0, 1]; mask,
    targets and predictions [B, N] (predictions -1 where visible); palette [V, 3]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(max_images, len(images))
    images, mask, targets, predictions = (t[:count].cpu() for t in (images, mask, targets, predictions))
    patch_size = (images.shape[1] // grid[0], images.shape[2] // grid[1])
    panels = token_panels(images.float(), mask.bool(), targets, predictions, grid, palette.cpu(), patch_size)
    figure, axes = plt.subplots(count, len(panels), figsize=(2.0 * len(panels), 2.0 * count + 0.8), squeeze=False)
    for column, (name, shown) in enumerate(panels.items()):
        for row in range(count):
            axis = axes[row][column]
            axis.imshow(shown[row].numpy(), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=9)
    masked = mask.bool()
    accuracy = float((predictions[masked] == targets[masked]).float().mean()) if masked.any() else 0.0
    figure.suptitle(f"{title}\nmasked-patch accuracy {accuracy:.1%} over {int(masked.sum())} masked patches",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


__all__ = [
    "color_class_palette", "mae_panels", "save_mae_reconstructions", "save_token_predictions", "token_palette",
    "token_panels", "unnormalize_with_true_stats",
]
