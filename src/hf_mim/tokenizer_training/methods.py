"""Visual-tokenizer training methods (DALL-E dVAE, BEiT v2's VQ-KD, PeCo) for the ONE pre-training loop.

Each method is a :class:`hf_mim.pretraining.PretrainingMethod` (model, processor, transforms, loss,
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
import warnings
from typing import ClassVar

import torch
from transformers import AutoModel

from ..models import DvaeConfig, DvaeTokenizer, MimImageProcessor, PecoConfig, PecoTokenizer, VqkdConfig, VqkdTokenizer
from ..models.modeling_vqkd import cosine_distillation_loss
from ..models.quantizer import usage_and_perplexity
from ..models.vit_core import to_2tuple
from ..pretraining.methods import MethodRegistry, PretrainingMethod, crop_and_flip, processor_pixels
from ..pretraining.optimization import effective_batch_size, resolve_learning_rate
from ..teachers import TeacherLoadError, load_teacher, load_teacher_for
from . import figures
from .peco_losses import PecoLoss, check_image_size, load_feature_network_for, perceptual_distance

logger = logging.getLogger(__name__)

TOKENIZER_METHODS = MethodRegistry("tokenizers")
register_tokenizer_method, get_tokenizer_method = TOKENIZER_METHODS.register, TOKENIZER_METHODS.lookup
# The fraction of the codes a logging window could have used (min(codes, tokens seen)) below which a
# dVAE run warns; the EMA quantizer warns by itself (its `usage_warning_threshold`).
DVAE_USAGE_WARNING = 0.5
DVAE_WARNING_INTERVAL = 100  # optimiser steps between two collapse warnings


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


class TokenizerMethod(PretrainingMethod):
    """What the three tokenizers share; subclasses say how to compute the loss terms, the evaluation
    statistics and the reconstructions of their model."""

    auto_model_class = AutoModel
    no_weight_decay_names = ("cls_token", "pos_embed")  # the EMA codebooks are buffers: no optimiser sees them
    # Loss terms logged at every logging step besides the total (names of `loss_terms`' dict).
    term_names: ClassVar[tuple[str, ...]] = ()
    # Settings that apply only to the embedded digits demo (no data source given); they win over `defaults`.
    demo_defaults: ClassVar[dict] = {}
    # The RandomResizedCrop scale of the recipe (BEiT v2's tokenizer: 0.08-1).
    crop_min_scale: ClassVar[float] = 0.08

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.accelerator = None
        self.model = None  # the prepared model, kept from training_loss for the codebook fingerprints
        self.codes = self.terms = None
        self.eval_counts = self.last_eval_counts = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        cls.add_tokenizer_arguments(parser.add_argument_group(f"{cls.summary.split(':')[0]} (--method {cls.name})"))

    @classmethod
    def add_tokenizer_arguments(cls, group) -> None:
        """The method's own options."""

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
        scale = (self.args.crop_min_scale if self.args.crop_min_scale is not None else self.crop_min_scale, 1.0)
        augment = crop_and_flip(self.image_size, scale)  # resized as uint8, then scaled: exactly [0, 1]
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
        self.model = model
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

    def step_metrics(self) -> dict[str, float]:
        accelerator = self.accelerator
        values = self.terms.flush(accelerator, self.term_names)
        counts = self.codes.flush(accelerator)  # [K] over processes
        usage, perplexity = usage_and_perplexity(counts)
        values.update(codebook_usage=float(usage), perplexity=float(perplexity))
        values.update(self.codebook_health(counts))
        return values

    def codebook_health(self, window_counts: torch.Tensor) -> dict:
        """Method-specific health values (collective)."""
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
        scale = self.args.crop_min_scale if self.args.crop_min_scale is not None else self.crop_min_scale
        return {"augmentation": f"RandomResizedCrop({self.image_size[0]}, scale {scale:g}-1, bicubic) + flip",
                "num_codes": self.config.vocab_size, "token_grid": list(self.grid_size)}


def add_crop_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument_group("augmentation").add_argument(
        "--crop_min_scale", type=float,
        help="smallest RandomResizedCrop area fraction (default: the recipe's 0.08; 0.5 for the digits demo)")


