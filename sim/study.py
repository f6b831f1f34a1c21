"""A study: many independent runs of one command, shipped to any executor by its flags alone.

A task carries the Study (the command and its parsed flag values: a trace path
plus parameters, or the synthetic workload's spec, never the requests) and its
own configuration. Each worker process rebuilds the context from the flags once
(cost model, scheduler config, the trace read once) and reuses it for every
task of that study; in the parent process the command registers the context it
already built, so serial runs and real backends use it directly.

The parent streams each finished task to <out>/results.jsonl (one JSON line:
index, label, and the result or the error), so a killed study keeps what it
finished; at the end the file is rewritten in task order, identical whatever
executor ran it. Timings go apart, to <out>/task_times.json: the executor, its
wall time, and each task's own time and worker.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from sim.cli_runs import Context, make_progress, prepare
from sim.executor import Outcome, SerialExecutor, Task, describe, make_executor
from sim.report import _plain as plain

RESULTS_FILE = "results.jsonl"
TIMES_FILE = "task_times.json"


@dataclass(frozen=True)
class Study:
    """The command and its parsed flag values: all a worker needs to rebuild a task's workload and context."""

    command: str
    flags: dict
    key: str


def make_study(args: argparse.Namespace, command: str) -> Study:
    """The study of these parsed flags (internal and callable entries left out)."""
    flags = {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_") and not callable(v)}
    # a worker may start in another folder (a Ray worker's): the same files, by their full paths
    for name in ("trace", "cost"):
        if flags.get(name) and (name == "trace" or os.path.isfile(flags[name])):  # --cost is a name or a file
            flags[name] = os.path.abspath(flags[name])
    key = hashlib.sha256(repr((command, sorted(flags.items()))).encode()).hexdigest()[:16]
    return Study(command, flags, key)


class StudyContext:
    """What every task of one study shares in one process: the Context, and workloads built on demand."""

    def __init__(self, study: Study, ctx: Context | None = None) -> None:
        if ctx is None:
            args = argparse.Namespace(**{**study.flags, "quiet": True, "json": False})
            ctx = prepare(args, study.command)
        self.study = study
        self.ctx = ctx

    @cached_property
    def rates(self):
        """RateWorkloads of the flags (the trace read once per process)."""
        from sim.cli_rates import RateWorkloads

        return RateWorkloads(self.ctx.args, self.study.command)

    @cached_property
    def workload(self):
        """The one workload the flags describe (compare)."""
        from sim.cli_common import build_workload

        return build_workload(self.ctx.args)


_CONTEXTS: dict[str, StudyContext] = {}


def register(study: Study, ctx: Context, **built: Any) -> StudyContext:
    """Let tasks run in this process reuse the command's own context (and workloads already built)."""
    sc = StudyContext(study, ctx)
    sc.__dict__.update(built)  # e.g. rates=RateWorkloads(...): cached_property reads the instance dict
    _CONTEXTS.clear()
    _CONTEXTS[study.key] = sc
    return sc


def context(study: Study) -> StudyContext:
    """This process's context for the study, built on first use (one study kept at a time)."""
    sc = _CONTEXTS.get(study.key)
    if sc is None:
        _CONTEXTS.clear()
        sc = _CONTEXTS[study.key] = StudyContext(study)
    return sc


def warm_context(study: Study, build: str) -> None:
    """A worker's warm-up: build the study's context and its workloads (build: 'rates' or 'workload') now."""
    getattr(context(study), build)


def start_executor(args: argparse.Namespace, command: str, num_tasks: int, build: str = "rates"):
    """(executor, study) for --executor, started now: its workers build the study's context while the command
    builds its own. --backend llama runs one real run at a time in this process (and refuses --executor)."""
    study = make_study(args, command)
    if args.backend == "llama":
        if args.executor not in (None, "serial"):
            raise ValueError(f"--executor {args.executor} applies to simulated runs; --backend llama runs one "
                             "real run at a time on this machine's cores (leave --executor out)")
        return SerialExecutor(args.seed), study
    executor = make_executor(args.executor, args.seed, num_tasks)
    executor.prestart(warm_context, (study, build))
    return executor, study


class ResultStream:
    """<out>/results.jsonl: one line per finished task, appended as tasks finish."""

    def __init__(self, out: Path, to_json: Callable[[Any], Any]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / RESULTS_FILE
        self.to_json = to_json
        self.lines: dict[int, str] = {}
        self.times: dict[int, dict] = {}
        self._fh = self.path.open("w", encoding="utf-8")

    def add(self, index: int, outcome: Outcome) -> None:
        """Append this task's line now (flushed: a killed study keeps it)."""
        entry: dict = {"index": index, "label": outcome.label}
        if outcome.ok:
            entry["result"] = self.to_json(outcome.value)
        else:
            entry["error"] = outcome.error
        line = json.dumps(plain(entry), allow_nan=False)
        self.lines[index] = line
        self.times[index] = {"label": outcome.label, "task_s": outcome.elapsed_s, "worker": outcome.worker}
        self._fh.write(line + "\n")
        self._fh.flush()

    def close(self, executor: str = "", wall_s: float | None = None) -> None:
        """Rewrite the file in task order (identical on every executor); write the timings beside it."""
        self._fh.close()
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(self.lines[i] + "\n" for i in sorted(self.lines)), encoding="utf-8")
        os.replace(tmp, self.path)
        times = {"executor": executor, "wall_s": wall_s, "tasks": [self.times[i] for i in sorted(self.times)]}
        (self.path.parent / TIMES_FILE).write_text(json.dumps(times, indent=1) + "\n", encoding="utf-8")


def run_study(args: argparse.Namespace, executor, fn: Callable, tasks: Sequence[Task], out: Path,
              to_json: Callable[[Any], Any], label: str,
              also: Callable[[int, Outcome], None] | None = None, bar: bool = True) -> list[Outcome]:
    """Run every task on the executor under one progress bar, streaming results to out; results in task order.

    also(index, outcome), if given, is called in this process after each task's line is written. bar=False
    leaves the bar off (real runs draw one each).
    """
    from sim.cli_output import log

    stream = ResultStream(out, to_json)
    total = len(tasks)
    log(args, f"{label}: {total} task(s) on {describe(executor)}; results stream to {stream.path}")
    finished = 0
    start = time.perf_counter()
    try:
        with make_progress(args, label, enabled=bar) as progress:
            def on_done(index: int, outcome: Outcome) -> None:
                nonlocal finished
                finished += 1
                stream.add(index, outcome)
                progress(finished, total)
                if also is not None:
                    also(index, outcome)

            return executor.map(fn, tasks, on_done)
    finally:
        stream.close(describe(executor), time.perf_counter() - start)


def report_failures(args: argparse.Namespace, command: str, outcomes: Sequence[Outcome]) -> int:
    """Print one line per failed task (its configuration and error); 1 if any failed, else 0."""
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        print(f"tokenstep {command}: {o.label} failed: {o.error}", file=sys.stderr)
        if os.environ.get("TOKENSTEP_DEBUG") == "1" and o.traceback:
            print(o.traceback, file=sys.stderr)
    if failed:
        print(f"tokenstep {command}: {len(failed)} of {len(outcomes)} task(s) failed; the others' results are "
              "written (TOKENSTEP_DEBUG=1 prints the workers' tracebacks)", file=sys.stderr)
    return 1 if failed else 0
