"""Step-time noise: NoisyModel's draws, step_noise's estimate of a run's scatter, noise_spread, misses_within."""

from __future__ import annotations

import numpy as np
import pytest

from backends.cost import load_cost_model
from backends.cost.table import price_run
from backends.synthetic import SyntheticBackend
from calib.judge import misses_within, rel_errors
from calib.measure import predict
from calib.noise import NoisyModel, StepNoise, noise_spread, step_noise
from scheduler import SchedulerConfig
from scheduler.messages import ScheduledChunk, StepPlan, StepResult
from sim.metrics import summarize
from sim.model import run_workload
from sim.workload import synthetic_workload

CONFIG = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=512, num_kv_blocks=512)


@pytest.fixture(scope="module")
def profile():
    return load_cost_model("cpu-gemma3-270m")


def _workload(n: int = 60, rate: float = 3.0, seed: int = 3):
    return synthetic_workload("poisson", rate, n, "uniform:20,120", "uniform:4,30", seed,
                              shared_prefix_tokens=16, num_prefix_groups=2)


def test_noisy_model_draws_have_mean_one_and_the_given_spread_and_repeat_with_the_seed(profile):
    plan = StepPlan(0, 0.0, tuple(ScheduledChunk(f"r{i}", i, 50, (7,), True, is_decode=True) for i in range(4)))
    base, _ = profile.step_after(plan, None)
    noisy = NoisyModel(profile, StepNoise(0.05, 0.0), seed=1)
    ratios = np.array([noisy.step_after(plan, None)[0] / base for _ in range(20000)])
    assert ratios.mean() == pytest.approx(1.0, abs=0.002)
    assert np.log(ratios).std() == pytest.approx(0.05, rel=0.03)
    again = NoisyModel(profile, StepNoise(0.05, 0.0), seed=1)
    assert [again.step_after(plan, None)[0] / base for _ in range(5)] == pytest.approx(ratios[:5].tolist())
    other, same = (NoisyModel(profile, StepNoise(0.05, 0.0), seed=k) for k in (2, 1))
    assert other.step_time_s(plan) != same.step_time_s(plan)
    assert noisy.idle_wakeup_s == profile.idle_wakeup_s


class _Recorder:
    """Records (plan, seconds, driver 0, after idle False) as TimedBackend does, around a simulated backend."""

    def __init__(self, inner):
        self.inner, self.samples = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, plan: StepPlan) -> StepResult:
        result = self.inner.step(plan)
        self.samples.append((plan, result.elapsed_s, 0.0, False))
        return result


@pytest.mark.parametrize("sigma", [0.01, 0.04])
def test_step_noise_reads_back_the_scatter_a_run_was_made_with(profile, sigma):
    rec = _Recorder(SyntheticBackend(NoisyModel(profile, StepNoise(sigma, 0.0), seed=5)))
    run_workload(_workload(), "continuous", CONFIG, [rec], fast_forward=False)
    assert len(rec.samples) > 200
    noise = step_noise(rec.samples, profile)
    assert noise.sigma == pytest.approx(sigma, rel=0.15)
    assert noise.slow_sigma < 0.4 * sigma  # independent draws: no shared drift to find
    # the run's speed is not noise: the same steps 7 % slower read the same scatter
    slow = [(p, t * 1.07, g, i) for p, t, g, i in rec.samples]
    assert step_noise(slow, profile).sigma == pytest.approx(noise.sigma, rel=1e-9)
    # exact prices: no scatter at all
    exact = [(p, t, g, i) for (p, _t, g, i), t in zip(rec.samples, price_run(profile, [(s[0], False) for s in
                                                                                         rec.samples]), strict=True)]
    flat = step_noise(exact, profile)
    assert (flat.sigma, flat.slow_sigma) == (0.0, 0.0) and not any(flat.own_draws) and not any(flat.block_draws)
    # the pools are the run's own residuals, each shifted so that a draw averages 1
    for pool in (noise.own_draws, noise.block_draws):
        assert len(pool) > 5 and np.mean(np.exp(pool)) == pytest.approx(1.0, abs=1e-12)
    assert len(noise.own_draws) > 0.8 * len(rec.samples)
    assert step_noise(rec.samples[:5], profile) is None  # too few steps to say


