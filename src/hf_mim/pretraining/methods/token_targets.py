"""The targets of BEiT-style pre-training: a frozen image tokenizer, the view it sees, and a check that
its codes carry information.

A tokenizer that gives (nearly) every patch the same code makes masked-token prediction trivial: the
model reports ~100% accuracy and learns nothing. :class:`TargetHealth` measures the code usage of the
first training batches and refuses such targets (or warns, with `--allow_degenerate_targets`); it warns
too when the targets use fewer codes than a healthy tokenizer would (train_tokenizer.py's rule).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from transformers import AutoConfig, AutoModel

from ...cards import hub_id
from ...models import DvaeConfig, VqkdConfig
from ...models.quantizer import usage_and_perplexity
from ...models.vit_core import to_2tuple

logger = logging.getLogger(__name__)

BICUBIC, LANCZOS = v2.InterpolationMode.BICUBIC, v2.InterpolationMode.LANCZOS
# What `--tokenizer` must offer (hf_mim's DvaeTokenizer, VqkdTokenizer and PecoTokenizer all do).
TOKENIZER_INTERFACE = ("get_codebook_indices", "vocab_size", "token_grid")
# reference: the numerics the papers' targets were computed with (see `resolve_precision`).
TOKENIZER_PRECISIONS = ("reference", "fp32", "bf16", "fp16", "reference_fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_NAMES = {dtype: name for name, dtype in AUTOCAST_DTYPES.items()}
# Training micro-batches whose targets are measured, and the share of the most frequent code from which
# the targets are degenerate (refused) or suspicious (a warning).
TARGET_CHECK_BATCHES = 2
DEGENERATE_MAJORITY_SHARE = 0.9
SUSPICIOUS_MAJORITY_SHARE = 0.5
# Below health: fewer codes used than this share of the codes the measured tokens could use
# (min(codes, tokens)): the rule train_tokenizer.py warns at while training a tokenizer (the dVAE's
# DVAE_USAGE_WARNING, the EMA quantizer's usage_warning_threshold), so a tokenizer it warned about is
# flagged again when BEiT pre-training uses it.
HEALTHY_USAGE_SHARE = 0.5


class FrozenTokenizer:
    """A trained image tokenizer used as a fixed target function: frozen, in eval mode, under no_grad.

    It is deliberately not an attribute of the model: `save_pretrained` never sees it, and it is never
    passed to `accelerator.prepare` (a DDP/FSDP wrapper would try to synchronise gradients it does
    not have). :meth:`to` puts it on the training device. With `autocast_dtype` (bf16 or fp16) it runs
    under that autocast on CUDA (fp32 elsewhere); the dVAE's reference fp16 mode lives in its own config."""

    def __init__(self, model: torch.nn.Module, source: str, revision: str | None,
                 autocast_dtype: torch.dtype | None = None):
        self.model = model.requires_grad_(False).eval()
        self.source, self.revision, self.autocast_dtype = source, revision, autocast_dtype

    @property
    def vocab_size(self) -> int:
        return int(self.model.vocab_size)

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def precision(self) -> str:
        """How the targets are actually computed on the tokenizer's current device (recorded in the card)."""
        if getattr(self.model.config, "reference_fp16", False):
            return "reference_fp16"
        on_cuda = next(self.model.parameters()).device.type == "cuda"
        if self.autocast_dtype is not None and on_cuda:
            return f"{AUTOCAST_NAMES[self.autocast_dtype]} autocast"
        return str(next(self.model.parameters()).dtype)

    def to(self, device) -> FrozenTokenizer:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] pixels in [0, 1] (the tokenizer applies its own pixel map) -> token ids [B, N] long."""
        enabled = self.autocast_dtype is not None and pixels.device.type == "cuda"
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled):
            ids = self.model.get_codebook_indices(pixels)  # [B, rows, cols]
        return ids.flatten(1).long()  # [B, N], row-major as the model's patches

    @torch.no_grad()
    def fp32_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """The same tokens computed in float32 throughout (no autocast, no fp16 convolutions) [B, N]."""
        with fp32_convolutions(self.model):
            return self.model.get_codebook_indices(pixels).flatten(1).long()

    def token_agreement(self, pixels: torch.Tensor) -> float:
        """Fraction of the tokens of pixels [B, C, h, w] that equal their fp32 value: what the precision
        in force changes in the targets (1.0 in fp32)."""
        return float((self(pixels) == self.fp32_tokens(pixels)).float().mean())


@contextlib.contextmanager
def fp32_convolutions(model: torch.nn.Module):
    """The dVAE's reference fp16 convolutions switched to fp32 for the duration (other models unchanged)."""
    halves = [module for module in model.modules() if getattr(module, "half_precision", False)]
    for module in halves:
        module.half_precision = False
    try:
        yield model
    finally:
        for module in halves:
            module.half_precision = True


