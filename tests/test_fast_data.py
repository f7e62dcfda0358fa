"""The fast data path (`hf_mim.fast_data`, `hf_mim.resampling`) against the reference one (each method's
`train_transform` on fully decoded PIL images): the same boxes, flips, jitter, masks and noise, pixels
within stated tolerances, the same crop-box distribution, unreadable images skipped and counted alike,
EXIF orientation, and the run-level pieces (workers default, data_wait in log.jsonl)."""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy.stats import kstest
from torchvision.transforms import v2

from hf_mim.data import ImageExamples, apply_seeded, decode_image, load_image_datasets
from hf_mim.fast_data import DeviceViews, FastImageExamples, HostSampler, collate
from hf_mim.models import DvaeConfig, DvaeTokenizer
from hf_mim.pretraining import get_method, main, parse_args
from hf_mim.training.data_loading import DataWaitMeter, check_num_workers, default_num_workers
from hf_mim.training.tracking import LOG_FILE, read_log
from hf_mim.resampling import color_jitter, resize_boxes

# Tolerances, in uint8 levels of the [0, 1] pixels. Full decoding: only Pillow's fixed-point rounding
# differs from our float32 one (an intermediate uint8 of the two passes may round the other way).
EXACT_MAX_LEVELS, EXACT_MEAN_LEVELS = 2, 0.1
# Reduced decoding: libjpeg's DCT downscaling replaces part of Pillow's antialiasing filter.
REDUCED_MEAN_LEVELS, REDUCED_MIN_PSNR_DB = 1.0, 35.0


