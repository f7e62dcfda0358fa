"""How long each task of the README's "one command each" table takes with its demo defaults.

    python benchmarks/demo_times.py [--json out.json]

Runs the README's commands in order, as a user would, in a fresh working folder (so `outputs/` starts
empty): pre-training, a VQ-KD tokenizer on the pre-trained MAE, fine-tuning, probing, segmentation from the
MAE, and a timm export. Each command runs in its own process; a failure stops the sequence and is reported.
`publish.py` is not timed: it needs a Hub to upload to.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded from a file path (the tests)
from throughput import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MAE = "outputs/pretrain-mae"
TASKS = [  # (task, argv after the interpreter): the README's commands
    ("pre-train an encoder", [str(EXAMPLES / "pretrain.py")]),
    ("train a visual tokenizer", [str(EXAMPLES / "train_tokenizer.py"), "--method", "vqkd", "--teacher", MAE]),
    ("fine-tune a classifier", [str(EXAMPLES / "finetune.py"), "--model_name_or_path", MAE]),
    ("probe frozen features", [str(EXAMPLES / "probe.py"), "--model_name_or_path", MAE]),
    ("segment", [str(EXAMPLES / "segment.py"), "--model_name_or_path", MAE]),
    ("export", ["-m", "hf_mim.export", "timm", MAE, "out/timm-mae"]),
]


def run(argv: list[str], cwd: Path) -> tuple[float, int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode, (done.stdout + done.stderr)[-2000:]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for task, command in TASKS:
            seconds, code, tail = run(command, Path(folder))
            rows.append({"task": task, "seconds": round(seconds, 1), "exit_code": code})
            print(f"{task}: {seconds:.1f} s (exit {code})", flush=True)
            if code != 0:
                print(tail)
                break
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": cpu_name(), "load_average": os.getloadavg(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if all(row["exit_code"] == 0 for row in main()["rows"]) else 1)