def read_tokenizer_config(source: str, revision: str | None, hub_kwargs: dict):
    """A missing local folder is named as such, not reported as an unknown Hub repository."""
    if not os.path.isdir(os.path.expanduser(source)):
        looks_local = source.startswith(("/", "./", "../", "~")) or source.count("/") > 1
        if looks_local:
            raise FileNotFoundError(f"--tokenizer {source}: no such folder. Pass the folder train_tokenizer.py "
                                    "wrote (for example outputs/tokenizer-vqkd) or a Hub id.")
    try:
        return AutoConfig.from_pretrained(source, revision=revision, **hub_kwargs)
    except OSError as error:
        if os.path.isdir(os.path.expanduser(source)):
            raise
        raise FileNotFoundError(f"--tokenizer {source}: no such folder, and no Hub repository of that name could be "
                                f"loaded ({error}). Pass the folder train_tokenizer.py wrote (for example "
                                "outputs/tokenizer-vqkd) or a Hub id.") from error


def resolve_precision(precision: str, config, source: str = "the tokenizer") -> tuple[str, str]:
    """(precision in force, why) for `--tokenizer_precision` and the tokenizer's config (of `source`).
    "reference" computes the targets as the papers did: the DALL-E dVAE with the fp16 convolutions its
    converted config asks for (reference_fp16; a dVAE trained here says false: fp32), BEiT v2's VQ-KD under
    fp16 autocast (beit2 runs `get_codebook_indices` in `torch.cuda.amp.autocast()`), any other in fp32.
    reference_fp16 is the dVAE's own mode: an error for any other tokenizer."""
    if precision not in TOKENIZER_PRECISIONS:
        raise ValueError(f"--tokenizer_precision {precision!r}: choose one of {', '.join(TOKENIZER_PRECISIONS)}.")
    is_dvae = config.model_type == DvaeConfig.model_type
    if precision == "reference_fp16" and not is_dvae:
        raise ValueError(
            f"--tokenizer_precision reference_fp16 is the DALL-E dVAE's fp16 mode, but {source} is a "
            f"{config.model_type!r} tokenizer. Use reference, fp16 or bf16 (autocast on CUDA) or fp32."
        )
    if precision != "reference":
        return precision, "--tokenizer_precision"
    if is_dvae:
        if getattr(config, "reference_fp16", False):
            return "reference_fp16", "the reference: the DALL-E dVAE's fp16 convolutions, as its config says"
        return "fp32", "the reference: this dVAE's config asks for fp32 convolutions (reference_fp16=false)"
    if config.model_type == VqkdConfig.model_type:
        return "fp16", "the reference: beit2 computes VQ-KD targets under fp16 autocast (CUDA only)"
    return "fp32", f"the reference: no reduced precision is known for {config.model_type!r} targets"