def test_noisy_model_draws_from_a_runs_own_residuals_when_it_has_them(profile):
    plan = StepPlan(0, 3.0, (ScheduledChunk("r", 0, 50, (7,), True, is_decode=True),))
    base, _ = profile.step_after(plan, None)
    slow = float(np.log(1.13))  # the rare slow step: kept, not smoothed into a lognormal
    own = tuple(float(v) for v in np.array([0.0] * 9 + [slow]) - np.log(np.mean(np.exp([0.0] * 9 + [slow]))))
    noisy = NoisyModel(profile, StepNoise(0.01, 0.0, own_draws=own), seed=4)
    ratios = {round(noisy.step_after(plan, None)[0] / base, 9) for _ in range(400)}
    assert ratios == {round(float(np.exp(v)), 9) for v in set(own)}


def test_step_noise_tells_a_drift_shared_by_a_second_of_steps_from_each_steps_own_scatter(profile):
    made = StepNoise(0.01, 0.02)
    rec = _Recorder(SyntheticBackend(NoisyModel(profile, made, seed=11)))
    run_workload(_workload(n=300, rate=3.0, seed=4), "continuous", CONFIG, [rec], fast_forward=False)
    noise = step_noise(rec.samples, profile)
    assert noise.slow_sigma == pytest.approx(0.02, rel=0.3)
    assert noise.sigma == pytest.approx(0.01, rel=0.5)
    # the shared draw belongs to the block, not to the order steps ask for it
    a, b = NoisyModel(profile, StepNoise(0.0, 0.05), seed=1), NoisyModel(profile, StepNoise(0.0, 0.05), seed=1)
    chunk = ScheduledChunk("r", 0, 9, (7,), True, is_decode=True)
    early, late = StepPlan(0, 0.2, (chunk,)), StepPlan(0, 7.5, (chunk,))
    assert (a.step_time_s(early), a.step_time_s(late)) == (b.step_time_s(early), b.step_time_s(late))
    c = NoisyModel(profile, StepNoise(0.0, 0.05), seed=1)
    late_first = c.step_time_s(late)
    assert (c.step_time_s(early), late_first) == (a.step_time_s(early), a.step_time_s(late))


def test_noise_spread_ranges_the_reruns_and_a_chaotic_policy_spreads_wider(profile):
    w = _workload(n=80, rate=3.5)
    measured = summarize(predict(w, "continuous", CONFIG, profile, 1))
    assert noise_spread(w, "continuous", CONFIG, profile, 1, "least_outstanding", measured, None) is None
    noise = StepNoise(0.03, 0.0)
    out = noise_spread(w, "continuous", CONFIG, profile, 1, "least_outstanding", measured, noise, runs=6)
    assert out["runs"] == 6 and out["sigma"] == 0.03 and out["slow_sigma"] == 0.0
    again = noise_spread(w, "continuous", CONFIG, profile, 1, "least_outstanding", measured, noise, runs=6)
    assert again == out  # seeded: the same reruns
    ranges = out["rel_error_range"]
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        for s in ("mean", "p50", "p90", "p99"):
            lo, hi = ranges[k][s]
            assert lo <= hi
    # each rerun is one noisy prediction measured against the noiseless one: the range is that of its errors
    errs = [rel_errors(measured, summarize(predict(w, "continuous", CONFIG, NoisyModel(profile, noise, k), 1)))
            for k in range(6)]
    assert ranges["ttft_s"]["mean"] == [min(e["ttft_s"]["mean"] for e in errs), max(e["ttft_s"]["mean"] for e in errs)]
    assert ranges["ttft_s"]["mean"][1] > ranges["ttft_s"]["mean"][0]
    # static batching turns on which comes first, an arrival or the batch's drain: its TTFT spreads wider (over
    # several workloads: one workload's six reruns can land either way)
    width = {"continuous": 0.0, "static": 0.0}
    for seed in range(3, 7):
        ws = _workload(n=80, rate=3.0, seed=seed)
        for policy in width:
            base = summarize(predict(ws, policy, CONFIG, profile, 1))
            span = noise_spread(ws, policy, CONFIG, profile, 1, "least_outstanding", base, noise, runs=6)
            width[policy] += span["rel_error_range"]["ttft_s"]["mean"][1] - span["rel_error_range"]["ttft_s"]["mean"][0]
    assert width["static"] > 1.5 * width["continuous"]


