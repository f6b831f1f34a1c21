"""Show a cost model's parameters: `tokenstep cost show NAME` (presets, bundled profiles, files, NAME:p=v,...).

`tokenstep cost list` names every preset and bundled profile. `cost show NAME --json` prints the model as a
profile file: save it, edit the numbers (a custom GPU: gpu, peak_tflops, hbm_tb_s, hbm_gib, num_gpus; a custom
model: num_params, num_layers, hidden_size, num_heads, num_kv_heads, head_dim, dtype_bytes; the engine:
mfu, mbu, overhead_s) and pass the file to --cost. docs/GPU.md describes the roofline schema.
"""

from __future__ import annotations

import argparse
import json
import sys

from backends.cost.base import SizesScheduler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """cost's flags."""
    parser.add_argument("action", choices=["show", "list"], help="show NAME's parameters, or list the names")
    parser.add_argument("name", nargs="?", metavar="NAME|FILE", help="cost model (NAME:param=value,... allowed)")
    parser.add_argument("--json", action="store_true", help="print the model as a profile file (JSON)")


def _scalar_rows(params: dict) -> list[tuple[str, str]]:
    rows = []
    for key, value in params.items():
        if isinstance(value, (list, tuple, dict)):
            size = len(value)
            rows.append((key, f"[{size} values]" if size > 6 else json.dumps(value)))
        else:
            rows.append((key, f"{value:g}" if isinstance(value, float) else str(value)))
    return rows


def run(args: argparse.Namespace) -> int:
    """Print the names, or one model's description and parameters."""
    from backends.cost import known_cost_models, load_cost_model

    if args.action == "list":
        for name in known_cost_models():
            print(name)
        return 0
    if not args.name:
        raise ValueError("cost show needs a NAME (see `tokenstep cost list`) or a profile file")
    model = load_cost_model(args.name)
    data = model.to_dict()
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    print(model.describe())
    print(f"kind: {data['kind']}")
    rows = _scalar_rows(data["params"])
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if isinstance(model, SizesScheduler):
        print("scheduler capacity: " + ", ".join(f"{k}={v}" for k, v in model.capacity().items()))
    source = (data.get("meta") or {}).get("source") or (data.get("meta") or {}).get("note")
    if source:
        print(f"source: {source}")
    return 0
