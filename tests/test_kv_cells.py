"""backends.cost.kvcells.UnifiedKV against llama.cpp's own unified KV stream, and the table model's KV-range terms."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from backends.cost.kvcells import UnifiedKV, kv_ranges, ubatch_rows
from backends.cost.ubatch import split_ubatches
from scheduler.messages import KVRemove, ScheduledChunk, StepPlan

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"find_slot: stream\[0\], n = +(\d+), used = +(\d+), head = +(\d+), size = +\d+, n_swa = +(\d+)")


def _llama_states(model_path) -> list[tuple[int, int, int]]:
    """(used_max_p1, used, head) llama.cpp logged before each ubatch it placed in the full-attention cache."""
    env = {**os.environ, "LLAMA_KV_CACHE_DEBUG": "1", "TOKENSTEP_LLAMA_LOG": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.kv_cells_probe", str(model_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    states = []
    for line in proc.stderr.splitlines():
        m = LINE.search(line)
        if m and m.group(4) == "0":  # gemma-3's sliding-window layers keep a second cache (n_swa 512)
            state = tuple(int(g) for g in m.groups()[:3])
            # the line repeats once per sequence in the ubatch; placing a ubatch always changes the state
            if not states or states[-1] != state:
                states.append(state)
    return states


def test_replayed_cells_match_llama_cpp_ubatch_by_ubatch(default_model_path):
    from tests.kv_cells_probe import N_BATCH, N_CTX, N_UBATCH, script

    real = _llama_states(default_model_path)
    seen = []

    class Logged(UnifiedKV):
        __slots__ = ()

        def place(self, rows):
            seen.append((self.used_max_p1(), self.used, self.head))
            return super().place(rows)

    kv = Logged(N_CTX)
    for plan in script():
        kv.run_plan(plan, N_BATCH, N_UBATCH)
    assert len(real) >= 20
    assert seen == real
    # the script leaves holes below the head (the range attended exceeds the cells in use), moves the head back
    # and wraps it to the start
    assert any(n > used for n, used, _ in real)
    assert any(b[2] < a[2] for a, b in zip(real, real[1:], strict=False))


def _plan(chunks=(), removes=()):
    return StepPlan(0, 0.0, tuple(chunks), tuple(removes))


def test_a_long_queue_spreads_the_range_and_a_drained_cache_starts_over():
    kv = UnifiedKV(4096)
    for slot in range(8):  # eight prompts of 300 tokens, one after another
        kv.run_plan(_plan([ScheduledChunk(f"r{slot}", slot, 0, (5,) * 300, True)]), 512, 512)
    assert kv.n_kv() == 2560  # 2,400 cells in use, padded to 256
    for slot in range(7):
        kv.seq_rm(slot)
    assert kv.used == 300 and kv.n_kv() == 2560  # the last prompt still sits at cells 2,100 .. 2,399
    assert kv.head == 0  # freed cells pull the head back
    kv.seq_rm(7)
    assert kv.used == 0 and kv.n_kv() == 256
    n = kv.run_plan(_plan([ScheduledChunk("x", 0, 0, (5,) * 10, True)]), 512, 512)
    assert n == (256,)


def test_ubatch_rows_cut_by_batch_and_ubatch():
    assert ubatch_rows([(0, 5), (1, 7)], 8, 4) == [[(0, 4)], [(0, 1), (1, 3)], [(1, 4)]]
    assert ubatch_rows([(0, 10)], 6, 4) == [[(0, 4)], [(0, 2)], [(0, 4)]]


def test_kv_ranges_reset_per_run_and_the_model_prices_the_range():
    from backends.cost import load_cost_model

    prompt = _plan([ScheduledChunk("a", 0, 0, (5,) * 600, True)])
    decode = _plan([ScheduledChunk("a", 0, 600, (5,), True, 0, True)])
    assert kv_ranges([prompt, decode], 8192, 512, 8192) == [(512, 768), (768,)]
    assert kv_ranges([prompt, prompt], 8192, 512, 8192, runs=["x", "y"]) == [(512, 768), (512, 768)]
    bundled = load_cost_model("h200-llama3-8b-f16")
    assert bundled.tracks_kv_cells and bundled.kv_size == 262144
    base = replace(bundled, per_kv_cell_s=None, per_kv_token_cell_s=None, kv_size=None)
    with_kv = replace(base, per_kv_cell_s=1e-8, per_kv_token_cell_s=1e-9, kv_size=8192)
    assert with_kv.tracks_kv_cells and not base.tracks_kv_cells
    near, far = with_kv.time_s(decode, n_kv=(256,)), with_kv.time_s(decode, n_kv=(8192,))
    factor = with_kv.factor(False, 1)
    assert far - near == pytest.approx((8192 - 256) * (1e-8 + 1e-9) * factor)
    # step_after carries the stream: a decode after the prompt attends over its 768 cells
    t0, cells = with_kv.step_after(prompt, None)
    t1, cells2 = with_kv.step_after(decode, cells)
    assert cells2 is cells and cells.n_kv() == 768
    assert t1 == pytest.approx(with_kv.time_s(decode, n_kv=(768,)))
    d = with_kv.to_dict()["params"]
    assert d["kv_size"] == 8192 and d["per_kv_cell_s"] == 1e-8


def test_kv_range_params_are_checked():
    from backends.cost import load_cost_model
    from backends.cost.base import CostModelError

    base = replace(load_cost_model("h200-llama3-8b-f16"), per_kv_cell_s=None, per_kv_token_cell_s=None, kv_size=None)
    with pytest.raises(CostModelError, match="go together"):
        replace(base, per_kv_cell_s=1e-8)
    with pytest.raises(CostModelError, match="kv_unified false"):
        replace(base, kv_unified=False, per_kv_cell_s=1e-8, per_kv_token_cell_s=0.0, kv_size=8192)


def test_a_scheduler_that_holds_more_than_the_stream_gets_a_one_line_error(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "sim.cli", "simulate", "--cost", "h200-llama3-8b-f16:kv_size=300",
                           "--num-requests", "20", "--rate", "5", "--no-plots", "--out", str(tmp_path), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "300 cells" in proc.stderr and "--kv-tokens 300" in proc.stderr


def test_the_fit_recovers_kv_range_prices_from_replayed_runs():
    """Runs whose steps cost a base plus (a + b x tokens) x n_kv per ubatch, n_kv from the replayed stream: the
    calibration's fit (each run replayed from an empty cache) finds a and b and prices held-out steps exactly; a fit
    without the replay cannot."""
    import numpy as np

    from calib.calibrate import fit_and_score

    a_true, b_true = 4e-8, 2e-9
    rng = np.random.default_rng(0)
    samples, runs = [], []
    for run in range(6):
        kv, live, step = UnifiedKV(65536), {}, 0
        for _ in range(60):
            chunks, removes = [], []
            for slot in list(live):
                if rng.random() < 0.08:  # finishes: removed in this step
                    removes.append(KVRemove(slot, 0))
                    del live[slot]
            free = [s for s in range(64) if s not in live]
            for slot in free[: int(rng.integers(0, 3))]:  # new prompts
                n = int(rng.integers(50, 900))
                chunks.append(ScheduledChunk(f"r{run}-{step}-{slot}", slot, 0, (5,) * n, True))
                live[slot] = n
            for slot, pos in list(live.items()):
                if all(c.slot != slot for c in chunks):
                    chunks.append(ScheduledChunk(f"d{slot}", slot, pos, (5,), True, 0, True))
                    live[slot] = pos + 1
            plan = StepPlan(step, 0.0, tuple(chunks), tuple(removes))
            if chunks:
                n_kv = kv.run_plan(plan, 8192, 512)
                ubatches = split_ubatches(plan, 8192, 512, True)
                t = sum(0.004 + 2e-5 * u.n_tokens + (a_true + b_true * u.n_tokens) * n
                        for u, n in zip(ubatches, n_kv, strict=True))
                samples.append((plan, t, False))
                runs.append(f"run {run}")
            step += 1
    split = {"n_batch": 8192, "n_ubatch": 512, "kv_unified": True, "n_seq_max": 64, "kv_size": 65536}
    cal = fit_and_score(samples, split, "t", {}, runs)
    assert cal.model.kv_size == 65536
    assert cal.model.per_kv_cell_s == pytest.approx(a_true, rel=0.01)
    assert cal.model.per_kv_token_cell_s == pytest.approx(b_true, rel=0.01)
    assert cal.stats["held_out"]["mape"] < 0.5
    # without the replay (no kv_size), the same steps cannot be priced as well
    blind = fit_and_score(samples, {k: v for k, v in split.items() if k != "kv_size"}, "t", {}, runs)
    assert blind.model.kv_size is None and blind.stats["held_out"]["mape"] > 4.0  # 7.4 %
