"""BEiT's relative position bias: one learned scalar per head for every (dy, dx) offset between patches.

The table has ``(2*rows-1) * (2*cols-1)`` rows for patch->patch offsets plus 3 for the CLS token
(cls->patch, patch->cls, cls->cls); the index maps every (query, key) pair of the ``1 + rows*cols``
tokens to a table row. The index is derived from the grid, so it is a non-persistent buffer (the
reference checkpoints store it as ``relative_position_index``: loaders ignore it).

``resize_relative_position_bias_table`` is the official fine-tuning code's resize for another
grid: the old offsets are placed on a geometric progression that stretches them over the new
range, and a bicubic interpolating spline is evaluated at the new integer offsets. The spline is
written here in torch (a tensor-product "not-a-knot" cubic spline, what ``scipy.interpolate.interp2d
(kind='cubic')`` computes on a grid), so it is differentiable and needs no scipy.

This file ships with every checkpoint (``trust_remote_code``): torch, numpy and stdlib only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .vit_core import to_2tuple

NUM_CLS_ROWS = 3  # cls->patch, patch->cls, cls->cls


def num_relative_distances(grid_size: int | Sequence[int]) -> int:
    rows, cols = to_2tuple(grid_size)
    return (2 * rows - 1) * (2 * cols - 1) + NUM_CLS_ROWS


def relative_position_index(grid_size: int | Sequence[int]) -> torch.Tensor:
    """[1+N, 1+N] long: table row of every (query, key) pair; token 0 is CLS, patches row-major.

    Patch pair (i, j) uses ``(dy + rows-1) * (2*cols-1) + (dx + cols-1)`` with ``dy = row_i - row_j``,
    ``dx = col_i - col_j``; row 0 uses ``T-3`` (cls->patch), column 0 ``T-2`` (patch->cls) and
    [0, 0] ``T-1`` (cls->cls), T being the table length.
    """
    rows, cols = to_2tuple(grid_size)
    row_of = torch.arange(rows).repeat_interleave(cols)  # [N]
    col_of = torch.arange(cols).repeat(rows)  # [N]
    dy = row_of[:, None] - row_of[None, :] + rows - 1  # [N, N] in [0, 2*rows-2]
    dx = col_of[:, None] - col_of[None, :] + cols - 1  # [N, N] in [0, 2*cols-2]
    total = num_relative_distances((rows, cols))
    index = torch.empty(rows * cols + 1, rows * cols + 1, dtype=torch.long)
    index[1:, 1:] = dy * (2 * cols - 1) + dx
    index[0, :] = total - 3
    index[:, 0] = total - 2
    index[0, 0] = total - 1
    return index


class RelativePositionBias(nn.Module):
    """The learned table for one grid; ``forward(grid)`` returns the additive attention bias
    [heads, 1+N, 1+N]. Another grid than the one it was built for gets the geometric resize on the fly."""

    def __init__(self, grid_size: int | Sequence[int], num_heads: int):
        super().__init__()
        self.grid_size = to_2tuple(grid_size)
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distances(self.grid_size), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.grid_size), persistent=False)

    def forward(self, grid_size: Sequence[int] | None = None) -> torch.Tensor:
        grid = self.grid_size if grid_size is None else to_2tuple(grid_size)
        table = self.relative_position_bias_table  # [T, H]
        index = self.relative_position_index  # [1+N, 1+N]
        if grid != self.grid_size:
            table = resize_relative_position_bias_table(table, self.grid_size, grid)  # [T', H]
            index = relative_position_index(grid).to(table.device)
        length = grid[0] * grid[1] + 1
        bias = table[index.reshape(-1)].reshape(length, length, self.num_heads)  # [1+N, 1+N, H]
        return bias.permute(2, 0, 1)  # [H, 1+N, 1+N]

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}, num_heads={self.num_heads}"


# ---------------------------------------------------------------------------------------------
# Resizing the table for another grid (the official fine-tuning code's geometric cubic resize)
# ---------------------------------------------------------------------------------------------


def geometric_offsets(src_size: int, dst_size: int) -> tuple[list[float], list[float]]:
    """Where the reference puts the ``src_size`` old offsets and the ``dst_size`` new ones on one axis.

    The old offsets become ``0, +-1, +-(1+q), +-(1+q+q^2), ...``, q found by bisection in
    [1.01, 1.5] so that the outermost lands near ``dst_size // 2``; the new offsets are the integers
    ``-dst_size//2 .. dst_size//2``. Near offsets keep their spacing, far ones are stretched.
    """
    half = src_size // 2
    left, right = 1.01, 1.5
    ratio = (left + right) / 2.0
    while right - left > 1e-6:  # same bisection (and same final midpoint) as the reference
        ratio = (left + right) / 2.0
        reach = (1.0 - ratio**half) / (1.0 - ratio)  # 1 + q + ... + q^(half-1)
        if reach > dst_size // 2:
            right = ratio
        else:
            left = ratio
    distances, current = [], 1.0
    for step in range(half):
        distances.append(current)
        current += ratio ** (step + 1)
    source = [-d for d in reversed(distances)] + [0.0] + distances
    stop = dst_size // 2
    target = [float(k) for k in range(-stop, stop + 1)]
    return source, target


def cubic_spline_matrix(nodes: Sequence[float], targets: Sequence[float]) -> torch.Tensor:
    """[len(targets), len(nodes)] float64 W with ``W @ y`` = the not-a-knot cubic spline through
    (nodes, y) evaluated at targets (clamped to the node range, as FITPACK's evaluation does).

    Fewer than 4 nodes: the interpolating polynomial (constant, line, parabola), as scipy's
    CubicSpline does for not-a-knot ends.
    """
    x = torch.as_tensor(nodes, dtype=torch.float64)  # [n]
    t = torch.as_tensor(targets, dtype=torch.float64).clamp(x[0], x[-1])  # [m]
    n = x.numel()
    if n == 1:
        return torch.ones(t.numel(), 1, dtype=torch.float64)
    h = x[1:] - x[:-1]  # [n-1] interval widths
    # Second derivatives M = A^-1 B y: interior rows are the C2 continuity conditions, end rows
    # the not-a-knot conditions (third derivative continuous across x[1] and x[n-2]).
    lhs = torch.zeros(n, n, dtype=torch.float64)
    rhs = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):
        lhs[i, i - 1], lhs[i, i], lhs[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        rhs[i, i - 1], rhs[i, i], rhs[i, i + 1] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    if n == 2:  # a straight line: no curvature
        lhs[0, 0] = lhs[1, 1] = 1.0
    elif n == 3:  # a parabola: one constant second derivative
        lhs[0, 0], lhs[0, 1] = 1.0, -1.0
        lhs[2, 1], lhs[2, 2] = 1.0, -1.0
    else:
        lhs[0, 0], lhs[0, 1], lhs[0, 2] = -h[1], h[0] + h[1], -h[0]
        lhs[-1, -3], lhs[-1, -2], lhs[-1, -1] = -h[-1], h[-2] + h[-1], -h[-2]
    second = torch.linalg.solve(lhs, rhs)  # [n, n]: M = second @ y
    interval = (torch.searchsorted(x, t, right=True) - 1).clamp(0, n - 2)  # [m]
    width = h[interval]  # [m]
    b = (t - x[interval]) / width  # [m] position inside the interval, 0..1
    a = 1.0 - b
    rows = torch.arange(t.numel())
    values = torch.zeros(t.numel(), n, dtype=torch.float64)  # linear part
    values[rows, interval] += a
    values[rows, interval + 1] += b
    curvature = torch.zeros(t.numel(), n, dtype=torch.float64)  # weights of M
    curvature[rows, interval] += (a**3 - a) * width**2 / 6
    curvature[rows, interval + 1] += (b**3 - b) * width**2 / 6
    return values + curvature @ second


def axis_resize_matrix(src_size: int, dst_size: int) -> torch.Tensor:
    """[dst_size, src_size] float64: the reference's resize along one offset axis."""
    if src_size == dst_size:
        return torch.eye(src_size, dtype=torch.float64)
    return cubic_spline_matrix(*geometric_offsets(src_size, dst_size))


def resize_relative_position_bias_table(
    table: torch.Tensor, old_grid: int | Sequence[int], new_grid: int | Sequence[int]
) -> torch.Tensor:
    """[(2R-1)(2C-1)+3, H] for ``old_grid`` (R, C) -> the same layout for ``new_grid``.

    The offset part is resized per head with the reference's geometric-progression bicubic
    spline (rows and columns independently, so non-square grids work); the 3 CLS rows are
    carried over. The same grid returns ``table`` itself.
    """
    old_grid, new_grid = to_2tuple(old_grid), to_2tuple(new_grid)
    if table.ndim != 2 or table.shape[0] != num_relative_distances(old_grid):
        raise ValueError(
            f"A relative position bias table for a {old_grid[0]}x{old_grid[1]} grid has "
            f"{num_relative_distances(old_grid)} rows, got shape {list(table.shape)}. "
            "Pass the grid the table was trained on."
        )
    if old_grid == new_grid:
        return table
    (old_h, old_w), (new_h, new_w) = [(2 * r - 1, 2 * c - 1) for r, c in (old_grid, new_grid)]
    offsets = table[:-NUM_CLS_ROWS].reshape(old_h, old_w, -1).double()  # [2R-1, 2C-1, H]
    along_rows = axis_resize_matrix(old_h, new_h).to(table.device)  # [2R'-1, 2R-1]
    along_cols = axis_resize_matrix(old_w, new_w).to(table.device)  # [2C'-1, 2C-1]
    resized = torch.einsum("ai,ijh,bj->abh", along_rows, offsets, along_cols)  # [2R'-1, 2C'-1, H]
    resized = resized.reshape(new_h * new_w, -1).to(table.dtype)
    return torch.cat([resized, table[-NUM_CLS_ROWS:]], dim=0)


__all__ = [
    "RelativePositionBias", "num_relative_distances", "relative_position_index", "resize_relative_position_bias_table",
]