def jpeg_bytes(seed: int, width: int, height: int, exif_orientation: int | None = None) -> bytes:
    """A textured photo-like JPEG: smooth colour fields at a few scales plus grain."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 128.0, dtype=np.float32)
    for cells, amplitude in ((3, 80), (12, 40), (40, 20)):
        field = rng.uniform(-amplitude, amplitude, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        pixels += np.stack([np.asarray(Image.fromarray(field[..., c]).resize((width, height), Image.BICUBIC))
                            for c in range(3)], axis=-1)
    pixels += rng.normal(0, 10, pixels.shape)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


IMAGES = [jpeg_bytes(0, 120, 90), jpeg_bytes(1, 90, 120), jpeg_bytes(2, 260, 200), jpeg_bytes(3, 40, 30)]


def saturated_jpeg(seed: int, width: int = 500, height: int = 375) -> bytes:
    """An ImageNet-sized quality-95 JPEG where bicubic and Lanczos overshoot most: flat shapes of saturated
    colours (0 and 255 channels) with hard edges over a photo-like background clipped at 0 and 255."""
    rng = np.random.default_rng(seed)
    background = Image.open(io.BytesIO(jpeg_bytes(seed, width, height))).convert("RGB")
    pixels = ((np.asarray(background, dtype=np.float32) - 128) * 2.5 + 128).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (left, top, left + int(rng.integers(2, 120)), top + int(rng.integers(2, 90)))
        colour = tuple(int(value) for value in rng.choice([0, 255], 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # conftest.py


def build_method(name: str, *extra: str):
    method = get_method(name)(parse_args(["--method", name, *extra]))
    method.build_model(f"{name}-demo")
    return method, method.build_image_processor()


@pytest.fixture(scope="module")
def dvae(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dvae") / "dvae"
    torch.manual_seed(0)
    DvaeTokenizer(DvaeConfig(hidden_size=8, vocab_size=32, num_groups=3, num_blocks_per_group=1, with_decoder=False,
                             reference_fp16=False)).save_pretrained(path)
    return path


def both_paths(method, processor, seeds, reduced: bool, images=IMAGES):
    """(fast batch, reference batch) of images[seed % len(images)] with sample seed `seed`."""
    spec = dataclasses.replace(method.fast_views(processor), reduced_decoding=reduced)
    host, reference = HostSampler(spec, method.image_mode), method.train_transform(processor)
    fast, slow = [], []
    for seed in seeds:
        data = images[seed % len(images)]
        fast.append(apply_seeded(host, Image.open(io.BytesIO(data)), seed))
        slow.append(apply_seeded(reference, decode_image({"bytes": data}), seed))
    return DeviceViews(spec)(collate(fast)), torch.utils.data.default_collate(slow)


def levels(pixels: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """Normalised pixels back to uint8 levels."""
    if mean is not None:
        pixels = pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return pixels * 255


def assert_close_levels(fast, reference, reduced: bool):
    difference = (fast - reference).abs()  # [B, C, H, W] in levels
    if not reduced:
        assert difference.max() <= EXACT_MAX_LEVELS + 1e-3 and difference.mean() <= EXACT_MEAN_LEVELS
        return
    assert difference.mean() <= REDUCED_MEAN_LEVELS
    mse = difference.pow(2).mean((1, 2, 3))  # [B]
    assert (10 * torch.log10(255**2 / mse.clamp(min=1e-6)) >= REDUCED_MIN_PSNR_DB).all()


# ---------------------------------------------------------------------------------------------
# The same examples as the reference path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduced", [False, True], ids=["full-decode", "reduced-decode"])
def test_mae_examples_match_the_reference(reduced):
    method, processor = build_method("mae")
    fast, reference = both_paths(method, processor, range(24), reduced)
    torch.testing.assert_close(fast["noise"], reference["noise"], rtol=0, atol=0)  # the masks: identical
    mean, std = processor.image_mean, processor.image_std
    assert_close_levels(levels(fast["pixel_values"], mean, std), levels(reference["pixel_values"], mean, std), reduced)


@pytest.mark.parametrize("reduced", [False, True], ids=["full-decode", "reduced-decode"])
def test_beit_two_views_and_jitter_match_the_reference(dvae, reduced):
    """Colour jitter (per sample, random order), flip before the box, bicubic model view and LANCZOS
    tokenizer view of the same box, blockwise masks."""
    method, processor = build_method("beit", "--tokenizer", str(dvae))
    fast, reference = both_paths(method, processor, range(24), reduced)
    torch.testing.assert_close(fast["bool_masked_pos"], reference["bool_masked_pos"], rtol=0, atol=0)
    mean, std = processor.image_mean, processor.image_std
    assert_close_levels(levels(fast["pixel_values"], mean, std), levels(reference["pixel_values"], mean, std), reduced)
    assert fast["tokenizer_pixel_values"].shape == reference["tokenizer_pixel_values"].shape
    assert_close_levels(levels(fast["tokenizer_pixel_values"]), levels(reference["tokenizer_pixel_values"]), reduced)


@pytest.fixture(scope="module")
def saturated_jpegs() -> list[bytes]:
    return [saturated_jpeg(0), saturated_jpeg(1, 375, 500), saturated_jpeg(2)]


@pytest.mark.parametrize("name", ["mae", "beit"])
def test_saturated_quality_95_photos_match_within_the_stated_levels(name, dvae, saturated_jpegs):
    """Full decodes of 500x375 q95 JPEGs with saturated, hard-edged shapes (where each resampling pass
    overshoots past 0 and 255 and Pillow clips it): every view within EXACT_MAX_LEVELS of the reference's."""
    method, processor = build_method(name, *(["--tokenizer", str(dvae)] if name == "beit" else []))
    fast, reference = both_paths(method, processor, range(6), False, saturated_jpegs)
    mean, std = processor.image_mean, processor.image_std
    assert (levels(reference["pixel_values"], mean, std).round() == 255).float().mean() > 0.02  # saturated
    assert_close_levels(levels(fast["pixel_values"], mean, std), levels(reference["pixel_values"], mean, std), False)
    if name == "beit":
        assert_close_levels(levels(fast["tokenizer_pixel_values"]), levels(reference["tokenizer_pixel_values"]), False)


def test_vit_mpp_targets_and_masks_match_the_reference():
    method, processor = build_method("vit_mpp")
    fast, reference = both_paths(method, processor, range(16), reduced=False)
    torch.testing.assert_close(fast["bool_masked_pos"], reference["bool_masked_pos"], rtol=0, atol=0)
    # 3-bit patch colours from pixels within a level: a mean right at a bin edge may fall the other way.
    agree = (fast["mean_color_targets"] == reference["mean_color_targets"]).float().mean()
    assert agree >= 0.98


def test_crop_box_distribution_is_the_recipes():
    """Kolmogorov-Smirnov on the area fraction and log aspect ratio of the boxes the host draws (flip
    drawn first and mirrored, as BEiT) against torchvision's RandomResizedCrop drawing on its own seeds."""
    spec = dataclasses.replace(build_method("mae")[0].fast_views(build_method("mae")[1]), scale=(0.08, 1.0),
                               jitter_and_flip_first=True, color_jitter=0.4)
    host, crop = HostSampler(spec), v2.RandomResizedCrop(32, scale=(0.08, 1.0))
    height, width = 375, 500

    def shape(box):
        top, left, box_h, box_w = box
        assert 0 <= top <= height - box_h and 0 <= left <= width - box_w
        return box_h * box_w / (height * width), np.log(box_w / box_h)

    torch.manual_seed(0)
    ours = np.array([shape(host.draw(height, width).box) for _ in range(2000)])
    torch.manual_seed(12345)
    theirs = np.array([shape(tuple(crop.make_params([torch.empty(3, height, width)]).values())) for _ in range(2000)])
    for column in range(2):
        assert kstest(ours[:, column], theirs[:, column]).pvalue > 0.01


