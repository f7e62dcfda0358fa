"""Layer-wise learning-rate decay (BEiT, MAE fine-tuning) as real optimizer parameter groups.

A parameter at layer `i` of a model with `L` blocks trains at ``lr * decay^(L + 1 - i)``:

- layer 0: what comes before the blocks: the patch embedding, the CLS and mask tokens, a learned
  absolute position table;
- layer ``n + 1``: everything under ``blocks.n.`` (a per-block relative position table included);
- layer ``L + 1``: everything after the blocks (final norm, ``fc_norm``, the head), and BEiT's
  relative position table shared by all blocks: the official BEiT fine-tuning code puts it there
  (it feeds the last block too), so it trains at the full rate.

The scale goes into each group's ``lr`` itself. Every torch / transformers scheduler (a LambdaLR)
multiplies each group's initial ``lr``, so the decay survives whatever schedule runs; ``lr_scale``
and ``layer_id`` are kept in the group only as information.

Layers are found from parameter names alone (``blocks.N.``, ``patch_embed``, the token and table
names of ``vit_core``), so every hf_mim encoder and any new family built from ``vit_core`` works
without change. No weight decay on 1-D parameters (norms, biases, q/v biases, layer scales) nor on
the tokens and the absolute position table (the reference's ``no_weight_decay()``: ``cls_token``,
``pos_embed``). The relative position tables ARE decayed: the reference fine-tuning code exempts
them only with ``--disable_weight_decay_on_rel_pos_bias``, off by default.
"""

from __future__ import annotations

import re
import torch
from torch import nn

from ..training.optimization import is_decayed

BLOCK_PATTERN = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
# Parameters (last name part) that come before the blocks.
EMBEDDING_NAMES = ("cls_token", "mask_token", "pos_embed")
EMBEDDING_MODULES = ("patch_embed",)
# Not weight-decayed although not 1-D (matched on the last name part).
NO_WEIGHT_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed")


def block_index(name: str) -> int | None:
    match = BLOCK_PATTERN.search(name)
    return None if match is None else int(match.group(1))


def num_blocks(model: nn.Module) -> int:
    """L: the number of transformer blocks, from `config.num_hidden_layers`, checked against the names."""
    indices = {block_index(name) for name, _ in model.named_parameters()} - {None}
    if not indices:
        raise ValueError(
            f"{type(model).__name__} has no parameters under `blocks.N.`: layer-wise lr decay does not know its "
            "layers. Use --layer_decay 1.0 for this model."
        )
    found = max(indices) + 1
    configured = getattr(getattr(model, "config", None), "num_hidden_layers", found)
    if configured != found:
        raise ValueError(
            f"{type(model).__name__} has blocks 0..{found - 1} but config.num_hidden_layers={configured}; cannot "
            "assign layers for lr decay. Check the model (blocks outside the encoder are not supported)."
        )
    return found


def layer_id(name: str, num_layers: int) -> int:
    """0 (embeddings), n + 1 (block n) or num_layers + 1 (after the blocks): see the module docstring."""
    index = block_index(name)
    if index is not None:
        return index + 1
    parts = name.split(".")
    if parts[-1] in EMBEDDING_NAMES or any(part in EMBEDDING_MODULES for part in parts):
        return 0
    return num_layers + 1


def lr_scale(layer: int, num_layers: int, decay: float) -> float:
    return decay ** (num_layers + 1 - layer)


def no_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    return not is_decayed(name, parameter, NO_WEIGHT_DECAY_NAMES)


def layer_decay_parameter_groups(
    model: nn.Module, learning_rate: float, weight_decay: float, layer_decay: float = 1.0
) -> list[dict]:
    """One group per (layer, decayed or not) with ``lr = learning_rate * layer_decay^(L + 1 - layer)``,
    the top layer first (the Trainer logs the first group's lr, which is then the base schedule).
    Frozen parameters (``requires_grad=False``) are left out."""
    if not 0 < layer_decay <= 1:
        raise ValueError(f"--layer_decay must be in (0, 1] (1 = no decay; BEiT/MAE use 0.65-0.75), got {layer_decay}.")
    num_layers = num_blocks(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer, decayed = layer_id(name, num_layers), not no_weight_decay(name, parameter)
        if (layer, decayed) not in groups:
            scale = lr_scale(layer, num_layers, layer_decay)
            groups[(layer, decayed)] = {
                "params": [], "lr": learning_rate * scale, "lr_scale": scale,
                "layer_id": layer, "weight_decay": weight_decay if decayed else 0.0,
            }
        groups[(layer, decayed)]["params"].append(parameter)
    return [groups[key] for key in sorted(groups, key=lambda key: (-key[0], not key[1]))]


__all__ = [
    "NO_WEIGHT_DECAY_NAMES", "layer_decay_parameter_groups", "layer_id", "lr_scale", "no_weight_decay", "num_blocks",
]
