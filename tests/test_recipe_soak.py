"""Default recipes on inputs a real run meets (issue 16).

1. The reference fine-tuning RandAugment (`--aa rand-m9-mstd0.5-inc1`, timm's) asks posterize for 0 bits
   now and then; Pillow 13 raises there, Pillow <= 12 gave a black image (the recipe the papers ran).
2. A slice of `benchmarks/recipe_soak.py`: every method's training transform over thousands of varied
   images (sizes from 1x1 up, extreme aspect ratios, every PIL mode, EXIF orientations, ...) without an
   error or a non-finite value.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

REFERENCE_AA = "rand-m9-mstd0.5-inc1"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def random_image(mode: str, size: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    pixels = rng.integers(1, 256, (size, size, channels), dtype=np.uint8)  # no zero: black must come from posterize
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


# ---------------------------------------------------------------------------------------------
# 1. Posterize with 0 bits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_reference_rand_augment_posterize_at_full_magnitude_gives_black(mode):
    """PosterizeIncreasing at magnitude 10 (m9 + mstd0.5 noise, clipped at 10) keeps 4 - 4 = 0 bits:
    the op as the recipe builds it returns a black image of the same size and mode."""
    pytest.importorskip("timm")
    from hf_mim.finetuning.transforms import rand_augment

    op = next(op for op in rand_augment(REFERENCE_AA, MEAN, 16).ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the draw that asks for 0 bits
    image = random_image(mode)
    black = op(image)
    assert black.size == image.size and black.mode == image.mode
    assert np.asarray(black).max() == 0


@pytest.mark.parametrize("bits", range(1, 9))
def test_posterize_with_bits_keeps_pillows_own_result(bits):
    pytest.importorskip("timm")
    from hf_mim.finetuning.transforms import posterize_any_bits

    image = random_image("RGB", seed=bits)
    assert np.array_equal(np.asarray(posterize_any_bits(image, bits)), np.asarray(ImageOps.posterize(image, bits)))


def test_reference_fine_tuning_transform_survives_a_batch_of_seeds():
    """The whole training transform (crop, flip, RandAugment, normalise, erasing) for 64 seeded draws:
    with timm 1.0.31, seeds 22 and 63 draw 0-bit posterize (Pillow 13 raised there)."""
    pytest.importorskip("timm")
    from hf_mim.finetuning.transforms import train_transform

    transform = train_transform(16, MEAN, STD, auto_augment=REFERENCE_AA, reprob=0.25)
    image = random_image("RGB", seed=1)
    for seed in range(64):
        random.seed(seed)  # timm draws with Python's and NumPy's RNGs, torchvision with torch's
        np.random.seed(seed)
        torch.manual_seed(seed)
        pixels = transform(image)
        assert pixels.shape == (3, 16, 16) and torch.isfinite(pixels).all()
