"""Executors: serial, a local process pool and Ray give identical studies; failures, Ctrl-C and bad flags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from scheduler.policies import Continuous
from sim.cli import main
from sim.executor import LocalExecutor, SerialExecutor, Task

SWEEP = ["sweep", "--rates", "1,4", "--policies", "static,continuous", "--num-requests", "12", "--no-plots", "--quiet"]
CAPACITY = ["capacity", "--slo", "ttft=1,tpot=0.2", "--policies", "static,continuous", "--param", "max_num_seqs=2,8",
            "--num-requests", "20", "--tolerance", "0.2", "--no-plots", "--quiet"]


class RaisesAtThreeSeqs(Continuous):
    """Continuous, except that it raises when the scheduler allows exactly 3 sequences (one swept value)."""

    name = "raises_at_three_seqs"

    def select(self, sched, now_s, limit):
        """Raise for max_num_seqs=3; otherwise continuous's choice."""
        if sched.config.max_num_seqs == 3:
            raise RuntimeError("this configuration always fails")
        return super().select(sched, now_s, limit)


def _study(capsys, argv: list[str], out: Path) -> tuple[dict, list[str]]:
    """The --json document (out_dir left out) and results.jsonl's lines of one run."""
    assert main([*argv, "--json", "--out", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    doc.pop("out_dir")
    return doc, (out / "results.jsonl").read_text().splitlines()


def _same_everywhere(capsys, tmp_path, argv: list[str], executors: list[str]) -> None:
    base = _study(capsys, [*argv, "--executor", "serial"], tmp_path / "serial")
    assert len(base[1]) >= 4
    for name in executors:
        assert _study(capsys, [*argv, "--executor", name], tmp_path / name.replace(":", "_")) == base, name
    summary = json.loads((tmp_path / "serial" / "summary.json").read_text())
    assert summary["runs"] == base[0]["runs"]


def test_sweep_and_capacity_are_identical_serial_and_on_a_local_pool(tmp_path, capsys):
    _same_everywhere(capsys, tmp_path / "sweep", SWEEP, ["local:2"])
    _same_everywhere(capsys, tmp_path / "capacity", CAPACITY, ["local:2"])


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray of 2 CPUs, started as --executor ray starts it, shared by the module's Ray runs."""
    from sim.executor import RayExecutor

    executor = RayExecutor(None, workers=2)
    yield executor
    executor.close()


def test_sweep_and_capacity_are_identical_on_a_local_ray(tmp_path, capsys, local_ray):
    assert local_ray.workers == 2 and os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    started = time.monotonic()
    _same_everywhere(capsys, tmp_path / "sweep", SWEEP, ["ray"])
    _same_everywhere(capsys, tmp_path / "capacity", CAPACITY, ["ray"])
    assert time.monotonic() - started < 60  # bounded: a few small runs on the running Ray


def _draw(label: str) -> float:
    return float(np.random.random())  # the global generator, seeded per task by the executor


def test_every_task_is_seeded_from_its_label_and_the_runs_seed_whatever_the_order():
    tasks = [Task(f"config {i}", (f"config {i}",)) for i in range(6)]
    serial = {o.label: o.value for o in SerialExecutor(seed=3).map(_draw, tasks)}
    pool = LocalExecutor(2, seed=3)
    try:
        pooled = {o.label: o.value for o in pool.map(_draw, tasks[::-1])}
    finally:
        pool.close()
    assert serial == pooled and len(set(serial.values())) == 6
    other_seed = {o.label: o.value for o in SerialExecutor(seed=4).map(_draw, tasks)}
    assert other_seed != serial


def test_a_failing_task_names_its_configuration_and_the_others_are_written(tmp_path, capsys):
    argv = ["sweep", "--rates", "1,2", "--policies", f"{__name__}:RaisesAtThreeSeqs", "--param", "max_num_seqs=3,8",
            "--num-requests", "8", "--no-plots", "--quiet", "--executor", "local:2", "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "max_num_seqs=3 @ 1 req/s failed: RuntimeError: this configuration always fails" in err
    assert "max_num_seqs=3 @ 2 req/s failed" in err and "2 of 4 task(s) failed" in err
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [("error" in e, "max_num_seqs=8" in e["label"]) for e in lines] == [
        (True, False), (False, True), (True, False), (False, True)]
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert [(r["rate"], r["num_finished"]) for r in runs] == [(1.0, 8), (2.0, 8)]


def _marked(marker: str) -> list[int]:
    """Pids of live processes whose environment carries the marker (the run and everything it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_ctrl_c_on_a_local_pool_run_leaves_no_process_behind(tmp_path):
    marker = f"TOKENSTEP_TEST_RUN={uuid.uuid4().hex}"
    key, value = marker.split("=")
    env = {**os.environ, key: value}
    argv = [sys.executable, "-m", "sim.cli", "sweep", "--rates", "1,2,3,4,5,6", "--policies", "static,continuous",
            "--num-requests", "4000", "--no-plots", "--executor", "local:2", "--out", str(tmp_path)]
    # a shell's background job inherits SIGINT ignored, and Python would keep ignoring it: restore the default
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while len(_marked(marker)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the run and two workers (forked from it, or from a forkserver: one more)
        assert proc.poll() is None and len(_marked(marker)) >= 3
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and b"interrupted" in err
    deadline = time.monotonic() + 10
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _marked(marker) == []


@pytest.mark.parametrize(("executor", "message"), [
    ("threads", "--executor 'threads' is unknown; use serial, local[:N] or ray[:ADDRESS]"),
    ("local:0", "--executor local:0: N must be a whole number >= 1"),
    ("serial:2", "--executor 'serial:2' is unknown"),
    ("ray:127.0.0.1:1", "--executor ray:127.0.0.1:1: cannot reach 127.0.0.1:1"),
    ("ray:nowhere", "the address must be auto, HOST:PORT or ray://HOST:PORT"),
])
def test_a_bad_executor_exits_2_with_one_line(tmp_path, capsys, executor, message):
    assert main([*SWEEP, "--executor", executor, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_validates_noisy_reruns_are_identical_in_this_process_and_on_a_local_pool():
    from backends.cost import load_cost_model
    from calib.measure import predict
    from calib.noise import StepNoise, ensemble_predict, noise_spread
    from scheduler import SchedulerConfig
    from sim.metrics import summarize
    from sim.workload import synthetic_workload

    profile = load_cost_model("cpu-gemma3-270m")
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=512, num_kv_blocks=512)
    w = synthetic_workload("poisson", 3.0, 40, "uniform:20,120", "uniform:4,30", 3)
    measured = summarize(predict(w, "continuous", config, profile, 1))
    noise = StepNoise(0.03, 0.01)
    pool = LocalExecutor(2)
    try:
        spread = [noise_spread(w, "continuous", config, profile, 1, "least_outstanding", measured, noise, runs=4,
                               executor=e) for e in (None, pool)]
        ens = [ensemble_predict(w, "continuous", config, profile, 1, "least_outstanding", noise, runs=4, seed=2,
                                executor=e) for e in (None, pool)]
    finally:
        pool.close()
    assert spread[0] == spread[1] and spread[0]["runs"] == 4
    medoids = [summarize(e.pop("run")) for e in ens]  # rebuilt from its seed after the pooled reruns
    assert medoids[0] == medoids[1] and ens[0] == ens[1] and ens[0]["runs"] == 4


def _square(x: int) -> int:
    return x * x


def test_each_finished_task_is_on_disk_before_the_next_one_is_reported(tmp_path):
    import argparse

    from sim.study import run_study

    args = argparse.Namespace(quiet=True)
    seen = []

    def check(index, outcome):  # called after the task's line is written and flushed
        lines = (tmp_path / "results.jsonl").read_text().splitlines()
        seen.append(len(lines))
        assert json.loads(lines[-1]) == {"index": index, "label": outcome.label, "result": outcome.value}

    tasks = [Task(f"x={i}", (i,)) for i in range(5)]
    pool = LocalExecutor(2)
    try:
        outcomes = run_study(args, pool, _square, tasks, tmp_path, lambda v: v, "test", check)
    finally:
        pool.close()
    assert seen == [1, 2, 3, 4, 5] and [o.value for o in outcomes] == [0, 1, 4, 9, 16]
    times = json.loads((tmp_path / "task_times.json").read_text())
    assert [t["label"] for t in times["tasks"]] == [t.label for t in tasks] and times["executor"].startswith("local")
