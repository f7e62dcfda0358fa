"""Masking: which patches a MIM model hides. Pure functions and small seedable generators.

This file ships with every checkpoint (``trust_remote_code``): torch, numpy and stdlib only.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch


def check_mask_ratio(mask_ratio: float) -> float:
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}. MAE uses 0.75.")
    return float(mask_ratio)


def random_masking(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking, driven by uniform `noise` [B, L].

    Keeps the `int(L * (1 - mask_ratio))` patches with the smallest noise. Returns
    ``ids_keep`` [B, K] (kept patch indices, in shuffled order), ``mask`` [B, L] (1 = removed,
    in the original patch order) and ``ids_restore`` [B, L] (inverse of the shuffle).
    """
    batch, length = noise.shape
    len_keep = int(length * (1 - check_mask_ratio(mask_ratio)))
    if len_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of {length}; lower it.")
    ids_shuffle = torch.argsort(noise, dim=1)  # [B, L] ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, L]
    ids_keep = ids_shuffle[:, :len_keep]  # [B, K]
    mask = (ids_restore >= len_keep).to(noise.dtype)  # [B, L], 1 = removed
    return ids_keep, mask, ids_restore


def masking_from_mask(mask: torch.Tensor, num_masked: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`random_masking`'s (ids_keep [B, K], mask [B, L] float, ids_restore [B, L]) for a given boolean
    `mask` [B, L] (True = removed) that removes `num_masked` patches of every sample. The kept patches
    stay in their original order."""
    length = mask.shape[1]
    ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # [B, L]: visible first, in order
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, L]
    return ids_shuffle[:, :length - num_masked], mask.float(), ids_restore


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens [B, L, D], ids [B, K] -> [B, K, D]."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


# ---------------------------------------------------------------------------------------------
# Mask generators: one boolean mask [rows*cols] per call (True = masked, row-major patch order),
# reproducible under a torch.Generator. Used by the image processor and the data pipelines.
# ---------------------------------------------------------------------------------------------


def _grid_pair(grid_size: int | Sequence[int]) -> tuple[int, int]:
    integer = (int, np.integer)
    if isinstance(grid_size, integer):
        grid_size = (grid_size, grid_size)
    pair = tuple(grid_size) if isinstance(grid_size, Iterable) else ()
    if len(pair) != 2 or any(not isinstance(side, integer) or side < 1 for side in pair):
        raise ValueError(f"grid_size must be a positive int or a (rows, cols) pair of positive ints, got {grid_size}.")
    return int(pair[0]), int(pair[1])


# name -> mask generator class. Open: a method's own masks register from its model file with
# @register_mask_generator("name"); `mask_generator_class` imports the model files before calling a name unknown.
MASK_GENERATORS: dict[str, type] = {}


def register_mask_generator(name: str):
    """Class decorator: `build_mask_generator(name, grid_size, **kwargs)` and the image processor's
    `mask_generator=name` build this class (called as `cls(grid_size, **kwargs)`, then `generator()` -> [rows, cols])."""
    def register(cls: type) -> type:
        known = MASK_GENERATORS.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"Mask generator {name!r} is already registered by {known.__module__}.{known.__qualname__}; "
                             "choose another name.")
        MASK_GENERATORS[name] = cls
        return cls
    return register


@register_mask_generator("random")
class RandomMaskGenerator:
    """MAE's masking as a generator: each call hides `num_mask_patches = L - int(L * (1 - mask_ratio))`
    patches chosen uniformly at random, the count `random_masking` removes for the same ratio."""

    def __init__(self, grid_size: int | Sequence[int], mask_ratio: float = 0.75):
        self.grid_size = _grid_pair(grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.num_mask_patches = self.num_patches - int(self.num_patches * (1 - self.mask_ratio))
        if self.num_mask_patches >= self.num_patches:
            raise ValueError(
                f"mask_ratio={mask_ratio} keeps no patch of the {self.grid_size[0]}x{self.grid_size[1]} grid; lower it."
            )

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.rand(1, self.num_patches, generator=generator)  # [1, L]
        _, mask, _ = random_masking(noise, self.mask_ratio)  # [1, L], 1 = removed
        return mask[0].bool()  # [L]

    def __repr__(self) -> str:
        return f"RandomMaskGenerator(grid_size={self.grid_size}, mask_ratio={self.mask_ratio})"


class _Uniforms:
    """Uniform [0, 1) floats drawn from torch in chunks: one torch call per chunk instead of one per
    number keeps the blockwise generator fast, and the stream is a pure function of the generator."""

    def __init__(self, generator: torch.Generator | None, chunk: int = 256):
        self.generator, self.chunk, self.values = generator, chunk, []

    def take(self, count: int) -> list[float]:
        if len(self.values) < count:
            fresh = torch.rand(self.chunk, dtype=torch.float64, generator=self.generator).tolist()
            self.values = fresh + self.values  # consumed from the end
        return [self.values.pop() for _ in range(count)]


@register_mask_generator("blockwise")
class BlockwiseMaskGenerator:
    """BEiT's blockwise masking (Bao et al., 2022) on any rows x cols grid.

    Rectangular blocks are added until `num_mask_patches` (an ABSOLUTE count: 75 of 14x14 in
    BEiT) are masked. For each block, up to 10 tries: area ~ U[min_mask_patches_per_block, budget] with
    budget = min(remaining, max_mask_patches_per_block), aspect ratio log-uniform in [min_aspect, max_aspect]
    (max_aspect defaults to 1 / min_aspect), height = round(sqrt(area * aspect)), width =
    round(sqrt(area / aspect)); as in the reference, a block must be strictly smaller than the grid
    in both directions, and is kept only if it adds between 1 and `budget` new patches. Masking
    stops when a block's 10 tries all fail, so the count can end below the target (mean 74.5 for
    75 of 14x14): gather masked tokens with a boolean index, never a reshape.
    Use :meth:`scaled` to carry BEiT's counts over to another grid in proportion. The counts have the
    names of the scripts' options (`--num_mask_patches`, ...; the reference's: OLD_NAMES), so that an
    error names what a user can pass.
    """

    tries_per_block = 10

    def __init__(
        self,
        grid_size: int | Sequence[int],
        num_mask_patches: int = 75,
        min_mask_patches_per_block: int = 16,
        max_mask_patches_per_block: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        self.grid_size = rows, cols = _grid_pair(grid_size)
        self.num_patches = rows * cols
        if rows < 2 or cols < 2:
            raise ValueError(
                f"Blockwise masking needs a grid of at least 2x2 patches (blocks are strictly smaller than the "
                f"grid), got {rows}x{cols}. Use the 'random' mask generator for this grid."
            )
        if not 1 <= num_mask_patches <= self.num_patches:
            raise ValueError(
                f"num_mask_patches={num_mask_patches} must be between 1 and the {self.num_patches} patches of "
                f"the {rows}x{cols} grid. BEiT masks 75 of 14x14: to scale that to this grid, use "
                f"BlockwiseMaskGenerator.scaled(grid_size), or pass reference_grid=(14, 14) to "
                f"build_mask_generator (the image processor's mask_generator_kwargs)."
            )
        if not 1 <= min_mask_patches_per_block <= num_mask_patches:
            raise ValueError(
                f"min_mask_patches_per_block={min_mask_patches_per_block} must be between 1 and "
                f"num_mask_patches={num_mask_patches}."
            )
        if max_mask_patches_per_block is not None and max_mask_patches_per_block < min_mask_patches_per_block:
            raise ValueError(
                f"max_mask_patches_per_block={max_mask_patches_per_block} is below "
                f"min_mask_patches_per_block={min_mask_patches_per_block}; raise it or pass None."
            )
        max_aspect = 1.0 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(
                f"Need 0 < min_aspect <= max_aspect, got min_aspect={min_aspect}, max_aspect={max_aspect}."
            )
        self.num_mask_patches = int(num_mask_patches)
        self.min_mask_patches_per_block = int(min_mask_patches_per_block)
        self.max_mask_patches_per_block = (self.num_mask_patches if max_mask_patches_per_block is None
                                           else int(max_mask_patches_per_block))
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self.log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))
        self._check_a_block_fits()

    def _check_a_block_fits(self) -> None:
        """Fail early when no first block can ever be placed: the generator would silently mask nothing."""
        (rows, cols), budget = self.grid_size, min(self.num_mask_patches, self.max_mask_patches_per_block)
        areas = np.linspace(self.min_mask_patches_per_block, budget, 257)[:, None]  # [257, 1]
        aspects = np.exp(np.linspace(*self.log_aspect, 257))[None, :]  # [1, 257]
        heights, widths = np.round(np.sqrt(areas * aspects)), np.round(np.sqrt(areas / aspects))  # [257, 257]
        fits = (heights >= 1) & (widths >= 1) & (heights < rows) & (widths < cols) & (heights * widths <= budget)
        if not fits.any():
            raise ValueError(
                f"No block of {self.min_mask_patches_per_block} to {budget} patches with an aspect ratio in "
                f"[{self.min_aspect:.3g}, {self.max_aspect:.3g}] fits strictly inside the {rows}x{cols} grid, so "
                f"nothing would ever be masked. Lower min_mask_patches_per_block (reference_grid=(14, 14) scales "
                f"BEiT's counts to the grid) or widen the aspect range."
            )

    @classmethod
    def scaled(
        cls,
        grid_size: int | Sequence[int],
        reference_grid: int | Sequence[int] = (14, 14),
        num_mask_patches: int = 75,
        min_mask_patches_per_block: int = 16,
        max_mask_patches_per_block: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> BlockwiseMaskGenerator:
        """The counts are given for `reference_grid` and scaled by the ratio of patch counts
        (rounded, at least 1): 75 and 16 of 14x14 become 24 and 5 of 8x8; the aspect range is kept."""
        ref_rows, ref_cols = _grid_pair(reference_grid)
        rows, cols = _grid_pair(grid_size)
        scale = rows * cols / (ref_rows * ref_cols)

        def rescale(count: int) -> int:
            return max(1, round(count * scale))

        return cls(
            (rows, cols), rescale(num_mask_patches), rescale(min_mask_patches_per_block),
            None if max_mask_patches_per_block is None else rescale(max_mask_patches_per_block), min_aspect, max_aspect,
        )

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        uniforms = _Uniforms(generator)
        mask = np.zeros(self.grid_size, dtype=bool)  # [rows, cols]
        count = 0
        while count < self.num_mask_patches:
            budget = min(self.num_mask_patches - count, self.max_mask_patches_per_block)
            added = self._add_block(mask, budget, uniforms)
            if added == 0:
                break
            count += added
        return torch.from_numpy(mask.reshape(-1))  # [rows*cols], row-major

    def _add_block(self, mask: np.ndarray, budget: int, uniforms: _Uniforms) -> int:
        """Up to `tries_per_block` tries to place one block adding 1..budget new patches; returns how many it added."""
        rows, cols = self.grid_size
        for _ in range(self.tries_per_block):
            u_area, u_aspect, u_top, u_left = uniforms.take(4)
            area = self.min_mask_patches_per_block + (budget - self.min_mask_patches_per_block) * u_area
            aspect = math.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * u_aspect)
            height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if height >= rows or width >= cols:
                continue
            top = min(int(u_top * (rows - height + 1)), rows - height)  # uniform over every placement
            left = min(int(u_left * (cols - width + 1)), cols - width)
            block = mask[top : top + height, left : left + width]  # a view: writing it writes the mask
            added = height * width - int(block.sum())
            if 0 < added <= budget:
                block[...] = True
                return added
        return 0

    def __repr__(self) -> str:
        return (
            f"BlockwiseMaskGenerator(grid_size={self.grid_size}, num_mask_patches={self.num_mask_patches}, "
            f"min_mask_patches_per_block={self.min_mask_patches_per_block}, "
            f"max_mask_patches_per_block={self.max_mask_patches_per_block}, "
            f"min_aspect={self.min_aspect}, max_aspect={self.max_aspect})"
        )


@register_mask_generator("blockwise_exact")
class ExactBlockwiseMaskGenerator(BlockwiseMaskGenerator):
    """BEiT v2's masking (beit2's ``masking_generator.py``): BEiT's blockwise masking, then the count is
    made exactly `num_mask_patches` by masking uniformly chosen unmasked patches (or, should the
    blocks overshoot, unmasking uniformly chosen masked ones). Every mask then has the same count."""

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        mask = super().__call__(generator)  # [N], count <= num_mask_patches
        missing = self.num_mask_patches - int(mask.sum())
        if missing == 0:
            return mask
        # One uniform subset of the patches to flip: masking the missing ones, or unmasking the surplus.
        candidates = (~mask if missing > 0 else mask).nonzero().squeeze(1)  # [K] flat indices
        chosen = torch.randperm(len(candidates), generator=generator)[: abs(missing)]
        mask[candidates[chosen]] = missing > 0
        return mask

    def __repr__(self) -> str:
        return "Exact" + super().__repr__()


def import_model_files() -> None:
    """Imports every `modeling_*` module beside this file, so that the masks they register are known."""
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("modeling_"):
            importlib.import_module(f"{__package__}.{info.name}")


def mask_generator_class(name: str) -> type:
    if name not in MASK_GENERATORS:
        import_model_files()
    if name not in MASK_GENERATORS:
        raise ValueError(f"Unknown mask generator {name!r}; choose one of {sorted(MASK_GENERATORS)} (a method "
                         "registers its own with masking.register_mask_generator in its model file).")
    return MASK_GENERATORS[name]


# The reference generator's names (BEiT's MaskingGenerator), which image processors saved before the
# scripts' spelling carry: they still load, read as the scripts' names.
OLD_NAMES = {"num_masking_patches": "num_mask_patches", "min_num_patches": "min_mask_patches_per_block",
             "max_num_patches": "max_mask_patches_per_block"}


def script_spelling(kwargs: dict) -> dict:
    """Mask generator arguments with the scripts' names (`num_mask_patches`, ...); either spelling in,
    one out. Both spellings of one argument are refused: one of them would be silently dropped."""
    both = sorted(new for old, new in OLD_NAMES.items() if old in kwargs and new in kwargs)
    if both:
        old_names = {new: old for old, new in OLD_NAMES.items()}
        raise ValueError(f"Mask generator arguments {both} are also given under their old names "
                         f"{[old_names[name] for name in both]}: pass each once.")
    return {OLD_NAMES.get(key, key): value for key, value in kwargs.items()}


def build_mask_generator(name: str, grid_size: int | Sequence[int], **kwargs):
    """`build_mask_generator("blockwise", (14, 14), num_mask_patches=75)`. For "blockwise" (BEiT) and
    "blockwise_exact" (BEiT v2), passing `reference_grid` means the counts are given for that grid and
    are scaled to `grid_size`. The counts take the scripts' names (`num_mask_patches`,
    `min_mask_patches_per_block`, `max_mask_patches_per_block`) or the reference's (OLD_NAMES)."""
    kwargs = script_spelling(kwargs)
    cls = mask_generator_class(name)
    blockwise = issubclass(cls, BlockwiseMaskGenerator)
    factory = cls.scaled if blockwise and "reference_grid" in kwargs else cls
    accepted = [p for p in inspect.signature(factory).parameters if p != "grid_size"]
    if blockwise and "reference_grid" not in accepted:
        accepted.append("reference_grid")
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"Mask generator {name!r} does not take {unknown}; it accepts {accepted}.")
    return factory(grid_size, **kwargs)


