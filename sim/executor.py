"""Where a study's independent runs execute: in this process, a local process pool, or Ray.

One seam, ``executor.map(fn, tasks, on_done)``: every task is ``Task(label, args)``
and runs as ``fn(*args)``; the result list comes back in task order whatever
order the tasks finished in, and ``on_done(index, outcome)`` is called in this
process as each one finishes (progress bars, results streamed to disk).

- ``serial``: one task after another in this process.
- ``local[:N]`` (default): a standard-library process pool of N workers (forked
  from this process on Linux while it runs no other thread, else forkserver where
  the platform has it, else spawn), N = the CPUs this process may use
  (``os.sched_getaffinity``). With one worker or one task it runs in this process.
- ``ray[:ADDRESS]``: Ray tasks of one CPU each; ``ray.init(address=ADDRESS)`` for
  a running cluster (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``), else a local
  Ray with explicit ``num_cpus``, no dashboard and no usage stats.

Every task runs seeded: Python's and numpy's global generators are seeded from
the task's label and the run's seed before it starts, so a custom policy that
draws from them gives the same answer on any executor, in any order. A task that
raises becomes a failed Outcome naming its label; the others go on. Ctrl-C stops
the workers and re-raises KeyboardInterrupt, leaving no process behind.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import multiprocessing
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

RAY_HINT = "--executor ray needs the ray extra: pip install -e '.[ray]'"
RAY_CONNECT_TIMEOUT_S = 5.0
POOL_BROKE = "a worker process of the pool died (killed, or out of memory) before this task could finish"


class ExecutorError(ValueError):
    """A bad --executor value or an unreachable cluster (bad usage: exit status 2)."""


@dataclass(frozen=True)
class Task:
    """One unit of work: fn(*args), named by label (a configuration) in errors and results."""

    label: str
    args: tuple


@dataclass(frozen=True)
class Outcome:
    """What one task gave: value, or error (one line) with the worker's traceback; how long it ran, and where."""

    label: str
    value: Any = None
    error: str | None = None
    traceback: str | None = None
    elapsed_s: float = 0.0  # the task's own time in its worker (timing: never part of a result)
    worker: str = ""  # host:pid

    @property
    def ok(self) -> bool:
        """Whether the task returned."""
        return self.error is None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def task_seed(seed: int, label: str) -> int:
    """A 32-bit seed from the run's seed and a task's label (stable across processes and machines)."""
    digest = hashlib.sha256(f"{seed}\0{label}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def run_task(fn: Callable, label: str, seed: int, args: tuple) -> Outcome:
    """Run fn(*args) with the global generators seeded for this task; an exception becomes a failed Outcome."""
    import numpy as np  # here, so that importing this module (start_early) stays light

    s = task_seed(seed, label)
    random.seed(s)
    np.random.seed(s)
    where = f"{socket.gethostname()}:{os.getpid()}"
    start = time.perf_counter()
    try:
        value = fn(*args)
    except Exception as exc:  # the task's own failure, reported by label; the study goes on
        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        return Outcome(label, error=text[:500], traceback=traceback.format_exc(),
                       elapsed_s=time.perf_counter() - start, worker=where)
    return Outcome(label, value, elapsed_s=time.perf_counter() - start, worker=where)


OnDone = Callable[[int, Outcome], None]


class SerialExecutor:
    """Every task in this process, in order."""

    name = "serial"
    workers = 1
    shares_files = True  # tasks may write the study's output folder themselves

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def map(self, fn: Callable, tasks: Sequence[Task], on_done: OnDone | None = None) -> list[Outcome]:
        """Run the tasks one after another; results in task order."""
        results = []
        for i, task in enumerate(tasks):
            outcome = run_task(fn, task.label, self.seed, task.args)
            results.append(outcome)
            if on_done is not None:
                on_done(i, outcome)
        return results

    def prestart(self, fn: Callable | None = None, args: tuple = ()) -> None:
        """Nothing to start: tasks run in this process."""

    def close(self) -> None:
        """Nothing to release."""


_HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back (delivered on leaving) while this thread forks: a child forked with the
    command's handlers must not unwind into the command's code before it has set its own (it unblocks them
    once it has: _ignore_sigint, or the plot process)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def release_signals() -> None:
    """In a child forked under held_signals(), once its own handlers are set: let the signals in."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole foreground process group: the parent alone decides and stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a forked worker inherits the command's SIGTERM handler (which unwinds as Ctrl-C): terminate() ends it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    release_signals()


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and threading.active_count() == 1 and "fork" in methods:
        # no other thread to leave a lock held: workers forked from this process start at once, with the
        # simulator already imported (a forkserver would import it again before the first task)
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        # workers fork from a server that imported the simulator once, instead of importing it each
        ctx.set_forkserver_preload(["numpy", "simpy", "sim.model", "sim.cli_runs", "sim.executor", "sim.study",
                                    "sim.cli_sweep", "sim.capacity", "sim.cli_compare"])
        return ctx
    return multiprocessing.get_context("spawn")


def start_early(executor_text: str | None) -> None:
    """Start the process pool's server now, for an --executor value that will make a local pool.

    The server imports the simulator (a few tenths of a second) on another core while this process reads
    its flags and imports the same modules itself, so the workers are ready when the command submits its
    first task. Nothing is started for serial, Ray, one CPU, or a platform without forkserver.
    """
    try:
        name, workers = parse_executor(executor_text)
    except ExecutorError:
        return  # the command reports the bad value itself
    if name != "local" or (workers or available_cpus()) <= 1:
        return
    ctx = _pool_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


class LocalExecutor:
    """A process pool of this machine's CPUs (fork from a single-threaded parent on Linux, else forkserver or
    spawn: workers never inherit a parent's threads).

    The pool lives from prestart() (or the first map()) to close(), so its start-up can overlap the
    command's own preparation and several maps share it.
    """

    name = "local"
    shares_files = True  # workers on this machine: tasks may write the study's output folder themselves

    def __init__(self, workers: int | None = None, seed: int = 0) -> None:
        self.workers = workers or available_cpus()
        self.seed = seed
        self._pool: ProcessPoolExecutor | None = None
        self._warming: list = []

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            sys.stdout.flush()  # a forked worker must not write this process's buffered output again
            sys.stderr.flush()
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=_pool_context(),
                                             initializer=_ignore_sigint)
        return self._pool

    def prestart(self, fn: Callable | None = None, args: tuple = ()) -> None:
        """Start the workers now, each running fn(*args) first if given (a warm-up whose result is dropped)."""
        if self.workers <= 1:
            return
        pool = self._ensure_pool()
        # a pool starts a worker per submitted task while none is idle: one warm-up each starts them all
        with held_signals():
            self._warming = [pool.submit(run_task, fn or _nothing, "warm-up", self.seed, args)
                             for _ in range(self.workers)]

    def map(self, fn: Callable, tasks: Sequence[Task], on_done: OnDone | None = None) -> list[Outcome]:
        """Run the tasks on up to self.workers processes; results in task order."""
        if min(self.workers, len(tasks)) <= 1 and self._pool is None:  # a pool would only add its start-up
            return SerialExecutor(self.seed).map(fn, tasks, on_done)
        results: list[Outcome | None] = [None] * len(tasks)
        pool = self._ensure_pool()
        try:
            with held_signals():  # the first submit may start (fork) the workers
                pending = {pool.submit(run_task, fn, t.label, self.seed, t.args): i for i, t in enumerate(tasks)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    try:
                        outcome = future.result()
                    except BrokenProcessPool:
                        outcome = Outcome(tasks[i].label, error=POOL_BROKE)
                        self._pool = None  # a broken pool takes no more tasks: the next map starts another
                    results[i] = outcome
                    if on_done is not None:
                        on_done(i, outcome)
        except BaseException:
            self._pool = None
            _terminate(pool)
            raise
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """End the pool: at once if a warm-up is still running (the command stopped early), else when idle."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if all(f.done() for f in self._warming):
            pool.shutdown(wait=True)
        else:
            _terminate(pool)


def _nothing() -> None:
    return None


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now: cancel queued tasks, end the workers, reap them."""
    processes = list(getattr(pool, "_processes", {}).values())  # no public way before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=2)
        if p.is_alive():
            p.kill()
            p.join(timeout=2)


def _check_reachable(address: str) -> None:
    """Refuse a HOST:PORT that nothing answers on, before ray.init waits on it."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ExecutorError(f"--executor ray:{address}: the address must be auto, HOST:PORT or ray://HOST:PORT "
                            "(e.g. ray:10.0.0.5:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ExecutorError(f"--executor ray:{address}: cannot reach {host}:{port} ({exc.strerror or exc}); start "
                            "the cluster (ray up, or ray start --head) or write --executor ray for a local one"
                            ) from None


