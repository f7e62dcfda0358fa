"""Graceful preemption: SIGTERM, SIGINT and SIGUSR1 (what SLURM, Kubernetes and spot instances send
before they kill a job) end a training run at the next step boundary, with a checkpoint.

The first signal only sets a flag; the training loop finishes the step in flight, writes a checkpoint
(atomically, see `hf_mim.training.checkpoints`), says how to resume and exits with 128 + the
signal number, as a shell reports a process ended by that signal (non-zero: a scheduler sees a job
that did not finish and may requeue it). A second signal ends the process at once, with the
default action of that signal: the newest complete checkpoint is then the resume point.

With several processes, the signal may reach them at different steps (or only one of them): they
agree on stopping with one all-reduce (`agreed_signal`) at the steps the caller chooses, the same on
every process (the training loop of `hf_mim.training`: its logging steps, which synchronise anyway), so that all stop
at the same step.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys

import torch

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised after the checkpoint of a preempted run: exits with 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class PreemptionGuard:
    """A context manager: while it is active, the first preemption signal is recorded in `signum`."""

    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionGuard:
        for signum in self.signals:
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second signal: stop now, as if no handler were installed
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum
        # Only a write here (a signal handler may interrupt a logging call holding its lock).
        sys.stderr.write(f"\nReceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                         "(send it again to stop at once).\n")

    def agreed_signal(self, device: torch.device | str = "cpu") -> int | None:
        """The signal to stop on, the same on every process (collective when torch.distributed is on)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None


def resume_hint(output_dir: str, checkpoint: str, signum: int) -> str:
    command = shlex.join([sys.executable, *sys.argv]) if sys.argv and sys.argv[0] else "the same command"
    return (f"Stopped by {signal.Signals(signum).name} after saving {checkpoint}. To continue where it stopped, run "
            f"the same command again (it resumes from the newest checkpoint in {output_dir}):\n  {command}\n"
            f"or pass --resume_from_checkpoint {checkpoint}.")


__all__ = ["PREEMPTION_SIGNALS", "Preempted", "PreemptionGuard", "resume_hint"]
