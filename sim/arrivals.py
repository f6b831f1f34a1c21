"""Arrival processes: seeded arrival times in seconds for synthetic workloads.

Every process is a function ``fn(rng, num_requests, rate, **params)`` returning a
non-decreasing float64 array of ``num_requests`` arrival times. Each process is
observed from t=0, so the first arrival lands at the first gap, not at 0 (a
Poisson process started at 0 has no event at 0). Gaps are never clamped: a
clamped exponential is not exponential (Vidur's 3/rate clamp runs ~5% fast).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np

ArrivalFn = Callable[..., np.ndarray]


def check_positive(name: str, value: float) -> float:
    """Return value as float, or raise ValueError naming the parameter."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number; expected a positive float") from None
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0")
    return x


def _check_count(num_requests: int) -> int:
    """Return num_requests, or raise ValueError if it is not a non-negative int."""
    if isinstance(num_requests, bool) or not isinstance(num_requests, (int, np.integer)) or num_requests < 0:
        raise ValueError(f"num_requests={num_requests!r} must be an int >= 0")
    return int(num_requests)


def poisson(rng: np.random.Generator, num_requests: int, rate: float) -> np.ndarray:
    """Poisson process: exponential gaps with mean 1/rate (CV 1), never clamped."""
    n = _check_count(num_requests)
    rate = check_positive("rate", rate)
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


def gamma(
    rng: np.random.Generator,
    num_requests: int,
    rate: float,
    cv: float | None = None,
    burstiness: float | None = None,
) -> np.ndarray:
    """Gamma renewal process: mean gap 1/rate, gap CV `cv` (or vLLM's burstiness = 1/cv^2)."""
    n = _check_count(num_requests)
    rate = check_positive("rate", rate)
    if cv is None and burstiness is None:
        raise ValueError("gamma arrivals need cv (gap coefficient of variation) or burstiness (= 1/cv^2)")
    if cv is not None:
        cv = check_positive("cv", cv)
        shape = 1.0 / (cv * cv)
        if burstiness is not None and not math.isclose(check_positive("burstiness", burstiness), shape):
            raise ValueError(f"cv={cv} and burstiness={burstiness} disagree (burstiness must be 1/cv^2); give one")
    else:
        shape = check_positive("burstiness", burstiness)
    # scale chosen so that the mean gap shape*scale is exactly 1/rate
    return np.cumsum(rng.gamma(shape, 1.0 / (rate * shape), size=n))


def constant(rng: np.random.Generator, num_requests: int, rate: float) -> np.ndarray:
    """Constant rate: one arrival every 1/rate seconds, no randomness."""
    n = _check_count(num_requests)
    rate = check_positive("rate", rate)
    return np.arange(1, n + 1, dtype=np.float64) / rate


def ramp(
    rng: np.random.Generator,
    num_requests: int,
    rate: float | None = None,
    rate_end: float | None = None,
    rate_start: float | None = None,
) -> np.ndarray:
    """Inhomogeneous Poisson whose rate goes linearly from rate_start (default: rate) to rate_end.

    The ramp lasts T = 2 n / (rate_start + rate_end), the time in which n
    arrivals are expected; sampled by time-rescaling (exact): unit-rate Poisson
    times E_i are mapped through the inverse of the cumulative rate
    L(t) = r0 t + (r1 - r0) t^2 / (2T). Arrivals that fall past T (about half
    the time the last few do) continue at rate_end.
    """
    n = _check_count(num_requests)
    if rate_start is None:
        if rate is None:
            raise ValueError("ramp arrivals need rate_start (or rate) and rate_end")
        rate_start = rate
    elif rate is not None and not math.isclose(float(rate), float(rate_start)):
        raise ValueError(f"rate={rate} and rate_start={rate_start} disagree; give one of them")
    if rate_end is None:
        raise ValueError("ramp arrivals need rate_end (the rate reached after the expected n arrivals)")
    r1 = check_positive("rate_end", rate_end)
    r0 = float(rate_start)
    if not math.isfinite(r0) or r0 < 0:
        raise ValueError(f"rate_start={rate_start!r} must be a finite number >= 0")
    if n == 0:
        return np.zeros(0)
    horizon = 2.0 * n / (r0 + r1)
    slope = (r1 - r0) / horizon
    e = np.cumsum(rng.exponential(1.0, size=n))
    inside = e <= n  # L(horizon) == n
    ei = e[inside]
    # 2E / (r0 + sqrt(r0^2 + 2 slope E)) is the root of L(t) = E without cancellation when slope ~ 0
    t_in = 2.0 * ei / (r0 + np.sqrt(np.maximum(r0 * r0 + 2.0 * slope * ei, 0.0)))
    t_out = horizon + (e[~inside] - n) / r1
    return np.concatenate([t_in, t_out])


def burst(
    rng: np.random.Generator,
    num_requests: int,
    rate: float,
    burst_factor: float = 4.0,
    on_s: float = 5.0,
    off_s: float = 15.0,
) -> np.ndarray:
    """On/off bursts: Poisson at rate*burst_factor for on_s seconds, then off_s seconds with no arrivals.

    The long-run mean rate is rate * burst_factor * on_s / (on_s + off_s); the
    defaults (4x for 5 s, quiet for 15 s) keep it equal to rate. The first burst
    starts at t=0. Sampled exactly: a Poisson process on the "on" clock is
    mapped to wall time by inserting off_s after every on_s of on-time.
    """
    n = _check_count(num_requests)
    rate = check_positive("rate", rate)
    factor = check_positive("burst_factor", burst_factor)
    on = check_positive("on_s", on_s)
    off = float(off_s)
    if not math.isfinite(off) or off < 0:
        raise ValueError(f"off_s={off_s!r} must be a finite number >= 0")
    on_clock = np.cumsum(rng.exponential(1.0 / (rate * factor), size=n))
    periods = np.floor(on_clock / on)
    return on_clock + periods * off


ARRIVALS: dict[str, ArrivalFn] = {
    "poisson": poisson,
    "gamma": gamma,
    "constant": constant,
    "ramp": ramp,
    "burst": burst,
}

ARRIVAL_DESCRIPTIONS: dict[str, str] = {
    name: (fn.__doc__ or "").strip().splitlines()[0] for name, fn in ARRIVALS.items()
}


def generate_arrivals(
    name: str, rng: np.random.Generator, num_requests: int, rate: float | None, **params
) -> np.ndarray:
    """Arrival times from the process named `name`, rejecting unknown parameters with ValueError."""
    fn = ARRIVALS.get(name)
    if fn is None:
        known = ", ".join(f"{k} ({v})" for k, v in ARRIVAL_DESCRIPTIONS.items())
        raise ValueError(f"unknown arrival process {name!r}; known: {known}")
    accepted = set(inspect.signature(fn).parameters) - {"rng", "num_requests"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(
            f"arrival process {name!r} does not take {', '.join(unknown)}; "
            f"it takes {', '.join(sorted(accepted))}"
        )
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed))")
    return fn(rng, num_requests, rate, **params)
