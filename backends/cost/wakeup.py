"""The price of waking up: the first step after the engine idled costs extra, by how long it waited."""

from __future__ import annotations

from collections.abc import Sequence

from backends.cost.base import WakesAfterIdle
from backends.cost.knots import knot_value


def wakeup_curve(knots: Sequence[Sequence[float]]) -> tuple[tuple[float, float], ...]:
    """[idle seconds, extra seconds] pairs (a wake-up probe's knots, a profile's JSON) as an idle_wakeup_curve."""
    return tuple((float(a), float(b)) for a, b in knots)


def describe_wakeup(curve: Sequence[Sequence[float]]) -> str:
    """A wake-up curve for reports: "+1.2 ms after 0.1 s, +8.6 ms after 1 s"."""
    return ", ".join(f"+{e * 1e3:.1f} ms after {i:g} s" for i, e in curve)


def wakeup_from_curve(curve: Sequence[tuple[float, float]], idle_s: float) -> float:
    """Extra seconds of the first step after an idle wait of idle_s: linear between the curve's knots, from
    (0, 0) to the first, and the last knot's value beyond it (no measurement says how it grows further)."""
    return float(knot_value(max(idle_s, 0.0), ((0.0, 0.0), *curve)))


def wakeup_cost(model, idle_s: float | None) -> float:
    """A cost model's wake-up price for a step after idle_s seconds of idling (None: not known): from its
    idle_wakeup_curve when it has one and the wait is known, else its flat idle_wakeup_s."""
    if not isinstance(model, WakesAfterIdle):
        return 0.0
    curve = model.idle_wakeup_curve
    if curve and idle_s is not None:
        return wakeup_from_curve(curve, idle_s)
    return float(model.idle_wakeup_s)
