"""The data pipeline (`hf_mim.data`): real `datasets` loading from parquet and image folders,
column and split checks, unreadable images skipped and counted, and seeded examples whose
randomness does not depend on the data-loader workers or the caller's RNG."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_mim.data import (
    EpochSampler, FixedSampler, ImageExamples, StreamingImageExamples, decode_image, load_digits_dataset,
    load_image_datasets,
)

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def png_bytes(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, count: int, broken: tuple[int, ...] = (), label: bool = True) -> Path:
    """`count` random PNG images (entries in `broken` hold bytes that are no image) with the Image feature."""
    images = [{"bytes": b"not an image" if i in broken else png_bytes(i), "path": f"img{i}.png"} for i in range(count)]
    columns = {"image": images}
    features = {"image": datasets.Image()}
    if label:
        columns["label"] = [i % 3 for i in range(count)]
        features["label"] = datasets.ClassLabel(names=["a", "b", "c"])
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(path))
    return path


def crop_transform(image, generator):
    """A transform drawing from both sources of randomness an example may use."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255  # [C, H, W]
    return {"pixel_values": pixels * torch.rand(()), "noise": torch.rand(4, generator=generator)}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_parquet_train_and_validation_files(tmp_path):
    train = write_parquet(tmp_path / "train-0.parquet", 12)
    write_parquet(tmp_path / "train-1.parquet", 8)
    validation = write_parquet(tmp_path / "val.parquet", 5)
    data = load_image_datasets(train_file=str(tmp_path / "train-*.parquet"), validation_file=str(validation))
    assert (len(data.train), len(data.eval)) == (20, 5)
    assert (data.image_column, data.label_column, data.eval_split) == ("image", "label", "validation")
    assert train.exists()
    example = ImageExamples(data.train, data.image_column, crop_transform, label_column="label")[3]
    assert example["pixel_values"].shape == (3, 16, 16) and int(example["num_skipped"]) == 0
    assert int(example["labels"]) == 3 % 3


