"""Pre-training methods: everything the training loop needs to know about one MIM method.

A method builds (or loads) its model and image processor, turns an image into the tensors of one
example (train: augmented; eval: the processor's preprocessing with FIXED masks), computes the
training loss of a batch, the summable statistics of an evaluation batch, and draws the
reconstruction figure. The loop in `trainer_loop.py` knows nothing else about the method, so
BEiT, BEiT v2, ViT-MPP and PeCo plug in by subclassing :class:`PretrainingMethod` and adding
themselves with :func:`register_method`.
"""

from __future__ import annotations

import argparse
import logging
from typing import ClassVar

import torch
from huggingface_hub.errors import StrictDataclassError
from torchvision.transforms import v2
from transformers import AutoConfig, AutoImageProcessor, AutoModelForPreTraining, PreTrainedModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..models import MaeConfig, MaeForPreTraining, MimImageProcessor
from ..models.losses import normalize_patches
from ..models.vit_core import grid_size_for, patchify, to_2tuple
from .overrides import apply_config_overrides

logger = logging.getLogger(__name__)

class MethodRegistry(dict):
    """`--method` name -> method class. `register` is the class decorator; `lookup` names the choices
    when a name is unknown. The pre-training methods and the tokenizer methods each have one."""

    def __init__(self, label: str = "available"):
        super().__init__()
        self.label = label

    def register(self, cls: type[PretrainingMethod]) -> type[PretrainingMethod]:
        self[cls.name] = cls
        return cls

    def lookup(self, name: str) -> type[PretrainingMethod]:
        if name not in self:
            raise ValueError(f"Unknown --method {name!r}; {self.label}: {sorted(self)}.")
        return self[name]


METHODS = MethodRegistry()
register_method, get_method = METHODS.register, METHODS.lookup


