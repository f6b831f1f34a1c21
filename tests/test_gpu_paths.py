"""GPU code paths that run on the CPU: --n-gpu-layers/--device pass-through, sampling inside llama_decode
(device_sampling, the GPU default) against the host argmax, the threaded host argmax, and loading a model after
every CLI module is imported (numpy.linalg and matplotlib first)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from backends.llamacpp import LlamaCppBackend
from backends.llamacpp_sampling import _PARALLEL_ARGMAX_FLOATS
from backends.models import LlamaModel
from scheduler.messages import ScheduledChunk, StepPlan
from scheduler.request import SamplingParams
from sim.cli_common import UsageError, add_backend_args, add_gpu_args, gpu_layers

# -- flags --------------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_backend_args(p)
    return p.parse_args(list(argv))


def test_gpu_flags_give_the_layers_to_offload():
    assert gpu_layers(_args()) is None
    assert gpu_layers(_args("--n-gpu-layers", "12")) == 12
    assert gpu_layers(_args("--device", "cuda")) == 99
    assert gpu_layers(_args("--device", "cpu")) == 0
    assert gpu_layers(_args("--device", "cuda", "--n-gpu-layers", "99")) == 99
    with pytest.raises(UsageError, match="--device cpu means --n-gpu-layers 0"):
        gpu_layers(_args("--device", "cpu", "--n-gpu-layers", "5"))
    with pytest.raises(SystemExit):
        _args("--n-gpu-layers", "-1")
    p = argparse.ArgumentParser()
    add_gpu_args(p)  # the commands with their own flags (generate, calibrate, validate, serve) take the same two
    assert gpu_layers(p.parse_args(["--device", "gpu"])) == 99


def test_compare_passes_the_layers_to_the_model_load(monkeypatch):
    import sim.cli_runs as runs
    from sim.cli import build_parser

    parser, _ = build_parser("compare")
    args = parser.parse_args(["compare", "--backend", "llama", "--n-gpu-layers", "7"])
    assert runs.llama_options(args)["n_gpu_layers"] == 7
    args = parser.parse_args(["compare", "--backend", "llama", "--device", "cuda"])
    assert runs.llama_options(args)["n_gpu_layers"] == 99
    assert "n_gpu_layers" not in runs.llama_options(parser.parse_args(["compare", "--backend", "llama"]))
    args = parser.parse_args(["compare", "--n-gpu-layers", "7"])  # the simulator has no GPU to offload to
    with pytest.raises(UsageError, match="--n-gpu-layers/--device apply to --backend llama"):
        runs.prepare(args, "compare")


def test_make_llama_instances_loads_the_model_with_the_layers(monkeypatch):
    import backends.models as models
    from sim.real import close_instances, make_llama_instances

    seen = []
    real_init = models.LlamaModel.__init__

    def spy(self, *a, **kw):
        seen.append(kw.get("n_gpu_layers"))
        real_init(self, *a, **kw)

    monkeypatch.setattr(models.LlamaModel, "__init__", spy)
    backends, _ = make_llama_instances(None, 1, {"n_gpu_layers": 0, "n_ctx": 512, "n_seq_max": 2})
    try:
        assert seen == [0] and backends[0].model.n_gpu_layers == 0
        assert backends[0].device_sampling is False  # CPU: host sampling unless asked
    finally:
        close_instances(backends)


# -- sampling inside llama_decode ------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    m = LlamaModel()
    yield m
    m.close()


def _run(be: LlamaCppBackend, prompts, steps: int, sampling=None) -> dict[str, list[int]]:
    """Prefill every prompt in one step, then decode `steps` steps feeding each token back."""
    be.clear_kv()
    ids = [f"r{i}" for i in range(len(prompts))]
    sp = sampling or {}
    plan = StepPlan(0, 0.0, tuple(ScheduledChunk(r, i, 0, p, True, sampling=sp.get(r)) for i, (r, p)
                                  in enumerate(zip(ids, prompts, strict=True))))
    toks = be.step(plan).sampled_token_ids
    out = {r: [toks[r]] for r in ids}
    pos = len(prompts[0])
    for k in range(steps):
        chunks = tuple(ScheduledChunk(r, i, pos, (toks[r],), True, is_decode=True, sampling=sp.get(r))
                       for i, r in enumerate(ids))
        toks = be.step(StepPlan(k + 1, 0.0, chunks)).sampled_token_ids
        for r in ids:
            out[r].append(toks[r])
        pos += 1
    be.step(StepPlan(steps + 1, 0.0, (), finished_request_ids=tuple(ids)))
    return out


def _prompts(n: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [tuple(int(t) for t in rng.integers(1000, 30000, length)) for _ in range(n)]


def test_device_sampling_gives_the_host_argmax_tokens(model):
    prompts = _prompts(4, 12)
    with LlamaCppBackend(model, n_ctx=1024, n_seq_max=4, device_sampling=False) as host:
        want = _run(host, prompts, 6)
    with LlamaCppBackend(model, n_ctx=1024, n_seq_max=4, device_sampling=True) as dev:
        assert dev.device_sampling
        got = _run(dev, prompts, 6)
    assert got == want
    assert len({tuple(v) for v in want.values()}) == 4  # four different continuations: slots not mixed up


def test_device_sampling_hands_non_greedy_requests_the_host_logits(model):
    prompts = _prompts(3, 10, seed=1)
    sampling = {"r1": SamplingParams(temperature=0.9, top_k=40, seed=5)}
    with LlamaCppBackend(model, n_ctx=1024, n_seq_max=3, device_sampling=False) as host:
        want = _run(host, prompts, 5, sampling)
    with LlamaCppBackend(model, n_ctx=1024, n_seq_max=3, device_sampling=True) as dev:
        got = _run(dev, prompts, 5, sampling)
        assert dev._host_slots == {1}
        again = _run(dev, prompts, 5)  # the slot's request is greedy now: its device chain is back
        assert dev._host_slots == set()
    assert got == want
    with LlamaCppBackend(model, n_ctx=1024, n_seq_max=3, device_sampling=False) as host:
        assert again == _run(host, prompts, 5)


def test_device_sampling_is_refused_with_return_logits(model):
    with pytest.raises(ValueError, match="cannot return_logits"):
        LlamaCppBackend(model, n_ctx=512, n_seq_max=2, device_sampling=True, return_logits=True)


def test_threaded_host_argmax_matches_numpy(model, monkeypatch):
    monkeypatch.setattr("backends.llamacpp_sampling._usable_cpus", lambda: 16)
    with LlamaCppBackend(model, n_ctx=512, n_seq_max=2, device_sampling=False) as be:
        rng = np.random.default_rng(3)
        rows = -(-_PARALLEL_ARGMAX_FLOATS // 1000) + 37
        logits = rng.standard_normal((rows, 1000), dtype=np.float32)
        assert be._argmax_rows(logits) == logits.argmax(axis=1).tolist()
        assert be._argmax_pool is not None  # the split path ran


# -- the model-load crash ------------------------------------------------------------------------


def test_model_loads_after_every_cli_module_is_imported():
    """numpy.linalg (OpenBLAS) and matplotlib loaded before llama.cpp must not break the model load."""
    code = textwrap.dedent("""
        import importlib, importlib.util
        import numpy.linalg, matplotlib.pyplot  # what sim.plots and the calibration modules import
        import calib, serve, sim
        from sim.cli import SUBCOMMANDS
        for module, _, _ in SUBCOMMANDS.values():
            if importlib.util.find_spec(module) is not None:
                importlib.import_module(module)
        from backends.llamacpp import LlamaCppBackend
        with LlamaCppBackend(n_ctx=256, n_seq_max=1) as be:
            print("loaded", be.vocab_size)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("loaded")


