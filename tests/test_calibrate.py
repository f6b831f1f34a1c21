"""Calibration and validation on the real default model: profile, held-out accuracy, validate end to end, refusals."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
from pathlib import Path

import pytest

from backends.cost import load_cost_model, save_cost_model
from backends.cost.table import TableCostModel, price_run
from backends.cost.table_params import TILING
from backends.cost.ubatch import Ubatch, fa_tiles, split_ubatches
from calib.fit_table import fit_table
from calib.judge import rel_errors
from calib.measure import TimedBackend, retime
from calib.provenance import check_profile
from calib.samples import read_samples
from scheduler.messages import ScheduledChunk, StepPlan, StepResult
from sim.cli import main
from sim.workload import Workload, WorkloadRequest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Stated tolerance for steps of the kinds calibration saw: held-out median error per kind within 20 %
# on a quiet CPU; on a shared CPU the measurements themselves scatter, so the bound widens to 1.5x the
# median spread between repeats of the same step (both numbers are in the assertion message).
# Each held-out step is priced where it ran, as the fit scores it: after the steps before it (llama.cpp's
# graph reuse) and after an idle wait or not. A kind needs MIN_KIND_STEPS held-out steps for a median of its
# own; kinds with fewer (the quick grid holds out one or two steps of a kind such as "decode B>8 +copy") are
# held to the same bound together, and each of their steps to twice it: one step is not a median.
TOLERANCE_PCT = 20.0
MIN_KIND_STEPS = 3


def _decode(slot: int, pos: int = 20) -> ScheduledChunk:
    return ScheduledChunk(f"d{slot}", slot, pos, (11,), True, is_decode=True)


def _prompt(slot: int, n: int, sample: bool = True) -> ScheduledChunk:
    return ScheduledChunk(f"p{slot}", slot, 0, (11,) * n, sample)


def _plan(*chunks: ScheduledChunk) -> StepPlan:
    return StepPlan(0, 0.0, tuple(chunks))


# -- the micro-batch split and the table model (no model needed) ---------------------------
def test_split_follows_llama_cpp_split_equal_over_consecutive_slots():
    assert split_ubatches(_plan(*(_decode(s) for s in range(4)))) == (Ubatch(4, 4, 4, 84),)
    assert len(split_ubatches(_plan(_decode(0), _decode(2), _decode(4)))) == 3  # gaps: one pass per run
    mixed = split_ubatches(_plan(_decode(0), _prompt(1, 100), _decode(2)))
    assert [(u.n_tokens, u.n_seqs, u.n_outputs) for u in mixed] == [(3, 3, 2), (99, 1, 1)]
    big = split_ubatches(_plan(_prompt(0, 1000)))  # n_batch windows of 512
    assert [(u.n_tokens, u.n_outputs) for u in big] == [(512, 0), (488, 1)]
    unified = split_ubatches(_plan(_decode(0), _decode(2), _decode(4)), kv_unified=True)
    assert [(u.n_tokens, u.n_seqs) for u in unified] == [(3, 3)]


def test_table_model_fits_a_concave_decode_cost_and_round_trips(tmp_path):
    def true_cost(plan):  # concave per pass in tokens, plus a per-pass fixed cost
        return sum(0.015 + 0.006 * u.n_tokens ** 0.8 for u in split_ubatches(plan))

    plans = [_plan(*(_decode(s) for s in range(b))) for b in range(1, 17)]
    plans += [_plan(_prompt(0, n)) for n in (8, 32, 100, 300, 500)]
    plans += [_plan(*(_decode(s) for s in range(0, 2 * b, 2))) for b in (2, 5, 8)]
    model = fit_table([(p, true_cost(p)) for p in plans], name="t")
    for p in plans:
        assert model.step_time_s(p) == pytest.approx(true_cost(p), rel=0.06)
    path = save_cost_model(model, tmp_path / "t.json")
    loaded = load_cost_model(path)
    assert isinstance(loaded, TableCostModel) and loaded.to_dict() == model.to_dict()
    assert all(loaded.step_time_s(p) == model.step_time_s(p) for p in plans)
    assert loaded.step_time_s(_plan()) == 0.0
    bad = model.to_dict()
    bad["params"]["ubatch_token_s"] = list(reversed(bad["params"]["ubatch_token_s"]))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bad.json.*must not decrease"):
        load_cost_model(tmp_path / "bad.json")


def _chunk(slot: int, pos: int, n: int, sample: bool = False) -> ScheduledChunk:
    return ScheduledChunk(f"c{slot}", slot, pos, (11,) * n, sample)


def test_split_counts_a_chunks_pairs_against_its_context_and_within_it_apart():
    (u,) = split_ubatches(_plan(_chunk(0, 256, 128)))
    assert (u.q_len, u.context_pairs, u.chunk_pairs, u.attention_pairs) == (128, 128 * 256, 128 * 129 // 2, 0)
    # split_equal: two slots' chunks of one length run as one ubatch; the decodes run in their own
    decodes, chunks = split_ubatches(_plan(_decode(0, 40), _decode(1, 50), _chunk(3, 64, 32), _chunk(4, 0, 32)))
    assert (decodes.attention_pairs, decodes.q_len, decodes.context_pairs) == (41 + 51, 0, 0)
    assert (chunks.n_seqs, chunks.q_len, chunks.context_pairs, chunks.chunk_pairs) == (2, 32, 32 * 64, 2 * 528)
    # one KV stream: the ubatch's rows attend together
    (one,) = split_ubatches(_plan(_decode(0, 40), _chunk(1, 64, 32)), kv_unified=True)
    assert (one.attention_pairs, one.q_len, one.context_pairs, one.chunk_pairs) == (41, 33, 32 * 64, 528)


def test_fit_prices_context_pairs_by_chunk_length():
    """ggml's tiled attention makes a context pair of a 128-token chunk cheaper than one of a 64-token chunk."""
    def true_cost(plan):
        t = 0.0
        for u in split_ubatches(plan):
            per_ctx = 1.5e-6 if u.q_len <= 64 else 0.75e-6
            t += 0.01 + 0.0015 * u.n_tokens + 2e-6 * u.attention_pairs + per_ctx * u.context_pairs
            t += 0.6e-6 * u.chunk_pairs + 0.004 * u.n_outputs
        return t

    plans = [_plan(*(_decode(s, pos) for s in range(b))) for b in (1, 2, 4, 8) for pos in (20, 200, 400)]
    plans += [_plan(_chunk(0, pos, n, pos + n >= 448)) for n in (2, 64, 128) for pos in range(0, 449, 64)]
    plans += [_plan(_prompt(0, n)) for n in (8, 32, 100, 300, 500)]
    model = fit_table([(p, true_cost(p)) for p in plans], name="t")
    assert model.prompt_pair_knots == (2, 64, 128, 512)
    assert model.prompt_context_pair_s[1] == pytest.approx(1.5e-6, rel=0.1)
    assert model.prompt_context_pair_s[2] == pytest.approx(0.75e-6, rel=0.1)
    deep = [_plan(_chunk(0, pos, n)) for n in (64, 128) for pos in (256, 384)]
    for p in deep:
        assert model.step_time_s(p) == pytest.approx(true_cost(p), rel=0.02)
    # one price per pair, as before this table, misses a deep 128-token chunk by more
    flat = dataclasses.replace(model, per_prompt_pair_s=None, prompt_pair_knots=None, prompt_context_pair_s=None)
    assert abs(flat.step_time_s(deep[-1]) / true_cost(deep[-1]) - 1) > 0.05
    again = TableCostModel.from_dict(model.to_dict()["params"], {}, "again", "test")
    assert again.to_dict()["params"] == model.to_dict()["params"]
    assert all(again.step_time_s(p) == model.step_time_s(p) for p in deep)


