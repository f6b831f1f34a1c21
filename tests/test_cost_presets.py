"""GPU presets users can adjust and check: the H200 roofline, --cost NAME:param=value overrides, `cost show`,
and fitting a roofline's efficiencies and overhead to a per-request log (calib.fit_log)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from backends.cost import CostModelError, RooflineCostModel, load_cost_model
from calib.fit_log import LoggedRequest, fit_roofline, predict_log, read_request_log, simulate, workload_from_log
from scheduler import SchedulerConfig
from sim.cli import main


def test_h200_presets_use_the_datasheet_and_hold_the_70b_on_two_gpus():
    m = load_cost_model("h200-llama3-8b")
    h100 = load_cost_model("h100-llama3-8b")
    assert isinstance(m, RooflineCostModel) and m.hbm_tb_s == 4.8 and m.peak_tflops == h100.peak_tflops
    assert m.kv_capacity_tokens > 1.9 * h100.kv_capacity_tokens  # 140 GiB against 80, the same weights
    assert load_cost_model("h200-llama3-70b").num_gpus == 2


def test_overrides_change_the_named_parameters_only():
    m = load_cost_model("h200-llama3-8b:mfu=0.7,overhead_s=0.001,gpu=H200-NVL")
    base = load_cost_model("h200-llama3-8b")
    assert (m.mfu, m.overhead_s, m.gpu) == (0.7, 0.001, "H200-NVL")
    assert replace(m, mfu=base.mfu, overhead_s=base.overhead_s, gpu=base.gpu, name=base.name) == base
    assert load_cost_model("cpu-gemma3-270m:run_factor=1.25").run_factor == 1.25


@pytest.mark.parametrize("spec, message", [
    ("h200-llama3-8b:mfu=1.5", "mfu is a fraction of peak"),
    ("h200-llama3-8b:flops=1", "no such parameter; they have block_size"),
    ("h200-llama3-8b:mfu", "must look like param=value"),
    ("h200-llama3-8b:mfu=fast", "'fast' is not a number"),
    ("cpu-gemma3-270m:ubatch_tokens=3", "only scalar parameters"),
    ("no-such-gpu:mfu=0.5", "unknown cost model 'no-such-gpu'"),
])
def test_bad_overrides_are_refused_naming_the_parameter(spec, message):
    with pytest.raises(CostModelError, match=message):
        load_cost_model(spec)


def test_cost_show_prints_the_parameters_and_a_loadable_file(capsys, tmp_path):
    assert main(["cost", "show", "h200-llama3-8b:mbu=0.65"]) == 0
    out = capsys.readouterr().out
    assert "H200-SXM-141GB" in out and "mbu                     0.65" in out and "scheduler capacity" in out
    assert main(["cost", "show", "h200-llama3-8b", "--json"]) == 0
    path = tmp_path / "my-gpu.json"
    path.write_text(capsys.readouterr().out)
    assert load_cost_model(str(path)).to_dict()["params"] == load_cost_model("h200-llama3-8b").to_dict()["params"]
    assert main(["cost", "list"]) == 0 and "h200-llama3-8b" in capsys.readouterr().out.split()
    assert main(["cost", "show", "nope"]) == 2


# -- fitting a roofline to a request log ------------------------------------------------------------------------


def _log(model: RooflineCostModel, n: int, rate: float, seed: int) -> list[LoggedRequest]:
    """A request log as an engine priced by `model` would write it: long prompts, so KV reads count."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    shape = [LoggedRequest(float(a), int(p), int(o), 1.0, 2.0)
             for a, p, o in zip(arrivals, rng.integers(500, 6000, n), rng.integers(20, 200, n), strict=True)]
    ttft, e2e = simulate(model, workload_from_log(shape), "continuous", SchedulerConfig(**model.capacity()))
    return [replace(r, ttft_s=float(t), e2e_s=float(e)) for r, t, e in zip(shape, ttft, e2e, strict=True)]


def test_fit_recovers_the_parameters_that_made_the_log():
    base = load_cost_model("h200-llama3-8b")
    truth = replace(base, mfu=0.32, mbu=0.61, overhead_s=0.0045)
    fit = fit_roofline(base, _log(truth, 40, 3.0, seed=1))
    for name in ("mfu", "mbu", "overhead_s"):
        assert fit.params[name] == pytest.approx(getattr(truth, name), rel=0.05), name
    assert all(abs(e) < 2 for e in fit.errors.values()), fit.errors
    # fitted at one load, it predicts two others
    for rate in (1.0, 6.0):
        errs = predict_log(fit.model, _log(truth, 40, rate, seed=2))
        assert abs(errs["ttft_s mean"]) < 3 and abs(errs["e2e_s mean"]) < 3, (rate, errs)


