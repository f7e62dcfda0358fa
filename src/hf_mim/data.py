"""Image data for the training scripts: load a data set, pick its splits and columns, and turn it
into seeded PyTorch examples that survive unreadable images.

Sources (one per run): a Hub data set (`dataset_name`), image folders (`train_dir`/`validation_dir`),
parquet files or WebDataset tar shards (`train_file`/`validation_file`, globs allowed; tars are read by
datasets' "webdataset" builder), or, when none is given, the embedded handwritten digits of
scikit-learn (a dependency), upscaled to 32x32 RGB. Streamed training data: `hf_mim.streaming`.

Images are read with `decode=False` and decoded in :class:`ImageExamples`, so a corrupt image
surfaces at one place: it is skipped, logged and counted in the batch's `num_skipped`, and the
next readable image takes its slot (batch shapes stay fixed, which DDP and torch.compile need).

Randomness is a pure function of (seed, epoch, position): :class:`EpochSampler` yields
`(index, sample_seed)` pairs and every augmentation and mask of an example is drawn from its
`sample_seed`. Data order and augmentation therefore do not depend on the number of data-loader
workers, on persistent workers, or on where a run was resumed.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

# "jpg", "png", "webp": the image of a WebDataset sample, named after its file extension.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp")
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "test")
DIGITS_SOURCE = "sklearn-digits"
DIGITS_IMAGE_SIZE = 32
# Give up after this many unreadable images in a row: the column or the whole data set is wrong.
MAX_CONSECUTIVE_UNREADABLE = 100
WARN_FIRST_UNREADABLE = 5
# Grey images with more than 8 bits per pixel (16-bit PNG and TIFF, 32-bit integer and float).
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

# A transform turns a decoded image into named tensors, drawing randomness from `generator`
# (mask generators) and from torch's global RNG, which is seeded per example (torchvision).
ExampleTransform = Callable[[Image.Image, torch.Generator], dict[str, torch.Tensor]]


def derive_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from several integers (seed, epoch, step, rank ...)."""
    state = np.random.SeedSequence([int(v) % 2**63 for v in values]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageDatasets:
    """The splits of one run. `eval` is None when there is no held-out data."""

    train: datasets.Dataset | datasets.IterableDataset | None
    eval: datasets.Dataset | datasets.IterableDataset | None
    image_column: str
    label_column: str | None
    source: str  # what the data is, for logs and the model card
    eval_split: str | None  # "validation", "test", or "train[split 15%]"


def load_digits_dataset(image_size: int = DIGITS_IMAGE_SIZE) -> datasets.Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits as RGB PIL images (dark ink on white, bicubic
    upscale to `image_size`) with a `label` column (ClassLabel 0-9)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "The embedded demo data set (handwritten digits) ships with scikit-learn, which is not installed. "
            "Install it with `pip install scikit-learn`, or pass your own data with --dataset_name, --train_dir "
            "or --train_file."
        ) from error
    digits = load_digits()
    ink = (255.0 - digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # [1797, 8, 8], 16 = full ink
    images = [
        Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")
        for pixels in ink
    ]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)


FILE_BUILDERS = {".parquet": "parquet", ".tar": "webdataset"}


def expand_files(pattern: str, argument: str) -> list[str]:
    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not files:
        raise FileNotFoundError(f"{argument} {pattern!r} matches no file. Check the path or the glob pattern.")
    other = [f for f in files if os.path.splitext(f)[1] not in FILE_BUILDERS]
    if other:
        raise ValueError(
            f"{argument} takes parquet files or WebDataset .tar shards; {other[:3]} are not. Convert them (for "
            f"example `datasets.load_dataset(...).to_parquet(...)`), or use --train_dir for folders of images."
        )
    return files


def file_builder(data_files: dict[str, list[str]]) -> str:
    """The datasets builder of the files: "parquet" or "webdataset" (tar shards); one kind per run."""
    kinds = {FILE_BUILDERS[os.path.splitext(f)[1]] for files in data_files.values() for f in files}
    if len(kinds) > 1:
        raise ValueError(f"--train_file/--validation_file mix {' and '.join(sorted(kinds))} files: use one kind.")
    return kinds.pop()


