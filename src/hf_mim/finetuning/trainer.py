"""`transformers.Trainer` for fine-tuning hf_mim classifiers.

Its changes to the stock Trainer:

- `create_optimizer`: the optimizer chosen by `--optim` (AdamW by default) over layer-wise lr decay
  groups (`layer_decay.py`); each group's `lr` is scaled, so the Trainer's own scheduler applies the
  decay whatever `--lr_scheduler_type` is;
- `compute_loss`: training batches get MixUp / CutMix / label smoothing (`mixup.py`) as soft targets;
- the training sampler is `hf_mim.data.EpochSampler`: order and augmentation are a pure function of
  (data seed, epoch, position), so they change every epoch and survive resuming;
- `train_loss` covers the whole run across resumes: every checkpoint carries the loss summed over
  all the steps before it (`run_loss.json`), which the stock Trainer forgets when it resumes;
- every checkpoint carries the fingerprint of the training data (`data_fingerprint.json`, named changes
  on resume) and the SHA-256 of its files (`checksums.json`, checked before it is resumed from).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.trainer_optimizer import is_optimizer_factory

from ..checksums import write_manifest, write_model_manifest
from ..data import EpochSampler, ImageExamples
from ..data_fingerprint import warn_if_data_changed
from ..files import apply_umask
from ..training.checkpoints import refused_pickle_error
from .layer_decay import layer_decay_parameter_groups
from .mixup import SoftTargets

RUN_LOSS_FILE = "run_loss.json"
DATA_FINGERPRINT_FILE = "data_fingerprint.json"


class FinetuningTrainer(Trainer):
    def __init__(self, *args, layer_decay: float = 1.0, soft_targets: SoftTargets | None = None,
                 data_fingerprint: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_decay = layer_decay
        self.soft_targets = soft_targets
        self.data_fingerprint = data_fingerprint or {}
        self.add_callback(ChecksumsCallback(self))  # after the callbacks given: their on_save files are listed
        # hf_mim models return a batch-mean loss and ignore `num_items_in_batch`; their forward's
        # **kwargs would make the Trainer assume otherwise and skip the gradient-accumulation scaling.
        self.model_accepts_loss_kwargs = False

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:  # Trainer(optimizer_cls_and_kwargs=...)
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            optimizer_kwargs = {"lr": self.args.learning_rate, **optimizer_kwargs}
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs = dict(optimizer_kwargs)  # popped below; never the caller's dict
        special = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if is_optimizer_factory(optimizer_cls) or special:
            raise ValueError(
                f"--optim {self.args.optim} builds its own parameter groups, which would drop the layer-wise lr "
                "decay and the weight-decay exclusions. Use a plain optimizer (adamw_torch, adamw_torch_fused, "
                "sgd, adafactor, ...)."
            )
        learning_rate = optimizer_kwargs.pop("lr")
        groups = layer_decay_parameter_groups(model, learning_rate, self.args.weight_decay, self.layer_decay)
        self.optimizer = optimizer_cls(groups, lr=learning_rate, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.soft_targets is not None and self.soft_targets.active and "labels" in inputs:
            pixel_values, labels = self.soft_targets(inputs["pixel_values"], inputs["labels"])
            inputs = {**inputs, "pixel_values": pixel_values, "labels": labels}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    # ------------------------------------------------------------------ train_loss over the whole run

    def train(self, resume_from_checkpoint=None, **kwargs):
        self.loss_before = read_run_loss(resume_from_checkpoint) if isinstance(resume_from_checkpoint, str) else None
        if isinstance(resume_from_checkpoint, str) and self.is_world_process_zero():
            warn_if_data_changed(read_json(resume_from_checkpoint, DATA_FINGERPRINT_FILE) or {}, self.data_fingerprint,
                                 resume_from_checkpoint)
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except pickle.UnpicklingError as error:  # torch's message advises weights_only=False: the unsafe way out
            if not isinstance(resume_from_checkpoint, str):
                raise
            raise refused_pickle_error(Path(resume_from_checkpoint), error) from None
        if self.loss_before is not None:
            steps_here = output.global_step - self.loss_before["steps"]
            train_loss = (self.loss_before["loss_sum"] + output.training_loss * steps_here) / max(output.global_step, 1)
            output.metrics["train_loss"] = train_loss
            output = type(output)(output.global_step, train_loss, output.metrics)
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save, then (a final save, not a checkpoint's) the folder's checksums: see hf_mim.verify."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.is_world_process_zero():
            folder = output_dir or self.args.output_dir
            apply_umask(folder)  # the weights' temporary file was 0600
            write_model_manifest(folder)

    def _save_checkpoint(self, model, trial):
        # Written first: trainer_state.json, written last by the Trainer, marks a complete checkpoint.
        # As the Trainer logs it: this process's running sum, averaged over processes (collective).
        pending = nested_gather(self._tr_loss.detach(), self.args.parallel_mode).mean().item()
        loss_sum = self._total_loss_scalar + pending
        if getattr(self, "loss_before", None) is not None:
            loss_sum += self.loss_before["loss_sum"]
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), name)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, RUN_LOSS_FILE), "w") as handle:
                json.dump({"loss_sum": loss_sum, "steps": self.state.global_step}, handle)
            with open(os.path.join(folder, DATA_FINGERPRINT_FILE), "w") as handle:
                json.dump(self.data_fingerprint, handle)
        super()._save_checkpoint(model, trial)  # checksums.json: ChecksumsCallback, once the callbacks saved too

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if isinstance(dataset, ImageExamples):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSampler(len(dataset), seed)
        return super()._get_train_sampler(train_dataset)


class ChecksumsCallback(TrainerCallback):
    """`checkpoint-<step>/checksums.json`, written on save after the Trainer's files and the on_save files of
    the callbacks before it (the model EMA's ema.safetensors), so that it lists them all; last, so that a kill
    before it leaves a complete checkpoint that is only unverified."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        self.trainer.accelerator.wait_for_everyone()  # every process's RNG file is written
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            write_manifest(folder)


def read_run_loss(checkpoint: str) -> dict | None:
    """The loss summed over the steps before `checkpoint` (None for checkpoints of other versions)."""
    return read_json(checkpoint, RUN_LOSS_FILE)


def read_json(checkpoint: str, name: str) -> dict | None:
    path = os.path.join(checkpoint, name)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


__all__ = ["ChecksumsCallback", "DATA_FINGERPRINT_FILE", "FinetuningTrainer", "RUN_LOSS_FILE"]