def test_a_profile_without_prompt_pair_prices_prices_every_pair_like_a_decode():
    model = dataclasses.replace(load_cost_model("cpu-gemma3-270m"), run_factor=1.0, prefill_run_factor=None)
    params = model.to_dict()["params"]
    for name in ("per_prompt_pair_s", "prompt_pair_knots", "prompt_context_pair_s") + TILING:
        del params[name]
    older = TableCostModel.from_dict(params, {}, "older", "test")
    plan = _plan(_chunk(0, 256, 128))
    (u,) = split_ubatches(plan)
    without_attention = older.step_time_s(plan) - older.per_attention_pair_s * (u.context_pairs + u.chunk_pairs)
    assert without_attention == pytest.approx(model.step_time_s(plan) - model.prompt_attention_s(u), rel=1e-9)
    params["prompt_pair_knots"] = [2, 64]
    with pytest.raises(ValueError, match="per_prompt_pair_s, prompt_pair_knots, prompt_context_pair_s go together"):
        TableCostModel.from_dict(params, {}, "half", "test")


def test_fa_tiles_replays_ggml_flash_attention_split():
    # 4 heads x 64 tokens on 2 threads: 8 pieces of 32 rows, one KV tile each
    assert fa_tiles(64, (0,), 4, 2) == 8
    # the same chunk after 128 positions: each tile runs over 3 KV tiles
    assert fa_tiles(64, (128,), 4, 2) == 24
    # 264 tokens: pieces of 132 rows (64 + 64 + 4, partial tiles cost full ones), over 1..5 KV tiles
    assert fa_tiles(264, (0,), 4, 2) == 4 * ((1 + 2 + 3) + (4 + 5 + 5))
    assert fa_tiles(256, (0,), 4, 2) == 40  # 8 more tokens double the tiles: the cost jump past 256
    # two sequences (KV streams): a piece is one head of one sequence, over that sequence's own positions
    assert fa_tiles(64, (0, 128), 4, 2) == 4 * 1 + 4 * 3
    # one thread: one piece, tiles cut only at the heads' ends
    assert fa_tiles(264, (0,), 4, 1) == 4 * (1 + 2 + 3 + 4 + 5)


def test_fit_prices_long_chunks_by_flash_attention_tiles():
    """A chunk of 64+ tokens per sequence costs its tiles: a pair-priced fit cannot follow the jump past 256."""
    def true_cost(plan):
        t = 0.0
        for u in split_ubatches(plan):
            t += 0.01 + 0.0015 * u.n_tokens + 2e-6 * u.attention_pairs + 0.004 * u.n_outputs
            t += 9e-4 * fa_tiles(u.q_len, u.starts, 4, 2) if u.q_len >= 64 else 1.5e-6 * (u.context_pairs
                                                                                          + u.chunk_pairs)
        return t

    plans = [_plan(*(_decode(s, pos) for s in range(b))) for b in (1, 2, 4, 8) for pos in (20, 200, 400)]
    plans += [_plan(_chunk(0, pos, n, True)) for n in (16, 64, 128, 144, 200, 264) for pos in (0, 64, 192)]
    plans += [_plan(_prompt(0, n)) for n in (8, 32, 100, 256, 300, 400, 500)]
    samples = [(p, true_cost(p)) for p in plans]
    tiled = fit_table(samples, name="t", fa_heads=4, fa_threads=2)
    assert (tiled.fa_heads, tiled.fa_threads, tiled.prompt_pair_knots) == (4, 2, (2, 64))
    assert tiled.per_fa_tile_s == pytest.approx(9e-4, rel=0.05)
    pairs = fit_table(samples, name="t")
    assert pairs.per_fa_tile_s is None
    jump = [_plan(_prompt(0, n)) for n in (248, 256, 264, 272)] + [_plan(_chunk(0, 128, 136, True))]
    for p in jump:
        assert tiled.step_time_s(p) == pytest.approx(true_cost(p), rel=0.02)
    assert max(abs(pairs.step_time_s(p) / true_cost(p) - 1) for p in jump) > 0.04
    again = TableCostModel.from_dict(tiled.to_dict()["params"], {}, "again", "test")
    assert all(again.step_time_s(p) == tiled.step_time_s(p) for p in jump)
    # one KV stream for all sequences: the tiles are not replayed, the pairs price the chunks
    assert fit_table(samples, name="t", fa_heads=4, fa_threads=2, kv_unified=True).per_fa_tile_s is None


