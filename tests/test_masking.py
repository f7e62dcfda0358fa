"""Masking: MAE's random_masking (parity with transformers' ViTMAE) and the seedable mask generators.

The blockwise generator is checked three ways: the single-block shape distribution against a
numerical integral of the sampling rule (a different formulation), block placement against the
uniform distribution, and whole-mask statistics against the BEiT reference (mean 74.5 of target
75 on 14x14, MIM_SPEC.md).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import ViTMAEConfig
from transformers.models.vit_mae.modeling_vit_mae import ViTMAEEmbeddings

from hf_mim.models.masking import (
    MASK_GENERATORS,
    BlockwiseMaskGenerator,
    ExactBlockwiseMaskGenerator,
    RandomMaskGenerator,
    _Uniforms,
    build_mask_generator,
    gather_tokens,
    random_masking,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw(generator, count: int, seed: int = 0) -> torch.Tensor:
    rng = seeded(seed)
    return torch.stack([generator(rng) for _ in range(count)])  # [count, L]


def chi2_upper_quantile(df: int, z: float = 3.72) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at normal score z (3.72: p = 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# ---------------------------------------------------------------------------------------------
# random_masking (MAE)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,ratio", [(196, 0.75), (49, 0.5), (10, 0.0), (20, 0.9)])
def test_random_masking_matches_transformers_vitmae(length, ratio):
    noise = torch.rand(3, length, generator=seeded(length))
    tokens = torch.randn(3, length, 8, generator=seeded(1))
    config = ViTMAEConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                          image_size=8, patch_size=4, mask_ratio=ratio)
    reference_kept, reference_mask, reference_restore = ViTMAEEmbeddings(config).random_masking(tokens, noise)

    ids_keep, mask, ids_restore = random_masking(noise, ratio)
    torch.testing.assert_close(gather_tokens(tokens, ids_keep), reference_kept, rtol=0, atol=0)
    torch.testing.assert_close(mask, reference_mask, rtol=0, atol=0)
    torch.testing.assert_close(ids_restore, reference_restore, rtol=0, atol=0)


def test_random_masking_invariants():
    length, ratio = 50, 0.7
    noise = torch.rand(4, length, generator=seeded(0))
    ids_keep, mask, ids_restore = random_masking(noise, ratio)
    keep = int(length * (1 - ratio))
    assert ids_keep.shape == (4, keep)
    assert (mask.sum(1) == length - keep).all()
    # ids_restore inverts the shuffle: position i of the original order sits at ids_restore[i].
    ids_shuffle = torch.argsort(noise, dim=1)
    assert (torch.gather(ids_shuffle, 1, ids_restore) == torch.arange(length)).all()
    # argsort semantics: the kept patches are exactly those with the smallest noise, in ascending order.
    kept_noise = torch.gather(noise, 1, ids_keep)  # [B, K]
    assert (kept_noise.diff(dim=1) > 0).all()
    removed_noise = noise.masked_fill(mask == 0, float("inf")).min(dim=1).values  # [B]
    assert (kept_noise.max(dim=1).values < removed_noise).all()
    # mask is 0 exactly at the kept indices.
    expected = torch.ones_like(mask).scatter(1, ids_keep, 0.0)
    assert torch.equal(mask, expected)
    # same noise, same result
    again = random_masking(noise.clone(), ratio)
    assert all(torch.equal(a, b) for a, b in zip((ids_keep, mask, ids_restore), again))


def test_random_masking_errors():
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        random_masking(torch.rand(1, 10), 1.0)
    with pytest.raises(ValueError, match="keeps no patch"):
        random_masking(torch.rand(1, 3), 0.9)


# ---------------------------------------------------------------------------------------------
# RandomMaskGenerator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.75), ((3, 5), 0.5), ((7, 2), 0.4), (4, 0.0)])
def test_random_generator_counts_match_random_masking(grid, ratio):
    generator = RandomMaskGenerator(grid, mask_ratio=ratio)
    length = generator.num_patches
    masks = draw(generator, 20)
    assert masks.dtype == torch.bool and masks.shape == (20, length)
    assert (masks.sum(1) == length - int(length * (1 - ratio))).all()
    # The same generator state gives the mask random_masking gives for that noise.
    noise = torch.rand(1, length, generator=seeded(5))
    assert torch.equal(generator(seeded(5)), random_masking(noise, ratio)[1][0].bool())


def test_random_generator_is_uniform_and_seedable():
    generator = RandomMaskGenerator((6, 8), mask_ratio=0.75)
    masks = draw(generator, 3000).float()
    rate = generator.num_mask_patches / generator.num_patches
    standard_error = math.sqrt(rate * (1 - rate) / 3000)
    assert (masks.mean(0) - rate).abs().max() < 5 * standard_error  # every position equally likely
    assert torch.equal(generator(seeded(1)), generator(seeded(1)))
    assert not torch.equal(generator(seeded(1)), generator(seeded(2)))
    torch.manual_seed(3)
    first = generator()
    torch.manual_seed(3)
    assert torch.equal(first, generator())  # no generator: torch's global RNG


def test_random_generator_errors():
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        RandomMaskGenerator(14, mask_ratio=-0.1)
    with pytest.raises(ValueError, match="keeps no patch"):
        RandomMaskGenerator((1, 3), mask_ratio=0.7)
    for grid in ((0, 3), (2, 3, 4), 2.5):
        with pytest.raises(ValueError, match="grid_size must be a positive int"):
            RandomMaskGenerator(grid)


# ---------------------------------------------------------------------------------------------
# BlockwiseMaskGenerator
# ---------------------------------------------------------------------------------------------


def test_blockwise_beit_statistics_on_14x14():
    generator = BlockwiseMaskGenerator((14, 14))  # BEiT: 75 patches, blocks >= 16, aspect 0.3 .. 1/0.3
    draws = 4000
    masks = draw(generator, draws)
    assert masks.dtype == torch.bool and masks.shape == (draws, 196)
    counts = masks.sum(1).double()
    assert counts.max() == 75  # never above the target, and the target is reached
    # The first block alone adds >= 12 patches (16 rounded at the extreme aspect); a first round
    # with 10 failed tries has a probability far below 1 / draws.
    assert counts.min() >= 16
    # Reference: mean 74.5 over 5,000 draws (rounded to 0.1). Allow the rounding (0.05) plus 4
    # standard errors of our mean (count std ~1; 10 vs 9 or 11 tries per block moves it by ~0.1).
    standard_error = counts.std().item() / math.sqrt(draws)
    assert abs(counts.mean().item() - 74.5) < 0.05 + 4 * standard_error
    coverage = masks.double().mean(0).view(14, 14)
    assert coverage.min() > 0 and coverage.max() < 1  # no position never / always masked
    # The rule is symmetric under flips and (square grid, symmetric aspect range) transposition;
    # per-cell standard error <= 0.008, so 0.05 is > 4 standard errors of a difference.
    for image in (coverage.flip(0), coverage.flip(1), coverage.T):
        assert (coverage - image).abs().max() < 0.05


@pytest.mark.parametrize("grid,min_shapes", [((7, 9), 20), ((3, 12), 8)])  # few rejections / many rejections
def test_blockwise_first_block_shape_matches_the_sampling_integral(grid, min_shapes):
    """One block placed on an empty grid: its (height, width) distribution, by sampling vs by a
    2-D midpoint integral over area ~ U[min, budget] and log-aspect ~ U[log lo, log hi]."""
    budget, min_patches = 20, 4
    generator = BlockwiseMaskGenerator(grid, num_mask_patches=budget, min_mask_patches_per_block=min_patches)
    # Integral: probability that one try yields (h, w) and is kept.
    steps = 1000
    areas = min_patches + (budget - min_patches) * (np.arange(steps) + 0.5) / steps
    log_aspects = np.log(0.3) + (np.log(1 / 0.3) - np.log(0.3)) * (np.arange(steps) + 0.5) / steps
    heights = np.round(np.sqrt(areas[:, None] * np.exp(log_aspects)[None, :])).astype(int)
    widths = np.round(np.sqrt(areas[:, None] * np.exp(-log_aspects)[None, :])).astype(int)
    kept = (heights >= 1) & (widths >= 1) & (heights < grid[0]) & (widths < grid[1]) & (heights * widths <= budget)
    codes, hits = np.unique(heights[kept] * 1000 + widths[kept], return_counts=True)
    per_try = {(code // 1000, code % 1000): n / steps**2 for code, n in zip(codes.tolist(), hits.tolist())}
    accept = sum(per_try.values())
    expected = {shape: p * (1 - (1 - accept) ** 10) / accept for shape, p in per_try.items()}
    expected[None] = (1 - accept) ** 10  # ten failed tries: nothing placed

    samples, rng = 8000, seeded(0)
    observed = dict.fromkeys(expected, 0)
    for _ in range(samples):
        mask = np.zeros(grid, dtype=bool)
        added = generator._add_block(mask, budget, _Uniforms(rng))
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        shape = (len(rows), len(cols)) if added else None
        assert added == mask.sum() and (not added or added == shape[0] * shape[1])  # one solid rectangle
        observed[shape] += 1
    # Ten tries per block: on the (3, 12) grid ~27% of tries fit, so 9 or 11 tries move the
    # empty-block frequency by > 4 standard errors.
    none_error = math.sqrt(expected[None] * (1 - expected[None]) / samples) + 1e-4
    assert abs(observed[None] / samples - expected[None]) < 4 * none_error
    # Chi-square over the shapes expected >= 5 times (the rest pooled).
    big = [s for s in expected if expected[s] * samples >= 5]
    pooled_expected = samples * (1 - sum(expected[s] for s in big))
    pooled_observed = samples - sum(observed[s] for s in big)
    statistic = sum((observed[s] - samples * expected[s]) ** 2 / (samples * expected[s]) for s in big)
    if pooled_expected >= 5:
        statistic += (pooled_observed - pooled_expected) ** 2 / pooled_expected
    assert len(big) >= min_shapes  # the test covers many shapes
    assert statistic < chi2_upper_quantile(len(big) + (pooled_expected >= 5) - 1)


def test_blockwise_placement_is_uniform():
    # A target of exactly one 2x2 square: area 4, aspect 1 -> every mask is one square, placed at
    # one of the (3 - 2 + 1) * (5 - 2 + 1) = 8 positions with equal probability.
    generator = BlockwiseMaskGenerator((3, 5), num_mask_patches=4, min_mask_patches_per_block=4, min_aspect=1.0)
    draws = 2400
    masks = draw(generator, draws).view(draws, 3, 5)
    counts = {}
    for mask in masks:
        rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
        assert mask.sum() == 4 and len(rows) == 2 and len(cols) == 2
        counts[(rows[0].item(), cols[0].item())] = counts.get((rows[0].item(), cols[0].item()), 0) + 1
    assert len(counts) == 8
    statistic = sum((c - draws / 8) ** 2 / (draws / 8) for c in counts.values())
    assert statistic < chi2_upper_quantile(7)


def test_blockwise_non_square_grid_and_scaling():
    generator = BlockwiseMaskGenerator.scaled((6, 20))  # 75 / 196 and 16 / 196 of 120 patches
    assert (generator.num_mask_patches, generator.min_mask_patches_per_block) == (round(75 * 120 / 196),
                                                                            round(16 * 120 / 196))
    masks = draw(generator, 500)
    assert masks.shape == (500, 120)
    assert masks.sum(1).max() <= generator.num_mask_patches
    assert masks.sum(1).float().mean() > 0.9 * generator.num_mask_patches
    coverage = masks.float().mean(0).view(6, 20)
    assert coverage.min() > 0 and coverage.max() < 1
    # Row-major order: a mask reshaped to the grid is a union of rectangles; check with one block.
    single = BlockwiseMaskGenerator((4, 6), num_mask_patches=6, min_mask_patches_per_block=6, min_aspect=2 / 3,
                                    max_aspect=2 / 3)  # area 6, h = round(2) = 2, w = round(3) = 3
    mask = single(seeded(0)).view(4, 6)
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    assert (len(rows), len(cols), mask.sum().item()) == (2, 3, 6)
    # scaled on the reference grid is the identity; build_mask_generator's reference_grid is scaled().
    assert repr(BlockwiseMaskGenerator.scaled(14)) == repr(BlockwiseMaskGenerator(14))
    built = build_mask_generator("blockwise", (8, 8), reference_grid=(14, 14))
    assert repr(built) == repr(BlockwiseMaskGenerator.scaled((8, 8)))
    assert (built.num_mask_patches, built.min_mask_patches_per_block) == (24, 5)


def test_exact_blockwise_masks_exactly_the_target_as_beit2():
    """beit2's generator: BEiT's blocks, then uniformly chosen unmasked patches until the count is exact."""
    blockwise, exact = BlockwiseMaskGenerator((14, 14)), ExactBlockwiseMaskGenerator((14, 14))
    draws = 2000  # one seed per mask: both generators then place the same blocks
    blocks = torch.stack([blockwise(seeded(seed)) for seed in range(draws)])  # [draws, 196]
    masks = torch.stack([exact(seeded(seed)) for seed in range(draws)])
    assert (masks.sum(1) == 75).all()  # every mask, where v1's mean is 74.5
    assert (blocks.sum(1) < 75).any()
    assert (masks >= blocks).all()  # the same blocks, only topped up
    # The top-up patches are uniform over the unmasked ones: each unmasked patch of a mask short by
    # k of n unmasked is picked with probability k / n. Compare the picks with that expectation.
    short = blocks.sum(1) < 75
    added = (masks & ~blocks)[short].double()  # [S, 196]
    expected = ((75 - blocks[short].sum(1, keepdim=True)) / (~blocks[short]).sum(1, keepdim=True)) * (~blocks[short])
    assert added.sum() == pytest.approx(expected.sum().item())
    rows = added.view(-1, 14, 14).sum((0, 2)), expected.view(-1, 14, 14).sum((0, 2))  # per grid row
    assert ((rows[0] - rows[1]).abs() <= 4 * rows[1].sqrt() + 1).all()


def test_exact_blockwise_is_reproducible_and_scales():
    generator = ExactBlockwiseMaskGenerator.scaled((8, 12))
    assert generator.num_mask_patches == 37  # 75 * 96 / 196
    assert torch.equal(draw(generator, 20, seed=1), draw(generator, 20, seed=1))
    assert (draw(generator, 200).sum(1) == 37).all()


def test_blockwise_is_reproducible_under_a_generator():
    generator = BlockwiseMaskGenerator(14)
    assert torch.equal(draw(generator, 5, seed=1), draw(generator, 5, seed=1))
    assert not torch.equal(draw(generator, 5, seed=1), draw(generator, 5, seed=2))
    torch.manual_seed(4)
    first = generator()
    torch.manual_seed(4)
    assert torch.equal(first, generator())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(grid_size=(1, 9)), "at least 2x2"),
        (dict(grid_size=(8, 8), num_mask_patches=75), "reference_grid=.14, 14."),
        (dict(grid_size=14, num_mask_patches=0), "between 1 and the 196"),
        (dict(grid_size=14, min_mask_patches_per_block=80), "min_mask_patches_per_block=80"),
        (dict(grid_size=14, max_mask_patches_per_block=8), "below min_mask_patches_per_block"),
        (dict(grid_size=14, min_aspect=0.0), "0 < min_aspect"),
        (dict(grid_size=14, min_aspect=2.0, max_aspect=1.0), "0 < min_aspect"),
        (dict(grid_size=(4, 4), num_mask_patches=16, min_mask_patches_per_block=16), "nothing would ever be masked"),
    ],
)
def test_blockwise_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockwiseMaskGenerator(**kwargs)


def test_build_mask_generator():
    assert set(MASK_GENERATORS) == {"random", "blockwise", "blockwise_exact"}
    assert isinstance(build_mask_generator("random", 14, mask_ratio=0.5), RandomMaskGenerator)
    assert type(build_mask_generator("blockwise", 14)) is BlockwiseMaskGenerator
    exact = build_mask_generator("blockwise_exact", 8, reference_grid=14)  # 75 and 16 of 14x14 scaled to 8x8
    assert type(exact) is ExactBlockwiseMaskGenerator and exact.num_mask_patches == 24
    with pytest.raises(ValueError, match=r"Unknown mask generator 'block'; choose one of \['blockwise', "
                       r"'blockwise_exact', 'random'\]"):
        build_mask_generator("block", 14)
    with pytest.raises(ValueError, match=r"does not take \['ratio'\]; it accepts \['mask_ratio'\]"):
        build_mask_generator("random", 14, ratio=0.5)
    with pytest.raises(ValueError, match="does not take"):
        build_mask_generator("random", 14, reference_grid=14)


def test_build_mask_generator_takes_the_scripts_names_and_the_old_ones():
    """`--num_mask_patches` & co. are the one spelling (scripts, processors, generators); the reference's names
    still build the same generator (processors saved before), and both at once are refused rather than one dropped."""
    script = dict(num_mask_patches=20, min_mask_patches_per_block=6, max_mask_patches_per_block=12)
    old = dict(num_masking_patches=20, min_num_patches=6, max_num_patches=12)
    for kwargs in (script, old):
        generator = build_mask_generator("blockwise_exact", 8, **kwargs)
        counts = generator.num_mask_patches, generator.min_mask_patches_per_block, generator.max_mask_patches_per_block
        assert counts == (20, 6, 12)
        assert int(generator(torch.Generator().manual_seed(0)).sum()) == 20
    assert torch.equal(build_mask_generator("blockwise", 8, **script)(torch.Generator().manual_seed(1)),
                       build_mask_generator("blockwise", 8, **old)(torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match=r"\['num_mask_patches'\] are also given under their old names "
                                         r"\['num_masking_patches'\]"):
        build_mask_generator("blockwise", 8, num_mask_patches=20, num_masking_patches=20)
    with pytest.raises(ValueError, match=r"it accepts \['num_mask_patches', 'min_mask_patches_per_block', "
                                         r"'max_mask_patches_per_block', 'min_aspect', 'max_aspect'"):
        build_mask_generator("blockwise", 8, mask_ratio=0.5)
