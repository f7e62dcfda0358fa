"""Batched, per-sample crop + resize + flip and colour jitter of uint8 images on any device, computed as
Pillow computes them, so that the fast data path (`hf_mim.fast_data`) gives the pixels of the
reference one (torchvision on PIL images) for a whole batch in a few kernels.

Resizing is Pillow's separable convolution (`ImagingResample`): for each output pixel, a filter
(bicubic a=-0.5, Lanczos a=3 or bilinear) widened by the downscaling factor (this IS the
antialiasing), evaluated on the input pixels of the crop box only, normalised to sum 1; horizontal
pass first, rounded to uint8, then the vertical pass, rounded again. Here each pass is one batched
matrix product with a per-sample weight matrix built from the sample's box, so every sample can
have its own box and flip (a flip reverses the output columns of the weight matrix: free).

Colour jitter is Pillow's `ImageEnhance` (brightness, contrast, saturation as `Image.blend` with a
black image, the mean grey, the grey image; truncated to uint8 after each) in each sample's own
random order, on the whole image, as torchvision's `ColorJitter` does on a PIL image.
"""

from __future__ import annotations

import math

import torch


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    a, x = -0.5, x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _sinc(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.ones_like(x), torch.sin(math.pi * x) / (math.pi * x).where(x != 0, 1.0))


def _lanczos(x: torch.Tensor) -> torch.Tensor:
    return torch.where((x >= -3) & (x < 3), _sinc(x) * _sinc(x / 3), torch.zeros_like(x))


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1 - x.abs()).clamp(min=0)


# name -> (support, kernel): Pillow's filters (libImaging/Resample.c).
FILTERS = {"bicubic": (2.0, _bicubic), "lanczos": (3.0, _lanczos), "bilinear": (1.0, _bilinear)}

# Grey level as Pillow's RGB -> L conversion computes it (ITU-R 601-2 luma, 16-bit fixed point, rounded).
LUMA_WEIGHTS = (19595, 38470, 7471)
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2  # torchvision ColorJitter's fn_idx (3 = hue, not supported)


def filter_weights(start: torch.Tensor, length: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                   out_size: int, in_size: int, interpolation: str) -> torch.Tensor:
    """Pillow's resampling coefficients of one axis for each sample: [B, out_size, in_size].

    start, length [B]: the crop box on this axis (fractional when the image was decoded at reduced
    scale); low, high [B]: the input pixels that may contribute (the box's pixels: Pillow crops first);
    in_size: the padded canvas length."""
    support, kernel = FILTERS[interpolation]
    # Float64 where the device has it: the support's ends are floor()s of the centres, as Pillow's doubles.
    precision = torch.float32 if start.device.type == "mps" else torch.float64
    start, length, low, high = (value.to(precision) for value in (start, length, low, high))
    scale = (length / out_size)[:, None, None]  # [B, 1, 1] input pixels per output pixel
    filter_scale = scale.clamp(min=1.0)  # widen the filter when downscaling: the antialiasing
    centers = start[:, None, None] + (torch.arange(out_size, device=start.device)[None, :, None] + 0.5) * scale
    first = torch.maximum(torch.floor(centers - support * filter_scale + 0.5), low[:, None, None])  # [B, out, 1]
    stop = torch.minimum(torch.floor(centers + support * filter_scale + 0.5), high[:, None, None])
    pixels = torch.arange(in_size, device=start.device, dtype=start.dtype)[None, None, :]  # [1, 1, in]
    weights = kernel((pixels - centers + 0.5) / filter_scale) * ((pixels >= first) & (pixels < stop))
    total = weights.sum(-1, keepdim=True)
    return (weights / torch.where(total == 0, torch.ones_like(total), total)).float()  # [B, out, in]


def to_uint8_levels(values: torch.Tensor) -> torch.Tensor:
    """Pillow's rounding of a resampling pass into uint8 (round half up, clipped), kept as float."""
    return torch.floor(values + 0.5).clamp_(0, 255)


