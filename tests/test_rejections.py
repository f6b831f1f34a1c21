"""Every request ends with its tokens or a stated reason, and the report says which reasons, with counts."""

import json

from backends.synthetic import SyntheticBackend
from scheduler import SchedulerConfig
from sim.cli import main
from sim.metrics import reason_kind, summarize
from sim.model import run_workload
from sim.records import RequestRecord, RunResult
from sim.report import format_table, run_warnings
from sim.workload import Workload, WorkloadRequest

CFG = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, num_kv_blocks=256, block_size=16,
                      max_model_len=512)


def workload(lengths: list[int], max_tokens: int = 8) -> Workload:
    reqs = [WorkloadRequest(f"r{i}", 0.1 * i, tuple(range(10, 10 + n)), max_tokens) for i, n in enumerate(lengths)]
    return Workload(reqs, "test", {"kind": "test"})


def test_rejection_reasons_are_counted_by_their_limit():
    # 3 prompts too long on their own, 2 that fit only without their max_tokens, 5 that run
    w = workload([600, 700, 900, 510, 508] + [40] * 5)
    s = summarize(run_workload(w, "continuous", CFG, [SyntheticBackend()]))
    assert s["num_rejected"] == 5 and s["num_finished"] == 5
    assert s["rejected_reasons"] == {"prompt longer than max_model_len 512": 3,
                                     "prompt + max_tokens longer than max_model_len 512": 2}
    assert s["finish_reasons"] == {"length": 5, "rejected": 5}
    assert sum(s["finish_reasons"].values()) == s["num_requests"]  # every request is accounted for
    table = format_table([s])
    row = next(line for line in table.splitlines() if "prompt longer than max_model_len 512" in line)
    assert row.split("|")[1].strip() == "3"
    assert "prompt + max_tokens longer than max_model_len 512" in table


def test_other_finish_reasons_are_summarised_too():
    recs = [RequestRecord(f"a{i}", 0.0, 8, 4, finish_s=1.0, finish_reason="abort", detail="client went away")
            for i in range(2)]
    recs += [RequestRecord("e", 0.0, 8, 4, finish_s=1.0, finish_reason="error", detail="llama_decode returned -3"),
             RequestRecord("u", 0.0, 8, 4),
             RequestRecord("s", 0.0, 8, 4, first_token_s=0.5, finish_s=1.0, token_times_s=[0.5, 1.0],
                           num_output_tokens=2, finish_reason="stop")]
    s = summarize(RunResult("continuous", recs, [], 1.0))
    assert s["finish_reasons"] == {"abort": 2, "error": 1, "unfinished": 1, "stop": 1}
    assert s["aborted_reasons"] == {"client went away": 2}
    assert s["error_reasons"] == {"llama_decode returned -3": 1}
    lines = format_table([s]).splitlines()
    for label, value in (("requests aborted", "2"), ("  client went away", "2"), ("requests errored", "1"),
                         ("  llama_decode returned -3", "1"), ("requests unfinished", "1"),
                         ("  stop / length", "1 / 0")):
        row = next(line for line in lines if line.startswith(label))
        assert row.split("|")[1].strip() == value, row
    warnings = "\n".join(run_warnings([s]))
    assert "1 of 5 requests failed in the backend: 1 llama_decode returned -3" in warnings
    assert "1 of 5 requests never finished" in warnings


def test_reason_kinds():
    detail = ("prompt (9000 tokens) + max_tokens (16) = 9016 exceeds max_model_len (8192 tokens); "
              "shorten the prompt or lower max_tokens")
    assert reason_kind(detail) == "prompt longer than max_model_len 8192"
    assert reason_kind(detail.replace("9000", "8190").replace("9016", "8206")) == \
        "prompt + max_tokens longer than max_model_len 8192"
    assert reason_kind(detail.replace("max_model_len (8192", "KV capacity (4096")) == \
        "prompt longer than KV capacity 4096"
    assert reason_kind("max_tokens=0: a request must ask for at least one token") == "max_tokens < 1"
    assert reason_kind(None) == "no reason given"


def test_many_kinds_are_capped():
    recs = [RequestRecord(f"r{i}", 0.0, 8, 4, finish_s=0.0, finish_reason="rejected", detail=f"cause {i % 15}")
            for i in range(30)]
    reasons = summarize(RunResult("x", recs, [], 0.0))["rejected_reasons"]
    assert len(reasons) == 10 and reasons["other (6 kinds)"] == 12 and sum(reasons.values()) == 30


def _summary(num_requests: int, num_rejected: int) -> dict:
    return {"policy": "continuous", "num_requests": num_requests, "num_rejected": num_rejected,
            "rejected_reasons": {"prompt longer than max_model_len 8192": num_rejected}}


def test_warning_past_one_percent_rejected():
    assert run_warnings([_summary(200, 2)]) == []  # exactly 1 %
    (line,) = run_warnings([_summary(200, 3)])
    assert line.startswith("warning: continuous rejected 3 of 200 requests (1.5 %): "
                           "3 prompt longer than max_model_len 8192; raise --max-model-len")


def test_cli_warns_and_reports_reasons_in_json(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    rows = [{"arrival_s": 0.1 * i, "num_prompt_tokens": n, "max_tokens": 4}
            for i, n in enumerate([50, 60, 5000, 70, 6000, 80])]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["simulate", "--trace", str(trace), "--max-model-len", "1024", "--no-plots", "--out", str(out), "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    (run,) = doc["runs"]
    assert run["rejected_reasons"] == {"prompt longer than max_model_len 1024": 2}
    assert run["finish_reasons"] == {"length": 4, "rejected": 2}
    assert "warning: continuous rejected 2 of 6 requests (33.3 %)" in captured.err
    saved = json.loads((out / "summary.json").read_text())["runs"][0]
    assert saved["rejected_reasons"] == run["rejected_reasons"]


def test_gpu_presets_take_the_models_real_context():
    from backends.cost.roofline import ROOFLINE_PRESETS

    for name, preset in ROOFLINE_PRESETS.items():
        assert preset.model.startswith("Llama-3.1-"), name
        assert preset.max_model_len == 131072 == SchedulerConfig(**preset.capacity()).max_model_len, name
    # a 40k-token prompt, as in the Mooncake trace, runs under the preset instead of being rejected
    cost = ROOFLINE_PRESETS["h100-llama3-8b"]
    w = workload([40_160, 200], max_tokens=6)
    s = summarize(run_workload(w, "chunked", SchedulerConfig(**cost.capacity()), [SyntheticBackend(cost)]))
    assert s["finish_reasons"] == {"length": 2}