@pytest.mark.parametrize("change, message", [
    ({"fa_heads": None}, "per_fa_tile_s, fa_heads, fa_threads go together"),
    ({"fa_threads": 0}, "fa_threads must be a positive integer"),
    ({"fa_heads": True}, "fa_heads must be a positive integer"),
    ({"per_fa_tile_s": -1.0}, "per_fa_tile_s"),
    ({"kv_unified": True}, "one KV stream per sequence"),
])
def test_a_profile_with_broken_tiling_params_is_refused(change, message):
    params = load_cost_model("cpu-gemma3-270m").to_dict()["params"]
    assert params["fa_heads"] == 4 and params["fa_threads"] == 2  # the bundled profile prices tiles
    with pytest.raises(ValueError, match=message):
        TableCostModel.from_dict({**params, **change}, {}, "broken", "bad.json")


@pytest.mark.parametrize("run_factor", [None, 1.0123])
def test_decode_hook_prices_exactly_like_the_plan(run_factor):
    model = load_cost_model("cpu-gemma3-270m")
    if run_factor is not None:
        grid = dataclasses.replace(model, run_factor=1.0)
        model = dataclasses.replace(model, run_factor=run_factor)
    for slots in ((0,), (0, 1, 2, 3), (1, 3, 4, 6, 9, 12, 14, 15), tuple(range(16))):
        chunks = tuple(_decode(s, pos=40 + 7 * s) for s in slots)
        plan = StepPlan(0, 0.0, chunks, num_decode_seqs=len(slots), num_context_tokens=sum(41 + 7 * s for s in slots))
        assert model.decode_pricer(slots)(plan.num_context_tokens) == model.step_time_s(plan)
        if run_factor is not None:
            assert model.step_time_s(plan) == pytest.approx(run_factor * grid.step_time_s(plan), rel=1e-12)
    fragmented = model.decode_pricer(tuple(range(0, 16, 2)))(800)
    assert fragmented > 1.5 * model.decode_pricer(tuple(range(8)))(800)  # 8 passes instead of one


def test_retime_keeps_lengths_and_sets_the_rate():
    reqs = tuple(WorkloadRequest(f"r{i}", 5.0 * i, (11,) * (i + 1), i + 2) for i in range(400))
    w = retime(Workload(reqs, "w", {}), 4.0, seed=3)
    assert [(len(r.prompt_token_ids), r.max_tokens) for r in w.requests] == [(i + 1, i + 2) for i in range(400)]
    assert (len(reqs) - 1) / (w.requests[-1].arrival_s - w.requests[0].arrival_s) == pytest.approx(4.0, rel=0.15)
    assert retime(Workload(reqs, "w", {}), 4.0, seed=3) == w


def test_timed_backend_charges_driver_work_only_between_busy_steps():
    class Slow:
        def step(self, plan):
            return StepResult({}, 0.0)

        def clear_kv(self):
            pass

    tb = TimedBackend(Slow())
    first = tb.step(StepPlan(1, 0.0, (_decode(0),)))
    tb.step(StepPlan(2, first.elapsed_s, (_decode(0),)))  # straight after: the gap counts
    tb.step(StepPlan(3, 99.0, (_decode(0),)))  # after idling: it does not
    assert tb.samples[1][2] > 0 and tb.samples[2][2] == 0.0 and tb.samples[0][2] == 0.0
    assert [s[3] for s in tb.samples] == [True, False, True]  # after idle: the first step and the one at 99 s


def test_relative_error_is_predicted_minus_measured_over_measured():
    m = {k: {"mean": 2.0, "p50": 2.0, "p90": 4.0, "p99": 5.0} for k in ("ttft_s", "tpot_s", "e2e_s")}
    p = {k: {"mean": 2.2, "p50": 1.0, "p90": 4.0, "p99": None} for k in ("ttft_s", "tpot_s", "e2e_s")}
    r = rel_errors({**m, "throughput_rps": 1.0}, {**p, "throughput_rps": 0.9})
    assert r["ttft_s"]["mean"] == pytest.approx(0.1) and r["e2e_s"]["p50"] == -0.5 and r["tpot_s"]["p99"] is None
    assert r["throughput_rps"] == pytest.approx(-0.1)


# -- on the real default model -------------------------------------------------------------
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """`tokenstep calibrate --quick` once: (profile path, samples path, its --json document)."""
    folder = tmp_path_factory.mktemp("calibration")
    profile, samples = folder / "quick.json", folder / "quick.samples.jsonl"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["calibrate", "--quick", "--out", str(profile), "--samples", str(samples), "--json", "--quiet"])
    assert code == 0
    return profile, samples, json.loads(out.getvalue())


def test_quick_calibration_writes_a_profile_that_loads_and_says_where_it_came_from(quick, default_model_path):
    profile, _, doc = quick
    model = load_cost_model(str(profile))
    assert isinstance(model, TableCostModel) and model.name == "quick"
    meta = model.meta
    assert meta["model"]["file"] == default_model_path.name and len(meta["model"]["sha256"]) == 64
    assert meta["model"]["size_bytes"] == default_model_path.stat().st_size
    assert meta["llama_cpp_python"] and meta["machine"]["cpu_model"] and meta["machine"]["nproc"] >= 1
    assert {"n_threads", "n_ctx", "n_seq_max", "kv_unified"} <= set(meta["context"]) and meta["date"]
    # the quick grid has prompt chunks of 64+ tokens: priced by flash-attention tiles, heads read from the model
    assert (model.fa_heads, model.fa_threads) == (4, meta["context"]["n_threads"]) and model.per_fa_tile_s > 0
    assert doc["profile"] == str(profile) and doc["fit"]["held_out"]["n"] > 0
    assert "decode B=1" in doc["fit"]["by_kind_held_out"]
    # the run factor: fitted on a real-time probe run of its own, recorded, and applied to every price
    probe = meta["run_probe"]
    assert probe["steps"] > 20 and probe["measured_s"] > 0 and probe["requests"] == 16
    assert probe["overall_factor"] == pytest.approx(probe["measured_s"] / probe["predicted_s"])
    for name, field in (("decode", "run_factor"), ("prefill", "prefill_run_factor")):
        kind = probe["by_kind"][name]
        assert getattr(model, field) == probe[field] == kind["factor"]
        if kind["steps"] >= probe["min_steps_per_kind"]:  # fitted on its own steps, else the overall factor
            assert kind["factor"] == pytest.approx(kind["measured_s"] / kind["predicted_s"])
        else:
            assert kind["factor"] == probe["overall_factor"]
        assert 0.9 < kind["factor"] < 1.2  # a serving run costs a little more than back-to-back grid steps
    assert probe["by_kind"]["decode"]["steps"] + probe["by_kind"]["prefill"]["steps"] == probe["steps"]
    # the wake-up probe: the price of a step after idle by the wait's length, kept in the profile
    wake = meta["wakeup"]
    assert [i for i, _ in model.idle_wakeup_curve] == [0.1, 1.0] == [i for i, _ in wake["knots"]]
    assert [list(k) for k in model.idle_wakeup_curve] == wake["knots"] and wake["repeats"] == 2
    assert all(0.0 <= e < 0.5 for _, e in model.idle_wakeup_curve)
    assert doc["fit"]["wakeup"]["knots"] == wake["knots"]


