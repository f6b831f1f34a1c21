"""Executors side by side: a 40-configuration sweep and a 12-configuration capacity search under serial, local:2
and ray, their per-task overhead, and a projection of a 1,000-configuration study on 64 cores.

    python benchmarks/executors.py            # the full benchmark (minutes: run it on an idle machine)
    python benchmarks/executors.py --quick    # a tiny version that checks the script works

Each study runs as a user runs it: the `tokenstep` command in a subprocess (interpreter start, imports, trace
read, pool or Ray start-up and the result files included), timed by its wall clock. The executors take turns
round by round (--rounds; the order rotates each round), and every run's results must be identical to serial's
(the --json document apart from out_dir). Studies:

- sweep: the bundled workload (the Azure conversation slice at length_scale 0.1 with a 32-token prefix from 4
  groups) at 10 rates x 4 policies = 40 runs;
- capacity: the full Azure conversation trace (../shared/traces/azure2023) on the h100-llama3-8b preset, 4
  policies x max_num_seqs 64,128,256 = 12 configurations, each one's bisection in order.

Per-task overhead: each executor (sim.executor, in this process) runs no-op tasks carrying a real study's
payload: start-up = making it and running its first 2 tasks; per task = the wall of 200 more on it / 200.
The projection takes the measured per-task times of the serial run (task_times.json), repeats them to 1,000 tasks, and
schedules them greedily over 64 workers (in submission order, as a pool hands them out), adding each executor's
start-up, each worker's set-up (its first task's time over serial's: the context built and the trace read
once per worker) and per-task overhead.
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "sim" / "data" / "azure_conv_slice.csv"
AZURE_CONV = ROOT.parent / "shared" / "traces" / "azure2023" / "AzureLLMInferenceTrace_conv.csv"
EXECUTORS = ("serial", "local:2", "ray")
POLICIES = "static,continuous,chunked,continuous+noprefix"


def sweep_argv(quick: bool) -> list[str]:
    """40 runs of the bundled workload (quick: 4 runs of 40 requests)."""
    rates = "1,2" if quick else "0.5,1,1.5,2,2.5,3,3.5,4,4.5,5"
    argv = ["sweep", "--trace", str(BUNDLED), "--length-scale", "0.1", "--shared-prefix", "32",
            "--prefix-groups", "4", "--rates", rates, "--policies", "static,continuous" if quick else POLICIES]
    return argv + (["--limit", "40"] if quick else [])


def capacity_argv(quick: bool) -> list[str]:
    """4 policies x 3 max_num_seqs on the Azure conversation trace (quick: 2 x 2 on its first 300 requests)."""
    argv = ["capacity", "--trace", str(AZURE_CONV), "--cost", "h100-llama3-8b", "--slo", "ttft=2,tpot=0.1",
            "--policies", "continuous,chunked" if quick else POLICIES,
            "--param", "max_num_seqs=64,128" if quick else "max_num_seqs=64,128,256", "--rate", "4"]
    return argv + (["--limit", "300", "--tolerance", "0.2"] if quick else [])


def run_study(argv: list[str], executor: str, out: Path) -> dict:
    """One `tokenstep` run in a subprocess: its wall time, --json document and task_times.json."""
    cmd = [sys.executable, "-m", "sim.cli", *argv, "--executor", executor, "--json", "--no-plots", "--quiet",
           "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    doc = json.loads(proc.stdout)
    doc.pop("out_dir", None)
    return {"wall_s": wall_s, "doc": doc, "times": json.loads((out / "task_times.json").read_text())}


def _noop(_payload) -> None:
    return None


def dispatch_overhead(executor_text: str, num_tasks: int, payload) -> dict:
    """Start-up (making the executor and its first 2 no-op tasks) and per-task overhead (a further num_tasks
    no-op tasks on the started executor, each carrying payload)."""
    from sim.executor import Task, make_executor

    start = time.perf_counter()
    executor = make_executor(executor_text)
    try:
        executor.map(_noop, [Task(f"task {i}", (payload,)) for i in range(2)])
        startup = time.perf_counter() - start
        start = time.perf_counter()
        executor.map(_noop, [Task(f"task {i}", (payload,)) for i in range(num_tasks)])
        per_task = (time.perf_counter() - start) / num_tasks
    finally:
        executor.close()
    return {"startup_s": startup, "per_task_s": per_task}


def makespan(task_s: list[float], num_tasks: int, workers: int, per_task_s: float) -> float:
    """Greedy list scheduling of num_tasks tasks (the measured times repeated) over workers, in order."""
    free = [0.0] * workers
    for i in range(num_tasks):
        t = heapq.heappop(free)
        heapq.heappush(free, t + task_s[i % len(task_s)] + per_task_s)
    return max(free)


def worker_setup_s(times: dict, serial_times: dict) -> float:
    """Mean extra time of each worker's first task over the same task in serial (the worker's context and trace
    read once: serial reuses the command's own)."""
    serial = [t["task_s"] for t in serial_times["tasks"]]
    first: dict[str, int] = {}
    for i, t in enumerate(times["tasks"]):  # handed out in submission order: a worker's lowest index came first
        first.setdefault(t["worker"], i)
    extra = [times["tasks"][i]["task_s"] - serial[i] for i in first.values()]
    return max(0.0, statistics.mean(extra)) if extra else 0.0


