"""A study's tasks write their own runs' CSVs: the same files, byte for byte, as when the parent writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.cli import main
from sim.executor import SerialExecutor

SWEEP = ["sweep", "--rates", "1,4", "--policies", "static,continuous,static", "--num-requests", "12", "--quiet"]
CAPACITY = ["capacity", "--slo", "ttft=1,tpot=0.2", "--policies", "continuous,continuous", "--param",
            "max_num_seqs=2,8", "--num-requests", "20", "--tolerance", "0.2", "--quiet", "--no-plots"]
STUDY_FILES = {"summary.json", "summary.csv", "results.jsonl", "task_times.json", "capacity.json"}


def _files(out: Path) -> dict[str, bytes]:
    """Every file under out (hidden ones too) by relative path, with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv", [SWEEP, CAPACITY], ids=["sweep", "capacity"])
def test_runs_written_by_the_tasks_match_runs_written_by_the_parent(tmp_path, capsys, monkeypatch, argv):
    """local:2 (each task writes its run's CSVs) and the parent writing them give the same run files."""
    assert main([*argv, "--executor", "local:2", "--out", str(tmp_path / "tasks")]) == 0
    monkeypatch.setattr(SerialExecutor, "shares_files", False)  # as on a cluster: runs come back whole
    assert main([*argv, "--executor", "serial", "--out", str(tmp_path / "parent")]) == 0
    capsys.readouterr()
    by_tasks, by_parent = _files(tmp_path / "tasks"), _files(tmp_path / "parent")
    assert sorted(by_tasks) == sorted(by_parent)  # no leftover .runs folder, the same names (a repeat gets _2)
    runs = [name for name in by_tasks if name.endswith(".csv") and name.startswith(("requests_", "steps_"))]
    assert any(name.endswith("_2.csv") for name in runs)  # the repeated policy's runs kept apart
    assert len(runs) == (12 if argv is SWEEP else 8) and not any(name.startswith(".") for name in by_tasks)
    for name in runs:
        assert by_tasks[name] == by_parent[name], name
    assert by_tasks["summary.csv"] == by_parent["summary.csv"]
    if argv is SWEEP:
        assert "rate_curves.png" in by_tasks
