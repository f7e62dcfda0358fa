"""The interface every hf_mim visual tokenizer shares (DALL-E dVAE, VQ-KD, PeCo).

A tokenizer takes UNNORMALISED [0, 1] pixels, applies its own input mapping, and gives one token
id per cell of its grid: ``get_codebook_indices(pixel_values) -> [B, h, w]``, ``vocab_size`` and
``token_grid(image_size) -> (h, w)``. BEiT-style pre-training relies on exactly these three.
"""

from __future__ import annotations

from typing import ClassVar

import torch

# Resampling (bicubic, Lanczos) overshoots [0, 1] slightly; more than this means normalised input.
PIXEL_RANGE_SLACK = 0.1


def check_token_ids(indices: torch.Tensor, vocab_size: int) -> torch.LongTensor:
    """Token ids [B, h, w] of integer dtype within [0, vocab_size), as long."""
    if indices.ndim != 3 or indices.is_floating_point():
        raise ValueError(f"Expected integer token ids [B, h, w], got {tuple(indices.shape)} {indices.dtype}.")
    if indices.numel() and (indices.min() < 0 or indices.max() >= vocab_size):
        raise ValueError(f"Token ids must lie in [0, {vocab_size}), got [{indices.min()}, {indices.max()}].")
    return indices.long()


class VisualTokenizerMixin:
    """``vocab_size`` from the config, and the input check of ``get_codebook_indices``. A tokenizer
    defines ``token_grid`` and says in ``pixel_mapping`` what it does to its [0, 1] input (for the
    error that tells a user not to normalise it)."""

    pixel_mapping: ClassVar[str] = "maps [0, 1] to [-1, 1] itself"
    channels_field: ClassVar[str] = "num_channels"  # the config field with the input channel count

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def token_grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        raise NotImplementedError

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """[B, C, H, W] float pixels in [0, 1] whose size the token grid divides."""
        channels = getattr(self.config, self.channels_field)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(f"Expected pixel_values [B, {channels}, H, W], got {tuple(pixel_values.shape)}.")
        if not pixel_values.is_floating_point():
            raise ValueError(f"Expected float pixels in [0, 1], got dtype {pixel_values.dtype}; divide uint8 by 255.")
        self.token_grid(tuple(pixel_values.shape[-2:]))
        low, high = pixel_values.aminmax()
        if low < -PIXEL_RANGE_SLACK or high > 1 + PIXEL_RANGE_SLACK:
            raise ValueError(
                f"Expected [0, 1] RGB pixels, got values in [{low:.2f}, {high:.2f}]. Do not normalise the tokenizer "
                f"view with a mean/std: the tokenizer {self.pixel_mapping}."
            )


__all__ = ["VisualTokenizerMixin", "check_token_ids"]