# ---------------------------------------------------------------------------------------------
# ViT masked patch prediction (Dosovitskiy et al., 2021): BERT-style corruption of patch embeddings
# ---------------------------------------------------------------------------------------------

# What happened to each patch (the `branch` of `corrupt_patch_embeddings`).
NOT_CORRUPTED, REPLACED_BY_MASK, REPLACED_BY_OTHER_PATCH, KEPT_UNCHANGED = 0, 1, 2, 3


class PatchCorruption(NamedTuple):
    tokens: torch.Tensor  # [B, N, D] the corrupted patch embeddings
    branch: torch.Tensor  # [B, N] long: NOT_CORRUPTED / REPLACED_BY_MASK / REPLACED_BY_OTHER_PATCH / KEPT_UNCHANGED
    source: torch.Tensor  # [B, N] long: the patch (same image) whose embedding now sits here; -1 = mask embedding


def random_patch_selection(
    batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """[B, N] bool (True = selected), per sample the `N - int(N * (1 - mask_ratio))` patches that
    :func:`random_masking` would remove for the same uniform noise (exactly N/2 for ViT's 0.5)."""
    noise = torch.rand(batch, num_patches, generator=generator,
                       device=generator.device if generator is not None else device)  # [B, N]
    return random_masking(noise, mask_ratio)[1].bool().to(device)  # [B, N]


def check_corruption_probs(replace_prob: float, random_prob: float) -> None:
    if not (0.0 <= replace_prob <= 1.0 and 0.0 <= random_prob <= 1.0 and replace_prob + random_prob <= 1.0):
        raise ValueError(
            f"replace_prob={replace_prob} and random_prob={random_prob} must be probabilities summing to at most "
            "1 (the rest is kept unchanged). ViT uses 0.8 and 0.1."
        )


def corrupt_patch_embeddings(
    tokens: torch.Tensor,
    mask_token: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    generator: torch.Generator | None = None,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
) -> PatchCorruption:
    """ViT's masked patch prediction corruption of the patches selected by `bool_masked_pos` [B, N]:
    each one independently is replaced by `mask_token` [D] (probability `replace_prob`), by a random
    OTHER patch embedding (`random_prob`), or kept unchanged (the rest).

    "Other" is taken by position within the SAME image: the source is uniform over the N-1 other
    positions of that image (never the patch itself; two positions may still hold equal content,
    e.g. flat background). Same image rather than same batch keeps each sample's corruption
    independent of the batch size and of how a batch is split across devices. The source's
    ORIGINAL embedding is copied, even when the source is itself corrupted. Apply this to the
    patch embeddings BEFORE position embeddings: the copied content gets the position of the
    patch it replaces. The result is differentiable w.r.t. `tokens` and `mask_token`.

    Random numbers are drawn for every position (a fixed amount per call), so the outcome is a
    function of the generator's state and the shapes only.
    """
    batch, length, dim = tokens.shape
    check_corruption_probs(replace_prob, random_prob)
    if tuple(bool_masked_pos.shape) != (batch, length) or bool_masked_pos.dtype != torch.bool:
        raise ValueError(
            f"bool_masked_pos must be a bool tensor [{batch}, {length}] (True = corrupt), got "
            f"{bool_masked_pos.dtype} {list(bool_masked_pos.shape)}."
        )
    if mask_token.numel() != dim:
        raise ValueError(f"mask_token has {mask_token.numel()} values, expected the embedding width {dim}.")
    draw_device = generator.device if generator is not None else tokens.device
    uniform = torch.rand(batch, length, generator=generator, device=draw_device).to(tokens.device)  # [B, N]
    offset = torch.randint(0, max(length - 1, 1), (batch, length), generator=generator, device=draw_device)
    positions = torch.arange(length, device=tokens.device)  # [N]
    other = offset.to(tokens.device)
    other = other + (other >= positions).long()  # [B, N] uniform over the N-1 positions != own

    branch = torch.full((batch, length), KEPT_UNCHANGED, dtype=torch.long, device=tokens.device)  # [B, N]
    branch[uniform < replace_prob + random_prob] = REPLACED_BY_OTHER_PATCH
    branch[uniform < replace_prob] = REPLACED_BY_MASK
    branch[~bool_masked_pos.to(tokens.device)] = NOT_CORRUPTED
    if length < 2 and bool((branch == REPLACED_BY_OTHER_PATCH).any()):
        raise ValueError("A random other patch needs at least 2 patches per image; use random_prob=0 for 1 patch.")

    source = torch.where(branch == REPLACED_BY_OTHER_PATCH, other, positions.expand(batch, -1))  # [B, N]
    moved = torch.gather(tokens, 1, source.unsqueeze(-1).expand(-1, -1, dim))  # [B, N, D]
    is_mask = (branch == REPLACED_BY_MASK).unsqueeze(-1)  # [B, N, 1]
    corrupted = torch.where(is_mask, mask_token.reshape(dim).to(tokens.dtype), moved)  # [B, N, D]
    return PatchCorruption(corrupted, branch, source.masked_fill(is_mask.squeeze(-1), -1))