def test_resize_is_pillows_for_every_filter_box_and_flip():
    """resize_boxes against Pillow's crop().resize() (and a flip) on random uint8 images."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    canvas = torch.from_numpy(image).permute(2, 0, 1)[None].float()  # [1, 3, 50, 70]
    pil = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR}
    for interpolation, (top, left, box_h, box_w), size, flip in [
        ("bicubic", (3, 5, 40, 60), (16, 16), False), ("lanczos", (0, 0, 50, 70), (24, 12), True),
        ("bilinear", (10, 20, 8, 9), (20, 30), True), ("bicubic", (7, 1, 33, 21), (33, 21), False),
    ]:
        box = torch.tensor([[top, left, box_h, box_w]], dtype=torch.float32)
        limits = torch.tensor([[top, left, top + box_h, left + box_w]], dtype=torch.float32)
        ours = resize_boxes(canvas, box, limits, torch.tensor([flip]), size, interpolation)[0]
        expected = Image.fromarray(image).crop((left, top, left + box_w, top + box_h)).resize(
            size[::-1], pil[interpolation])
        expected = torch.from_numpy(np.array(expected.transpose(Image.FLIP_LEFT_RIGHT) if flip else expected))
        assert (ours - expected.permute(2, 0, 1).float()).abs().max() <= 1, interpolation


def test_color_jitter_is_pillows():
    """color_jitter against torchvision's ColorJitter on the PIL image, per sample order and factors."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(6)]
    jitter = v2.ColorJitter(0.4, 0.4, 0.4)
    orders, factors, expected = [], [], []
    for seed, image in enumerate(images):
        torch.manual_seed(seed)
        params = jitter.make_params([])
        orders.append(params["fn_idx"])
        factors.append([params["brightness_factor"], params["contrast_factor"], params["saturation_factor"]])
        expected.append(np.asarray(jitter.transform(Image.fromarray(image), params)))
    canvas = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    ours = color_jitter(canvas, torch.tensor([[20, 30]] * 6), torch.stack(orders), torch.tensor(factors))
    expected = torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2).float()
    assert (ours - expected).abs().max() <= 1


def test_exif_orientation_is_applied_before_the_box():
    """A JPEG stored sideways with EXIF orientation 6 gives the example of the upright image."""
    method, processor = build_method("mae")
    spec = dataclasses.replace(method.fast_views(processor), reduced_decoding=False)
    stored = jpeg_bytes(5, 120, 90, exif_orientation=6)
    upright = Image.open(io.BytesIO(stored)).transpose(Image.Transpose.ROTATE_270)  # what orientation 6 means
    fast = DeviceViews(spec)(collate([apply_seeded(HostSampler(spec), Image.open(io.BytesIO(stored)), 7)]))
    reference = apply_seeded(method.train_transform(processor), upright.convert("RGB"), 7)
    mean, std = processor.image_mean, processor.image_std
    assert_close_levels(levels(fast["pixel_values"], mean, std), levels(reference["pixel_values"][None], mean, std),
                        reduced=False)


# ---------------------------------------------------------------------------------------------
# Data sets: unreadable images, batches
# ---------------------------------------------------------------------------------------------


def write_jpeg_parquet(path: Path, count: int, broken=(), truncated=()) -> Path:
    def entry(i):
        data = IMAGES[i % len(IMAGES)]
        if i in broken:
            data = b"not an image"
        elif i in truncated:
            data = data[: len(data) // 2]
        return {"bytes": data, "path": f"img{i}.jpg"}

    images = [entry(i) for i in range(count)]
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})).to_parquet(
        str(path))
    return path