def load_frozen_tokenizer(source: str, revision: str | None, precision: str, hub_kwargs: dict) -> FrozenTokenizer:
    """`AutoModel.from_pretrained(source)`, checked to be an image tokenizer and frozen, with the
    precision `resolve_precision` decides (logged)."""
    config = read_tokenizer_config(source, revision, hub_kwargs)
    precision, why = resolve_precision(precision, config, source)
    if config.model_type == DvaeConfig.model_type:
        # The saved flag would run fp16 convolutions under an autocast: the resolved precision decides.
        config.reference_fp16 = precision == "reference_fp16"
    # fp32 weights whatever the saved dtype: bf16 comes from autocast, fp16 from the dVAE's own mode.
    model = AutoModel.from_pretrained(source, config=config, revision=revision, dtype=torch.float32, **hub_kwargs)
    missing = [name for name in TOKENIZER_INTERFACE if not hasattr(model, name)]
    if missing:
        raise ValueError(
            f"--tokenizer {source} loads as {type(model).__name__}, which is not an image tokenizer (it has no "
            f"{missing}). Pass an hf_mim DvaeTokenizer, VqkdTokenizer or PecoTokenizer saved with save_pretrained."
        )
    # A Hub tokenizer is recorded at the commit actually loaded; a local folder has no revision.
    commit = getattr(model.config, "_commit_hash", None)
    recorded = (commit or revision or "main") if hub_id(source) else None
    logger.info("Tokenizer targets computed in %s (%s).", precision, why)
    return FrozenTokenizer(model, source, recorded, autocast_dtype=AUTOCAST_DTYPES.get(precision))


