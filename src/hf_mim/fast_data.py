"""The fast training data path (`--data_pipeline fast`, the default on GPUs): decide on the host, compute on the device.

The reference path (`hf_mim.data.ImageExamples` + a method's `train_transform`) decodes every image
fully and crops, resizes, flips, jitters and normalises it in a data-loader worker, then ships
float32 tensors. Here a data-loader worker only

1. opens the image (header only) and draws the crop box, flip and colour jitter with torch's RNG
   seeded per example, calling the SAME torchvision objects in the SAME order as the reference, so
   the boxes, flips, jitter factors (and the method's masks, drawn from the example's generator)
   are identical and resuming stays exact;
2. decodes a JPEG at a reduced scale when the box allows (Pillow's `draft()`: libjpeg's DCT-domain
   1/2, 1/4, 1/8 downscaling, chosen so that the box keeps at least the output's pixels: the
   remaining resize is still a downscale, antialiased as Pillow does);
3. ships the uint8 pixels of the box (of the whole image when the colour jitter needs its mean grey),
   in one padded uint8 canvas per batch (channels last, in shared memory) with each box and flip.

With `--jpeg_decoding device` (the default on CUDA) step 2 leaves the worker for JPEGs: it ships the
file's bytes and the training process decodes the batch on its device (`hf_mim.device_decoding`).

:class:`DeviceViews` then makes every view of the whole batch on the training device with Pillow's
arithmetic (`hf_mim.resampling`): the model view and, for BEiT-style methods, the tokenizer view of
the same box at the tokenizer's size and interpolation, then normalises. A method declares what it
needs with :class:`FastViews` (views: key, size, interpolation, mean/std; crop scale/ratio, flip,
jitter; its non-pixel tensors); `None` keeps the reference path.

Pixels agree with the reference within 2 uint8 levels (mean < 0.1) when no reduced decoding happens
(Pillow's fixed-point vs our float rounding), and closely otherwise (libjpeg's DCT downscaling vs full decoding
+ Pillow's filter); `tests/test_fast_data.py` states and checks the tolerances. Unreadable images
are skipped and counted exactly as on the reference path (same decoder, same loop).
"""

from __future__ import annotations

import copy
import functools
import io
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from .data import ImageExamples, apply_seeded, decode_image, finish_decoding
from .device_decoding import (EncodedBatch, EncodedJpeg, crop_bounds, decodable_on_device, decode_files,
                              device_decoding_problem, pillow_or_error, place_in_canvas, uint8_tensor, upright_crop)
from .resampling import color_jitter, resize_boxes

logger = logging.getLogger(__name__)

DATA_PIPELINES = ("auto", "fast", "reference")
# JPEG scales libjpeg decodes directly (Pillow's draft() picks among these).
DRAFT_REDUCTIONS = (8, 4, 2, 1)
# EXIF orientations that swap width and height (transposed or rotated by 90 degrees).
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
EXIF_ORIENTATION = 0x0112
# Keys of the host -> device batch (popped by DeviceViews).
CANVAS, BOX, LIMITS, FLIP, VALID, JITTER_ORDER, JITTER_FACTORS = (
    "canvas", "crop_box", "crop_limits", "flip", "image_valid", "jitter_order", "jitter_factors")
# With device decoding (hf_mim.device_decoding): the JPEGs (an EncodedBatch) and the canvas' slots in the batch.
ENCODED, CANVAS_SLOTS = "encoded_jpegs", "canvas_slots"


@dataclass(frozen=True)
class PixelView:
    """One view of the crop box: stored under `key`, `size` (h, w), resized with `interpolation`
    (bicubic, lanczos, bilinear: Pillow's filters); normalised with mean/std, or [0, 1] pixels when
    None; `unit_key` also keeps the [0, 1] pixels (e.g. for targets computed from them)."""

    key: str
    size: tuple[int, int]
    interpolation: str = "bicubic"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    unit_key: str | None = None


