"""Feeding the training loop: how many data-loader workers, and whether they keep up.

Workers default to every CPU core this process may use (its affinity mask, shared among the
processes of this machine) but one, which the training process itself needs (Python, the device
queue, the batched views of the fast data path). Asking for more than that is allowed but warned
about: the processes then share cores, which is slower, never a hang.

:class:`DataWaitMeter` times how long the loop waits for each batch; per logging window it logs
`data_wait` (seconds per step) and warns when waiting for data takes longer than the rest of the step.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator

logger = logging.getLogger(__name__)


def cores_per_process(num_processes: int) -> int:
    """The CPU cores this process may use: its affinity mask shared among this machine's training processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    return max(1, cores // max(1, local_processes))


def default_num_workers(num_processes: int) -> int:
    """All the cores of this process but one, which the training process needs."""
    return max(0, cores_per_process(num_processes) - 1)


def check_num_workers(workers: int, cores: int) -> None:
    """Warn (do not fail) when the workers and the training process outnumber the cores."""
    if workers and workers + 1 > cores:
        logger.warning(
            "--dataloader_num_workers %d: %d data-loading processes plus this training process share the %d CPU "
            "core(s) this process may use; they will run, slower than with fewer processes. Pass "
            "--dataloader_num_workers %d (or leave it out) to match the cores.", workers, workers, cores,
            max(0, cores - 1),
        )


def describe_workers(workers: int, cores: int, asked: bool) -> str:
    how = "asked" if asked else "default: the process's cores - 1"
    return f"{workers} data-loader worker(s) ({how}; {cores} CPU core(s) for this process)"


class DataWaitMeter:
    """Wall time the loop spends waiting for batches, per logging window."""

    def __init__(self, warn: bool = True):
        self.warn, self.warned, self.windows = warn, False, 0
        self.wait, self.window_start = 0.0, time.perf_counter()

    def timed(self, batches: Iterable) -> Iterator:
        """`batches`, timing each wait for the next one."""
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.wait += time.perf_counter() - start
            yield batch

    def flush(self, steps: int, hint: str = "") -> dict[str, float]:
        """`data_wait` (s/step) and its share of the window's wall time; warns once when the data is the
        bottleneck (from the second window on: the first includes starting the workers)."""
        elapsed = time.perf_counter() - self.window_start
        steps = max(steps, 1)
        data_wait, other = self.wait / steps, max(elapsed - self.wait, 0.0) / steps
        self.windows += 1
        if self.warn and not self.warned and self.windows > 1 and data_wait > other:
            self.warned = True
            logger.warning("The data loader is the bottleneck: the last %d steps waited %.3f s/step for data vs "
                           "%.3f s/step of model time. %s", steps, data_wait, other, hint)
        self.wait, self.window_start = 0.0, time.perf_counter()
        return {"data_wait": data_wait, "data_wait_fraction": self.wait_fraction(data_wait, other)}

    @staticmethod
    def wait_fraction(data_wait: float, other: float) -> float:
        total = data_wait + other
        return data_wait / total if total > 0 else 0.0


__all__ = ["DataWaitMeter", "check_num_workers", "cores_per_process", "default_num_workers", "describe_workers"]
