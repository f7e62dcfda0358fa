"""Input-pipeline throughput: can the host feed the model?

1. `host`: images/s per CPU core of each method's training example on ImageNet-like JPEG files
   (500x375 and 375x500, quality 90, photo-like texture) that this script writes itself: the
   reference path (`--data_pipeline reference`: decode, torchvision on PIL, float32 tensors), the
   fast path's host part (what a data-loader worker does: header, draws, reduced decode, uint8 box,
   padded batch), the same with device decoding (`--jpeg_decoding device`: header, draws, the file's
   bytes; no decoding in the worker), and the device part (batched resize/flip/jitter/normalise, timed
   on the device given), and a plain torchvision v2 pipeline (RandomResizedCrop + flip + normalise on
   PIL) in the same process. One thread, one process: the figures are per core. Device decoding moves
   the decode into the training process: `decode` times it there (decode_jpeg of a batch on the device
   given: nvJPEG on CUDA; on a CPU it is libjpeg-turbo, CPU time the training process pays) and
   measures its pixels' difference to Pillow's decoding (`decode_agreement`, uint8 levels).
2. `e2e`: training images/s of `examples/pretrain.py`'s loop reading the JPEG folder with its real
   loader (fast path, default workers; each `--jpeg_decodings` choice), against the same model and
   optimiser stepping on one synthetic batch already on the device (model only). Target: e2e >= 90% of
   model only. The report is written after each e2e row (`"complete": false` until the last).

    python benchmarks/data_pipeline.py                                  # CPU: host figures + a small e2e model
    python benchmarks/data_pipeline.py --sections e2e --preset gpu      # on a GPU: ViT-B/16, batch 256, bf16
    python benchmarks/data_pipeline.py --smoke --json out.json          # seconds: every code path, tiny
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from hf_mim.data import ImageExamples
from hf_mim.device_decoding import decode_files
from hf_mim.fast_data import FastImageExamples, collate
from hf_mim.launch import set_tf32
from hf_mim.models import DvaeConfig, DvaeTokenizer, PecoConfig, PecoTokenizer, VqkdConfig, VqkdTokenizer
from hf_mim.pretraining import get_method, main as pretrain_main, parse_args
from hf_mim.training.optimization import build_optimizer
from hf_mim.training.tracking import LOG_FILE, read_log

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded from a file path (the tests)
from data_pipeline_tables import markdown  # noqa: E402

METHODS = ("mae", "beit", "beitv2", "peco", "vit_mpp")
# A ViT small enough to train on a CPU, at the recipes' 224 px / patch 16 (the data path's real sizes).
CPU_MODEL = "hidden_size=192,num_hidden_layers=4,num_attention_heads=3,intermediate_size=768"
SMALL_MAE_DECODER = ("decoder_hidden_size=128,decoder_num_hidden_layers=2,decoder_num_attention_heads=4,"
                     "decoder_intermediate_size=256")


@dataclass(frozen=True)
class Preset:
    image_size: int
    model_overrides: str | None  # None: the method's -base preset (ViT-B/16)
    batch_size: int
    e2e_steps: int
    logging_steps: int
    bf16: bool


PRESETS = {
    "cpu": Preset(224, CPU_MODEL, 16, 24, 4, bf16=False),
    "gpu": Preset(224, None, 256, 60, 10, bf16=True),
    "smoke": Preset(32, "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64",
                    2, 3, 1, bf16=False),
}


# ---------------------------------------------------------------------------------------------
# Inputs: JPEG files and tiny tokenizers (the tokenizer's network is not what is measured here)
# ---------------------------------------------------------------------------------------------


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields at several scales plus grain: JPEG sizes and decode times like photos'."""
    pixels = np.full((height, width, 3), 128.0, dtype=np.float32)
    for cells, amplitude in ((3, 70), (12, 40), (48, 25), (160, 15)):
        field = rng.uniform(-amplitude, amplitude, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        pixels += np.stack([np.asarray(Image.fromarray(field[..., c]).resize((width, height), Image.BICUBIC))
                            for c in range(3)], axis=-1)
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_jpeg(path: str, width: int, height: int, seed: int) -> str:
    photo_like(np.random.default_rng(seed), width, height).save(path, format="JPEG", quality=90)
    return path


def make_jpegs(folder: Path, count: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[str]:
    """`count` JPEG files, 3 of 4 landscape `size`, 1 of 4 portrait, in `folder/class0` (written in parallel)."""
    (folder / "class0").mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / "class0" / f"{index:05d}.jpg"), *(size if index % 4 else size[::-1]), seed * 1_000_003 + index)
            for index in range(count)]
    with ProcessPoolExecutor(max_workers=min(len(os.sched_getaffinity(0)), 16)) as pool:
        return list(pool.map(write_jpeg, *zip(*jobs)))