@dataclass(frozen=True)
class FastViews:
    """What a method's training example needs, declared. The augmentation is torchvision's
    RandomResizedCrop box (`scale`, `ratio`) with a horizontal flip, and a ColorJitter of strength
    `color_jitter` (brightness = contrast = saturation; 0 = none). `jitter_and_flip_first`: the
    reference jitters and flips the whole image BEFORE drawing the box (BEiT's two-view crop); else
    it draws the box, then the flip (MAE). `extras(generator)`: the example's non-pixel tensors
    (noise, masks) drawn from its generator, as the reference transform draws them. `finish(batch)`:
    tensors computed on the device from the views (e.g. ViT-MPP's colour targets)."""

    views: tuple[PixelView, ...]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    color_jitter: float = 0.0
    jitter_and_flip_first: bool = False
    extras: Callable[[torch.Generator], dict[str, torch.Tensor]] | None = None
    finish: Callable[[dict], dict] | None = None
    reduced_decoding: bool = True

    def __post_init__(self):
        if self.color_jitter and not self.jitter_and_flip_first:
            raise ValueError("FastViews: colour jitter is applied to the whole image before the crop "
                             "(jitter_and_flip_first=True), as BEiT's reference does.")

    @property
    def largest_view(self) -> tuple[int, int]:
        return max(view.size[0] for view in self.views), max(view.size[1] for view in self.views)


# ---------------------------------------------------------------------------------------------
# Host: draw the augmentation, decode what the box needs
# ---------------------------------------------------------------------------------------------


class UnreadableImage(Exception):
    """A decoder error (its cause), told apart from other errors inside the example's transform."""


def open_image(value) -> Image.Image:
    """A `datasets.Image(decode=False)` value opened lazily (header read, pixels not decoded);
    remote files and PIL images come decoded (`decode_image`). Raises UnreadableImage."""
    try:
        if isinstance(value, dict) and value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if isinstance(value, dict) and value.get("path") and os.path.isfile(value["path"]):
            return Image.open(value["path"])
        return decode_image(value, mode=value.mode if isinstance(value, Image.Image) else "RGB")
    except Exception as error:  # any decoder error (PIL raises OSError, ValueError, SyntaxError ...)
        raise UnreadableImage(error) from error


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag from the header (1 = upright; an unreadable EXIF block counts as upright)."""
    if "exif" not in image.info:
        return 1
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block does not make the pixels unreadable
        return 1


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) once the EXIF orientation is applied, from the header."""
    width, height = image.size
    return (width, height) if exif_orientation(image) in SWAPPING_ORIENTATIONS else (height, width)


