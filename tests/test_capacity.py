"""capacity: the search stops when lowering the rate no longer helps, and names the misses load does not cause."""

from __future__ import annotations

import json

from sim.cli import main

# 30 synthetic requests; max_model_len 200 rejects 11 of them at any rate, and one prompt's TTFT alone is above
# 0.25 s, so at most 60 % can meet the SLO and no rate reaches 90 %
ARGV = ["capacity", "--slo", "ttft=0.25,tpot=0.2", "--policies", "continuous", "--num-requests", "30",
        "--max-model-len", "200", "--no-plots", "--quiet"]


def test_capacity_stops_halving_when_attainment_is_flat_and_names_load_independent_misses(tmp_path, capsys):
    assert main([*ARGV, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (entry,) = json.loads((tmp_path / "capacity.json").read_text())
    rates = [s["rate"] for s in entry["steps"]]
    # before: 13 probes, halving down to 1/4096 of the start rate while attainment stayed at 50 %
    assert len(rates) <= 3 and min(rates) >= 0.25
    assert entry["capacity_rps"] is None and entry["stopped"] == "lowering the rate no longer helps"
    misses = entry["load_independent_misses"]
    assert misses["num_requests"] == 30 and misses["max_attainment"] < 0.9
    reasons = {m["reason"]: m for m in misses["reasons"]}
    rejected = reasons["rejected (prompt + max_tokens exceeds max_model_len)"]
    assert rejected["count"] == 11 and len(rejected["request_ids"]) == 5
    assert reasons["TTFT above 0.25 s alone"]["count"] >= 1
    assert sum(m["count"] for m in misses["reasons"]) == misses["num_misses"]
    assert "no rate passes" in out and "miss the SLO at any load" in out and "rejected (prompt + max_tokens" in out


def test_capacity_keeps_halving_while_a_lower_rate_helps(tmp_path, capsys):
    # without load-independent misses a failing start rate is halved until a rate passes
    argv = ["capacity", "--slo", "ttft=1,tpot=0.2", "--policies", "continuous", "--num-requests", "30", "--rate", "64",
            "--tolerance", "0.2", "--no-plots", "--quiet", "--out", str(tmp_path)]
    assert main(argv) == 0
    (entry,) = json.loads((tmp_path / "capacity.json").read_text())
    assert entry["bracketed"] and entry["capacity_rps"] < 64 and "stopped" not in entry
