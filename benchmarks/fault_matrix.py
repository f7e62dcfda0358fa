"""Fault matrix: kill, signal and feed bad files to real runs, then count what survived.

    python benchmarks/fault_matrix.py                 # about 30-45 minutes on 2 shared CPU cores
    python benchmarks/fault_matrix.py --kills 10      # more SIGKILLs of pretrain.py at random moments
    python benchmarks/fault_matrix.py --timeout 1800  # seconds allowed to each script run (default 900)

Every case runs the example scripts as a user would (subprocesses, real signals, real files):

* SIGKILL of `pretrain.py` at random moments (half of them during a checkpoint save), of
  `train_tokenizer.py` and of `finetune.py` (while the Trainer writes checkpoint-N), then the same
  command again: the final weights (and, for the Accelerate scripts, every logged loss) must equal
  those of an uninterrupted run;
* SIGTERM / SIGINT / SIGUSR1 of `pretrain.py`: exit code 128 + signal, a checkpoint, then the same result;
* a second run on the same --output_dir while the first lives: refused, the first unharmed;
* a pickle of code planted in every kind of checkpoint file of `pretrain.py` and `finetune.py`, with the
  checkpoint's checksums.json (the run must stop, name the file and keep the checkpoint) and without it
  (a checkpoint of an older version: refused in plain words, or skipped with a warning for RNG files);
  the code must never run;
* a truncated and a bit-flipped newest checkpoint (must fall back to the older one, to the same result);
* damaged converter inputs (a clear error, no --allow-pickle hint);
* images needing EXIF rotation, 16-bit or float scaling, palette, CMYK and LA conversion, on the
  reference decoder and on the fast path's (`--data_pipeline fast`), from parquet bytes and a binary column.

A run that exceeds its time limit is a row (TIMEOUT, counted as wrong), its process group is ended, and
the matrix goes on; every child still running at the end is ended too. The totals are printed in all cases:
kills survived, bad inputs tried, runs with lost or wrong data (the target is 0), timeouts.
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
COMMON = ["--max_steps", str(MAX_STEPS), "--no-do_eval", "--per_device_train_batch_size", "16", "--logging_steps",
          "1", "--report_to", "none", "--dataloader_num_workers", "0"]
PRETRAIN = [*COMMON, "--checkpointing_steps", "3", "--save_total_limit", "2", "--config_overrides",
            "drop_path_rate=0.2", "--max_train_samples", "96"]
TOKENIZER = [*COMMON, "--method", "dvae", "--checkpointing_steps", "3", "--save_total_limit", "2",
             "--max_train_samples", "64"]
FINETUNE = ["--max_steps", str(MAX_STEPS), "--save_steps", "3", "--logging_steps", "1", "--max_train_samples", "64",
            "--max_eval_samples", "16", "--per_device_train_batch_size", "16", "--eval_strategy", "no",
            "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--report_to", "none"]
SCRIPTS = {"pretrain.py": PRETRAIN, "train_tokenizer.py": TOKENIZER, "finetune.py": FINETUNE}
# Files of a checkpoint that may hold a pickle (or stand in for one), per script.
PLANTED = {"pretrain.py": ["optimizer.bin", "random_states_0.pkl", "extra-scheduler.pt", "sampler.bin",
                           "model.safetensors", "custom_checkpoint_0.pkl"],
           "finetune.py": ["optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "model.safetensors"]}


NOT_READ = ("sampler.bin", "training_args.bin")  # written, never read on resume (a map-style sampler; the Trainer)


class Tally:
    def __init__(self):
        self.kills = self.kills_survived = self.bad_inputs = self.wrong = self.timeouts = 0

    def case(self, name: str, ok: bool, detail: str = "") -> None:
        self.wrong += not ok
        print(f"{'ok   ' if ok else 'WRONG'} {name}{': ' + detail if detail else ''}", flush=True)

    def timeout(self, name: str, detail: str) -> None:
        self.timeouts += 1
        self.wrong += 1
        print(f"TIMEOUT {name}: {detail}", flush=True)

    def totals(self) -> str:
        return (f"kills survived: {self.kills_survived} / {self.kills}; bad inputs tried: {self.bad_inputs}; "
                f"runs with lost or wrong data: {self.wrong} (of them timeouts: {self.timeouts})")


class TimedOut(Exception):
    """A script run exceeded --timeout (its process group was ended)."""


# ---------------------------------------------------------------------------------------------
# Child processes: each in its own process group, ended on timeout and at exit
# ---------------------------------------------------------------------------------------------

CHILDREN: list[subprocess.Popen] = []
TIMEOUT = 900.0


def start(script: str, output_dir: Path, args: list[str]) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, str(ROOT / "examples" / script), "--output_dir", str(output_dir),
                                *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # its own group: ending it ends its data-loader workers too
    CHILDREN.append(process)
    return process


def end(process: subprocess.Popen, signum: int = signal.SIGKILL) -> str:
    """Send `signum` to the process's group (SIGKILL by default), wait, and return its output."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
    output, _ = process.communicate()
    return output or ""


