"""Model EMA for fine-tuning (timm's `--model_ema` / `--model_ema_decay`), as a `TrainerCallback`.

The average is PyTorch's own: `torch.optim.swa_utils.AveragedModel` with `get_ema_multi_avg_fn`,
a copy of the model on the model's device, outside the optimizer. It is updated after every
optimizer step (`on_step_end`, so once per gradient-accumulation cycle), saved as `ema.safetensors`
in every `checkpoint-<step>` folder and restored from it on resume; at the end of training its
weights are copied into the model, so that the Trainer's final `evaluate()` and `save_model()`
measure and save the EMA weights. Evaluations during training are of the raw weights.

As in `AveragedModel`, the first update copies the weights (ema_1 = w_1); every later one is
ema = decay * ema + (1 - decay) * w.

Works with DDP (every rank keeps the same average of the same replicated weights); not with FSDP or
DeepSpeed, whose callbacks' model is sharded.
"""

from __future__ import annotations

import logging
import os

import torch
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

EMA_WEIGHTS_NAME = "ema.safetensors"
DEFAULT_DECAY = 0.9999  # timm's --model_ema_decay


def check_decay(decay: float) -> None:
    if not 0.0 < decay < 1.0:
        raise ValueError(f"--model_ema_decay {decay} must be strictly between 0 and 1: the EMA keeps that fraction "
                         f"of itself each optimizer step (timm's default {DEFAULT_DECAY}; about 1 - 10 / steps for "
                         "short runs).")


def check_ema_compatible(training_args) -> None:
    """Fail before training for the settings whose result the EMA would silently contradict."""
    if training_args.load_best_model_at_end:
        raise ValueError("--model_ema with --load_best_model_at_end: the best checkpoint is chosen on the raw "
                         "weights, then replaced by the EMA ones at the end. Drop one of the two.")
    # `accelerate launch` with an FSDP / DeepSpeed config tells the Trainer through the environment only.
    sharded = any(os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() in ("1", "true")
                  for name in ("FSDP", "DEEPSPEED"))
    if training_args.fsdp or training_args.deepspeed or sharded:
        raise ValueError("--model_ema needs the full weights on every process: use DDP (accelerate launch "
                         "--multi_gpu / torchrun), not FSDP or DeepSpeed.")


def ema_multi_avg_fn(decay: float):
    """`get_ema_multi_avg_fn(decay)` for floating-point tensors; other tensors are copied.

    With `use_buffers=True`, PyTorch's function also "averages" integer buffers in float and
    truncates: BEiT's `relative_position_index` would lose 1 on some entries after a few steps."""
    ema = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        # AveragedModel groups the tensors by device and dtype, so one check covers the group.
        if averaged[0].is_floating_point() or averaged[0].is_complex():
            ema(averaged, current, num_averaged)
        else:
            torch._foreach_copy_(averaged, current)

    return update


def build_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    # use_buffers: buffers (BatchNorm statistics, if a model has any) follow the average too.
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema


class ModelEmaCallback(TrainerCallback):
    """Keep an EMA of the Trainer's model; hand its weights to the model when training ends.

    `resume_from_checkpoint`: the checkpoint folder `Trainer.train` resumes from (callbacks are not
    told it), whose `ema.safetensors` is loaded; a checkpoint without one restarts the average.
    """

    def __init__(self, decay: float = DEFAULT_DECAY, resume_from_checkpoint: str | None = None):
        check_decay(decay)
        self.decay = decay
        self.resume_from_checkpoint = resume_from_checkpoint
        self.ema: AveragedModel | None = None

    # `model` is the callback handler's model: the one given to the Trainer, not its DDP wrapper.
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Built here, not in __init__: the Trainer has moved the model to its device and loaded
        # the resumed weights by now.
        self.ema = build_ema(model, self.decay)
        if self.resume_from_checkpoint:
            self.load(self.resume_from_checkpoint)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.update_parameters(model)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:  # the main process (of each node with --save_on_each_node)
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            save_file({key: value.contiguous() for key, value in self.ema.state_dict().items()},
                      os.path.join(folder, EMA_WEIGHTS_NAME))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.load_state_dict(self.ema.module.state_dict())
        logger.info("Model EMA (decay %s, %d updates): the model now holds the EMA weights; the final evaluation "
                    "and the saved model are the EMA's (evaluations during training were of the raw weights).",
                    self.decay, int(self.ema.n_averaged))

    def load(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, EMA_WEIGHTS_NAME)
        if not os.path.isfile(path):
            logger.warning("%s has no %s: the model EMA restarts from the resumed weights.", checkpoint,
                           EMA_WEIGHTS_NAME)
            return
        self.ema.load_state_dict(load_file(path))  # copied onto the EMA's own device
        logger.info("Model EMA restored from %s (%d updates).", path, int(self.ema.n_averaged))


__all__ = ["EMA_WEIGHTS_NAME", "ModelEmaCallback", "build_ema", "check_decay", "check_ema_compatible"]