def test_prefill_run_factor_prices_only_steps_with_prompt_tokens():
    from scheduler.messages import ScheduledChunk, StepPlan

    base = load_cost_model("cpu-gemma3-270m")
    grid = dataclasses.replace(base, run_factor=1.0, prefill_run_factor=None)
    model = dataclasses.replace(base, run_factor=1.01, prefill_run_factor=1.04)
    decode = StepPlan(0, 0.0, tuple(ScheduledChunk(f"d{i}", i, 40, (7,), True, is_decode=True) for i in range(3)),
                      num_decode_seqs=3, num_context_tokens=123)
    prompt = ScheduledChunk("p", 5, 0, (7,) * 64, True)
    mixed = dataclasses.replace(decode, chunks=decode.chunks + (prompt,), num_prefill_tokens=64,
                                num_context_tokens=123 + 64)
    assert model.step_time_s(decode) == pytest.approx(1.01 * grid.step_time_s(decode), rel=1e-12)
    assert model.step_time_s(mixed) == pytest.approx(1.04 * grid.step_time_s(mixed), rel=1e-12)
    assert model.decode_pricer([0, 1, 2])(123) == model.step_time_s(decode)
    # without a prefill factor (profiles written before it) every step takes run_factor
    older = dataclasses.replace(model, prefill_run_factor=None)
    assert older.step_time_s(mixed) == pytest.approx(1.01 * grid.step_time_s(mixed), rel=1e-12)
    # and it round-trips through the profile JSON
    from backends.cost.table import TableCostModel

    again = TableCostModel.from_dict(model.to_dict()["params"], {}, "again", "test")
    assert again.prefill_run_factor == 1.04 and again.step_time_s(mixed) == model.step_time_s(mixed)
    with pytest.raises(Exception, match="prefill_run_factor"):
        dataclasses.replace(model, prefill_run_factor=3.0)


def test_quick_profile_predicts_held_out_steps_of_every_kind_it_saw(quick):
    profile, samples, doc = quick
    model = load_cost_model(str(profile))
    _, rows = read_samples(samples)
    kinds = {r["kind"] for r in rows}
    assert {"decode B=1", "decode B>8", "prefill", "mixed"} <= kinds or {"decode B=1", "prefill"} <= kinds
    spread = doc["meta"]["noise"]["median_repeat_spread_pct"] or 0.0
    bound = max(TOLERANCE_PCT, 1.5 * spread)
    # grid steps ran back to back, without a serving run's extras: no run factors
    grid = dataclasses.replace(model, run_factor=1.0, prefill_run_factor=None)
    prices = price_run(grid, [(r["plan"], r["after_idle"]) for r in rows])
    by_kind: dict[str, list[float]] = {}
    for r, price in zip(rows, prices, strict=True):
        if r["held_out"]:
            by_kind.setdefault(r["kind"], []).append(abs(price - r["measured_s"]) / r["measured_s"] * 100)
    held = sum(by_kind.values(), [])
    assert sum(held) / len(held) == pytest.approx(doc["fit"]["held_out"]["mape"])  # the fit's own score
    assert sum(len(v) for v in by_kind.values()) >= 10
    rare = sorted(e for errs in by_kind.values() if len(errs) < MIN_KIND_STEPS for e in errs)
    judged = {kind: errs for kind, errs in by_kind.items() if len(errs) >= MIN_KIND_STEPS}
    assert {"decode B=1", "decode B>8"} <= set(judged)
    if rare:
        judged["kinds with fewer than 3 held-out steps, together"] = rare
        assert rare[-1] <= 2 * bound, f"a held-out step of a rare kind is {rare[-1]:.1f}% off (> {2 * bound:.1f}%)"
    for kind, errs in judged.items():
        errs.sort()
        median = errs[len(errs) // 2]
        assert median <= bound, f"{kind}: median held-out error {median:.1f}% > {bound:.1f}% (spread {spread:.1f}%)"


def test_refit_from_the_samples_file_needs_no_measuring(quick, tmp_path):
    _, samples, doc = quick
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["calibrate", "--refit", str(samples), "--out", str(tmp_path / "re.json"), "--json"]) == 0
    again = json.loads(out.getvalue())
    assert again["fit"]["held_out"]["n"] == doc["fit"]["held_out"]["n"]
    assert again["meta"]["model"] == doc["meta"]["model"]
    refitted = load_cost_model(tmp_path / "re.json")
    assert isinstance(refitted, TableCostModel)
    assert [list(k) for k in refitted.idle_wakeup_curve] == doc["meta"]["wakeup"]["knots"]  # measured apart: kept


