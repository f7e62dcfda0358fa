"""Images -> tensors for fine-tuning and probing: the training augmentation, the evaluation
transform (which IS the saved image processor, so inference matches evaluation) and the collator.

Training (timm's `create_transform` as used by BEiT / MAE fine-tuning): RandomResizedCrop (bicubic,
scale `crop_min_scale`-1, ratio 3/4-4/3), horizontal flip, optional RandAugment, normalise,
optional random erasing with per-pixel random values (timm's `mode="pixel"`). RandAugment is timm's
own when timm is installed (the reference's ``rand-m9-mstd0.5-inc1`` exactly), else torchvision's;
timm's posterize keeps the meaning 0 bits had when the papers ran it (`keep_zero_bit_posterize`).

Evaluation: resize the shorter side to ``image_size / crop_pct`` (bicubic) and centre-crop
``image_size`` (timm's `crop_pct`, 0.875 = 224/256).
"""

from __future__ import annotations

import logging
import re

import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from ..models import MimImageProcessor
from ..models.vit_core import to_2tuple

logger = logging.getLogger(__name__)

RAND_AUGMENT = re.compile(r"^rand(-[a-z]+[\d.]+)*$")
# torchvision's RandAugment with 11 magnitude bins puts magnitude M at M/10 of each operation's
# range, the scale of timm's "rand-mM" strings that the reference recipes use (m9 = 90%).
TIMM_MAGNITUDE_BINS = 11


def rand_augment(spec: str | None, mean, image_size=224):
    """`--aa`: None / "none", or a timm RandAugment string such as the reference's "rand-m9-mstd0.5-inc1"
    (m: magnitude 0-10, n: number of ops, default 2, mstd: magnitude noise, inc: increasing-severity ops).

    With timm installed: timm's ``rand_augment_transform`` with the hyper-parameters its
    ``create_transform`` gives it (translation 45% of the image side, the mean pixel as fill, bicubic),
    as the BEiT and MAE fine-tuning code runs it; it works on PIL images, which the pipeline gives it.
    Without timm: torchvision's RandAugment at the same magnitude and op count; "mstd" and "inc" have
    no torchvision counterpart and are ignored with a warning.
    """
    if spec is None or spec.lower() in ("none", ""):
        return None
    if not RAND_AUGMENT.match(spec):
        raise ValueError(f"--aa {spec!r}: expected 'rand-m9-n2' (RandAugment, magnitude 0-10, ops) or 'none'.")
    try:
        from timm.data.auto_augment import rand_augment_transform
    except ImportError:
        return torchvision_rand_augment(spec, mean)
    from PIL import Image

    hparams = {"translate_const": int(min(to_2tuple(image_size)) * 0.45),
               "img_mean": tuple(min(255, round(255 * value)) for value in mean),
               "interpolation": Image.BICUBIC}
    try:
        augment = rand_augment_transform(spec, hparams)
    except (AssertionError, ValueError, KeyError) as error:  # timm asserts on sections it does not know
        raise ValueError(f"--aa {spec!r} is not a RandAugment string timm accepts ({error!r}); the reference "
                         "recipes use 'rand-m9-mstd0.5-inc1'.") from error
    return keep_zero_bit_posterize(augment)


def keep_zero_bit_posterize(augment):
    """timm's RandAugment with its posterize ops (Posterize, PosterizeIncreasing, PosterizeOriginal share
    one function) calling `posterize_any_bits`: "inc1" at magnitude 10 (m9 + mstd noise reaches it) and
    "Posterize" at low magnitudes ask for 0 bits, which Pillow 13 refuses with a ValueError."""
    from timm.data import auto_augment

    for op in augment.ops:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize_any_bits
    return augment


def posterize_any_bits(image, bits_to_keep: int, **kwargs):
    """timm's posterize, with 0 (or fewer) bits meaning what it meant when BEiT / MAE ran the recipe:
    Pillow <= 12's ImageOps.posterize masked each value with ~(2 ** (8 - bits) - 1), which keeps no
    bit at all for bits <= 0: a black image. Pillow 13 raises "bits must be between or equal to 1 and 8"."""
    from timm.data import auto_augment

    if bits_to_keep >= 1 or image.mode not in ("L", "RGB"):  # other modes: Pillow's own answer, as before
        return auto_augment.posterize(image, bits_to_keep, **kwargs)
    return image.point([0] * 256 * len(image.getbands()))  # Pillow <= 12's lookup table for 0 bits: all zeros