def test_unreadable_images_are_skipped_and_counted_as_on_the_reference_path(tmp_path, caplog):
    data = load_image_datasets(train_file=str(write_jpeg_parquet(tmp_path / "t.parquet", 8, broken=(2,),
                                                                 truncated=(3,))), train_val_split=None)
    method, processor = build_method("mae")
    fast = FastImageExamples(data.train, data.image_column, method.fast_views(processor))
    reference = ImageExamples(data.train, data.image_column, method.train_transform(processor))
    with caplog.at_level(logging.WARNING):
        for key in [(2, 11), (3, 12), (1, 13), (7, 14)]:
            ours, theirs = fast[key], reference[key]
            assert int(ours["num_skipped"]) == int(theirs["num_skipped"])
            torch.testing.assert_close(ours["noise"], theirs["noise"], rtol=0, atol=0)
    assert int(fast[(2, 0)]["num_skipped"]) == 2  # 2 (no image) and 3 (truncated): image 4 fills the slot
    assert "Skipping unreadable image 3" in caplog.text


def test_an_error_that_is_not_the_decoders_is_not_taken_for_an_unreadable_image(tmp_path):
    data = load_image_datasets(train_file=str(write_jpeg_parquet(tmp_path / "t.parquet", 2)), train_val_split=None)
    method, processor = build_method("mae")

    def broken_extras(generator):
        raise KeyError("a bug in a method's extras")

    spec = dataclasses.replace(method.fast_views(processor), extras=broken_extras)
    with pytest.raises(KeyError, match="a bug"):
        FastImageExamples(data.train, data.image_column, spec)[(0, 1)]


def test_collate_pads_canvases_and_keeps_the_rest():
    examples = [{"canvas": torch.full((h, w, 3), value, dtype=torch.uint8), "noise": torch.rand(4)}
                for (h, w), value in (((5, 9), 7), ((8, 4), 9))]
    batch = collate(examples)
    assert batch["canvas"].shape == (2, 8, 9, 3) and batch["canvas"].dtype == torch.uint8  # [B, H, W, C]
    assert batch["canvas"][0, :5].eq(7).all() and batch["canvas"][1, :8, :4].eq(9).all()
    assert batch["noise"].shape == (2, 4)


# ---------------------------------------------------------------------------------------------
# The loop: workers and data_wait
# ---------------------------------------------------------------------------------------------


def test_workers_default_to_the_cores_of_the_process(monkeypatch, caplog):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers(1) == 15 and default_num_workers(8) == 1
    with caplog.at_level(logging.WARNING):
        check_num_workers(4, cores=2)
    assert "--dataloader_num_workers 4" in caplog.text and "--dataloader_num_workers 1" in caplog.text


def test_data_wait_meter_warns_when_data_is_the_bottleneck(caplog):
    import time

    meter = DataWaitMeter()

    def slow_batches():
        for i in range(2):
            time.sleep(0.02)
            yield i

    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # the first window (workers starting) never warns
            assert list(meter.timed(slow_batches())) == [0, 1]
            values = meter.flush(steps=2, hint="Raise --dataloader_num_workers.")
            assert values["data_wait"] >= 0.015 and values["data_wait_fraction"] > 0.5
    assert caplog.text.count("data loader is the bottleneck") == 1


def fast_run(train: Path, output_dir: Path) -> list[str]:
    # 12 images in batches of 4: 3 steps per epoch, so the checkpoint at step 2 lies inside epoch 0.
    return ["--train_file", str(train), "--output_dir", str(output_dir), "--config_name", "mae-demo",
            "--data_pipeline", "fast", "--train_val_split", "0", "--max_steps", "4", "--per_device_train_batch_size",
            "4", "--logging_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0", "--no-do_eval",
            "--checkpointing_steps", "2", "--save_total_limit", "0"]


def test_fast_run_resumes_exactly_and_logs_data_wait(tmp_path, capsys):
    import shutil

    train = write_jpeg_parquet(tmp_path / "train.parquet", 12, broken=(5,))
    main(fast_run(train, tmp_path / "run"))
    assert "the fast pipeline, 0 data-loader worker(s) (asked" in capsys.readouterr().err  # the start-of-run line
    log = str(tmp_path / "run" / LOG_FILE)
    waits = read_log(log, "data_wait")
    assert sorted(waits) == [1, 2, 3, 4] and all(value >= 0 for value in waits.values())
    assert max(read_log(log, "skipped_images").values()) >= 1  # the broken image, counted
    shutil.copytree(tmp_path / "run" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    main(fast_run(train, tmp_path / "resumed"))
    expected, resumed = read_log(log, "loss"), read_log(str(tmp_path / "resumed" / LOG_FILE), "loss")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):  # the same crops, flips and masks after the resume
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6)
