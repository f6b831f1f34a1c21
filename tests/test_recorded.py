"""validate --recorded: a profile judged against real runs recorded on an H200, without the model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backends.cost import load_cost_model
from calib import cli_validate
from calib.recorded import rejudge

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "calib" / "data" / "h200-llama3-8b-f16-continuous"


def _default_workload(argv=()):
    """The workload validate's flags give (none: the bundled default)."""
    parser = argparse.ArgumentParser()
    cli_validate.add_arguments(parser)
    return cli_validate._workload(parser.parse_args(list(argv)))


def test_rejudging_with_the_recorded_profile_reproduces_its_predictions_and_verdicts():
    doc = json.loads((RECORDED / "validation.json").read_text())
    # profile.json: the profile the recording's predictions were made with (an earlier calibration than the bundled)
    loads = rejudge(RECORDED, _default_workload(), load_cost_model(RECORDED / "profile.json"))
    assert len(loads) == len(doc["loads"]) == 3
    for new, old in zip(loads, doc["loads"], strict=True):
        assert new["rate"] == pytest.approx(old["rate"])
        for k in ("ttft_s", "tpot_s", "e2e_s"):
            for s in ("mean", "p90", "p99"):
                assert new["predicted"][k][s] == pytest.approx(old["predicted"][k][s], rel=1e-9)
                assert new["verdict"][k][s]["pass"] == old["verdict"][k][s]["pass"]
    assert not loads[0]["misses"]  # the light load passed on the GPU
    assert loads[1]["misses"]  # the medium load did not


def test_another_profile_changes_the_prediction_not_the_measurement():
    model = load_cost_model(RECORDED / "profile.json")
    slower = dataclasses.replace(model, run_factor=model.run_factor * 1.2)
    base = rejudge(RECORDED, _default_workload(), model)
    moved = rejudge(RECORDED, _default_workload(), slower)
    assert moved[0]["measured"] == base[0]["measured"]
    assert moved[0]["predicted"]["tpot_s"]["mean"] > base[0]["predicted"]["tpot_s"]["mean"] * 1.1


LONG_QUEUES = ROOT / "calib" / "data" / "h200-llama3-8b-f16-longq"
LONG_QUEUE_FLAGS = ["--num-requests", "300", "--prompt-len", "lognormal:120,1.0", "--output-len", "lognormal:24,0.9",
                    "--shared-prefix", "32", "--prefix-groups", "4", "--seed", "1"]


def test_long_queues_need_the_unified_kv_range():
    """Synthetic runs at 25-140 req/s on the H200 (300 requests, hundreds queued at 60 and above): the bundled
    profile, which replays llama.cpp's unified KV cells and prices each step's KV range, predicts every load's mean
    E2E within 6 %; the profile before it, without the range, ran 40-70 % fast from 60 req/s on."""
    workload = _default_workload(LONG_QUEUE_FLAGS)
    now = rejudge(LONG_QUEUES, workload, load_cost_model("h200-llama3-8b-f16"))
    before = rejudge(LONG_QUEUES, workload, load_cost_model(RECORDED / "profile.json"))
    assert [round(ld["rate"]) for ld in now] == [25, 60, 100, 140]
    for ld in now:
        assert abs(ld["rel_error"]["e2e_s"]["mean"]) < 0.06
        assert abs(ld["rel_error"]["ttft_s"]["mean"]) < 0.06
    for ld in before[1:]:
        assert ld["rel_error"]["e2e_s"]["mean"] < -0.35 and ld["rel_error"]["ttft_s"]["mean"] < -0.4


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sim.cli", "validate", *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_exit_status_and_one_line_errors(tmp_path):
    ok = _cli("--recorded", str(RECORDED), "--profile", str(RECORDED / "profile.json"), "--json")
    assert ok.returncode == 1  # the medium load misses
    doc = json.loads(ok.stdout)
    assert [round(ld["rate"]) for ld in doc["loads"]] == [30, 70, 120]
    wrong = _cli("--recorded", str(RECORDED), "--profile", "h200-llama3-8b-f16", "--limit", "50")
    assert wrong.returncode == 2 and "another workload" in wrong.stderr and len(wrong.stderr.splitlines()) == 1
    missing = _cli("--recorded", str(tmp_path), "--profile", "h200-llama3-8b-f16")
    assert missing.returncode == 2 and "validation.json: not found" in missing.stderr
    partial = tmp_path / "partial"
    shutil.copytree(RECORDED, partial)
    shutil.rmtree(next(partial.glob("load2-*")))
    broken = _cli("--recorded", str(partial), "--profile", "h200-llama3-8b-f16")
    assert broken.returncode == 2 and "no folder load2-*" in broken.stderr