# ---------------------------------------------------------------------------------------------
# DALL-E dVAE
# ---------------------------------------------------------------------------------------------


@register_tokenizer_method
class DvaeMethod(TokenizerMethod):
    name = "dvae"
    summary = ("DALL-E dVAE (Ramesh et al., 2021): Gumbel-softmax relaxation, uniform prior (KL), annealed "
               "temperature")
    config_class = DvaeConfig
    model_class = DvaeTokenizer
    term_names = ("reconstruction_loss", "kl_loss")
    # DALL-E, appendix A.2 as we read it: AdamW (0.9, 0.999), weight decay 1e-4, lr 1e-4 at batch 512 (here
    # as blr 5e-5 x batch / 256), cosine; the temperature and KL schedules are config fields.
    defaults = {"base_learning_rate": 5e-5, "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 1e-4,
                "warmup_steps": 0, "max_grad_norm": None}
    demo_defaults = {"base_learning_rate": 4e-3, "num_train_epochs": 10.0, "crop_min_scale": 0.5}
    presets = {
        # 32 px digits -> 8x8 tokens, 64 codes; the schedules shortened to the demo's ~240 steps: codes spread out
        # only once the temperature is low (at temperature ~1 every cell's argmax is the same code).
        "dvae-demo": dict(vocab_size=64, hidden_size=32, num_groups=3, num_blocks_per_group=1, decoder_init_size=32,
                          decoder_hidden_size=32, decoder_num_blocks_per_group=1, reference_fp16=False,
                          temperature_anneal_steps=150, kl_warmup_steps=50, kl_weight=1.0),
        "dvae-base": dict(reference_fp16=False),  # the published architecture, trained in fp32 / mixed precision
    }
    preset_image_sizes = {"dvae-demo": 32, "dvae-base": 256}  # DALL-E trains at 256 px

    def __init__(self, args):
        super().__init__(args)
        self.preset, self.last_warning_step = None, None

    def build_model(self, default_preset):
        if self.args.patch_size is not None:
            raise ValueError("--patch_size does not apply to the dVAE: its grid is image_size / 2**(num_groups - 1).")
        self.preset = self.args.config_name or default_preset
        model = super().build_model(default_preset)
        model.token_grid(self.image_size)  # a clear error now if the size does not fit the downsampling
        return model

    def config_knobs(self) -> dict:
        return {}  # no image_size or patch_size field: the data's resolution is the method's

    @property
    def image_size(self) -> tuple[int, int]:
        return to_2tuple(self.args.image_size or self.preset_image_sizes.get(self.preset, 112))

    @property
    def num_channels(self) -> int:
        return self.config.input_channels

    @property
    def stride(self) -> int:
        return self.config.downsample_factor

    def loss_terms(self, model, pixel_values):
        output = model(pixel_values=pixel_values, step=self.step)
        indices = output.logits.detach().argmax(dim=1)  # [B, h, w]: the codes the relaxation concentrates on
        return output.loss, {"reconstruction_loss": output.reconstruction_loss, "kl_loss": output.kl_loss}, indices

    def codebook_health(self, window_counts):
        temperature, kl_weight = self.unwrapped(self.model).schedule_values(self.step) if self.model is not None else (
            None, None)
        tokens, num_codes = float(window_counts.sum()), len(window_counts)
        used = int((window_counts > 0).sum())
        possible = min(num_codes, int(tokens))
        due = self.last_warning_step is None or self.step - self.last_warning_step >= DVAE_WARNING_INTERVAL
        if tokens and used < DVAE_USAGE_WARNING * possible and due and self.accelerator.is_main_process:
            self.last_warning_step = self.step
            warnings.warn(
                f"Codebook collapse at step {self.step}: the last logging window's {int(tokens)} tokens used only "
                f"{used} of {num_codes} codes (fewer than {DVAE_USAGE_WARNING:.0%} of the {possible} it could use). "
                "Lower the learning rate, lengthen the KL warm-up (kl_warmup_steps) or slow the temperature annealing "
                f"(next warning in {DVAE_WARNING_INTERVAL} steps at the earliest).", RuntimeWarning, stacklevel=2,
            )
        values = {"unused_codes_in_window": num_codes - used}
        if temperature is not None:
            values.update(temperature=temperature, kl_weight=kl_weight)
        return values

    def eval_outputs(self, model, pixel_values):
        output = model(pixel_values=pixel_values)  # eval mode: the argmax codes
        mse = (output.reconstruction.float() - pixel_values.float()).pow(2).mean(dim=(1, 2, 3))  # [B]
        return {"pixel_mse": mse}, output.logits.argmax(dim=1)

    def decoded_images(self, tokenizer, indices):
        return tokenizer.decode(indices)

    def recipe(self):
        config = self.config
        return {**super().recipe(), "temperature": f"{config.temperature_start:g} -> {config.temperature_end:g} over "
                f"{config.temperature_anneal_steps} steps ({config.anneal_schedule})",
                "kl_weight": f"0 -> {config.kl_weight:g} over {config.kl_warmup_steps} steps",
                "reconstruction_loss": config.reconstruction_loss, "straight_through": config.straight_through}