def test_validate_samples_are_serving_steps_that_a_refit_adds_to_the_grid(quick, tmp_path, capsys):
    profile, grid_samples, _ = quick
    serving = tmp_path / "serving.jsonl"
    assert main(["validate", "--profile", str(profile), "--num-requests", "6", "--prompt-len", "24",
                 "--output-len", "6", "--rates", "3", "--repeats", "2", "--probe-requests", "0", "--no-plots",
                 "--samples", str(serving), "--out", str(tmp_path / "v"), "--json", "--quiet"]) == 0
    head, rows = read_samples(serving)
    assert head["source"] == "serving" and head["split"]["n_ubatch"] > 0 and head["meta"]["model"]["sha256"]
    assert {r["scenario"] for r in rows} == {"serving continuous 3 req/s run 1", "serving continuous 3 req/s run 2"}
    assert all(r["measured_s"] > 0 and r["driver_s"] >= 0 and r["chunks"] for r in rows)
    # every output token of the 6 requests was sampled in some step of each run
    per_run = sum(c[4] for r in rows if r["scenario"].endswith("run 1") for c in r["chunks"])
    assert per_run == 6 * 6
    capsys.readouterr()
    assert main(["calibrate", "--refit", str(grid_samples), "--refit", str(serving), "--out", str(tmp_path / "re.json"),
                 "--json", "--quiet"]) == 0
    doc = json.loads(capsys.readouterr().out)
    _, grid_rows = read_samples(grid_samples)
    fit = doc["fit"]
    assert fit["held_out"]["n"] + fit["train"]["n"] == len(grid_rows) + len(rows)
    probe = doc["meta"]["run_probe"]  # the run factors now come from the serving steps
    assert "serving.jsonl" in probe["source"] and probe["steps"] == len(rows)
    assert load_cost_model(tmp_path / "re.json").run_factor == probe["run_factor"]
    # a serving file alone, or first, is refused with a one-line error
    assert main(["calibrate", "--refit", str(serving), "--out", str(tmp_path / "bad.json")]) == 2
    assert "not written by tokenstep calibrate --samples" in capsys.readouterr().err


def test_serving_runs_join_the_grid_in_the_fit(tmp_path, capsys):
    """--serving-requests N (a GPU calibration's default): three real-time serving runs, continuous and chunked at
    0.25x the fitted capacity and continuous overloaded at 2x, whose steps are fitted with the grid's and kept in
    the samples file under their own scenario names."""
    samples = tmp_path / "s.jsonl"
    assert main(["calibrate", "--quick", "--serving-requests", "6", "--no-wakeup-probe", "--out",
                 str(tmp_path / "p.json"), "--samples", str(samples), "--json", "--quiet"]) == 0
    doc = json.loads(capsys.readouterr().out)
    header, rows = read_samples(samples)
    served = [r for r in rows if r["scenario"].startswith("serving ")]
    # each real-time run under its own name: it starts on an empty KV cache (backends.cost.kvcells)
    assert {r["scenario"] for r in served} == {"serving continuous 0.25x", "serving chunked 0.25x",
                                               "serving continuous 2x long-tail"}
    # the run factors come from the serving runs' own steps, not from a separate probe
    assert doc["meta"]["run_probe"]["steps"] == len(served)
    assert doc["meta"]["serving"]["steps"] == len(served) > 0
    assert doc["fit"]["held_out"]["n"] + doc["fit"]["train"]["n"] == len(rows) == doc["meta"]["grid"]["num_steps"] \
        + len(served)
    assert header["split"]["sparse_outputs"] is False  # a CPU context keeps its table at every output count


def test_validate_runs_end_to_end_and_writes_table_csvs_and_plot(quick, tmp_path):
    profile, _, _ = quick
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["validate", "--profile", str(profile), "--num-requests", "6", "--prompt-len", "24",
                     "--output-len", "6", "--rates", "3", "--probe-requests", "16", "--ensemble-runs", "4",
                     "--noise-runs", "4", "--out", str(tmp_path), "--json", "--quiet"])
    assert code == 0
    doc = json.loads(out.getvalue())
    (load,) = doc["loads"]
    assert load["rate"] == 3.0 and load["policy"] == "continuous"
    assert load["measured"]["num_finished"] == load["predicted"]["num_finished"] == 6
    assert set(load["rel_error"]) == {"ttft_s", "tpot_s", "e2e_s", "throughput_rps"}
    assert set(load["rel_error"]["ttft_s"]) == {"mean", "p50", "p90", "p99"}
    # three real runs of the load: the measured value is their mean, their spread widens what a cell allows
    assert load["repeats"] == 3 and load["measured"]["num_repeats"] == 3
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        for s in ("mean", "p90", "p99"):
            cell = load["verdict"][k][s]
            assert cell["error"] == load["rel_error"][k][s] and cell["spread"] == load["repeat_spread"][k][s]
            assert cell["allowed"] == max(0.05 if s == "mean" else 0.10, cell["spread"])
            assert cell["pass"] == (abs(cell["error"]) <= cell["allowed"])
    folder = tmp_path / "load1-3rps"
    for name in ("requests_measured.csv", "requests_predicted.csv", "summary.json", "step_errors.json"):
        assert (folder / name).is_file()
    assert len((folder / "requests_measured.csv").read_text().splitlines()) == 7
    assert (folder / "latency_cdfs.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (tmp_path / "latency_cdfs.png").read_bytes().startswith(PNG_SIGNATURE)
    # the run factors were refitted on real-time probes just before and after the load (the workload's own
    # requests: all 6 of them, fewer than the 16 asked), and the prediction used their mean
    probe, prof = load["speed_probe"], load_cost_model(str(profile))
    before, after = probe["before"], probe["after"]
    assert probe["requests"] == before["requests"] == after["requests"] == 6
    assert before["steps"] >= 12 and after["steps"] >= 12 and before["policy"] == "continuous"
    assert "drawn_from" in before and "prompt" not in before
    for key in ("run_factor", "prefill_run_factor"):
        assert probe[key] == pytest.approx((before[key] + after[key]) / 2)
        assert 0.5 <= probe[key] <= 2.0
    # a wake-up probe with each: the step after idle priced by its wait, the curve the mean of the two
    for side in (before, after):
        assert [i for i, _ in side["wakeup"]["knots"]] == [0.1, 0.3, 1.0, 2.5]
        assert all(e >= 0 for _, e in side["wakeup"]["knots"])
    assert [i for i, _ in probe["idle_wakeup_curve"]] == [0.1, 0.3, 1.0, 2.5]
    # asked for: the prediction is the median of noisy reruns with the probes' step noise; the noiseless run kept
    det = load["deterministic"]
    assert det["ensemble"]["runs"] == 4 and det["predicted"]["num_finished"] == 6
    assert set(before["step_noise"]) == {"sigma", "slow_sigma", "steps"}
    assert probe["profile_run_factor"] == prof.run_factor and probe["profile_prefill_run_factor"] == prof.factor(True)
    for interval in load["rel_error_interval"]["e2e_s"].values():
        assert interval[0] <= interval[1]
    # the diagnostic run at the real run's own speed: factors refitted on the measured steps, a full summary
    speed = load["at_run_speed"]
    assert 0.5 <= speed["run_factor"] <= 2.0 and speed["predicted"]["num_finished"] == 6
    assert set(speed["rel_error"]) == {"ttft_s", "tpot_s", "e2e_s", "throughput_rps"}
    # reruns with every step's price scattered as much as this real run's steps scattered around theirs
    jitter = load["step_noise"]
    assert 0.0 < jitter["sigma"] + jitter["slow_sigma"] < 0.3 and jitter["runs"] == 4 and jitter["block_s"] == 1.0
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        for lo, hi in jitter["rel_error_range"][k].values():
            assert lo <= hi
    report = (tmp_path / "report.txt").read_text()
    for text in ("TTFT mean", "TPOT p99", "E2E p90", "throughput", "measured (mean of 3)", "predicted", "repeat spread",
                 "allowed", "when the first token is computed", "step kind", "just before and just after this load",
                 "error 95%", "own speed", "step noise", "3 real run(s) of each load"):
        assert text in report


def _altered(profile: Path, tmp_path: Path, **changes) -> Path:
    data = json.loads(profile.read_text())
    for key, value in changes.items():
        if key == "sha256":
            data["meta"]["model"]["sha256"] = value
        else:
            data["meta"][key] = value
    path = tmp_path / "altered.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(("change", "message"), [
    ({"sha256": "0" * 64}, r"calibrated on model .*sha256 000000000000"),
    ({"llama_cpp_python": "0.0.1"}, r"llama-cpp-python 0\.0\.1 but"),
])
def test_a_profile_of_another_model_or_build_is_refused_unless_forced(quick, tmp_path, capsys, change, message):
    path = _altered(quick[0], tmp_path, **change)
    argv = ["validate", "--profile", str(path), "--num-requests", "3", "--prompt-len", "16", "--output-len", "3",
            "--rates", "4", "--probe-requests", "0", "--out", str(tmp_path / "v"), "--quiet", "--no-plots"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "does not fit this backend" in err and "--force" in err
    assert __import__("re").search(message, err)
    assert not (tmp_path / "v").exists()
    assert main([*argv, "--force"]) == 0
    assert (tmp_path / "v" / "report.txt").is_file()


def test_a_profile_without_calibration_meta_is_refused(capsys, tmp_path):
    argv = ["validate", "--profile", "cpu-gemma3-270m-placeholder", "--num-requests", "2", "--rates", "1",
            "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 2
    assert "names no model" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "instances", "threads"), [("cpu-gemma3-270m", 1, 2), ("cpu-gemma3-270m-x2", 2, 1)])
