"""The interface of a training method: everything the engine's loop needs to know about one method (a
masked-image-modeling method of `hf_mim.pretraining` or a tokenizer of `hf_mim.tokenizer_training`).

A method builds (or loads) its model and image processor, turns an image into the tensors of one
example (train: augmented; eval: the processor's preprocessing with FIXED masks), gets the training
loss of a batch from the model, sums the model's per-sample losses over evaluation batches, and
draws the figure. The loop (`loop.py`) knows nothing else about the method. Each method is one file
that subclasses :class:`TrainingMethod` and registers itself in its script's :class:`MethodRegistry`
(see README, "Adding a method").

What the loop calls, by concern (everything else here is a helper a method may override):

* model: `build_model(default_preset)`, `build_image_processor()`, `setup(accelerator)`;
* data: `train_transform(processor)`, `eval_transform(processor)` -> `transform(image, generator)`,
  the one per-example step;
* training: `training_loss(model, batch)`, `after_optimizer_step(step)`, `step_metrics(model)`;
* evaluation: `eval_sums(model, batch)` (the model's per-sample losses, summed), `eval_metrics(sums)`;
* outputs: `save_reconstructions(...)`, `recipe()`, `card_tokenizer()`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, ClassVar

import torch
from huggingface_hub.errors import StrictDataclassError
from torchvision.transforms import v2
from transformers import AutoConfig, AutoImageProcessor, AutoModelForPreTraining, PreTrainedModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..cli import option
from ..models import MimImageProcessor
from ..models.presets import preset_fields, preset_names
from ..models.vit_core import grid_size_for, to_2tuple
from .overrides import apply_config_overrides

if TYPE_CHECKING:
    from .arguments import Options

logger = logging.getLogger(__name__)


class MethodRegistry(dict):
    """`--method` name -> method class. `register` is the class decorator; `lookup` names the choices
    when a name is unknown. The pre-training methods and the tokenizer methods each have one; the
    command-line choices and the model cards' method names derive from them."""

    def __init__(self, label: str = "available", kind: str = "mim"):
        super().__init__()
        self.label, self.kind = label, kind

    def register(self, cls: type[TrainingMethod]) -> type[TrainingMethod]:
        if cls.name in self:
            raise ValueError(f"A method named {cls.name!r} is registered already ({self[cls.name].__qualname__}).")
        self[cls.name] = cls
        return cls

    def lookup(self, name: str) -> type[TrainingMethod]:
        if name not in self:
            raise ValueError(f"Unknown --method {name!r}; {self.label}: {sorted(self)}.")
        return self[name]


@dataclasses.dataclass
class NoOptions:
    """A method without options of its own."""


class TrainingMethod:
    # -- identity: the `--method` name, its one-line summary, the model card's title for it
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    title: ClassVar[str] = ""
    # The method's name in the model cards (its template card_templates/methods/<card_name>.md), when not `name`.
    card_name: ClassVar[str | None] = None
    # Whether the card must name a frozen tokenizer whose codes the model predicts.
    needs_tokenizer: ClassVar[bool] = False
    # -- model: the config and model classes of a new model; the Auto class that loads --model_name_or_path
    config_class: ClassVar[type] = None
    model_class: ClassVar[type] = None
    auto_model_class: ClassVar[type] = AutoModelForPreTraining
    # -- recipe: optimiser and schedule defaults (used when not given); parameters without weight decay
    # besides 1-D ones and biases (matched on the last name part); the method's own options (a dataclass)
    defaults: ClassVar[dict] = {}
    no_weight_decay_names: ClassVar[tuple[str, ...]] = ("cls_token", "pos_embed", "mask_token")
    options_class: ClassVar[type] = NoOptions
    # The processor's mask generator (None: no mask from the processor, MAE draws it from `noise`).
    mask_generator: ClassVar[str | None] = None

    def __init__(self, args: Options):
        self.args = args
        self.options = self.options_from(args)
        self.config = None  # set by build_model

    @classmethod
    def options_from(cls, args: Options):
        """The method's typed options, read from the parsed command line."""
        return cls.options_class(**{field.name: getattr(args, field.name)
                                    for field in dataclasses.fields(cls.options_class) if hasattr(args, field.name)})

    @classmethod
    def presets(cls) -> list[str]:
        """The built-in architectures of `--config_name` (`hf_mim.models.presets`) named after this method."""
        return [name for name in preset_names(cls.config_class.model_type) if name.startswith(f"{cls.name}-")]

    def setup(self, accelerator) -> None:
        """Called once the model is prepared, before resuming: move frozen auxiliary networks (a teacher)
        to `accelerator.device`. They are never prepared, trained or saved with the model."""

    def after_optimizer_step(self, step: int) -> None:
        """The optimiser has made `step` steps: called after each step, and before the first one (with 0,
        or the step a run resumes from). Schedules inside a method (the dVAE temperature, PeCo's
        adversarial start, an EMA teacher) follow it."""

    def checkpoint_state(self) -> dict[str, object]:
        """Objects trained beside the model (with `state_dict`) that every checkpoint must carry, by name."""
        return {}

    def step_metrics(self, model) -> dict[str, float]:
        """Values logged with the loss at each logging step besides it (every process calls this at the
        same step, so it may reduce over processes). `model` is the prepared model."""
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
            if name in self.presets():
                config = build_config(*preset_fields(name, self.config_class.model_type), name)
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
                f"Pick the matching --method, or start from a preset ({self.presets()})."
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
        """`transform(image, generator) -> {name: tensor}`: the tensors of one augmented training example
        (the data pipeline seeds `generator` and torch's RNG per example)."""
        raise NotImplementedError

    def eval_transform(self, processor):
        """`transform(image, generator) -> {name: tensor}`: one evaluation example, the processor's
        preprocessing and masks that are the same at every evaluation."""
        raise NotImplementedError

    def fast_views(self, processor):
        """The training example declared for the fast data path (`hf_mim.fast_data.FastViews`), or None:
        the reference path (`train_transform`) is used."""
        return None

    # ------------------------------------------------------------------ loss and evaluation

    def training_loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def eval_sums(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-image statistics [B] that add up over images (the loop gathers them over processes,
        drops accelerate's padding duplicates, and sums): the model's per-sample losses, weighted."""
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


@dataclasses.dataclass
class CropOptions:
    """The RandomResizedCrop of a method's augmentation (None: the method's recipe)."""

    _argument_group_name = "augmentation"
    crop_min_scale: float | None = option(help="smallest RandomResizedCrop area fraction (default: the method's recipe)")

    def __post_init__(self):
        if self.crop_min_scale is not None and not 0 < self.crop_min_scale <= 1:
            raise ValueError(f"--crop_min_scale must be in (0, 1], got {self.crop_min_scale}.")


__all__ = ["CropOptions", "MethodRegistry", "NoOptions", "TrainingMethod", "build_config", "crop_and_flip",
           "processor_pixels", "training_augmentation"]
