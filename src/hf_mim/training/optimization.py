"""Optimiser, learning rate and schedule of a training run (pre-training or a tokenizer)."""

from __future__ import annotations

import logging

import torch
from transformers import get_scheduler

logger = logging.getLogger(__name__)


def effective_batch_size(per_device_batch_size: int, num_processes: int, gradient_accumulation_steps: int) -> int:
    return per_device_batch_size * num_processes * gradient_accumulation_steps


def resolve_learning_rate(learning_rate: float | None, base_learning_rate: float, batch_size: int) -> float:
    """An explicit learning rate wins; otherwise the linear scaling rule lr = blr * batch / 256."""
    if learning_rate is not None:
        return learning_rate
    return base_learning_rate * batch_size / 256


def resolve_warmup_steps(warmup: int | float, total_steps: int) -> int:
    """An int is a number of optimiser steps; a float in [0, 1) a fraction of `total_steps`."""
    if isinstance(warmup, float) and not warmup.is_integer():
        if not 0 <= warmup < 1:
            raise ValueError(f"A fractional --warmup_steps must be in [0, 1) (a ratio of the run), got {warmup}.")
        return round(warmup * total_steps)
    if warmup < 0:
        raise ValueError(f"--warmup_steps must not be negative, got {warmup}.")
    return int(warmup)


def is_decayed(name: str, parameter: torch.nn.Parameter, no_decay_names: tuple[str, ...]) -> bool:
    """No weight decay on 1-D parameters (norms, biases, layer scales), biases, and token/position tables."""
    last = name.rsplit(".", 1)[-1]
    return parameter.ndim > 1 and not name.endswith(".bias") and last not in no_decay_names


def parameter_groups(model: torch.nn.Module, weight_decay: float, no_decay_names: tuple[str, ...]) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if is_decayed(name, parameter, no_decay_names) else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, learning_rate: float, weight_decay: float, betas: tuple[float, float],
                    no_decay_names: tuple[str, ...], eps: float = 1e-8, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over two groups (decayed / not); `fused` for CUDA parameters."""
    groups = parameter_groups(model, weight_decay, no_decay_names)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused or None)


def build_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int, scheduler_kwargs: dict | None):
    """`transformers.get_scheduler`, stepped once per optimiser step (per-step warmup + cosine by default)."""
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         scheduler_specific_kwargs=scheduler_kwargs or {})


__all__ = [
    "build_optimizer", "build_scheduler", "effective_batch_size", "is_decayed", "parameter_groups",
    "resolve_learning_rate", "resolve_warmup_steps",
]