def test_the_bundled_profiles_were_calibrated_on_the_installed_model_and_build(name, instances, threads):
    from backends.models import LlamaModel
    from calib.provenance import build_info, check_instances, machine_info, model_fingerprint

    profile = load_cost_model(name)
    assert isinstance(profile, TableCostModel) and profile.meta["fit"]["held_out"]["n"] >= 100
    with LlamaModel() as model:
        fp = model_fingerprint(model)
    assert check_profile(profile, name, fp, build_info(), machine_info()) is not None
    assert check_instances(profile, name, instances) == []
    assert profile.meta["context"]["n_threads"] == threads


def test_sampling_noise_brackets_each_statistic_and_narrows_with_more_requests():
    from backends.synthetic import SyntheticBackend
    from calib.noise import sampling_noise
    from scheduler import SchedulerConfig
    from sim.model import run_workload
    from sim.workload import synthetic_workload

    w = synthetic_workload("poisson", 2.0, 400, "lognormal:60,0.8", "lognormal:20,0.9", 1)
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, num_kv_blocks=400, block_size=16,
                          max_model_len=1024)
    run = run_workload(w, "continuous", cfg, [SyntheticBackend(load_cost_model("cpu-gemma3-270m"))])
    many, few = sampling_noise(run), sampling_noise(dataclasses.replace(run, records=run.records[:50]))
    for metric in ("ttft_s", "tpot_s", "e2e_s"):
        for stat in ("mean", "p50", "p90", "p99"):
            lo, hi = many[metric][stat]
            assert lo <= 0.0 <= hi, (metric, stat, lo, hi)  # the interval holds the statistic itself
        # bootstrap spread shrinks like 1/sqrt(n): 50 requests give a wider interval of the mean than 400
        wide_many = many[metric]["mean"][1] - many[metric]["mean"][0]
        wide_few = few[metric]["mean"][1] - few[metric]["mean"][0]
        assert 0 < wide_many < wide_few, (metric, wide_many, wide_few)