def save_tokenizers(folder: Path, image_size: int) -> dict[str, str]:
    """Tiny random tokenizers whose token grid is the patch grid (image_size / 16)."""
    grid_factor = 16 if image_size >= 64 else 4
    patch = 16 if image_size >= 64 else 4
    built = {
        "beit": DvaeTokenizer(DvaeConfig(hidden_size=8, vocab_size=64, num_groups=4 if patch == 16 else 3,
                                         num_blocks_per_group=1, with_decoder=False, reference_fp16=False)),
        "beitv2": VqkdTokenizer(VqkdConfig(image_size=image_size, patch_size=patch, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=32, decoder_hidden_size=16,
                                           decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                           decoder_intermediate_size=32, code_dim=8, num_codes=64, teacher_dim=8,
                                           teacher_name_or_path=None, teacher_type="auto")),
        "peco": PecoTokenizer(PecoConfig(image_size=image_size, downsample_factor=grid_factor, hidden_size=8,
                                         num_res_blocks=1, norm_num_groups=4, code_dim=8, num_codes=64)),
    }
    paths = {}
    for name, tokenizer in built.items():
        tokenizer.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


def method_arguments(name: str, preset: Preset, tokenizers: dict[str, str]) -> list[str]:
    arguments = ["--method", name, "--config_name", f"{name}-base", "--image_size", str(preset.image_size)]
    if preset.image_size < 64:
        arguments += ["--patch_size", "4"]
    if preset.model_overrides:
        overrides = preset.model_overrides + ("," + SMALL_MAE_DECODER if name == "mae" else "")
        layers = int(preset.model_overrides.split("num_hidden_layers=")[1].split(",")[0])
        overrides += f",cls_head_early_layer={max(1, layers - 1)}" if name == "beitv2" else ""
        arguments += ["--config_overrides", overrides]
    return arguments + (["--tokenizer", tokenizers[name]] if name in tokenizers else [])


def build_method(name: str, preset: Preset, tokenizers: dict[str, str]):
    method = get_method(name)(parse_args(method_arguments(name, preset, tokenizers)))
    model = method.build_model(f"{name}-base")
    return method, model, method.build_image_processor()


# ---------------------------------------------------------------------------------------------
# 1. Host cost per example
# ---------------------------------------------------------------------------------------------


def path_dataset(paths: list[str]) -> datasets.Dataset:
    """What load_image_datasets gives for a folder: undecoded image entries holding the path."""
    entries = [{"path": path, "bytes": None} for path in paths]
    return datasets.Dataset.from_dict({"image": entries},
                                      features=datasets.Features({"image": datasets.Image(decode=False)}))


