"""Soak every default training recipe in varied images: 0 errors and 0 non-finite values, or exit 1.

A deterministic corpus of encoded image files (cached on disk, shared by every recipe): mostly small
(1-96 px), some medium, extreme aspect ratios (1 x 3000), a few huge (up to 4,000 px); JPEG
(baseline, progressive, grey, CMYK, each EXIF orientation), PNG (RGB, RGBA, L, LA, palette with and
without transparency, 16-bit grey, bilevel, EXIF), WebP (RGB, RGBA), TIFF (32-bit int, float, CMYK),
BMP. The first images are pinned edge cases (1x1, 1x3000, 4000x4000, ...), so every slice holds them.

Recipes, each through the code a real run takes (the loaders' `attempt`, collation, batch steps, on CPU):

* `pretrain-<method>-reference` / `-fast`: each pre-training method's training example on the reference
  data path (`ImageExamples` + the method's `train_transform`) and on the fast path (`FastImageExamples`,
  `collate`, then the batched `device_views`);
* `finetune-<aa>-timm` / `-torchvision`: fine-tuning's training transform with each `--aa` string the
  README shows (timm's RandAugment, and torchvision's as without timm), random erasing 0.25, then the
  README recipe's MixUp 0.8 / CutMix 1.0 / smoothing 0.1 on each batch;
* `segment`: segmentation's training examples from an `images/` + `masks/` folder (`folder_dataset`).

An image that raises, or that the loader finds unreadable (every file here is readable), is an error;
an example with a NaN or an infinity anywhere is non-finite. Prints one row per recipe and the first
errors, writes `--json`.

    python benchmarks/recipe_soak.py                          # the full soak: 20,000 images per recipe
    python benchmarks/recipe_soak.py --images 2000 --recipes finetune,segment   # a slice, some recipes
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from hf_mim.data import ImageExamples, derive_seed
from hf_mim.fast_data import FastImageExamples
from hf_mim.finetuning.arguments import FinetuningArguments
from hf_mim.finetuning.mixup import SoftTargets
from hf_mim.finetuning.transforms import ClassificationCollator, train_transform, training_example_transform
from hf_mim.segmentation.data import SegmentationExamples, folder_dataset

BENCHMARKS = Path(__file__).resolve().parent
README = BENCHMARKS.parent / "README.md"
CORPUS_VERSION = 1  # bump when the corpus changes: the cache folder is keyed by it
EXIF_ORIENTATION = 0x0112
METHODS = ("mae", "beit", "beitv2", "peco", "vit_mpp")
NUM_CLASSES = 10  # fine-tuning labels: index % 10
SEGMENT_CLASSES = 4
PROGRESS_EVERY = 2000  # images between progress lines of a recipe
# The fast path pads a batch's pixels into one canvas of the largest height x the largest width; BEiT-style
# methods ship each whole image (the colour jitter needs its mean grey), so a 2 x 4000 and a 4000 x 2 image
# in one batch make a [B, 4000, 4000, 3] canvas: minutes and several GB on a CPU for a batch of 8 (seen by
# hand). Batches of 1 (--fast_batch_size's default) keep the soak about errors and non-finite values; 8 shows
# the blow-up.
# The README's fine-tuning recipe: `--mixup 0.8 --cutmix 1.0 --smoothing 0.1`, random erasing at the default 0.25.
MIXUP, CUTMIX, SMOOTHING, REPROB = 0.8, 1.0, 0.1, 0.25


# ---------------------------------------------------------------------------------------------
# The corpus: index -> ImageSpec -> encoded file (+ a mask of the upright size, for segmentation)
# ---------------------------------------------------------------------------------------------

# kind: (PIL format, file extension, PIL mode, save options)
KINDS = {
    "jpeg": ("JPEG", "jpg", "RGB", {"quality": 85}),
    "jpeg_progressive": ("JPEG", "jpg", "RGB", {"quality": 85, "progressive": True}),
    "jpeg_grey": ("JPEG", "jpg", "L", {"quality": 85}),
    "jpeg_cmyk": ("JPEG", "jpg", "CMYK", {"quality": 85}),
    "jpeg_exif": ("JPEG", "jpg", "RGB", {"quality": 85}),
    "png": ("PNG", "png", "RGB", {}),
    "png_rgba": ("PNG", "png", "RGBA", {}),
    "png_grey": ("PNG", "png", "L", {}),
    "png_grey_alpha": ("PNG", "png", "LA", {}),
    "png_palette": ("PNG", "png", "P", {}),
    "png_palette_transparent": ("PNG", "png", "P", {"transparency": 0}),
    "png_16_bit": ("PNG", "png", "I;16", {}),
    "png_bilevel": ("PNG", "png", "1", {}),
    "png_exif": ("PNG", "png", "RGB", {}),
    "webp": ("WEBP", "webp", "RGB", {"quality": 80}),
    "webp_rgba": ("WEBP", "webp", "RGBA", {"quality": 80}),
    "tiff_int32": ("TIFF", "tif", "I", {}),
    "tiff_float": ("TIFF", "tif", "F", {}),
    "tiff_cmyk": ("TIFF", "tif", "CMYK", {}),
    "bmp": ("BMP", "bmp", "RGB", {}),
}
ORIENTED_KINDS = ("jpeg_exif", "png_exif")
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageSpec:
    index: int
    kind: str
    width: int  # as stored in the file
    height: int
    orientation: int = 1  # EXIF

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) as displayed, once the EXIF orientation is applied."""
        swap = self.orientation in SWAPPING_ORIENTATIONS
        return (self.height, self.width) if swap else (self.width, self.height)

    @property
    def extension(self) -> str:
        return KINDS[self.kind][1]

    def describe(self) -> str:
        turn = f" EXIF {self.orientation}" if self.orientation != 1 else ""
        return f"#{self.index} {self.kind} {self.width}x{self.height}{turn}"


