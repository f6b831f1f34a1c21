"""Where the CLI's output goes: result folders, the resolved configuration, tables, plots, --json.

stdout carries the report (header, table, file list) or, with --json, exactly one
JSON object; everything else (logs, progress, and the report itself under
--json) goes to stderr, and --quiet silences stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from sim.cli_runs import Context
from sim.executor import held_signals, release_signals
from sim.records import RunResult
from sim.report import _plain as plain  # the strict-JSON conversion write_results uses
from sim.report import run_warnings, write_results, write_summary
from sim.workload import Workload


def log(args: argparse.Namespace, text: str) -> None:
    """A log line on stderr (silent under --quiet)."""
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr, flush=True)


def emit(args: argparse.Namespace, text: str) -> None:
    """Report text: stdout normally; stderr under --json (so stdout stays one JSON object)."""
    if getattr(args, "json", False):
        log(args, text)
    else:
        print(text, flush=True)


def out_dir(args: argparse.Namespace, command: str) -> Path:
    """--out, else results/<command>-<YYYYmmdd-HHMMSS> (with -2, -3, ... if taken)."""
    if getattr(args, "out", None):
        return Path(args.out)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("results") / f"{command}-{stamp}"
    path, n = base, 2
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def flags(args: argparse.Namespace) -> dict:
    """Every parsed flag value (internal entries, which start with '_', left out)."""
    return {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_") and not callable(v)}


def resolved_config(ctx: Context, workload: Workload | None, extra: dict | None = None) -> dict:
    """The full configuration of a command: flags, seed, backend, cost model, scheduler, workload, SLO."""
    cost = ctx.cost
    to_dict = getattr(cost, "to_dict", None)
    config = {
        "command": ctx.command,
        "argv": list(getattr(ctx.args, "_argv", [])),
        "flags": flags(ctx.args),
        "seed": ctx.args.seed,
        "backend": ctx.backend,
        "model": ctx.llama.model if ctx.llama else None,
        "cost_model": {"name": ctx.cost_name, "note": ctx.cost_note, "meta": dict(getattr(cost, "meta", {}) or {}),
                       "describe": cost.describe() if callable(getattr(cost, "describe", None)) else str(cost),
                       "definition": to_dict() if callable(to_dict) else None},
        "scheduler": dataclasses.asdict(ctx.config),
        "num_instances": ctx.args.instances,
        "router": ctx.args.router,
        "slo": ctx.slo,
    }
    if workload is not None:
        config["workload"] = {"description": workload.description, "source": workload.source,
                              "num_requests": len(workload.requests)}
    config.update(extra or {})
    return config


def baseline_index(summaries: Sequence[dict]) -> int | None:
    """Index of the first measured static run (the table's ratio baseline), if any."""
    for i, s in enumerate(summaries):
        if str(s.get("policy_spec", s.get("policy", ""))).split(":")[0] == "static" and "(sim)" not in s["policy"]:
            return i
    return None


def write_plots(args: argparse.Namespace, out: Path, jobs: Sequence[tuple[str, Callable[[Path], Path]]]) -> list[Path]:
    """Run plot jobs (file name, fn(path)) into out unless --no-plots."""
    return start_plots(args, out, jobs).wait()


class Plots:
    """Plot jobs under way: drawn in a forked child process while this one writes its other files, or, where
    forking is not safe (no fork, or other threads running), drawn here when wait() is called."""

    def __init__(self, out: Path, jobs: Sequence[tuple[str, Callable[[Path], Path]]]) -> None:
        self.out, self.jobs = out, list(jobs)
        self.pid: int | None = None
        self._read = -1

    def start(self) -> Plots:
        """Fork the child that draws the plots, when that is safe here."""
        if not self.jobs or not hasattr(os, "fork") or not sys.platform.startswith("linux") \
                or threading.active_count() > 1:
            return self
        sys.stdout.flush()
        sys.stderr.flush()
        read, write = os.pipe()
        held = held_signals()  # entered by hand: the child must not leave it (and take a signal) before its try
        held.__enter__()
        pid = os.fork()
        if pid != 0:
            held.__exit__(None, None, None)
        else:  # the child: draw, report an exception through the pipe, never return into the command
            status = 1
            try:
                os.close(read)
                release_signals()  # Ctrl-C and SIGTERM now unwind to the os._exit below
                status = 0
                for name, fn in self.jobs:
                    fn(self.out / name)
            except BaseException as exc:
                status = 1
                _send_error(write, exc)
            finally:
                os._exit(status)
        os.close(write)
        self.pid, self._read = pid, read
        return self

    def wait(self) -> list[Path]:
        """The plots' paths once drawn; the child's exception, if it failed, is raised here."""
        if self.pid is None:
            return [fn(self.out / name) for name, fn in self.jobs]
        pid, self.pid = self.pid, None
        try:
            with os.fdopen(self._read, "rb") as fh:
                data = fh.read()
        finally:
            _, status = os.waitpid(pid, 0)
        if data:
            exc, text = pickle.loads(data)
            if text:
                print(text, end="", file=sys.stderr)
            raise exc
        if status != 0:
            code = os.waitstatus_to_exitcode(status)
            raise RuntimeError(f"the process drawing the plots ended with exit status {code}")
        return [self.out / name for name, _ in self.jobs]

    def cancel(self) -> None:
        """Stop the child (the command failed before it waited for the plots)."""
        if self.pid is not None:
            pid, self.pid = self.pid, None
            with contextlib.suppress(OSError):
                os.close(self._read)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)


