"""Launchers on machines without a GPU.

`torchrun --nproc_per_node N` on a CPU-only machine set WORLD_SIZE / RANK, but accelerate only builds
a CPU process group when told `cpu=True`: each process then trained alone, N independent runs writing
into one output folder. `cpu_process_group_needed` says when to ask for the gloo group, and
`check_one_run_per_launch` refuses to go on if the processes still do not form one run.
"""

from __future__ import annotations

import os

import torch


def launched_world_size() -> int:
    """Processes the launcher started (torchrun / accelerate: WORLD_SIZE; MPI launchers: their own names)."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def cpu_process_group_needed() -> bool:
    """Several launched processes and no GPU (or other accelerator): they must join a gloo CPU group."""
    return launched_world_size() > 1 and not has_accelerator_device()


def check_one_run_per_launch(num_processes: int) -> None:
    launched = launched_world_size()
    if launched > 1 and num_processes != launched:
        raise RuntimeError(
            f"The launcher started {launched} processes, but they did not join one process group ({num_processes} "
            "seen here): each would train alone into the same output folder. On a CPU-only machine use "
            "`accelerate launch --cpu --num_processes N ...` (gloo), or `torchrun` with ACCELERATE_USE_CPU=1; "
            "otherwise check the launcher's MASTER_ADDR / MASTER_PORT."
        )


__all__ = ["check_one_run_per_launch", "cpu_process_group_needed", "launched_world_size"]
