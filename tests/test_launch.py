"""`torchrun --nproc_per_node 2` on a CPU-only machine: one run of two gloo processes, not two
independent runs writing into one folder; the CPU launches the error names each start two processes;
bf16 asked for on a CPU without bf16 instructions is warned about."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hf_mim.launch import CPU_LAUNCHES, check_one_run_per_launch, cpu_flags, warn_if_bf16_is_emulated
from hf_mim.training.checkpoints import STATE_FILE, TrainerState

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_on_cpu_forms_one_run(tmp_path):
    output_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(ROOT / "examples" / "pretrain.py"), "--output_dir", str(output_dir),
               "--max_steps", "2", "--checkpointing_steps", "2", "--max_train_samples", "64",
               "--per_device_train_batch_size", "8", "--no-do_eval", "--report_to", "none",
               "--dataloader_num_workers", "0"]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert "8 per device x 2 processes" in finished.stderr
    assert json.loads((output_dir / "all_results.json").read_text())["total_batch_size"] == 16
    assert TrainerState.from_file(output_dir / "checkpoint-2" / STATE_FILE).num_processes == 2


def test_processes_outside_one_group_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="did not join one process group") as refused:
        check_one_run_per_launch(1)
    assert all(launch in str(refused.value) for launch in CPU_LAUNCHES)
    check_one_run_per_launch(2)


RANKS = """import os
from accelerate import Accelerator
accelerator = Accelerator()
print(f"rank {accelerator.process_index} of {accelerator.num_processes}", flush=True)
"""


def test_the_named_multi_gpu_cpu_launch_starts_two_processes_in_one_group(tmp_path):
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`, as the refusal names it: two
    processes that see each other (the old hint, `--cpu --num_processes 2`, starts one). The refusal's other
    launches run in test_pretrain.py (cpu_2proc.yaml) and above (torchrun)."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    launch = next(launch for launch in CPU_LAUNCHES if "--multi_gpu" in launch)
    variable, _, command = launch.partition(" ")
    arguments = command.replace("accelerate launch", "").replace(" N ", " 2 ").replace("...", str(script)).split()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **dict([variable.split("=")])}
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert sorted(line for line in finished.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0 of 2", "rank 1 of 2"]


INTEL_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(caplog, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with caplog.at_level(logging.WARNING, logger="hf_mim.launch"):
        assert warn_if_bf16_is_emulated("bf16", "cpu", cpu_flags(INTEL_AVX2))
    assert "without bf16 instructions" in caplog.text and "~15x measured" in caplog.text
    monkeypatch.setenv("LOCAL_RANK", "1")  # the machine's other processes: its main process has said it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_mim.launch"):
        assert not warn_if_bf16_is_emulated("bf16", "cpu", cpu_flags(INTEL_AVX2))
    assert not caplog.text
    monkeypatch.setenv("LOCAL_RANK", "0")
    for flags in (SAPPHIRE_RAPIDS, GRAVITON3):  # native bf16: no warning
        assert not warn_if_bf16_is_emulated("bf16", "cpu", cpu_flags(flags))
    assert not warn_if_bf16_is_emulated("no", "cpu", cpu_flags(INTEL_AVX2))
    assert not warn_if_bf16_is_emulated("bf16", "cuda", cpu_flags(INTEL_AVX2))
    assert not warn_if_bf16_is_emulated("bf16", "cpu", cpu_flags(""))  # unknown CPU: no claim either way