# Pinned edge cases: (kind, width, height, orientation).
EDGE_CASES = [
    ("jpeg", 1, 1, 1), ("png", 1, 1, 1), ("png_16_bit", 1, 1, 1), ("tiff_float", 1, 1, 1), ("jpeg_cmyk", 1, 1, 1),
    ("png_palette_transparent", 1, 1, 1), ("png_bilevel", 1, 2000, 1), ("jpeg", 1, 3000, 1), ("jpeg", 3000, 1, 1),
    ("png", 2, 4000, 1), ("webp", 4000, 2, 1), ("jpeg_progressive", 4000, 4000, 1), ("png_grey_alpha", 3000, 2, 1),
    *[("jpeg_exif", 3, 700, orientation) for orientation in range(1, 9)],
    *[("png_exif", 1, 500, orientation) for orientation in range(1, 9)],
]


def log_uniform(rng: np.random.Generator, low: int, high: int) -> int:
    return int(round(float(np.exp(rng.uniform(np.log(low), np.log(high))))))


def image_spec(seed: int, index: int) -> ImageSpec:
    """The index-th image of the corpus: a pure function of (seed, index)."""
    if index < len(EDGE_CASES):
        return ImageSpec(index, *EDGE_CASES[index])
    rng = np.random.default_rng([seed, index])
    kind = str(rng.choice(sorted(KINDS)))
    draw = rng.random()
    if draw < 0.80:  # most images small: 20k per recipe stays cheap
        width, height = log_uniform(rng, 1, 96), log_uniform(rng, 1, 96)
    elif draw < 0.93:
        width, height = log_uniform(rng, 96, 640), log_uniform(rng, 96, 640)
    elif draw < 0.999:  # extreme aspect ratios, either way round
        width, height = log_uniform(rng, 1, 4), log_uniform(rng, 200, 3000)
        width, height = (width, height) if rng.random() < 0.5 else (height, width)
    else:  # a few huge ones (1 in 1,000, besides the pinned 4000 x 4000)
        width, height = log_uniform(rng, 1500, 4000), log_uniform(rng, 1500, 4000)
    orientation = int(rng.integers(1, 9)) if kind in ORIENTED_KINDS else 1
    return ImageSpec(index, kind, width, height, orientation)


