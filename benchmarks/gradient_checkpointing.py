"""What `--gradient_checkpointing` saves: the memory of one training step's activations on the CPU.

For each model (ViT-B/16 at 224 px: MAE pre-training, BEiT MIM) and each setting, a fresh process builds the
model, runs one warm-up step (the gradients are then allocated and kept), resets the process' peak resident
memory (/proc/self/clear_refs), and runs one more forward + backward: peak minus resident memory before that
step is the step's activation memory (what autograd keeps for backward, plus the backward's transients).
It also times that step and fingerprints the gradients (float64 sum and sum of squares per parameter):
checkpointing recomputes the same operations, so they must be equal.

    python benchmarks/gradient_checkpointing.py                    # batch 8, mae and beit
    python benchmarks/gradient_checkpointing.py --batch_size 4 --json out.json

Linux only (/proc). Figures: benchmarks/RESULTS.md, README "Training on a CPU".
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time

MODELS = ("mae", "beit")


def resident_kb(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in kB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def build(model_name: str, batch_size: int):
    """A ViT-B/16 pre-training model at its default config and one batch (fixed seeds)."""
    import torch

    from hf_mim.models import BEiTConfig, BEiTForMaskedImageModeling, MaeConfig, MaeForPreTraining

    torch.manual_seed(0)
    pixels = torch.randn(batch_size, 3, 224, 224)
    if model_name == "mae":
        return MaeForPreTraining(MaeConfig()), {"pixel_values": pixels, "noise": torch.rand(batch_size, 196)}
    config = BEiTConfig()
    masks = torch.rand(batch_size, 196).argsort(1) < 75  # 75 of 196 patches, BEiT's share
    labels = torch.randint(0, config.vocab_size, (batch_size, 196))
    return BEiTForMaskedImageModeling(config), {"pixel_values": pixels, "bool_masked_pos": masks, "labels": labels}


def measure(model_name: str, batch_size: int, checkpointing: bool) -> dict:
    """One setting, in this process (run it in a fresh one: the peak is the process')."""
    import torch

    torch.set_num_threads(1)
    model, batch = build(model_name, batch_size)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(**batch).loss.backward()  # warm-up: allocates the gradients
    model.zero_grad(set_to_none=False)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak resident memory to the current one
    before = resident_kb("VmRSS")
    start = time.perf_counter()
    model(**batch).loss.backward()
    seconds = time.perf_counter() - start
    peak = resident_kb("VmHWM")
    grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
    return {"model": model_name, "batch_size": batch_size, "gradient_checkpointing": checkpointing,
            "activation_mb": (peak - before) / 1024, "step_s": seconds,
            "grad_fingerprint": [[g.sum().item(), g.square().sum().item()] for g in grads]}


def in_fresh_process(model_name: str, batch_size: int, checkpointing: bool) -> dict:
    command = [sys.executable, __file__, "--_one", model_name, str(batch_size), str(int(checkpointing))]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--json", default=None)
    parser.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._one:
        name, batch_size, checkpointing = args._one
        print(json.dumps(measure(name, int(batch_size), checkpointing == "1")))
        return {}
    rows = []
    report = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "rows": rows}
    for name in args.models.split(","):
        plain, checkpointed = (in_fresh_process(name, args.batch_size, flag) for flag in (False, True))
        rows.append({"model": name, "batch_size": args.batch_size, "activation_mb": plain["activation_mb"],
                     "checkpointed_activation_mb": checkpointed["activation_mb"],
                     "saved_fraction": 1 - checkpointed["activation_mb"] / plain["activation_mb"],
                     "step_s": plain["step_s"], "checkpointed_step_s": checkpointed["step_s"],
                     "identical_gradients": plain["grad_fingerprint"] == checkpointed["grad_fingerprint"]})
        row = rows[-1]
        print(f"{name} ViT-B/16, batch {args.batch_size}: activations {row['activation_mb']:.0f} MB -> "
              f"{row['checkpointed_activation_mb']:.0f} MB with --gradient_checkpointing "
              f"({row['saved_fraction']:.0%} less); step {row['step_s']:.1f} s -> {row['checkpointed_step_s']:.1f} s; "
              f"identical gradients: {row['identical_gradients']}", flush=True)
        if args.json:  # after each model: a run stopped early keeps its finished rows
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
