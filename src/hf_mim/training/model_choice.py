"""The architecture of a run that names none (no --config_name, no --model_name_or_path): chosen from the
data, or refused with the choices spelled out.

The base presets are ViT-B/16 at 224 px (~86M encoder parameters). Given 32 px images they would
upsample every image 7x and train a model far bigger than the data can feed, silently. So:

* small images (at most 64 px a side): the `<method>-demo` preset (32 px, 4 px patches, ~1M parameters);
* large images (at least 128 px) and many of them (50,000 or more, or a stream): the `<method>-base` preset;
* anything in between: no guess; the error names both presets and how to pick one.
"""

from __future__ import annotations

import datasets
from PIL import Image

from ..data import DIGITS_SOURCE, ImageDatasets, decode_image
from ..recipe import SMALL_DATA_MAX_IMAGES

SMALL_IMAGE_MAX_SIDE = 64
BASE_MIN_SIDE = 128
BASE_MIN_IMAGES = SMALL_DATA_MAX_IMAGES  # below it, from scratch, the recipe's data-size rule applies too


def first_image_size(data: ImageDatasets, tries: int = 8) -> tuple[int, int]:
    """(width, height) of the first training image that decodes (a damaged one is skipped, as in training)."""
    dataset = data.train if data.train is not None else data.eval
    rows = dataset.take(tries) if isinstance(dataset, datasets.IterableDataset) else dataset.select(
        range(min(tries, len(dataset))))
    for row in rows:
        value = row[data.image_column]
        try:
            return value.size if isinstance(value, Image.Image) else decode_image(value).size
        except Exception:  # noqa: BLE001 - any decoder error; the data pipeline reports damaged images itself
            continue
    raise ValueError(f"None of the first {tries} images of {data.source} decodes: check the data.")


def train_image_count(data: ImageDatasets) -> int | None:
    """Images of the training split (of the evaluation one when there is none); None when streamed."""
    dataset = data.train if data.train is not None else data.eval
    return None if dataset is None or isinstance(dataset, datasets.IterableDataset) else len(dataset)


def choose_preset(method_name: str, data: ImageDatasets) -> tuple[str, str]:
    """(preset name, why) of a run without --config_name, from the data; raises when the data fits neither."""
    demo, base = f"{method_name}-demo", f"{method_name}-base"
    if data.source == DIGITS_SOURCE:
        return demo, "the embedded digits demo"
    width, height = first_image_size(data)
    count = train_image_count(data)
    seen = f"{width}x{height} px images ({'streamed' if count is None else f'{count:,}'})"
    if max(width, height) <= SMALL_IMAGE_MAX_SIDE:
        return demo, f"chosen from the data: {seen} are small"
    if min(width, height) >= BASE_MIN_SIDE and (count is None or count >= BASE_MIN_IMAGES):
        return base, f"chosen from the data: {seen}"
    raise ValueError(
        f"No --config_name: the data has {seen}, which fits neither built-in size. --config_name {base} is "
        f"ViT-B/16 at 224 px (~86M parameters, made for {BASE_MIN_IMAGES:,}+ images of {BASE_MIN_SIDE}+ px); "
        f"--config_name {demo} is a ~1M-parameter ViT at 32 px (images of at most {SMALL_IMAGE_MAX_SIDE} px). Pass "
        f"one of them (with --image_size to change its resolution, --config_overrides for its width and depth), or "
        "a config folder / Hub id."
    )


__all__ = ["choose_preset", "train_image_count"]