def test_misses_within_names_the_misses_whose_range_holds_zero():
    rel = {k: {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0} for k in ("ttft_s", "tpot_s", "e2e_s")}
    rel["throughput_rps"] = 0.07
    rel["ttft_s"]["mean"], rel["ttft_s"]["p99"], rel["tpot_s"]["mean"] = -0.09, 0.2, 0.06
    ranges = {k: {s: [-0.01, 0.01] for s in ("mean", "p50", "p90", "p99")} for k in ("ttft_s", "tpot_s", "e2e_s")}
    ranges["ttft_s"]["mean"] = [-0.12, 0.03]  # holds 0: inside
    ranges["ttft_s"]["p99"] = [0.05, 0.25]  # all above 0: outside
    ranges["tpot_s"]["mean"] = [0.0, 0.08]  # 0 on its edge: inside
    ranges["throughput_rps"] = [0.02, 0.09]
    assert misses_within(rel, ranges) == ["ttft_s mean -9.0%", "tpot_s mean +6.0%"]
    assert misses_within(rel, {}) == []


def _noisy_load(profile, seed: int = 9) -> dict:
    """A stand-in for measure_load's result: a static run on a backend whose steps scatter 3 % around their price."""
    w = _workload(n=40, rate=2.0)
    rec = _Recorder(SyntheticBackend(NoisyModel(profile, StepNoise(0.03, 0.0), seed=seed)))
    run = run_workload(w, "static", CONFIG, [rec], fast_forward=False)
    return {"rate": 2.0, "workload": w, "measured_run": run, "instances": 1, "samples": rec.samples,
            "cpu_load": {"before": {}, "after": {}}}


def test_compare_load_reports_the_step_noise_of_the_measured_steps_and_skips_it_on_request(profile):
    from calib.validate import compare_load

    m = _noisy_load(profile)
    load = compare_load(m, profile, "static", CONFIG, 0, noise_runs=3)
    assert load["step_noise"]["runs"] == 3
    jitter = load["step_noise"]
    assert jitter["draws"] == "the run's own residuals"
    assert (jitter["sigma"] ** 2 + jitter["slow_sigma"] ** 2) ** 0.5 == pytest.approx(0.03, rel=0.25)
    assert compare_load(m, profile, "static", CONFIG, 0, noise_runs=0)["step_noise"] is None


def test_merge_noise_joins_the_probes_pools_and_combines_their_sigmas():
    from calib.noise import merge_noise

    a = StepNoise(0.03, 0.01, 1.0, (0.1, -0.1), (0.02,))
    b = StepNoise(0.04, 0.02, 1.0, (0.2,), (-0.02, 0.0))
    m = merge_noise([a, None, b])
    assert m.own_draws == (0.1, -0.1, 0.2) and m.block_draws == (0.02, -0.02, 0.0)
    assert m.sigma == pytest.approx(((0.03**2 + 0.04**2) / 2) ** 0.5)
    assert m.slow_sigma == pytest.approx(((0.01**2 + 0.02**2) / 2) ** 0.5)
    assert merge_noise([None, None]) is None and merge_noise([]) is None
    # a probe without pools (lognormal draws) makes the merged noise lognormal too
    assert merge_noise([a, StepNoise(0.03, 0.01)]).own_draws == ()


