"""Fit a roofline's efficiencies and overhead to a per-request log of any serving engine.

A log is JSON lines, one finished request each: when it arrived, its prompt and output lengths, its time to
first token and its end-to-end latency (what `tokenstep bench` writes; vLLM-style names and milliseconds are
accepted too, see LOG_FIELDS). The fit replays the log's arrivals and lengths through the simulator with a
roofline cost model and searches mfu, mbu and overhead_s (Nelder-Mead over their logarithms) for the values
whose per-request TTFT and E2E latencies match the log's best (the mean squared log ratio). The other roofline
parameters (GPU, model shape) stay as given: they are datasheet facts, the three fitted ones are the engine's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from backends.cost.roofline import RooflineCostModel
from backends.synthetic import SyntheticBackend
from scheduler import SchedulerConfig
from sim.model import run_workload
from sim.workload import Workload, WorkloadRequest

# field -> (name in the log, factor to seconds or tokens), the first present wins
LOG_FIELDS: dict[str, tuple[tuple[str, float], ...]] = {
    "arrival_s": (("arrival_s", 1.0), ("arrival_ms", 1e-3), ("arrival_time", 1.0), ("timestamp", 1.0)),
    "num_prompt_tokens": (("num_prompt_tokens", 1), ("prompt_tokens", 1), ("prompt_len", 1), ("input_len", 1),
                          ("input_tokens", 1)),
    "num_output_tokens": (("num_output_tokens", 1), ("output_tokens", 1), ("completion_tokens", 1),
                          ("output_len", 1)),
    "ttft_s": (("ttft_s", 1.0), ("ttft_ms", 1e-3), ("ttft", 1.0)),
    "e2e_s": (("e2e_s", 1.0), ("e2el_s", 1.0), ("latency_s", 1.0), ("e2e_ms", 1e-3), ("e2el_ms", 1e-3),
              ("latency", 1.0)),
}
FIT_PARAMS = ("mfu", "mbu", "overhead_s")
_BOUNDS = {"mfu": (0.005, 1.0), "mbu": (0.005, 1.0), "overhead_s": (1e-6, 0.5)}


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    """One finished request of an engine's log, in seconds and tokens."""

    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    ttft_s: float
    e2e_s: float


@dataclass(frozen=True)
class LogFit:
    """The fitted roofline, its parameters, its errors on the fitted log, and the simulations it took."""

    model: RooflineCostModel
    params: dict
    errors: dict
    num_evals: int


def _field(obj: dict, key: str, where: str) -> float:
    for name, factor in LOG_FIELDS[key]:
        if name in obj:
            value = obj[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where}, field {name!r}: {value!r} is not a finite number")
            return value * factor
    names = ", ".join(n for n, _ in LOG_FIELDS[key])
    raise ValueError(f"{where}: no {key} field (one of {names})")


def read_request_log(path: str | Path) -> list[LoggedRequest]:
    """Parse a JSONL request log; errors name the line and the field. Failed requests (no TTFT) are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read request log {path}: {exc.strerror or exc}") from None
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected one JSON object per line")
        if obj.get("ttft_s", obj.get("ttft_ms", 0)) is None or obj.get("success") is False:
            continue
        r = LoggedRequest(*(_field(obj, k, where) for k in LOG_FIELDS))
        if r.num_prompt_tokens < 1 or r.num_output_tokens < 1 or r.ttft_s <= 0 or r.e2e_s < r.ttft_s:
            raise ValueError(f"{where}: needs prompt and output tokens >= 1 and 0 < ttft <= e2e, got {r}")
        out.append(LoggedRequest(r.arrival_s, int(r.num_prompt_tokens), int(r.num_output_tokens), r.ttft_s,
                                 r.e2e_s))
    if len(out) < 2:
        raise ValueError(f"{path}: fewer than 2 finished requests to fit")
    return sorted(out, key=lambda r: r.arrival_s)


def workload_from_log(requests: Sequence[LoggedRequest], seed: int = 0, vocab_size: int = 32000) -> Workload:
    """The log's arrivals (from 0) and lengths as a workload with distinct random prompts (no shared prefixes)."""
    rng = np.random.default_rng(seed)
    t0 = requests[0].arrival_s
    reqs = tuple(WorkloadRequest(f"log-{i}", r.arrival_s - t0,
                                 tuple(rng.integers(1000, vocab_size, r.num_prompt_tokens).tolist()),
                                 r.num_output_tokens) for i, r in enumerate(requests))
    return Workload(reqs, f"request log of {len(reqs)} requests", {"kind": "request_log"})


def simulate(model: RooflineCostModel, workload: Workload, policy: str, config: SchedulerConfig
             ) -> tuple[np.ndarray, np.ndarray]:
    """Per-request (TTFT, E2E) seconds of the workload replayed on the model, in workload order."""
    run = run_workload(workload, policy, config, [SyntheticBackend(model)])
    by_id = {r.request_id: r for r in run.records}
    recs = [by_id[r.request_id] for r in workload.requests]
    ttft = np.array([(r.first_token_s if r.first_token_s is not None else math.inf) - r.arrival_s for r in recs])
    e2e = np.array([(r.finish_s if r.finish_s is not None else math.inf) - r.arrival_s for r in recs])
    return ttft, e2e


