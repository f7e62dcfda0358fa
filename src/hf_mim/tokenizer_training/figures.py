"""Figures of a trained visual tokenizer (matplotlib, Agg backend): how its codebook is used, what its
token maps look like, and (for tokenizers with a pixel decoder) what it reconstructs from its tokens."""

from __future__ import annotations

import torch

from ..models.quantizer import usage_and_perplexity
from ..pretraining.visualize import token_palette

CODEBOOK_FIGURE = "codebook_usage.png"
TOKEN_MAP_FIGURE = "token_maps.png"
RECONSTRUCTION_FIGURE = "reconstructions.png"
# Token ids are written into the cells of maps up to this many tokens (larger grids get colours only).
MAX_ANNOTATED_TOKENS = 64


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def show_image(axis, image: torch.Tensor) -> None:
    """image [C, H, W] in [0, 1] (grey when C == 1)."""
    image = image.detach().float().cpu().clamp(0, 1)
    if image.shape[0] == 1:
        axis.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        axis.imshow(image.permute(1, 2, 0).numpy())
    axis.set_xticks([])
    axis.set_yticks([])


def save_codebook_usage(path: str, counts: torch.Tensor, what: str) -> dict[str, float]:
    """Bar chart of the code counts [K] sorted from most to least used (log scale); returns the numbers
    it shows: usage (fraction of codes used at least once), perplexity and unused codes."""
    counts = counts.detach().double().cpu()
    usage, perplexity = usage_and_perplexity(counts)
    used = int((counts > 0).sum())
    stats = {"codebook_usage": float(usage), "perplexity": float(perplexity), "unused_codes": len(counts) - used}
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 3.2))
    ordered = counts.sort(descending=True).values.numpy()
    axis.bar(range(len(ordered)), ordered, width=1.0, color="tab:blue")
    if used:
        axis.set_yscale("log")
    axis.set_xlabel("code rank (most used first)")
    axis.set_ylabel("tokens")
    percent = 100 * stats["codebook_usage"]
    axis.set_title(f"Codebook usage on {what}: {used} of {len(counts)} codes used ({percent:.1f}%), "
                   f"perplexity {stats['perplexity']:.1f}, {stats['unused_codes']} unused", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return stats


def save_token_maps(path: str, images: torch.Tensor, indices: torch.Tensor, num_codes: int,
                    reconstructions: torch.Tensor | None = None, title: str = "") -> None:
    """One row per image: the image [C, H, W], its token map [h, w] (one colour per code, ids written in
    small grids) and, when given, the image decoded from those tokens."""
    plt = pyplot()
    count = len(images)
    columns = 2 if reconstructions is None else 3
    figure, axes = plt.subplots(count, columns, figsize=(2.2 * columns, 2.2 * count + 0.6), squeeze=False)
    colours = token_palette(num_codes)  # [K, 3]: the colours of the pre-training figures' token maps
    for row in range(count):
        show_image(axes[row][0], images[row])
        ids = indices[row].cpu()  # [h, w]
        axes[row][1].imshow(colours[ids].numpy(), interpolation="nearest")
        axes[row][1].set_xticks([])
        axes[row][1].set_yticks([])
        if ids.numel() <= MAX_ANNOTATED_TOKENS:
            for position, value in enumerate(ids.flatten().tolist()):  # row-major, like the grid
                y, x = divmod(position, ids.shape[1])
                axes[row][1].text(x, y, str(value), ha="center", va="center", fontsize=5)
        if reconstructions is not None:
            show_image(axes[row][2], reconstructions[row])
        if row == 0:
            names = ("image", f"tokens ({ids.shape[0]}x{ids.shape[1]})", "decoded from tokens")[:columns]
            for column, name in enumerate(names):
                axes[row][column].set_title(name, fontsize=9)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.96))  # room for the title
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_reconstructions(path: str, images: torch.Tensor, reconstructions: torch.Tensor, title: str) -> None:
    """Two rows: the images [B, C, H, W] and what the tokenizer decodes from their tokens."""
    plt = pyplot()
    count = len(images)
    figure, axes = plt.subplots(2, count, figsize=(1.6 * count, 3.6), squeeze=False)
    for column in range(count):
        show_image(axes[0][column], images[column])
        show_image(axes[1][column], reconstructions[column])
    axes[0][0].set_ylabel("original", fontsize=9)
    axes[1][0].set_ylabel("from tokens", fontsize=9)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.96))  # room for the title
    figure.savefig(path, dpi=100)
    plt.close(figure)


__all__ = ["CODEBOOK_FIGURE", "RECONSTRUCTION_FIGURE", "TOKEN_MAP_FIGURE", "save_codebook_usage",
           "save_reconstructions", "save_token_maps"]