def seconds_per_image(runs: dict, count: int, batch_size: int, repeats: int) -> dict[str, float]:
    """Median seconds per image of each `runs[name](start)` (one batch from image `start`), timed in
    blocks of one pass over the `count` images, the names alternating (a, b, b, a, ...) so that the
    load of a shared machine hits all alike."""
    blocks = {name: [] for name in runs}
    for repeat in range(repeats):
        for name in (list(runs) if repeat % 2 == 0 else list(reversed(runs))):
            start_time = time.perf_counter()
            for start in range(0, count, batch_size):
                runs[name](start)
            blocks[name].append((time.perf_counter() - start_time) / (math.ceil(count / batch_size) * batch_size))
    return {name: statistics.median(times) for name, times in blocks.items()}


def host_figures(name: str, preset: Preset, tokenizers: dict, paths: list[str], batch_size: int, repeats: int,
                 device: torch.device) -> dict:
    method, _, processor = build_method(name, preset, tokenizers)
    dataset = path_dataset(paths)
    reference = ImageExamples(dataset, "image", method.train_transform(processor), image_mode=method.image_mode)
    fast = FastImageExamples(dataset, "image", method.fast_views(processor), image_mode=method.image_mode)
    encoded = FastImageExamples(dataset, "image", method.fast_views(processor), image_mode=method.image_mode,
                                device_decoding=True)
    count = len(paths)

    def keys(start):
        return [((start + i) % count, 1000 + start + i) for i in range(batch_size)]

    batches = {s: to_device(collate([fast[k] for k in keys(s)]), device) for s in range(0, count, batch_size)}
    seconds = seconds_per_image({
        "reference": lambda s: default_collate([reference[k] for k in keys(s)]),
        "fast_host": lambda s: collate([fast[k] for k in keys(s)]),
        "fast_device_decoding_host": lambda s: collate([encoded[k] for k in keys(s)]),
        "fast_device": lambda s: synchronize(fast.device_views(dict(batches[s])), device),
    }, count, batch_size, repeats)
    return {"method": name, "reference_img_s": 1 / seconds["reference"], "fast_host_img_s": 1 / seconds["fast_host"],
            "fast_device_img_s": 1 / seconds["fast_device"], "host_speedup": seconds["reference"] / seconds["fast_host"],
            "device_decoding_host_img_s": 1 / seconds["fast_device_decoding_host"],
            "device_decoding_host_speedup": seconds["reference"] / seconds["fast_device_decoding_host"]}


def to_device(batch: dict, device: torch.device) -> dict:
    """As accelerate moves a batch: tensors to the device; the JPEG bytes (EncodedBatch) stay where they are."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


# JPEG kinds whose decoding on the device is compared with Pillow's (re-encoded from the script's files).
DECODE_VARIANTS = {"baseline 4:2:0": {}, "progressive": {"progressive": True}, "4:4:4": {"subsampling": 0},
                   "4:2:2": {"subsampling": 1}, "grey": {"grey": True}, "q95": {"quality": 95}}


def decode_figures(paths: list[str], batch_size: int, repeats: int, device: torch.device) -> dict:
    """The training process's part of device decoding: decode_jpeg of batches of the files on `device`
    (img/s; on a CPU, of one core), and how far its pixels are from Pillow's (uint8 levels) on the files
    and on a few re-encoded kinds (progressive, 4:4:4, 4:2:2, grey, quality 95)."""
    files = [Path(path).read_bytes() for path in paths]
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
    count = len(files)

    def batch(start):
        return synchronize(decode_files([tensors[(start + i) % count] for i in range(batch_size)], device), device)

    batch(0)  # nvJPEG's first call creates its decoder
    seconds = seconds_per_image({"decode": batch}, count, batch_size, repeats)["decode"]
    agreement = {"files": decode_agreement(files, device)}
    for name, options in DECODE_VARIANTS.items():
        agreement[name] = decode_agreement([reencoded(data, **options) for data in files[:8]], device)
    return {"decode_img_s": 1 / seconds, "decode_device": str(device), "decode_agreement": agreement["files"],
            "decode_agreement_by_kind": agreement}


def reencoded(data: bytes, grey: bool = False, **options) -> bytes:
    image = Image.open(io.BytesIO(data))
    buffer = io.BytesIO()
    (image.convert("L") if grey else image).save(buffer, format="JPEG", **{"quality": 90, **options})
    return buffer.getvalue()


def decode_agreement(files: list[bytes], device: torch.device) -> dict:
    """Max and mean |decode_files on `device` - Pillow's decoding| over the files, in uint8 levels."""
    decoded = decode_files([torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files], device)
    differences = [(image.cpu().int() - torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
                    .permute(2, 0, 1)).abs() for data, image in zip(files, decoded)]
    return {"max_levels": max(int(d.max()) for d in differences),
            "mean_levels": float(sum(d.float().mean() for d in differences) / len(differences))}


