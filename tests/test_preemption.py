"""Long runs on shared machines (`examples/pretrain.py`; `train_tokenizer.py` runs the same loop):
resuming never runs code from the checkpoint folder, SIGTERM / SIGINT / SIGUSR1 stop at a step
boundary with a checkpoint and the run resumes to the uninterrupted result, a damaged newest
checkpoint falls back to an intact one, and a full disk keeps the older checkpoints.

Runs are real: `main` in this process, or the example script in a subprocess that gets real signals."""

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

from hf_mim.pretraining import main
from hf_mim.training.checkpoints import (
    STATE_FILE, TrainerState, UntrustedCheckpointError, find_damage, latest_checkpoint,
)
from hf_mim.training.tracking import LOG_FILE, read_log
from hf_mim.verify import main as verify

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 12
# 96 training images in batches of 16: 6 micro-batches per epoch; checkpoints at steps 5, 10 and 12.
ARGS = ["--max_steps", str(MAX_STEPS), "--checkpointing_steps", "5", "--save_total_limit", "0",
        "--config_overrides", "drop_path_rate=0.2", "--no-do_eval", "--max_train_samples", "96",
        "--per_device_train_batch_size", "16", "--logging_steps", "1", "--report_to", "none",
        "--dataloader_num_workers", "0"]


