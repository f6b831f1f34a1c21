"""Price error of a real serving run's decode steps by whether their micro-batch shapes repeat the previous step's.

    python calib/experiments/serving_shapes.py [validate's workload and scheduler flags] [--compare NAME|FILE ...]

Runs `tokenstep validate`'s speed probe once on the real default model (the same fixed draw of
--probe-requests requests from the workload, re-timed at 0.7x the capacity the --profile predicts, under
--policy, in real time) and keeps its timed steps. Then it prices them in the order they ran with the
--profile and each --compare profile (grid prices, run factors set aside) and prints, for the decode-only
steps by batch size and micro-batch count, and for the steps with prompt tokens, measured / priced - 1:
the decode steps whose micro-batches repeat the previous step's (llama.cpp reuses its compute graph) apart
from those that follow another shape (it builds one). A profile that prices graph builds should read the
two alike; the level of every row moves with the machine's speed since calibration.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from backends.cost import load_cost_model  # noqa: E402
from backends.cost.table import TableCostModel, price_run  # noqa: E402
from calib import cli_validate as cv  # noqa: E402
from calib.measure import TimedBackend, estimate_capacity, retime, step_kind  # noqa: E402
from calib.probes import PROBE, probe_sample  # noqa: E402
from sim import cli  # noqa: E402
from sim.cli_common import UsageError, build_config  # noqa: E402
from sim.model import run_workload  # noqa: E402
from sim.real import close_instances, make_llama_instances  # noqa: E402


def _groups(samples: list, shape_of) -> dict:
    """Step index lists by (kind, micro-batches, previous shapes)."""
    out: dict = collections.defaultdict(list)
    prev = None
    for i, (plan, _t, _gap, idle) in enumerate(samples):
        shapes = tuple((u.n_tokens, u.n_seqs, u.n_outputs, u.graph) for u in shape_of(plan, idle).ubatches)
        if plan.chunks and plan.num_prefill_tokens + plan.num_pad_tokens == 0 and not idle:
            kind = step_kind(plan).split(" +")[0]
            passes = "1 micro-batch" if len(shapes) == 1 else f"{len(shapes)} micro-batches"
            out[(kind, passes, "same shapes" if shapes == prev else "other shapes before")].append(i)
        elif plan.num_prefill_tokens:
            out[("steps with prompt tokens", "", "")].append(i)
        prev = shapes
    return out


def main(argv: list[str] | None = None) -> int:
    parser, subs = cli.build_parser("validate")
    subs["validate"].add_argument("--compare", action="append", default=[], metavar="NAME|FILE",
                                  help="another profile to price the same steps with (repeatable)")
    args = parser.parse_args(["validate", *(sys.argv[1:] if argv is None else argv)])
    try:
        profile, name = cv._profile(args)
        workload = cv._workload(args)
        profiles = [(name, profile)] + [(c, load_cost_model(c)) for c in args.compare]
    except (UsageError, ValueError) as exc:  # CostModelError is a ValueError
        parser.error(str(exc))
    for n, p in profiles:
        if not isinstance(p, TableCostModel):
            parser.error(f"{n}: a table profile (from tokenstep calibrate) is needed")
    backends, real = make_llama_instances(args.model, 1, cv._llama_options(profile))
    try:
        config = build_config(args, base=real)
        cv._warm_up(backends[0], config)
        n = cv.PROBE_REQUESTS if args.probe_requests is None else args.probe_requests
        base = probe_sample(workload, max(1, n), args.seed)
        rate = PROBE["load"] * estimate_capacity(profile, base, args.policy, config)
        timed = TimedBackend(backends[0])
        run_workload(retime(base, rate, args.seed + 7919), args.policy, config, [timed], realtime=True)
    finally:
        close_instances(backends)
    samples = timed.samples
    grids = [dataclasses.replace(p, run_factor=1.0, prefill_run_factor=None) for _, p in profiles]
    prices = [price_run(g, [(s[0], s[3]) for s in samples]) for g in grids]
    print(f"{len(base.requests)} requests at {rate:.2f} req/s, policy {args.policy}: {len(samples)} steps; "
          "measured / priced - 1 (grid prices, run factors set aside) by")
    for k, (n, _) in enumerate(profiles):
        print(f"  [{k + 1}] {n}")
    heads = "".join(f" {f'[{k + 1}]':>8}" for k in range(len(profiles)))
    print(f"{'steps':<26} {'passes':<16} {'previous step':<20} {'n':>5}{heads}")
    groups = _groups(samples, grids[0].shape)
    decodes = [i for key, idx in groups.items() if key[0].startswith("decode") for i in idx]
    for (kind, passes, after), idx in [*sorted(groups.items()), (("all decode-only steps", "", ""), decodes)]:
        measured = sum(samples[i][1] for i in idx)
        cells = "".join(f" {(measured / sum(p[i] for i in idx) - 1) * 100:>+7.2f}%" for p in prices)
        print(f"{kind:<26} {passes:<16} {after:<20} {len(idx):>5}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
