"""JPEG decoding on the training device, for the fast data path (`--jpeg_decoding device`, the default on CUDA).

With host decoding the data-loader workers decode every JPEG (`hf_mim.fast_data`); at 500x375 that is
most of a worker's cost. Here a worker only

1. reads the file's bytes and its header (size, mode, EXIF orientation), draws the crop box, flip,
   jitter and masks exactly as before (same seeds, same torchvision objects: resuming stays exact),
2. checks that the JPEG can go to the device (:func:`decodable_on_device`) and, if so, ships its bytes:
   one flat uint8 tensor per batch (shared memory in a worker) in an :class:`EncodedBatch`, which
   accelerate and the pin-memory thread pass through untouched (it has no `to`/`pin_memory`).

The main process then decodes the batch's JPEGs with `torchvision.io.decode_jpeg` (:func:`decode_files`):
nvJPEG in one batched call on CUDA, libjpeg-turbo on the CPU (the same code, which the tests run),
turns each by its EXIF orientation (nvJPEG ignores `apply_exif_orientation`, so we never use it),
cuts out the part the box needs and places it in the batch's canvas next to the images the workers
decoded (PNGs, CMYK JPEGs, grey models, truncated files: mixed batches are normal).

Unreadable images are counted exactly as on the reference path, where Pillow decides:
- a JPEG whose markers do not run to its end (EOI) is what Pillow calls truncated: it is decoded in the
  worker, where Pillow fails on it and the worker skips and counts it as today;
- when the device decoder rejects an image, the batch is decoded image by image to find it, and Pillow
  decodes that one in the main process: its pixels are used when Pillow reads it; when Pillow fails too,
  the image is counted (`num_skipped`) and logged, and the next readable image of the data set fills the
  slot with the same sample seed, as the reference path does (`FastImageExamples.replacement`).

Pixels: on the CPU decode_jpeg is bit-identical to Pillow (the same libjpeg-turbo; `tests/test_device_decoding.py`
checks baseline, progressive, 4:2:0/4:2:2/4:4:4, restart-marker and grey files). nvJPEG's inverse DCT and
chroma upsampling are its own: `benchmarks/data_pipeline.py` measures its difference to Pillow per kind of
JPEG on a GPU (`decode_agreement_by_kind`), still to be measured.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from .data import convert_mode

logger = logging.getLogger(__name__)

JPEG_DECODINGS = ("auto", "device", "host")
START_OF_IMAGE, END_OF_IMAGE, START_OF_SCAN = 0xD8, 0xD9, 0xDA
# Markers without a length field: TEM and the restart markers RST0-RST7.
STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
# Pillow's modes of JPEGs whose RGB pixels decode_jpeg gives as Pillow does (CMYK: Pillow's own conversion).
DEVICE_MODES = ("RGB", "L")
# PIL's Image.Transpose per EXIF orientation (as ImageOps.exif_transpose), as tensor ops on [C, H, W].
ORIENTATIONS = {
    2: lambda image: image.flip(-1),  # FLIP_LEFT_RIGHT
    3: lambda image: image.flip(-2, -1),  # ROTATE_180
    4: lambda image: image.flip(-2),  # FLIP_TOP_BOTTOM
    5: lambda image: image.transpose(-2, -1),  # TRANSPOSE
    6: lambda image: image.rot90(-1, (-2, -1)),  # ROTATE_270 (clockwise)
    7: lambda image: image.rot90(1, (-2, -1)).flip(-1),  # TRANSVERSE
    8: lambda image: image.rot90(1, (-2, -1)),  # ROTATE_90 (counter-clockwise)
}


# ---------------------------------------------------------------------------------------------
# Worker: which JPEGs go to the device
# ---------------------------------------------------------------------------------------------


def marker_positions(codes: np.ndarray) -> np.ndarray:
    """Sorted positions of every 0xFF that starts a marker if met in entropy-coded data: not a stuffed
    byte (0xFF00), a restart marker (RST0-7: inside a scan) or a fill byte (0xFF before the marker)."""
    ff = np.flatnonzero(codes[:-1] == 0xFF)
    following = codes[ff + 1]
    return ff[(following != 0x00) & (following != 0xFF) & ((following < 0xD0) | (following > 0xD7))]


def reaches_end_of_image(data: bytes) -> bool:
    """Whether the JPEG's marker segments and scans run to an EOI marker, which Pillow needs: without it
    Pillow raises "image file is truncated" (as libjpeg-turbo's decode_jpeg does), nvJPEG may not.
    Garbage before a marker is skipped, as libjpeg does (with a warning, not an error)."""
    codes = np.frombuffer(data, dtype=np.uint8)
    if len(codes) < 4 or codes[0] != 0xFF or codes[1] != START_OF_IMAGE:
        return False
    scan_ends = None  # marker_positions, computed at the first scan
    position = 2
    while True:
        position = data.find(b"\xff", position)
        while 0 <= position < len(data) - 1 and codes[position + 1] == 0xFF:  # fill bytes before a marker
            position += 1
        if position < 0 or position + 1 >= len(data):
            return False
        marker = codes[position + 1]
        if marker == END_OF_IMAGE:
            return True
        if marker in STANDALONE_MARKERS or marker == 0x00:
            position += 2
            continue
        if position + 4 > len(data):
            return False
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")  # the segment, its length included
        if position > len(data):
            return False
        if marker == START_OF_SCAN:  # entropy-coded data: its end is the next marker
            scan_ends = marker_positions(codes) if scan_ends is None else scan_ends
            following = np.searchsorted(scan_ends, position)
            position = int(scan_ends[following]) if following < len(scan_ends) else len(data)


def decodable_on_device(image: Image.Image, data: bytes, image_mode: str) -> bool:
    """A JPEG (not MPO, ...) of 3-component YCbCr or grey pixels, for a model with RGB inputs, whose
    markers reach EOI. Anything else is decoded in the worker by Pillow, as today."""
    return (image_mode == "RGB" and image.format == "JPEG" and image.mode in DEVICE_MODES
            and image.info.get("adobe_transform", 1) == 1  # Adobe RGB-coded (not YCbCr) JPEGs: Pillow's way
            and reaches_end_of_image(data))


@dataclass
class EncodedJpeg:
    """One example's JPEG, from a worker: its file bytes, EXIF orientation, the upright image's size
    (height, width) and the part of the upright image to keep (top, left, bottom, right); `index` and
    `sample_seed` to replace it if it proves unreadable."""

    data: bytes
    orientation: int
    size: tuple[int, int]
    crop: tuple[int, int, int, int]
    index: int = -1
    sample_seed: int = 0


@dataclass
class EncodedBatch:
    """A batch's JPEGs: their bytes one after another in `data` [total bytes] (uint8, in shared memory
    when made in a worker), and per JPEG its slot in the batch and its EncodedJpeg fields (no bytes)."""

    data: torch.Tensor
    sizes: list[int]
    slots: list[int]
    images: list[EncodedJpeg]

    @classmethod
    def pack(cls, slots: list[int], images: list[EncodedJpeg]) -> EncodedBatch:
        sizes = [len(image.data) for image in images]
        data = uint8_tensor(sum(sizes))
        flat, offset = data.numpy(), 0
        for image, size in zip(images, sizes):
            flat[offset:offset + size] = np.frombuffer(image.data, dtype=np.uint8)
            offset += size
        return cls(data, sizes, slots, [replace(image, data=b"") for image in images])

    def files(self) -> list[torch.Tensor]:
        """One 1-D uint8 CPU tensor per JPEG (views of `data`), as decode_jpeg takes them."""
        return list(torch.split(self.data, self.sizes))


def uint8_tensor(numel: int) -> torch.Tensor:
    """An uninitialised uint8 tensor, in shared memory inside a data-loader worker (sent without a copy)."""
    if torch.utils.data.get_worker_info() is not None:
        return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(numel))
    return torch.empty(numel, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# Main process: decode on the device
# ---------------------------------------------------------------------------------------------


def decode_on(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """decode_jpeg of CPU byte tensors -> [3, H, W] uint8 on `device` (stored orientation). Raises
    RuntimeError when any file fails (it returns no partial results), or without decode_jpeg."""
    try:  # torchvision 0.29 deprecates its decoders for TorchCodec (not a dependency here): a later one may lack it
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as error:
        raise RuntimeError(f"this torchvision has no decode_jpeg: {error}") from error
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device if device.type == "cuda" else "cpu")
    return [image.to(device) for image in images]


def decode_with_pillow(data: bytes) -> torch.Tensor:
    """[3, H, W] uint8, stored orientation: the reference decoder, for a file the device decoder
    rejected. Raises what Pillow raises for an unreadable file."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return torch.from_numpy(np.array(convert_mode(image, "RGB"))).permute(2, 0, 1)