# ---------------------------------------------------------------------------------------------
# Methods with the EMA vector quantizer (VQ-KD, PeCo)
# ---------------------------------------------------------------------------------------------


class QuantizerMethod(TokenizerMethod):
    """Dead codes and per-process codebook fingerprints at every logging step."""

    def codebook_health(self, window_counts):
        if self.model is None:
            return {}
        quantizer = self.unwrapped(self.model).quantize
        dead = int((quantizer.steps_since_used >= quantizer.dead_code_threshold).sum())  # already over processes
        fingerprint = int(codebook_fingerprint(quantizer.embedding.weight), 16)
        fingerprints = self.accelerator.gather(torch.tensor([fingerprint], device=self.accelerator.device)).tolist()
        values = {"dead_codes": dead, "codebook_ranks_identical": float(len(set(fingerprints)) == 1)}
        values.update({f"codebook_sha_rank{rank}": f"{value:015x}" for rank, value in enumerate(fingerprints)})
        return values


@register_tokenizer_method
class VqkdMethod(QuantizerMethod):
    name = "vqkd"
    summary = "VQ-KD (BEiT v2, Peng et al., 2022): a codebook distilled from a frozen teacher's patch features"
    config_class = VqkdConfig
    model_class = VqkdTokenizer
    term_names = ("distillation_loss", "commitment_loss")
    # BEiT v2's tokenizer recipe: 100 epochs, batch 512, lr 2e-4 (= blr 1e-4 x 512 / 256), AdamW (0.9, 0.99),
    # weight decay 1e-4 (not on the codebook, cls or positions). The warm-up (5% of the run) is ours.
    defaults = {"base_learning_rate": 1e-4, "adam_beta1": 0.9, "adam_beta2": 0.99, "weight_decay": 1e-4,
                "num_train_epochs": 100.0, "warmup_steps": 0.05, "max_grad_norm": None}
    demo_defaults = {"base_learning_rate": 4e-3, "num_train_epochs": 10.0, "crop_min_scale": 0.5}
    presets = {
        # 32 px digits, 4 px patches -> 8x8 tokens (the grid of the MAE demo of examples/pretrain.py), 64 codes.
        "vqkd-demo": dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=128, decoder_hidden_size=64, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=2, decoder_intermediate_size=128, code_dim=16, num_codes=64,
                          teacher_name_or_path=None, teacher_type="auto"),
        "vqkd-base": {},  # vqkd_encoder_base_decoder_3x768x12_clip: ViT-B/16, 8192 x 32 codes, CLIP ViT-B/16 teacher
    }

    def __init__(self, args):
        super().__init__(args)
        self.teacher = None

    @classmethod
    def add_tokenizer_arguments(cls, group):
        group.add_argument("--teacher", help="the frozen teacher: ANY transformers vision model id or directory "
                           "(CLIP, ViT, DINO, DINOv2, hf_mim MAE/BEiT). Never saved with the tokenizer. Default: the "
                           "config's teacher_name_or_path (vqkd-base: openai/clip-vit-base-patch16; the digits demo "
                           "has none: train one with `python examples/pretrain.py`, then pass "
                           "--teacher outputs/pretrain-mae)")
        group.add_argument("--teacher_type", choices=["auto", "clip"],
                           help="'clip': a CLIP checkpoint's projected patch tokens; 'auto' (default with --teacher): "
                                "CLIP detected, any other model's last_hidden_state patch tokens")
        group.add_argument("--teacher_layer", type=int, help="distil the raw patch tokens of hidden_states[k] instead")
        group.add_argument("--teacher_input_size", type=int,
                           help="resize the teacher's view to this size so that its patch grid matches the tokenizer's "
                                "(e.g. 196 for a patch-14 teacher and 14x14 tokens)")

    def teacher_knobs(self) -> dict:
        args, knobs = self.args, {}
        if args.teacher:
            knobs.update(teacher_name_or_path=args.teacher, teacher_type=args.teacher_type or "auto")
        elif args.teacher_type:
            knobs["teacher_type"] = args.teacher_type
        for key in ("teacher_layer", "teacher_input_size"):
            if getattr(args, key) is not None:
                knobs[key] = getattr(args, key)
        return knobs

    def config_knobs(self):
        knobs = {**super().config_knobs(), **self.teacher_knobs()}
        if self.teacher is not None and not self.args.model_name_or_path:  # a new decoder predicts what it gives
            knobs["teacher_dim"] = self.teacher.feature_dim  # (a trained one keeps its size: checked in build_model)
        return knobs

    def build_model(self, default_preset):
        args = self.args
        if args.teacher:  # first, so that a bad teacher fails before anything else, and to size the decoder
            knobs = self.teacher_knobs()
            self.teacher = self.load(lambda: load_teacher(
                args.teacher, teacher_type=knobs["teacher_type"], layer=knobs.get("teacher_layer"),
                input_size=knobs.get("teacher_input_size"), **self.auxiliary_hub_kwargs()))
        model = super().build_model(default_preset)
        if self.teacher is None:
            self.teacher = self.load(lambda: load_teacher_for(model.config, **self.auxiliary_hub_kwargs()))
        else:
            grid = model.token_grid(model.config.image_size)
            self.teacher.check_compatible(image_size=model.config.image_size, grid_size=grid,
                                          feature_dim=model.config.teacher_dim)
        logger.info("Teacher: %s (%d-dim patch features; inputs normalised with %s)", self.teacher.name_or_path,
                    self.teacher.feature_dim, self.teacher.normalization_source)
        return model

    @staticmethod
    def load(loader):
        try:
            return loader()
        except ValueError as error:
            if "names no teacher" in str(error):
                raise ValueError(f"{error} On the command line: --teacher MODEL_ID_OR_DIR (the digits demo: "
                                 "`python examples/pretrain.py` writes an MAE to outputs/pretrain-mae).") from None
            raise
        except TeacherLoadError as error:
            raise TeacherLoadError(f"--teacher: {error}") from error

    @property
    def num_channels(self) -> int:
        return self.config.num_channels

    @property
    def stride(self) -> int:
        return to_2tuple(self.config.patch_size)[0]

    def auxiliary_networks(self):
        return [self.teacher]

    def loss_terms(self, model, pixel_values):
        teacher_features = self.teacher(pixel_values)  # [B, N, T], no gradient, the teacher's own normalisation
        output = model(pixel_values=pixel_values, teacher_features=teacher_features)
        return output.loss, {"distillation_loss": output.distillation_loss,
                             "commitment_loss": output.commitment_loss}, output.indices

    def eval_outputs(self, model, pixel_values):
        target = self.teacher(pixel_values)  # [B, N, T]
        output = model(pixel_values=pixel_values, teacher_features=target)
        per_image = torch.stack([cosine_distillation_loss(p, t) for p, t in zip(output.predicted_features, target)])
        return {"distillation_loss": per_image}, output.indices  # [B], [B, h, w]

    def recipe(self):
        return {**super().recipe(), "teacher": self.teacher.name_or_path, "teacher_dim": self.teacher.feature_dim,
                "teacher_layer": self.config.teacher_layer, "teacher_input_size": self.config.teacher_input_size,
                "teacher_normalization": self.teacher.normalization_source}