def check_one_source(dataset_name, train_dir, validation_dir, train_file, validation_file) -> None:
    given = [name for name, used in (
        ("--dataset_name", dataset_name), ("--train_dir/--validation_dir", train_dir or validation_dir),
        ("--train_file/--validation_file", train_file or validation_file),
    ) if used]
    if len(given) > 1:
        raise ValueError(f"Give one data source, not {' and '.join(given)}.")


def load_raw_datasets(
    *, dataset_name=None, dataset_config_name=None, train_dir=None, validation_dir=None, train_file=None,
    validation_file=None, cache_dir=None, token=None, streaming=False,
) -> tuple[datasets.DatasetDict | datasets.IterableDatasetDict, str]:
    """All splits of the chosen source, and a short description of it."""
    check_one_source(dataset_name, train_dir, validation_dir, train_file, validation_file)
    if dataset_name:
        with hub_errors_in_one_line(dataset_name):
            raw = datasets.load_dataset(
                dataset_name, dataset_config_name, cache_dir=cache_dir, token=token, streaming=streaming
            )
        return raw, dataset_name
    if train_dir or validation_dir:
        data_files = {}
        for split, folder in (("train", train_dir), ("validation", validation_dir)):
            if folder:
                if not os.path.isdir(folder):
                    raise FileNotFoundError(f"The image folder {folder!r} does not exist.")
                data_files[split] = os.path.join(folder, "**")
        source = f"imagefolder:{train_dir or validation_dir}"
        return load_files("imagefolder", data_files, source, cache_dir=cache_dir, streaming=streaming), source
    if train_file or validation_file:
        data_files = {}
        for split, pattern, argument in (
            ("train", train_file, "--train_file"), ("validation", validation_file, "--validation_file")
        ):
            if pattern:
                data_files[split] = expand_files(pattern, argument)
        builder = file_builder(data_files)
        source = f"{builder}:{train_file or validation_file}"
        return load_files(builder, data_files, source, cache_dir=cache_dir, streaming=streaming), source
    digits = load_digits_dataset()
    raw = datasets.DatasetDict({"train": digits})
    return (raw.to_iterable_dataset() if streaming else raw), DIGITS_SOURCE


class DataSourceUnreachableError(ConnectionError):
    """--dataset_name could not be fetched from the Hub, nor found in the local cache."""


@contextlib.contextmanager
def hub_errors_in_one_line(dataset_name: str):
    """huggingface_hub logs each of its retries as a warning, and datasets then raises from deep inside: an
    unreachable Hub reads as pages of noise. Here the retries are quiet and the failure is one sentence."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    except ConnectionError as error:
        raise DataSourceUnreachableError(
            f"--dataset_name {dataset_name}: the Hub could not be reached and the data set is not in the local cache "
            f"({error}). Check the network (HF_ENDPOINT, a proxy), or run once online to fill the cache, or pass "
            "local data with --train_dir / --train_file."
        ) from None
    finally:
        hub_logger.setLevel(level)


def load_files(builder: str, data_files: dict, source: str, **kwargs):
    """`load_dataset(builder, data_files=...)`, with datasets' message for a file set without rows
    ('Instruction "train" corresponds to no data!') turned into one that names the files."""
    try:
        return datasets.load_dataset(builder, data_files=data_files, **kwargs)
    except ValueError as error:
        if "corresponds to no data" not in str(error):
            raise
        raise ValueError(f"{source} holds no images (0 rows in {data_files}). Check the path, glob or split name.") \
            from error


def column_names(dataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(dataset.features or {})


def resolve_image_column(dataset, requested: str | None) -> str:
    available = column_names(dataset)
    if requested is not None:
        if requested not in available:
            raise ValueError(
                f"--image_column_name {requested!r} is not a column of the data set; available columns: {available}."
            )
        column = requested
    else:
        column = next((name for name in IMAGE_COLUMN_CANDIDATES if name in available), None)
        if column is None:
            raise ValueError(
                f"Found no image column (looked for {list(IMAGE_COLUMN_CANDIDATES)}); available columns: "
                f"{available}. Pass --image_column_name."
            )
    feature = (dataset.features or {}).get(column)
    if feature is not None and not is_image_feature(feature):
        raise ValueError(
            f"Column {column!r} holds {feature!r}, not images. Pass --image_column_name with the image column "
            f"(available columns: {available})."
        )
    return column


def is_image_feature(feature) -> bool:
    """An `Image` column, or a plain binary one holding encoded image files (cast to `Image` on load)."""
    return isinstance(feature, datasets.Image) or (
        isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"))


def resolve_label_column(dataset, requested: str | None) -> str | None:
    """`requested` must exist; without a request, `label` is used when present (labels are optional)."""
    available = column_names(dataset)
    if requested is None:
        return "label" if "label" in available else None
    if requested not in available:
        raise ValueError(
            f"--label_column_name {requested!r} is not a column of the data set; available columns: {available}. "
            "Leave it out for data without labels."
        )
    return requested


def check_not_empty(dataset, what: str, source: str) -> None:
    if isinstance(dataset, datasets.Dataset) and len(dataset) == 0:
        raise ValueError(f"The {what} split of {source} is empty (0 images). Check the path, glob or split name.")


def split_train_validation(raw, train_val_split: float, seed: int, streaming: bool, max_eval_samples):
    """(train, eval, eval split name): the data set's own validation split, or a seeded slice of train."""
    train = raw.get("train")
    validation_name = next((name for name in VALIDATION_SPLIT_NAMES if name in raw), None)
    if validation_name is not None:
        return train, raw[validation_name], validation_name
    if train is None or not train_val_split:
        return train, None, None
    if not 0 < train_val_split < 1:
        raise ValueError(f"--train_val_split must be in (0, 1), got {train_val_split}.")
    if streaming:
        if not max_eval_samples:
            logger.warning("A streamed data set without a validation split: pass --max_eval_samples N to hold out "
                           "its first N examples for evaluation. Evaluation is off.")
            return train, None, None
        return train.skip(max_eval_samples), train.take(max_eval_samples), f"first {max_eval_samples} of train"
    parts = train.train_test_split(test_size=train_val_split, seed=seed)
    return parts["train"], parts["test"], f"train[seeded {train_val_split:.0%} split]"