def decode_reduced(image: Image.Image, reduction: int, mode: str) -> tuple[Image.Image, float]:
    """Decode at 1/`reduction` scale when the format allows (JPEG), else fully. Returns the image and
    the reduction actually applied (full-resolution pixels per decoded pixel). Raises UnreadableImage."""
    width, height = image.size
    applied = 1.0
    try:
        if reduction > 1 and image.format == "JPEG":
            drafted = image.draft(None, (width // reduction, height // reduction))
            if drafted is not None:
                applied = width / drafted[1][2]
        image.load()  # decode now: truncated files fail here, as in decode_image
        return finish_decoding(image, mode), applied
    except Exception as error:  # any decoder error, as ImageExamples.read
        raise UnreadableImage(error) from error


@dataclass
class Augmentation:
    box: tuple[int, int, int, int]  # top, left, height, width in the oriented full-resolution image, unflipped
    flip: bool
    jitter_order: torch.Tensor | None = None  # [4] ColorJitter's fn_idx
    jitter_factors: torch.Tensor | None = None  # [3] brightness, contrast, saturation


class HostSampler:
    """Draws an example's augmentation with torch's global RNG (seeded per example by the caller)
    exactly as the reference transforms draw it, and decodes the pixels the box needs."""

    def __init__(self, spec: FastViews, image_mode: str = "RGB"):
        self.spec, self.image_mode = spec, image_mode
        self.crop = v2.RandomResizedCrop(spec.largest_view, scale=spec.scale, ratio=spec.ratio)  # box sampling only
        strength = spec.color_jitter
        self.jitter = v2.ColorJitter(strength, strength, strength) if strength else None

    def draw(self, height: int, width: int) -> Augmentation:
        """The reference's draws in the reference's order (see FastViews.jitter_and_flip_first)."""
        order = factors = None
        flip = False
        if self.jitter is not None:
            params = self.jitter.make_params([])  # fn_idx, then the three factors (hue off)
            order = params["fn_idx"]
            factors = torch.tensor([params[name] for name in ("brightness_factor", "contrast_factor",
                                                              "saturation_factor")], dtype=torch.float32)
        if self.spec.flip and self.spec.jitter_and_flip_first:
            flip = bool(torch.rand(1) < 0.5)  # v2.RandomHorizontalFlip(p=0.5)
        size_only = torch.empty((), dtype=torch.uint8).expand(1, height, width)  # no pixels: only the size is read
        box = self.crop.make_params([size_only])
        top, left, box_h, box_w = box["top"], box["left"], box["height"], box["width"]
        if self.spec.flip and not self.spec.jitter_and_flip_first:
            flip = bool(torch.rand(1) < 0.5)
        elif flip:  # the box was drawn on the flipped image: the same pixels, mirrored, of the original
            left = width - left - box_w
        return Augmentation((top, left, box_h, box_w), flip, order, factors)

    def reduction(self, augmentation: Augmentation) -> int:
        """The largest JPEG scale that keeps the box at least as large as every view."""
        if not self.spec.reduced_decoding:
            return 1
        _, _, box_h, box_w = augmentation.box
        out_h, out_w = self.spec.largest_view
        return next(r for r in DRAFT_REDUCTIONS if box_h / r >= out_h and box_w / r >= out_w or r == 1)

    def __call__(self, image: Image.Image, generator: torch.Generator, encoded: bytes | None = None
                 ) -> dict[str, torch.Tensor]:
        """The example's augmentation and pixels; given the file's bytes (`encoded`), a JPEG the device
        can decode is shipped as bytes instead (hf_mim.device_decoding)."""
        height, width = oriented_size(image)
        augmentation = self.draw(height, width)
        if encoded is not None and decodable_on_device(image, encoded, self.image_mode):
            example = self.encoded(encoded, exif_orientation(image), augmentation, height, width)
        else:
            image, reduction = decode_reduced(image, self.reduction(augmentation), self.image_mode)
            example = self.pixels(image, augmentation, reduction)
        if self.spec.extras is not None:
            example.update(self.spec.extras(generator))
        return example

    def layout(self, augmentation: Augmentation, reduction: float, height: int, width: int) -> dict:
        """What to ship of a (height, width) decoded image: the crop (top, left, bottom, right; the
        box's pixels, or the whole image for the jitter, whose contrast needs its mean grey), and the
        box and its limits inside that crop; the flip and jitter draws."""
        box = [value / reduction for value in augmentation.box]  # top, left, height, width
        limits = crop_bounds(box, height, width)  # top, left, bottom, right
        example = {FLIP: torch.tensor(augmentation.flip)}
        if self.jitter is None:  # ship only the box
            crop = tuple(limits)
            box[:2] = box[0] - limits[0], box[1] - limits[1]
            limits = [0, 0, limits[2] - limits[0], limits[3] - limits[1]]
        else:
            crop = (0, 0, height, width)
            example[JITTER_ORDER], example[JITTER_FACTORS] = augmentation.jitter_order, augmentation.jitter_factors
        example[VALID] = torch.tensor([crop[2] - crop[0], crop[3] - crop[1]])
        example[BOX] = torch.tensor(box, dtype=torch.float32)
        example[LIMITS] = torch.tensor(limits, dtype=torch.float32)
        return example | {"crop": crop}

    def pixels(self, image: Image.Image, augmentation: Augmentation, reduction: float) -> dict[str, torch.Tensor]:
        """The uint8 pixels (the box's, or the whole image's for the jitter) and the box inside them."""
        example = self.layout(augmentation, reduction, image.height, image.width)
        top, left, bottom, right = example.pop("crop")
        if (bottom - top, right - left) != (image.height, image.width):
            image = image.crop((left, top, right, bottom))
        pixels = torch.from_numpy(np.array(image))  # [h, w, C] or [h, w]: rows of pixels, as decoded
        example[CANVAS] = pixels if pixels.ndim == 3 else pixels[..., None]
        return example

    def encoded(self, data: bytes, orientation: int, augmentation: Augmentation, height: int, width: int) -> dict:
        """The JPEG's bytes and what the device keeps of the full-scale upright image (no pixels here)."""
        example = self.layout(augmentation, 1, height, width)
        example[ENCODED] = EncodedJpeg(data, orientation, (height, width), example.pop("crop"))
        return example


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack examples; the pixels of different sizes go into one uint8 canvas [B, H, W, C] (channels
    last: each row is one memcpy), in shared memory inside a worker (no copy to send it). The padding
    is left unset: nothing reads it (see resize_boxes' limits). Examples shipped as JPEG bytes go into
    an EncodedBatch; the canvas then holds the others only ([B_host, H, W, C]), in `CANVAS_SLOTS`."""
    encoded = {slot: example.pop(ENCODED) for slot, example in enumerate(examples) if ENCODED in example}
    pixels = [example.pop(CANVAS) for example in examples if CANVAS in example]
    batch = default_collate(examples)
    batch[CANVAS] = pad_into_canvas(pixels)
    if encoded:
        batch[CANVAS_SLOTS] = torch.tensor([slot for slot in range(len(examples)) if slot not in encoded])
        batch[ENCODED] = EncodedBatch.pack(list(encoded), list(encoded.values()))
    return batch


def pad_into_canvas(pixels: list[torch.Tensor], channels: int = 3) -> torch.Tensor:
    """[h, w, C] uint8 images -> one canvas [B, H, W, C] (uninitialised padding)."""
    height, width = max((p.shape[0] for p in pixels), default=0), max((p.shape[1] for p in pixels), default=0)
    shape = (len(pixels), height, width, pixels[0].shape[2] if pixels else channels)
    canvas = uint8_tensor(math.prod(shape)).view(shape)
    for slot, image in zip(canvas, pixels):
        slot[:image.shape[0], :image.shape[1]] = image
    return canvas


class FastImageExamples(ImageExamples):
    """ImageExamples whose examples are HostSampler outputs (see the module docstring): the same
    indices, seeds, skipping and counting of unreadable images; batches need `collate` and then
    `device_views` on the training device."""

    def __init__(self, dataset, image_column: str, spec: FastViews, image_mode: str = "RGB",
                 label_column: str | None = None, device_decoding: bool = False):
        super().__init__(dataset, image_column, HostSampler(spec, image_mode), image_mode, label_column)
        self.device_decoding = device_decoding  # workers ship JPEG bytes, DeviceViews decodes them
        self.device_views = DeviceViews(spec, replacement=self.replacement)
        self.collate = collate

    def from_row(self, row: dict, sample_seed: int, where):
        """`where`: the row's index (a map-style data set, where device decoding needs it), or a stream's label."""
        value = row[self.image_column]
        try:  # the lazy open reads the header; the decode inside the transform (or on the device) the rest
            data = file_bytes(value) if self.device_decoding else None
            transform = functools.partial(self.transform, encoded=data) if data else self.transform
            example = apply_seeded(transform, open_image({"bytes": data} if data else value), sample_seed)
        except UnreadableImage as error:  # not other errors: a bug must not pass for unreadable images
            self.unreadable.report(where, value, error.__cause__)
            return None
        if ENCODED in example:  # to find the example that replaces it, should the device find it unreadable
            example[ENCODED] = replace(example[ENCODED], index=where, sample_seed=sample_seed)
        return example

    def replacement(self, index: int, sample_seed: int, error: Exception) -> dict[str, torch.Tensor]:
        """For image `index`, found unreadable in the main process (hf_mim.device_decoding): logged and
        counted as the workers do, and the example the reference path puts in its slot, the next readable
        image's with the same sample seed (decoded here, by Pillow); its `num_skipped` counts from there."""
        self.unreadable.report(index, self.dataset[index][self.image_column], error)
        on_host = copy.copy(self)
        on_host.device_decoding = False
        return on_host[((index + 1) % len(self), sample_seed)]

    @property
    def decoding(self) -> str:
        """Where JPEGs are decoded, for the start-of-run line."""
        return ("JPEGs decoded on the training device in the main process (torchvision decode_jpeg)"
                if self.device_decoding else "images decoded in the data-loader workers")


class FastRows:
    """The fast path's examples for a stream (hf_mim.streaming makes the batches): row -> the HostSampler
    example (FastImageExamples.from_row), or None when the image is unreadable (logged). Images are decoded
    in the data-loader workers: a device decoder's replacement of an unreadable image needs the map-style
    index that a stream has not."""

    collate = staticmethod(collate)
    decoding = "images decoded in the data-loader workers (a stream: no device decoding)"

    def __init__(self, spec: FastViews, image_column: str, image_mode: str = "RGB"):
        self.examples = FastImageExamples(None, image_column, spec, image_mode=image_mode)  # rows: the stream's
        self.device_views = self.examples.device_views

    def __call__(self, row: dict, sample_seed: int, where: str) -> dict[str, torch.Tensor] | None:
        return self.examples.from_row(row, sample_seed, where)


def file_bytes(value) -> bytes | None:
    """The encoded file of a `datasets.Image(decode=False)` value (its bytes, or a local file's), or None
    (remote files, decoded PIL images: the workers decode those). Raises UnreadableImage."""
    try:
        if isinstance(value, dict) and value.get("bytes"):
            return value["bytes"]
        if isinstance(value, dict) and value.get("path") and os.path.isfile(value["path"]):
            with open(value["path"], "rb") as file:
                return file.read()
        return None
    except OSError as error:
        raise UnreadableImage(error) from error


def fast_training_examples(args, method, processor, dataset, image_column: str,
                           device: torch.device) -> FastImageExamples | FastRows | None:
    """The training examples of `--data_pipeline fast` (`auto`: off the CPU), or None (logged) for the
    reference path: when asked, or when the method declares no FastViews. A stream gets FastRows."""
    pipeline = args.data_pipeline
    if pipeline == "reference" or (pipeline == "auto" and device.type == "cpu"):
        return None
    spec = method.fast_views(processor)
    if spec is None:
        logger.info("--method %s declares no fast views: training examples take the reference data path.", method.name)
        return None
    if isinstance(dataset, datasets.IterableDataset):  # hf_mim.streaming batches these examples
        if args.jpeg_decoding == "device":
            logger.warning("--jpeg_decoding device: a streamed data set's JPEGs are decoded in the data-loader "
                           "workers (replacing an image the device finds unreadable needs a map-style data set).")
        return FastRows(spec, image_column, image_mode=method.image_mode)
    return FastImageExamples(dataset, image_column, spec, image_mode=method.image_mode,
                             device_decoding=decode_jpegs_on_device(args.jpeg_decoding, device))


def decode_jpegs_on_device(choice: str, device: torch.device) -> bool:
    """`--jpeg_decoding`: device, host, or auto (the device on CUDA, where torchvision decodes with nvJPEG,
    if it can; elsewhere decode_jpeg would be libjpeg-turbo in the main process: host)."""
    if choice == "host" or (choice == "auto" and device.type != "cuda"):
        return False
    problem = device_decoding_problem(device)
    if problem and choice == "device":
        raise RuntimeError(f"--jpeg_decoding device: torchvision cannot decode JPEGs on {device} ({problem}). "
                           "Pass --jpeg_decoding host (the data-loader workers decode them).")
    if problem:
        logger.warning("JPEG decoding on %s is not available (%s): the data-loader workers decode JPEGs.", device,
                       problem)
    return not problem


# ---------------------------------------------------------------------------------------------
# Device: every view of the whole batch
# ---------------------------------------------------------------------------------------------


class DeviceViews:
    """Batch from the loader (on the training device) -> the model's inputs: the JPEGs decoded (if the
    workers shipped any), jitter (per sample), crop + resize + flip of every view, normalisation, then
    the method's `finish`. `replacement(index, sample_seed, error)`: the example for the slot of an
    image found unreadable here (FastImageExamples.replacement)."""

    def __init__(self, spec: FastViews, replacement: Callable[[int, int, Exception], dict] | None = None):
        self.spec, self.replacement = spec, replacement

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        canvas = batch.pop(CANVAS)  # [B, H, W, C] uint8, or [B_host, H, W, C] next to the JPEGs
        if ENCODED in batch:
            canvas = self.decoded_canvas(batch, canvas)
        canvas = canvas.permute(0, 3, 1, 2).float()  # [B, C, H, W] uint8 levels
        boxes, limits, flips, valid = (batch.pop(key) for key in (BOX, LIMITS, FLIP, VALID))
        if JITTER_ORDER in batch:
            canvas = color_jitter(canvas, valid, batch.pop(JITTER_ORDER), batch.pop(JITTER_FACTORS))
        for view in self.spec.views:
            pixels = resize_boxes(canvas, boxes.float(), limits.float(), flips.bool(), view.size,
                                  view.interpolation) / 255.0  # [B, C, h, w] in [0, 1]
            if view.unit_key:
                batch[view.unit_key] = pixels
            batch[view.key] = pixels if view.mean is None else normalize(pixels, view.mean, view.std)
        return self.spec.finish(batch) if self.spec.finish is not None else batch

    def decoded_canvas(self, batch: dict, host_canvas: torch.Tensor) -> torch.Tensor:
        """Decode the batch's JPEGs on the canvas' device and return the whole batch's canvas [B, H, W, C];
        an unreadable image's slot gets its replacement (all its tensors, its pixels, its skip count)."""
        encoded: EncodedBatch = batch.pop(ENCODED)
        host_slots, device = batch.pop(CANVAS_SLOTS), host_canvas.device
        files = encoded.files()
        pieces = {}  # slot -> [h, w, 3] uint8 on the device
        for slot, image, file, decoded in zip(encoded.slots, encoded.images, files, decode_files(files, device)):
            piece = upright_piece(image, file, decoded, device)
            if isinstance(piece, Exception):  # unreadable: the slot takes the replacement example
                example = self.replacement(image.index, image.sample_seed, piece)
                piece = example.pop(CANVAS).to(device)
                self.put_example(batch, slot, example, device)
            pieces[slot] = piece
        return place_in_canvas(pieces, host_canvas, host_slots.to(device), len(batch[FLIP]))

    @staticmethod
    def put_example(batch: dict, slot: int, example: dict, device: torch.device) -> None:
        """Write a replacement example's tensors into row `slot` of the batch; add its skipped images."""
        skipped = batch["num_skipped"][slot] + 1 + example.pop("num_skipped")
        for key, value in example.items():
            if key in batch:
                batch[key][slot] = value.to(device)
        batch["num_skipped"][slot] = skipped


def upright_piece(image: EncodedJpeg, file: torch.Tensor, decoded: torch.Tensor | Exception,
                  device: torch.device) -> torch.Tensor | Exception:
    """[h, w, 3] of the upright image's crop, or Pillow's error when the image is unreadable."""
    if isinstance(decoded, torch.Tensor):
        try:
            return upright_crop(decoded, image)
        except ValueError:  # the device decoder's size is not the header's: Pillow decides
            decoded = pillow_or_error(file.numpy().tobytes(), device)
    return upright_crop(decoded, image) if isinstance(decoded, torch.Tensor) else decoded


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, device=pixels.device, dtype=pixels.dtype)[:, None, None]
    std = torch.tensor(std, device=pixels.device, dtype=pixels.dtype)[:, None, None]
    return (pixels - mean) / std


__all__ = [
    "DATA_PIPELINES", "DeviceViews", "FastImageExamples", "FastRows", "FastViews", "HostSampler", "PixelView",
    "UnreadableImage", "collate",
    "decode_reduced", "fast_training_examples", "open_image",
]
