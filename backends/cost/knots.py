"""Piecewise-linear tables and curves: the knots the table cost model's prices are read from."""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def default_knots(limit: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to limit, and limit itself."""
    knots = [1]
    while knots[-1] * 2 < limit:
        knots.append(knots[-1] * 2)
    if knots[-1] != limit:
        knots.append(limit)
    return tuple(knots)


def output_knots(n_seq_max: int) -> tuple[int, ...]:
    """Every output-row count 1..n_seq_max (up to 64, then doubling): decode cost is not smooth in the batch size."""
    knots = list(range(1, min(n_seq_max, 64) + 1))
    while knots[-1] < n_seq_max:
        knots.append(min(knots[-1] * 2, n_seq_max))
    return tuple(knots)


GPU_OUTPUT_KNOTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def sparse_output_knots(n_seq_max: int) -> tuple[int, ...]:
    """Output-row counts of a GPU context's table (GPU_OUTPUT_KNOTS up to n_seq_max, and n_seq_max): a GPU decode
    step grows smoothly with its batch, so the table is read between these counts instead of fitted at each
    one (measured on an H200: fitted at every count up to 64, the counts no calibration step had took their
    values from a few mixed steps' noise, 2.4 ms off at B = 6)."""
    knots = [k for k in GPU_OUTPUT_KNOTS if k < n_seq_max]
    return tuple(knots + [n_seq_max])


def interp_free(n: int, knots: tuple[int, ...], values: tuple[float, ...]) -> float:
    """The free table at n; past the last knot it grows at the (non-negative) slope of its upper half."""
    if n <= knots[-1]:
        return interp(n, knots, values)
    half = max(knots[0], knots[-1] // 2)
    slope = (values[-1] - interp(half, knots, values)) / (knots[-1] - half) if knots[-1] > half else 0.0
    return values[-1] + max(0.0, slope) * (n - knots[-1])


def interp_clamped(n: int, knots: tuple[int, ...], values: tuple[float, ...]) -> float:
    """A free table at n, flat past either end."""
    if n <= knots[0]:
        return values[0]
    if n >= knots[-1]:
        return values[-1]
    return interp(n, knots, values)


def interp(n: int, knots: tuple[int, ...], values: tuple[float, ...]) -> float:
    """The table at n: 0 for n <= 0, the first value up to the first knot, linear between knots and beyond
    the last (along the last segment)."""
    if n <= 0:
        return 0.0
    if n <= knots[0]:
        return values[0]
    j = min(bisect.bisect_left(knots, n), len(knots) - 1)
    lo, hi = knots[j - 1], knots[j]
    return values[j - 1] + (values[j] - values[j - 1]) * (n - lo) / (hi - lo)


def knot_value(x: float, knots: Sequence[tuple[float, float]]) -> float:
    """The value at x of a curve given by (x, value) knots in rising x: linear between them, flat beyond."""
    if x <= knots[0][0]:
        return knots[0][1]
    for (x0, v0), (x1, v1) in zip(knots, knots[1:], strict=False):
        if x <= x1:
            return v0 + (v1 - v0) * (x - x0) / (x1 - x0)
    return knots[-1][1]
