"""A cost model calibrated on measured steps by non-negative least squares (Vidur/DistServe style)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from backends.cost_base import (
    CostModelError,
    StepFeatures,
    check_params,
    features,
    floor_time,
)
from scheduler.messages import StepPlan

# One column per coefficient. llama.cpp runs a mixed step as one batch, so a mixed
# step is priced as one sum: one fixed cost, then per-token and per-attention terms.
FITTED_COLUMNS: tuple[tuple[str, Callable[[StepFeatures], int]], ...] = (
    ("step_s", lambda f: f.has_batch),  # graph build, weight reads, scheduling
    ("per_prefill_token_s", lambda f: f.num_prefill_tokens),  # matmuls per prompt token
    ("per_prefill_attention_s", lambda f: f.sum_sq_prefill_tokens),  # query x key pairs
    ("per_decode_seq_s", lambda f: f.num_decode_seqs),  # costlier than a prompt row
    ("per_context_token_s", lambda f: f.num_context_tokens),  # KV cells read
    ("per_seq_s", lambda f: f.num_seqs),  # logits row + sampling per chunk
    ("per_copied_token_s", lambda f: f.num_copied_tokens),  # llama_memory_seq_cp cells
    ("per_kv_op_s", lambda f: f.num_kv_ops),  # each seq_rm / seq_cp call
)
FITTED_PARAMS = tuple(name for name, _ in FITTED_COLUMNS)


def design_row(feats: StepFeatures) -> np.ndarray:
    """The feature vector of one step, in FITTED_COLUMNS order."""
    return np.array([float(get(feats)) for _, get in FITTED_COLUMNS])


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


@dataclass(frozen=True, slots=True)
class FittedCostModel:
    """t = step_s + per-token, attention, context, per-seq and KV-op terms, all coefficients >= 0."""

    step_s: float = 0.0
    per_prefill_token_s: float = 0.0
    per_prefill_attention_s: float = 0.0
    per_decode_seq_s: float = 0.0
    per_context_token_s: float = 0.0
    per_seq_s: float = 0.0
    per_copied_token_s: float = 0.0
    per_kv_op_s: float = 0.0
    name: str = "fitted"
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        check_params(
            "fitted",
            {n: getattr(self, n) for n in FITTED_PARAMS},
            FITTED_PARAMS,
            "FittedCostModel",
        )

    @property
    def coefficients(self) -> np.ndarray:
        """Coefficients in FITTED_COLUMNS order."""
        return np.array([getattr(self, n) for n in FITTED_PARAMS])

    def predict_s(self, feats: StepFeatures) -> float:
        """Seconds for a step with these features."""
        return floor_time(feats, float(design_row(feats) @ self.coefficients))

    def step_time_s(self, plan: StepPlan) -> float:
        """Seconds the plan's step takes (0 for an empty plan)."""
        return self.predict_s(features(plan))

    def to_dict(self) -> dict:
        """{"kind": "fitted", "params", "meta"}."""
        return {
            "kind": "fitted",
            "params": {n: getattr(self, n) for n in FITTED_PARAMS},
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(
        cls, params: object, meta: dict, name: str, source: str
    ) -> FittedCostModel:
        """Build from a JSON params object; source names the file in errors."""
        return cls(
            **check_params("fitted", params, FITTED_PARAMS, source),
            name=name,
            meta=meta,
        )

    def describe(self) -> str:
        """One line: the coefficients in ms/us, and the fit quality if known."""
        fit = self.meta.get("fit", {})
        quality = (
            f", fit n={fit['n']} MAPE {fit['mape']:.1f}%"
            if {"n", "mape"} <= set(fit)
            else ""
        )
        return (
            f"fitted '{self.name}': {self.step_s * 1e3:.2f} ms/step"
            f" + {self.per_prefill_token_s * 1e3:.3f} ms/prefill tok"
            f" + {self.per_prefill_attention_s * 1e9:.2f} ns/prefill q*k pair"
            f" + {self.per_decode_seq_s * 1e3:.3f} ms/decode seq"
            f" + {self.per_context_token_s * 1e6:.3f} us/context tok + {self.per_seq_s * 1e3:.3f} ms/seq"
            f" + {self.per_copied_token_s * 1e6:.3f} us/copied tok + {self.per_kv_op_s * 1e6:.1f} us/kv op{quality}"
        )

    @classmethod
    def fit(
        cls,
        samples: Sequence[tuple[StepFeatures, float]],
        name: str = "fitted",
        meta: dict | None = None,
    ) -> FittedCostModel:
        """Fit coefficients >= 0 minimising relative error over (features, measured seconds) samples."""
        feats, times = _check_samples(samples)
        x = np.stack([design_row(f) for f in feats])
        used = np.abs(x).max(axis=0) > 0
        if len(times) < int(used.sum()):
            raise CostModelError(
                f"fit needs at least {int(used.sum())} samples for the {int(used.sum())} features that vary, "
                f"got {len(times)}; record more steps"
            )
        # Dividing each row by its time makes the residual the relative error, so 20 ms
        # decode steps weigh as much as 2 s prefills; scaling columns keeps lstsq conditioned.
        a = x / times[:, None]
        scale = np.where(used, np.abs(a).max(axis=0), 1.0)
        coef = nnls(a / scale, np.ones(len(times))) / scale
        coef[~used] = 0.0
        model = cls(
            **dict(zip(FITTED_PARAMS, (float(c) for c in coef), strict=True)),
            name=name,
            meta=dict(meta or {}),
        )
        stats = evaluate(model, list(zip(feats, times.tolist(), strict=True)))
        return cls(
            **{n: getattr(model, n) for n in FITTED_PARAMS},
            name=name,
            meta={**model.meta, "fit": stats},
        )


def fit(
    samples: Sequence[tuple[StepFeatures, float]],
    name: str = "fitted",
    meta: dict | None = None,
) -> FittedCostModel:
    """Fit a FittedCostModel to (features, measured seconds) samples; see FittedCostModel.fit."""
    return FittedCostModel.fit(samples, name=name, meta=meta)


def evaluate(model, samples: Sequence[tuple[StepFeatures, float]]) -> dict:
    """Percent errors of a model on samples: {"mape", "max_abs_pct_error", "n"}."""
    feats, times = _check_samples(samples)
    pred = np.array([model.predict_s(f) for f in feats])
    pct = np.abs(pred - times) / times * 100.0
    return {
        "mape": float(pct.mean()),
        "max_abs_pct_error": float(pct.max()),
        "n": len(times),
    }


def _check_samples(
    samples: Sequence[tuple[StepFeatures, float]],
) -> tuple[list[StepFeatures], np.ndarray]:
    """Split samples into features and a positive time array, rejecting bad ones."""
    if len(samples) == 0:
        raise CostModelError("no samples: record at least a few measured steps first")
    feats, times = [], []
    for i, sample in enumerate(samples):
        try:
            f, t = sample
        except (TypeError, ValueError):
            raise CostModelError(
                f"sample {i} must be a (StepFeatures, seconds) pair, got {sample!r}"
            ) from None
        if not isinstance(f, StepFeatures):
            raise CostModelError(
                f"sample {i}: expected StepFeatures, got {type(f).__name__}; use features(plan)"
            )
        if (
            isinstance(t, bool)
            or not isinstance(t, (int, float))
            or not np.isfinite(t)
            or t <= 0
        ):
            raise CostModelError(
                f"sample {i}: measured time must be a finite number > 0 seconds, got {t!r}"
            )
        if f.is_empty:
            raise CostModelError(
                f"sample {i} is an empty step, which costs 0 by definition; drop it"
            )
        feats.append(f)
        times.append(float(t))
    return feats, np.array(times)
