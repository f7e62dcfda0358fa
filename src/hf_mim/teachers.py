"""Frozen teachers for feature distillation (BEiT v2's VQ-KD): a transformers vision model as the
source of one target vector per patch.

``load_teacher(name_or_path, ...)`` wraps, by model id or directory,
  * a CLIP checkpoint (a whole ``CLIPModel`` or a ``CLIPVisionModelWithProjection``): the last layer's
    patch tokens through ``post_layernorm`` and ``visual_projection``. transformers applies the
    post-layernorm only to the pooled CLS token; BEiT v2's teacher applies it to every token, so it
    is applied here by hand;
  * any other vision model ``AutoModel`` loads (ViT, DINO, DINOv2, hf_mim's MaeModel / BEiTModel ...):
    the patch tokens of ``last_hidden_state``, without the CLS / register tokens in front;
  * with ``layer=k``, instead the raw patch tokens of ``hidden_states[k]`` (no final norm, no projection).

The teacher is frozen (no gradients, always in eval mode), takes the tokenizer's [0, 1] pixels and
applies its own normalisation (its image processor's mean/std when the checkpoint has one, else the
values given), and is never saved inside a tokenizer checkpoint: this module is not part of the
flat model folder. ``load_teacher_for(config)`` loads the teacher a ``VqkdConfig`` names and checks
that its patch grid and feature size fit the tokenizer.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPVisionModelWithProjection
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from .models.vit_core import grid_size_for, to_2tuple

CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
TEACHER_TYPES = ("clip", "auto")
# Weights a teacher may lack without changing its patch features (a ViT saved without its pooler).
UNUSED_WEIGHTS = re.compile(r"(^|\.)pooler\.")
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder")


class TeacherLoadError(OSError):
    """The teacher could not be loaded (wrong path, not a vision model, missing weights)."""


class Teacher(nn.Module):
    """A frozen vision model giving patch features [B, rows*cols, feature_dim] (row-major) for [0, 1] pixels."""

    def __init__(self, model: nn.Module, *, name_or_path: str, is_clip: bool, patch_size, feature_dim: int,
                 image_mean: Sequence[float], image_std: Sequence[float], normalization_source: str,
                 layer: int | None = None, input_size=None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name_or_path, self.is_clip, self.layer = str(name_or_path), is_clip, layer
        self.patch_size = to_2tuple(patch_size)
        self.feature_dim = feature_dim
        self.input_size = None if input_size is None else to_2tuple(input_size)
        self.native_size = to_2tuple(model.config.image_size) if getattr(model.config, "image_size", None) else None
        self.normalization_source = normalization_source
        for name, values in (("image_mean", image_mean), ("image_std", image_std)):  # [1, C, 1, 1]
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.accepts_interpolation = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # always frozen: no dropout, no drop path, whatever the caller's mode

    def extra_repr(self) -> str:
        return (f"name_or_path={self.name_or_path!r}, patch_size={self.patch_size}, feature_dim={self.feature_dim}, "
                f"layer={self.layer}, input_size={self.input_size}")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def input_size_for(self, image_size) -> tuple[int, int]:
        """The size the teacher sees for tokenizer images of `image_size`."""
        return self.input_size or to_2tuple(image_size)

    def check_compatible(self, *, image_size, grid_size: Sequence[int], feature_dim: int) -> None:
        """Raise a clear error unless, for tokenizer images of `image_size`, the teacher's patch grid is
        `grid_size` (the tokenizer's) and its features have `feature_dim` values."""
        size, (ph, pw), grid_size = self.input_size_for(image_size), self.patch_size, tuple(grid_size)
        grid = (size[0] // ph, size[1] // pw) if size[0] % ph == 0 and size[1] % pw == 0 else None
        if grid != grid_size:
            need = (grid_size[0] * ph, grid_size[1] * pw)
            setting = need[0] if need[0] == need[1] else list(need)
            seen = f"a {grid[0]}x{grid[1]} patch grid" if grid else "no whole number of patches"
            raise ValueError(
                f"The teacher {self.name_or_path} has patch size {ph}x{pw}: at {size[0]}x{size[1]} px it gives {seen}, "
                f"but the tokenizer's token grid is {grid_size[0]}x{grid_size[1]}. Feed the teacher "
                f"{need[0]}x{need[1]} images (teacher_input_size={setting}, or load_teacher(..., "
                f"input_size={setting}); its position embeddings are interpolated), or choose a tokenizer "
                "image/patch size with the teacher's grid."
            )
        if feature_dim != self.feature_dim:
            what = "projected patch tokens" if self.is_clip and self.layer is None else "patch tokens"
            raise ValueError(
                f"The teacher {self.name_or_path} gives {self.feature_dim}-dim {what}, but the tokenizer predicts "
                f"teacher_dim={feature_dim} values per patch: build the tokenizer with teacher_dim={self.feature_dim} "
                "(CLIP ViT-B/16: 512, DINO ViT-B: 768)."
            )

    def normalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the teacher's input: resized to `input_size` if set, clamped to [0, 1] (as the
        reference, which also clamps resampling overshoot), then (x - mean) / std."""
        x = pixel_values.float()
        low, high = x.aminmax()
        if low < -0.1 or high > 1.1:  # slack for resampling overshoot
            raise ValueError(
                f"The teacher takes [0, 1] RGB pixels (the tokenizer's input), got values in [{low:.2f}, {high:.2f}]: "
                "do not normalise them, the teacher applies its own mean/std."
            )
        size = self.input_size_for(tuple(x.shape[-2:]))
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        return ((x.clamp(0.0, 1.0) - self.image_mean) / self.image_std).to(self.dtype)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB [B, C, H, W] -> patch features [B, rows*cols, feature_dim] float32."""
        x = self.normalize(pixel_values)  # [B, C, h, w]
        grid = grid_size_for(x.shape[-2:], self.patch_size)
        kwargs = {}
        if self.accepts_interpolation and self.native_size is not None and tuple(x.shape[-2:]) != self.native_size:
            kwargs["interpolate_pos_encoding"] = True
        output = self.model(pixel_values=x, output_hidden_states=self.layer is not None, **kwargs)
        features = self.patch_features(output, grid).float()  # [B, N, F]
        bad = ~features.isfinite().all(dim=-1).all(dim=-1)  # [B]
        if bool(bad.any()):
            raise FloatingPointError(
                f"Teacher forward: {self.name_or_path} produced NaN or inf patch features for {int(bad.sum())} of "
                f"{len(bad)} images (before the tokenizer ran). Check the teacher's weights, run it in float32, and "
                "check that the images are finite [0, 1] pixels."
            )
        return features

    def patch_features(self, output, grid: tuple[int, int]) -> torch.Tensor:
        """The model output -> patch features [B, rows*cols, F] (prefix tokens dropped)."""
        if self.layer is not None:
            states = output.hidden_states
            if not -len(states) <= self.layer < len(states):
                raise ValueError(f"teacher layer {self.layer} does not exist: {self.name_or_path} has hidden states "
                                 f"0 (embeddings) to {len(states) - 1}.")
            tokens = states[self.layer]
        else:
            tokens = getattr(output, "last_hidden_state", None)
            if tokens is None:
                raise ValueError(
                    f"The teacher {self.name_or_path} returns no last_hidden_state: use a ViT-like backbone."
                )
            if self.is_clip:
                tokens = self.model.vision_model.post_layernorm(tokens)  # on every token, not only the pooled one
        num_patches = grid[0] * grid[1]
        if tokens.ndim != 3 or tokens.shape[1] < num_patches:
            raise ValueError(
                f"The teacher {self.name_or_path} returned hidden states of shape {list(tokens.shape)}, which do not "
                f"hold a {grid[0]}x{grid[1]} grid of patch tokens: use a ViT-like backbone (one token per patch)."
            )
        patches = tokens[:, tokens.shape[1] - num_patches:]  # [B, N, D]: CLS / register tokens come first
        if self.is_clip and self.layer is None:
            patches = self.model.visual_projection(patches)  # [B, N, projection_dim]
        if patches.shape[-1] != self.feature_dim:
            raise ValueError(f"The teacher {self.name_or_path} gave {patches.shape[-1]}-dim features, its config says "
                             f"{self.feature_dim}.")
        return patches


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' loading report (a CLIP vision tower loaded from a whole CLIPModel lists every
    text weight as unexpected); missing and mismatched weights are checked by `load_weights` instead."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def read_config(name_or_path: str, kwargs: dict):
    if str(name_or_path).startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise TeacherLoadError(f"Could not load the teacher: there is no directory {name_or_path!r}. Pass an existing "
                               "save_pretrained directory or a model id.")
    try:
        return AutoConfig.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise TeacherLoadError(
            f"Could not load the teacher config from {name_or_path!r}: {type(error).__name__}: "
            f"{str(error).rstrip('.')}. Pass a "
            "transformers model id or a save_pretrained directory of a vision model (CLIP, ViT, DINO, hf_mim MAE)."
        ) from error


