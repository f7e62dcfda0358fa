"""Graceful preemption for the Trainer (see `hf_mim.preemption`): after the optimiser step in flight,
a signalled run saves a checkpoint and stops; `run.py` then says how to resume and exits non-zero."""

from __future__ import annotations

from transformers import TrainerCallback

from ..preemption import PreemptionGuard


class PreemptionCallback(TrainerCallback):
    def __init__(self, guard: PreemptionGuard):
        self.guard = guard

    def on_step_end(self, args, state, control, **kwargs):
        # Several processes agree (a collective that waits for the device) at logging steps only, as pre-training.
        if args.world_size > 1 and state.global_step % max(1, int(args.logging_steps)):
            return control
        signum = self.guard.agreed_signal(args.device)  # every process stops at the same step
        if signum is not None:
            self.guard.signum = signum
            control.should_save = True  # even with --save_strategy no: the run resumes from it
            control.should_training_stop = True
        return control


__all__ = ["PreemptionCallback"]
