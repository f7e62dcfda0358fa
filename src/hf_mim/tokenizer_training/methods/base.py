"""What the visual-tokenizer training methods (DALL-E dVAE, BEiT v2's VQ-KD, PeCo; one file each in this
folder) share, for the training engine's one loop.

Each method is a :class:`hf_mim.training.TrainingMethod` (model, processor, transforms, loss,
evaluation, figures, recipe) kept in its own registry, :data:`TOKENIZER_METHODS`, so that
`examples/pretrain.py --method` keeps listing MIM methods only. What tokenizers add:

* codebook health every logging step: usage and perplexity of the codes chosen in the window (counts
  summed over processes), dead codes, the loss terms, and for the EMA codebooks a fingerprint of every
  process's codebook (equal fingerprints = bit-identical codebooks);
* frozen auxiliary networks (the VQ-KD teacher, PeCo's perceptual ViT) owned by the method: moved to
  the device, never prepared, trained or saved with the tokenizer;
* a stop with the optimiser step and the way out when features or losses turn NaN;
* figures: the codebook-usage histogram, token maps, and reconstructions for pixel decoders.

Tokenizers take [0, 1] pixels (each applies its own pixel map), so the transforms and the saved image
processor do NOT normalise with a mean/std.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from typing import ClassVar

import torch
from transformers import AutoModel

from ...models import MimImageProcessor
from ...models.quantizer import usage_and_perplexity
from ...training.method import CropOptions, MethodRegistry, TrainingMethod, crop_and_flip, processor_pixels
from .. import figures

logger = logging.getLogger(__name__)

TOKENIZER_METHODS = MethodRegistry("tokenizers", kind="tokenizer")
register_tokenizer_method, get_tokenizer_method = TOKENIZER_METHODS.register, TOKENIZER_METHODS.lookup


def codebook_fingerprint(codebook: torch.Tensor) -> str:
    """The first 15 hex digits of the SHA-256 of the float32 codebook's bytes (fits in an int64)."""
    data = codebook.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:15]


class CodeCounter:
    """Per-code token counts [K] of this process: the logging window's and the whole run's (float64, exact)."""

    def __init__(self, num_codes: int, device):
        self.window = torch.zeros(num_codes, dtype=torch.float64, device=device)
        self.total = torch.zeros(num_codes, dtype=torch.float64, device=device)

    def add(self, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices.detach().flatten(), minlength=len(self.window)).double()  # [K]
        self.window += counts
        self.total += counts

    def flush(self, accelerator) -> torch.Tensor:
        """Collective: the window's counts summed over processes [K]; the window restarts."""
        counts = accelerator.reduce(self.window.clone(), reduction="sum")
        self.window.zero_()
        return counts


class TermMeter:
    """Running sums of named loss terms over the logging window (device tensors, reduced when read)."""

    def __init__(self, device):
        self.device, self.sums, self.batches = device, {}, 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().double()
        self.batches += 1

    def flush(self, accelerator, names: tuple[str, ...]) -> dict[str, float]:
        """Collective: the window's mean of each term over micro-batches and processes (names fixed by the
        method, so every process reduces the same tensor even before its first batch)."""
        if not names:
            return {}
        sums = torch.stack([torch.as_tensor(self.sums.get(name, 0.0), dtype=torch.float64, device=self.device)
                            for name in names] + [torch.tensor(float(self.batches), dtype=torch.float64,
                                                               device=self.device)])
        sums = accelerator.reduce(sums, reduction="sum")
        self.sums, self.batches = {}, 0
        batches = max(float(sums[-1]), 1.0)
        return {name: float(value) / batches for name, value in zip(names, sums[:-1])}


