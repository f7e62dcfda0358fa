"""`torchrun --nproc_per_node 2` on a CPU-only machine: one run of two gloo processes, not two
independent runs writing into one folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hf_mim.launch import check_one_run_per_launch
from hf_mim.pretraining.checkpoints import STATE_FILE, TrainerState

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
    with pytest.raises(RuntimeError, match="did not join one process group.*accelerate launch --cpu"):
        check_one_run_per_launch(1)
    check_one_run_per_launch(2)
