"""JPEG decoding in the training process (`hf_mim.device_decoding`, `--jpeg_decoding device`) against the
reference path: the same boxes, flips and masks; pixels within the full-decoding tolerance (decode_jpeg on the
CPU is bit-identical to Pillow); EXIF orientations; grey, CMYK and PNG images in the same batches; damaged
files skipped and counted as the reference counts them; an exact resume. On the CPU the code is the GPU's
but for decode_jpeg's device argument."""

from __future__ import annotations

import dataclasses
import io
import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from test_fast_data import (IMAGES, assert_close_levels, build_method, fast_run, jpeg_bytes, levels, saturated_jpeg,
                            write_jpeg_parquet)

from hf_mim.data import ImageExamples, decode_image
from hf_mim.device_decoding import ORIENTATIONS, decode_files, reaches_end_of_image
from hf_mim.fast_data import CANVAS, ENCODED, FastImageExamples, collate, decode_jpegs_on_device
from hf_mim.models import DvaeConfig, DvaeTokenizer
from hf_mim.pretraining import main
from hf_mim.training.tracking import LOG_FILE, read_log

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # conftest.py
CPU = torch.device("cpu")


def encoded(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **save)
    return buffer.getvalue()


def photo(seed: int = 0, width: int = 120, height: int = 90) -> Image.Image:
    return Image.open(io.BytesIO(jpeg_bytes(seed, width, height))).convert("RGB")


def with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(photo(5), format="JPEG", quality=90, exif=exif.tobytes())


def bad_huffman_table(data: bytes) -> bytes:
    """A JPEG whose header Pillow opens and whose markers reach EOI, but whose first scan names an undefined
    Huffman table: Pillow and libjpeg-turbo both fail while decoding (found only in the training process)."""
    damaged = bytearray(data)
    damaged[data.index(b"\xff\xda") + 6] = 0x33  # SOS: component 1's DC/AC table selectors -> 3/3
    return bytes(damaged)


def dataset(files: list[bytes]) -> datasets.Dataset:
    """What load_image_datasets gives for parquet bytes: undecoded image entries."""
    return datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None} for data in files]},
                                      features=datasets.Features({"image": datasets.Image(decode=False)}))


def both_paths(method_name: str, files: list[bytes], keys, *extra: str):
    """(device-decoding fast batch after DeviceViews, reference batch, processor, what the workers shipped:
    the slots sent as JPEG bytes and the number of images in the canvas, and the unreadable images each
    path met: fast, reference)."""
    method, processor = build_method(method_name, *extra)
    data = dataset(files)
    spec = dataclasses.replace(method.fast_views(processor), reduced_decoding=False)  # the workers' CMYK, PNG: exact
    fast = FastImageExamples(data, "image", spec, method.image_mode, device_decoding=True)
    reference = ImageExamples(data, "image", method.train_transform(processor), method.image_mode)
    batch = collate([fast[key] for key in keys])
    shipped = {"encoded": list(batch[ENCODED].slots) if ENCODED in batch else [], "canvas": len(batch[CANVAS])}
    fast_batch = fast.device_views(batch)
    reference_batch = torch.utils.data.default_collate([reference[key] for key in keys])
    return fast_batch, reference_batch, processor, shipped, (fast.unreadable.seen, reference.unreadable.seen)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", [dict(quality=90), dict(quality=75, progressive=True), dict(quality=95, subsampling=0),
                                  dict(quality=90, subsampling=1), dict(quality=85, restart_marker_blocks=3)],
                         ids=["baseline-420", "progressive", "444", "422", "restart-markers"])
def test_decode_on_the_cpu_is_pillows_bit_for_bit(save):
    """The measured tolerance of decode_jpeg (libjpeg-turbo) vs Pillow's decoding on the CPU: 0 levels."""
    files = [encoded(photo(seed, 97, 61), format="JPEG", **save) for seed in range(2)]
    files.append(encoded(photo(3).convert("L"), format="JPEG", **save))
    decoded = decode_files([torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files], CPU)
    for data, pixels in zip(files, decoded):
        expected = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
        torch.testing.assert_close(pixels, expected, rtol=0, atol=0)


