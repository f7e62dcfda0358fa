"""Helpers of the MAE tests (not a test file): tiny configs and an independent sin-cos formula."""

from __future__ import annotations

import numpy as np
import torch

from hf_mim import MaeConfig


def tiny_mae_config(**overrides) -> MaeConfig:
    """Encoder 32 wide x 2 blocks (4 heads), decoder 16 x 1 (2 heads), 32x32 images of 8x8 patches."""
    fields = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32, image_size=32, patch_size=8,
    )
    fields.update(overrides)
    return MaeConfig(**fields)


@torch.no_grad()
def perturb_parameters_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so LayerNorm scales, biases and tokens are not at their init
    values (a key mapped to the wrong place then changes the outputs)."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def reference_sincos_table(rows: int, cols: int, dim: int, cls_row: bool = True) -> np.ndarray:
    """The MAE table written from the paper's description, in float64: channel block
    [sin(col*w) | cos(col*w) | sin(row*w) | cos(row*w)] with w_i = 10000^(-i/(dim/4)), patches row-major."""
    quarter = dim // 4
    omega = 10000.0 ** (-np.arange(quarter, dtype=np.float64) / quarter)
    table = np.zeros((rows * cols, dim), dtype=np.float64)
    for row in range(rows):
        for col in range(cols):
            index = row * cols + col
            table[index, 0 * quarter:1 * quarter] = np.sin(col * omega)
            table[index, 1 * quarter:2 * quarter] = np.cos(col * omega)
            table[index, 2 * quarter:3 * quarter] = np.sin(row * omega)
            table[index, 3 * quarter:4 * quarter] = np.cos(row * omega)
    if cls_row:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return table