class _Stop(Exception):
    """Raised by a spy once it has seen what the command passes on."""


def test_generate_validate_and_calibrate_pass_the_layers_on(monkeypatch, tmp_path):
    import calib.calibrate
    import serve.engine
    import sim.real
    from sim.cli import build_parser

    seen: dict[str, object] = {}

    def spy(name):
        def record(*args, **kwargs):
            seen[name] = (args, kwargs)
            raise _Stop
        return record

    monkeypatch.setattr(serve.engine, "LLM", spy("generate"))
    monkeypatch.setattr(sim.real, "make_llama_instances", spy("validate"))
    monkeypatch.setattr(calib.calibrate, "calibrate", spy("calibrate"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    for argv in (["generate", "--input", str(prompts), "--n-gpu-layers", "12"],
                 ["validate", "--device", "cuda", "--quiet"],
                 ["calibrate", "--device", "cuda", "--out", str(tmp_path / "p.json")]):
        parser, _ = build_parser(argv[0])
        args = parser.parse_args(argv)
        with pytest.raises(_Stop):
            args._run(args)
    assert seen["generate"][1]["n_gpu_layers"] == 12
    assert seen["validate"][0][2]["n_gpu_layers"] == 99
    options = seen["calibrate"][0][1]
    assert options["n_gpu_layers"] == 99 and options["n_seq_max"] == 256 and options["kv_unified"] is True


def test_cuda_graphs_off_for_offloaded_unified_kv(monkeypatch):
    """An offloaded context with one unified KV stream turns llama.cpp's CUDA graphs off (they crashed there on an
    H200); a split KV keeps them; the CPU never touches the variable; a user's own setting and cuda_graphs win."""
    from backends.llamacpp import _cuda_graphs

    monkeypatch.delenv("GGML_CUDA_DISABLE_GRAPHS", raising=False)
    assert _cuda_graphs(None, 0, True) is False
    assert "GGML_CUDA_DISABLE_GRAPHS" not in os.environ
    assert _cuda_graphs(None, 99, False) is True
    assert "GGML_CUDA_DISABLE_GRAPHS" not in os.environ
    assert _cuda_graphs(True, 99, True) is True
    assert "GGML_CUDA_DISABLE_GRAPHS" not in os.environ
    assert _cuda_graphs(None, 99, True) is False
    assert os.environ["GGML_CUDA_DISABLE_GRAPHS"] == "1"
    monkeypatch.setenv("GGML_CUDA_DISABLE_GRAPHS", "")  # set by the user: llama.cpp sees it, we leave it
    assert _cuda_graphs(True, 99, False) is False
    assert os.environ["GGML_CUDA_DISABLE_GRAPHS"] == ""


def test_llama_options_take_one_pair_per_flag():
    import sim.cli_runs as runs
    from sim.cli import build_parser

    parser, _ = build_parser("compare")
    args = parser.parse_args(["compare", "--backend", "llama", "--llama-option", "n_ctx=262144",
                              "--llama-option", "kv_unified=true"])
    opts = runs.llama_options(args)
    assert opts["n_ctx"] == 262144 and opts["kv_unified"] is True
    args = parser.parse_args(["compare", "--backend", "llama", "--llama-option", "n_ctx=262144,n_seq_max=256"])
    with pytest.raises(UsageError, match="one per flag"):
        runs.llama_options(args)


def test_gpu_profiles_read_the_output_table_at_sparse_counts():
    from backends.cost.knots import output_knots, sparse_output_knots

    assert sparse_output_knots(256) == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    assert sparse_output_knots(100)[-3:] == (64, 96, 100)
    assert output_knots(16) == tuple(range(1, 17))  # the CPU's table: every count


def test_the_bundled_h200_profile_refits_from_its_samples(tmp_path):
    """The H200 calibration's grid and serving steps ship with it: a refit on any machine gives the bundled
    profile back (sparse output table, KV-range prices, the serving runs' factors and the wake-up curve)."""
    import json

    from backends.cost import load_cost_model
    from calib.calibrate import refit
    from calib.samples import read_samples

    root = Path(__file__).resolve().parent.parent
    samples = root / "calib" / "data" / "h200-llama3-8b-f16-samples.jsonl"
    header, rows = read_samples(samples)
    serving = [r for r in rows if (r["scenario"] or "").startswith("serving ")]
    assert header["split"]["sparse_outputs"] is True and header["split"]["kv_size"] == 262144 and len(serving) > 1000
    assert {r["scenario"] for r in serving} == {"serving continuous 0.25x", "serving chunked 0.25x",
                                                "serving continuous 2x long-tail"}
    cal = refit(samples, "h200-llama3-8b-f16")
    bundled = load_cost_model("h200-llama3-8b-f16")
    assert cal.model.ubatch_outputs == bundled.ubatch_outputs == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128,
                                                                  192, 256)
    for name in ("ubatch_token_s", "ubatch_output_s"):
        assert getattr(cal.model, name) == pytest.approx(getattr(bundled, name), rel=1e-9)
    for name in ("run_factor", "prefill_run_factor", "per_kv_cell_s", "per_kv_token_cell_s"):
        assert getattr(cal.model, name) == pytest.approx(getattr(bundled, name), rel=1e-9)
    assert bundled.tracks_kv_cells and bundled.per_kv_token_cell_s > 0
    assert cal.stats["held_out"]["mape"] < 4.5  # 4.0 % with the serving steps and the KV range in the fit
    meta = json.loads((root / "backends" / "data" / "h200-llama3-8b-f16.json").read_text())["meta"]
    assert meta["serving"]["steps"] == len(serving) and meta["serving"]["grid_held_out"]["mape"] > 5


def test_a_gpu_profile_sizes_the_simulated_scheduler_as_its_context_served(tmp_path):
    """`simulate --cost h200-llama3-8b-f16` takes the calibrated context's limits (256 slots, 8k-token steps, its
    KV cells) unless flags say otherwise; a CPU profile keeps the scheduler's defaults."""
    import json

    from sim.cli import main

    assert main(["simulate", "--cost", "h200-llama3-8b-f16", "--num-requests", "20", "--rate", "5",
                 "--no-plots", "--out", str(tmp_path / "gpu"), "--json", "--quiet"]) == 0
    sched = json.loads((tmp_path / "gpu" / "summary.json").read_text())["config"]["scheduler"]
    assert (sched["max_num_seqs"], sched["max_num_batched_tokens"], sched["num_kv_blocks"]) == (256, 8192, 16384)
    assert main(["simulate", "--cost", "h200-llama3-8b-f16", "--max-num-seqs", "32", "--num-requests", "20",
                 "--rate", "5", "--no-plots", "--out", str(tmp_path / "flag"), "--json", "--quiet"]) == 0
    assert json.loads((tmp_path / "flag" / "summary.json").read_text())["config"]["scheduler"]["max_num_seqs"] == 32
    assert main(["simulate", "--cost", "cpu-gemma3-270m", "--num-requests", "20", "--rate", "5",
                 "--no-plots", "--out", str(tmp_path / "cpu"), "--json", "--quiet"]) == 0
    assert json.loads((tmp_path / "cpu" / "summary.json").read_text())["config"]["scheduler"]["max_num_seqs"] == 16
