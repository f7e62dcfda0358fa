"""Streamed training data with 1 and 2 processes: image decodes per process and images/s, this library's split
(`hf_mim.streaming`: processes x lanes of whole shards) against the split it replaced (accelerate's
`IterableDatasetShard` over the whole stream: every process reads and decodes everything, keeps 1/N).

The stream: ImageNet-like JPEGs (500x375 and 375x500, quality 90, written by data_pipeline.py's
`make_jpegs`) packed into parquet shards. Each process of a run (started together, one torch thread each,
`rank` and `N` given; no model, no process group: the data side only) takes its share of one epoch through
MAE's reference training transform, in batches, and counts the images it decoded (the real decoder,
wrapped to count). images/s: images delivered by all processes / the wall time of the slowest.

    python benchmarks/streaming.py                       # 512 images in 8 shards, 1 and 2 processes
    python benchmarks/streaming.py --smoke --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch

sys.path.insert(0, str(Path(__file__).parent))
import hf_mim.data  # noqa: E402
import hf_mim.streaming  # noqa: E402
from accelerate.data_loader import IterableDatasetShard  # noqa: E402
from data_pipeline import make_jpegs  # noqa: E402
from hf_mim.pretraining import get_method, parse_args  # noqa: E402

BATCH = 16


def write_shards(folder: Path, images: int, shards: int) -> str:
    files = make_jpegs(folder / "jpegs", images)
    features = datasets.Features({"image": datasets.Image()})
    per_shard = images // shards
    for shard in range(shards):
        part = files[shard * per_shard:(shard + 1) * per_shard]
        datasets.Dataset.from_dict({"image": [{"bytes": Path(f).read_bytes(), "path": None} for f in part]},
                                   features=features).to_parquet(folder / f"train-{shard:02d}.parquet")
    return str(folder / "*.parquet")


class Counter:
    """The real decoder, counting its calls in this process."""

    def __init__(self, decode):
        self.decode, self.calls = decode, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.decode(*args, **kwargs)


def share_batches(split: str, pattern: str, rank: int, processes: int, images: int):
    """This process's batches of one epoch, and the decoder counter they go through."""
    method = get_method("mae")(parse_args(["--method", "mae", "--output_dir", "unused", "--image_size", "224"]))
    method.build_model("mae-base")  # the image processor follows the model's config
    transform = method.train_transform(method.build_image_processor())
    train = hf_mim.data.load_image_datasets(train_file=pattern, streaming=True, train_val_split=None).train
    counter = hf_mim.data.decode_image = Counter(hf_mim.data.decode_image)  # both splits decode through it
    if split == "lanes":  # hf_mim.streaming: this process reads and decodes its own shards
        rows = hf_mim.streaming.ReferenceRows(transform, "image")
        examples = hf_mim.streaming.StreamedTrainingExamples(train, rows, BATCH, seed=0, rank=rank,
                                                             num_processes=processes, lanes=1, block_size=256)
        loader = torch.utils.data.DataLoader(examples, batch_size=None)
        return (batch for _, batch in zip(range(images // (BATCH * processes)), loader)), counter
    # the replaced split: every process reads the whole stream and keeps every N-th batch
    examples = hf_mim.data.StreamingImageExamples(train, "image", transform, seed=0, shuffle_buffer_size=256)
    shard = IterableDatasetShard(examples, batch_size=BATCH, drop_last=True, num_processes=processes,
                                 process_index=rank)
    return torch.utils.data.DataLoader(shard, batch_size=BATCH, drop_last=True), counter


def run_share(split: str, pattern: str, rank: int, processes: int, images: int, start) -> dict:
    torch.set_num_threads(1)
    # When its source runs out, datasets' shuffled stream (the replaced split) sleeps 5 s for its reader threads
    # to shut down: once per epoch and worker, nothing at ImageNet scale, but most of a 512-image epoch's time.
    # Not counted here: the splits are compared on reading and decoding.
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    batches, counter = share_batches(split, pattern, rank, processes, images)
    start.wait()  # every process starts timing together
    began, delivered = time.perf_counter(), 0
    for batch in batches:
        delivered += len(batch["pixel_values"])
    return {"rank": rank, "decodes": counter.calls, "images": delivered, "seconds": time.perf_counter() - began}


def measure(split: str, pattern: str, processes: int, images: int) -> dict:
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        start = manager.Barrier(processes)
        with context.Pool(processes) as pool:
            shares = pool.starmap(run_share, [(split, pattern, rank, processes, images, start)
                                              for rank in range(processes)])
    wall = max(share["seconds"] for share in shares)
    delivered = sum(share["images"] for share in shares)
    return {"split": split, "processes": processes, "decodes_per_process": [s["decodes"] for s in shares],
            "images_delivered": delivered, "wall_seconds": round(wall, 2),
            "images_per_second": round(delivered / wall, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="64 images in 4 shards: every code path, seconds")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    images, shards = (64, 4) if args.smoke else (args.images, args.shards)
    with tempfile.TemporaryDirectory() as folder:
        pattern = write_shards(Path(folder), images, shards)
        rows = [measure(split, pattern, processes, images) for processes in (1, 2) for split in ("replaced", "lanes")]
    now = datetime.datetime.now(datetime.timezone.utc)
    report = {"benchmark": "streaming", "date": now.isoformat(timespec="minutes"),
              "machine": f"{platform.processor() or platform.machine()}, {multiprocessing.cpu_count()} CPU(s)",
              "images": images, "shards": shards, "batch": BATCH, "rows": rows}
    for row in rows:
        print(f"{row['split']:>8} x {row['processes']} process(es): decodes per process {row['decodes_per_process']}, "
              f"{row['images_per_second']} img/s ({row['images_delivered']} images in {row['wall_seconds']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
