"""BEiT's relative position bias: the index layout, the gathered bias, and the geometric cubic resize."""

from __future__ import annotations

import math

import pytest
import torch

from hf_mim.models.relative_position import (
    RelativePositionBias, cubic_spline_matrix, geometric_offsets, num_relative_distances, relative_position_index,
    resize_relative_position_bias_table,
)


@pytest.mark.parametrize("grid", [(3, 3), (2, 4), (4, 1)])
def test_index_layout_matches_the_definition(grid):
    rows, cols = grid
    total = (2 * rows - 1) * (2 * cols - 1) + 3
    assert num_relative_distances(grid) == total
    index = relative_position_index(grid)
    assert index.shape == (rows * cols + 1, rows * cols + 1)
    for query in range(rows * cols + 1):
        for key in range(rows * cols + 1):
            if query == 0 and key == 0:
                expected = total - 1  # cls -> cls
            elif query == 0:
                expected = total - 3  # cls -> patch
            elif key == 0:
                expected = total - 2  # patch -> cls
            else:
                (qr, qc), (kr, kc) = divmod(query - 1, cols), divmod(key - 1, cols)
                expected = (qr - kr + rows - 1) * (2 * cols - 1) + (qc - kc + cols - 1)
            assert index[query, key] == expected, (query, key)


@pytest.mark.parametrize("grid", [(3, 3), (2, 4)])
def test_index_equals_transformers(grid):
    from transformers.models.beit.modeling_beit import BeitRelativePositionBias

    assert torch.equal(relative_position_index(grid), BeitRelativePositionBias.generate_relative_position_index(grid))


def test_bias_gathers_the_table_per_head_and_index_is_not_saved():
    module = RelativePositionBias((2, 3), num_heads=4)
    assert "relative_position_index" not in module.state_dict()
    assert list(module.state_dict()) == ["relative_position_bias_table"]
    assert torch.count_nonzero(module.relative_position_bias_table) == 0  # zeros at init
    with torch.no_grad():
        module.relative_position_bias_table.normal_()
    bias = module()  # [H, 1+N, 1+N]
    index = relative_position_index((2, 3))
    assert bias.shape == (4, 7, 7)
    for head in range(4):
        assert torch.equal(bias[head], module.relative_position_bias_table[index, head])


def test_resize_to_the_same_grid_is_exact():
    table = torch.randn(num_relative_distances((5, 4)), 3)
    assert resize_relative_position_bias_table(table, (5, 4), (5, 4)) is table
    with pytest.raises(ValueError, match="has 66 rows"):
        resize_relative_position_bias_table(table[:-1], (5, 4), (6, 6))


def test_geometric_offsets_follow_the_progression():
    source, target = geometric_offsets(27, 63)  # 14x14 -> 32x32, the 224 -> 512 case
    assert len(source) == 27 and source[13] == 0.0
    assert source[:13] == [-d for d in reversed(source[14:])]
    steps = [b - a for a, b in zip(source[13:], source[14:])]  # 1, q, q^2, ...
    ratio = steps[2] / steps[1]
    assert steps[0] == 1.0 and 1.01 < ratio < 1.5
    for k, step in enumerate(steps):
        assert step == pytest.approx(ratio**k, rel=1e-9)
    assert source[-1] == pytest.approx(31, abs=1e-3)  # stretched to the new half-width
    assert target == [float(k) for k in range(-31, 32)]


@pytest.mark.parametrize("sizes", [(5, 9), (4, 6), (9, 5)])
def test_spline_reproduces_cubics(sizes):
    """A not-a-knot cubic spline is exact on a cubic polynomial, the direct formula to compare with."""
    n, m = sizes
    nodes = sorted(torch.randn(n, generator=torch.Generator().manual_seed(n)).mul(3).tolist())
    targets = torch.linspace(nodes[0], nodes[-1], m).tolist()
    cubic = lambda x: 0.3 * x**3 - x**2 + 2 * x - 0.5  # noqa: E731
    weights = cubic_spline_matrix(nodes, targets)
    values = weights @ torch.tensor([cubic(x) for x in nodes], dtype=torch.float64)
    assert torch.allclose(values, torch.tensor([cubic(t) for t in targets], dtype=torch.float64), atol=1e-9)


def test_resize_of_a_separable_cubic_is_the_cubic_at_the_new_offsets():
    old, new = (4, 3), (6, 5)  # offsets 7x5 -> 11x9
    rows_src, rows_dst = geometric_offsets(7, 11)
    cols_src, cols_dst = geometric_offsets(5, 9)
    p = lambda y: 0.02 * y**3 - 0.1 * y**2 + 0.5 * y + 1  # noqa: E731
    q = lambda x: -0.05 * x**3 + 0.2 * x + 2  # noqa: E731
    grid = torch.tensor([[p(y) * q(x) for x in cols_src] for y in rows_src], dtype=torch.float64)  # [7, 5]
    cls_rows = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    table = torch.cat([grid.reshape(-1, 1), cls_rows])  # one head
    resized = resize_relative_position_bias_table(table, old, new)
    assert resized.shape == (num_relative_distances(new), 1)
    clamp = lambda v, lo, hi: min(max(v, lo), hi)  # noqa: E731 - the spline is evaluated inside the old range
    expected = torch.tensor([[p(clamp(y, rows_src[0], rows_src[-1])) * q(clamp(x, cols_src[0], cols_src[-1]))
                              for x in cols_dst] for y in rows_dst], dtype=torch.float64)
    assert torch.allclose(resized[:-3, 0].reshape(11, 9), expected, atol=1e-9)
    assert torch.equal(resized[-3:], cls_rows)


@pytest.mark.parametrize("old, new", [((4, 4), (7, 7)), ((3, 5), (6, 4)), ((14, 14), (24, 24))])
def test_resize_matches_scipy_bicubic_spline(old, new):
    """The reference calls scipy's interp2d(kind='cubic') on the geometric offsets; on a grid that is
    RectBivariateSpline(kx=ky=3, s=0)."""
    interpolate = pytest.importorskip("scipy.interpolate")
    heads = 2
    table = torch.randn(num_relative_distances(old), heads, dtype=torch.float64)
    resized = resize_relative_position_bias_table(table, old, new)
    (oh, ow), (nh, nw) = [(2 * r - 1, 2 * c - 1) for r, c in (old, new)]
    rows_src, rows_dst = geometric_offsets(oh, nh)
    cols_src, cols_dst = geometric_offsets(ow, nw)
    for head in range(heads):
        spline = interpolate.RectBivariateSpline(rows_src, cols_src, table[:-3, head].reshape(oh, ow).numpy(), s=0)
        expected = torch.from_numpy(spline(rows_dst, cols_dst))
        assert torch.allclose(resized[:-3, head].reshape(nh, nw), expected, atol=1e-10)


def test_bias_for_another_grid_uses_the_resized_table_and_keeps_gradients():
    module = RelativePositionBias((3, 3), num_heads=2)
    with torch.no_grad():
        module.relative_position_bias_table.normal_()
    bias = module((4, 5))
    resized = resize_relative_position_bias_table(module.relative_position_bias_table, (3, 3), (4, 5))
    index = relative_position_index((4, 5))
    assert bias.shape == (2, 21, 21)
    assert torch.allclose(bias, resized[index].permute(2, 0, 1))
    bias.sum().backward()
    assert module.relative_position_bias_table.grad is not None
    assert math.isfinite(module.relative_position_bias_table.grad.sum().item())
