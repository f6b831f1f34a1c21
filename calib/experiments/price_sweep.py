"""Re-predict a validation load with the run factors set by hand: how a statistic's error moves with step prices.

    python calib/experiments/price_sweep.py DIR [--load N] [--decode F1,F2] [--prompt F1,F2,...] [--profile NAME|FILE]
                                     -- VALIDATE_WORKLOAD_FLAGS

DIR is a `tokenstep validate --out` folder; its validation.json gives the load's rate, policy and measured
summary. The workload flags after `--` must be the ones that validate run was given (e.g. `--trace FILE
--limit 1000 --length-scale 0.1 --shared-prefix 32 --prefix-groups 4 --policy chunked
--max-num-batched-tokens 128`): the script rebuilds the same workload and scheduler limits (the real context's:
16 slots of 512 tokens, 512 KV blocks of 16) and prints, for each decode-only x prompt-step factor pair, the
relative error of TTFT, TPOT and E2E (mean, p90, p99) against the measured run. It runs no model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from backends.cost import load_cost_model  # noqa: E402
from backends.cost.table import TableCostModel  # noqa: E402
from calib.cli_validate import _workload  # noqa: E402
from calib.validate import predict, rel_errors, retime  # noqa: E402
from scheduler import SchedulerConfig  # noqa: E402
from sim.cli import build_parser  # noqa: E402
from sim.metrics import summarize  # noqa: E402

REAL_CONTEXT = {"max_num_seqs": 16, "max_model_len": 512, "num_kv_blocks": 512, "block_size": 16}


def factors(text: str, flag: str, ap: argparse.ArgumentParser) -> list[float]:
    try:
        out = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ap.error(f"{flag}: comma-separated numbers expected, got {text!r}")
    if not out or any(not 0.5 <= v <= 2.0 for v in out):
        ap.error(f"{flag}: each factor must be in [0.5, 2], got {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="a tokenstep validate --out folder")
    ap.add_argument("--load", type=int, default=1, help="which load of the folder (1 = the lightest; default 1)")
    ap.add_argument("--decode", default=None, help="decode-only factors (default: the load's probe factor)")
    ap.add_argument("--prompt", default=None, help="prompt-step factors (default: the load's probe factor)")
    ap.add_argument("--profile", default="cpu-gemma3-270m", help="the profile validate used (default: bundled)")
    args = ap.parse_args(own)
    path = os.path.join(args.dir, "validation.json")
    try:
        with open(path, encoding="utf-8") as fh:
            loads = json.load(fh)["loads"]
    except (OSError, ValueError, KeyError) as exc:
        ap.error(f"{path}: not a validate result ({exc})")
    if not 1 <= args.load <= len(loads):
        ap.error(f"--load must be 1..{len(loads)} for {path}")
    load = loads[args.load - 1]
    profile = load_cost_model(args.profile)
    if not isinstance(profile, TableCostModel):
        ap.error(f"--profile {args.profile}: run factors belong to table profiles")
    probe = load.get("speed_probe") or {}
    decode = factors(args.decode, "--decode", ap) if args.decode else [probe.get("run_factor", profile.run_factor)]
    prompt = (factors(args.prompt, "--prompt", ap) if args.prompt
              else [probe.get("prefill_run_factor", profile.factor(True))])
    parser, _ = build_parser()
    vargs = parser.parse_args(["validate", *rest, "--quiet"])
    policy = vargs.policy
    if policy != load["policy"].split()[0]:
        ap.error(f"the workload flags give policy {policy!r}, the load ran {load['policy']!r}: pass the same flags")
    workload = retime(_workload(vargs), load["rate"], vargs.seed)
    config = SchedulerConfig(**REAL_CONTEXT, max_num_batched_tokens=vargs.max_num_batched_tokens or 512)
    print(f"{path} load {args.load}: {load['rate']:.3g} req/s, policy {load['policy']}; relative error vs measured")
    print(f"{'decode':>7} {'prompt':>7} | " + " ".join(f"{k[:4]} {s:>4}" for k in ("ttft_s", "tpot_s", "e2e_s")
                                                         for s in ("mean", "p90", "p99")))
    for d in decode:
        for p in prompt:
            model = dataclasses.replace(profile, run_factor=d, prefill_run_factor=p)
            r = rel_errors(load["measured"], summarize(predict(workload, policy, config, model, 1)))
            print(f"{d:>7.3f} {p:>7.3f} | " + " ".join(f"{r[k][s] * 100:>+9.1f}" for k in ("ttft_s", "tpot_s", "e2e_s")
                                                         for s in ("mean", "p90", "p99")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
