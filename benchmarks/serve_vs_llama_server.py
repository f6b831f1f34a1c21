"""tokenstep serve against llama.cpp's llama-server on the same model, slots, context and threads, through
`tokenstep bench`, alternating the two servers.

    python benchmarks/serve_vs_llama_server.py [--rounds 2] [--quick] [--llama-server PATH] [--out DIR]

Each round starts llama-server, runs the three workloads against it, stops it, then does the same with
tokenstep serve (one server at a time, so neither steals the other's cores), for --rounds rounds (at least 2
for figures). Both: gemma-3-270m Q4_K_M, 16 slots, 8192 cells of context, 2 threads, greedy sampling
(--temperature 0), token-id prompts on /v1/completions with forced output lengths.
- llama-server: `-np 16 -c 8192 -t 2 --no-repack` (this CPU advertises AMX, which faults in this VM);
- tokenstep serve: `--backend llama --max-num-seqs 16 --kv-tokens 8192 --threads 2`, policy continuous.
Workloads:
- main job: the bundled Azure slice, first 60 requests at time scale 0.4 (about 3.3 req/s, near what 2 cores
  serve), 32-token prefixes from 4 groups (compare --backend llama's main job);
- shared system prompt: 40 requests, Poisson 2 req/s, a 256-token system prompt shared by all, then 32 own
  tokens, 16 generated;
- saturated Poisson: 60 requests, Poisson 8 req/s (about twice what the machine serves), the synthetic defaults'
  lengths (prompt lognormal 90, output lognormal 18).
Prints every run, then one table of tokenstep / llama-server ratios of the medians over rounds: throughput,
TTFT p50 and p99, TPOT mean, E2E p99, and whether the targets are met (main job: throughput >= 1.0x and TTFT
p99 <= 0.5x; shared system prompt: TTFT p50 at least 1.5x better, <= 0.67x). --quick runs a few requests of
each, one round: an end-to-end check only, never figures. Timings mean something only on an otherwise idle
machine (docs/BENCHMARKS.md).
llama-server is built by ../shared/tools/build-llama-peers.sh into ~/.cache/llama-peers/bin (or $LLAMA_PEERS/bin).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SLOTS, CONTEXT, THREADS = 16, 8192, 2
WORKLOADS = {
    "main job": ["--limit", "60", "--time-scale", "0.4"],
    "shared system prompt": ["--num-requests", "40", "--rate", "2", "--prompt-len", "32", "--output-len", "16",
                             "--shared-prefix", "256", "--prefix-groups", "1"],
    "saturated Poisson": ["--num-requests", "60", "--rate", "8"],
}
QUICK = {"main job": ["--limit", "6", "--time-scale", "0.4"],
         "shared system prompt": ["--num-requests", "4", "--rate", "2", "--prompt-len", "32", "--output-len", "4",
                                  "--shared-prefix", "256", "--prefix-groups", "1"],
         "saturated Poisson": ["--num-requests", "6", "--rate", "8", "--output-len", "4"]}
# (label, vllm_result field, higher is better)
METRICS = (("throughput", "request_throughput", True), ("TTFT p50", "median_ttft_ms", False),
           ("TTFT p99", "p99_ttft_ms", False), ("TPOT mean", "mean_tpot_ms", False), ("E2E p99", "p99_e2el_ms", False))
READY_TIMEOUT_S = 300
# what tokenstep serve should reach: (workload, label, most (ratio <=) or least (ratio >=) allowed)
TARGETS = (("main job", "throughput", ">=", 1.0), ("main job", "TTFT p99", "<=", 0.5),
           ("shared system prompt", "TTFT p50", "<=", 1 / 1.5))


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_path(given: str | None) -> Path:
    """The llama-server binary: --llama-server, else where build-llama-peers.sh puts it."""
    path = Path(given) if given else Path(os.environ.get("LLAMA_PEERS", Path.home() / ".cache/llama-peers")) / "bin" \
        / "llama-server"
    if not path.is_file():
        raise SystemExit(f"no llama-server at {path}: build it with ../shared/tools/build-llama-peers.sh "
                         "or give --llama-server PATH")
    return path


def server_command(name: str, port: int, model: Path, binary: Path) -> list[str]:
    """The command line that starts one server."""
    if name == "llama-server":
        return [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(SLOTS),
                "-c", str(CONTEXT), "-t", str(THREADS), "--no-repack", "--no-webui"]
    return [sys.executable, "-m", "sim.cli", "serve", "--backend", "llama", "--model", str(model), "--port", str(port),
            "--max-num-seqs", str(SLOTS), "--kv-tokens", str(CONTEXT), "--threads", str(THREADS)]


class Server:
    """One server process, started and waited for, stopped with SIGTERM."""

    def __init__(self, name: str, model: Path, binary: Path, log_path: Path) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(server_command(name, self.port, model, binary), stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited with {self.proc.returncode} while starting; see {log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"{name} was not ready after {READY_TIMEOUT_S} s; see {log_path}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 60 s."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def bench(url: str, workload: list[str], out: Path) -> dict:
    """One `tokenstep bench` run; its vllm_result.json."""
    cmd = [sys.executable, "-m", "sim.cli", "bench", "--base-url", url, "--temperature", "0", "--out", str(out),
           "--quiet", "--no-plots", *workload]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"tokenstep bench exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return json.loads((out / "vllm_result.json").read_text())


def ratios(results: dict) -> dict[tuple[str, str], float | None]:
    """(workload, metric label) -> tokenstep / llama-server of the medians over rounds."""
    out = {}
    for workload, by_server in results.items():
        for label, field, _ in METRICS:
            ours = [r[field] for r in by_server["tokenstep serve"] if r[field] is not None]
            theirs = [r[field] for r in by_server["llama-server"] if r[field] is not None]
            ok = ours and theirs and statistics.median(theirs) != 0
            out[workload, label] = statistics.median(ours) / statistics.median(theirs) if ok else None
    return out


def ratio_table(results: dict) -> str:
    """tokenstep / llama-server of the medians over rounds, one row per workload, then the targets."""
    r = ratios(results)
    header = ["workload"] + [label for label, _, _ in METRICS]
    rows = [header]
    for workload in results:
        rows.append([workload] + ["-" if r[workload, label] is None else f"{r[workload, label]:.2f}x"
                                  for label, _, _ in METRICS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for workload, label, op, bound in TARGETS:
        value = r.get((workload, label))
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        shown = "-" if value is None else f"{value:.2f}x"
        lines.append(f"target: {workload} {label} {op} {bound:.2f}x: {shown}, {'met' if met else 'NOT met'}")
    return "\n".join(["tokenstep serve / llama-server (medians over rounds; throughput: higher is better, the "
                      "rest: lower is better)"] + lines)


def run_line(server: str, workload: str, rnd: int, r: dict) -> str:
    """One run's figures."""
    def ms(v):
        return "-" if v is None else f"{v:.0f} ms"

    return (f"round {rnd + 1} {server:<15} {workload:<21} {r['completed']:>3} ok {r['failed']:>2} failed  "
            f"{r['request_throughput'] or 0:.2f} req/s  TTFT p50 {ms(r['median_ttft_ms'])} p99 {ms(r['p99_ttft_ms'])}"
            f"  TPOT {ms(r['mean_tpot_ms'])}  E2E p99 {ms(r['p99_e2el_ms'])}")