def limit(dataset, max_samples: int | None, seed: int):
    """The first `max_samples` of a seeded shuffle (or of the stream)."""
    if dataset is None or not max_samples:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(max_samples)
    if max_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_samples))
    return dataset


def prepare_columns(dataset, image_column: str, label_column: str | None):
    """Keep the image (undecoded: decoding happens in ImageExamples) and label columns only."""
    if dataset is None:
        return None
    keep = [image_column] + ([label_column] if label_column else [])
    if set(column_names(dataset)) - set(keep):
        dataset = dataset.select_columns(keep)
    return dataset.cast_column(image_column, datasets.Image(decode=False))


def load_image_datasets(
    *, dataset_name=None, dataset_config_name=None, train_dir=None, validation_dir=None, train_file=None,
    validation_file=None, cache_dir=None, token=None, streaming=False, image_column_name=None,
    label_column_name=None, train_val_split=0.15, seed=42, max_train_samples=None, max_eval_samples=None,
) -> ImageDatasets:
    """Load, split (seeded), check columns and sizes, and limit the samples: see the module docstring."""
    raw, source = load_raw_datasets(
        dataset_name=dataset_name, dataset_config_name=dataset_config_name, train_dir=train_dir,
        validation_dir=validation_dir, train_file=train_file, validation_file=validation_file,
        cache_dir=cache_dir, token=token, streaming=streaming,
    )
    train, evaluation, eval_split = split_train_validation(raw, train_val_split, seed, streaming, max_eval_samples)
    reference = train if train is not None else evaluation
    if reference is None:
        raise ValueError(f"{source} has no train or validation split (splits: {list(raw)}).")
    image_column = resolve_image_column(reference, image_column_name)
    label_column = resolve_label_column(reference, label_column_name)
    for dataset, what in ((train, "train"), (evaluation, "validation")):
        if dataset is not None:
            check_not_empty(dataset, what, source)
            resolve_image_column(dataset, image_column)  # the same columns in every split
    train = prepare_columns(limit(train, max_train_samples, seed), image_column, label_column)
    evaluation = prepare_columns(limit(evaluation, max_eval_samples, seed), image_column, label_column)
    return ImageDatasets(train, evaluation, image_column, label_column, source, eval_split)


# ---------------------------------------------------------------------------------------------
# Decoding and seeded examples for PyTorch
# ---------------------------------------------------------------------------------------------


