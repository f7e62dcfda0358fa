"""The image processor of every hf_mim model: resize, rescale and normalize, and on request the
patch vectors (`do_patchify`) and a masked-image-modeling mask (`mask_generator`).

Two backends share one set of settings: `MimImageProcessor` (torchvision, batched) and
`MimImageProcessorPil` (PIL/NumPy). Outputs:

- ``pixel_values`` [B, C, H, W];
- ``patches`` [B, N, ph*pw*C] with `do_patchify`: `vit_core.patchify` of the normalized pixels, the
  model's patch order (row-major grid; each vector ordered row, column, channel);
- ``bool_masked_pos`` [B, N] (True = masked) with `mask_generator` "random" (MAE), "blockwise"
  (BEiT) or "blockwise_exact" (BEiT v2: exactly the requested count), built by
  `masking.build_mask_generator(name, grid, **mask_generator_kwargs)`. Pass `generator=` (a
  torch.Generator) or `seed=` to the call for reproducible masks; without them torch's global RNG
  is used (so `torch.manual_seed` and DataLoader worker seeding apply).

Any channel count works when `image_mean`/`image_std` have one value per channel (grayscale:
``image_mean=[m], image_std=[s], do_convert_rgb=False``). This file ships with every checkpoint
(``trust_remote_code``): `save_pretrained` copies it with its sibling imports and writes
``auto_map``, so ``AutoImageProcessor.from_pretrained(path, trust_remote_code=True)`` works where
hf_mim is not installed.
"""

from typing import Any

import numpy as np
import torch
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack

from .masking import build_mask_generator, mask_generator_class, script_spelling
from .vit_core import grid_size_for, patchify

# Written into preprocessor_config.json: AutoImageProcessor picks the class of the requested backend.
HUB_AUTO_MAP = {
    "torchvision": "image_processing_mim.MimImageProcessor",
    "pil": "image_processing_mim.MimImageProcessorPil",
}
CALL_ONLY_KWARGS = ("generator", "seed")


class MimImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    patch_size (`int` or `(height, width)`, defaults to 16):
        The model's patch size; the processed images must divide into it.
    do_patchify (`bool`, defaults to `False`):
        Also return `patches` [B, N, ph*pw*C], the normalized pixels in the model's patch order.
    mask_generator (`str`, *optional*):
        "random" (MAE), "blockwise" (BEiT) or "blockwise_exact" (BEiT v2): also return `bool_masked_pos`
        [B, N], True = masked.
    mask_generator_kwargs (`dict`, defaults to `{}`):
        Arguments of the mask generator: `mask_ratio` for "random"; `num_mask_patches`,
        `min_mask_patches_per_block`, `max_mask_patches_per_block` (the pre-training script's names),
        `min_aspect`, `max_aspect` (and `reference_grid` to scale the counts from that grid to the
        image's) for the blockwise ones. The reference's names (`num_masking_patches`,
        `min_num_patches`, `max_num_patches`, in processors saved before) are read as these.
    generator (`torch.Generator`, *optional*, call only):
        Random generator for the masks.
    seed (`int`, *optional*, call only):
        Seed of a fresh generator for the masks (same seed, same masks).
    """

    patch_size: int | list[int] | tuple[int, int]
    do_patchify: bool
    mask_generator: str | None
    mask_generator_kwargs: dict | None
    generator: torch.Generator | None
    seed: int | None


def check_patch_size(patch_size) -> None:
    sizes = [patch_size] if isinstance(patch_size, int) else list(patch_size)
    if len(sizes) not in (1, 2) or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"patch_size must be a positive int or a [height, width] pair of them, got {patch_size!r}.")


def check_normalization_channels(images: list, do_normalize: bool, image_mean, image_std) -> None:
    """torchvision's normalize silently broadcasts a 1-channel image to 3 channels: refuse instead."""
    if not do_normalize:
        return
    for channels in sorted({image.shape[0] for image in images}):
        for name, values in (("image_mean", image_mean), ("image_std", image_std)):
            if not isinstance(values, (int, float)) and len(values) != channels:
                raise ValueError(
                    f"{name} has {len(values)} values but an image has {channels} channel(s). Pass image_mean and "
                    f"image_std with {channels} value(s) each (grayscale: image_mean=[m], image_std=[s], "
                    f"do_convert_rgb=False), or do_convert_rgb=True to turn 1- and 4-channel images into RGB."
                )


class MimProcessingMixin:
    """What both backends share: defaults, validation, and the patches and masks added to the output."""

    valid_kwargs = MimImageProcessorKwargs
    # Set for the class, so that save_pretrained always copies this file and its siblings.
    _auto_class = "AutoImageProcessor"

    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    patch_size = 16
    do_patchify = False
    mask_generator = None
    mask_generator_kwargs = {}

    def __init__(self, **kwargs: Unpack[MimImageProcessorKwargs]):
        for name in CALL_ONLY_KWARGS:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"`{name}` is a call-time argument (`processor(images, {name}=...)`); a fixed one would give "
                    f"every batch the same masks."
                )
        super().__init__(**kwargs)
        if self.mask_generator_kwargs:  # saved (and shown) with the scripts' names, whichever were given
            self.mask_generator_kwargs = script_spelling(self.mask_generator_kwargs)
        self.validate_mim_settings(
            self.do_resize, self.size, self.patch_size, self.mask_generator, self.mask_generator_kwargs
        )

    @staticmethod
    def validate_mim_settings(do_resize, size, patch_size, mask_generator, mask_generator_kwargs) -> None:
        """Errors for bad settings as early as they can be known (the grid only when the output size is fixed)."""
        check_patch_size(patch_size)
        if mask_generator_kwargs is not None and not isinstance(mask_generator_kwargs, dict):
            raise ValueError(f"mask_generator_kwargs must be a dict, got {type(mask_generator_kwargs).__name__}.")
        if mask_generator is not None:
            mask_generator_class(mask_generator)
        if do_resize and isinstance(size, SizeDict) and size.height and size.width:
            grid = grid_size_for((size.height, size.width), patch_size)
            if mask_generator is not None:
                build_mask_generator(mask_generator, grid, **(mask_generator_kwargs or {}))

    def _validate_preprocess_kwargs(self, **kwargs) -> None:
        super()._validate_preprocess_kwargs(**kwargs)
        if kwargs.get("generator") is not None and kwargs.get("seed") is not None:
            raise ValueError("Pass either `generator` or `seed`, not both.")
        self.validate_mim_settings(
            kwargs.get("do_resize"), kwargs.get("size"), kwargs.get("patch_size"),
            kwargs.get("mask_generator"), kwargs.get("mask_generator_kwargs"),
        )

    def _preprocess(
        self,
        images: list,
        patch_size,
        do_patchify: bool,
        mask_generator: str | None,
        mask_generator_kwargs: dict | None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        check_normalization_channels(images, kwargs["do_normalize"], kwargs["image_mean"], kwargs["image_std"])
        pixel_values = super()._preprocess(images, return_tensors=None, **kwargs)["pixel_values"]  # B x [C, H, W]
        pixels = [torch.as_tensor(image) for image in pixel_values]  # B x [C, H, W], shares memory
        grids = [grid_size_for(image.shape[-2:], patch_size) for image in pixels]  # clear error if not divisible
        extras = {}
        if do_patchify:
            extras["patches"] = [patchify(image[None], patch_size)[0] for image in pixels]  # B x [N, ph*pw*C]
        if mask_generator is not None:
            if seed is not None:
                generator = torch.Generator().manual_seed(seed)
            masks = self.make_masks(grids, mask_generator, mask_generator_kwargs or {}, generator)  # B x [N]
            extras["bool_masked_pos"] = [mask.to(image.device) for mask, image in zip(masks, pixels)]
        if self.backend == "pil":  # keep the backend's array type for every output
            extras = {key: [value.cpu().numpy() for value in values] for key, values in extras.items()}
        return BatchFeature(data={"pixel_values": pixel_values, **extras}, tensor_type=return_tensors)

    @staticmethod
    def make_masks(grids: list[tuple[int, int]], name: str, kwargs: dict, generator) -> list[torch.Tensor]:
        """One mask [rows*cols] per image, drawn in batch order from `generator`."""
        generators = {grid: build_mask_generator(name, grid, **kwargs) for grid in set(grids)}
        return [generators[grid](generator) for grid in grids]

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["mask_generator"] = self.mask_generator  # kept when None, so the file lists every MIM setting
        output["auto_map"] = {**(output.get("auto_map") or {}), "AutoImageProcessor": dict(HUB_AUTO_MAP)}
        return output


class MimImageProcessor(MimProcessingMixin, TorchvisionBackend):
    """hf_mim's image processor, torchvision backend (batched, runs on `device=` when given)."""


class MimImageProcessorPil(MimProcessingMixin, PilBackend):
    """hf_mim's image processor, PIL/NumPy backend (differs from torchvision's bicubic resize by ~0.02)."""

    def resize(self, image: np.ndarray, size: SizeDict, resample=None, **kwargs) -> np.ndarray:
        resize = super().resize
        if image.shape[0] in (1, 3):
            return resize(image, size, resample=resample, **kwargs)
        # PIL has no image mode for most channel counts, and resizes 4 channels as RGBA with
        # premultiplied alpha (which corrupts e.g. RGB + infrared): resize each channel on its own.
        return np.concatenate([resize(channel[None], size, resample=resample, **kwargs) for channel in image])


__all__ = ["MimImageProcessor", "MimImageProcessorKwargs", "MimImageProcessorPil"]
