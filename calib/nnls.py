"""Non-negative least squares (Lawson-Hanson), for fitting cost tables: every price is >= 0."""

from __future__ import annotations

import numpy as np

from backends.cost.base import CostModelError


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Solve min ||a x - b|| subject to x >= 0 (Lawson-Hanson active set)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.ndim != 2 or b.shape != (a.shape[0],):
        raise CostModelError(
            f"nnls needs a 2-D matrix and a matching vector, got shapes {a.shape} and {b.shape}"
        )
    m, n = a.shape
    max_iter = 3 * n + 10 if max_iter is None else max_iter
    tol = 10 * np.finfo(float).eps * np.abs(a).sum(axis=0).max(initial=0.0) * max(m, n)
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(max_iter):
        w = a.T @ (b - a @ x)
        if passive.all() or w[~passive].max() <= tol:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                x = z
                break
            # Step from x towards z only as far as the first coefficient that hits zero.
            bad = passive & (z <= tol)
            alpha = np.min(x[bad] / np.maximum(x[bad] - z[bad], np.finfo(float).tiny))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x