def tokenizer_input_size(tokenizer: FrozenTokenizer, patch_grid: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the tokenizer view: the tokenizer's own image size when its config has one
    (VQ-KD, PeCo), else the patch grid times its downsampling factor (the fully convolutional dVAE:
    14x14 patches -> 112 px). Raises when the tokenizer's token grid is not the model's patch grid."""
    config = tokenizer.model.config
    if getattr(config, "image_size", None) is not None:
        size = to_2tuple(config.image_size)
    elif getattr(config, "downsample_factor", None):
        factor = config.downsample_factor
        size = (patch_grid[0] * factor, patch_grid[1] * factor)
    else:
        raise ValueError(f"Cannot tell the input size of the tokenizer {tokenizer.source}: its config has neither "
                         "image_size nor downsample_factor.")
    token_grid = tuple(tokenizer.model.token_grid(size))
    if token_grid != tuple(patch_grid):
        raise ValueError(
            f"The tokenizer {tokenizer.source} turns its {size[0]}x{size[1]} px input into a "
            f"{token_grid[0]}x{token_grid[1]} token grid, but the model has a {patch_grid[0]}x{patch_grid[1]} patch "
            "grid: each patch needs exactly one token. Use a tokenizer made for this grid, or change --image_size / "
            "--patch_size so that image_size / patch_size equals the token grid."
        )
    return size


def unit_float(image) -> torch.Tensor:
    """PIL image or uint8 tensor -> [C, H, W] float32 in [0, 1]."""
    return TF.to_dtype(TF.to_image(image), torch.float32, scale=True)


class TwoViewCrop:
    """BEiT's augmentation with its tokenizer view: colour jitter and a horizontal flip of the (PIL)
    image, then ONE RandomResizedCrop box resized twice, to the model's size (bicubic) and to the
    tokenizer's (LANCZOS for the dVAE, as the reference; bicubic for VQ-KD). Both views are
    [C, H, W] floats in [0, 1], not normalised. Randomness comes from torch's global RNG, which the
    data pipeline seeds per example."""

    def __init__(self, size, tokenizer_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), color_jitter: float = 0.4,
                 flip: bool = True, interpolation=BICUBIC, tokenizer_interpolation=LANCZOS):
        self.size, self.tokenizer_size = to_2tuple(size), to_2tuple(tokenizer_size)
        self.interpolation, self.tokenizer_interpolation = interpolation, tokenizer_interpolation
        shared = [v2.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter else []
        self.shared = v2.Compose(shared + ([v2.RandomHorizontalFlip()] if flip else []))
        self.crop = v2.RandomResizedCrop(self.size, scale=scale, ratio=ratio)  # only its box sampling is used

    def crop_box(self, image) -> dict[str, int]:
        """One random box {top, left, height, width} in the image's pixels."""
        return self.crop.make_params([image])

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.shared(image)
        box = self.crop_box(image)
        return (self.view(image, box, self.size, self.interpolation),  # [C, H, W]
                self.view(image, box, self.tokenizer_size, self.tokenizer_interpolation))  # [C, h, w]

    @staticmethod
    def view(image, box: dict[str, int], size: tuple[int, int], interpolation) -> torch.Tensor:
        return unit_float(TF.resized_crop(image, **box, size=list(size), interpolation=interpolation, antialias=True))


class TargetHealth:
    """Code usage of the targets of the first `batches` training micro-batches (summed over processes):
    refuses degenerate targets (one code for >= 90% of the patches) unless `allow_degenerate`, warns when
    one code covers half of them, and when fewer than half the codes the tokens could use are used."""

    def __init__(self, vocab_size: int, source: str, batches: int = TARGET_CHECK_BATCHES,
                 allow_degenerate: bool = False):
        self.vocab_size, self.source, self.batches, self.allow_degenerate = vocab_size, source, batches, allow_degenerate
        self.counts, self.seen = None, 0
        self.report: dict[str, float] | None = None  # set once measured

    def add(self, targets: torch.Tensor, accelerator=None) -> None:
        """targets [B, N] token ids; checks once the first `batches` micro-batches are counted."""
        if self.report is not None:
            return
        counts = torch.bincount(targets.detach().flatten(), minlength=self.vocab_size).double()  # [V]
        self.counts = counts if self.counts is None else self.counts + counts
        self.seen += 1
        if self.seen >= self.batches:
            total = self.counts if accelerator is None else accelerator.reduce(self.counts, reduction="sum")
            self.check(total)

    def check(self, counts: torch.Tensor) -> dict[str, float]:
        """counts [V]: how often each code is a target."""
        tokens = float(counts.sum())
        used, majority = int((counts > 0).sum()), float(counts.max()) / max(tokens, 1.0)
        perplexity = float(usage_and_perplexity(counts)[1])
        self.report = {"target_codes_used": used, "target_majority_share": majority, "target_perplexity": perplexity}
        logger.info("Targets of the first %d batches: %d of %d codes used (perplexity %.1f), the most frequent on "
                    "%.1f%% of the patches.", self.seen, used, self.vocab_size, perplexity, 100 * majority)
        usage = (f"on the first {self.seen} training batches it used {used} of its {self.vocab_size} codes, and one "
                 f"code is the target of {majority:.0%} of the patches, so predicting it alone scores that accuracy")
        if majority >= DEGENERATE_MAJORITY_SHARE and not self.allow_degenerate:
            raise ValueError(
                f"The tokenizer {self.source} gives degenerate targets: {usage} without learning anything. It has "
                "likely collapsed: retrain it (examples/train_tokenizer.py logs codebook_usage and draws "
                "codebook_usage.png) or use another one. To train on these targets anyway, pass "
                "--allow_degenerate_targets."
            )
        if majority >= SUSPICIOUS_MAJORITY_SHARE:
            warnings.warn(f"The tokenizer {self.source} gives skewed targets: {usage}; read masked_accuracy against "
                          "that baseline.", RuntimeWarning, stacklevel=2)
        self.warn_below_health(used, int(tokens), perplexity)
        return self.report

    def warn_below_health(self, used: int, tokens: int, perplexity: float) -> None:
        """A tokenizer that spreads its tokens over too few codes (e.g. a dVAE using 7 of 64, perplexity 2.7)
        gives targets that carry little information, even when no single code dominates."""
        possible = min(self.vocab_size, tokens)
        if used >= HEALTHY_USAGE_SHARE * possible:
            return
        warnings.warn(
            f"The tokenizer {self.source} gives below-health targets: its {tokens} tokens on the first {self.seen} "
            f"training batches used {used} of its {self.vocab_size} codes (fewer than {HEALTHY_USAGE_SHARE:.0%} of "
            f"the {possible} they could use; perplexity {perplexity:.1f}), so the model learns to tell few kinds of "
            "patches apart. Retrain the tokenizer (train_tokenizer.py warns about the same collapse and logs "
            "codebook_usage and perplexity) or use a healthier one; pre-training goes on.",
            RuntimeWarning, stacklevel=3)


__all__ = ["FrozenTokenizer", "TargetHealth", "TwoViewCrop", "fp32_convolutions", "load_frozen_tokenizer",
           "resolve_precision", "tokenizer_input_size", "unit_float"]
