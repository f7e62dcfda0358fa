"""Launchers and precision on machines without a GPU.

`torchrun --nproc_per_node N` on a CPU-only machine set WORLD_SIZE / RANK, but accelerate only builds
a CPU process group when told `cpu=True`: each process then trained alone, N independent runs writing
into one output folder. `cpu_process_group_needed` says when to ask for the gloo group, and
`check_one_run_per_launch` refuses to go on if the processes still do not form one run, naming the
launches that do start N processes on a CPU (`CPU_LAUNCHES`; `accelerate launch --cpu --num_processes N`
starts ONE process, and accelerate 1.x's multi-process launcher does not pass `use_cpu` on without
ACCELERATE_USE_CPU=1). `warn_if_bf16_is_emulated` warns at the start of a run that asks for bf16 on a
CPU without bf16 instructions, where bf16 matmuls are emulated (an `mae-demo` step ~15x slower than fp32
on a 2-core AMD EPYC, benchmarks/cpu_bf16.py).
`set_tf32` switches CUDA float32 matmuls between TF32 and strict IEEE fp32 on old and new torch alike.
"""

from __future__ import annotations

import logging
import os
import platform

import torch

logger = logging.getLogger(__name__)

# Launches that start N gloo processes on a CPU-only machine (each checked by tests/test_launch.py).
CPU_LAUNCHES = (
    "ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/accelerate_configs/cpu_2proc.yaml ...",
    "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...",
    "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N ...",
)
# /proc/cpuinfo flags of CPUs that compute bf16 in hardware: x86 (AVX512-BF16, AMX) and Arm (FEAT_BF16).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


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
        launches = "; ".join(f"`{launch}`" for launch in CPU_LAUNCHES)
        raise RuntimeError(
            f"The launcher started {launched} processes, but they did not join one process group ({num_processes} "
            "seen here): each would train alone into the same output folder. On a CPU-only machine launch with "
            f"one of {launches} (gloo; `accelerate launch --cpu --num_processes N` starts only one process); "
            "otherwise check the launcher's MASTER_ADDR / MASTER_PORT."
        )


# ---------------------------------------------------------------------------------------------
# bf16 on a CPU
# ---------------------------------------------------------------------------------------------


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's feature flags (x86 `flags`, Arm `Features`) from /proc/cpuinfo, or None where unreadable."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as handle:
                cpuinfo = handle.read()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool | None:
    """Whether this CPU has bf16 instructions (None: unknown, e.g. no /proc/cpuinfo). Apple silicon
    (macOS arm64) has them from M2 on; it is counted as unknown."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return None
    return bool(flags & NATIVE_BF16_FLAGS)


def warn_if_bf16_is_emulated(mixed_precision: str | None, device: torch.device | str,
                             flags: set[str] | None = None) -> bool:
    """At the start of a run: warn when bf16 is asked for on a CPU without bf16 instructions (five of the
    six shipped accelerate configs set `mixed_precision: bf16`). Once per machine: every process calls it,
    the local main one (LOCAL_RANK 0, or no launcher) warns. Returns whether it warned."""
    if mixed_precision != "bf16" or torch.device(device).type != "cpu" or os.environ.get("LOCAL_RANK", "0") != "0":
        return False
    if cpu_has_native_bf16(flags) is not False:
        return False
    logger.warning(
        "bf16 mixed precision on a CPU without bf16 instructions (%s, torch CPU capability %s; no avx512_bf16 / "
        "amx_bf16): bf16 matmuls are emulated, a training step many times slower than in fp32 (~15x measured). Drop --bf16 / "
        "--mixed_precision bf16 (or use a config with `mixed_precision: 'no'`, e.g. "
        "examples/accelerate_configs/cpu_2proc.yaml).", platform.processor() or platform.machine(),
        torch.backends.cpu.get_cpu_capability())
    return True


def set_tf32(enabled: bool) -> None:
    """TF32 (True) or strict IEEE fp32 (False) for CUDA float32 matmuls and cuDNN convolutions, through
    torch's `fp32_precision` settings where they exist (torch >= 2.9, which deprecates the old flags), else
    the older `allow_tf32` flags."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        precision = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


__all__ = ["CPU_LAUNCHES", "check_one_run_per_launch", "cpu_flags", "cpu_has_native_bf16", "cpu_process_group_needed",
           "launched_world_size", "set_tf32", "warn_if_bf16_is_emulated"]