def smooth_rgb(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A few random colours bilinearly stretched over the image: cheap at any size, varied, photo-like enough."""
    grid = rng.integers(0, 256, (min(height, 6), min(width, 6), 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR)


def in_mode(rgb: Image.Image, mode: str, rng: np.random.Generator) -> Image.Image:
    """`rgb` as an image of `mode`, with the value ranges such files hold."""
    grey = rgb.convert("L")
    if mode in ("RGB", "L", "CMYK", "1"):
        return rgb.convert(mode) if mode != "L" else grey
    if mode in ("RGBA", "LA"):
        image = rgb if mode == "RGBA" else grey
        image.putalpha(grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        return image
    if mode == "P":  # 16 palette entries, colours at random
        image = Image.fromarray(np.asarray(grey) // 16, mode="P")
        image.putpalette(rng.integers(0, 256, 48, dtype=np.uint8).tobytes())
        return image
    levels = np.asarray(grey, dtype=np.float64) / 255.0
    if mode == "I;16":
        return Image.fromarray(np.round(levels * 65535).astype(np.uint16))
    if mode == "I":  # 16-bit values, or the whole 32-bit range
        full_scale = 65535 if rng.random() < 0.5 else 2**31 - 1
        return Image.fromarray(np.round(levels * full_scale).astype(np.int32), mode="I")
    if mode == "F":  # 0-1 floats, or 16-bit values as floats
        return Image.fromarray((levels * (1.0 if rng.random() < 0.5 else 65535.0)).astype(np.float32), mode="F")
    raise ValueError(f"no recipe for mode {mode}")


def encode(spec: ImageSpec, seed: int) -> tuple[bytes, bytes]:
    """(the image file, its mask as a PNG of the upright size with class ids 0-3)."""
    rng = np.random.default_rng([seed, spec.index, 1])
    fmt, _, mode, options = KINDS[spec.kind]
    rgb = smooth_rgb(rng, spec.width, spec.height)
    options = dict(options)
    if spec.kind in ORIENTED_KINDS:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = spec.orientation
        options["exif"] = exif
    image_file, mask_file = io.BytesIO(), io.BytesIO()
    in_mode(rgb, mode, rng).save(image_file, format=fmt, **options)
    mask = np.asarray(smooth_rgb(rng, *spec.upright_size).convert("L")) // (256 // SEGMENT_CLASSES)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(mask_file, format="PNG")
    return image_file.getvalue(), mask_file.getvalue()


@dataclass
class Corpus:
    root: Path  # root/images/NNNNNN.ext and root/masks/NNNNNN.png, as segment.py's folders
    specs: list[ImageSpec]

    def image_paths(self) -> list[str]:
        return [str(self.root / "images" / f"{spec.index:06d}.{spec.extension}") for spec in self.specs]


def build_corpus(cache_dir: Path, count: int, seed: int) -> Corpus:
    """The first `count` images of the corpus of `seed`, written once (atomically) into the cache."""
    root = Path(cache_dir) / f"v{CORPUS_VERSION}-seed{seed}"
    for folder in ("images", "masks", "partial"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    specs = [image_spec(seed, index) for index in range(count)]
    for spec in specs:
        image_path = root / "images" / f"{spec.index:06d}.{spec.extension}"
        mask_path = root / "masks" / f"{spec.index:06d}.png"
        if image_path.exists() and mask_path.exists():
            continue
        for path, data in zip((image_path, mask_path), encode(spec, seed)):
            partial = root / "partial" / f"{os.getpid()}-{path.name}"  # not in the folders segment.py reads
            partial.write_bytes(data)
            partial.replace(path)  # an interrupted run leaves no half-written file behind
    return Corpus(root, specs)


# ---------------------------------------------------------------------------------------------
# Recipes: (index, sample seed) -> one example; (examples, seed) -> the batch the model gets
# ---------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    name: str
    example: Callable[[int, int], dict | None]  # None: the loader found the image unreadable
    batch: Callable[[list[dict], int], dict]


def load_data_pipeline():
    """benchmarks/data_pipeline.py (loaded once): its tiny method set-up (smoke preset, tokenizers) and its
    `path_dataset` are reused here."""
    name = "hf_mim_benchmark_data_pipeline"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "data_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def seed_python_and_numpy(sample_seed: int) -> None:
    """timm's RandAugment draws from Python's and NumPy's global RNGs (hf_mim seeds torch's per example)."""
    random.seed(sample_seed)
    np.random.seed(sample_seed % 2**32)


def reference_example(examples: ImageExamples, label_column: str | None = None):
    """The loader's own per-image step (`attempt`: decode, transform), with the label as __getitem__ adds it."""
    def example(index: int, sample_seed: int) -> dict | None:
        seed_python_and_numpy(sample_seed)
        tensors, row = examples.attempt(index, sample_seed)
        if tensors is not None and label_column is not None:
            tensors["labels"] = torch.tensor(row[label_column])
        return tensors
    return example