def test_markers_reaching_end_of_image_tell_truncated_files():
    """Pillow calls a JPEG without EOI truncated; the check sends those to the workers' Pillow."""
    for data in (jpeg_bytes(0, 120, 90), encoded(photo(1), format="JPEG", progressive=True),
                 encoded(photo(2), format="JPEG", restart_marker_blocks=2)):
        assert reaches_end_of_image(data) and reaches_end_of_image(data + b"trailing bytes")
        for cut in (len(data) // 3, len(data) // 2, len(data) - 1):
            assert not reaches_end_of_image(data[:cut])
            with pytest.raises(OSError, match="truncated"):
                Image.open(io.BytesIO(data[:cut])).load()
    assert not reaches_end_of_image(b"\x89PNG\r\n\x1a\n") and not reaches_end_of_image(b"")


def test_where_jpegs_are_decoded():
    """auto: the device on CUDA only (on a CPU decode_jpeg would run in the training process); device: also
    on the CPU (what these tests run: the GPU's code but for decode_jpeg's device argument); host: never."""
    assert not decode_jpegs_on_device("auto", CPU) and not decode_jpegs_on_device("host", CPU)
    assert decode_jpegs_on_device("device", CPU)


# ---------------------------------------------------------------------------------------------
# Examples: the reference path's
# ---------------------------------------------------------------------------------------------


def test_mae_examples_decoded_on_the_device_match_the_reference():
    fast, reference, processor, shipped, _ = both_paths("mae", IMAGES, [(i % 4, i) for i in range(16)])
    assert shipped == {"encoded": list(range(16)), "canvas": 0}  # every JPEG went as bytes
    torch.testing.assert_close(fast["noise"], reference["noise"], rtol=0, atol=0)
    mean, std = processor.image_mean, processor.image_std
    assert_close_levels(levels(fast["pixel_values"], mean, std), levels(reference["pixel_values"], mean, std),
                        reduced=False)


def test_beit_two_views_and_jitter_decoded_on_the_device_match_the_reference(tmp_path):
    """The whole upright image goes to the canvas (the jitter's contrast needs its mean grey)."""
    torch.manual_seed(0)
    DvaeTokenizer(DvaeConfig(hidden_size=8, vocab_size=32, num_groups=3, num_blocks_per_group=1, with_decoder=False,
                             reference_fp16=False)).save_pretrained(tmp_path / "dvae")
    fast, reference, processor, _, _ = both_paths("beit", IMAGES, [(i % 4, i) for i in range(12)],
                                               "--tokenizer", str(tmp_path / "dvae"))
    torch.testing.assert_close(fast["bool_masked_pos"], reference["bool_masked_pos"], rtol=0, atol=0)
    mean, std = processor.image_mean, processor.image_std
    assert_close_levels(levels(fast["pixel_values"], mean, std), levels(reference["pixel_values"], mean, std),
                        reduced=False)
    assert_close_levels(levels(fast["tokenizer_pixel_values"]), levels(reference["tokenizer_pixel_values"]),
                        reduced=False)


def test_saturated_quality_95_photos_decoded_on_the_device_match_within_the_stated_levels(tmp_path):
    """500x375 q95 JPEGs with saturated hard-edged shapes, BEiT's jitter and both views: within EXACT_MAX_LEVELS."""
    torch.manual_seed(0)
    DvaeTokenizer(DvaeConfig(hidden_size=8, vocab_size=32, num_groups=3, num_blocks_per_group=1, with_decoder=False,
                             reference_fp16=False)).save_pretrained(tmp_path / "dvae")
    files = [saturated_jpeg(3), saturated_jpeg(4, 375, 500)]
    fast, reference, processor, shipped, _ = both_paths("beit", files, [(i % 2, i) for i in range(4)],
                                                        "--tokenizer", str(tmp_path / "dvae"))
    assert shipped["encoded"] == list(range(4))
    mean, std = processor.image_mean, processor.image_std
    assert_close_levels(levels(fast["pixel_values"], mean, std), levels(reference["pixel_values"], mean, std),
                        reduced=False)
    assert_close_levels(levels(fast["tokenizer_pixel_values"]), levels(reference["tokenizer_pixel_values"]),
                        reduced=False)


def test_every_exif_orientation_is_upright():
    """Orientations 1-8: the device path turns the decoded pixels as Pillow's exif_transpose does."""
    files = [with_orientation(orientation) for orientation in range(1, 9)]
    assert set(ORIENTATIONS) == set(range(2, 9))
    fast, reference, processor, shipped, _ = both_paths("mae", files, [(i, 40 + i) for i in range(8)])
    assert shipped["encoded"] == list(range(8))
    mean, std = processor.image_mean, processor.image_std
    assert_close_levels(levels(fast["pixel_values"], mean, std), levels(reference["pixel_values"], mean, std),
                        reduced=False)


def test_grey_cmyk_and_png_images_in_one_batch_with_jpegs():
    """Grey JPEGs are decoded on the device; CMYK JPEGs (Pillow's conversion) and PNGs in the workers:
    one mixed batch, every example the reference's."""
    files = [IMAGES[0], encoded(photo(1).convert("L"), format="JPEG", quality=90),
             encoded(photo(2).convert("CMYK"), format="JPEG", quality=90), encoded(photo(3), format="PNG"),
             IMAGES[2], encoded(photo(4).convert("P"), format="PNG")]
    fast, reference, processor, shipped, _ = both_paths("mae", files, [(i, 7 * i) for i in range(6)])
    assert shipped == {"encoded": [0, 1, 4], "canvas": 3}
    torch.testing.assert_close(fast["noise"], reference["noise"], rtol=0, atol=0)
    mean, std = processor.image_mean, processor.image_std
    assert_close_levels(levels(fast["pixel_values"], mean, std), levels(reference["pixel_values"], mean, std),
                        reduced=False)


# ---------------------------------------------------------------------------------------------
# Unreadable images: skipped and counted as on the reference path
# ---------------------------------------------------------------------------------------------


def test_damaged_jpegs_are_skipped_and_counted_as_on_the_reference_path(caplog):
    """Truncated (the worker's Pillow fails), an undecodable scan (found in the training process: the batch
    is decoded again image by image, Pillow confirms, the next image fills the slot with the slot's seed),
    two of those in a row, and not an image at all."""
    files = [IMAGES[0], IMAGES[1][: len(IMAGES[1]) // 2], bad_huffman_table(IMAGES[2]), IMAGES[3],
             bad_huffman_table(IMAGES[0]), bad_huffman_table(IMAGES[1]), IMAGES[2], b"not an image"]
    for data in files[1:3]:  # the reference decoder rejects both kinds
        with pytest.raises(OSError):
            decode_image({"bytes": data})
    keys = [(0, 1), (1, 2), (2, 3), (4, 4), (6, 5), (7, 6), (5, 7), (3, 8)]
    with caplog.at_level(logging.WARNING):
        fast, reference, processor, shipped, seen = both_paths("mae", files, keys)
    # Slots 1 and 5 skipped images 1 and 7 in the worker; 1, 2, 3 and 6 met images 2, 4, 5 on the device.
    assert shipped["encoded"] == list(range(8))
    assert seen == (7, 7)  # unreadable images met (image 2 twice, image 5 twice), each counted and logged
    assert fast["num_skipped"].tolist() == reference["num_skipped"].tolist() == [0, 2, 1, 2, 0, 1, 1, 0]
    torch.testing.assert_close(fast["noise"], reference["noise"], rtol=0, atol=0)
    mean, std = processor.image_mean, processor.image_std
    assert_close_levels(levels(fast["pixel_values"], mean, std), levels(reference["pixel_values"], mean, std),
                        reduced=False)
    assert caplog.text.count("Skipping unreadable image 4 (<bytes>): OSError: broken data stream") == 2  # each path


def test_a_damaged_jpeg_in_a_parquet_run_is_counted(tmp_path, capsys):
    """The run's own loop: an image found unreadable on the device adds to `skipped_images`, and the
    start-of-run line names where JPEGs are decoded."""
    path = tmp_path / "train.parquet"
    images = [{"bytes": bad_huffman_table(IMAGES[i % 4]) if i == 3 else IMAGES[i % 4], "path": f"img{i}.jpg"}
              for i in range(8)]
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})).to_parquet(
        str(path))
    arguments = fast_run(path, tmp_path / "run")
    arguments[arguments.index("--max_steps") + 1] = "2"
    main(arguments + ["--jpeg_decoding", "device"])
    assert "JPEGs decoded on the training device" in capsys.readouterr().err
    assert max(read_log(str(tmp_path / "run" / LOG_FILE), "skipped_images").values()) == 1


def test_device_decoding_run_resumes_exactly(tmp_path):
    """The same crops, flips and masks after a resume, with JPEGs decoded in the training process; one
    data-loader worker, so the JPEG bytes cross from a worker's shared memory."""
    import shutil

    def run(output_dir):
        arguments = fast_run(train, output_dir) + ["--jpeg_decoding", "device"]
        arguments[arguments.index("--dataloader_num_workers") + 1] = "1"
        main(arguments)

    train = write_jpeg_parquet(tmp_path / "train.parquet", 12, broken=(5,), truncated=(7,))
    run(tmp_path / "run")
    log = str(tmp_path / "run" / LOG_FILE)
    assert max(read_log(log, "skipped_images").values()) >= 1
    shutil.copytree(tmp_path / "run" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run(tmp_path / "resumed")
    expected, resumed = read_log(log, "loss"), read_log(str(tmp_path / "resumed" / LOG_FILE), "loss")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6)