def load_weights(model_class, name_or_path: str, config, dtype, kwargs: dict) -> nn.Module:
    """from_pretrained with a clear error for every failure, including weights the checkpoint lacks."""
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(
                name_or_path, config=config, dtype=dtype, output_loading_info=True, **kwargs
            )
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise TeacherLoadError(
            f"Could not load the teacher weights from {name_or_path!r} as {model_class.__name__}: "
            f"{type(error).__name__}: {error}"
        ) from error
    missing = sorted(k for k in info["missing_keys"] if not UNUSED_WEIGHTS.search(k))
    mismatched = sorted(str(k) for k in info["mismatched_keys"])
    if missing or mismatched:
        raise TeacherLoadError(
            f"The teacher checkpoint {name_or_path!r} does not hold every weight of {type(model).__name__}: missing "
            f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, mismatched {mismatched[:6]}. A partly random teacher "
            "would distil noise: point teacher_name_or_path at the complete checkpoint."
        )
    return model


def clip_vision_config(config):
    """A CLIPVisionConfig with the right projection size, from a whole CLIPConfig or a vision config."""
    if config.model_type == "clip":
        vision = config.vision_config
        vision.projection_dim = config.projection_dim  # kept at the top level of a CLIPConfig
        return vision
    return config


def read_image_processor(name_or_path: str, kwargs: dict) -> dict | None:
    """The checkpoint's image processor settings (preprocessor_config.json, or processor_config.json's
    image_processor entry), or None when it has none."""
    hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    for filename in ("preprocessor_config.json", "processor_config.json"):
        path = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **hub_kwargs)
        if path is None:
            continue
        with open(path) as handle:
            settings = json.load(handle)
        settings = settings.get("image_processor", settings) if filename == "processor_config.json" else settings
        if "image_mean" in settings or settings.get("do_normalize") is False:
            return settings
    return None