class MaliciousPickle:
    """Unpickling it creates `marker`: what a hostile file planted in a checkpoint folder would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(path: Path, marker: Path) -> None:
    torch.save(MaliciousPickle(marker), path)


def losses(output_dir: Path) -> dict[int, float]:
    return read_log(str(output_dir / LOG_FILE), "loss")


def read_results(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


def assert_same_run(got_dir: Path, expected_dir: Path, first_step: int) -> None:
    expected, got = losses(expected_dir), losses(got_dir)
    assert sorted(got)[-1] == MAX_STEPS and min(got) <= first_step
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step
    # train_loss of the whole run (every segment), not of the last one
    assert read_results(got_dir)["train_loss"] == pytest.approx(read_results(expected_dir)["train_loss"], rel=1e-5)
    ours, theirs = load_file(got_dir / "model.safetensors"), load_file(expected_dir / "model.safetensors")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    main(["--output_dir", str(output_dir), *ARGS])
    return output_dir


# ---------------------------------------------------------------------------------------------
# No code execution on resume
# ---------------------------------------------------------------------------------------------


def test_checkpoints_hold_no_pickled_objects(uninterrupted):
    folder = uninterrupted / "checkpoint-5"
    names = sorted(path.name for path in folder.iterdir())
    assert "extra-scheduler.pt" in names and not [name for name in names if name.startswith("custom_checkpoint")]
    state = torch.load(folder / "extra-scheduler.pt", weights_only=True)  # plain data: loads without pickled code
    assert state["last_epoch"] == 5


def test_planted_pickles_never_run_on_resume(uninterrupted, tmp_path, capsys):
    """A hostile `custom_checkpoint_<i>.pkl` (accelerate unpickles these with weights_only=False for objects
    registered with register_for_checkpointing) and hostile RNG / scheduler files: none runs. Without
    checksums.json (a checkpoint of an older version) the refusals are said plainly."""
    resumed, marker = tmp_path / "run", tmp_path / "code-ran"
    shutil.copytree(uninterrupted / "checkpoint-5", resumed / "checkpoint-5")
    (resumed / "checkpoint-5" / "checksums.json").unlink()
    plant(resumed / "checkpoint-5" / "random_states_0.pkl", marker)
    main(["--output_dir", str(resumed), *ARGS])
    assert not marker.exists()
    assert_same_run(resumed, uninterrupted, first_step=6)  # the per-micro-batch reseeding makes RNG files moot
    refused = [line for line in capsys.readouterr().err.splitlines() if "Refused" in line]  # the log's lines
    assert len(refused) == 1 and f"WARNING hf_mim.training.checkpoints: Refused {resumed / 'checkpoint-5'}" \
        "/random_states_0.pkl" in refused[0] and "GLOBAL io.open" in refused[0]

    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"):
        plant(resumed / "checkpoint-5" / name, marker)
    with pytest.raises(ValueError, match=r"custom_checkpoint_0.pkl.*pickles that run code"):
        main(["--output_dir", str(tmp_path / "other"), *ARGS, "--resume_from_checkpoint",
              str(resumed / "checkpoint-5")])
    assert not marker.exists()
    (resumed / "checkpoint-5" / "custom_checkpoint_0.pkl").unlink()
    (resumed / "checkpoint-5" / "custom_checkpoint_1.pkl").unlink()

    for name in ("extra-scheduler.pt", "optimizer.bin"):
        shutil.copy(uninterrupted / "checkpoint-5" / "extra-scheduler.pt", resumed / "checkpoint-5")
        shutil.copy(uninterrupted / "checkpoint-5" / "optimizer.bin", resumed / "checkpoint-5")
        plant(resumed / "checkpoint-5" / name, marker)
        with pytest.raises(ValueError) as refused:
            main(["--output_dir", str(tmp_path / "other"), *ARGS, "--resume_from_checkpoint",
                  str(resumed / "checkpoint-5")])
        message = str(refused.value)
        assert f"Refused to load {resumed / 'checkpoint-5' / name}" in message and "GLOBAL io.open" in message
        assert "weights_only=False" not in message and "add_safe_globals" not in message and refused.value.__cause__ is None  # not torch's unsafe advice
        assert not marker.exists()


def test_a_planted_pickle_in_the_only_checkpoint_stops_the_run_and_keeps_it(uninterrupted, tmp_path):
    """checksums.json tells the altered file; with no older checkpoint the run stops instead of starting at
    step 1 and overwriting checkpoint-5 (the work of five steps)."""
    resumed, marker = tmp_path / "run", tmp_path / "code-ran"
    shutil.copytree(uninterrupted / "checkpoint-5", resumed / "checkpoint-5")
    plant(resumed / "checkpoint-5" / "optimizer.bin", marker)
    before = {path.name: path.read_bytes() for path in (resumed / "checkpoint-5").iterdir()}
    with pytest.raises(UntrustedCheckpointError, match=r"No checkpoint in .* can be trusted: checkpoint-5 "
                                                       r"\(optimizer.bin: changed since it was written .*mv "):
        main(["--output_dir", str(resumed), *ARGS])
    assert not marker.exists() and losses(resumed) == {}  # not one step trained
    assert {path.name: path.read_bytes() for path in (resumed / "checkpoint-5").iterdir()} == before


# ---------------------------------------------------------------------------------------------
# Graceful preemption: real signals to a real run
# ---------------------------------------------------------------------------------------------


def start_run(output_dir: Path, *extra: str) -> subprocess.Popen:
    # The environment of this process (thread count included), so that the float sums match `main` here.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "examples" / "pretrain.py"), "--output_dir", str(output_dir),
                             *ARGS, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(process: subprocess.Popen, output_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()[-3000:]
        if (output_dir / LOG_FILE).exists() and max(losses(output_dir), default=0) >= step:
            return
        time.sleep(0.02)
    raise TimeoutError(f"the run did not reach step {step}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_signal_checkpoints_exits_non_zero_and_the_run_resumes_to_the_same_result(uninterrupted, tmp_path, signum):
    """SIGTERM: the whole round trip; SIGINT and SIGUSR1 (the same path): the checkpoint and the exit."""
    output_dir = tmp_path / "run"
    process = start_run(output_dir)
    wait_for_step(process, output_dir, 2)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, output[-3000:]
    stopped = latest_checkpoint(output_dir)
    step = TrainerState.from_file(stopped / STATE_FILE).global_step
    assert 2 <= step < MAX_STEPS and stopped.name == f"checkpoint-{step}"
    assert f"Stopped by {signum.name}" in output and "--resume_from_checkpoint" in output
    assert not (output_dir / "model.safetensors").exists()  # no final outputs from a stopped run
    assert max(losses(output_dir)) == step  # the step in flight finished, no further one started
    if signum == signal.SIGTERM:
        main(["--output_dir", str(output_dir), *ARGS])  # the same command again
        assert_same_run(output_dir, uninterrupted, first_step=2)


SECOND_SIGNAL = """
import os, signal, sys, time
from hf_mim.preemption import PreemptionGuard
with PreemptionGuard() as guard:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("first signal recorded:", guard.signum == signal.SIGTERM, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    print("still running", flush=True)
"""


def test_a_second_signal_stops_at_once():
    """The first signal only asks for a checkpoint; the second ends the process with the signal's default action."""
    finished = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert finished.stdout == "first signal recorded: True\n" and finished.returncode == -signal.SIGTERM
    assert "send it again to stop at once" in finished.stderr


# ---------------------------------------------------------------------------------------------
# Damaged files and a full disk
# ---------------------------------------------------------------------------------------------


def flip_bit(path: Path, offset: int = -100) -> None:
    """One flipped bit near the end of the file (a weight, not the header): safetensors has no checksum."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(uninterrupted, tmp_path, capsys):
    resumed = tmp_path / "run"
    for step in (5, 10):
        shutil.copytree(uninterrupted / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
    weights = resumed / "checkpoint-10" / "model.safetensors"
    flip_bit(weights)  # still a well-formed file: only checksums.json tells
    assert find_damage(resumed / "checkpoint-10") == \
        "model.safetensors: changed since it was written (its SHA-256 differs from checksums.json)"
    assert verify(([str(resumed)])) == 1
    report = capsys.readouterr().out
    assert f"DAMAGED    {resumed / 'checkpoint-10'}: model.safetensors: changed" in report
    assert f"ok         {resumed / 'checkpoint-5'}: 10 files match checksums.json" in report
    main(["--output_dir", str(resumed), *ARGS])
    assert f"Skipping the damaged checkpoint {resumed / 'checkpoint-10'} (model.safetensors: changed since it was " \
           "written (its SHA-256 differs from checksums.json)); falling back to the older checkpoint-5" \
           in capsys.readouterr().err
    assert_same_run(resumed, uninterrupted, first_step=6)
    with pytest.raises(ValueError, match=r"is damaged \(extra-scheduler.pt: truncated"):
        scheduler = resumed / "checkpoint-10" / "extra-scheduler.pt"
        scheduler.write_bytes(scheduler.read_bytes()[:100])
        main(["--output_dir", str(resumed), *ARGS, "--resume_from_checkpoint", str(resumed / "checkpoint-10")])


def test_a_saved_model_carries_checksums_that_verify_checks(uninterrupted, tmp_path, capsys):
    assert verify([str(uninterrupted)]) == 0
    assert f"ok         {uninterrupted}: " in capsys.readouterr().out
    model = tmp_path / "model"
    shutil.copytree(uninterrupted, model, ignore=shutil.ignore_patterns("checkpoint-*"))
    flip_bit(model / "model.safetensors")
    assert verify([str(model)]) == 1
    assert f"DAMAGED    {model}: model.safetensors: changed since it was written" in capsys.readouterr().out
    (model / "checksums.json").unlink()
    assert verify([str(model)]) == 0 and "unverified" in capsys.readouterr().out
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # without checksums.json still checked for truncation
    assert verify([str(model)]) == 1
    assert f"DAMAGED    {model}: model.safetensors: truncated" in capsys.readouterr().out


def test_every_checkpoint_is_a_model_for_the_auto_classes_finetune_and_probe(uninterrupted, tmp_path):
    from transformers import AutoImageProcessor, AutoModel, AutoModelForPreTraining

    from hf_mim.finetuning import probe, run as finetune

    folder = uninterrupted / "checkpoint-5"
    model, info = AutoModelForPreTraining.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    saved = load_file(folder / "model.safetensors")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)  # the step-5 weights
    assert AutoModel.from_pretrained(folder).config.model_type == model.config.model_type
    assert AutoImageProcessor.from_pretrained(folder) is not None
    tuned = finetune.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "tuned"),
                           "--max_steps", "2", "--max_train_samples", "32", "--max_eval_samples", "16",
                           "--per_device_train_batch_size", "16", "--dataloader_num_workers", "0",
                           "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"])
    assert tuned["train_loss"] > 0 and "eval_top1" in tuned
    probed = probe.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "probe"),
                         "--max_train_samples", "40", "--max_eval_samples", "20", "--probe_epochs", "2",
                         "--dataloader_num_workers", "0"])
    assert probed["num_train"] == 40 and 0 <= probed["linear_top1"] <= 1


def can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs a private tmpfs (unshare -rm: user and mount namespaces)")
def test_a_full_disk_names_the_folder_and_keeps_the_older_checkpoints(uninterrupted, tmp_path):
    """A real ENOSPC: the run writes into a tmpfs with room for its first checkpoint but not the second."""
    size = sum(path.stat().st_size for path in (uninterrupted / "checkpoint-5").iterdir())
    mount, output_dir = tmp_path / "small", tmp_path / "small" / "run"
    mount.mkdir()
    script = (f"mount -t tmpfs -o size={int(size * 1.6)} tmpfs {mount} && "
              f"{sys.executable} {ROOT / 'examples' / 'pretrain.py'} --output_dir {output_dir} {' '.join(ARGS)}; "
              f"code=$?; ls {output_dir}; exit $code")
    finished = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"})
    assert finished.returncode != 0
    assert f"No space left on {output_dir}: checkpoint-10 was not written (kept: checkpoint-5)" in finished.stderr
    assert finished.stdout.split().count("checkpoint-5") == 1 and ".tmp-checkpoint-10" not in finished.stdout


# ---------------------------------------------------------------------------------------------
# train_tokenizer.py: PeCo's discriminator (trained beside the model) resumes without pickle
# ---------------------------------------------------------------------------------------------


def test_peco_discriminator_is_saved_as_safetensors_and_resumes_exactly(tmp_path):
    from hf_mim import MaeConfig, MaeForPreTraining
    from hf_mim.tokenizer_training import main as tokenizer_main

    torch.manual_seed(0)
    perceptual = tmp_path / "mae"
    MaeForPreTraining(MaeConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                image_size=32, patch_size=4, decoder_hidden_size=16, decoder_num_attention_heads=2,
                                decoder_num_hidden_layers=1, decoder_intermediate_size=32)).save_pretrained(perceptual)
    args = ["--method", "peco", "--perceptual_model", str(perceptual), "--max_steps", "4", "--checkpointing_steps", "2",
            "--save_total_limit", "0", "--config_overrides", "use_adversarial=True,adversarial_start_step=1,"
            "discriminator_hidden_size=8,discriminator_num_layers=2", "--max_train_samples", "64", "--no-do_eval",
            "--per_device_train_batch_size", "16", "--logging_steps", "1", "--report_to", "none",
            "--dataloader_num_workers", "0"]
    tokenizer_main(["--output_dir", str(tmp_path / "whole"), *args])
    folder = tmp_path / "whole" / "checkpoint-2"
    assert {"extra-discriminator.safetensors", "extra-discriminator_optimizer.pt"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.glob("custom_checkpoint_*"))
    from transformers import AutoModel  # the checkpoint is a model too

    tokenizer, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()) and tokenizer.config.model_type == "hf_mim_peco", (type(tokenizer), info)
    shutil.copytree(folder, tmp_path / "resumed" / "checkpoint-2")
    tokenizer_main(["--output_dir", str(tmp_path / "resumed"), *args])
    expected = read_log(str(tmp_path / "whole" / LOG_FILE), "discriminator_loss")
    got = read_log(str(tmp_path / "resumed" / LOG_FILE), "discriminator_loss")
    assert sorted(got) == [3, 4] and expected[4] > 0  # the discriminator trains in the resumed steps
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
