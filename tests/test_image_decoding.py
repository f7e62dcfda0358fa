"""Pixels as the file means them, from every source: `hf_mim.data.decode_image` is the one decoder
of image folders, parquet files (the `Image` feature, or a plain binary column) and streams.

Each case is a real file (JPEG with an EXIF orientation, 16-bit PNG, palette PNG with transparency,
CMYK JPEG, grey + alpha PNG) with the RGB pixels it should decode to; every case is read through
every source and must give those pixels."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
from PIL import Image

from hf_mim.data import ImageExamples, StreamingImageExamples, decode_image, load_image_datasets

ORIENTATION = 0x0112  # the EXIF tag
ROTATED_90_CW = 6  # "the 0th row is the visual right-hand side": viewers turn the image 90 degrees clockwise


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def exif_rotated_jpeg() -> tuple[bytes, np.ndarray]:
    """Stored 64 wide x 32 tall, red left half and blue right half, tagged "turn 90 degrees clockwise":
    it means an image 32 wide x 64 tall, red on top."""
    stored = np.zeros((32, 64, 3), dtype=np.uint8)  # [H, W, 3]
    stored[:, :32] = (255, 0, 0)
    stored[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[ORIENTATION] = ROTATED_90_CW
    meant = np.rot90(stored, k=-1)  # clockwise: [64, 32, 3]
    return encode(Image.fromarray(stored), "JPEG", quality=100, subsampling=0, exif=exif), meant


def grey_16_bit_png() -> tuple[bytes, np.ndarray]:
    """Mid grey (32768 of 65535) and near black (1028) in 16 bits: 128 and 4 in 8 bits (clipping made it 255)."""
    pixels = np.full((8, 8), 32768, dtype=np.uint16)
    pixels[:4] = 1028
    meant = np.repeat(np.rint(pixels / 257.0).astype(np.uint8)[..., None], 3, axis=2)
    return encode(Image.fromarray(pixels), "PNG"), meant


def palette_png() -> tuple[bytes, np.ndarray]:
    """A palette image with a transparent entry: each pixel is its palette colour."""
    colours = np.array([(250, 10, 10), (10, 250, 10), (10, 10, 250)], dtype=np.uint8)
    indices = np.arange(64, dtype=np.uint8).reshape(8, 8) % 3
    image = Image.fromarray(indices, mode="P")
    image.putpalette(colours.flatten().tolist())
    return encode(image, "PNG", transparency=2), colours[indices]


def cmyk_jpeg() -> tuple[bytes, np.ndarray]:
    """Pure cyan and pure yellow ink: (0, 255, 255) and (255, 255, 0) on screen."""
    ink = np.zeros((16, 16, 4), dtype=np.uint8)
    ink[:8, :, 0] = 255  # cyan
    ink[8:, :, 2] = 255  # yellow
    meant = np.zeros((16, 16, 3), dtype=np.uint8)
    meant[:8] = (0, 255, 255)
    meant[8:] = (255, 255, 0)
    return encode(Image.fromarray(ink, mode="CMYK"), "JPEG", quality=100), meant


def grey_alpha_png() -> tuple[bytes, np.ndarray]:
    """Grey 100 at half opacity: the grey, alpha dropped (as torchvision and timm do)."""
    pixels = np.stack([np.full((8, 8), 100, np.uint8), np.full((8, 8), 128, np.uint8)], axis=2)
    return encode(Image.fromarray(pixels, mode="LA"), "PNG"), np.full((8, 8, 3), 100, np.uint8)


def float_tiff_0_255() -> tuple[bytes, np.ndarray]:
    """A 32-bit float TIFF holding 8-bit values (0-255), as scientific and medical tools write them: the same
    values in 8 bits (scaled as 16-bit data they came out near black, 255 -> 1)."""
    pixels = np.linspace(0.0, 255.0, 64, dtype=np.float32).reshape(8, 8)
    meant = np.repeat(np.rint(pixels).astype(np.uint8)[..., None], 3, axis=2)
    return encode(Image.fromarray(pixels, mode="F"), "TIFF"), meant


CASES = {"exif_orientation": (exif_rotated_jpeg, "jpg", 6), "grey_16_bit": (grey_16_bit_png, "png", 0),
         "palette_transparency": (palette_png, "png", 0), "cmyk": (cmyk_jpeg, "jpg", 6),
         "grey_alpha": (grey_alpha_png, "png", 0),
         "float_tiff_0_255": (float_tiff_0_255, "tif", 0)}  # name: (make, file suffix, JPEG tolerance)


def images_from(source: str, tmp_path, data: bytes, suffix: str) -> list[Image.Image]:
    """The image read back through one source, as the training scripts read it."""
    if source == "folder":
        (tmp_path / "train" / "a").mkdir(parents=True)
        (tmp_path / "train" / "a" / f"image.{suffix}").write_bytes(data)
        loaded = load_image_datasets(train_dir=str(tmp_path / "train"), train_val_split=None)
    else:
        column = {"bytes": data, "path": None} if source == "parquet" else data
        features = datasets.Features({"image": datasets.Image() if source == "parquet" else datasets.Value("binary")})
        datasets.Dataset.from_dict({"image": [column]}, features=features).to_parquet(str(tmp_path / "d.parquet"))
        loaded = load_image_datasets(train_file=str(tmp_path / "d.parquet"), train_val_split=None,
                                     streaming=source == "stream")
    keep = lambda image, generator: {"image": np.asarray(image)}  # noqa: E731
    if source == "stream":
        return [example["image"] for example in StreamingImageExamples(loaded.train, "image", keep, seed=0,
                                                                        shuffle=False)]
    return [ImageExamples(loaded.train, loaded.image_column, keep)[0]["image"]]


@pytest.mark.parametrize("source", ["folder", "parquet", "binary_parquet", "stream"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_source_decodes_the_pixels_the_file_means(case, source, tmp_path):
    make, suffix, tolerance = CASES[case]
    data, meant = make()
    (pixels,) = images_from(source, tmp_path, data, suffix)
    assert pixels.shape == meant.shape, f"{case} from {source}: {pixels.shape}, meant {meant.shape}"
    assert np.abs(pixels.astype(int) - meant.astype(int)).max() <= tolerance


def test_the_16_bit_scaling_follows_the_bit_depth():
    """A float image in [0, 1] is scaled by 255; grey modes keep the requested output mode."""
    ramp = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    decoded = np.asarray(decode_image(Image.fromarray(ramp, mode="F"), mode="L"))
    np.testing.assert_array_equal(decoded, np.rint(ramp * 255).astype(np.uint8))
    assert decode_image(encode(Image.fromarray(np.full((2, 2), 65535, np.uint16)), "PNG"), mode="L").getpixel((0, 0)) \
        == 255


def test_a_column_of_other_values_is_still_refused(tmp_path):
    datasets.Dataset.from_dict({"image": ["a.png"]}).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(ValueError, match="not images"):
        load_image_datasets(train_file=str(tmp_path / "d.parquet"), train_val_split=None)
