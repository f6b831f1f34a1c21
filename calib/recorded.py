"""Judge a profile against a recorded validation: the real runs stay as they were measured, the simulator reruns.

`tokenstep validate --recorded DIR --profile P` reads DIR/validation.json (each load's measured statistics, the
repeats' spread) and each load folder's summary.json (rate, seed, policy, scheduler limits, workload), rebuilds
the load's workload from the same workload flags, predicts it with P, and judges it as validate does. A profile
calibrated on a GPU can so be refitted and re-checked on any machine, against the GPU's own runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from calib.judge import judge, misses, rel_errors
from calib.measure import predict, retime
from calib.validate_report import measured_vs_predicted
from scheduler import SchedulerConfig
from sim.cli_common import UsageError
from sim.metrics import summarize


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: not found; --recorded takes a folder written by `tokenstep validate`") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable validation file ({exc}); rerun `tokenstep validate`") from None


def load_folders(root: Path, n: int) -> list[Path]:
    """The n per-load folders (load1-..., load2-...) of a validate result folder, in order."""
    folders = []
    for i in range(1, n + 1):
        found = sorted(root.glob(f"load{i}-*"))
        if not found:
            raise UsageError(f"{root}: no folder load{i}-* for load {i} of validation.json; give the whole folder "
                             "`tokenstep validate` wrote")
        folders.append(found[0])
    return folders


def rejudge(root: Path, workload: Any, profile: Any, instances: int = 1, router: str = "least_outstanding"
            ) -> list[dict]:
    """Each recorded load with a new prediction: {"rate", "policy", "measured", "predicted", "rel_error",
    "repeat_spread", "repeats", "verdict", "misses"}. workload: the unretimed workload the recording used."""
    doc = _read(root / "validation.json")
    loads = doc.get("loads") or []
    if not loads:
        raise UsageError(f"{root / 'validation.json'}: no loads recorded")
    out = []
    for i, (ld, folder) in enumerate(zip(loads, load_folders(root, len(loads)), strict=True)):
        cfg = _read(folder / "summary.json").get("config") or {}
        try:
            rate, seed, policy, sched = float(cfg["rate"]), int(cfg["seed"]), cfg["policy"], dict(cfg["scheduler"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{folder / 'summary.json'}: config lacks {exc} (rate, seed, policy, scheduler); "
                             "rerun `tokenstep validate`") from None
        sched["eos_token_ids"] = tuple(sched.get("eos_token_ids") or ())
        w = retime(workload, rate, seed)
        recorded = (cfg.get("workload") or {}).get("source")
        if recorded is not None and json.loads(json.dumps(w.source)) != recorded:
            raise UsageError(f"{folder / 'summary.json'}: load {i + 1} was recorded on another workload than these "
                             f"flags give ({(cfg.get('workload') or {}).get('description', '?')[:120]}...); give "
                             "the workload flags the recording used")
        predicted = summarize(predict(w, policy, SchedulerConfig(**sched), profile, instances, router))
        rel = rel_errors(ld["measured"], predicted)
        spread, repeats = ld.get("repeat_spread"), int(ld.get("repeats", 1))
        out.append({"rate": rate, "policy": policy, "measured": ld["measured"], "predicted": predicted,
                    "rel_error": rel, "repeat_spread": spread, "repeats": repeats,
                    "verdict": judge(rel, spread, repeats), "misses": misses(rel, spread, repeats)})
    return out


def format_rejudged(loads: list[dict], profile_name: str, root: Path) -> str:
    """Each load's measured-vs-predicted table, as validate prints it, and its verdict line."""
    parts = [f"tokenstep validate: profile {profile_name} against the real runs recorded in {root}/"]
    for ld in loads:
        parts.append(f"load: {ld['rate']:.3g} req/s, policy {ld['policy']}, {ld['repeats']} real run(s) (recorded)")
        parts.extend(measured_vs_predicted(ld))
        parts.append("every cell passed" if not ld["misses"] else "missed " + ", ".join(ld["misses"]))
        parts.append("")
    return "\n".join(parts).rstrip()
