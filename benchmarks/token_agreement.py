"""How many BEiT targets each tokenizer precision changes: the fraction of tokens equal to their fp32
value (`FrozenTokenizer.token_agreement`), for the DALL-E-sized dVAE (BEiT v1) and the VQ-KD base
tokenizer (BEiT v2), random weights, on smooth random images (bicubic-upsampled 14x14 noise).

Each precision loads the tokenizer the way pretrain.py does (`load_frozen_tokenizer`), so "reference"
is what a run uses by default. fp32 is strict (TF32 off): the baseline of every row.

    python benchmarks/token_agreement.py --json OUT/token_agreement.json      # CUDA: DALL-E / ViT-B sizes
    python benchmarks/token_agreement.py --smoke --device cpu                 # tiny models, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_mim.launch import set_tf32
from hf_mim.models import DvaeConfig, DvaeTokenizer, VqkdConfig, VqkdTokenizer
from hf_mim.models.presets import from_preset
from hf_mim.pretraining.methods.token_targets import load_frozen_tokenizer

# name -> (builder of a random tokenizer, its input size in px), full size and smoke size
TOKENIZERS = {
    "dvae": (lambda: DvaeTokenizer(DvaeConfig(with_decoder=False, reference_fp16=True)), 112),
    "vqkd": (lambda: VqkdTokenizer(VqkdConfig(teacher_name_or_path=None)), 224),
}
SMOKE_TOKENIZERS = {
    "dvae": (lambda: DvaeTokenizer(DvaeConfig(vocab_size=64, hidden_size=8, num_groups=3, num_blocks_per_group=1,
                                              with_decoder=False, reference_fp16=True)), 32),
    "vqkd": (lambda: VqkdTokenizer(from_preset("vqkd-demo", "hf_mim_vqkd")), 32),
}
PRECISIONS = {"dvae": ("reference", "bf16", "fp16"), "vqkd": ("reference", "bf16")}


def smooth_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """[count, 3, size, size] in [0, 1]: photo-like low-frequency content, not white noise."""
    coarse = torch.rand(count, 3, 14, 14, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def measure(name: str, build, size: int, images: int, batch: int, device: torch.device, folder: Path) -> list[dict]:
    torch.manual_seed(0)
    build().save_pretrained(folder / name)
    pixels = smooth_images(images, size).to(device)
    rows = []
    for precision in PRECISIONS[name]:
        tokenizer = load_frozen_tokenizer(str(folder / name), None, precision, {}).to(device)
        agreement = [tokenizer.token_agreement(chunk) for chunk in pixels.split(batch)]
        rows.append({"tokenizer": name, "asked": precision, "in_force": tokenizer.precision,
                     "agreement_with_fp32": sum(agreement) / len(agreement), "images": images})
        print(f"{name:5s} {precision:10s} ({tokenizer.precision}): {rows[-1]['agreement_with_fp32']:.4f} of the "
              "tokens equal to fp32", flush=True)
    return rows


def markdown(rows: list[dict], environment: dict) -> str:
    lines = [f"Token agreement with fp32 ({environment['device']}, {environment['date']}):", "",
             "| tokenizer | --tokenizer_precision | in force | tokens equal to fp32 |", "|---|---|---|---|"]
    lines += [f"| {r['tokenizer']} | {r['asked']} | {r['in_force']} | {r['agreement_with_fp32']:.4f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny tokenizers, 8 images")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--json", help="write the rows here (and a markdown table beside it)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    set_tf32(False)  # the fp32 baseline is true fp32
    tokenizers, images = (SMOKE_TOKENIZERS, 8) if args.smoke else (TOKENIZERS, args.images)
    with tempfile.TemporaryDirectory() as folder:
        rows = [row for name, (build, size) in tokenizers.items()
                for row in measure(name, build, size, images, args.batch_size, device, Path(folder))]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    environment = {"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__}
    report = {"environment": environment, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        Path(args.json).with_suffix(".md").write_text(markdown(rows, environment))
    return report


if __name__ == "__main__":
    main()