def resize_boxes(canvas: torch.Tensor, boxes: torch.Tensor, limits: torch.Tensor, flips: torch.Tensor,
                 size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Crop each sample's box, resize it to `size` and flip it, as Pillow's `crop().resize()` then a flip.

    canvas [B, C, H, W] float of uint8 levels (padded images); boxes [B, 4] float (top, left, height,
    width); limits [B, 4] (top, left, bottom, right): the pixels a box may read; flips [B] bool.
    Returns [B, C, h, w] float uint8 levels."""
    _, _, height, width = canvas.shape
    out_h, out_w = size
    columns = filter_weights(boxes[:, 1], boxes[:, 3], limits[:, 1], limits[:, 3], out_w, width, interpolation)
    columns = torch.where(flips[:, None, None], columns.flip(1), columns)  # [B, w, W], flipped output order
    rows = filter_weights(boxes[:, 0], boxes[:, 2], limits[:, 0], limits[:, 2], out_h, height, interpolation)
    # Under TF32 (--tf32) the weights keep 11 significant bits: about 0.15 level of error, so a pixel may
    # round to the neighbouring uint8 level; the tolerance the tests state (2 levels) covers it.
    horizontal = to_uint8_levels(canvas @ columns.transpose(1, 2)[:, None])  # [B, C, H, w]
    return to_uint8_levels(rows[:, None] @ horizontal)  # [B, C, h, w]


# ---------------------------------------------------------------------------------------------
# Colour jitter
# ---------------------------------------------------------------------------------------------


def grey(image: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] uint8 levels -> [B, 1, H, W]: Pillow's "L" conversion (exact in int32)."""
    if image.shape[1] == 1:
        return image
    levels = image.to(torch.int32)
    r, g, b = LUMA_WEIGHTS
    luma = (levels[:, 0] * r + levels[:, 1] * g + levels[:, 2] * b + 0x8000) >> 16
    return luma[:, None].to(image.dtype)


def blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's `Image.blend(degenerate, image, factor)` for uint8: float32 arithmetic, clipped and truncated."""
    return torch.floor((degenerate + factor * (image - degenerate)).clamp(0, 255))


def color_jitter(image: torch.Tensor, valid: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter on PIL images, per sample: [B, C, H, W] float uint8 levels -> the same.

    valid [B, 2]: (height, width) of each image inside the padded canvas (the contrast uses the mean
    grey of the image itself); order [B, 4]: ColorJitter's fn_idx; factors [B, 3]: brightness,
    contrast, saturation factors (1 = off)."""
    rows = torch.arange(image.shape[2], device=image.device)[None, :, None]
    cols = torch.arange(image.shape[3], device=image.device)[None, None, :]
    inside = ((rows < valid[:, :1, None]) & (cols < valid[:, 1:, None]))[:, None]  # [B, 1, H, W]
    pixels = valid[:, 0] * valid[:, 1]  # [B]
    for position in range(order.shape[1]):
        operation = order[:, position]  # [B]
        luma = grey(image)  # [B, 1, H, W]
        mean = torch.floor((luma * inside).sum((1, 2, 3), dtype=torch.float64) / pixels + 0.5).float()  # [B]
        degenerate = torch.where((operation == SATURATION)[:, None, None, None], luma,
                                 torch.where(operation == CONTRAST, mean, 0.0)[:, None, None, None])
        factor = torch.ones_like(mean)
        for kind in (BRIGHTNESS, CONTRAST, SATURATION):
            factor = torch.where(operation == kind, factors[:, kind], factor)
        jittered = blend(degenerate, image, factor[:, None, None, None].float())
        image = torch.where((operation <= SATURATION)[:, None, None, None], jittered, image)
    return image  # the padding may have changed: resize_boxes never reads it


__all__ = ["FILTERS", "blend", "color_jitter", "filter_weights", "grey", "resize_boxes"]