def resolve_normalization(name_or_path: str, image_mean, image_std, kwargs: dict):
    """(mean, std, source): the teacher's own image processor wins; else the values given."""
    settings = read_image_processor(name_or_path, kwargs)
    if settings is not None:
        if settings.get("do_normalize") is False:
            channels = len(image_mean) if image_mean is not None else 3
            return [0.0] * channels, [1.0] * channels, "the teacher's image processor (do_normalize=False)"
        return list(settings["image_mean"]), list(settings["image_std"]), "the teacher's image processor"
    if image_mean is None or image_std is None:
        raise TeacherLoadError(
            f"The teacher {name_or_path!r} has no image processor config (preprocessor_config.json) to say how its "
            "inputs are normalised: pass image_mean and image_std (VqkdConfig.teacher_image_mean/std)."
        )
    return list(image_mean), list(image_std), "the values given (the tokenizer config)"


def load_teacher(
    name_or_path: str,
    *,
    teacher_type: str = "auto",
    layer: int | None = None,
    input_size: int | Sequence[int] | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> Teacher:
    """A frozen `Teacher` from a model id or directory. `teacher_type`: "clip" (must be a CLIP checkpoint)
    or "auto" (CLIP detected from the config, anything else through AutoModel). `input_size`: resize the
    images to this size for the teacher. `image_mean`/`image_std`: used when the checkpoint has no image
    processor config. Other keyword arguments go to `from_pretrained` (revision, trust_remote_code ...)."""
    if teacher_type not in TEACHER_TYPES:
        raise ValueError(f"teacher_type must be one of {TEACHER_TYPES}, got {teacher_type!r}.")
    config = read_config(name_or_path, kwargs)
    is_clip = config.model_type in CLIP_MODEL_TYPES
    if teacher_type == "clip" and not is_clip:
        raise TeacherLoadError(
            f"teacher_type='clip' but {name_or_path!r} holds a {config.model_type!r} model, not CLIP: use "
            "teacher_type='auto' for other vision models."
        )
    if is_clip:
        model = load_weights(CLIPVisionModelWithProjection, name_or_path, clip_vision_config(config), dtype, kwargs)
    else:
        model = load_weights(AutoModel, name_or_path, config, dtype, kwargs)
    if getattr(model, "main_input_name", None) != "pixel_values" or getattr(model.config, "patch_size", None) is None:
        raise TeacherLoadError(
            f"{name_or_path!r} loads as {type(model).__name__}, which is not a patch-based vision model (no "
            "pixel_values input or no patch_size): use a ViT-like teacher (CLIP, ViT, DINO, hf_mim MAE/BEiT)."
        )
    mean, std, source = resolve_normalization(name_or_path, image_mean, image_std, kwargs)
    width = model.config.projection_dim if is_clip and layer is None else model.config.hidden_size
    return Teacher(
        model, name_or_path=name_or_path, is_clip=is_clip, patch_size=model.config.patch_size, feature_dim=width,
        image_mean=mean, image_std=std, normalization_source=source, layer=layer, input_size=input_size,
    )


def load_teacher_for(tokenizer_or_config, **kwargs) -> Teacher:
    """The teacher a VqkdConfig (or a VqkdTokenizer's config) names, checked against the tokenizer's grid
    and teacher_dim. Keyword arguments go to `load_teacher` (dtype, revision ...)."""
    config = getattr(tokenizer_or_config, "config", tokenizer_or_config)
    if not config.teacher_name_or_path:
        raise ValueError("The tokenizer config names no teacher: set teacher_name_or_path to a model id or directory "
                         "(BEiT v2: openai/clip-vit-base-patch16).")
    teacher = load_teacher(
        config.teacher_name_or_path, teacher_type=config.teacher_type, layer=config.teacher_layer,
        input_size=config.teacher_input_size, image_mean=config.teacher_image_mean,
        image_std=config.teacher_image_std, **kwargs,
    )
    grid = grid_size_for(config.image_size, config.patch_size)
    teacher.check_compatible(image_size=config.image_size, grid_size=grid, feature_dim=config.teacher_dim)
    return teacher


__all__ = ["Teacher", "TeacherLoadError", "load_teacher", "load_teacher_for"]