class RayExecutor:
    """Ray tasks of one CPU each, on a cluster (address) or on a local Ray of this machine's CPUs."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, seed: int = 0) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            import ray
        except ImportError:
            raise ExecutorError(RAY_HINT) from None
        self.ray = ray
        self.address = address
        # a local Ray's workers see this machine's files; a cluster's may not, so its runs come back whole
        self.shares_files = not address
        self.seed = seed
        self._owns = False
        self._warming: list = []
        if address and address != "auto":
            _check_reachable(address)
        kwargs: dict = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": True}
        try:
            if ray.is_initialized():
                pass
            elif address:
                ray.init(address=address, **kwargs)
            else:
                # "local": a Ray of our own even when another is running here (None would join the latest one)
                ray.init(address="local", num_cpus=workers or available_cpus(), **kwargs)
                self._owns = True
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExecutorError(f"--executor ray{':' + address if address else ''}: Ray did not start ({first})"
                                ) from None
        self.workers = int(ray.cluster_resources().get("CPU", 1))
        self._remote = ray.remote(num_cpus=1, max_retries=0)(run_task)

    def prestart(self, fn: Callable | None = None, args: tuple = ()) -> None:
        """Have each CPU's worker run fn(*args) now (a warm-up whose result is dropped)."""
        self._warming = [self._remote.remote(fn or _nothing, "warm-up", self.seed, args)
                         for _ in range(self.workers)]

    def map(self, fn: Callable, tasks: Sequence[Task], on_done: OnDone | None = None) -> list[Outcome]:
        """Submit every task; collect them as they finish; results in task order."""
        ray = self.ray
        fn_ref = ray.put(fn)
        refs = {self._remote.remote(fn_ref, t.label, self.seed, t.args): i for i, t in enumerate(tasks)}
        results: list[Outcome | None] = [None] * len(tasks)
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    i = refs.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # the worker died, or Ray lost the task
                        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                        outcome = Outcome(tasks[i].label, error=f"Ray lost the task: {first}"[:500])
                    results[i] = outcome
                    if on_done is not None:
                        on_done(i, outcome)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            self.close()
            raise
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Shut down the local Ray this executor started (a cluster is left running, our warm-ups cancelled)."""
        for ref in self._warming:
            self.ray.cancel(ref, force=True)
        self._warming = []
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()
        self._owns = False


def parse_executor(text: str | None) -> tuple[str, str | int | None]:
    """('serial', None), ('local', N or None) or ('ray', ADDRESS or None) from an --executor value (None: local)."""
    text = (text or "local").strip()
    name, _, rest = text.partition(":")
    if name == "serial" and not rest:
        return "serial", None
    if name == "local":
        if not rest:
            return "local", None
        if rest.isdigit() and int(rest) >= 1:
            return "local", int(rest)
        raise ExecutorError(f"--executor {text}: N must be a whole number >= 1 (e.g. local:4)")
    if name == "ray":
        return "ray", rest or None
    raise ExecutorError(f"--executor {text!r} is unknown; use serial, local[:N] or ray[:ADDRESS]")


def make_executor(text: str | None, seed: int = 0, num_tasks: int | None = None):
    """An executor from an --executor value: serial, local[:N] or ray[:ADDRESS] (None: local).

    num_tasks, when known, caps a local pool's workers (no idle processes for a short study).
    """
    name, arg = parse_executor(text)
    if name == "serial":
        return SerialExecutor(seed)
    if name == "local":
        workers = arg or available_cpus()
        return LocalExecutor(max(1, min(workers, num_tasks)) if num_tasks else workers, seed)  # type: ignore
    return RayExecutor(arg, seed=seed)  # type: ignore[arg-type]


def add_executor_arg(parser: argparse.ArgumentParser) -> None:
    """The --executor flag of commands that run many independent simulations."""
    parser.add_argument("--executor", metavar="KIND",
                        help="where the simulations run: local[:N] (default: a process pool of the N CPUs this "
                             f"process may use, here {available_cpus()}), serial (one at a time in this process), "
                             "ray (a local Ray of those CPUs) or ray:ADDRESS (a running Ray cluster: auto, HOST:PORT "
                             "or ray://HOST:PORT). Results are identical on every executor")


def describe(executor) -> str:
    """'serial', 'local (2 workers)', 'ray (8 CPUs)', for log lines."""
    if executor.name == "serial":
        return "serial"
    unit = "CPUs" if executor.name == "ray" else "workers"
    return f"{executor.name} ({executor.workers} {unit})"