@register_tokenizer_method
class PecoMethod(QuantizerMethod):
    name = "peco"
    card_name = "peco_tokenizer"
    summary = ("PeCo (Dong et al., 2023): a VQ-VAE trained with pixel, commitment and perceptual losses from a "
               "frozen ViT")
    config_class = PecoConfig
    model_class = PecoTokenizer
    term_names = ("pixel_loss", "commitment_loss", "perceptual_loss", "adversarial_loss", "adversarial_lambda",
                  "discriminator_loss")
    # Not from the paper (no recipe was published): VQGAN's Adam betas (0.5, 0.9), no weight decay; lr ours.
    defaults = {"base_learning_rate": 1e-4, "adam_beta1": 0.5, "adam_beta2": 0.9, "weight_decay": 0.0,
                "warmup_steps": 0.02, "max_grad_norm": None}
    demo_defaults = {"base_learning_rate": 4e-3, "num_train_epochs": 10.0, "crop_min_scale": 0.5}
    presets = {
        # 32 px digits, 4x downsampling -> 8x8 tokens (the MAE demo's patch grid), 64 codes; perceptual blocks 1-2.
        "peco-demo": dict(image_size=32, downsample_factor=4, hidden_size=16, channel_multipliers=[1, 2, 2],
                          num_res_blocks=1, attention_at_lowest_resolution=False, norm_num_groups=8, code_dim=16,
                          num_codes=64, perceptual_layers=[1, 2]),
        "peco-base": {},  # ours: VQGAN f16 (224 px -> 14x14), 8192 x 256 codes, perceptual blocks 3/6/9/12
    }
    # What the paper confirms, for the card; every other setting is ours.
    PAPER_SETTINGS = {"num_codes": 8192}

    def __init__(self, args):
        super().__init__(args)
        self.loss = None
        self.discriminator_optimizer = None

    @classmethod
    def add_tokenizer_arguments(cls, group):
        group.add_argument("--perceptual_model", help="the frozen perceptual ViT: a transformers vision model id or "
                           "directory, self-supervised as in the paper (MoCo v3, DINO, or this package's MAE: "
                           "`python examples/pretrain.py` writes one to outputs/pretrain-mae). Never saved.")
        group.add_argument("--perceptual_layers", type=int, nargs="+",
                           help="hidden-state indices compared (0 = embeddings, k = block k; default: the config's, "
                                "ours: 3 6 9 12)")
        group.add_argument("--perceptual_input_size", type=int,
                           help="resize the perceptual network's view to this size")

    def config_knobs(self):
        args = self.args
        knobs = {"image_size": args.image_size} if args.image_size is not None else {}
        if args.patch_size is not None:
            knobs["downsample_factor"] = args.patch_size  # one token per patch_size x patch_size pixels
        for key, value in (("perceptual_network_name_or_path", args.perceptual_model),
                           ("perceptual_layers", args.perceptual_layers),
                           ("perceptual_input_size", args.perceptual_input_size)):
            if value is not None:
                knobs[key] = value
        if args.patch_size is not None and "channel_multipliers" not in (args.config_overrides or ""):
            knobs["channel_multipliers"] = None  # the default widths for the new factor
        return knobs

    def build_model(self, default_preset):
        model = super().build_model(default_preset)
        try:
            network = load_feature_network_for(model.config, **self.auxiliary_hub_kwargs())
        except TeacherLoadError as error:
            raise TeacherLoadError(f"--perceptual_model: {error}") from error
        check_image_size(model.config.image_size, network)
        self.loss = PecoLoss(model.config, network)
        logger.info("Perceptual network: %s, hidden states %s", network.name_or_path, network.layers)
        return model

    @property
    def stride(self) -> int:
        return self.config.downsample_factor

    def auxiliary_networks(self):
        return [self.loss]  # with use_adversarial it holds the discriminator, trained here, never saved

    def setup(self, accelerator):
        super().setup(accelerator)
        if self.loss.discriminator is None:
            return
        args = self.args
        batch = effective_batch_size(args.per_device_train_batch_size, accelerator.num_processes,
                                     args.gradient_accumulation_steps)
        # A constant lr, as VQGAN; the discriminator and its optimiser go into every checkpoint-<step>.
        self.discriminator_optimizer = torch.optim.AdamW(
            self.loss.discriminator.parameters(), lr=resolve_learning_rate(args.learning_rate, args.base_learning_rate,
                                                                           batch),
            betas=(args.adam_beta1, args.adam_beta2), weight_decay=0.0)

    def checkpoint_state(self):
        if self.loss.discriminator is None:
            return {}
        return {"discriminator": self.loss.discriminator, "discriminator_optimizer": self.discriminator_optimizer}

    def discriminator_step(self, pixel_values: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """One step of D on this batch; its gradients are averaged over processes by hand (D is not
        prepared: it must stay out of the tokenizer's DDP wrapper and of the saved model)."""
        loss = self.loss.discriminator_loss(pixel_values, reconstruction)
        loss.backward()
        parameters = [p for p in self.loss.discriminator.parameters() if p.grad is not None]
        grads = self.accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in parameters]), reduction="mean")
        for parameter, grad in zip(parameters, grads.split([p.numel() for p in parameters])):
            parameter.grad.copy_(grad.view_as(parameter))
        self.discriminator_optimizer.step()
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def loss_terms(self, model, pixel_values):
        output = model(pixel_values=pixel_values)
        discriminator_loss = output.pixel_loss.new_zeros(())
        if self.loss.adversarial_active(self.step):
            discriminator_loss = self.discriminator_step(pixel_values, output.reconstruction)
        terms = self.loss(output, pixel_values, step=self.step, last_layer=self.unwrapped(model).last_layer_weight())
        return terms.total, {"pixel_loss": terms.pixel, "commitment_loss": terms.commitment,
                             "perceptual_loss": terms.perceptual, "adversarial_loss": terms.adversarial,
                             "adversarial_lambda": terms.adversarial_lambda,
                             "discriminator_loss": discriminator_loss}, output.indices

    def eval_outputs(self, model, pixel_values):
        output = model(pixel_values=pixel_values)
        reconstruction = output.reconstruction.float().clamp(0, 1)
        mse = (reconstruction - pixel_values.float()).pow(2).mean(dim=(1, 2, 3))  # [B]
        perceptual = perceptual_distance(self.loss.network, pixel_values, output.reconstruction,
                                         self.config.layer_weights)  # [B]
        return {"pixel_mse": mse, "perceptual_loss": perceptual}, output.indices

    def decoded_images(self, tokenizer, indices):
        return tokenizer.decode(indices)

    def provenance(self, name: str, value) -> str:
        paper = self.PAPER_SETTINGS.get(name)
        if paper is None:
            return f"{value} (ours)"
        return f"{value} (paper)" if value == paper else f"{value} (ours; paper: {paper})"

    def recipe(self):
        config = self.config
        settings = {name: getattr(config, name) for name in (
            "num_codes", "code_dim", "downsample_factor", "commitment_weight", "pixel_loss", "pixel_loss_weight",
            "perceptual_layers", "perceptual_weight", "perceptual_feature_norm", "use_adversarial")}
        if config.use_adversarial:
            settings.update({name: getattr(config, name) for name in (
                "adversarial_weight", "adversarial_start_step", "adaptive_adversarial_weight",
                "discriminator_hidden_size", "discriminator_num_layers")})
        return {**super().recipe(),
                "perceptual_network": f"{self.loss.network.name_or_path} (frozen ViT, several depths: paper's idea; "
                                      "paper: MoCo v3)",
                **{name: self.provenance(name, value) for name, value in settings.items()},
                "optimizer": f"AdamW {self.args.adam_beta1, self.args.adam_beta2} (ours, from VQGAN)"}


__all__ = ["DvaeMethod", "PecoMethod", "TOKENIZER_METHODS", "TokenizerMethod", "VqkdMethod", "codebook_fingerprint",
           "get_tokenizer_method", "register_tokenizer_method"]
