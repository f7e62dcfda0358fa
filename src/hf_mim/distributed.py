"""Sharded training engaged, or refused.

`accelerate launch` with an FSDP or DeepSpeed config sets ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED
for the processes, but the Accelerator then drops the plugin without a word where it cannot use it
(accelerate 1.x, `AcceleratorState.__init__`):

* FSDP is engaged only when the process group is a GPU-type one (MULTI_GPU, MULTI_XPU, MULTI_NPU, ...).
  On a CPU the processes form a MULTI_CPU (gloo) group and train plain DDP: unsharded, with DDP-layout
  checkpoints. One process started without the launcher (`python pretrain.py`) gets no group at all.
* DeepSpeed is skipped whenever the Accelerator runs on the CPU (`... and not cpu`).

A run that asked for sharding and silently got none runs out of memory later, or writes checkpoints of
another layout than expected. `check_sharding_engaged` stops it at the start instead, with the reason.
"""

from __future__ import annotations

import os

from accelerate.utils import DistributedType

REQUEST_VARIABLES = {DistributedType.FSDP: "ACCELERATE_USE_FSDP", DistributedType.DEEPSPEED: "ACCELERATE_USE_DEEPSPEED"}
NAMES = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}


def requested_engines() -> list[DistributedType]:
    """The sharding engines the launcher (the accelerate config) asked for."""
    return [engine for engine, variable in REQUEST_VARIABLES.items()
            if os.environ.get(variable, "false").lower() in ("1", "true", "yes")]


def why_dropped(accelerator) -> str:
    if accelerator.device.type == "cpu":
        return ("this run is on the CPU, where accelerate never shards: it drops the plugin (several processes "
                "then train plain DDP over gloo, each keeping the whole model, checkpoints in DDP layout). Sharding "
                "needs GPUs (or another accelerator); for several CPU processes use "
                "examples/accelerate_configs/cpu_2proc.yaml (plain DDP, said as such)")
    if accelerator.distributed_type == DistributedType.NO:  # one process, no group
        return ("the script was started without a process group (plain `python`?): start it with "
                "`accelerate launch --config_file <the config> ...`")
    return f"accelerate chose {accelerator.distributed_type.value} for this machine"


def check_sharding_engaged(accelerator) -> None:
    """Raise when a requested FSDP or DeepSpeed plugin was dropped (call right after `Accelerator(...)`)."""
    for engine in requested_engines():
        if accelerator.distributed_type != engine:
            raise RuntimeError(
                f"The accelerate config asks for {NAMES[engine]} ({REQUEST_VARIABLES[engine]}=true), but accelerate "
                f"would train without it: {why_dropped(accelerator)}. Refusing to train unsharded."
            )


__all__ = ["check_sharding_engaged", "requested_engines"]
