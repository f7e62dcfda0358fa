"""Helpers the model tests share."""

from __future__ import annotations

import torch


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values N(0, 0.2^2) in every parameter (position tables, tokens, layer scales, q/v biases
    included), so that no comparison passes on the zeros and constants of an init and no weight can be
    dropped or misplaced unnoticed. Returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()