def end_all_children() -> None:
    for process in CHILDREN:
        if process.poll() is None:
            end(process)


def communicate(process: subprocess.Popen) -> str:
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
        return output
    except subprocess.TimeoutExpired:
        end(process)
        raise TimedOut(f"no exit after {TIMEOUT:.0f} s; its process group was ended") from None


def finish(script: str, output_dir: Path, args: list[str]) -> tuple[int, str]:
    process = start(script, output_dir, args)
    output = communicate(process)
    return process.returncode, output


def wait_for(process: subprocess.Popen, ready) -> bool:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        if ready():
            return True
        time.sleep(0.005)
    return False


def row(tally: Tally, name: str, case, *args) -> None:
    """Run one case; a timeout (or a crash of the case itself) is a row, and the matrix goes on."""
    try:
        case(tally, *args)
    except TimedOut as error:
        tally.timeout(name, str(error))
    except Exception as error:  # noqa: BLE001 - the matrix reports, it does not stop
        tally.case(name, False, f"the case itself failed: {type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------------
# Comparing runs
# ---------------------------------------------------------------------------------------------


def losses(output_dir: Path) -> dict[int, float]:
    found = {}
    if (output_dir / "log.jsonl").exists():
        for line in (output_dir / "log.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "loss" in record and "step" in record:
                found[record["step"]] = record["loss"]
    return found


def same_run(got: Path, expected: Path, check_losses: bool = True) -> tuple[bool, str]:
    if not (got / "model.safetensors").exists():
        return False, "no final model"
    ours, theirs = load_file(got / "model.safetensors"), load_file(expected / "model.safetensors")
    worst = max(float((ours[name] - theirs[name]).abs().max()) for name in theirs)
    results = [json.loads((folder / "all_results.json").read_text())["train_loss"] for folder in (got, expected)]
    ok = worst < 1e-5 and abs(results[0] - results[1]) < 1e-5 * abs(results[1])
    detail = f"max weight gap {worst:.1e}, train_loss {results[0]:.6f} vs {results[1]:.6f}"
    if check_losses:  # every step from the first one this folder logged to the last
        reference, logged = losses(expected), losses(got)
        first = min(logged, default=MAX_STEPS + 1)
        loss_gap = max((abs(logged.get(step, float("inf")) - reference[step]) for step in range(first, MAX_STEPS + 1)),
                       default=float("inf"))
        ok = ok and loss_gap < 1e-5
        detail += f", max loss gap {loss_gap:.1e}"
    return ok, detail


def checked_run(script: str, output_dir: Path, reference: Path) -> tuple[bool, str]:
    """The same command again, to the uninterrupted result."""
    code, output = finish(script, output_dir, SCRIPTS[script])
    if code != 0:
        return False, output[-500:]
    return same_run(output_dir, reference, check_losses=script != "finetune.py")


# ---------------------------------------------------------------------------------------------
# Kills and signals
# ---------------------------------------------------------------------------------------------


def kill_case(tally: Tally, work: Path, references: dict[str, Path], script: str, index: int,
              step: int | None) -> None:
    """SIGKILL after `step` logged steps, or (step None) while a checkpoint is being written, then resume."""
    output_dir = work / f"kill-{script}-{index}"
    process = start(script, output_dir, SCRIPTS[script])
    if step is not None:
        hit = wait_for(process, lambda: max(losses(output_dir), default=0) >= step)
    elif script == "finetune.py":  # a checkpoint-N without trainer_state.json (written last) is being written
        hit = wait_for(process, lambda: any(folder.is_dir() and not (folder / "trainer_state.json").exists()
                                            for folder in output_dir.glob("checkpoint-*")))
    else:
        hit = wait_for(process, lambda: any(output_dir.glob(".tmp-checkpoint-*")))
    end(process)
    tally.kills += 1
    ok, detail = checked_run(script, output_dir, references[script])
    tally.kills_survived += ok
    where = (f"after step {step}" if step is not None else "during a save") if hit else "late (the run had ended)"
    tally.case(f"SIGKILL {script} {where}, resume", ok, detail)


def signal_case(tally: Tally, work: Path, references: dict[str, Path], signum: signal.Signals) -> None:
    output_dir = work / f"signal-{signum.name}"
    process = start("pretrain.py", output_dir, PRETRAIN)
    wait_for(process, lambda: max(losses(output_dir), default=0) >= 2)
    process.send_signal(signum)
    output = communicate(process)
    tally.kills += 1
    stopped_cleanly = process.returncode == 128 + signum and "--resume_from_checkpoint" in output
    ok, detail = checked_run("pretrain.py", output_dir, references["pretrain.py"])
    ok = ok and stopped_cleanly
    tally.kills_survived += ok
    tally.case(f"{signum.name} pretrain, exit {process.returncode}, resume", ok, detail)


def second_run_case(tally: Tally, work: Path, references: dict[str, Path]) -> None:
    """A second run on the same folder while the first lives (it would run for hours): refused, and the first
    never logs a step twice; then the first is stopped with SIGTERM."""
    output_dir = work / "two-runs"
    endless = [*PRETRAIN, "--max_steps", "100000"]  # the last --max_steps wins
    first = start("pretrain.py", output_dir, endless)
    wait_for(first, lambda: max(losses(output_dir), default=0) >= 1)
    code, output = finish("pretrain.py", output_dir, endless)
    alive = first.poll() is None
    refused = code != 0 and "Another run is using" in output
    first.send_signal(signal.SIGTERM)
    communicate(first)
    logged = [json.loads(line).get("step") for line in (output_dir / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    ok = alive and refused and first.returncode == 128 + signal.SIGTERM and len(logged) == len(set(logged))
    tally.bad_inputs += 1
    tally.case("a second run on the same --output_dir while the first lives is refused", ok,
               f"first alive: {alive}, refused: {refused}, first's exit {first.returncode}, {len(logged)} steps logged "
               f"once each" if ok else f"first alive: {alive}; second: exit {code}, {output.strip()[-300:]}")


# ---------------------------------------------------------------------------------------------
# Bad files in checkpoints
# ---------------------------------------------------------------------------------------------


class Marker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def planted_case(tally: Tally, work: Path, references: dict[str, Path], script: str, name: str,
                 with_checksums: bool) -> None:
    """The only checkpoint holds a pickle of code in `name`: the code never runs; with checksums.json the run
    stops and keeps the checkpoint; without it the file is refused in plain words (an RNG file: skipped with
    a warning, and the run ends as the uninterrupted one)."""
    step = 9
    output_dir, marker = work / f"planted-{script}-{name}-{with_checksums}", work / f"code-ran-{script}-{name}"
    checkpoint = output_dir / f"checkpoint-{step}"
    shutil.copytree(references[script] / f"checkpoint-{step}", checkpoint)
    listed = name in json.loads((checkpoint / "checksums.json").read_text())["files"]  # a file this run writes
    if not with_checksums:
        (checkpoint / "checksums.json").unlink()
    torch.save(Marker(str(marker)), checkpoint / name)
    before = {path.name: path.read_bytes() for path in checkpoint.iterdir()}
    tally.bad_inputs += 1
    code, output = finish(script, output_dir, SCRIPTS[script])
    unsafe_advice = "weights_only=False" in output or "add_safe_globals" in output
    if with_checksums and listed:  # (custom_checkpoint_0.pkl, or sampler.bin with this sampler: never written)
        kept = {path.name: path.read_bytes() for path in checkpoint.iterdir()} == before
        ok = code != 0 and kept and "can be trusted" in output and f"({name}: " in output
        detail = "stopped, named the file, kept the checkpoint" if ok else output[-400:]
    elif code == 0:  # continued: only right for files a resume does without, and only to the same result
        ok, detail = same_run(output_dir, references[script], check_losses=script != "finetune.py")
        ok = ok and (name in NOT_READ or (name.startswith("random_states") and "Refused" in output))
    else:
        ok = any(words in output for words in ("Refused to load", "pickles that run code", "damaged"))
        detail = output.strip().splitlines()[-1][:300] if output.strip() else ""
    ok = ok and not marker.exists() and not unsafe_advice
    tally.case(f"{script}: pickle planted in {name} ({'with' if with_checksums else 'without'} checksums.json)",
               ok, detail)


def damaged_newest_case(tally: Tally, work: Path, references: dict[str, Path], how: str) -> None:
    output_dir = work / f"damaged-{how}"
    for step in (9, 12):
        shutil.copytree(references["pretrain.py"] / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
    weights = output_dir / "checkpoint-12" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if how == "truncated":
        del data[-4096:]
    else:  # one flipped bit in a weight: a well-formed file, only the checksum tells
        data[-100] ^= 0x40
    weights.write_bytes(bytes(data))
    tally.bad_inputs += 1
    code, output = finish("pretrain.py", output_dir, PRETRAIN)
    ok, detail = same_run(output_dir, references["pretrain.py"]) if code == 0 else (False, output[-500:])
    tally.case(f"{how} newest checkpoint falls back to checkpoint-9",
               ok and "falling back to the older checkpoint-9" in output, detail)


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
    """Each file kind through the reference decoder and the fast path's (open the header, decode in full)."""
    from hf_mim.data import decode_image
    from hf_mim.fast_data import decode_reduced, open_image

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
        "float TIFF of 0-255": (encoded(Image.fromarray(np.full((8, 8), 200.0, np.float32), mode="F"), "TIFF"),
                                lambda image: abs(np.asarray(image).mean() - 200) < 1),
        "palette PNG": (encoded(Image.new("P", (8, 8), 0), "PNG"), lambda image: image.mode == "RGB"),
        "CMYK JPEG": (encoded(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", quality=100),
                      lambda image: np.asarray(image)[..., 0].mean() < 10),
        "grey + alpha PNG": (encoded(Image.new("LA", (8, 8), (100, 128)), "PNG"),
                             lambda image: abs(np.asarray(image).mean() - 100) < 1),
    }
    paths = {"reference path": lambda value: decode_image(value),
             "fast path": lambda value: decode_reduced(open_image(value), 1, "RGB")[0]}
    for name, (data, check) in cases.items():
        for path, decode in paths.items():
            for source, value in (("parquet bytes", {"bytes": data, "path": None}), ("binary column", data)):
                if path == "fast path" and source == "binary column":
                    continue  # the fast path reads a binary column as a parquet-bytes entry: the case above
                tally.bad_inputs += 1
                tally.case(f"{name} from {source}, {path}", check(decode(value)))


def references_for(work: Path) -> dict[str, Path]:
    """One uninterrupted run of each script, every checkpoint kept."""
    references = {}
    for script, args in SCRIPTS.items():
        folder = work / f"uninterrupted-{script}"
        keep_all = ["--save_total_limit", "0"] if script != "finetune.py" else ["--save_total_limit", "10"]
        code, output = finish(script, folder, [*args, *keep_all])
        if code != 0:
            raise RuntimeError(f"the uninterrupted {script} run failed:\n{output[-2000:]}")
        references[script] = folder
    return references


def run_matrix(tally: Tally, work: Path, kills: int, rng: random.Random) -> None:
    """The cases, the newest kinds of evidence first (a run cut short by the caller still holds them)."""
    image_cases(tally)
    converter_cases(tally, work)
    references = references_for(work)
    for script in ("train_tokenizer.py", "finetune.py"):
        row(tally, f"SIGKILL {script} during a save", kill_case, work, references, script, 0, None)
    row(tally, "SIGKILL train_tokenizer.py at a random step", kill_case, work, references, "train_tokenizer.py", 1,
        rng.randint(1, MAX_STEPS - 1))
    for index in range(kills):
        step = None if index % 2 else rng.randint(1, MAX_STEPS - 1)
        row(tally, f"SIGKILL pretrain.py #{index}", kill_case, work, references, "pretrain.py", index, step)
    row(tally, "a second run on the same --output_dir", second_run_case, work, references)
    for how in ("truncated", "bit-flipped"):
        row(tally, f"{how} newest checkpoint", damaged_newest_case, work, references, how)
    for script, names in PLANTED.items():
        for name in names:
            for with_checksums in (True, False):
                row(tally, f"{script}: pickle planted in {name}", planted_case, work, references, script, name,
                    with_checksums)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        row(tally, f"{signum.name} pretrain", signal_case, work, references, signum)


def stop_on_signal(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def main() -> None:
    global TIMEOUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=4, help="SIGKILLs of pretrain.py (half of them during a save)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds allowed to each script run")
    args = parser.parse_args()
    TIMEOUT = args.timeout
    tally, rng, started = Tally(), random.Random(args.seed), time.monotonic()
    signal.signal(signal.SIGTERM, stop_on_signal)  # stopped by a scheduler (or by hand): the totals so far
    signal.signal(signal.SIGINT, stop_on_signal)  # (a background job of a shell starts with SIGINT ignored)
    try:
        with tempfile.TemporaryDirectory(prefix="hf_mim-faults-") as folder:
            run_matrix(tally, Path(folder), args.kills, rng)
    except (Exception, KeyboardInterrupt) as error:  # the totals so far are still printed
        tally.case("the matrix itself", False, f"{type(error).__name__}: {error}")
    finally:
        end_all_children()
        print(f"\n{tally.totals()}; {(time.monotonic() - started) / 60:.1f} min wall", flush=True)
    sys.exit(1 if tally.wrong else 0)


if __name__ == "__main__":
    main()
