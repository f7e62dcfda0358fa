"""Does MAE pre-training pay off? CIFAR-10 with few labels, pre-trained vs random init (issue 16, part 6).

1. MAE pre-training (`hf_mim.pretraining`, the code of examples/pretrain.py) on the unlabelled
   training images, one run whose checkpoints give every pre-training length of the sweep;
2. per seed (the labelled subset, the head's init, the order) and per length L: fine-tuning
   (`hf_mim.finetuning`, examples/finetune.py's code) on `--labels` labelled images, S steps, and a
   linear probe + k-NN of the frozen encoder (`hf_mim.finetuning.probe`);
3. random init with the same recipe, at equal fine-tuning steps (S) and at equal total compute:
   S + L x (pre-training FLOPs per step / fine-tuning FLOPs per step) steps, the FLOPs of one training
   step (forward + backward) counted by `torch.utils.flop_counter` on the real models and batch sizes;
4. top-1 on held-out test images (test.parquet, never trained on); each row is appended to
   OUTPUT_DIR/rows.jsonl as it completes, and a finished row is not run again.

    # CPU: 64-wide ViT, 32 px, patch 4, lengths 0 / 250 / 1000, 1,000 labels, 2 seeds (RESULTS.md)
    OMP_NUM_THREADS=1 python benchmarks/pretraining_pays.py --output_dir outputs/pays
    # the same rows in processes sharing --output_dir: give each its own rows (a row already in rows.jsonl
    # is skipped, one being run elsewhere is not); --only pretrained reuses a running run's checkpoints
    python benchmarks/pretraining_pays.py --output_dir outputs/pays --only pretrained --seeds 0 &
    python benchmarks/pretraining_pays.py --output_dir outputs/pays --only random --seeds 0 &
    python benchmarks/pretraining_pays.py --output_dir outputs/pays --only random --seeds 1 &
    python benchmarks/pretraining_pays.py --output_dir outputs/pays --only random --seeds 1 --pretrain_steps 1000
    python benchmarks/pretraining_pays.py --output_dir outputs/pays --only report --json pays.json
    # larger, for a GPU (not run yet)
    python benchmarks/pretraining_pays.py --preset mae-demo --pretrain_steps 0,1000,5000,20000 \\
        --pretrain_batch_size 256 --finetune_steps 2000 --labels 2500 --seeds 0,1,2 --output_dir outputs/pays-gpu

The pre-training sweep is one run at a constant learning rate after warm-up, so the run's
checkpoint at step L is exactly an L-step run: MAE's cosine decay would make each length its own run
(`--schedule cosine` does that: the lengths' sum in steps). Figures: RESULTS.md, "Pre-training pays".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from hf_mim import MaeConfig, MaeForImageClassification, MaeForPreTraining
from hf_mim.finetuning.probe import main as probe
from hf_mim.finetuning.run import main as finetune
from hf_mim.models.configuration_mae import PRESETS
from hf_mim.pretraining import main as pretrain

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
# 64 wide, 4 blocks, patch 4 on 32 px (64 tokens); a 1-block decoder (MAE: depth 1 fine-tunes as well as 8).
ARCHITECTURES = {
    "tiny": dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=256, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                 decoder_num_attention_heads=2, decoder_intermediate_size=128),
    "micro": dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                  decoder_num_attention_heads=2, decoder_intermediate_size=32),  # the smoke test's
    "mae-demo": PRESETS["mae-demo"],
}
NUM_CLASSES = 10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train_file", default=str(CIFAR / "train.parquet"), help="unlabelled pool and labels")
    parser.add_argument("--test_file", default=str(CIFAR / "test.parquet"), help="held-out images (top-1)")
    parser.add_argument("--preset", default="tiny", choices=sorted(ARCHITECTURES))
    parser.add_argument("--pretrain_steps", default="0,250,1000", help="the sweep of pre-training lengths")
    parser.add_argument("--pretrain_batch_size", type=int, default=64)
    parser.add_argument("--pretrain_base_lr", type=float, default=6e-3,
                        help="x batch / 256 (MAE's 1.5e-4 is ImageNet's for 800 epochs; see README)")
    parser.add_argument("--pretrain_warmup", type=int, default=100)
    parser.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                        help="constant: one run, its checkpoints are the lengths; cosine: one run per length")
    parser.add_argument("--max_pretrain_samples", type=int, help="pre-train on only this many images")
    parser.add_argument("--labels", type=int, default=1000, help="labelled training images per seed")
    parser.add_argument("--finetune_steps", type=int, default=150, help="S: fine-tuning steps of every start")
    parser.add_argument("--finetune_batch_size", type=int, default=64)
    parser.add_argument("--finetune_base_lr", type=float, default=4e-3, help="x batch / 256, both starts")
    parser.add_argument("--layer_decay", type=float, default=0.75, help="pre-trained starts (random init: 1.0)")
    parser.add_argument("--eval_samples", type=int, default=2000, help="test images scored")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--only", default="all", choices=["all", "pretrained", "random", "report"],
                        help="run only one side's rows (several processes share --output_dir); report: none, "
                             "the table of the rows so far")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu"], help="auto: a GPU when there is one")
    parser.add_argument("--output_dir", required=True, help="runs, checkpoints and rows.jsonl")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)
    args.lengths = sorted({int(step) for step in args.pretrain_steps.split(",")})
    args.seed_list = [int(seed) for seed in args.seeds.split(",")]
    if args.lengths[0] < 0:
        parser.error("--pretrain_steps must be >= 0.")
    return args


# ---------------------------------------------------------------------------------------------
# Compute: FLOPs of one training step
# ---------------------------------------------------------------------------------------------

def step_flops(model: torch.nn.Module, batch_size: int, **inputs) -> int:
    """FLOPs of one forward + backward on a batch of `batch_size` images (the optimizer's are negligible)."""
    config = model.config
    pixels = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size)
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=pixels, **inputs).loss.backward()
    return counter.get_total_flops()