def stacked(examples: list[dict], seed: int) -> dict:
    return default_collate(examples)


def pretraining_recipes(corpus: Corpus, workdir: Path) -> list[Recipe]:
    """Each method's training example on both data paths, at data_pipeline.py's smoke size (32 px, patch 4)."""
    data_pipeline = load_data_pipeline()
    preset = data_pipeline.PRESETS["smoke"]
    tokenizers = data_pipeline.save_tokenizers(workdir / "tokenizers", preset.image_size)
    dataset = data_pipeline.path_dataset(corpus.image_paths())
    recipes = []
    for name in METHODS:
        method, _, processor = data_pipeline.build_method(name, preset, tokenizers)
        reference = ImageExamples(dataset, "image", method.train_transform(processor), image_mode=method.image_mode)
        recipes.append(Recipe(f"pretrain-{name}-reference", reference_example(reference), stacked))
        fast = FastImageExamples(dataset, "image", method.fast_views(processor), image_mode=method.image_mode)

        def fast_batch(examples: list[dict], seed: int, fast=fast) -> dict:
            return fast.device_views(fast.collate(examples))  # the host's canvas, then the batched views on CPU
        recipes.append(Recipe(f"pretrain-{name}-fast", reference_example(fast), fast_batch))
    return recipes


def readme_auto_augments() -> list[str]:
    """Every `--aa` string README.md shows, and finetune.py's default."""
    shown = re.findall(r"--aa[ =]([\w.-]+)", README.read_text())
    return list(dict.fromkeys([*shown, FinetuningArguments.aa]))


@contextlib.contextmanager
def without_timm():
    """As on an install without timm: `rand_augment` falls back to torchvision's RandAugment."""
    saved = sys.modules.get("timm.data.auto_augment")
    sys.modules["timm.data.auto_augment"] = None  # `import` of it raises ImportError
    try:
        yield
    finally:
        if saved is None:
            del sys.modules["timm.data.auto_augment"]
        else:
            sys.modules["timm.data.auto_augment"] = saved


