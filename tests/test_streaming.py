"""Streamed training data (`hf_mim.streaming`): split into processes x lanes so that each image is decoded once
per epoch across all processes, batches in an order that does not depend on the data-loader workers, an exact
resume from the stream's own state that decodes nothing twice, the fast path, WebDataset tar shards and a Hub
data set streamed from the local Hub.

Each test image is a flat colour that encodes its id (red + 256 x green), so a decoded image says which it is."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hf_mim.data import StreamingImageExamples, decode_image, load_image_datasets
from hf_mim.pretraining import main
from hf_mim.streaming import ReferenceRows, StreamCheckpoint, StreamedTrainingExamples, StreamLoader, fit_workers
from test_finetune import hub_datasets  # noqa: F401 (a fixture: the local Hub, for datasets too)

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ROOT = Path(__file__).resolve().parents[1]


def png(image_id: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (image_id % 256, image_id // 256, 7)).save(buffer, "PNG")
    return buffer.getvalue()


def image_id(image: Image.Image) -> int:
    red, green, _ = image.getpixel((0, 0))
    return red + 256 * green


def write_parquet_shards(folder: Path, shards: int, per_shard: int) -> str:
    """`shards` parquet files of `per_shard` images each, ids 0 .. shards x per_shard - 1. Returns their glob."""
    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("int64")})
    for shard in range(shards):
        ids = list(range(shard * per_shard, (shard + 1) * per_shard))
        datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in ids], "id": ids},
                                   features=features).to_parquet(folder / f"train-{shard:02d}.parquet")
    return str(folder / "*.parquet")


def stream(pattern: str) -> datasets.IterableDataset:
    return load_image_datasets(train_file=pattern, streaming=True, train_val_split=None).train


class IdExamples:
    """Row -> {"id": the decoded image's id}; counts its decodes (in this process)."""

    collate = staticmethod(torch.utils.data.default_collate)

    def __init__(self):
        self.decodes = 0

    def __call__(self, row: dict, sample_seed: int, where: str) -> dict:
        self.decodes += 1
        return {"id": torch.tensor(image_id(decode_image(row["image"])))}


def examples(pattern: str, rank: int = 0, num_processes: int = 1, lanes: int = 4, batch_size: int = 4):
    return StreamedTrainingExamples(stream(pattern), IdExamples(), batch_size, seed=3, rank=rank,
                                    num_processes=num_processes, lanes=lanes, block_size=5)


def take_ids(loader, batches: int) -> list[list[int]]:
    taken = []
    for batch in loader:
        taken.append(batch["id"].tolist())
        if len(taken) == batches:
            return taken
    raise AssertionError("the stream ran dry")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_parquet_shards(tmp_path_factory.mktemp("stream"), shards=4, per_shard=12)


# ---------------------------------------------------------------------------------------------
# The split: each image once per epoch, whatever the workers
# ---------------------------------------------------------------------------------------------


def test_two_processes_decode_each_image_once_per_epoch(shards):
    """4 shards, 2 processes x 2 lanes: 12 images per lane, 3 batches of 4; 6 batches per process are one epoch."""
    ids = []
    for rank in (0, 1):
        share = examples(shards, rank=rank, num_processes=2, lanes=2)
        ids += [i for batch in take_ids(StreamLoader(share, 0, torch.device("cpu")), 6) for i in batch]
        assert share.make_example.decodes == 24  # nothing decoded that was not used
    assert sorted(ids) == list(range(48))


def test_the_batch_order_does_not_depend_on_the_worker_count(shards, caplog):
    expected = take_ids(StreamLoader(examples(shards), 0, torch.device("cpu")), 14)  # past a lane's epoch end
    assert sorted(i for batch in expected[:12] for i in batch) == list(range(48))  # an epoch: every image once
    for workers in (1, 2, 4):
        assert take_ids(StreamLoader(examples(shards), workers, torch.device("cpu")), 14) == expected, workers
    with caplog.at_level(logging.WARNING):
        assert fit_workers(3, 4) == 2
    assert "the workers must divide them" in caplog.text


@pytest.mark.parametrize("stop_after", [5, 6], ids=["mid-round", "round-boundary"])
def test_resume_continues_with_the_same_batches_and_decodes_only_the_rest(shards, stop_after):
    """Stopped mid-block (block 5 vs batch 4) and, for 5, in the middle of a round of lanes; resumed with other
    workers: the uninterrupted batches, and only the images still to come are decoded."""
    expected = take_ids(StreamLoader(examples(shards), 0, torch.device("cpu")), 14)
    first = examples(shards)
    assert take_ids(StreamLoader(first, 0, torch.device("cpu")), stop_after) == expected[:stop_after]
    buffer = io.BytesIO()
    torch.save(StreamCheckpoint(first).state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain data: the checkpoint loads it with weights_only=True

    resumed = examples(shards)
    StreamCheckpoint(resumed).load_state_dict(saved)
    assert take_ids(StreamLoader(resumed, 0, torch.device("cpu")), 14 - stop_after) == expected[stop_after:]
    assert resumed.make_example.decodes == (14 - stop_after) * 4
    again = examples(shards)
    StreamCheckpoint(again).load_state_dict(saved)
    assert take_ids(StreamLoader(again, 2, torch.device("cpu")), 14 - stop_after) == expected[stop_after:]


def test_bad_lanes_and_block_sizes_are_refused(shards):
    with pytest.raises(ValueError, match="--stream_lanes must be at least 1, got 0"):
        StreamedTrainingExamples(stream(shards), IdExamples(), 4, seed=0, lanes=0)
    with pytest.raises(ValueError, match="--shuffle_buffer_size must be at least 1"):
        StreamedTrainingExamples(stream(shards), IdExamples(), 4, seed=0, block_size=0)


def test_a_resume_on_another_process_count_is_refused(shards):
    saved = StreamCheckpoint(examples(shards)).state_dict()  # one process
    with pytest.raises(ValueError, match=r"split into 1 processes .* cannot resume on 2\. Resume with 1 processes"):
        StreamCheckpoint(examples(shards, rank=1, num_processes=2, lanes=2)).load_state_dict(saved)


def test_fewer_shards_than_parts_says_so_and_still_decodes_each_image_once(tmp_path, caplog):
    one_file = write_parquet_shards(tmp_path / "one", shards=1, per_shard=16)
    with caplog.at_level(logging.WARNING):
        shares = [examples(one_file, rank=rank, num_processes=2, lanes=2) for rank in (0, 1)]
    assert "1 shard(s) for 2 processes: each process reads the whole stream" in caplog.text
    assert [share.lanes for share in shares] == [1, 1]
    ids = [i for share in shares for batch in take_ids(StreamLoader(share, 0, torch.device("cpu")), 2) for i in batch]
    assert sorted(ids) == list(range(16))

    caplog.clear()
    three = write_parquet_shards(tmp_path / "three", shards=3, per_shard=4)
    with caplog.at_level(logging.WARNING):
        assert examples(three, lanes=4).lanes == 3
    assert "3 lane(s) per process instead of 4" in caplog.text
    assert "do not split evenly" not in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        uneven = examples(three, lanes=2)
    assert [sum(1 for _ in uneven.lane_dataset(lane, 0)) for lane in (0, 1)] == [8, 4]  # 2 shards and 1
    assert "some lanes read 2 shards, others 1" in caplog.text and "up to 2.0x as often" in caplog.text


def test_an_unreadable_image_is_skipped_and_counted_in_the_next_example(tmp_path):
    features = datasets.Features({"image": datasets.Image()})
    images = [{"bytes": png(0), "path": None}, {"bytes": b"not an image", "path": None},
              {"bytes": png(2), "path": None}, {"bytes": png(3), "path": None}]
    datasets.Dataset.from_dict({"image": images}, features=features).to_parquet(tmp_path / "train.parquet")
    rows = ReferenceRows(lambda image, generator: {"id": torch.tensor(image_id(image))}, "image")
    share = StreamedTrainingExamples(stream(str(tmp_path / "*.parquet")), rows, 3, seed=0, shuffle=False)
    batch = next(iter(StreamLoader(share, 0, torch.device("cpu"))))
    assert batch["id"].tolist() == [0, 2, 3] and batch["num_skipped"].tolist() == [0, 1, 0]


def test_an_evaluation_stream_keeps_its_order_on_every_pass(shards):
    """accelerate's prepared loader calls set_epoch with its pass count; datasets would then shuffle the shard
    order, and the fixed per-position seeds (masks) would fall on other images at each evaluation."""
    ids = StreamingImageExamples(stream(shards), "image", lambda image, generator: {"id": torch.tensor(image_id(image))},
                                 seed=0, shuffle=False)
    first = [int(example["id"]) for example in ids]
    assert sorted(first) == list(range(48))
    for epoch in (1, 2, 3):
        ids.set_epoch(epoch)
        assert [int(example["id"]) for example in ids] == first, epoch


# ---------------------------------------------------------------------------------------------
# WebDataset tar shards
# ---------------------------------------------------------------------------------------------


def write_tar_shards(folder: Path, shards: int, per_shard: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with tarfile.open(folder / f"train-{shard:02d}.tar", "w") as tar:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                for name, data in ((f"{i:06d}.png", png(i)), (f"{i:06d}.cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "*.tar")


class PngIds(IdExamples):
    def __call__(self, row: dict, sample_seed: int, where: str) -> dict:
        return {"id": torch.tensor(image_id(decode_image(row["png"])))}


def test_webdataset_tar_shards_stream_and_split(tmp_path):
    pattern = write_tar_shards(tmp_path, shards=4, per_shard=6)
    data = load_image_datasets(train_file=pattern, streaming=True, train_val_split=None)
    assert data.source.startswith("webdataset:") and data.image_column == "png" and data.train.num_shards == 4
    ids = []
    for rank in (0, 1):
        share = StreamedTrainingExamples(data.train, PngIds(), 3, seed=0, rank=rank, num_processes=2, lanes=2)
        ids += [i for batch in take_ids(StreamLoader(share, 0, torch.device("cpu")), 4) for i in batch]
    assert sorted(ids) == list(range(24))


def test_a_hub_data_set_streams_and_splits_by_file(hub_datasets, tmp_path):
    """A Hub data set (on the local Hub) of 4 parquet files, streamed over HTTP: 2 processes x 2 lanes."""
    from huggingface_hub import HfApi

    repo_id, api = f"{hub_datasets.user}/stream-shards", HfApi()
    api.create_repo(repo_id, repo_type="dataset")
    api.upload_folder(folder_path=Path(write_parquet_shards(tmp_path / "data", shards=4, per_shard=6)).parent,
                      path_in_repo="data", repo_id=repo_id, repo_type="dataset")
    train = load_image_datasets(dataset_name=repo_id, streaming=True, train_val_split=None,
                                cache_dir=str(tmp_path / "cache")).train
    assert train.num_shards == 4
    ids = []
    for rank in (0, 1):
        share = StreamedTrainingExamples(train, IdExamples(), 3, seed=0, rank=rank, num_processes=2, lanes=2)
        ids += [i for batch in take_ids(StreamLoader(share, 0, torch.device("cpu")), 4) for i in batch]
    assert sorted(ids) == list(range(24))


# ---------------------------------------------------------------------------------------------
# The training script: the fast path, and two real gloo processes
# ---------------------------------------------------------------------------------------------


def run_args(pattern: str, output_dir: Path, *extra: str) -> list[str]:
    return ["--output_dir", str(output_dir), "--train_file", pattern, "--streaming", "--max_steps", "4",
            "--checkpointing_steps", "2", "--per_device_train_batch_size", "8", "--stream_lanes", "2",
            "--shuffle_buffer_size", "6", "--no-do_eval", "--logging_steps", "1", "--report_to", "none",
            "--dataloader_num_workers", "0", *extra]


def assert_same_weights(got: Path, expected: Path) -> None:
    ours, theirs = load_file(got / "model.safetensors"), load_file(expected / "model.safetensors")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7, msg=name)


def test_a_stream_takes_the_fast_path_and_resumes_exactly(shards, tmp_path, capfd):
    main(run_args(shards, tmp_path / "whole", "--data_pipeline", "fast"))
    assert "Data: the fast pipeline" in capfd.readouterr().err
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    main(run_args(shards, tmp_path / "resumed", "--data_pipeline", "fast", "--dataloader_num_workers", "1"))
    assert_same_weights(tmp_path / "resumed", tmp_path / "whole")


def launch(pattern: str, output_dir: Path, decode_log: Path, *extra: str) -> subprocess.CompletedProcess:
    from test_pretrain import free_port

    decode_log.mkdir(parents=True)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT / "src"), "STREAM_DECODE_LOG": str(decode_log)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port",
               str(free_port()), str(ROOT / "tests" / "streaming_ddp_worker.py"),
               *run_args(pattern, output_dir, *extra)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-5000:]
    return finished


def decoded(decode_log: Path, rank: int) -> list[int]:
    return [int(line) for line in (decode_log / f"rank-{rank}.txt").read_text().split()]


def test_two_gloo_processes_decode_each_image_once_and_resume_exactly(tmp_path):
    """4 shards of 16 images; 2 processes x 2 lanes x batch 8: the 4 steps are one epoch, 32 images per process."""
    pattern = write_parquet_shards(tmp_path / "data", shards=4, per_shard=16)
    finished = launch(pattern, tmp_path / "whole", tmp_path / "whole-decodes")
    assert "a stream of 4 shard(s) split into 2 process(es) x 2 lane(s)" in finished.stderr
    whole = [decoded(tmp_path / "whole-decodes", rank) for rank in (0, 1)]
    assert [len(ids) for ids in whole] == [32, 32]
    assert sorted(whole[0] + whole[1]) == list(range(64))  # each image decoded once, by one process

    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    launch(pattern, tmp_path / "resumed", tmp_path / "resumed-decodes")
    for rank in (0, 1):  # steps 3 and 4 only: the images of steps 1 and 2 are neither decoded nor read again
        assert decoded(tmp_path / "resumed-decodes", rank) == whole[rank][16:]
    assert_same_weights(tmp_path / "resumed", tmp_path / "whole")