def test_ensemble_prediction_is_the_median_of_its_reruns_and_its_run_the_nearest_one(profile):
    from calib.judge import METRICS, STATS
    from calib.noise import ENSEMBLE_SEED, ensemble_predict

    w = _workload(n=60, rate=3.0)
    noise = StepNoise(0.03, 0.015)
    ens = ensemble_predict(w, "static", CONFIG, profile, 1, "least_outstanding", noise, runs=7, seed=5)
    sums = [summarize(predict(w, "static", CONFIG, NoisyModel(profile, noise, 5 + ENSEMBLE_SEED + k), 1))
            for k in range(7)]
    for k in METRICS:
        for s in STATS:
            assert ens["summary"][k][s] == pytest.approx(float(np.median([x[k][s] for x in sums])))
    assert ens["summary"]["throughput_rps"] == pytest.approx(float(np.median([x["throughput_rps"] for x in sums])))
    assert ens["runs"] == 7 and summarize(ens["run"]) == sums[ens["medoid"]]
    assert ens["summary"]["num_finished"] == 60 and ens["sigma"] == 0.03
    again = ensemble_predict(w, "static", CONFIG, profile, 1, "least_outstanding", noise, runs=7, seed=5)
    assert again["summary"] == ens["summary"]  # seeded


def test_under_static_batching_the_ensemble_lands_nearer_other_noisy_runs_than_one_noiseless_run(profile):
    """The reason the prediction is an ensemble: stand-ins for real runs (noisy runs with seeds of their own)
    scatter around a centre that one noiseless run misses and the reruns' median finds."""
    from calib.noise import ensemble_predict

    w = _workload(n=80, rate=3.2, seed=11)
    noise = StepNoise(0.03, 0.015)
    truths = [summarize(predict(w, "static", CONFIG, NoisyModel(profile, noise, 900 + k), 1)) for k in range(8)]
    det = summarize(predict(w, "static", CONFIG, profile, 1))
    ens = ensemble_predict(w, "static", CONFIG, profile, 1, "least_outstanding", noise, runs=15)["summary"]

    def mean_abs_error(pred: dict) -> float:
        errs = [rel_errors(t, pred) for t in truths]
        return float(np.mean([abs(e[k]["mean"]) for e in errs for k in ("ttft_s", "tpot_s", "e2e_s")]))

    assert mean_abs_error(ens) < mean_abs_error(det)


def test_compare_load_predicts_with_the_ensemble_when_given_probe_noise(profile):
    from calib.validate import compare_load

    m = _noisy_load(profile)
    w = m["workload"]
    load = compare_load(m, profile, "static", CONFIG, 0, noise_runs=0, ensemble_noise=StepNoise(0.03, 0.01),
                        ensemble_runs=5)
    det, ens = load["deterministic"], load["deterministic"]["ensemble"]
    assert ens["runs"] == 5 and load["predicted_run"].policy == "predicted"
    assert det["predicted"] == {**summarize(predict(w, "static", CONFIG, profile, 1)), "policy": "predicted"}
    assert load["rel_error"] == rel_errors(load["measured"], load["predicted"])
    plain = compare_load(m, profile, "static", CONFIG, 0, noise_runs=0, ensemble_noise=StepNoise(0.03, 0.01),
                         ensemble_runs=0)
    assert plain["deterministic"] is None and plain["predicted"] == det["predicted"]


def test_compare_load_measures_the_mean_of_the_repeats_and_judges_by_their_spread(profile):
    from calib.judge import judge
    from calib.validate import compare_load, merge_repeats

    repeats = [_noisy_load(profile, seed) for seed in (9, 10, 11)]
    m = merge_repeats(repeats)
    assert len(m["samples"]) == sum(len(r["samples"]) for r in repeats)
    load = compare_load(m, profile, "static", CONFIG, 0)
    runs = [summarize(r["measured_run"]) for r in repeats]
    mean = sum(r["ttft_s"]["p90"] for r in runs) / 3
    assert load["repeats"] == 3 and load["measured"]["ttft_s"]["p90"] == pytest.approx(mean)
    spread = (max(r["ttft_s"]["p90"] for r in runs) - min(r["ttft_s"]["p90"] for r in runs)) / mean
    assert load["repeat_spread"]["ttft_s"]["p90"] == pytest.approx(spread)
    assert load["verdict"] == judge(load["rel_error"], load["repeat_spread"], 3)
    # noisy reruns are asked for, not run by default
    assert load["deterministic"] is None and load["step_noise"] is None