def finetuning_recipes(corpus: Corpus, image_size: int) -> list[Recipe]:
    """The training transform with each README --aa string (timm's and torchvision's RandAugment), random
    erasing, then the README recipe's MixUp / CutMix / smoothing on each batch."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    paths = corpus.image_paths()
    dataset = load_data_pipeline().path_dataset(paths)
    dataset = dataset.add_column("label", [index % NUM_CLASSES for index in range(len(paths))])
    collator = ClassificationCollator(NUM_CLASSES)
    soft_targets = SoftTargets(NUM_CLASSES, MIXUP, CUTMIX, SMOOTHING)

    def mixed(examples: list[dict], seed: int) -> dict:
        batch = collator(examples)
        torch.manual_seed(seed)  # the Trainer's RNG picks and draws the mixing
        pixel_values, labels = soft_targets(batch["pixel_values"], batch["labels"])
        return {"pixel_values": pixel_values, "labels": labels}

    libraries = ["torchvision"] + (["timm"] if importlib.util.find_spec("timm") else [])
    recipes = []
    for aa in readme_auto_augments():
        for library in libraries:
            with contextlib.nullcontext() if library == "timm" else without_timm():
                augment = train_transform(image_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment=aa,
                                          reprob=REPROB)
            examples = ImageExamples(dataset, "image", training_example_transform(augment), label_column="label")
            recipes.append(Recipe(f"finetune-{aa}-{library}", reference_example(examples, "label"), mixed))
    return recipes


def segmentation_recipe(corpus: Corpus, image_size: int) -> Recipe:
    """segment.py's training examples from an images/ + masks/ folder (the corpus' own layout)."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    dataset = folder_dataset(str(corpus.root)).select(range(len(corpus.specs)))  # the folder may hold more
    examples = SegmentationExamples(dataset, "image", "mask", image_size, IMAGENET_DEFAULT_MEAN,
                                    IMAGENET_DEFAULT_STD, train=True)

    def example(index: int, sample_seed: int) -> dict:
        torch.manual_seed(sample_seed)  # the Trainer seeds the loader's RNG
        return examples[index]
    return Recipe("segment", example, stacked)


# ---------------------------------------------------------------------------------------------
# The soak: every image through a recipe, errors and non-finite values counted
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    recipe: str
    images: int = 0
    errors: int = 0
    non_finite: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # the first few, with the image and where it raised

    def fail(self, spec: ImageSpec, problem: str, keep: int = 10) -> None:
        if len(self.failures) < keep:
            self.failures.append(f"{spec.describe()}: {problem}")


def where(error: Exception) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__}: {error} ({Path(frame.filename).name}:{frame.lineno})"


def non_finite_rows(batch: dict, size: int) -> set[int]:
    """The examples of the batch with a NaN or an infinity in any floating tensor."""
    bad = set()
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            finite = torch.isfinite(value.reshape(value.shape[0], -1)).all(dim=1) if value.ndim else torch.isfinite(value)
            if value.ndim and value.shape[0] == size:
                bad.update(torch.nonzero(~finite).flatten().tolist())
            elif not bool(finite.all()):
                bad.update(range(size))
    return bad


def run_chunk(recipe: Recipe, row: Row, chunk: list[ImageSpec], seeds: list[int]) -> None:
    """One batch of the recipe; when the batch step fails, each image again alone, to find the culprit."""
    examples, kept = [], []
    for spec, seed in zip(chunk, seeds):
        try:
            example = recipe.example(spec.index, seed)
        except Exception as error:  # the soak counts every error
            row.errors += 1
            row.fail(spec, where(error))
            continue
        if example is None:
            row.errors += 1
            row.fail(spec, "the loader found it unreadable")
            continue
        examples.append(example)
        kept.append(spec)
    if not examples:
        return
    try:
        batch = recipe.batch(examples, seeds[0])
    except Exception as error:
        if len(kept) == 1:
            row.errors += 1
            row.fail(kept[0], where(error))
            return
        for spec in kept:
            run_chunk(recipe, row, [spec], [seeds[chunk.index(spec)]])
        return
    for position in sorted(non_finite_rows(batch, len(kept))):
        row.non_finite += 1
        row.fail(kept[position], "non-finite values")