def test_an_unfitted_preset_predicts_such_a_log_badly():
    """The check above can fail: the datasheet defaults miss the same log by far more than the tolerance."""
    base = load_cost_model("h200-llama3-8b")
    errs = predict_log(base, _log(replace(base, mfu=0.32, mbu=0.61, overhead_s=0.0045), 40, 3.0, seed=1))
    assert abs(errs["e2e_s mean"]) > 10


def test_read_request_log_accepts_bench_and_vllm_names_and_refuses_bad_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    rows = [{"arrival_s": 0.5, "num_prompt_tokens": 100, "num_output_tokens": 10, "ttft_s": 0.05, "e2el_s": 0.5},
            {"arrival_ms": 0, "prompt_tokens": 80, "completion_tokens": 5, "ttft_ms": 40, "e2e_ms": 200},
            {"arrival_s": 1.0, "num_prompt_tokens": 50, "num_output_tokens": 0, "ttft_s": None, "e2e_s": 0.1}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = read_request_log(path)
    assert got == [LoggedRequest(0.0, 80, 5, 0.04, 0.2), LoggedRequest(0.5, 100, 10, 0.05, 0.5)]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[0], "ttft_s": "soon"}) + "\n")
    with pytest.raises(ValueError, match=r"log.jsonl line 2, field 'ttft_s': 'soon' is not a finite number"):
        read_request_log(path)
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"arrival_s": 1, "ttft_s": 1, "e2e_s": 2}) + "\n")
    with pytest.raises(ValueError, match="line 2: no num_prompt_tokens field"):
        read_request_log(path)


def test_calibrate_from_log_writes_a_fitted_roofline(tmp_path, capsys):
    truth = replace(load_cost_model("h200-llama3-8b"), mfu=0.4, mbu=0.7, overhead_s=0.003)
    fit_path, other = tmp_path / "fit.jsonl", tmp_path / "other.jsonl"
    for path, rate, seed in ((fit_path, 3.0, 1), (other, 5.0, 2)):
        path.write_text("".join(json.dumps({"arrival_s": r.arrival_s, "num_prompt_tokens": r.num_prompt_tokens,
                                            "num_output_tokens": r.num_output_tokens, "ttft_s": r.ttft_s,
                                            "e2e_s": r.e2e_s}) + "\n" for r in _log(truth, 30, rate, seed)))
    out = tmp_path / "fitted.json"
    argv = ["calibrate", "--from-log", str(fit_path), "--cost", "h200-llama3-8b", "--predict", str(other),
            "--out", str(out), "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    fitted = load_cost_model(str(out))
    assert fitted.mfu == pytest.approx(0.4, rel=0.05) and doc["params"]["mbu"] == pytest.approx(0.7, rel=0.05)
    assert abs(doc["predictions"][str(other)]["e2e_s mean"]) < 3
    assert main(["calibrate", "--from-log", str(fit_path), "--cost", "cpu-gemma3-270m"]) == 2


def test_quantized_weights_and_a_separate_kv_dtype():
    """dtype_bytes may be fractional (llama.cpp's Q4_K_M is about 0.56 bytes per weight); the KV keeps its own
    element size, and a file without kv_dtype_bytes reads as before (KV at dtype_bytes)."""
    from backends.cost import load_cost_model
    from backends.cost.roofline import RooflineCostModel

    base = load_cost_model("h200-llama3-8b").to_dict()["params"]
    old = {k: v for k, v in base.items() if k != "kv_dtype_bytes"}
    same = RooflineCostModel.from_dict(old, {}, "old", "old.json")
    assert same.kv_dtype_bytes == same.dtype_bytes == 2
    q4 = RooflineCostModel.from_dict({**old, "dtype_bytes": 0.5625, "kv_dtype_bytes": 2}, {}, "q4", "q4.json")
    assert q4.weight_bytes == pytest.approx(same.weight_bytes * 0.5625 / 2)
    assert q4.kv_bytes_per_token == same.kv_bytes_per_token
    assert q4.kv_capacity_tokens > same.kv_capacity_tokens  # smaller weights leave more room for KV
    fp8_kv = RooflineCostModel.from_dict({**old, "kv_dtype_bytes": 1}, {}, "kv8", "kv8.json")
    assert fp8_kv.kv_bytes_per_token == same.kv_bytes_per_token / 2
    with pytest.raises(CostModelError, match="dtype_bytes"):
        RooflineCostModel.from_dict({**old, "dtype_bytes": 0}, {}, "bad", "bad.json")
