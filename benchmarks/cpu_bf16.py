"""What `--bf16` costs on this CPU: one MAE training step (forward, backward, AdamW) in fp32 and under
bf16 autocast, the way the training loop runs it (`accelerator.autocast`), median of the timed steps.

    python benchmarks/cpu_bf16.py [--preset mae-demo] [--batch_size 64] [--steps 10] [--json out.json]

On a CPU without native bf16 (`avx512_bf16` / `amx_bf16` absent from /proc/cpuinfo) the bf16 matmuls are
emulated; `hf_mim.launch.warn_if_bf16_is_emulated` warns at the start of such a run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_mim import MaeForPreTraining
from hf_mim.launch import cpu_has_native_bf16
from hf_mim.models.presets import from_preset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded from a file path (the tests)
from throughput import environment  # noqa: E402


def step_seconds(model, optimizer, pixels, bf16: bool, steps: int) -> float:
    times = []
    for index in range(steps + 2):  # two untimed warm-up steps
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = model(pixel_values=pixels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mae-demo")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = from_preset(args.preset)
    model = MaeForPreTraining(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.randn(args.batch_size, config.num_channels, config.image_size, config.image_size)
    report = {"environment": environment(torch.device("cpu")), "preset": args.preset, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
              "fp32_s": step_seconds(model, optimizer, pixels, False, args.steps),
              "bf16_s": step_seconds(model, optimizer, pixels, True, args.steps)}
    report["bf16_over_fp32"] = report["bf16_s"] / report["fp32_s"]
    print(f"{args.preset}, batch {args.batch_size}, {report['threads']} thread(s), native bf16: "
          f"{report['native_bf16']}: fp32 {report['fp32_s']:.3f} s, bf16 autocast {report['bf16_s']:.3f} s per step "
          f"({report['bf16_over_fp32']:.1f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
