"""Does the data-size rule (hf_mim.recipe) pay off? `examples/finetune.py`'s code from scratch
(--config_name mae-demo) on few CIFAR-10 labels, a short run, twice per seed: with the defaults in force
now (the data-size rule: layer decay 1, drop path 0, blr 4e-3, no RandAugment, no random erasing) and with
the paper's recipe they replaced (layer decay 0.75, drop path 0.1, blr 1e-3, RandAugment m9, erasing 0.25,
given explicitly: what the defaults were before). Everything else is the same (label smoothing, crop,
schedule, data, seed).

    python benchmarks/small_data_recipe.py                       # 1,000 labels, 100 steps, 2 seeds
    python benchmarks/small_data_recipe.py --seeds 0 --max_steps 20 --labels 256 --eval_images 256   # smoke

Prints top-1 on held-out CIFAR-10 test images per seed and recipe, and the mean difference.
Figures: RESULTS.md, "Defaults that fit the data".
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


from hf_mim.finetuning.run import main as finetune

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
# The paper's recipe that the data-size rule replaces, spelled out as a user would (explicit values win).
PAPER_RECIPE = ["--layer_decay", "0.75", "--drop_path", "0.1", "--blr", "1e-3", "--aa", "rand-m9-mstd0.5-inc1",
                "--reprob", "0.25"]


def run(recipe: list[str], seed: int, args, output_dir: Path) -> dict:
    argv = ["--train_file", str(args.data / "train.parquet"), "--validation_file", str(args.data / "test.parquet"),
            "--config_name", "mae-demo", "--max_train_samples", str(args.labels), "--max_eval_samples",
            str(args.eval_images), "--max_steps", str(args.max_steps), "--seed", str(seed), "--output_dir",
            str(output_dir), "--eval_strategy", "no", "--save_strategy", "no", "--dataloader_num_workers", "0",
            "--report_to", "none", *recipe]
    start = time.perf_counter()
    metrics = finetune(argv)
    return {"top1": metrics["eval_top1"], "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=CIFAR, help="folder of train.parquet and test.parquet")
    parser.add_argument("--labels", type=int, default=1000, help="labelled training images")
    parser.add_argument("--eval_images", type=int, default=2000, help="held-out test images")
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name, recipe in (("defaults (data-size rule)", []), ("paper recipe (old defaults)", PAPER_RECIPE)):
                result = run(recipe, seed, args, Path(folder) / f"{seed}-{len(recipe)}")
                rows.append({"seed": seed, "recipe": name, **result})
                print(f"seed {seed} {name}: top-1 {result['top1']:.4f} ({result['seconds']:.0f} s)", flush=True)
    means = {name: statistics.mean(r["top1"] for r in rows if r["recipe"] == name)
             for name in dict.fromkeys(r["recipe"] for r in rows)}
    print("mean top-1: " + ", ".join(f"{name} {value:.4f}" for name, value in means.items()))
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "mean_top1": means}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