def soak(recipe: Recipe, specs: list[ImageSpec], seed: int, batch_size: int) -> Row:
    row = Row(recipe.name)
    start = time.perf_counter()
    for first in range(0, len(specs), batch_size):
        chunk = specs[first:first + batch_size]
        run_chunk(recipe, row, chunk, [derive_seed(seed, spec.index) for spec in chunk])
        row.images += len(chunk)  # run through the recipe (errors and non-finite ones counted among them)
        if (first // batch_size + 1) % max(1, PROGRESS_EVERY // batch_size) == 0:
            print(f"  {recipe.name}: {first + len(chunk)} images, {row.errors} errors, {row.non_finite} non-finite, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    row.seconds = time.perf_counter() - start
    return row


def selected(recipes: list[Recipe], wanted: str | None) -> list[Recipe]:
    if not wanted:
        return recipes
    prefixes = wanted.split(",")
    chosen = [recipe for recipe in recipes if any(recipe.name.startswith(prefix) for prefix in prefixes)]
    if not chosen:
        raise SystemExit(f"--recipes {wanted!r} matches none of {[recipe.name for recipe in recipes]}.")
    return chosen


def table(rows: list[Row]) -> str:
    lines = ["| recipe | images | errors | non-finite | seconds | images/s |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.recipe} | {row.images} | {row.errors} | {row.non_finite} | {row.seconds:.1f} | "
                     f"{row.images / max(row.seconds, 1e-9):.0f} |")
    return "\n".join(lines)


def environment() -> dict:
    import PIL
    import torchvision

    versions = {"pillow": PIL.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__}
    if importlib.util.find_spec("timm"):
        import timm
        versions["timm"] = timm.__version__
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": platform.processor() or platform.machine(), "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), **versions}


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000, help="images per recipe (the corpus' first N)")
    parser.add_argument("--recipes", default=None, help="comma-separated name prefixes (default: every recipe)")
    parser.add_argument("--seed", type=int, default=0, help="the corpus and the per-image draws")
    parser.add_argument("--cache_dir", default=os.path.expanduser("~/.cache/hf_mim/recipe_soak"),
                        help="where the encoded corpus is kept between runs")
    parser.add_argument("--batch_size", type=int, default=8, help="images per batch step (reference path, fine-tuning, "
                        "segmentation)")
    parser.add_argument("--fast_batch_size", type=int, default=1,
                        help="images per fast-path batch (1: see the canvas note at the top)")
    parser.add_argument("--image_size", type=int, default=32, help="fine-tuning and segmentation output size")
    parser.add_argument("--json", default=None, help="write the report here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    datasets.disable_progress_bars()
    start = time.perf_counter()
    corpus = build_corpus(Path(args.cache_dir), args.images, args.seed)
    corpus_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as workdir:
        recipes = selected([*pretraining_recipes(corpus, Path(workdir)), *finetuning_recipes(corpus, args.image_size),
                            segmentation_recipe(corpus, args.image_size)], args.recipes)
        report = {"environment": environment(), "arguments": vars(args), "corpus_seconds": corpus_seconds,
                  "kinds": sorted({spec.kind for spec in corpus.specs}), "rows": [], "complete": False}
        rows = []
        for recipe in recipes:
            batch_size = args.fast_batch_size if recipe.name.endswith("-fast") else args.batch_size
            rows.append(soak(recipe, corpus.specs, args.seed, batch_size))
            print(f"{recipe.name}: {rows[-1].errors} errors, {rows[-1].non_finite} non-finite, "
                  f"{rows[-1].seconds:.1f} s", flush=True)
            report["rows"].append(rows[-1].__dict__)
            if args.json:  # after every recipe: a long soak that is stopped keeps what it measured
                Path(args.json).write_text(json.dumps(report, indent=2))
    report["passed"], report["complete"] = all(row.errors == row.non_finite == 0 for row in rows), True
    print(table(rows))
    for row in rows:
        for failure in row.failures:
            print(f"{row.recipe}: {failure}")
    print(f"corpus: {args.images} images ({corpus_seconds:.1f} s to build or find), {len(report['kinds'])} kinds; "
          f"{'PASSED' if report['passed'] else 'FAILED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    torch.set_num_threads(1)  # the figures are per core (and steadier on a shared machine)
    sys.exit(0 if main()["passed"] else 1)