def _send_error(fd: int, exc: BaseException) -> None:
    """The child's exception (and, for an internal failure, its traceback) pickled into the pipe."""
    expected = isinstance(exc, (ValueError, OSError, ImportError, KeyboardInterrupt))
    text = "" if expected else traceback.format_exc()
    try:
        data = pickle.dumps((exc, text))
    except Exception:
        data = pickle.dumps((RuntimeError(f"{type(exc).__name__}: {exc}"), text))
    with contextlib.suppress(OSError), os.fdopen(fd, "wb") as fh:
        fh.write(data)


def start_plots(args: argparse.Namespace, out: Path, jobs: Sequence[tuple[str, Callable[[Path], Path]]]) -> Plots:
    """Start plot jobs (file name, fn(path)) into out unless --no-plots; Plots.wait() gives their paths."""
    if getattr(args, "no_plots", False) or not jobs:
        return Plots(out, [])
    log(args, f"writing {len(jobs)} plot(s) ...")
    out.mkdir(parents=True, exist_ok=True)
    return Plots(out, jobs).start()


def finish(ctx: Context, out: Path, runs: list[RunResult] | None, summaries: list[dict], config: dict,
           report: str, plot_jobs: Sequence[tuple[str, Callable[[Path], Path]]] = (),
           extra_json: dict | None = None, extra_files: dict | None = None,
           run_files: dict[str, Path] | None = None, plots: Plots | None = None) -> int:
    """Write results and plots, print the report and where files went, or the --json object.

    runs=None: the runs' CSVs are already written (by the tasks of a study, in run_files); only the
    study-level files are written here. plots: plot jobs already started (start_plots), else plot_jobs are
    started here, drawing while the results are written.
    """
    args = ctx.args
    if plots is None:
        plots = start_plots(args, out, plot_jobs)
    try:
        paths = write_summary(out, summaries, config) if runs is None else write_results(out, runs, summaries, config)
        paths.update(run_files or {})
        for name, data in (extra_files or {}).items():
            path = out / name
            path.write_text(json.dumps(plain(data), indent=2, allow_nan=False) + "\n")
            paths[name] = path
    except BaseException:
        plots.cancel()
        raise
    pngs = plots.wait()
    emit(args, report)
    for line in run_warnings(summaries):
        log(args, line)
    names = sorted(paths) + [p.name for p in pngs]
    emit(args, f"results in {out}/: {', '.join(_compact(names))}")
    if getattr(args, "json", False):
        doc = {"runs": summaries, "command": ctx.command, "workload": config.get("workload", {}).get("description"),
               "cost_model": ctx.cost_name, "backend": ctx.backend, "out_dir": str(out), **(extra_json or {})}
        sys.stdout.write(json.dumps(plain(doc), allow_nan=False) + "\n")
        sys.stdout.flush()
    return 0


def _compact(names: list[str]) -> list[str]:
    """Collapse requests_*.csv and steps_*.csv into one entry each."""
    out: list[str] = []
    for prefix in ("requests_", "steps_"):
        group = [n for n in names if n.startswith(prefix) and n.endswith(".csv")]
        if len(group) > 2:
            names = [n for n in names if n not in group]
            out.append(f"{prefix}*.csv ({len(group)})")
    return names + out