def test_error_interval_is_paired_over_requests():
    from backends.synthetic import SyntheticBackend
    from calib.judge import rel_errors
    from calib.noise import error_interval
    from scheduler import SchedulerConfig
    from sim.metrics import summarize
    from sim.model import run_workload
    from sim.workload import synthetic_workload

    w = synthetic_workload("poisson", 2.0, 300, "lognormal:60,0.8", "lognormal:20,0.9", 3)
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, num_kv_blocks=400, block_size=16,
                          max_model_len=1024)
    run = run_workload(w, "continuous", cfg, [SyntheticBackend(load_cost_model("cpu-gemma3-270m"))])

    def scaled(rec, f):
        return dataclasses.replace(rec, first_token_s=rec.arrival_s + f * (rec.first_token_s - rec.arrival_s),
                                   finish_s=rec.arrival_s + f * (rec.finish_s - rec.arrival_s))

    # every request 10 % slower on the predicted side: each resample's error is exactly +10 %, on every statistic
    slow = dataclasses.replace(run, records=[scaled(r, 1.1) for r in run.records])
    ci = error_interval(run, slow)
    for metric in ("ttft_s", "tpot_s", "e2e_s"):
        for stat in ("mean", "p50", "p90", "p99"):
            lo, hi = ci[metric][stat]
            assert abs(lo - 0.1) < 1e-9 and abs(hi - 0.1) < 1e-9, (metric, stat, lo, hi)
    # the four slowest requests (1.3 %) predicted 3x slower: the p99 of 300 requests (between the 4th and 3rd
    # largest) reads exactly +200 %, but that error is carried by those four requests: a resample that draws
    # fewer than three of them has no p99 error at all. So the p99's interval holds both no error and the point
    # error, and the mean's interval is narrower.
    slowest = {r.request_id for r in sorted(run.records, key=lambda r: r.finish_s - r.arrival_s)[-4:]}
    few = dataclasses.replace(run, records=[scaled(r, 3.0) if r.request_id in slowest else r for r in run.records])
    ci = error_interval(run, few)
    point = rel_errors(summarize(run), summarize(few))["e2e_s"]
    lo, hi = ci["e2e_s"]["p99"]
    assert len(run.records) == 300 and abs(point["p99"] - 2.0) < 1e-9, point["p99"]
    assert lo <= 1e-12 and hi >= point["p99"] - 1e-9, (lo, hi, point["p99"])
    assert ci["e2e_s"]["mean"][1] - ci["e2e_s"]["mean"][0] < hi - lo


def test_bracket_takes_the_mean_of_the_probes_around_a_load():
    from calib.speed import bracket_factors

    prof = load_cost_model("cpu-gemma3-270m")
    before = {"requests": 64, "wall_s": 30.0, "run_factor": 1.00, "prefill_run_factor": 1.06}
    after = {"requests": 64, "wall_s": 31.0, "run_factor": 1.04, "prefill_run_factor": 1.02}
    speed, model = bracket_factors(prof, before, after)
    assert model.run_factor == pytest.approx(1.02) and model.factor(True) == pytest.approx(1.04)
    assert speed["before"] is before and speed["after"] is after and speed["wall_s"] == 61.0
    assert speed["profile_run_factor"] == prof.run_factor
    # no probe on either side (--probe-requests 0, or a profile without run factors): the profile as it is
    assert bracket_factors(prof, None, after) == (None, prof) and bracket_factors(prof, before, None) == (None, prof)
    assert model.idle_wakeup_curve == prof.idle_wakeup_curve  # no wake-up probes: the profile's wake-up stays
    # wake-up probes on both sides: each knot the mean of the two
    before["wakeup"] = {"knots": [[0.1, 0.002], [1.0, 0.020]]}
    after["wakeup"] = {"knots": [[0.1, 0.004], [1.0, 0.030]]}
    speed, model = bracket_factors(prof, before, after)
    assert [i for i, _ in model.idle_wakeup_curve] == [0.1, 1.0]
    assert [e for _, e in model.idle_wakeup_curve] == pytest.approx([0.003, 0.025])
    assert speed["idle_wakeup_curve"] == [list(k) for k in model.idle_wakeup_curve]
    assert speed["profile_idle_wakeup_curve"] == [list(k) for k in prof.idle_wakeup_curve]


# -- several instances sharing the machine ---------------------------------------------------
@pytest.fixture(scope="module")
def quick_x2(tmp_path_factory):
    """`tokenstep calibrate --quick --repeats 1 --instances 2` once: (profile path, its --json document)."""
    profile = tmp_path_factory.mktemp("calibration_x2") / "quick-x2.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["calibrate", "--quick", "--repeats", "1", "--instances", "2", "--out", str(profile), "--json",
                     "--quiet"])
    assert code == 0
    return profile, json.loads(out.getvalue())


def test_a_two_instance_profile_is_timed_with_a_busy_neighbour_and_probed_on_both(quick_x2):
    profile, doc = quick_x2
    ctx = load_cost_model(str(profile)).meta["context"]
    assert ctx["instances"] == 2 and ctx["n_threads"] == 1  # the machine's 2 threads shared out
    (steps,) = ctx["neighbour_steps"]
    assert steps >= 50  # the other instance served while the grid was timed
    probe = doc["fit"]["run_probe"]
    assert probe["requests"] == 2 * 16 and 0.5 <= probe["run_factor"] <= 2.0


