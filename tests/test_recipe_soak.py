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

pytestmark = pytest.mark.usefixtures("single_torch_thread")

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


# ---------------------------------------------------------------------------------------------
# 2. The soak's CI slice
# ---------------------------------------------------------------------------------------------

SLICE = 2000  # images per recipe (the full soak: 20,000)


def load_soak():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "recipe_soak.py"
    spec = importlib.util.spec_from_file_location("hf_mim_benchmark_recipe_soak", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def soak_module():
    return load_soak()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """One encoded corpus for every test here (written on first use)."""
    return tmp_path_factory.mktemp("recipe_soak_corpus")


def test_corpus_is_varied_and_deterministic(soak_module, corpus_dir):
    corpus = soak_module.build_corpus(corpus_dir, SLICE, seed=0)
    assert {spec.kind for spec in corpus.specs} == set(soak_module.KINDS)
    orientations = {spec.orientation for spec in corpus.specs if spec.kind == "jpeg_exif"}
    assert orientations == set(range(1, 9))
    sides = [side for spec in corpus.specs for side in (spec.width, spec.height)]
    assert min(sides) == 1 and max(sides) == 4000
    assert max(max(s.width, s.height) / min(s.width, s.height) for s in corpus.specs) >= 3000
    assert corpus.specs == [soak_module.image_spec(0, index) for index in range(SLICE)]
    for path, spec in zip(corpus.image_paths()[:40], corpus.specs):  # the files are what the specs say
        with Image.open(path) as image:
            assert image.size == (spec.width, spec.height) and image.mode == soak_module.KINDS[spec.kind][2]


def test_every_recipe_survives_the_slice(soak_module, corpus_dir, tmp_path):
    report = soak_module.main(["--images", str(SLICE), "--cache_dir", str(corpus_dir), "--json",
                               str(tmp_path / "soak.json")])
    names = [row["recipe"] for row in report["rows"]]
    expected = [f"pretrain-{method}-{path}" for method in soak_module.METHODS for path in ("reference", "fast")]
    assert names[:len(expected)] == expected and names[-1] == "segment"
    assert any(name.startswith("finetune-rand-m9-mstd0.5-inc1") for name in names)
    failures = [failure for row in report["rows"] for failure in row["failures"]]
    assert report["passed"] and not failures, failures[:10]
    assert all(row["images"] == SLICE for row in report["rows"])


def test_the_soak_counts_the_zero_bit_posterize_crash(soak_module, corpus_dir, monkeypatch):
    """With timm's raw posterize (the code before issue 16), Pillow 13's ValueError shows up as errors."""
    pytest.importorskip("timm")
    from timm.data import auto_augment

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        pytest.skip("this Pillow still accepts 0 bits")
    except ValueError:
        pass
    monkeypatch.setattr("hf_mim.finetuning.transforms.posterize_any_bits", auto_augment.posterize)
    report = soak_module.main(["--images", str(SLICE), "--cache_dir", str(corpus_dir),
                               "--recipes", "finetune-rand-m9-mstd0.5-inc1-timm"])
    (row,) = report["rows"]
    assert not report["passed"] and row["errors"] > 0
    assert "bits must be between" in row["failures"][0]
