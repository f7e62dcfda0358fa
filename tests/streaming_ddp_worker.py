"""`examples/pretrain.py` under `accelerate launch` for tests/test_streaming.py, with every image decode of the
training stream written down: each decoded image's id (its first pixel: red + 256 x green) is appended to
`$STREAM_DECODE_LOG/rank-<rank>.txt`. The real decoder runs; this only records its results."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hf_mim.data
from hf_mim.pretraining import main

real_decode_image = hf_mim.data.decode_image


def image_id(image) -> int:
    red, green, _ = image.convert("RGB").getpixel((0, 0))
    return red + 256 * green


def recording_decode_image(value, mode: str = "RGB"):
    image = real_decode_image(value, mode)
    log = Path(os.environ["STREAM_DECODE_LOG"]) / f"rank-{os.environ.get('RANK', '0')}.txt"
    with open(log, "a") as file:
        file.write(f"{image_id(image)}\n")
    return image


if __name__ == "__main__":
    hf_mim.data.decode_image = recording_decode_image  # the one ImageExamples.from_row calls for a stream's rows
    main(sys.argv[1:])