def training_flops(config: MaeConfig, args) -> dict[str, int]:
    pretraining = step_flops(MaeForPreTraining(config), args.pretrain_batch_size)
    classifier = MaeForImageClassification(MaeConfig(**config.to_dict(), num_labels=NUM_CLASSES))
    labels = torch.zeros(args.finetune_batch_size, dtype=torch.long)
    return {"pretrain_step": pretraining, "finetune_step": step_flops(classifier, args.finetune_batch_size,
                                                                        labels=labels)}


def equal_compute_steps(length: int, flops: dict[str, int], finetune_steps: int) -> int:
    """Fine-tuning steps of a random start that cost what L pre-training + S fine-tuning steps cost."""
    return finetune_steps + round(length * flops["pretrain_step"] / flops["finetune_step"])


# ---------------------------------------------------------------------------------------------
# Pre-training: one model folder per length
# ---------------------------------------------------------------------------------------------

def cpu_argv(args) -> list[str]:
    """fine-tuning's and probing's switch to the CPU (pre-training takes ACCELERATE_USE_CPU)."""
    return ["--use_cpu", "true"] if args.device == "cpu" else []


def pretrain_run(args, config_dir: Path, folder: Path, steps: int, checkpoint_every: int) -> None:
    argv = ["--train_file", args.train_file, "--config_name", str(config_dir), "--output_dir", str(folder),
            "--max_steps", str(steps), "--per_device_train_batch_size", str(args.pretrain_batch_size),
            "--base_learning_rate", str(args.pretrain_base_lr), "--norm_pix_loss",
            "--warmup_steps", str(min(args.pretrain_warmup, steps // 2)), "--train_val_split", "0",
            "--checkpointing_steps", str(checkpoint_every), "--save_total_limit", "0", "--report_to", "none",
            "--lr_scheduler_type", "constant_with_warmup" if args.schedule == "constant" else "cosine"]
    if args.max_pretrain_samples:
        argv += ["--max_train_samples", str(args.max_pretrain_samples)]
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    pretrain(argv)


def checkpoint_as_model(run: Path, step: int, config_dir: Path, target: Path) -> None:
    """checkpoint-<step> holds the weights only: a model folder with the architecture's config (and the
    run's image processor once the run has finished; without it fine-tuning normalises alike, ImageNet's)."""
    model = MaeForPreTraining(MaeConfig.from_pretrained(config_dir, norm_pix_loss=True))
    model.load_state_dict(load_file(run / f"checkpoint-{step}" / "model.safetensors"))
    model.save_pretrained(target)
    if (run / "preprocessor_config.json").is_file():
        shutil.copy(run / "preprocessor_config.json", target)


def pretrained_models(args, config_dir: Path) -> dict[int, Path]:
    """Length -> an MAE model folder pre-trained that many steps (built once; with --schedule constant a
    run whose checkpoints hold every length, even one still running in another process, is reused)."""
    root = Path(args.output_dir) / "pretraining"
    lengths = [length for length in args.lengths if length > 0]
    models = {length: root / f"mae-{length}" for length in lengths}
    if all((path / "config.json").is_file() for path in models.values()):
        return models
    if args.schedule == "cosine":
        for length in lengths:
            pretrain_run(args, config_dir, models[length], length, 10 * length)
        return models
    run = root / "run"
    if not all((run / f"checkpoint-{length}" / "model.safetensors").is_file() for length in lengths):
        pretrain_run(args, config_dir, run, lengths[-1], math.gcd(*lengths))
    for length in lengths:
        if not (models[length] / "config.json").is_file():
            checkpoint_as_model(run, length, config_dir, models[length])
    return models


# ---------------------------------------------------------------------------------------------
# Fine-tuning and probing rows
# ---------------------------------------------------------------------------------------------

def finetune_top1(args, start: list[str], seed: int, steps: int, layer_decay: float, folder: Path) -> float:
    argv = ["--train_file", args.train_file, "--validation_file", args.test_file,
            "--max_train_samples", str(args.labels), "--max_eval_samples", str(args.eval_samples),
            "--seed", str(seed), "--max_steps", str(steps), "--per_device_train_batch_size",
            str(args.finetune_batch_size), "--base_learning_rate", str(args.finetune_base_lr),
            "--layer_decay", str(layer_decay), "--drop_path", "0.1", "--warmup_steps", "0.1",
            # RandAugment off, as in the rows of RESULTS.md (chosen when timm's 0-bit posterize still crashed
            # under Pillow 13; finetuning.transforms.posterize_any_bits has fixed that since)
            "--aa", "none", "--reprob", "0.25", "--crop_min_scale", "0.35", "--crop_pct", "1.0",
            "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--dataloader_num_workers", "0", "--logging_steps", str(max(1, steps // 4)), "--output_dir", str(folder),
            *cpu_argv(args), *start]
    return round(finetune(argv)["eval_top1"], 4)


def probe_scores(args, start: list[str], seed: int, folder: Path) -> dict[str, float]:
    argv = ["--train_file", args.train_file, "--validation_file", args.test_file,
            "--max_train_samples", str(args.labels), "--max_eval_samples", str(args.eval_samples),
            "--seed", str(seed), "--pooling", "mean", "--crop_pct", "1.0", "--dataloader_num_workers", "0",
            "--output_dir", str(folder), *cpu_argv(args), *start]
    results = probe(argv)
    return {key: round(results[key], 4) for key in ("linear_top1", "knn_top1")}


class Rows:
    """rows.jsonl in the output folder: one JSON object per finished run, appended at once."""

    def __init__(self, folder: Path):
        self.path = folder / "rows.jsonl"
        folder.mkdir(parents=True, exist_ok=True)

    def all(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def has(self, key: dict) -> bool:
        return any(all(row.get(name) == value for name, value in key.items()) for row in self.all())

    def add(self, row: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"row: {row}", flush=True)


def run_rows(key: dict, rows: Rows, score) -> None:
    if not rows.has(key):
        rows.add({**key, **score()})


def pretrained_side(args, config_dir: Path, rows: Rows) -> None:
    models = pretrained_models(args, config_dir)
    runs = Path(args.output_dir) / "runs"
    for seed in args.seed_list:
        for length, model in models.items():
            start = ["--model_name_or_path", str(model)]
            run_rows({"kind": "finetune", "start": "pretrained", "pretrain_steps": length, "seed": seed,
                      "finetune_steps": args.finetune_steps}, rows,
                     lambda: {"top1": finetune_top1(args, start, seed, args.finetune_steps, args.layer_decay,
                                                    runs / f"ft-pre{length}-s{seed}")})
            run_rows({"kind": "probe", "start": "pretrained", "pretrain_steps": length, "seed": seed}, rows,
                     lambda: probe_scores(args, start, seed, runs / f"probe-pre{length}-s{seed}"))


def random_side(args, config_dir: Path, flops: dict[str, int], rows: Rows) -> None:
    runs, start = Path(args.output_dir) / "runs", ["--config_name", str(config_dir)]
    for seed in args.seed_list:
        run_rows({"kind": "probe", "start": "random", "pretrain_steps": 0, "seed": seed}, rows,
                 lambda: probe_scores(args, start, seed, runs / f"probe-random-s{seed}"))
        # equal steps first (L = 0), then equal compute for each length, cheapest first
        for steps in sorted({equal_compute_steps(length, flops, args.finetune_steps) for length in args.lengths}):
            run_rows({"kind": "finetune", "start": "random", "seed": seed, "finetune_steps": steps}, rows,
                     lambda: {"top1": finetune_top1(args, start, seed, steps, 1.0, runs / f"ft-random{steps}-s{seed}")})


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------

def mean_of(rows: list[dict], metric: str, **key) -> float | None:
    values = [row[metric] for row in rows if all(row.get(name) == value for name, value in key.items())]
    return round(statistics.fmean(values), 4) if values else None


def paired_gain(rows: list[dict], start: dict, random_steps: int) -> float | None:
    """Mean over the seeds that have both runs of top-1 (start) - top-1 (random init, `random_steps`)."""
    def top1_by_seed(**key):
        return {row["seed"]: row["top1"] for row in rows
                if row["kind"] == "finetune" and all(row.get(name) == value for name, value in key.items())}

    ours, random = top1_by_seed(**start), top1_by_seed(start="random", finetune_steps=random_steps)
    gains = [ours[seed] - random[seed] for seed in ours.keys() & random.keys()]
    return round(statistics.fmean(gains), 4) if gains else None


def pretraining_losses(args, length: int) -> float | None:
    """The MAE loss at step L (mean of the run's last 5 logged values up to L): still falling or not."""
    log = Path(args.output_dir) / "pretraining" / "run" / "log.jsonl"
    if not length or not log.is_file():
        return None
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    losses = [entry["loss"] for entry in entries if "loss" in entry and entry.get("step", 0) <= length]
    return round(statistics.fmean(losses[-5:]), 4) if losses else None


def summarise(args, flops: dict[str, int]) -> dict:
    rows = Rows(Path(args.output_dir)).all()
    table = []
    for length in args.lengths:
        compute_steps = equal_compute_steps(length, flops, args.finetune_steps)
        start = ({"start": "pretrained", "pretrain_steps": length} if length else {"start": "random"})
        start = {**start, "finetune_steps": args.finetune_steps}
        pre = mean_of(rows, "top1", kind="finetune", **start)
        same_steps = mean_of(rows, "top1", kind="finetune", start="random", finetune_steps=args.finetune_steps)
        same_compute = mean_of(rows, "top1", kind="finetune", start="random", finetune_steps=compute_steps)
        probe_key = {key: value for key, value in start.items() if key != "finetune_steps"}
        table.append({
            "pretrain_steps": length, "mae_loss": pretraining_losses(args, length),
            "equal_compute_random_steps": compute_steps,
            "total_tflops": round((length * flops["pretrain_step"] + args.finetune_steps * flops["finetune_step"])
                                  / 1e12, 2),
            "pretrained_top1": pre, "random_equal_steps_top1": same_steps, "random_equal_compute_top1": same_compute,
            "gain_equal_steps": paired_gain(rows, start, args.finetune_steps),
            "gain_equal_compute": paired_gain(rows, start, compute_steps),
            "linear_top1": mean_of(rows, "linear_top1", kind="probe", **probe_key),
            "knn_top1": mean_of(rows, "knn_top1", kind="probe", **probe_key),
            "seeds": sorted({row["seed"] for row in rows if row["kind"] == "finetune"
                             and all(row.get(name) == value for name, value in start.items())}),
        })
    wins = [row["pretrain_steps"] for row in table if row["pretrain_steps"] and (row["gain_equal_compute"] or 0) > 0]
    return {"settings": {key: value for key, value in vars(args).items() if key != "seed_list"},
            "flops_per_step": flops, "table": table, "rows": rows,
            "first_winning_length_equal_compute": wins[0] if wins else None}


def print_table(summary: dict) -> None:
    print("L (pre-train steps) | MAE loss | TFLOPs | FT top-1 | random, equal steps | random, equal compute (steps) | "
          "gain equal steps | gain equal compute | linear | k-NN | seeds")
    for row in summary["table"]:
        print(" | ".join(str(value) for value in (
            row["pretrain_steps"], row["mae_loss"], row["total_tflops"], row["pretrained_top1"], row["random_equal_steps_top1"],
            f"{row['random_equal_compute_top1']} ({row['equal_compute_random_steps']})", row["gain_equal_steps"],
            row["gain_equal_compute"], row["linear_top1"], row["knn_top1"], row["seeds"])))


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    folder = Path(args.output_dir)
    config_dir = folder / "config"
    MaeConfig(**ARCHITECTURES[args.preset]).save_pretrained(config_dir)
    flops = training_flops(MaeConfig.from_pretrained(config_dir), args)
    rows = Rows(folder)
    if args.only in ("all", "random"):
        random_side(args, config_dir, flops, rows)
    if args.only in ("all", "pretrained"):
        pretrained_side(args, config_dir, rows)
    summary = summarise(args, flops)
    print_table(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