def decode_image(value, mode: str = "RGB") -> Image.Image:
    """The one image decoder of every source (folders, parquet bytes, Hub data sets, streams): a fully
    decoded PIL image in `mode`, with the pixels the file means.

    `value`: a `datasets.Image(decode=False)` entry (`{"bytes", "path"}`, local or remote path), raw
    image bytes (a plain binary column), or a PIL image. The image is turned by its EXIF orientation,
    16-bit and 32-bit grey scaled to 8 bits (not clipped to white), and then converted to `mode`
    (palette, CMYK, LA, RGBA ... ; an alpha channel is dropped, as torchvision and timm do).
    Raises on unreadable data."""
    image = open_image(value)
    image.load()  # decode now: truncated files fail here, not later in a transform
    return finish_decoding(image, mode)


def finish_decoding(image: Image.Image, mode: str) -> Image.Image:
    """What follows the decoding of the pixels, on every path (the fast path's reduced JPEG decoding
    too): EXIF orientation, wide grey scaled to 8 bits, conversion to `mode`."""
    return convert_mode(to_8_bit(upright(image)), mode)


def upright(image: Image.Image) -> Image.Image:
    """The image turned by its EXIF orientation (a no-op without the tag). A damaged EXIF block counts
    as upright: the pixels themselves are readable."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # PIL raises several types for malformed EXIF data
        return image


def open_image(value) -> Image.Image:
    if value is None:
        raise ValueError("the image entry is empty (None)")
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"]))
    return datasets.Image().decode_example(value)  # paths, including remote ones


def to_8_bit(image: Image.Image) -> Image.Image:
    """Grey images of more than 8 bits ("I;16*", "I", "F") -> "L", scaled from their bit depth:
    PIL's own convert clips them (a mid-grey 16-bit PNG became white)."""
    if image.mode not in WIDE_GREY_MODES:
        return image
    pixels = np.asarray(image, dtype=np.float64)  # [H, W]
    if image.mode == "F":  # float images hold 0-1, 0-255 (a float TIFF of 8-bit data) or 16-bit values
        peak = pixels.max(initial=0.0)
        full_scale = next((scale for scale in (1.0, 255.0) if peak <= scale), 65535.0)
    else:
        full_scale = 65535.0 if pixels.max(initial=0) <= 65535 else 2.0**32 - 1
    scaled = np.clip(np.rint(pixels * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def convert_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode == mode:
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL asks for this route (a palette with transparency)
    return image.convert(mode)


def describe(value) -> str:
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return "<bytes>" if isinstance(value, dict) else type(value).__name__


def apply_seeded(transform: ExampleTransform, image: Image.Image, sample_seed: int) -> dict[str, torch.Tensor]:
    """Run `transform` with torch's global RNG and a fresh generator both seeded by `sample_seed`,
    leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only (the one forked): torch.manual_seed also queues a lazy CUDA seeding that
        # captures a stack trace, ~2 ms per example in a data-loader worker. The same CPU draws.
        torch.default_generator.manual_seed(sample_seed)
        generator = torch.Generator().manual_seed(derive_seed(sample_seed, 1))
        return transform(image, generator)


class UnreadableImageLog:
    """Warns about the first few unreadable images of this process or worker."""

    def __init__(self):
        self.seen = 0

    def report(self, index, value, error: Exception) -> None:
        self.seen += 1
        if self.seen <= WARN_FIRST_UNREADABLE:
            logger.warning("Skipping unreadable image %s (%s): %s: %s", index, describe(value),
                           type(error).__name__, error)


class ImageExamples(torch.utils.data.Dataset):
    """Map-style examples: item `(index, sample_seed)` (or a plain index) -> the transform's
    tensors plus `num_skipped`, the number of unreadable images passed over to fill this slot."""

    def __init__(self, dataset: datasets.Dataset, image_column: str, transform: ExampleTransform,
                 image_mode: str = "RGB", label_column: str | None = None):
        self.dataset, self.image_column, self.transform = dataset, image_column, transform
        self.image_mode, self.label_column = image_mode, label_column
        self.unreadable = UnreadableImageLog()

    def __len__(self) -> int:
        return len(self.dataset)

    def attempt(self, index: int, sample_seed: int) -> tuple[dict | None, dict]:
        """(the transform's tensors, or None when the image is unreadable; the row)."""
        row = self.dataset[index]
        return self.from_row(row, sample_seed, index), row

    def from_row(self, row: dict, sample_seed: int, where) -> dict | None:
        """The transform's tensors of the row's image, or None when it is unreadable (logged as image `where`;
        a stream's rows come here too, see hf_mim.streaming)."""
        try:
            image = decode_image(row[self.image_column], self.image_mode)
        except Exception as error:  # any decoder error (PIL raises OSError, ValueError, SyntaxError ...)
            self.unreadable.report(where, row[self.image_column], error)
            return None
        return apply_seeded(self.transform, image, sample_seed)

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, sample_seed = key if isinstance(key, tuple) else (key, derive_seed(key))
        for skipped in range(min(len(self), MAX_CONSECUTIVE_UNREADABLE)):
            example, row = self.attempt((index + skipped) % len(self), sample_seed)
            if example is not None:
                example["num_skipped"] = torch.tensor(skipped)
                if self.label_column is not None:
                    example["labels"] = torch.tensor(row[self.label_column])
                return example
        raise RuntimeError(
            f"{min(len(self), MAX_CONSECUTIVE_UNREADABLE)} images in a row from index {index} are unreadable: "
            f"column {self.image_column!r} does not hold readable images. Check --image_column_name and the files."
        )


class EpochSampler(torch.utils.data.Sampler):
    """Yields `(index, sample_seed)`: a permutation (or the identity) and per-position seeds, both a
    pure function of (seed, epoch). Call `set_epoch` before each epoch."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator) if self.shuffle else torch.arange(self.num_samples)
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=generator)
        return iter(zip(order.tolist(), seeds.tolist()))


class FixedSampler(torch.utils.data.Sampler):
    """Evaluation order: `(index, sample_seed)` in index order, each seed fixed by (seed, index), so
    every evaluation sees the same masks. It has no `set_epoch` on purpose: accelerate calls
    `set_epoch` with a growing count on every pass over a prepared loader."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, 2**31))  # not any training epoch's seed
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=generator)
        return iter(zip(range(self.num_samples), seeds.tolist()))


class StreamingImageExamples(torch.utils.data.IterableDataset):
    """Examples from a streamed data set, for evaluation (training streams: `hf_mim.streaming`, which
    splits the shards between processes and resumes exactly): shuffled with a buffer (seed + epoch) when
    `shuffle`, split between data-loader workers by position; an unreadable image is skipped and counted
    in the next example. Without `shuffle` the order and seeds are the same on every pass."""

    def __init__(self, dataset: datasets.IterableDataset, image_column: str, transform: ExampleTransform,
                 seed: int, shuffle: bool = True, image_mode: str = "RGB", label_column: str | None = None,
                 shuffle_buffer_size: int = 10_000):
        self.dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size) if shuffle else dataset
        self.image_column, self.transform, self.seed, self.shuffle = image_column, transform, seed, shuffle
        self.image_mode, self.label_column, self.epoch = image_mode, label_column, 0
        self.unreadable = UnreadableImageLog()

    def set_epoch(self, epoch: int) -> None:
        # Without `shuffle` (evaluation) one order and one set of seeds, as FixedSampler (no set_epoch): accelerate
        # calls this with its pass count, and datasets shuffles the shard order of any epoch but 0.
        if self.shuffle:
            self.epoch = epoch
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        skipped = 0
        for position, row in enumerate(self.dataset):
            if position % num_workers != worker_id:
                continue
            try:
                image = decode_image(row[self.image_column], self.image_mode)
            except Exception as error:  # any decoder error, see ImageExamples.from_row
                self.unreadable.report(position, row[self.image_column], error)
                skipped += 1
                continue
            example = apply_seeded(self.transform, image, derive_seed(self.seed, self.epoch, position))
            example["num_skipped"] = torch.tensor(skipped)
            if self.label_column is not None:
                example["labels"] = torch.tensor(row[self.label_column])
            skipped = 0
            yield example


__all__ = [
    "DIGITS_SOURCE", "EpochSampler", "FixedSampler", "ImageDatasets", "ImageExamples", "StreamingImageExamples",
    "apply_seeded", "decode_image", "derive_seed", "load_digits_dataset", "load_image_datasets",
]