def test_validate_refuses_a_profile_of_another_instance_count_before_loading(quick, capsys, tmp_path):
    argv = ["validate", "--profile", str(quick[0]), "--instances", "2", "--num-requests", "2", "--rates", "1",
            "--out", str(tmp_path / "v"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "calibrated as one of 1 instance(s)" in err and "this run has 2" in err
    assert "tokenstep calibrate --instances 2" in err and "--force" in err
    assert not (tmp_path / "v").exists()


def test_validate_two_instances_steps_them_at_the_same_time_on_both_sides(quick_x2, tmp_path):
    profile, _ = quick_x2
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["validate", "--profile", str(profile), "--instances", "2", "--num-requests", "16",
                     "--prompt-len", "24", "--output-len", "12", "--rates", "8", "--probe-requests", "6",
                     "--noise-runs", "3", "--repeats", "1", "--out", str(tmp_path), "--json", "--quiet", "--no-plots"])
    assert code == 0
    (load,) = json.loads(out.getvalue())["loads"]
    assert load["measured"]["num_finished"] == load["predicted"]["num_finished"] == 16
    assert load["speed_probe"]["before"]["requests"] == 12  # 6 per instance
    folder = tmp_path / "load1-8rps"
    for side in ("measured", "predicted"):
        rows = list(csv.DictReader((folder / f"requests_{side}.csv").open()))
        assert {r["instance"] for r in rows} == {"0", "1"}
    steps = list(csv.DictReader((folder / "steps_measured.csv").open()))
    spans = {i: [(float(r["start_s"]), float(r["end_s"])) for r in steps if r["instance"] == i] for i in "01"}
    # the real instances ran at the same time: much of instance 1's busy time overlaps instance 0's steps
    overlap = sum(max(0.0, min(a1, b1) - max(a0, b0)) for a0, a1 in spans["0"] for b0, b1 in spans["1"])
    assert overlap > 0.3 * min(sum(b - a for a, b in spans[i]) for i in "01")
    report = (tmp_path / "report.txt").read_text()
    assert "instances: 2 on both sides" in report and "instances stepping at the same time:" in report
    par = load["parallel_instances"]
    assert par["threads"] is True and par["max_late_s"] < 0.05


def test_the_wakeup_probe_times_prefills_after_each_wait_against_the_same_right_after(llama_backend):
    from calib.probes import probe_wakeup

    config = llama_backend.scheduler_config()
    said = []
    out = probe_wakeup(llama_backend, config, 0, said.append, idles_s=(0.02, 0.4), repeats=2, prompt_len=12)
    assert [i for i, _ in out["knots"]] == [0.02, 0.4] and all(0 <= e < 1.0 for _, e in out["knots"])
    assert out["repeats"] == 2 and out["prompt_tokens"] == 12 and out["wall_s"] >= 2 * (0.02 + 0.4)
    # every timed pair kept; each knot is the median of its pairs' differences, at least 0
    for (idle, pairs), (knot_idle, extra) in zip(out["times_s"], out["knots"], strict=True):
        assert idle == knot_idle and len(pairs) == 2
        assert extra == max(0.0, (pairs[0][0] - pairs[0][1] + pairs[1][0] - pairs[1][1]) / 2)
    assert said and said[0].startswith("wake-up probe: +")


def test_probes_fit_decode_factors_by_batch_size_and_a_load_is_priced_by_them():
    from calib.samples import plan_from_row
    from calib.speed import batch_factor_knots, bracket_factors, fit_run_factors, pool_by_batch

    prof = load_cost_model("cpu-gemma3-270m")
    grid = prof.grid()

    def decode(b: int):
        return plan_from_row({"chunks": [[i, 60, 1, 0, 1, 1] for i in range(b)], "removes": [], "copies": []})

    prompt = plan_from_row({"chunks": [[2, 0, 64, 0, 1, 0]], "removes": [], "copies": []})
    # a probe whose B = 1 decodes ran at x0.90 of their grid price, B = 2 at x1.00 and B = 4 at x1.10
    speeds = {1: 0.90, 2: 1.00, 4: 1.10}
    plans = [decode(b) for b in (1, 2, 4) for _ in range(10)] + [prompt] * 5
    prices = price_run(grid, [(p, False) for p in plans])
    samples = [(p, price * (speeds.get(len(p.chunks), 1.0) if p.num_prefill_tokens == 0 else 1.05), 0.0, False)
               for p, price in zip(plans, prices, strict=True)]
    fit = fit_run_factors(samples, prof, 3)
    assert [row[0] for row in fit["by_batch"]] == [1, 2, 4] and [row[3] for row in fit["by_batch"]] == [10] * 3
    for b, measured, predicted, _n in fit["by_batch"]:
        assert measured / predicted == pytest.approx(speeds[b])
    decode_factor = fit["by_kind"]["decode"]["factor"]
    # each batch size pulled toward the decode-only factor by 5 pseudo-steps: 10 steps count 10/15
    knots = batch_factor_knots(fit["by_batch"], decode_factor)
    for (b, f), s in zip(knots, (0.90, 1.00, 1.10), strict=True):
        assert f == pytest.approx(s * 10 / 15 + decode_factor * 5 / 15), b
    exact = batch_factor_knots(fit["by_batch"], decode_factor, shrink=0)
    assert [b for b, _ in exact] == [1, 2, 4] and [f for _, f in exact] == pytest.approx([0.90, 1.00, 1.10])
    assert pool_by_batch([fit["by_batch"], fit["by_batch"][:1]])[0] == [1, *(2 * v for v in fit["by_batch"][0][1:])]
    # the probes around a load: their steps pooled, and the load priced by batch size
    probe = {"requests": 64, "wall_s": 30.0, "run_factor": decode_factor, "prefill_run_factor": 1.05,
             "by_batch": fit["by_batch"]}
    speed, model = bracket_factors(prof, probe, dict(probe))
    assert speed["decode_batch_factors"] == [list(k) for k in model.decode_batch_factors]
    shrunk = batch_factor_knots(pool_by_batch([fit["by_batch"]] * 2), decode_factor)  # 20 steps count 20/25
    assert model.decode_batch_factors == shrunk and shrunk[0][1] == pytest.approx(0.9 * 0.8 + decode_factor * 0.2)
    assert model.step_time_s(decode(4)) == pytest.approx(grid.step_time_s(decode(4)) * shrunk[2][1])
    assert model.step_time_s(decode(3)) == pytest.approx(
        grid.step_time_s(decode(3)) * (shrunk[1][1] + shrunk[2][1]) / 2)
    # probes without the table (older JSON): one decode factor, as before
    _, plain = bracket_factors(prof, {k: v for k, v in probe.items() if k != "by_batch"}, dict(probe))
    assert plain.decode_batch_factors == () and plain.step_time_s(decode(4)) == pytest.approx(
        grid.step_time_s(decode(4)) * decode_factor)


def test_a_samples_row_keeps_a_copy_that_moves_its_source():
    from calib.samples import plan_from_row, step_row
    from scheduler.messages import KVCopy

    plan = StepPlan(0, 0.0, (ScheduledChunk("a", 1, 0, (5,) * 4, True, 0, False),), (),
                    (KVCopy(0, 1, 4, move=True), KVCopy(2, 3, 8)), 4, 0, 4, 16, 0, 12)
    row = json.loads(json.dumps(step_row(plan, 0.01, False, "x", False)))
    assert plan_from_row(row).copies == plan.copies
    assert plan_from_row({**row, "copies": [[0, 1, 4]]}).copies == (KVCopy(0, 1, 4),)  # files without the flag


def test_a_bad_samples_file_is_refused_naming_its_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"header": {"meta": {}, "split": {}}}\n\n{"chunks": [[1, 2]], "measured_s": 0.01}\n')
    assert main(["calibrate", "--refit", str(bad), "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl' line 3: not a measured step" in err
    assert main(["calibrate", "--refit", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "p.json")]) == 2
    assert "cannot read samples file" in capsys.readouterr().err
