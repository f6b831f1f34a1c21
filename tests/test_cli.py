"""The `tokenstep` CLI, called in-process: defaults, --json contract, errors, TOML configs, every command."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sim import cli
from sim.cli import main
from sim.cli_runs import parse_run_spec, split_specs
from sim.progress import Progress

FIXTURES = Path(__file__).parent / "fixtures"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONTRACT = {"policy", "num_requests", "num_finished", "num_rejected", "duration_s", "throughput_rps",
            "output_tokens_per_s", "ttft_s", "tpot_s", "e2e_s", "preemptions", "prefix_hit_rate"}  # fmt: skip
TINY = ["--num-requests", "12", "--rate", "2", "--no-plots", "--quiet"]


def run_json(capsys, argv: list[str]) -> dict:
    """Run with --json; stdout must be exactly one JSON object."""
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)  # raises if anything but one JSON value is on stdout
    assert isinstance(doc, dict) and out.strip().startswith("{") and out.count("\n") == 1
    return doc


def test_no_argument_compare_prints_the_comparison(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["compare"]) == 0
    out = capsys.readouterr().out
    for text in ("static", "continuous", "chunked", "continuous (no prefix sharing)", "TTFT p50", "x vs static",
                 "time_scale=1.5, length_scale=0.1", "cost model: cpu-gemma3-270m"):
        assert text in out
    (folder,) = (tmp_path / "results").iterdir()
    assert folder.name.startswith("compare-")
    summary = json.loads((folder / "summary.json").read_text())
    assert [r["policy"] for r in summary["runs"]] == ["static", "continuous", "chunked",
                                                      "continuous (no prefix sharing)"]
    assert summary["config"]["cost_model"]["name"].startswith("cpu-gemma3-270m")
    assert summary["config"]["seed"] == 0 and "default workload" in summary["config"]["workload"]["description"]
    runs = {r["policy"]: r for r in summary["runs"]}
    assert runs["continuous"]["prefix_hit_rate"] > 0 == runs["continuous (no prefix sharing)"]["prefix_hit_rate"]
    for name in ("latency_cdfs.png", "timelines.png", "timeline_static.png"):
        assert (folder / name).read_bytes().startswith(PNG_SIGNATURE)


def test_json_prints_one_object_with_the_contract_keys(tmp_path, capsys):
    doc = run_json(capsys, ["compare", "--limit", "20", "--no-plots", "--out", str(tmp_path)])
    assert [r["policy"] for r in doc["runs"]][:2] == ["static", "continuous"]
    for summary in doc["runs"]:
        assert CONTRACT <= set(summary)
        assert summary["num_requests"] == 20
        assert set(summary["ttft_s"]) == {"mean", "p50", "p90", "p99"}
    assert doc["out_dir"] == str(tmp_path) and doc["cost_model"].startswith("cpu-gemma3-270m")
    assert (tmp_path / "summary.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--bogus-flag"], "unrecognized arguments"),
        (["compare", "--rate", "fast"], "--rate"),
        (["compare", "--trace", "no/such/trace.csv"], "no/such/trace.csv"),
        (["compare", "--trace", str(FIXTURES / "broken" / "azure_bad_int.csv")], "line 4"),
        (["compare", "--policies", "static,nosuchpolicy"], "unknown policy 'nosuchpolicy'"),
        (["simulate", "--policy", "static:batch_sz=2"], "batch_sz"),
        (["simulate", "--cost", "nosuchcost"], "unknown cost model"),
        (["simulate", "--prompt-len", "weird:3"], "unknown length model"),
        (["capacity", "--num-requests", "5"], "needs --slo"),
        (["simulate", "--num-requests", "5", "--limit", "3"], "--limit"),
        ([], "usage"),
    ],
)
def test_bad_usage_exits_2_with_a_message(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path)] if argv else argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_json_errors_leave_stdout_empty(capsys):
    assert main(["compare", "--json", "--trace", str(FIXTURES / "broken" / "azure_bad_timestamp.csv")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "line" in captured.err


def test_internal_failure_exits_1_with_traceback(monkeypatch, capsys):
    import sim.cli_simulate

    def boom(args):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(sim.cli_simulate, "run", boom)
    assert main(["simulate"]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "kaboom" in err and "Traceback" in err


def test_llama_backend_without_the_extra_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sim.real", None)  # import raises ImportError
    assert main(["compare", "--backend", "llama", "--limit", "3", "--out", str(tmp_path)]) == 2
    assert "pip install -e '.[llama]'" in capsys.readouterr().err


@pytest.mark.parametrize("package", ["simpy", "numpy"])
def test_a_missing_required_package_exits_2_naming_it_and_the_install_command(package):
    # a fresh interpreter, so the package's absence reaches every import of it
    code = (f"import sys; sys.modules[{package!r}] = None\n"
            "from sim.cli import main\n"
            "sys.exit(main(['compare']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr
    assert f"the package {package!r} is not installed" in proc.stderr and "pip install -e ." in proc.stderr
    assert "Traceback" not in proc.stderr and "warning" not in proc.stderr


def test_a_missing_module_of_our_own_is_still_an_internal_error(monkeypatch, capsys):
    import sim.cli_simulate

    def boom(args):
        raise ModuleNotFoundError("No module named 'sim.nothing'", name="sim.nothing")

    monkeypatch.setattr(sim.cli_simulate, "run", boom)
    assert main(["simulate"]) == 1
    assert "internal error" in capsys.readouterr().err


def test_toml_config_sets_flags_and_flags_win(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('num_requests = 9\nrate = 3\npolicies = ["static", "continuous"]\nno_plots = true\n'
                      'max-num-seqs = 4\n[sweep]\nrates = [1, 2]\n')
    doc = run_json(capsys, ["compare", "--config", str(config), "--policies", "chunked", "--out", str(tmp_path / "a")])
    assert [r["policy"] for r in doc["runs"]] == ["chunked"]
    assert doc["runs"][0]["num_requests"] == 9
    saved = json.loads((tmp_path / "a" / "summary.json").read_text())["config"]
    assert saved["scheduler"]["max_num_seqs"] == 4 and saved["flags"]["rate"] == 3.0
    assert not list((tmp_path / "a").glob("*.png"))
    doc = run_json(capsys, ["sweep", "--config", str(config), "--out", str(tmp_path / "b")])
    assert sorted({r["rate"] for r in doc["runs"]}) == [1.0, 2.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [("num_requests = 5\nbatch_sizes = 3\n", "unknown key 'batch_sizes'"),
     ("rate = 'abc'\n", "key 'rate'"),
     ("json = 'yes'\n", "switch"),
     ("rate = \n", "not valid TOML")],
)
def test_bad_toml_config_exits_2_naming_key_and_file(tmp_path, capsys, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert main(["compare", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(config) in err


def test_sweep_grid_over_rates_policies_and_a_parameter(tmp_path, capsys):
    doc = run_json(capsys, ["sweep", "--rates", "1,4", "--policies", "static,continuous",
                            "--param", "max_num_seqs=2,8", *TINY, "--out", str(tmp_path)])
    points = {(r["policy"], r["rate"]) for r in doc["runs"]}
    assert len(points) == 8
    assert ("continuous max_num_seqs=2", 4.0) in points
    assert all(r["num_finished"] == 12 for r in doc["runs"])


def test_sweep_time_scales_a_trace_and_plots_rate_curves(tmp_path, capsys):
    argv = ["sweep", "--trace", str(FIXTURES / "azure_conv_50.csv"), "--length-scale", "0.1", "--rates", "1,3",
            "--policies", "continuous", "--quiet", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "time-scaled to each rate" in out
    assert (tmp_path / "rate_curves.png").read_bytes().startswith(PNG_SIGNATURE)


def test_capacity_brackets_and_bisects(tmp_path, capsys):
    argv = ["capacity", "--slo", "ttft=1,tpot=0.2", "--policies", "static,continuous", "--num-requests", "30",
            "--tolerance", "0.1", "--no-plots", "--quiet", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "step  1:" in out and "capacity (highest passing rate)" in out
    result = {c["policy"]: c for c in json.loads((tmp_path / "capacity.json").read_text())}
    for entry in result.values():
        lo, hi = entry["capacity_rps"], entry["lowest_failing_rps"]
        assert entry["bracketed"] and lo < hi and (hi - lo) / hi <= 0.1
        assert all(s["pass"] == (s["rate"] <= lo) for s in entry["steps"] if s["rate"] in (lo, hi))
    assert result["continuous"]["capacity_rps"] > result["static"]["capacity_rps"]


def test_simulate_writes_summary_and_pngs(tmp_path, capsys):
    argv = ["simulate", "--policy", "static:batch_size=4", "--num-requests", "10", "--rate", "3", "--quiet",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "static:batch_size=4" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["runs"][0]["num_finished"] == 10
    assert summary["config"]["workload"]["source"]["kind"] == "synthetic"
    for name in ("timeline.png", "latency_cdfs.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("argv", [["--help"], ["compare", "--help"], ["capacity", "--help"]])
def test_help_lists_policies_arrivals_formats_and_cost_models(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in ("continuous", "static", "chunked", "poisson", "burstgpt", "mooncake", "h100-llama3-8b",
                 "cpu-gemma3-270m-placeholder", "+noprefix"):
        assert text in out


def test_registry_skips_modules_that_do_not_exist(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "frobnicate", ("sim.cli_frobnicate_missing", "add_arguments", "run"))
    assert main(["--help"]) == 0
    assert "frobnicate" not in capsys.readouterr().out


def test_policy_lists_and_run_options():
    assert split_specs("static:batch_size=8,wait_s=1,continuous+noprefix;chunked") == [
        "static:batch_size=8,wait_s=1", "continuous+noprefix", "chunked"]
    spec = parse_run_spec("continuous+noprefix")
    assert spec.prefix_caching is False and spec.label == "continuous (no prefix sharing)"
    spec = parse_run_spec("static", {"batch_size": "4", "max_num_seqs": "8"})
    assert spec.policy == "static:batch_size=4" and spec.config_overrides == {"max_num_seqs": "8"}


def test_progress_bar_draws_only_when_enabled():
    stream = io.StringIO()
    bar = Progress("run", enabled=True, stream=stream, delay_s=0.0, min_interval_s=0.0)
    bar(5, 10)
    bar.close()
    assert "5/10" in stream.getvalue() and stream.getvalue().endswith("\n")
    quiet = io.StringIO()
    with Progress("run", enabled=False, stream=quiet, delay_s=0.0) as bar:
        bar(10, 10)
    assert quiet.getvalue() == ""


def _real_compare(tmp_path, capsys, *extra):
    argv = ["compare", "--backend", "llama", "--policies", "continuous,static", "--num-requests", "6",
            "--prompt-len", "24", "--output-len", "6", "--rate", "4", "--out", str(tmp_path), "--json", "--no-plots",
            "--quiet", *extra]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    measured = [r for r in doc["runs"] if not r["policy"].endswith("(sim)")]
    predicted = [r for r in doc["runs"] if r["policy"].endswith("(sim)")]
    return doc, measured, predicted


def test_real_compare_probes_the_speed_and_prices_its_predictions_with_it(tmp_path, capsys, default_model_path):
    doc, measured, predicted = _real_compare(tmp_path, capsys, "--probe-requests", "6")
    assert [r["policy"] for r in measured] == ["continuous", "static"]
    assert [r["policy"] for r in predicted] == ["continuous (sim)", "static (sim)"]
    assert all(r["num_finished"] == 6 for r in doc["runs"])
    probes = doc["speed_probes"]
    assert len(probes) == 3  # before the first strategy and after each one
    assert all(p["requests"] == 6 and p["steps"] >= 6 and p["policy"] == "continuous" for p in probes)
    for i, (m, p) in enumerate(zip(measured, predicted, strict=True)):
        # each prediction at the mean of the probes just before and just after its own run
        speed = p["speed_probe"]
        assert speed["before"] == probes[i] and speed["after"] == probes[i + 1]
        assert speed["run_factor"] == pytest.approx((probes[i]["run_factor"] + probes[i + 1]["run_factor"]) / 2)
        assert p["run_factors"] == {"decode": pytest.approx(speed["run_factor"]),
                                    "prompt": pytest.approx(speed["prefill_run_factor"]), "from": "speed probes",
                                    "decode_by_batch": speed["decode_batch_factors"]}
        # decode-only steps priced by batch size, from both probes' decode steps together
        sizes = sorted({row[0] for q in (probes[i], probes[i + 1]) for row in q["by_batch"]})
        assert [b for b, _ in speed["decode_batch_factors"]] == sizes and sizes
        # the error table's numbers: (predicted - measured) / measured, cell by cell
        rel = p["rel_error"]
        assert rel["ttft_s"]["mean"] == pytest.approx((p["ttft_s"]["mean"] - m["ttft_s"]["mean"]) / m["ttft_s"]["mean"])
        assert rel["throughput_rps"] == pytest.approx((p["throughput_rps"] - m["throughput_rps"]) / m["throughput_rps"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [p["run_factor"] for p in summary["config"]["speed_probes"]] == [p["run_factor"] for p in probes]


def test_real_compare_without_probes_prices_at_the_profile_and_says_so(tmp_path, capsys, default_model_path):
    from backends.cost import load_cost_model

    argv = ["compare", "--backend", "llama", "--policies", "continuous", "--num-requests", "3", "--prompt-len", "16",
            "--output-len", "4", "--rate", "4", "--out", str(tmp_path), "--no-plots", "--quiet", "--probe-requests",
            "0"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    profile = load_cost_model("cpu-gemma3-270m")
    assert "simulator's error" in text and "no speed probe ran" in text
    assert f"x{profile.run_factor:.3f} decode-only steps" in text
    row = next(line for line in text.splitlines() if line.startswith("continuous (sim)"))
    assert row.count("%") == 7  # TTFT mean/p90, TPOT mean/p90, E2E mean/p90, throughput
    assert row.split("|")[-2:] == [f"{profile.run_factor:>11.3f} ", f"{profile.factor(True):>11.3f}"]


def test_probe_requests_belong_to_the_real_backend(capsys):
    assert main(["compare", "--probe-requests", "4"]) == 2
    assert "--probe-requests applies to --backend llama" in capsys.readouterr().err
