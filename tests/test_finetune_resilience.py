"""`examples/finetune.py` (the transformers Trainer) on long, interruptible runs: `--save_steps` is
honoured, a checkpoint cut off by a kill is skipped, resuming runs no code from the folder, train_loss
covers the whole run across resumes, a signal saves and exits non-zero, and step sizes of 0 are refused.

Real Trainer runs on the embedded digits (a tiny from-scratch encoder)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_mim.finetuning import run
from hf_mim.finetuning.trainer import DATA_FINGERPRINT_FILE, RUN_LOSS_FILE
from hf_mim.training.checkpoints import UntrustedCheckpointError
from hf_mim.verify import main as verify

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--max_steps", "8", "--save_steps", "4", "--logging_steps", "1", "--max_train_samples", "64",
        "--max_eval_samples", "16", "--per_device_train_batch_size", "16", "--eval_strategy", "no",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--report_to", "none", "--save_total_limit", "5"]


class MaliciousPickle:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def train_loss(output_dir: Path) -> float:
    return json.loads((output_dir / "all_results.json").read_text())["train_loss"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("finetune") / "run"
    run.main(["--output_dir", str(output_dir), *ARGS])
    return output_dir


def test_save_steps_alone_saves_every_n_steps(uninterrupted):
    assert sorted(path.name for path in uninterrupted.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert json.loads((uninterrupted / "checkpoint-4" / RUN_LOSS_FILE).read_text())["steps"] == 4


def test_checkpoints_carry_checksums_and_the_data_fingerprint(uninterrupted):
    folder = uninterrupted / "checkpoint-4"
    assert verify([str(uninterrupted)]) == 0
    listed = json.loads((folder / "checksums.json").read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", RUN_LOSS_FILE} <= set(listed)
    assert json.loads((folder / DATA_FINGERPRINT_FILE).read_text()) == {"source": "sklearn-digits", "rows": 64}


def test_checksums_cover_the_model_ema_written_on_save(tmp_path):
    """--model_ema writes ema.safetensors in the callbacks' on_save, after the Trainer's own files:
    checksums.json is written after it, and lists it."""
    output_dir = tmp_path / "ema"
    args = [arg if arg != "8" else "4" for arg in ARGS]
    run.main(["--output_dir", str(output_dir), *args, "--model_ema"])
    listed = json.loads((output_dir / "checkpoint-4" / "checksums.json").read_text())["files"]
    assert {"ema.safetensors", "model.safetensors", "trainer_state.json"} <= set(listed)
    assert verify([str(output_dir)]) == 0


def test_a_sigkilled_finetune_resumes_to_identical_weights(uninterrupted, tmp_path, capsys):
    """SIGKILL (no handler runs) right after the first checkpoint, then the same command: the weights and the
    whole run's train_loss equal those of the uninterrupted run."""
    output_dir = tmp_path / "run"
    process = start_finetune(output_dir, ARGS)
    deadline = time.monotonic() + 180
    while not (output_dir / "checkpoint-4" / "checksums.json").exists():  # complete and checksummed
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.01)
    process.kill()
    process.communicate(timeout=60)
    assert not (output_dir / "all_results.json").exists()  # killed mid-run, not after it
    run.main(["--output_dir", str(output_dir), *ARGS])  # the same command again
    # Resumed (a fresh start would end at the same weights too: the runs are deterministic).
    assert f"Resuming from {output_dir / 'checkpoint-'}" in capsys.readouterr().out
    assert train_loss(output_dir) == pytest.approx(train_loss(uninterrupted), rel=1e-5)
    ours, theirs = load_file(output_dir / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_skips_a_cut_off_save_runs_no_planted_code_and_reports_the_whole_run(uninterrupted, tmp_path):
    """A SIGKILL while the Trainer wrote checkpoint-6 left a folder without trainer_state.json (written last);
    a hostile pickle sits in checkpoint-4. The run resumes from checkpoint-4, runs no code from it, and ends
    where the uninterrupted run did, with the whole run's train_loss."""
    resumed, marker = tmp_path / "run", tmp_path / "code-ran"
    shutil.copytree(uninterrupted / "checkpoint-4", resumed / "checkpoint-4")
    cut_off = resumed / "checkpoint-6"
    cut_off.mkdir()
    (cut_off / "model.safetensors").write_bytes((uninterrupted / "checkpoint-4" / "model.safetensors").read_bytes()[:99])
    torch.save(MaliciousPickle(marker), resumed / "checkpoint-4" / "custom_checkpoint_0.pkl")
    run.main(["--output_dir", str(resumed), *ARGS])
    assert not marker.exists()
    assert train_loss(resumed) == pytest.approx(train_loss(uninterrupted), rel=1e-5)
    ours, theirs = load_file(resumed / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_hostile_trainer_state_file_is_refused_without_running(uninterrupted, tmp_path):
    """The Trainer reads rng_state.pth, optimizer.pt, scheduler.pt with weights_only=True: a pickle of code fails."""
    resumed, marker = tmp_path / "run", tmp_path / "code-ran"
    shutil.copytree(uninterrupted / "checkpoint-4", resumed / "checkpoint-4")
    torch.save(MaliciousPickle(marker), resumed / "checkpoint-4" / "rng_state.pth")
    with pytest.raises(UntrustedCheckpointError, match=r"checkpoint-4 \(rng_state.pth: changed since it was written"):
        run.main(["--output_dir", str(resumed), *ARGS])  # checksums.json tells; the only checkpoint is kept
    (resumed / "checkpoint-4" / "checksums.json").unlink()  # as a checkpoint of an older version
    with pytest.raises(ValueError) as refused:
        run.main(["--output_dir", str(resumed), *ARGS])
    message = str(refused.value)
    assert f"Refused to load {resumed / 'checkpoint-4' / 'rng_state.pth'}" in message and "GLOBAL io.open" in message
    assert "weights_only=False" not in message and refused.value.__cause__ is None
    assert not marker.exists()


def test_a_truncated_newest_checkpoint_falls_back(uninterrupted, tmp_path, capsys):
    resumed = tmp_path / "run"
    for step in (4, 8):
        shutil.copytree(uninterrupted / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
    optimizer = resumed / "checkpoint-8" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-500])
    run.main(["--output_dir", str(resumed), *ARGS])
    assert f"Skipping the damaged checkpoint {resumed / 'checkpoint-8'} (optimizer.pt" in capsys.readouterr().out
    assert train_loss(resumed) == pytest.approx(train_loss(uninterrupted), rel=1e-5)


def start_finetune(output_dir: Path, args: list[str]) -> subprocess.Popen:
    # The environment of this process (thread count included), so that the float sums match `run.main` here.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "examples" / "finetune.py"), "--output_dir", str(output_dir),
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_saves_a_checkpoint_and_exits_non_zero(tmp_path):
    output_dir = tmp_path / "run"
    args = [arg if arg != "8" else "100000" for arg in ARGS]  # never ends by itself
    process = start_finetune(output_dir, args)
    deadline = time.monotonic() + 180
    while not list(output_dir.glob("checkpoint-*/trainer_state.json")):  # running, past its first save
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    saved = sorted(int(path.parent.name.split("-")[1]) for path in output_dir.glob("checkpoint-*/trainer_state.json"))
    assert saved[-1] > 4 and "Stopped by SIGTERM" in output and "--resume_from_checkpoint" in output
    assert not (output_dir / "all_results.json").exists()


@pytest.mark.parametrize("name", ["per_device_train_batch_size", "gradient_accumulation_steps"])
def test_step_sizes_of_zero_are_refused_before_any_data_is_read(name, tmp_path):
    with pytest.raises(ValueError, match=f"--{name} must be at least 1, got 0"):
        run.main(["--output_dir", str(tmp_path / "out"), *ARGS, f"--{name}", "0"])