def study_payload():
    """A real study's task payload (the sweep's Study), so dispatch carries what a task carries."""
    from sim.cli import build_parser
    from sim.study import make_study

    parser, _ = build_parser("sweep")
    return make_study(parser.parse_args(sweep_argv(True)), "sweep")


def main() -> int:
    """Run the studies under each executor, check identical results, print ratios, overheads and the projection."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny studies: check that the script works")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every executor (default 2; quick 1)")
    parser.add_argument("--executors", default=",".join(EXECUTORS), help=f"default {','.join(EXECUTORS)}")
    parser.add_argument("--study-tasks", type=int, default=1000, help="tasks of the projected study (1000)")
    parser.add_argument("--cores", type=int, default=64, help="cores of the projected cluster (64)")
    args = parser.parse_args()
    executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    if "serial" not in executors:
        raise SystemExit("--executors must include serial: results and ratios are checked against it")
    rounds = args.rounds or (1 if args.quick else 2)
    if not AZURE_CONV.is_file():
        raise SystemExit(f"{AZURE_CONV} is missing: the capacity study replays it")
    studies = {"sweep": sweep_argv(args.quick), "capacity": capacity_argv(args.quick)}
    results: dict = {name: {e: [] for e in executors} for name in studies}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = executors[r % len(executors):] + executors[:r % len(executors)]
            for name, argv in studies.items():
                for e in order:
                    out = Path(tmp) / f"{name}-{e.replace(':', '_')}-{r}"
                    res = run_study(argv, e, out)
                    results[name][e].append(res)
                    print(f"round {r + 1}: {name:<8} {e:<8} {res['wall_s']:7.1f} s", file=sys.stderr, flush=True)
    for name in studies:
        base = results[name]["serial"][0]["doc"]
        for e in executors:
            for res in results[name][e]:
                if res["doc"] != base:
                    raise SystemExit(f"{name} under {e}: results differ from serial's")
    print(f"identical results under {', '.join(executors)} ({rounds} round(s))\n")
    print(f"{'study':<9} {'tasks':>5} " + " ".join(f"{e + ' s':>11}" for e in executors)
          + " " + " ".join(f"{'x ' + e:>10}" for e in executors if e != "serial"))
    medians = {}
    for name in studies:
        med = {e: statistics.median(r["wall_s"] for r in results[name][e]) for e in executors}
        medians[name] = med
        n = len(results[name]["serial"][0]["times"]["tasks"])
        print(f"{name:<9} {n:>5} " + " ".join(f"{med[e]:>11.1f}" for e in executors) + " "
              + " ".join(f"{med['serial'] / med[e]:>9.2f}x" for e in executors if e != "serial"))
    print("wall of the whole command (median of rounds); x = serial / executor\n")
    payload = study_payload()
    over = {e: dispatch_overhead(e, 20 if args.quick else 200, payload) for e in executors}
    print(f"{'executor':<9} {'start-up s':>10} {'per task ms':>12}")
    for e in executors:
        print(f"{e:<9} {over[e]['startup_s']:>10.2f} {over[e]['per_task_s'] * 1e3:>12.3f}")
    print("no-op tasks carrying a sweep's payload: start-up = making the executor and running its first 2; per task "
          "= the wall of 200 more on it / 200\n")
    print(f"projection: {args.study_tasks} tasks on {args.cores} cores, from the serial run's per-task times")
    for name in studies:
        task_s = [t["task_s"] for t in results[name]["serial"][0]["times"]["tasks"]]
        serial_s = sum(task_s[i % len(task_s)] for i in range(args.study_tasks))
        print(f"  {name}: per task mean {statistics.mean(task_s):.2f} s, max {max(task_s):.2f} s; "
              f"one core {serial_s / 60:.1f} min")
        for e in executors:
            if e == "serial":
                continue
            o = over[e]
            setup = worker_setup_s(results[name][e][0]["times"], results[name]["serial"][0]["times"])
            span = o["startup_s"] + setup + makespan(task_s, args.study_tasks, args.cores, o["per_task_s"])
            where = f"one {args.cores}-core machine" if e.startswith("local") else "a cluster"
            print(f"    {e:<8} ({where}) {span / 60:6.2f} min ({serial_s / span:5.1f}x, "
                  f"{100 * serial_s / span / args.cores:3.0f} % of {args.cores} cores; start-up "
                  f"{o['startup_s']:.1f} s, each worker's set-up {setup:.1f} s)")
    print("a cluster adds each task's network round trip (about a millisecond inside one data centre) and reads the "
          "trace on every node (a shared file system, or Ray's runtime_env working_dir)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
