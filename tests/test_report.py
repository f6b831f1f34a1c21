"""Tables, result files and plots."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from sim.metrics import summarize
from sim.plots import plot_compare_timelines, plot_latency_cdfs, plot_rate_curves, plot_timeline
from sim.records import RequestRecord, RunResult, StepSample
from sim.report import format_ratio, format_table, format_time, write_results

CONTRACT = {
    "policy", "num_requests", "num_finished", "num_rejected", "num_aborted", "num_errors", "duration_s",
    "throughput_rps", "output_tokens_per_s", "total_tokens_per_s", "ttft_s", "tpot_s", "itl_s", "e2e_s",
    "queue_s", "preemptions", "recomputed_tokens", "prefix_hit_rate", "mean_batch_size", "mean_kv_usage",
    "max_kv_usage", "mean_queue_depth", "num_steps", "ttft_timing",
}  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(policy: str, num: int = 12, batch: int = 4, gap: float = 0.25) -> RunResult:
    """Requests arriving every gap seconds, served in fixed batches of `batch` with 0.1 s steps."""
    records, steps = [], []
    t = 0.0
    for start in range(0, num, batch):
        group = list(range(start, min(start + batch, num)))
        t = max(t, group[-1] * gap)
        for i in group:
            tokens = [t + 0.1 * (k + 1) for k in range(4 + i % 3)]
            records.append(
                RequestRecord(
                    request_id=f"r{i}", arrival_s=i * gap, num_prompt_tokens=8, max_tokens=6,
                    first_scheduled_s=t, first_token_s=tokens[0], finish_s=tokens[-1], token_times_s=tokens,
                    num_output_tokens=len(tokens), num_cached_tokens=2, finish_reason="length",
                )
            )  # fmt: skip
        end = max(r.finish_s for r in records[-len(group) :])
        k = 0
        while t + 1e-9 < end:
            steps.append(StepSample(0, t, t + 0.1, len(group) - (k > 4), 8 * len(group) * (k == 0), len(group),
                                    max(0, num - group[-1] - 1), len(group), 3 + k, 16))  # fmt: skip
            t += 0.1
            k += 1
    records.append(RequestRecord("rej", 0.3, 9999, 4, finish_s=0.3, finish_reason="rejected"))
    return RunResult(policy, records, steps, max(r.finish_s for r in records))


@pytest.fixture(scope="module")
def runs():
    return [make_run("static:batch=4"), make_run("continuous", batch=2)]


def test_format_time_units():
    assert format_time(0.0123) == "12.3 ms"
    assert format_time(2.5) == "2.50 s"
    assert format_time(None) == "-"


def test_table_has_runs_side_by_side(runs):
    summaries = [summarize(r) for r in runs]
    table = format_table(summaries, title="static vs continuous")
    lines = table.splitlines()
    assert lines[0] == "static vs continuous"
    assert "static:batch=4" in lines[1] and "continuous" in lines[1]
    row = next(line for line in lines if line.startswith("requests finished"))
    assert [c.strip() for c in row.split("|")[1:]] == ["12", "12"]
    thr = next(line for line in lines if line.startswith("throughput"))
    assert f"{summaries[0]['throughput_rps']:.2f} req/s" in thr
    ttft = next(line for line in lines if line.startswith("TTFT p50"))
    assert f"{summaries[1]['ttft_s']['p50'] * 1e3:.1f} ms" in ttft
    assert "TTFT taken when the first token is computed" in table
    for label in ("rejected", "output tokens", "TPOT p99", "E2E p99", "queue p50", "preemptions",
                  "prefix hit rate", "mean batch size", "KV usage max"):  # fmt: skip
        assert label in table


def test_table_baseline_ratios_and_goodput(runs):
    base = summarize(runs[0], slo={"ttft": 1.0})
    fast = dict(base, policy="continuous", throughput_rps=2 * base["throughput_rps"])
    table = format_table([base, fast], baseline=0)
    assert "continuous x vs static:batch=4" in table
    thr = next(line for line in table.splitlines() if line.startswith("throughput"))
    assert thr.rstrip().endswith("2.00x")
    assert "goodput" in table and "SLO attainment" in table


def _row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(label + " ") or line == label)
    return [c.strip() for c in line.split("|")[1:]]


def test_table_shows_p90(runs):
    s = summarize(runs[1])
    table = format_table([s])
    assert _row(table, "TTFT p90") == [f"{s['ttft_s']['p90'] * 1e3:.1f} ms"]
    assert _row(table, "E2E p90") == [format_time(s["e2e_s"]["p90"])]
    assert _row(table, "TPOT p90") == [format_time(s["tpot_s"]["p90"])]


@pytest.mark.parametrize(("ratio", "text"), [(2.0, "2.00x"), (0.5, "0.50x"), (0.1, "0.10x"), (0.004, "0.004x"),
                                             (0.0031, "0.0031x"), (0.0999, "0.1x"), (2e-6, "2.0e-06x"), (0.0, "0x")])
def test_ratio_never_reads_zero_point_zero_zero(ratio, text):
    assert format_ratio(ratio) == text


def test_small_ratio_columns_keep_their_digits(runs):
    base = summarize(runs[0])
    slow = dict(base, policy="continuous", throughput_rps=0.003 * base["throughput_rps"])
    table = format_table([base, slow], baseline=0)
    assert _row(table, "throughput")[-1] == "0.003x"
    assert "0.00x" not in table


def test_multi_instance_run_shows_each_instance_load():
    run = make_run("continuous")
    for i, r in enumerate(run.records):
        r.instance = i % 3 if r.request_id != "rej" else 0
    run.config = {"num_instances": 4}  # instance 3 got nothing: it must still show
    s = summarize(run)
    load = s["instance_load"]
    assert list(load) == ["0", "1", "2", "3"]
    assert [v["num_requests"] for v in load.values()] == [5, 4, 4, 0]
    assert load["0"]["num_prompt_tokens"] == 4 * 8 + 9999
    assert sum(v["num_output_tokens"] for v in load.values()) == sum(r.num_output_tokens for r in run.records)
    table = format_table([s])
    assert _row(table, "requests by instance") == ["5 / 4 / 4 / 0"]
    assert _row(table, "prompt tokens by instance") == ["10k / 32 / 32 / 0"]
    assert _row(table, "requests max / mean") == ["1.54"]
    assert "instance_load" not in summarize(make_run("one"))  # one instance: no per-instance rows
    assert "requests by instance" not in format_table([summarize(make_run("one"))])


def test_table_columns_and_errors(runs):
    s = [summarize(r) for r in runs]
    assert "A" in format_table(s, columns=["A", "B"]).splitlines()[0]
    with pytest.raises(ValueError, match="one name per run"):
        format_table(s, columns=["A"])
    with pytest.raises(ValueError, match="baseline"):
        format_table(s, baseline=5)


def test_table_of_empty_run():
    table = format_table([summarize(RunResult("empty", [], [], 0.0))])
    assert "empty" in table and "-" in table


def test_write_results(tmp_path, runs):
    had_llama = "llama_cpp" in sys.modules
    runs = [*runs, make_run("chunked:budget=64,x")]
    summaries = [summarize(r, slo={"ttft": 0.5}) for r in runs]
    paths = write_results(tmp_path / "out", runs, summaries, {"seed": 1, "rate": float("inf")})
    assert had_llama or "llama_cpp" not in sys.modules  # versions() must not import it
    doc = json.loads(paths["summary.json"].read_text())
    assert set(doc) == {"runs", "config", "versions", "created"}
    assert CONTRACT | {"goodput_rps", "slo_attainment"} <= set(doc["runs"][0])
    assert doc["config"] == {"seed": 1, "rate": None}
    assert {"python", "numpy", "simpy", "tokenstep"} <= set(doc["versions"])
    with paths["summary.csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["policy"] for r in rows] == [r.policy for r in runs]
    assert float(rows[0]["ttft_s_p50"]) == pytest.approx(summaries[0]["ttft_s"]["p50"])
    req_path = tmp_path / "out" / "requests_chunked_budget_64_x.csv"
    assert paths[req_path.name] == req_path
    with req_path.open() as fh:
        reqs = list(csv.DictReader(fh))
    assert len(reqs) == len(runs[2].records)
    assert "token_times_s" not in reqs[0] and "text" not in reqs[0]
    assert {"request_id", "finish_reason", "ttft_s", "tpot_s", "e2e_s", "queue_s"} <= set(reqs[0])
    first = runs[2].records[0]
    assert float(reqs[0]["ttft_s"]) == pytest.approx(first.first_token_s - first.arrival_s)
    assert reqs[-1]["finish_reason"] == "rejected" and reqs[-1]["ttft_s"] == ""
    with (tmp_path / "out" / "steps_static_batch_4.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(runs[0].steps)


def test_requests_csv_is_what_a_dict_writer_writes(tmp_path):
    from sim.metrics import reason, request_latencies
    from sim.report import REQUEST_COLUMNS

    run = make_run("p")
    run.records[1].detail = 'a "quoted", comma'
    write_results(tmp_path, [run], [summarize(run)], {})
    with (tmp_path / "want.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(REQUEST_COLUMNS))
        writer.writeheader()
        for r in run.records:
            row = {name: getattr(r, name) for name in REQUEST_COLUMNS if hasattr(r, name)}
            row["finish_reason"] = reason(r)
            row.update(request_latencies(r))
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    assert (tmp_path / "requests_p.csv").read_bytes() == (tmp_path / "want.csv").read_bytes()


def test_write_results_same_policy_twice(tmp_path):
    runs = [make_run("p"), make_run("p")]
    paths = write_results(tmp_path, runs, [summarize(r) for r in runs], {})
    assert "requests_p.csv" in paths and "requests_p_2.csv" in paths


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000


def test_plot_latency_cdfs(tmp_path, runs):
    _check_png(plot_latency_cdfs(runs, tmp_path / "a" / "cdf.png"))


def test_plot_rate_curves(tmp_path):
    points = [
        {"policy": p, "rate": rate, "summary": summarize(make_run(p, gap=1 / rate, batch=b))}
        for p, b in (("static", 4), ("continuous", 1))
        for rate in (1.0, 2.0, 4.0)
    ]
    _check_png(plot_rate_curves(points, tmp_path / "rate.png"))


def test_plot_timeline(tmp_path, runs):
    _check_png(plot_timeline(runs[0], tmp_path / "timeline.png"))
    _check_png(plot_timeline(runs[1], tmp_path / "timeline_short.png", max_requests=5))


def test_plot_compare_timelines(tmp_path, runs):
    _check_png(plot_compare_timelines(runs, tmp_path / "cmp" / "compare.png"))


def test_plots_of_empty_run(tmp_path):
    empty = RunResult("empty", [], [], 0.0)
    assert plot_latency_cdfs([empty], tmp_path / "e1.png").exists()
    assert plot_timeline(empty, tmp_path / "e2.png").exists()
    assert plot_rate_curves([], tmp_path / "e3.png").exists()