def errors(pred: tuple[np.ndarray, np.ndarray], requests: Sequence[LoggedRequest]) -> dict:
    """Signed % errors of predicted over observed mean and p90 TTFT, TPOT and E2E."""
    obs_ttft = np.array([r.ttft_s for r in requests])
    obs_e2e = np.array([r.e2e_s for r in requests])
    outs = np.array([r.num_output_tokens for r in requests])
    multi = outs > 1
    obs_tpot = (obs_e2e - obs_ttft)[multi] / (outs[multi] - 1)
    pred_tpot = (pred[1] - pred[0])[multi] / (outs[multi] - 1)
    out = {}
    for name, p, o in (("ttft_s", pred[0], obs_ttft), ("tpot_s", pred_tpot, obs_tpot), ("e2e_s", pred[1], obs_e2e)):
        if len(o):
            out[f"{name} mean"] = float(100 * (p.mean() / o.mean() - 1))
            out[f"{name} p90"] = float(100 * (np.quantile(p, 0.9) / np.quantile(o, 0.9) - 1))
    return out


def _with(base: RooflineCostModel, x: np.ndarray) -> RooflineCostModel:
    vals = {n: float(min(max(math.exp(v), _BOUNDS[n][0]), _BOUNDS[n][1])) for n, v in zip(FIT_PARAMS, x, strict=True)}
    return replace(base, **vals)


def nelder_mead(f: Callable[[np.ndarray], float], x0: np.ndarray, step: float, max_evals: int,
                tol: float = 1e-4) -> tuple[np.ndarray, float, int]:
    """Minimise f from x0 (a simplex of size step); returns (best x, f(best), evaluations)."""
    n = len(x0)
    pts = [x0] + [x0 + step * np.eye(n)[i] for i in range(n)]
    vals = [f(p) for p in pts]
    evals = n + 1
    while evals < max_evals:
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[-1] - vals[0] < tol * (abs(vals[0]) + tol):
            break
        centroid = np.mean(pts[:-1], axis=0)
        xr = centroid + (centroid - pts[-1])
        fr = f(xr)
        evals += 1
        if fr < vals[0]:
            xe = centroid + 2 * (centroid - pts[-1])
            fe = f(xe)
            evals += 1
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (pts[-1] - centroid)
            fc = f(xc)
            evals += 1
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:  # shrink toward the best point
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
                evals += n
    best = int(np.argmin(vals))
    return pts[best], vals[best], evals


def fit_roofline(base: RooflineCostModel, requests: Sequence[LoggedRequest], policy: str = "continuous",
                 config: SchedulerConfig | None = None, max_evals: int = 300, seed: int = 0) -> LogFit:
    """The base roofline with mfu, mbu and overhead_s fitted so the simulator reproduces the log's latencies."""
    workload = workload_from_log(requests, seed)
    config = config or SchedulerConfig(**base.capacity())
    obs = np.log(np.array([[r.ttft_s, r.e2e_s] for r in requests]))

    def loss(x: np.ndarray) -> float:
        ttft, e2e = simulate(_with(base, x), workload, policy, config)
        pred = np.log(np.maximum(np.stack([ttft, e2e], axis=1), 1e-9))
        return float(np.mean((pred - obs) ** 2))

    x0 = np.log([getattr(base, n) for n in FIT_PARAMS])
    x, _, evals = nelder_mead(loss, x0, 0.4, max_evals, tol=1e-7)
    model = _with(base, x)
    params = {n: getattr(model, n) for n in FIT_PARAMS}
    model = replace(model, name=f"{base.name}-fitted",
                    meta={**base.meta, "fitted_from_log": {"requests": len(requests), "policy": policy, **params}})
    return LogFit(model, params, errors(simulate(model, workload, policy, config), requests), evals)


def predict_log(model: RooflineCostModel, requests: Sequence[LoggedRequest], policy: str = "continuous",
                config: SchedulerConfig | None = None, seed: int = 0) -> dict:
    """The model's % errors on another log (its mean and p90 TTFT, TPOT, E2E)."""
    config = config or SchedulerConfig(**model.capacity())
    return errors(simulate(model, workload_from_log(requests, seed), policy, config), requests)


def run_from_log(args) -> int:
    """`tokenstep calibrate --from-log FILE --cost ROOFLINE [--predict FILE ...]`: fit, write, report."""
    import sys

    from backends.cost import load_cost_model, save_cost_model

    base = load_cost_model(args.cost or "h200-llama3-8b")
    if not isinstance(base, RooflineCostModel):
        raise ValueError(f"--cost {args.cost!r} is a {type(base).__name__}; --from-log fits a roofline "
                         "(see `tokenstep cost show NAME`)")
    requests = read_request_log(args.from_log)
    fit = fit_roofline(base, requests, args.log_policy, seed=args.seed)
    out = Path(args.out) if args.out else Path("results") / f"{base.name}-fitted.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_cost_model(fit.model, out)
    doc = {"profile": str(out), "base": base.name, "policy": args.log_policy, "requests": len(requests),
           "params": fit.params, "simulations": fit.num_evals, "fit_errors_pct": fit.errors, "predictions": {}}
    for path in args.predict or []:
        doc["predictions"][path] = predict_log(fit.model, read_request_log(path), args.log_policy, seed=args.seed)
    if args.json:
        sys.stdout.write(json.dumps(doc) + "\n")
        return 0
    fitted = ", ".join(f"{k} {v:.4g}" for k, v in fit.params.items())
    print(f"fitted {base.name} to {len(requests)} requests of {args.from_log} ({args.log_policy}, "
          f"{fit.num_evals} simulations): {fitted}")
    for label, errs in [("on the fitted log", fit.errors)] + [(f"on {p}", e) for p, e in doc["predictions"].items()]:
        print(f"  {label}: " + ", ".join(f"{k} {v:+.1f}%" for k, v in errs.items()))
    print(f"profile written to {out}")
    return 0
