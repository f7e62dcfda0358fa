"""The GPU check's FSDP2 step: examples/pretrain.py under `accelerate launch` with the shipped fsdp.yaml
(FSDP2) on the GPUs of this machine, a sharded checkpoint (torch.distributed.checkpoint) written at step 2,
and a second run resumed from it that must end with the uninterrupted run's weights.

    python benchmarks/fsdp_check.py OUT [--processes N] [--steps 4]

Writes OUT/fsdp_check.json (one row: passed, the checks, the seconds, the error tail of a failed run),
whatever happens. Runs on GPUs only: on a CPU the scripts refuse the FSDP config (hf_mim.distributed),
which `--expect_refusal` checks instead (a rehearsal of this script without a GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "accelerate_configs" / "fsdp.yaml"
TRAINING = ["--method", "mae", "--max_train_samples", "256", "--per_device_train_batch_size", "16",
            "--logging_steps", "1", "--report_to", "none", "--do_eval", "false", "--dataloader_num_workers", "2"]


def launch(processes: int, port: int, output_dir: Path, *extra: str, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
               "--num_processes", str(processes), "--main_process_port", str(port), "--mixed_precision", "no",
               str(ROOT / "examples" / "pretrain.py"), "--output_dir", str(output_dir), *TRAINING, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def relative_difference(got: Path, expected: Path) -> float:
    """The largest relative L2 difference over the saved tensors."""
    from safetensors.torch import load_file

    a, b = load_file(got), load_file(expected)
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-12)) for k in b)


def check(args, work: Path) -> dict:
    row: dict = {"check": "fsdp2_sharded_save_and_resume", "processes": args.processes, "steps": args.steps}
    start = time.perf_counter()
    full, resumed = work / "full", work / "resumed"
    first = launch(args.processes, 29511, full, "--max_steps", str(args.steps), "--checkpointing_steps", "2",
                   timeout=args.timeout)
    row["uninterrupted_seconds"] = round(time.perf_counter() - start, 1)
    if args.expect_refusal:
        row["passed"] = first.returncode != 0 and "Refusing to train unsharded" in first.stderr
        row["refusal"] = next((line.strip() for line in first.stderr.splitlines() if "Refusing" in line), None)
        return row
    if first.returncode != 0:
        return {**row, "passed": False, "error": first.stderr[-3000:]}
    checkpoint = full / "checkpoint-2"
    row["sharded_files"] = sorted(str(path.relative_to(checkpoint)) for path in checkpoint.rglob("*.distcp"))
    start = time.perf_counter()
    second = launch(args.processes, 29512, resumed, "--max_steps", str(args.steps), "--checkpointing_steps", "2",
                    "--resume_from_checkpoint", str(checkpoint), timeout=args.timeout)
    row["resumed_seconds"] = round(time.perf_counter() - start, 1)
    if second.returncode != 0:
        return {**row, "passed": False, "error": second.stderr[-3000:]}
    row["resumed_vs_uninterrupted_relative_l2"] = relative_difference(resumed / "model.safetensors",
                                                                      full / "model.safetensors")
    row["passed"] = bool(row["sharded_files"]) and row["resumed_vs_uninterrupted_relative_l2"] < 1e-4
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--processes", type=int, default=1, help="GPUs to shard over (1 shards over one: FSDP2 "
                        "still runs its all-gather / reduce-scatter path and writes sharded checkpoints)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=240, help="seconds per run")
    parser.add_argument("--expect_refusal", action="store_true", help="no GPU: check that the config is refused")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        try:
            row = check(args, Path(work))
        except Exception as error:  # a timeout, a missing package: still a row
            row = {"check": "fsdp2_sharded_save_and_resume", "passed": False, "error": repr(error)[-3000:]}
    (args.out / "fsdp_check.json").write_text(json.dumps(row, indent=2))
    print(json.dumps(row))
    sys.exit(0 if row["passed"] else 1)


if __name__ == "__main__":
    main()