def torchvision_rand_augment(spec: str, mean) -> v2.RandAugment:
    """torchvision's RandAugment for a timm "rand-mM-nN" string (when timm is not installed)."""
    settings = dict(re.findall(r"-([a-z]+)([\d.]+)", spec))
    unknown = sorted(set(settings) - {"m", "n", "mstd", "inc"})
    if unknown:
        raise ValueError(f"--aa {spec!r}: unknown RandAugment settings {unknown}; use m (magnitude) and n (ops).")
    ignored = sorted(set(settings) & {"mstd", "inc"})
    if ignored:
        logger.warning("--aa %s: timm is not installed, and torchvision's RandAugment has no %s; using magnitude %s "
                       "with %s ops only (pip install timm for the reference's RandAugment).",
                       spec, " / ".join(ignored), settings.get("m", 9), settings.get("n", 2))
    magnitude, num_ops = float(settings.get("m", 9)), int(float(settings.get("n", 2)))
    if not 0 <= magnitude <= TIMM_MAGNITUDE_BINS - 1 or magnitude != int(magnitude):
        raise ValueError(f"--aa {spec!r}: the magnitude m must be an integer in [0, 10], got {magnitude}.")
    fill = [round(255 * value) for value in mean]  # timm fills with the mean pixel
    return v2.RandAugment(num_ops=num_ops, magnitude=int(magnitude), num_magnitude_bins=TIMM_MAGNITUDE_BINS,
                          interpolation=v2.InterpolationMode.BILINEAR, fill=fill if len(fill) in (1, 3) else None)


def train_transform(image_size, mean, std, crop_min_scale: float = 0.08, hflip: float = 0.5,
                    auto_augment: str | None = None, reprob: float = 0.0) -> v2.Compose:
    if not 0 < crop_min_scale <= 1:
        raise ValueError(f"--crop_min_scale must be in (0, 1], got {crop_min_scale}.")
    steps = [
        v2.RandomResizedCrop(to_2tuple(image_size), scale=(crop_min_scale, 1.0),
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(hflip),
    ]
    augment = rand_augment(auto_augment, mean, image_size)
    if augment is not None:
        steps.append(augment)
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    if reprob > 0:
        steps.append(v2.RandomErasing(p=reprob, value="random"))
    return v2.Compose(steps)


def default_mean_std(num_channels: int) -> tuple[list[float], list[float]]:
    if num_channels == 3:
        return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    if num_channels == 1:
        return [sum(IMAGENET_DEFAULT_MEAN) / 3], [sum(IMAGENET_DEFAULT_STD) / 3]
    raise ValueError(f"num_channels={num_channels}: only 1 (grey) and 3 (RGB) channel images are supported.")


def evaluation_processor(image_size: int, patch_size, num_channels: int, crop_pct: float = 0.875,
                         mean=None, std=None) -> MimImageProcessor:
    """The image processor saved with a fine-tuned model: resize to image_size / crop_pct, centre crop."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"--crop_pct must be in (0, 1] (1 = no crop, timm's 0.875 = 224/256), got {crop_pct}.")
    if mean is None or std is None:
        mean, std = default_mean_std(num_channels)
    height, width = to_2tuple(image_size)
    return MimImageProcessor(
        size={"shortest_edge": int(min(height, width) / crop_pct)}, do_center_crop=True,
        crop_size={"height": height, "width": width}, resample=PILImageResampling.BICUBIC,
        image_mean=list(mean), image_std=list(std), patch_size=patch_size, do_convert_rgb=num_channels == 3,
    )


def training_example_transform(augment: v2.Compose):
    """For `hf_mim.data.ImageExamples`: image -> {"pixel_values"} (labels are added by ImageExamples)."""
    def transform(image, generator):
        return {"pixel_values": augment(image)}
    return transform


def evaluation_example_transform(processor):
    def transform(image, generator):
        return {"pixel_values": processor(image, return_tensors="pt")["pixel_values"][0]}
    return transform


class ClassificationCollator:
    """Stacks examples, drops the bookkeeping `num_skipped` (`ImageExamples` already logs unreadable
    images), and checks the labels against the model's classes, so a bad label fails here with a
    clear message rather than as a device-side assert inside the loss."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = default_collate(examples)
        batch.pop("num_skipped", None)
        labels = batch.get("labels")
        if labels is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_labels):
            raise ValueError(
                f"A batch holds label ids in [{int(labels.min())}, {int(labels.max())}] but the model has "
                f"{self.num_labels} classes (ids 0..{self.num_labels - 1}). Negative ids mark unlabelled images: "
                "filter them out; larger ids need a model with more classes (--ignore_mismatched_sizes)."
            )
        return batch


__all__ = [
    "ClassificationCollator", "evaluation_example_transform", "evaluation_processor", "posterize_any_bits",
    "rand_augment",
    "train_transform", "training_example_transform",
]