def main() -> int:
    """Alternate the servers over the workloads; print every run and the ratio table."""
    # SIGTERM unwinds like Ctrl-C, so the server in use is stopped by its finally: block
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None, help="rounds of (llama-server, tokenstep serve); default 2")
    ap.add_argument("--quick", action="store_true", help="a few requests per workload, one round (a check only)")
    ap.add_argument("--llama-server", metavar="PATH", help="the llama-server binary")
    ap.add_argument("--only", choices=["llama-server", "tokenstep serve"], help="run one server only (a check)")
    ap.add_argument("--out", default="results/serve_vs_llama_server", metavar="DIR")
    args = ap.parse_args()
    from backends.models import DEFAULT_MODEL, resolve_model

    model = resolve_model(DEFAULT_MODEL)
    servers = [args.only] if args.only else ["llama-server", "tokenstep serve"]
    binary = llama_server_path(args.llama_server) if "llama-server" in servers else Path()
    rounds = args.rounds or (1 if args.quick else 2)
    workloads = QUICK if args.quick else WORKLOADS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {w: {s: [] for s in servers} for w in workloads}
    for rnd in range(rounds):
        for name in servers:
            tag = f"r{rnd + 1}-{name.replace(' ', '_')}"
            server = Server(name, model, binary, out / f"{tag}.log")
            try:
                for workload, flags in workloads.items():
                    r = bench(server.url, flags, out / f"{tag}-{workload.replace(' ', '_')}")
                    results[workload][name].append(r)
                    print(run_line(name, workload, rnd, r), flush=True)
            finally:
                server.stop()
    slim = {w: {s: [{k: v for k, v in r.items() if not isinstance(v, list)} for r in rs] for s, rs in by.items()}
            for w, by in results.items()}
    (out / "results.json").write_text(json.dumps(slim, indent=2) + "\n")
    if len(servers) == 2:
        print()
        print(ratio_table(results))
    print(f"\nresults in {out}/ (each run's tokenstep bench folder, server logs, results.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