def synchronize(value, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value


def torchvision_plain_img_s(paths: list[str], image_size: int, batch_size: int, repeats: int) -> float:
    """The plain torchvision v2 pipeline a user would write: open, RandomResizedCrop, flip, to float, normalise."""
    transform = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(),
                            v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    count = len(paths)

    def batch(start):
        default_collate([transform(Image.open(paths[(start + i) % count]).convert("RGB")) for i in range(batch_size)])

    return 1 / seconds_per_image({"torchvision": batch}, count, batch_size, repeats)["torchvision"]


# ---------------------------------------------------------------------------------------------
# 2. End to end: the real loader vs synthetic batches
# ---------------------------------------------------------------------------------------------


def e2e_real_img_s(name: str, preset: Preset, tokenizers: dict, folder: Path, output: Path,
                   workers: int | None, pipeline: str, jpeg_decoding: str) -> dict:
    """examples/pretrain.py's loop on the JPEG folder: img/s and data wait of the windows after the first."""
    arguments = method_arguments(name, preset, tokenizers) + [
        "--train_dir", str(folder), "--output_dir", str(output / name), "--resume_from_checkpoint", "none",
        "--max_steps", str(preset.e2e_steps), "--per_device_train_batch_size", str(preset.batch_size),
        "--logging_steps", str(preset.logging_steps), "--report_to", "none", "--no-do_eval",
        "--checkpointing_steps", "no", "--train_val_split", "0", "--dataloader_persistent_workers",
        "--data_pipeline", pipeline, "--jpeg_decoding", jpeg_decoding,
    ]
    if workers is not None:
        arguments += ["--dataloader_num_workers", str(workers)]
    if preset.bf16 and torch.cuda.is_available():
        arguments += ["--bf16", "--tf32"]
    shutil.rmtree(output / name, ignore_errors=True)  # one run per decoding choice
    pretrain_main(arguments)
    log = str(output / name / LOG_FILE)
    speeds = read_log(log, "images_per_second")
    waits = read_log(log, "data_wait_fraction")
    later = sorted(speeds)[1:] or sorted(speeds)  # the first window starts the workers
    return {"e2e_img_s": statistics.median(speeds[s] for s in later),
            "data_wait_fraction": statistics.median(waits[s] for s in later)}


def model_only_img_s(name: str, preset: Preset, tokenizers: dict, folder: Path, device: torch.device) -> float:
    """The same model and optimiser stepping on one batch of the fast path already on the device."""
    method, model, processor = build_method(name, preset, tokenizers)
    model.to(device).train()
    if device.type == "cuda" and preset.bf16:  # as the e2e run's --tf32
        set_tf32(True)
    method.accelerator = None
    if hasattr(method, "tokenizer") and method.tokenizer is not None:
        method.tokenizer.to(device)
    optimizer = build_optimizer(model, 1e-4, 0.05, (0.9, 0.95), method.no_weight_decay_names,
                                fused=device.type == "cuda")
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))[: preset.batch_size]
    examples = FastImageExamples(path_dataset(paths), "image", method.fast_views(processor), method.image_mode)
    batch = collate([examples[(i, i)] for i in range(len(paths))])
    batch.pop("num_skipped")
    batch = examples.device_views({key: value.to(device) for key, value in batch.items()})
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=preset.bf16 and device.type == "cuda")

    def step():
        with autocast:
            loss = method.training_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(max(2, preset.e2e_steps // 10)):  # warm-up
        step()
    synchronize(None, device)
    start = time.perf_counter()
    for _ in range(preset.e2e_steps):
        step()
    synchronize(None, device)
    return preset.e2e_steps * preset.batch_size / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(), "cores": cores, "python": platform.python_version(),
            "torch": torch.__version__, "pillow": Image.__version__, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="host,e2e", help="comma-separated: host, e2e")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu with CUDA, else cpu")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods of the host section")
    parser.add_argument("--e2e_methods", default="mae,beit", help="methods of the e2e section")
    parser.add_argument("--images", type=int, default=None, help="JPEG files to write (default by section)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the images per host figure (median)")
    parser.add_argument("--pipeline", default="fast", choices=["auto", "fast", "reference"],
                        help="the e2e run's --data_pipeline (default: fast)")
    parser.add_argument("--jpeg_decodings", default="auto",
                        help="comma-separated --jpeg_decoding choices of the e2e runs (auto, device, host), in order")
    parser.add_argument("--workers", type=int, default=None, help="e2e data-loader workers (default: the loop's)")
    parser.add_argument("--device", default=None, help="where the device part and the e2e run (default: cuda if present)")
    parser.add_argument("--smoke", action="store_true", help="tiny everything: checks the code paths in seconds")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--markdown", default=None, help="write the tables here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = PRESETS["smoke" if args.smoke else (args.preset or ("gpu" if device.type == "cuda" else "cpu"))]
    sections = set(args.sections.split(","))
    torch.set_num_threads(1)  # per-core figures; the e2e loop sets its own threads
    report = {"environment": environment(device), "preset": vars(args) | {"preset": preset.__dict__}}
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        size = (40, 30) if args.smoke else (500, 375)
        count = args.images or (4 if args.smoke else max(64, 4 * preset.batch_size))
        paths = make_jpegs(root / "jpegs", count, size)
        report["jpeg_kb"] = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
        tokenizers = save_tokenizers(root / "tokenizers", preset.image_size)
        if "host" in sections:
            batch, repeats = (2, 1) if args.smoke else (32, args.repeats)
            report["host"] = []
            for name in args.methods.split(","):  # each row written when done: a part out of time keeps them
                report["host"].append(host_figures(name, preset, tokenizers, paths, batch, repeats, device))
                write(report, args)
            report["torchvision_plain_img_s"] = torchvision_plain_img_s(paths, preset.image_size, batch, repeats)
            report["decode"] = decode_figures(paths, batch, repeats, device)
        if "e2e" in sections:
            report["e2e"], report["complete"], model_only = [], False, {}
            for decoding in args.jpeg_decodings.split(","):
                for name in args.e2e_methods.split(","):
                    row = {"method": name, "pipeline": args.pipeline, "jpeg_decoding": decoding}
                    try:  # a row that fails (e.g. no nvJPEG in this torchvision) is reported; the others still run
                        row.update(e2e_real_img_s(name, preset, tokenizers, root / "jpegs", root / "runs",
                                                  args.workers, args.pipeline, decoding))
                    except Exception as error:  # noqa: BLE001 - recorded in the report, with its type and message
                        row["error"] = f"{type(error).__name__}: {error}"
                    if name not in model_only:
                        model_only[name] = model_only_img_s(name, preset, tokenizers, root / "jpegs", device)
                    report["e2e"].append(row | {"model_only_img_s": model_only[name]})
                    write(report, args)  # a part that runs out of time keeps its finished rows
            report["complete"] = True
    write(report, args)
    return report


def write(report: dict, args: argparse.Namespace) -> None:
    table = markdown(report)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
