"""Fault matrix: kill, signal and feed bad files to real runs, then count what survived.

    python benchmarks/fault_matrix.py                 # a few minutes on a laptop CPU
    python benchmarks/fault_matrix.py --kills 10      # more SIGKILLs at random moments

Every case runs the example scripts as a user would (subprocesses, real signals, real files):

* SIGKILL of `pretrain.py` at random moments (some during a checkpoint save), then the same command
  again: the final weights and every logged loss must equal those of an uninterrupted run;
* SIGTERM / SIGINT / SIGUSR1: exit code 128 + signal, a checkpoint, then the same result on resume;
* SIGKILL of `finetune.py` while the Trainer writes checkpoint-N, then resume: it must finish;
* bad files: a planted pickle in a checkpoint (must never run), a truncated newest checkpoint (must
  fall back), damaged converter inputs (a clear error, no --allow-pickle hint), images needing EXIF
  rotation / 16-bit scaling / palette, CMYK and LA conversion (the pixels the file means).

It prints one line per case and the totals: kills survived, bad inputs tried, runs with lost or wrong
data (the target is 0).

Measured 2026-12-03, 2 shared CPU cores, `--kills 4` (15.6 min wall): kills survived 8 / 8 (4 SIGKILLs of
pretrain.py, 2 of them during a save; SIGTERM, SIGINT, SIGUSR1; a SIGKILL of finetune.py while it wrote
checkpoint-N); bad inputs tried 25; runs with lost or wrong data 0 (weights and losses identical to the
uninterrupted run: max gap 0.0).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
MAX_STEPS = 12
PRETRAIN = ["--max_steps", str(MAX_STEPS), "--checkpointing_steps", "3", "--save_total_limit", "2",
            "--config_overrides", "drop_path_rate=0.2", "--no-do_eval", "--max_train_samples", "96",
            "--per_device_train_batch_size", "16", "--logging_steps", "1", "--report_to", "none",
            "--dataloader_num_workers", "0"]
FINETUNE = ["--max_steps", "12", "--save_steps", "3", "--logging_steps", "1", "--max_train_samples", "64",
            "--max_eval_samples", "16", "--per_device_train_batch_size", "16", "--eval_strategy", "no",
            "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--report_to", "none"]


class Tally:
    def __init__(self):
        self.kills = self.kills_survived = self.bad_inputs = self.wrong = 0

    def case(self, name: str, ok: bool, detail: str = "") -> None:
        self.wrong += not ok
        print(f"{'ok   ' if ok else 'WRONG'} {name}{': ' + detail if detail else ''}", flush=True)


def start(script: str, output_dir: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "examples" / script), "--output_dir", str(output_dir), *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(script: str, output_dir: Path, args: list[str]) -> tuple[int, str]:
    process = start(script, output_dir, args)
    output, _ = process.communicate(timeout=900)
    return process.returncode, output


def losses(output_dir: Path) -> dict[int, float]:
    found = {}
    if (output_dir / "log.jsonl").exists():
        for line in (output_dir / "log.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "loss" in record and "step" in record:
                found[record["step"]] = record["loss"]
    return found


def same_run(got: Path, expected: Path) -> tuple[bool, str]:
    if not (got / "model.safetensors").exists():
        return False, "no final model"
    ours, theirs = load_file(got / "model.safetensors"), load_file(expected / "model.safetensors")
    worst = max(float((ours[name] - theirs[name]).abs().max()) for name in theirs)
    reference, logged = losses(expected), losses(got)
    # Every step from the first one this folder logged (1, or past the checkpoint it was given) to the last.
    first = min(logged, default=MAX_STEPS + 1)
    loss_gap = max((abs(logged.get(step, float("inf")) - reference[step]) for step in range(first, MAX_STEPS + 1)),
                   default=float("inf"))
    results = [json.loads((folder / "all_results.json").read_text())["train_loss"] for folder in (got, expected)]
    ok = worst < 1e-5 and loss_gap < 1e-5 and abs(results[0] - results[1]) < 1e-5 * abs(results[1])
    return ok, f"max weight gap {worst:.1e}, max loss gap {loss_gap:.1e}, train_loss {results[0]:.6f} vs {results[1]:.6f}"


def wait_for(process: subprocess.Popen, ready, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if ready():
            return True
        time.sleep(0.005)
    return False


# ---------------------------------------------------------------------------------------------
# Kills and signals
# ---------------------------------------------------------------------------------------------


def kill_cases(tally: Tally, work: Path, reference: Path, kills: int, rng: random.Random) -> None:
    for index in range(kills):
        output_dir = work / f"kill-{index}"
        during_save = index % 2 == 1
        process = start("pretrain.py", output_dir, PRETRAIN)
        if during_save:  # the moment a checkpoint folder is being written
            hit = wait_for(process, lambda: any(output_dir.glob(".tmp-checkpoint-*")))
        else:
            step = rng.randint(1, MAX_STEPS - 1)
            hit = wait_for(process, lambda: max(losses(output_dir), default=0) >= step)
        process.kill()
        process.communicate()
        tally.kills += 1
        code, output = finish("pretrain.py", output_dir, PRETRAIN)  # the same command again
        ok, detail = same_run(output_dir, reference) if code == 0 else (False, output[-500:])
        tally.kills_survived += ok
        where = "during a save" if during_save and hit else (f"after step {step}" if not during_save else "late")
        tally.case(f"SIGKILL pretrain {where}, resume", ok, detail)


def signal_cases(tally: Tally, work: Path, reference: Path) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        output_dir = work / f"signal-{signum.name}"
        process = start("pretrain.py", output_dir, PRETRAIN)
        wait_for(process, lambda: max(losses(output_dir), default=0) >= 2)
        process.send_signal(signum)
        output, _ = process.communicate(timeout=300)
        tally.kills += 1
        stopped_cleanly = process.returncode == 128 + signum and "--resume_from_checkpoint" in output
        code, output = finish("pretrain.py", output_dir, PRETRAIN)
        ok, detail = same_run(output_dir, reference) if code == 0 else (False, output[-500:])
        ok = ok and stopped_cleanly
        tally.kills_survived += ok
        tally.case(f"{signum.name} pretrain, exit {process.returncode}, resume", ok, detail)


def finetune_kill_case(tally: Tally, work: Path) -> None:
    output_dir = work / "finetune-kill"
    process = start("finetune.py", output_dir, FINETUNE)
    # A checkpoint-N folder without trainer_state.json (written last) is one being written right now.
    wait_for(process, lambda: any(folder.is_dir() and not (folder / "trainer_state.json").exists()
                                  for folder in output_dir.glob("checkpoint-*")))
    process.kill()
    process.communicate()
    tally.kills += 1
    code, output = finish("finetune.py", output_dir, FINETUNE)
    ok = code == 0 and json.loads((output_dir / "all_results.json").read_text()).get("train_loss") is not None
    tally.kills_survived += ok
    tally.case("SIGKILL finetune while it writes checkpoint-N, resume", ok, "" if ok else output[-800:])


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------


class Marker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def planted_pickle_case(tally: Tally, work: Path, reference: Path) -> None:
    output_dir, marker = work / "planted", work / "code-ran"
    shutil.copytree(reference / "checkpoint-9", output_dir / "checkpoint-9")
    torch.save(Marker(str(marker)), output_dir / "checkpoint-9" / "random_states_0.pkl")
    tally.bad_inputs += 1
    code, output = finish("pretrain.py", output_dir, PRETRAIN)
    ok, detail = same_run(output_dir, reference) if code == 0 else (False, output[-500:])
    tally.case("pickle planted in a checkpoint never runs", ok and not marker.exists(), detail)
    shutil.rmtree(output_dir)
    shutil.copytree(reference / "checkpoint-9", output_dir / "checkpoint-9")
    torch.save(Marker(str(marker)), output_dir / "checkpoint-9" / "custom_checkpoint_0.pkl")
    tally.bad_inputs += 1
    code, output = finish("pretrain.py", output_dir, PRETRAIN)
    tally.case("custom_checkpoint_0.pkl planted: refused, never run", code != 0 and not marker.exists()
               and "pickles that run code" in output)


def truncated_checkpoint_case(tally: Tally, work: Path, reference: Path) -> None:
    output_dir = work / "truncated"
    for step in (9, 12):
        shutil.copytree(reference / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
    weights = output_dir / "checkpoint-12" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    tally.bad_inputs += 1
    code, output = finish("pretrain.py", output_dir, PRETRAIN)
    # Resumed from checkpoint-9: steps 10-12 again, to the uninterrupted result.
    ok, detail = same_run(output_dir, reference) if code == 0 else (False, output[-500:])
    tally.case("truncated newest checkpoint falls back", ok and "Skipping the damaged checkpoint" in output, detail)


def converter_cases(tally: Tally, work: Path) -> None:
    """`python -m hf_mim.convert` (its main, in this process: the same code without 12 interpreter starts)."""
    from hf_mim.convert.__main__ import main as convert

    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}}, work / "plain.pth")
    data = (work / "plain.pth").read_bytes()
    bad = {"truncated.pth": data[: len(data) // 2], "garbage.pth": b"<html>404</html>", "empty.pth": b""}
    for name, content in bad.items():
        (work / name).write_bytes(content)
        for converter in ("mae", "beit", "vqkd", "dalle"):
            tally.bad_inputs += 1
            errors = io.StringIO()
            with contextlib.redirect_stderr(errors):
                code = convert([converter, str(work / name), str(work / "converted")])
            message = errors.getvalue()
            ok = code == 2 and "damaged" in message and "--allow-pickle" not in message
            tally.case(f"convert {converter} {name}: clear error", ok, "" if ok else message[-300:])


def image_cases(tally: Tally) -> None:
    from hf_mim.data import decode_image

    def encoded(image: Image.Image, fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    cases = {
        "EXIF-rotated JPEG": (encoded(Image.new("RGB", (64, 32), (200, 30, 30)), "JPEG", exif=exif),
                              lambda image: image.size == (32, 64)),
        "16-bit grey PNG": (encoded(Image.fromarray(np.full((8, 8), 32768, np.uint16)), "PNG"),
                            lambda image: abs(np.asarray(image).mean() - 128) < 1),
        "palette PNG": (encoded(Image.new("P", (8, 8), 0), "PNG"), lambda image: image.mode == "RGB"),
        "CMYK JPEG": (encoded(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", quality=100),
                      lambda image: np.asarray(image)[..., 0].mean() < 10),
        "grey + alpha PNG": (encoded(Image.new("LA", (8, 8), (100, 128)), "PNG"),
                             lambda image: abs(np.asarray(image).mean() - 100) < 1),
    }
    for name, (data, check) in cases.items():
        for source, value in (("parquet bytes", {"bytes": data, "path": None}), ("binary column", data)):
            tally.bad_inputs += 1
            tally.case(f"{name} from {source}", check(decode_image(value)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=4, help="SIGKILLs of pretrain.py (half of them during a save)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tally, rng = Tally(), random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="hf_mim-faults-") as folder:
        work = Path(folder)
        reference = work / "uninterrupted"
        code, output = finish("pretrain.py", reference, [*PRETRAIN, "--save_total_limit", "0"])
        assert code == 0, output[-2000:]
        image_cases(tally)
        converter_cases(tally, work)
        planted_pickle_case(tally, work, reference)
        truncated_checkpoint_case(tally, work, reference)
        signal_cases(tally, work, reference)
        kill_cases(tally, work, reference, args.kills, rng)
        finetune_kill_case(tally, work)
    print(f"\nkills survived: {tally.kills_survived} / {tally.kills}; bad inputs tried: {tally.bad_inputs}; "
          f"runs with lost or wrong data: {tally.wrong}")
    sys.exit(1 if tally.wrong else 0)


if __name__ == "__main__":
    main()
