"""Streamed training data that shards: each image decoded once per epoch across all processes, an
order that does not depend on the number of data-loader workers, and an exact resume from the
stream's own state.

A stream (a Hub data set, parquet shards or WebDataset tar shards loaded with `streaming=True`) is
split into `processes x lanes` parts with `datasets.distributed.split_dataset_by_node`: whole shards
(files) per part when there are at least as many shards as parts, else every part reads the whole
stream and keeps every n-th row (it still decodes only its own; a warning says so). The shard order is
shuffled per epoch (seeded). A lane is one part of this process: it reads its rows in blocks of
`block_size`, permutes each block (seeded by seed, process, lane, lane epoch and block), decodes and
transforms them, and yields whole batches. At the end of its rows a lane starts its next epoch, so the
stream never runs dry and every process makes the same number of steps.

The process's batches come from its lanes in turn: lane 0, 1, ..., lanes-1, 0, ... A data-loader
worker serves a fixed set of lanes (with W workers, W must divide the lanes: worker j serves the
lanes j, j + W, ...), and torch's loader takes batches from its workers in turn, so the batch order
is the lanes' order whatever W is. The lanes (default: the workers at the start of the run) are fixed
for the run and saved in its checkpoints.

Resume: each batch carries where its lane stands (its epoch, block, datasets' `state_dict()` at the
block's start and the rows of the block used). The training process keeps the position of the last
batch it consumed per lane; a checkpoint saves them. A resumed lane loads the state with
`load_state_dict`, re-reads its current block (undecoded: only the rows not yet used are decoded),
permutes it the same way and goes on: the same batches as an uninterrupted run, nothing re-decoded.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator

import datasets
import datasets.distributed
import torch
from torch.utils.data import default_collate

from .data import MAX_CONSECUTIVE_UNREADABLE, ExampleTransform, ImageExamples, derive_seed

logger = logging.getLogger(__name__)

POSITION_KEY = "stream_position"  # a batch's lane and where that lane stands after it (popped before the model)


@dataclasses.dataclass
class LanePosition:
    """Where a lane stands: its epoch, the block of that epoch, datasets' state at the block's start
    (None: the epoch's start) and the rows of the block used (decoded, or skipped as unreadable)."""

    epoch: int = 0
    block: int = 0
    source_state: dict | None = None
    used: int = 0


# ---------------------------------------------------------------------------------------------
# Making examples from rows: the reference path (the fast path builds its own, see fast_data.py)
# ---------------------------------------------------------------------------------------------


class ReferenceRows:
    """Row -> the method's transformed example (ImageExamples.from_row: a full decode), or None when the
    image is unreadable (logged)."""

    collate = staticmethod(default_collate)
    device_views = None  # the reference path ships finished tensors

    def __init__(self, transform: ExampleTransform, image_column: str, image_mode: str = "RGB"):
        self.examples = ImageExamples(None, image_column, transform, image_mode=image_mode)  # rows: the stream's

    def __call__(self, row: dict, sample_seed: int, where: str) -> dict | None:
        return self.examples.from_row(row, sample_seed, where)


# ---------------------------------------------------------------------------------------------
# Splitting the stream
# ---------------------------------------------------------------------------------------------


def fit_lanes(num_shards: int, num_processes: int, lanes: int) -> int:
    """The lanes per process: `lanes`, lowered (with a warning) so that each part gets a whole shard;
    with fewer shards than processes, one lane, and every process reads the whole stream (warned). Parts
    with unequal shard counts are warned about: their lanes' images are not sampled equally often."""
    if num_shards < num_processes:
        logger.warning(
            "The stream has %d shard(s) for %d processes: each process reads the whole stream and keeps every "
            "%d-th image (each image is still decoded once, but read %d times). Store the data in at least %d "
            "files (parquet or tar shards) so that each process reads only its own.", num_shards, num_processes,
            num_processes, num_processes, num_processes)
        return 1
    fitted = max(1, min(lanes, num_shards // num_processes))
    if fitted < lanes:
        logger.warning(
            "The stream has %d shard(s): %d lane(s) per process instead of %d (each lane reads whole shards; "
            "%d processes x %d lanes need that many shards). Fewer data-loader workers can then read in parallel: "
            "store the data in more files to use more.", num_shards, fitted, lanes, num_processes, lanes)
    parts = num_processes * fitted
    if num_shards % parts:
        logger.warning(
            "The stream's %d shards do not split evenly into %d process(es) x %d lane(s): some lanes read %d shards, "
            "others %d, and every lane yields batches at the same pace, so the images of the smaller lanes are "
            "trained on up to %.1fx as often. Store a multiple of %d shards (of similar sizes).", num_shards,
            num_processes, fitted, -(-num_shards // parts), num_shards // parts,
            -(-num_shards // parts) / (num_shards // parts), parts)
    return fitted


def fit_workers(workers: int, lanes: int) -> int:
    """The most workers <= `workers` that divide the lanes (each worker then serves whole lanes, which keeps
    the batch order independent of the worker count)."""
    fitted = max((w for w in range(1, min(workers, lanes) + 1) if lanes % w == 0), default=0)
    if fitted != workers:
        logger.warning(
            "--dataloader_num_workers %d: the stream is read in %d lane(s), and the workers must divide them so "
            "that the batch order stays that of the lanes; using %d worker(s). (The lanes are fixed at the start "
            "of a run, --stream_lanes, and kept on resume.)", workers, lanes, fitted)
    return fitted


# ---------------------------------------------------------------------------------------------
# The training examples
# ---------------------------------------------------------------------------------------------


class StreamedTrainingExamples(torch.utils.data.IterableDataset):
    """Whole batches of this process's share of a stream, lane by lane (see the module docstring). Iterate
    it in a DataLoader with `batch_size=None` and a worker count from `fit_workers`; feed each consumed
    batch's POSITION_KEY to `consumed` (the training process) so that `state_dict` can resume there."""

    def __init__(self, dataset: datasets.IterableDataset, make_example: Callable[[dict, int, str], dict | None],
                 batch_size: int, seed: int, rank: int = 0, num_processes: int = 1, lanes: int = 1,
                 block_size: int = 1000, shuffle: bool = True):
        if lanes < 1:
            raise ValueError(f"--stream_lanes must be at least 1, got {lanes}.")
        if block_size < 1:
            raise ValueError(f"--shuffle_buffer_size must be at least 1 (the rows permuted together), got "
                             f"{block_size}.")
        self.dataset, self.make_example, self.batch_size, self.seed = dataset, make_example, batch_size, seed
        self.rank, self.num_processes, self.block_size, self.shuffle = rank, num_processes, block_size, shuffle
        self.positions = [LanePosition() for _ in range(fit_lanes(dataset.num_shards, num_processes, lanes))]
        self.next_lane = 0  # the lane of the next batch

    @property
    def lanes(self) -> int:
        """The lanes of this process (one position each)."""
        return len(self.positions)

    # -- reading ---------------------------------------------------------------------------------

    def lane_dataset(self, lane: int, epoch: int) -> datasets.IterableDataset:
        parts = self.num_processes * self.lanes
        strategy = "shards" if self.dataset.num_shards >= parts else "examples"
        part = datasets.distributed.split_dataset_by_node(self.dataset, rank=self.rank * self.lanes + lane,
                                                           world_size=parts, strategy=strategy)
        # datasets shuffles the shard order with its epoch (before splitting: the parts stay a partition); an
        # epoch drawn from (seed, epoch) shuffles it from the first epoch on (datasets' epoch 0 keeps the files' order)
        part.set_epoch(1 + derive_seed(self.seed, epoch) % 2**31)
        return part

    def lane_rows(self, lane: int, position: LanePosition) -> Iterator[tuple[LanePosition, dict]]:
        """(the lane's position after the row, the row), forever: epoch after epoch."""
        position = copy.deepcopy(position)
        while True:
            part = self.lane_dataset(lane, position.epoch)
            if position.source_state is not None:
                part.load_state_dict(position.source_state)
            for block in part.iter(batch_size=self.block_size):
                rows = [dict(zip(block, values)) for values in zip(*block.values())]
                next_state = copy.deepcopy(part.state_dict())  # where the next block starts
                for index in self.block_order(lane, position, len(rows))[position.used:]:
                    position.used += 1
                    yield dataclasses.replace(position), rows[index]
                position = LanePosition(position.epoch, position.block + 1, next_state, 0)
            if position.block == 0:  # not one block in an epoch read from its start
                raise ValueError(f"Lane {lane} of process {self.rank} received no rows from the stream: it is empty, "
                                 "or too small to split into processes x lanes. Add data or lower --stream_lanes.")
            position = LanePosition(position.epoch + 1)

    def block_order(self, lane: int, position: LanePosition, size: int) -> list[int]:
        if not self.shuffle:
            return list(range(size))
        generator = torch.Generator().manual_seed(
            derive_seed(self.seed, self.rank, lane, position.epoch, position.block))
        return torch.randperm(size, generator=generator).tolist()

    def lane_batches(self, lane: int) -> Iterator[dict]:
        """Batches of `batch_size` examples; an unreadable image is skipped and counted in the next example."""
        examples, skipped = [], 0
        for position, row in self.lane_rows(lane, self.positions[lane]):
            sample_seed = derive_seed(self.seed, self.rank, lane, position.epoch, position.block, position.used)
            example = self.make_example(row, sample_seed, f"{position.used - 1} of lane {lane}'s block "
                                                          f"{position.block} (epoch {position.epoch})")
            if example is None:
                skipped += 1
                if skipped >= MAX_CONSECUTIVE_UNREADABLE:
                    raise RuntimeError(f"{skipped} images in a row of the stream are unreadable: the image column "
                                       "does not hold readable images. Check --image_column_name and the files.")
                continue
            example["num_skipped"] = torch.tensor(skipped)
            examples.append(example)
            skipped = 0
            if len(examples) == self.batch_size:
                batch = self.make_example.collate(examples)
                batch[POSITION_KEY] = {"lane": lane, **dataclasses.asdict(position)}
                yield batch
                examples = []

    def __iter__(self) -> Iterator[dict]:
        """This worker's lanes in turn. With W workers, worker j makes the batches j, j + W, ... of the process
        from here on (torch's loader takes them in turn): the lanes next_lane + j, next_lane + j + W, ..."""
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        if self.lanes % num_workers:
            raise ValueError(f"{num_workers} data-loader workers do not divide the {self.lanes} lanes of the stream: "
                             "use fit_workers.")
        mine = [(self.next_lane + worker_id + turn * num_workers) % self.lanes
                for turn in range(self.lanes // num_workers)]
        streams = [self.lane_batches(lane) for lane in mine]
        while True:
            for stream in streams:
                yield next(stream)

    # -- where the run stands (the training process) -----------------------------------------------

    def consumed(self, record: dict) -> None:
        """A batch was used for training: its lane now stands where the batch left it."""
        record = dict(record)
        lane = record.pop("lane")
        self.positions[lane] = LanePosition(**record)
        self.next_lane = (lane + 1) % self.lanes

    def state_dict(self) -> dict:
        return {"rank": self.rank, "num_processes": self.num_processes, "next_lane": self.next_lane,
                "positions": [dataclasses.asdict(p) for p in self.positions]}

    def load_state_dict(self, state: dict) -> None:
        if (state["num_processes"], state["rank"]) != (self.num_processes, self.rank):
            raise ValueError(
                f"This streamed run was split into {state['num_processes']} processes (its checkpoint holds where "
                f"each process's share of the stream stands); it cannot resume on {self.num_processes}. Resume "
                f"with {state['num_processes']} processes, or start afresh with --resume_from_checkpoint none.")
        self.next_lane = state["next_lane"]
        self.positions = [LanePosition(**position) for position in state["positions"]]  # their count: the lanes

    def describe(self, workers: int) -> str:
        return (f"a stream of {self.dataset.num_shards} shard(s) split into {self.num_processes} process(es) x "
                f"{self.lanes} lane(s), {workers} worker(s) per process")


class StreamCheckpoint:
    """Every process's stream state in one checkpoint file (checkpoint extras are written by the main
    process): call `collect` on every process before saving; each process loads its own entry."""

    def __init__(self, examples: StreamedTrainingExamples):
        self.examples, self.collected = examples, None

    def collect(self) -> None:
        from accelerate.utils import gather_object

        self.collected = gather_object([self.examples.state_dict()])

    def state_dict(self) -> dict:
        states = self.collected or [self.examples.state_dict()]
        return {"processes": states}

    def load_state_dict(self, state: dict) -> None:
        states = state["processes"]
        # each entry holds the process count it was written with: another count is refused there
        self.examples.load_state_dict(next((entry for entry in states if entry["rank"] == self.examples.rank),
                                           states[0]))


class StreamLoader:
    """The training loader of a stream: a DataLoader over whole batches (batch_size=None), built when
    iterated so that the worker count fits the lanes of a resumed run; batches moved to `device`."""

    def __init__(self, examples: StreamedTrainingExamples, workers: int, device: torch.device,
                 pin_memory: bool = False):
        self.examples, self.workers, self.device, self.pin_memory = examples, workers, device, pin_memory
        self.fitted: tuple[int, int] | None = None  # (lanes, workers): warned about once

    def fitted_workers(self) -> int:
        """The workers, fitted to the lanes (which a resume may have restored)."""
        if self.fitted is None or self.fitted[0] != self.examples.lanes:
            self.fitted = self.examples.lanes, fit_workers(self.workers, self.examples.lanes)
        return self.fitted[1]

    def __iter__(self) -> Iterator[dict]:
        from accelerate.utils import send_to_device

        loader = torch.utils.data.DataLoader(self.examples, batch_size=None, num_workers=self.fitted_workers(),
                                             pin_memory=self.pin_memory)
        for batch in loader:
            self.examples.consumed(batch.pop(POSITION_KEY))
            yield send_to_device(batch, self.device, non_blocking=self.pin_memory)


__all__ = ["LanePosition", "ReferenceRows", "StreamCheckpoint", "StreamLoader", "StreamedTrainingExamples",
           "fit_lanes", "fit_workers"]