class TokenizerMethod(TrainingMethod):
    """What the three tokenizers share; subclasses say how to compute the loss terms, the evaluation
    statistics and the reconstructions of their model."""

    auto_model_class = AutoModel
    no_weight_decay_names = ("cls_token", "pos_embed")  # the EMA codebooks are buffers: no optimiser sees them
    # Loss terms logged at every logging step besides the total (names of `loss_terms`' dict).
    term_names: ClassVar[tuple[str, ...]] = ()
    # Settings that apply only to the embedded digits demo (no data source given); they win over `defaults`.
    demo_defaults: ClassVar[dict] = {}
    # The RandomResizedCrop scale of the recipe (BEiT v2's tokenizer: 0.08-1).
    recipe_crop_min_scale: ClassVar[float] = 0.08
    options_class = CropOptions

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.accelerator = None
        self.step = 0  # optimiser steps made (`after_optimizer_step`): the schedules inside the loss follow it
        self.trained_step = 0  # the step of the last training batch (what the logged window's values were made at)
        self.codes = self.terms = None
        self.eval_counts = self.last_eval_counts = None
        self.crop_min_scale = (self.options.crop_min_scale if self.options.crop_min_scale is not None
                               else self.recipe_crop_min_scale)

    def after_optimizer_step(self, step: int) -> None:
        self.step = step

    # ------------------------------------------------------------------ model, processor, data

    @property
    def num_channels(self) -> int:
        return self.config.num_channels

    @property
    def stride(self) -> int:
        """Pixels per token along each side (the patch size or the downsampling factor)."""
        raise NotImplementedError

    @property
    def image_mode(self) -> str:
        return "RGB" if self.num_channels == 3 else "L"

    @property
    def grid_size(self) -> tuple[int, int]:
        height, width = self.image_size
        return height // self.stride, width // self.stride

    def build_image_processor(self):
        """Resize (bicubic) and rescale to [0, 1], no mean/std: what `get_codebook_indices` takes."""
        args = self.args
        if args.image_processor_name or args.model_name_or_path:
            return super().build_image_processor()
        height, width = self.image_size
        return MimImageProcessor(size={"height": height, "width": width}, do_normalize=False,
                                 patch_size=self.stride, do_convert_rgb=self.num_channels == 3)

    def train_transform(self, processor):
        """RandomResizedCrop (bicubic, scale --crop_min_scale..1) + horizontal flip, [0, 1] floats."""
        augment = crop_and_flip(self.image_size, (self.crop_min_scale, 1.0))  # resized as uint8, then scaled: exactly [0, 1]
        return lambda image, generator: {"pixel_values": augment(image)}

    def eval_transform(self, processor):
        return lambda image, generator: {"pixel_values": processor_pixels(processor, image)}

    def setup(self, accelerator) -> None:
        self.accelerator = accelerator
        device = accelerator.device
        self.codes = CodeCounter(self.config.vocab_size, device)
        self.eval_counts = torch.zeros(self.config.vocab_size, dtype=torch.float64, device=device)
        self.terms = TermMeter(device)
        for network in self.auxiliary_networks():
            network.to(device)

    def auxiliary_networks(self) -> list[torch.nn.Module]:
        """Frozen networks the loss needs (moved to the device by `setup`, never saved)."""
        return []

    def auxiliary_hub_kwargs(self) -> dict:
        """Hub options for the teacher / perceptual network (--model_revision is the tokenizer's, not theirs)."""
        return {key: value for key, value in self.hub_kwargs().items() if key != "revision"}

    def unwrapped(self, model):
        return self.accelerator.unwrap_model(model) if self.accelerator is not None else model

    # ------------------------------------------------------------------ training

    def loss_terms(self, model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """(loss to minimise, {term name: scalar}, token ids [B, h, w]) of one training batch."""
        raise NotImplementedError

    def training_loss(self, model, batch):
        self.trained_step = self.step
        try:
            loss, terms, indices = self.loss_terms(model, batch["pixel_values"])
            if not bool(torch.isfinite(loss.detach())):
                raise FloatingPointError(f"The {self.name} training loss is {float(loss)} ({self.describe(terms)}).")
        except FloatingPointError as error:
            raise FloatingPointError(self.stop_message(error)) from error
        self.codes.add(indices)
        self.terms.add(terms)
        return loss

    @staticmethod
    def describe(terms: dict[str, torch.Tensor]) -> str:
        return ", ".join(f"{name}={float(value):.4g}" for name, value in terms.items())

    def stop_message(self, error: Exception) -> str:
        return (
            f"Training stopped at optimiser step {self.step}: {error} Resume from the newest checkpoint-<step> in "
            f"{self.args.output_dir} (the default when re-running the command) with a lower --learning_rate, "
            "--max_grad_norm 1.0, or bf16/fp32 instead of fp16; check the images of this step if it recurs."
        )

    def step_metrics(self, model) -> dict[str, float]:
        accelerator = self.accelerator
        values = self.terms.flush(accelerator, self.term_names)
        counts = self.codes.flush(accelerator)  # [K] over processes
        usage, perplexity = usage_and_perplexity(counts)
        values.update(codebook_usage=float(usage), perplexity=float(perplexity))
        values.update(self.codebook_health(counts, self.unwrapped(model)))
        return values

    def codebook_health(self, window_counts: torch.Tensor, tokenizer) -> dict:
        """Method-specific health values (collective); `tokenizer`: the unwrapped model being trained."""
        return {}

    # ------------------------------------------------------------------ evaluation

    def eval_outputs(self, model, pixel_values: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({statistic: per-image value [B]}, token ids [B, h, w]) of one evaluation batch."""
        raise NotImplementedError

    def eval_sums(self, model, batch):
        per_image, indices = self.eval_outputs(model, batch["pixel_values"])
        # All processes' ids, without accelerate's padding duplicates: every process counts the same codes.
        indices = self.accelerator.gather_for_metrics(indices)
        self.eval_counts += torch.bincount(indices.flatten(), minlength=len(self.eval_counts)).double()
        first = next(iter(per_image.values()))
        return {**per_image, "images": torch.ones_like(first)}

    def eval_metrics(self, sums):
        images = max(sums.pop("images"), 1.0)
        metrics = {name: value / images for name, value in sums.items()}
        usage, perplexity = usage_and_perplexity(self.eval_counts)
        metrics.update(codebook_usage=float(usage), perplexity=float(perplexity),
                       unused_codes=float((self.eval_counts == 0).sum()))
        self.last_eval_counts = self.eval_counts.clone()
        self.eval_counts.zero_()
        return metrics

    # ------------------------------------------------------------------ figures and card

    def decoded_images(self, tokenizer, indices: torch.Tensor) -> torch.Tensor | None:
        """Images [B, C, H, W] in [0, 1] decoded from token ids, or None (no pixel decoder)."""
        return None

    def save_reconstructions(self, model, batch, processor, path, draw=True):
        """Codebook-usage histogram (the last evaluation's codes, else all training codes), token maps of the
        figure images, and their reconstructions from tokens for pixel decoders. Every process calls this."""
        counts, what = self.last_eval_counts, "the held-out images (last evaluation)"
        if counts is None:
            counts, what = self.accelerator.reduce(self.codes.total.clone(), reduction="sum"), "all training batches"
        tokenizer = self.unwrapped(model)
        pixels = batch["pixel_values"]
        with torch.no_grad():
            indices = tokenizer.get_codebook_indices(pixels)  # [B, h, w]
            decoded = self.decoded_images(tokenizer, indices)
        if not draw:
            return False
        folder = os.path.dirname(path)
        stats = figures.save_codebook_usage(os.path.join(folder, figures.CODEBOOK_FIGURE), counts, what)
        logger.info("Codebook on %s: %d of %d codes used, perplexity %.1f", what,
                    len(counts) - stats["unused_codes"], len(counts), stats["perplexity"])
        title = f"{self.name} tokens of held-out images ({tokenizer.vocab_size} codes)"
        figures.save_token_maps(os.path.join(folder, figures.TOKEN_MAP_FIGURE), pixels, indices,
                                tokenizer.vocab_size, decoded, title)
        if decoded is None:
            return False
        figures.save_reconstructions(path, pixels, decoded, f"{self.name}: images decoded from their tokens")
        return True

    def recipe(self) -> dict:
        scale = self.crop_min_scale
        return {"augmentation": f"RandomResizedCrop({self.image_size[0]}, scale {scale:g}-1, bicubic) + flip",
                "num_codes": self.config.vocab_size, "token_grid": list(self.grid_size)}


class QuantizerMethod(TokenizerMethod):
    """Dead codes and per-process codebook fingerprints at every logging step."""

    def codebook_health(self, window_counts, tokenizer):
        quantizer = tokenizer.quantize
        dead = int((quantizer.steps_since_used >= quantizer.dead_code_threshold).sum())  # already over processes
        fingerprint = int(codebook_fingerprint(quantizer.embedding.weight), 16)
        fingerprints = self.accelerator.gather(torch.tensor([fingerprint], device=self.accelerator.device)).tolist()
        values = {"dead_codes": dead, "codebook_ranks_identical": float(len(set(fingerprints)) == 1)}
        values.update({f"codebook_sha_rank{rank}": f"{value:015x}" for rank, value in enumerate(fingerprints)})
        return values


__all__ = ["CodeCounter", "QuantizerMethod", "TOKENIZER_METHODS", "TermMeter", "TokenizerMethod", "codebook_fingerprint",
           "get_tokenizer_method", "register_tokenizer_method"]
