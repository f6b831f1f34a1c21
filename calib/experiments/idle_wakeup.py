"""What the first step after an idle wait costs, by the length of the wait, on the real backend.

    python calib/experiments/idle_wakeup.py [--idles 0,0.05,0.25,1,3] [--repeats 6] [--prompt 64]

calib.probes.probe_wakeup, as `validate` runs it, with the waits, repeats and prompt length given: one prompt
of --prompt tokens is prefilled after the engine has waited --idles seconds with nothing to do (time.sleep, as
the real-time driver waits for an arrival), each wait --repeats times in a shuffled order; a second prompt right
after the first, without a wait, gives the no-idle time of the same shape. Prints the
median of each, the median excess over no-idle, and the profile's price with and without its idle term.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from backends.cost import load_cost_model  # noqa: E402
from calib.probes import probe_wakeup  # noqa: E402
from scheduler.messages import ScheduledChunk, StepPlan  # noqa: E402
from sim.real import close_instances, make_llama_instances  # noqa: E402


def main() -> int:
    """Time, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idles", default="0,0.05,0.25,1,3")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--profile", default="cpu-gemma3-270m")
    args = ap.parse_args()
    idles = [float(x) for x in args.idles.split(",")]
    backends, config = make_llama_instances(None, 1)
    profile = load_cost_model(args.profile)
    b = backends[0]
    try:
        probe = probe_wakeup(b, config, 0, lambda _text: None, idles, args.repeats, args.prompt)
        plan = StepPlan(0, 0.0, (ScheduledChunk("r", 0, 0, tuple(range(args.prompt)), True),))
        base = profile.step_time_s(plan)
        print(f"prompt {args.prompt} tokens, {args.repeats} repeats per wait, profile {args.profile}: price "
              f"{base * 1e3:.1f} ms without its idle term, {(base + profile.idle_wakeup_s) * 1e3:.1f} ms with it")
        print(f"{'idle s':>7} {'after ms':>9} {'next ms':>8} {'excess ms':>10} {'excess/price':>13}")
        for idle, pairs in probe["times_s"]:
            a = np.array([x for x, _ in pairs]) * 1e3
            r = np.array([y for _, y in pairs]) * 1e3
            ex = np.median(a - r)
            print(f"{idle:>7g} {np.median(a):>9.1f} {np.median(r):>8.1f} {ex:>+10.1f} "
                  f"{ex / (base * 1e3) * 100:>+12.1f}%")
    finally:
        close_instances(backends)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