class PretrainingMethod:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    config_class: ClassVar[type] = None
    model_class: ClassVar[type] = None
    # Optimiser and schedule defaults of the method's reference recipe (used when not given).
    defaults: ClassVar[dict] = {}
    # Built-in architectures for --config_name: preset name -> config fields.
    presets: ClassVar[dict[str, dict]] = {}
    # Parameters that get no weight decay besides 1-D ones and biases (matched on the last name part).
    no_weight_decay_names: ClassVar[tuple[str, ...]] = ("cls_token", "pos_embed", "mask_token")
    # The processor's mask generator (None: the model masks by itself, as MAE does).
    mask_generator: ClassVar[str | None] = None
    # The Auto class that loads --model_name_or_path (tokenizers: AutoModel).
    auto_model_class: ClassVar[type] = AutoModelForPreTraining
    # The method's name in `hf_mim.cards.METHODS` when it differs from `name`.
    card_name: ClassVar[str | None] = None

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.config = None  # set by build_model
        self.step = 0  # the optimiser step of the current micro-batch (set by the loop)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the method's own command-line options (a titled argument group)."""

    def setup(self, accelerator) -> None:
        """Called once the model is prepared, before resuming: move frozen auxiliary networks (a teacher)
        to `accelerator.device`. They are never prepared, trained or saved with the model."""

    def checkpoint_state(self) -> dict[str, object]:
        """Objects trained beside the model (with `state_dict`) that every checkpoint must carry, by name."""
        return {}

    def step_metrics(self) -> dict[str, float]:
        """Values logged with the loss at each logging step besides it (every process calls this at the
        same step, so it may reduce over processes)."""
        return {}

    # ------------------------------------------------------------------ model and processor

    def config_knobs(self) -> dict:
        """Config fields set by the method's own command-line options (None = keep the config's)."""
        args = self.args
        return {key: value for key, value in (("image_size", args.image_size), ("patch_size", args.patch_size))
                if value is not None}

    def build_model(self, default_preset: str) -> PreTrainedModel:
        """From --model_name_or_path (weights), --config_name (a preset or a config), or the default preset;
        then --config_overrides and the method's options."""
        args = self.args
        overrides = {**apply_config_overrides(args.config_overrides), **self.config_knobs()}
        if args.model_name_or_path:
            config = AutoConfig.from_pretrained(args.model_name_or_path, **self.hub_kwargs())
            config = self.checked_config(config, args.model_name_or_path, overrides)
            model = self.auto_model_class.from_pretrained(args.model_name_or_path, config=config, **self.hub_kwargs())
        else:
            name = args.config_name or default_preset
            if name in self.presets:
                config = build_config(self.config_class, self.presets[name], name)
            else:
                config = AutoConfig.from_pretrained(name, **self.hub_kwargs())
            config = self.checked_config(config, name, overrides)
            model = self.model_class(config)
        self.config = model.config
        return model

    def hub_kwargs(self) -> dict:
        args = self.args
        return {"revision": args.model_revision, "token": args.token, "cache_dir": args.cache_dir,
                "trust_remote_code": args.trust_remote_code}

    def checked_config(self, config, source: str, overrides: dict):
        expected = self.config_class.model_type
        if config.model_type != expected:
            raise ValueError(
                f"{source} is a {config.model_type!r} model, but --method {self.name} trains {expected!r} models. "
                f"Pick the matching --method, or start from a preset ({sorted(self.presets)})."
            )
        if self.args.model_type not in (None, self.name, expected):
            raise ValueError(f"--model_type {self.args.model_type!r} does not match --method {self.name} ({expected}).")
        unknown = sorted(key for key in overrides if key not in config.to_dict())
        if unknown:
            raise ValueError(f"Unknown config fields {unknown} for {expected}; valid fields: {sorted(config.to_dict())}.")
        if not overrides:
            return config
        fields = {**config.to_dict(), **overrides}
        fields.pop("model_type", None)
        fields.pop("transformers_version", None)
        return build_config(type(config), fields, source)  # re-validates the architecture

    def image_mean_std(self) -> tuple[list[float], list[float]]:
        channels = self.config.num_channels
        if channels == 3:
            return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
        if channels == 1:
            return [sum(IMAGENET_DEFAULT_MEAN) / 3], [sum(IMAGENET_DEFAULT_STD) / 3]
        raise ValueError(f"num_channels={channels}: only 1 (grey) and 3 (RGB) channel images are supported.")

    @property
    def image_mode(self) -> str:
        return "RGB" if self.config.num_channels == 3 else "L"

    def build_image_processor(self):
        """--image_processor_name, else the processor saved with --model_name_or_path, else a new one
        (ImageNet mean/std, bicubic resize to the model's image size)."""
        args = self.args
        source = args.image_processor_name or args.model_name_or_path
        if source:
            try:
                return AutoImageProcessor.from_pretrained(source, **self.hub_kwargs())
            except OSError:
                if args.image_processor_name:
                    raise
                logger.info("%s has no image processor; building one from the config.", source)
        height, width = to_2tuple(self.image_size)
        mean, std = self.image_mean_std()
        return MimImageProcessor(
            size={"height": height, "width": width}, image_mean=mean, image_std=std,
            patch_size=self.config.patch_size, mask_generator=self.mask_generator,
            mask_generator_kwargs=self.mask_generator_kwargs(), do_convert_rgb=self.config.num_channels == 3,
        )

    def mask_generator_kwargs(self) -> dict:
        """Settings of the processor's `mask_generator` (saved with the model, so users get the same masks)."""
        return {}

    @property
    def image_size(self) -> tuple[int, int]:
        return to_2tuple(self.args.image_size or self.config.image_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return grid_size_for(self.image_size, self.config.patch_size)

    # ------------------------------------------------------------------ data

    def train_transform(self, processor):
        raise NotImplementedError

    def eval_transform(self, processor):
        raise NotImplementedError

    # ------------------------------------------------------------------ loss and evaluation

    def training_loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def eval_sums(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-image statistics [B] that add up over images (the loop gathers them over processes,
        drops accelerate's padding duplicates, and sums)."""
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def save_reconstructions(self, model, batch, processor, path: str, draw: bool = True) -> bool:
        """Run the model on `batch` (every process calls this: FSDP needs all of them) and, when `draw`,
        save a figure of what it predicts to `path`. Returns whether a figure was written."""
        return False

    def recipe(self) -> dict:
        """Method settings worth recording in the model card."""
        return {}

    def card_tokenizer(self) -> tuple[str | None, str | None]:
        """(id or path, revision) of the frozen tokenizer whose codes the model learned to predict, for the card."""
        return None, None


def crop_and_flip(image_size, scale=(0.2, 1.0)) -> v2.Compose:
    """RandomResizedCrop (bicubic) + horizontal flip + to float in [0, 1], not normalised."""
    return v2.Compose([
        v2.RandomResizedCrop(to_2tuple(image_size), scale=scale, interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
    ])


def build_config(config_class: type, fields: dict, source: str):
    """`config_class(**fields)`, with its validation error (huggingface_hub's strict-dataclass wrapper
    around the message that names the field and the fix) raised as a plain ValueError."""
    try:
        return config_class(**fields)
    except (StrictDataclassError, TypeError, ValueError) as error:
        reason = error.__cause__ if isinstance(error, StrictDataclassError) and error.__cause__ else error
        raise ValueError(f"Invalid {config_class.model_type} config ({source}): {reason}") from error


def training_augmentation(image_size, mean, std, scale=(0.2, 1.0)) -> v2.Compose:
    """RandomResizedCrop (bicubic) + horizontal flip + to float + normalise: MAE's augmentation."""
    return v2.Compose([crop_and_flip(image_size, scale), v2.Normalize(mean=list(mean), std=list(std))])


def processor_pixels(processor, image) -> torch.Tensor:
    """[C, H, W]: exactly what the saved image processor gives at inference."""
    return processor(image, return_tensors="pt")["pixel_values"][0]


@register_method
class MaeMethod(PretrainingMethod):
    name = "mae"
    summary = "MAE (He et al., 2022): reconstruct the pixels of randomly masked patches."
    config_class = MaeConfig
    model_class = MaeForPreTraining
    defaults = {"base_learning_rate": 1.5e-4, "adam_beta1": 0.9, "adam_beta2": 0.95, "weight_decay": 0.05,
                "warmup_steps": 0.05, "max_grad_norm": None}
    presets = {
        # Learns the embedded digits in minutes on two CPU cores.
        "mae-demo": dict(image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=512, decoder_hidden_size=64, decoder_num_hidden_layers=2,
                         decoder_num_attention_heads=4, decoder_intermediate_size=256),
        "mae-base": {},  # ViT-B/16 with the published 512 x 8 decoder (MaeConfig's defaults)
        "mae-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        "mae-huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                         patch_size=14),
    }

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("MAE options (--method mae)")
        group.add_argument("--mask_ratio", type=float, help="fraction of patches removed (default: the config's, 0.75)")
        group.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                           help="regress per-patch normalised pixels (default: the config's)")

    def config_knobs(self) -> dict:
        knobs = super().config_knobs()
        if self.args.mask_ratio is not None:
            knobs["mask_ratio"] = self.args.mask_ratio
        if self.args.norm_pix_loss is not None:
            knobs["norm_pix_loss"] = self.args.norm_pix_loss
        return knobs

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    def train_transform(self, processor):
        augment = training_augmentation(self.image_size, processor.image_mean, processor.image_std)
        num_patches = self.num_patches

        def transform(image, generator):
            return {"pixel_values": augment(image), "noise": torch.rand(num_patches, generator=generator)}

        return transform

    def eval_transform(self, processor):
        num_patches = self.num_patches

        def transform(image, generator):
            return {"pixel_values": processor_pixels(processor, image),
                    "noise": torch.rand(num_patches, generator=generator)}

        return transform

    def training_loss(self, model, batch):
        return model(pixel_values=batch["pixel_values"], noise=batch["noise"]).loss

    def targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        target = patchify(pixel_values, self.config.patch_size)  # [B, L, p*p*C]
        return normalize_patches(target) if self.config.norm_pix_loss else target

    def eval_sums(self, model, batch):
        output = model(pixel_values=batch["pixel_values"], noise=batch["noise"])
        per_patch = (output.logits.float() - self.targets(batch["pixel_values"]).float()).pow(2).mean(-1)  # [B, L]
        mask = output.mask.float()  # [B, L], 1 = removed
        return {"loss_sum": (per_patch * mask).sum(-1), "masked_patches": mask.sum(-1)}  # [B] each

    def eval_metrics(self, sums):
        return {"loss": sums["loss_sum"] / max(sums["masked_patches"], 1.0)}

    def save_reconstructions(self, model, batch, processor, path, draw=True):
        from .visualize import save_mae_reconstructions

        with torch.no_grad():
            output = model(pixel_values=batch["pixel_values"], noise=batch["noise"])
        return draw and save_mae_reconstructions(
            path, batch["pixel_values"], output.logits, output.mask, self.config, processor.image_mean,
            processor.image_std,
        )

    def recipe(self) -> dict:
        return {"mask_ratio": self.config.mask_ratio, "norm_pix_loss": self.config.norm_pix_loss}


__all__ = [
    "METHODS", "MaeMethod", "MethodRegistry", "PretrainingMethod", "crop_and_flip", "get_method", "processor_pixels", "register_method",
    "training_augmentation",
]