def decode_files(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """Every file decoded on `device` ([3, H, W] uint8, stored orientation): in one call; when that
    fails, file by file, and a file the device rejects by Pillow. A file Pillow cannot read either
    gives Pillow's exception instead of pixels."""
    try:
        return decode_on(files, device)
    except RuntimeError as error:
        logger.debug("Batched JPEG decoding failed (%s); decoding the batch image by image.", error)
    decoded = []
    for file in files:
        try:
            decoded.append(decode_on([file], device)[0])
        except RuntimeError:
            decoded.append(pillow_or_error(file.numpy().tobytes(), device))
    return decoded


def pillow_or_error(data: bytes, device: torch.device) -> torch.Tensor | Exception:
    try:
        return decode_with_pillow(data).to(device)
    except Exception as error:  # any decoder error (PIL raises OSError, ValueError, SyntaxError ...)
        return error


def upright_crop(image: torch.Tensor, encoded: EncodedJpeg) -> torch.Tensor:
    """[3, H, W] stored pixels -> [h, w, 3] of the upright image's crop (channels last, as the canvas).
    Raises ValueError when the decoded size is not the header's (then Pillow decides)."""
    image = ORIENTATIONS.get(encoded.orientation, lambda pixels: pixels)(image)
    if tuple(image.shape[1:]) != tuple(encoded.size):
        raise ValueError(f"decoded {tuple(image.shape[1:])} pixels, the header says {tuple(encoded.size)}")
    top, left, bottom, right = encoded.crop
    return image[:, top:bottom, left:right].permute(1, 2, 0)


def device_decoding_problem(device: torch.device) -> str | None:
    """Why decode_jpeg cannot decode on `device` (e.g. torchvision built without nvJPEG), tried on one tiny
    JPEG; None when it can."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 60)).save(buffer, format="JPEG")
    try:
        decode_on([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)], device)
        return None
    except RuntimeError as error:
        return str(error).strip().splitlines()[-1]


def place_in_canvas(pieces: dict[int, torch.Tensor], host_canvas: torch.Tensor, host_slots: torch.Tensor,
                    batch_size: int) -> torch.Tensor:
    """One padded canvas [B, H, W, C] uint8 on the device: the workers' canvas [B_host, H', W', C] in
    its slots, each device-decoded piece [h, w, C] in its own. The padding is left unset: nothing reads
    it (see resize_boxes' limits)."""
    shapes = [piece.shape for piece in pieces.values()] + [host_canvas.shape[1:]]
    height, width = max(shape[0] for shape in shapes), max(shape[1] for shape in shapes)
    channels = next(iter(pieces.values())).shape[2] if pieces else host_canvas.shape[3]
    canvas = torch.empty((batch_size, height, width, channels), dtype=torch.uint8, device=host_canvas.device)
    if len(host_slots):
        canvas[host_slots, :host_canvas.shape[1], :host_canvas.shape[2]] = host_canvas
    for slot, piece in pieces.items():
        canvas[slot, :piece.shape[0], :piece.shape[1]] = piece
    return canvas


def crop_bounds(box: tuple[float, float, float, float], height: int, width: int) -> list[int]:
    """The pixels a box (top, left, height, width; fractional at reduced scale) may read: top, left, bottom, right."""
    top, left, box_h, box_w = box
    return [math.floor(top), math.floor(left), min(math.ceil(top + box_h), height), min(math.ceil(left + box_w), width)]


__all__ = ["EncodedBatch", "EncodedJpeg", "JPEG_DECODINGS", "decodable_on_device", "decode_files",
           "device_decoding_problem", "place_in_canvas", "reaches_end_of_image", "upright_crop"]