def test_seeded_split_when_there_is_no_validation(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", 40)
    first = load_image_datasets(train_file=str(path), train_val_split=0.25, seed=3)
    again = load_image_datasets(train_file=str(path), train_val_split=0.25, seed=3)
    other = load_image_datasets(train_file=str(path), train_val_split=0.25, seed=4)
    assert (len(first.train), len(first.eval)) == (30, 10)
    paths = lambda data: [row["path"] for row in data.eval["image"]]  # noqa: E731
    assert paths(first) == paths(again) != paths(other)
    assert not set(paths(first)) & {row["path"] for row in first.train["image"]}


def test_image_folder(tmp_path):
    for split, count in (("train", 6), ("val", 3)):
        for i in range(count):
            folder = tmp_path / split / ("cat" if i % 2 else "dog")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.png").write_bytes(png_bytes(i))
    data = load_image_datasets(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"))
    assert (len(data.train), len(data.eval), data.label_column) == (6, 3, "label")
    image = decode_image(data.train[0]["image"])
    assert image.size == (16, 16) and image.mode == "RGB"


def test_max_samples_take_a_seeded_subset(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", 30)
    data = load_image_datasets(train_file=str(path), train_val_split=None, max_train_samples=7, seed=0)
    assert len(data.train) == 7 and data.eval is None


def test_embedded_digits():
    digits = load_digits_dataset()
    assert len(digits) == 1797
    assert digits[0]["image"].size == (32, 32) and digits.features["label"].num_classes == 10


@pytest.mark.skipif(not CIFAR10.is_dir(), reason="../shared/data/cifar10 is not beside the project")
def test_real_cifar10_parquet():
    data = load_image_datasets(train_file=str(CIFAR10 / "test.parquet"), max_train_samples=64, seed=0)
    examples = ImageExamples(data.train, data.image_column, crop_transform, label_column=data.label_column)
    example = examples[0]
    assert example["pixel_values"].shape == (3, 32, 32) and 0 <= int(example["labels"]) < 10


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the problem and the fix
# ---------------------------------------------------------------------------------------------


def test_missing_image_column(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", 4)
    with pytest.raises(ValueError, match=r"--image_column_name 'pixels' is not a column.*\['image', 'label'\]"):
        load_image_datasets(train_file=str(path), image_column_name="pixels")


def test_column_that_holds_no_images(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", 4)
    with pytest.raises(ValueError, match="holds .*ClassLabel.*not images"):
        load_image_datasets(train_file=str(path), image_column_name="label")


def test_no_image_column_found(tmp_path):
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).to_parquet(str(path))
    with pytest.raises(ValueError, match="Found no image column.*Pass --image_column_name"):
        load_image_datasets(train_file=str(path))


def test_missing_label_column(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", 4)
    with pytest.raises(ValueError, match="--label_column_name 'class' is not a column"):
        load_image_datasets(train_file=str(path), label_column_name="class")


def test_empty_data_set(tmp_path):
    path = tmp_path / "train.parquet"
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": []}, features=features).to_parquet(str(path))
    with pytest.raises(ValueError, match="holds no images"):
        load_image_datasets(train_file=str(path), train_val_split=None)


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_image_datasets(train_file=str(tmp_path / "nothing-*.parquet"))


def test_two_sources(tmp_path):
    with pytest.raises(ValueError, match="Give one data source"):
        load_image_datasets(dataset_name="x/y", train_file=str(tmp_path / "a.parquet"))


# ---------------------------------------------------------------------------------------------
# Unreadable images: skipped, counted, reported
# ---------------------------------------------------------------------------------------------


def test_unreadable_image_is_skipped_and_counted(tmp_path, caplog):
    path = write_parquet(tmp_path / "train.parquet", 6, broken=(2, 3))
    data = load_image_datasets(train_file=str(path), train_val_split=None)
    examples = ImageExamples(data.train, data.image_column, crop_transform)
    with caplog.at_level("WARNING"):
        example = examples[(2, 123)]
    assert int(example["num_skipped"]) == 2  # 2 and 3 are broken: image 4 fills the slot
    expected = apply_to_index(data, 4, 123)
    torch.testing.assert_close(example["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    assert "Skipping unreadable image 2" in caplog.text
    assert int(examples[(1, 5)]["num_skipped"]) == 0


def apply_to_index(data, index, seed):
    return ImageExamples(data.train.select([index]), data.image_column, crop_transform)[(0, seed)]


def test_a_column_of_unreadable_images_stops_with_a_pointer(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", 3, broken=(0, 1, 2))
    data = load_image_datasets(train_file=str(path), train_val_split=None)
    with pytest.raises(RuntimeError, match="unreadable.*Check --image_column_name"):
        ImageExamples(data.train, data.image_column, crop_transform)[0]


def test_streamed_unreadable_image_is_counted_in_the_next_example(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", 5, broken=(1,))
    data = load_image_datasets(train_file=str(path), train_val_split=None, streaming=True)
    examples = list(StreamingImageExamples(data.train, data.image_column, crop_transform, seed=0, shuffle=False))
    assert len(examples) == 4
    assert [int(e["num_skipped"]) for e in examples] == [0, 1, 0, 0]


# ---------------------------------------------------------------------------------------------
# Seeded randomness
# ---------------------------------------------------------------------------------------------


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(50, seed=7)
    first = list(sampler)
    assert sorted(index for index, _ in first) == list(range(50))
    assert list(EpochSampler(50, seed=7)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(FixedSampler(10, seed=7)) == list(FixedSampler(10, seed=7))
    assert [index for index, _ in FixedSampler(10, seed=7)] == list(range(10))


def test_examples_ignore_the_callers_rng(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", 4)
    data = load_image_datasets(train_file=str(path), train_val_split=None)
    examples = ImageExamples(data.train, data.image_column, crop_transform)
    torch.manual_seed(0)
    first = examples[(1, 99)]
    state = torch.get_rng_state()
    torch.manual_seed(12345)
    again = examples[(1, 99)]
    other = examples[(1, 100)]
    torch.testing.assert_close(first["pixel_values"], again["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(first["noise"], again["noise"], rtol=0, atol=0)
    assert not torch.equal(first["noise"], other["noise"])
    torch.manual_seed(0)
    examples[(1, 99)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was


def test_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", 12)
    data = load_image_datasets(train_file=str(path), train_val_split=None)
    examples = ImageExamples(data.train, data.image_column, crop_transform)

    def batches(workers):
        sampler = EpochSampler(len(examples), seed=1)
        sampler.set_epoch(2)
        loader = torch.utils.data.DataLoader(examples, batch_size=4, sampler=sampler, num_workers=workers)
        return [batch["noise"] for batch in loader]

    for inline, parallel in zip(batches(0), batches(2), strict=True):
        torch.testing.assert_close(inline, parallel, rtol=0, atol=0)
