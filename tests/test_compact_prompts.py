"""Trace prompts kept compactly (arrays, block hashes), repeated traces, and step samples kept as columns."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from scheduler import Request
from sim.records import StepSample
from sim.traces import load_trace

FIXTURES = Path(__file__).parent / "fixtures"
MOONCAKE = FIXTURES / "mooncake_synthetic_50.jsonl"


def mooncake_reference(hashes: list, n: int, block: int, vocab_size: int) -> tuple[int, ...]:
    """The token rule of a Mooncake prompt, written out position by position."""
    k = min(len(hashes), -(-n // block))
    out = []
    for p in range(n):
        b = min(p // block, k - 1)
        x = (hashes[b] * 0x9E3779B97F4A7C15 + (p - b * block)) % 2**64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
        x ^= x >> 31
        out.append(10 + x % (vocab_size - 10))
    return tuple(out)


@pytest.mark.parametrize("length_scale", [1.0, 0.37, 1.9])
def test_mooncake_prompts_are_their_block_hashes_and_read_as_tuples(length_scale):
    from sim.workload import HashedTokens

    rows = [json.loads(line) for line in MOONCAKE.open()][:6]
    w = load_trace(MOONCAKE, limit=6, length_scale=length_scale, vocab_size=1000)
    block = max(1, int(512 * length_scale + 0.5))
    for r, row in zip(w.requests, rows, strict=True):
        ids = r.prompt_token_ids
        assert isinstance(ids, HashedTokens)
        want = mooncake_reference(row["hash_ids"], len(ids), block, 1000)
        assert ids[:] == want and ids == want and hash(ids) == hash(want)
        assert ids[5:900:7] == want[5:900:7] and ids[-1] == want[-1] and list(ids) == list(want)


def test_a_trace_workload_holds_no_token_tuples():
    w = load_trace(MOONCAKE)
    num_tokens = sum(r.num_prompt_tokens for r in w.requests)
    assert num_tokens > 500_000
    assert len(pickle.dumps(w)) < num_tokens / 20  # hash ids, not tokens: a tuple pickles at >= 3 bytes a token
    azure = load_trace(FIXTURES / "azure_conv_50.csv")
    num_tokens = sum(r.num_prompt_tokens for r in azure.requests)
    assert len(pickle.dumps(azure)) < 2.5 * num_tokens + 20_000  # 2 bytes a token (uint16)


def test_the_scheduler_keeps_a_compact_prompt_and_copies_a_list():
    from sim.workload import CompactTokens, TokenArray

    w = load_trace(MOONCAKE, limit=1)
    tokens = w.requests[0].prompt_token_ids
    assert isinstance(tokens, CompactTokens)
    assert Request("a", tokens).prompt_token_ids is tokens
    array = TokenArray(np.arange(10, 20, dtype=np.uint16))
    assert Request("a", array).prompt_token_ids is array and Request("a", array).token_at(8, 10) == (18, 19)
    assert Request("b", [1, 2, 3]).prompt_token_ids == (1, 2, 3)
    assert Request("b", [1, 2, 3]).token_at(1, 3) == (2, 3)
    assert Request("c", tokens).token_at(0, 4) == tuple(tokens)[:4]


def test_repeat_plays_the_trace_again_with_prefixes_of_its_own():
    once = load_trace(MOONCAKE)
    twice = load_trace(MOONCAKE, repeat=3)
    n = len(once.requests)
    assert len(twice.requests) == 3 * n and twice.source["repeat"] == 3
    times = [r.arrival_s for r in once.requests]
    period = times[-1] * n / (n - 1)
    for k in range(3):
        copy = twice.requests[k * n : (k + 1) * n]
        assert [r.arrival_s for r in copy] == pytest.approx([t + k * period for t in times])
        assert [r.num_prompt_tokens for r in copy] == [r.num_prompt_tokens for r in once.requests]
    first_blocks = {r.prompt_token_ids[:512] for r in twice.requests}
    assert len(first_blocks) == 3 * len({r.prompt_token_ids[:512] for r in once.requests})
    assert len({r.request_id for r in twice.requests}) == 3 * n
    with pytest.raises(ValueError, match="repeat=0 must be an int >= 1"):
        load_trace(MOONCAKE, repeat=0)


def test_step_log_reads_like_the_list_it_replaces_and_writes_the_same_csv(tmp_path):
    from sim.records import StepLog, write_steps_csv

    rng = np.random.default_rng(3)
    samples = [StepSample(int(rng.integers(2)), float(t), float(t) + 0.01, *map(int, rng.integers(0, 99, 8)))
               for t in np.cumsum(rng.random(20_000))]
    log = StepLog()
    for s in samples:
        log.append(s)
    assert len(log) == len(samples) and list(log) == samples and log == samples and log[123] == samples[123]
    cols = log.columns()
    assert cols["end_s"].tolist() == [s.end_s for s in samples]
    assert cols["kv_used_blocks"].tolist() == [s.kv_used_blocks for s in samples]
    with (tmp_path / "want.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(cols))
        writer.writeheader()
        writer.writerows({k: getattr(s, k) for k in cols} for s in samples)
    assert write_steps_csv(tmp_path / "got.csv", log).read_bytes() == (tmp_path / "want.csv").read_bytes()


def test_steps_csv_of_chained_steps_with_constant_counts(tmp_path):
    from sim.records import StepLog, write_steps_csv

    samples, t = [], 0.0
    for i in range(20_000):  # steps back to back (start = the last end), some idle gaps, many equal counts
        start = t + (0.25 if i % 997 == 5 else 0.0)
        t = start + 0.001 * (1 + i % 7)
        samples.append(StepSample(0, start, t, 1 + i // 5000, 0, 1, 0, 1, 7, 64, 0, 0 if i < 15_000 else i))
    samples[0].end_s, samples[1].start_s = 0.0, -0.0  # equal, written differently
    log = StepLog(samples)
    with (tmp_path / "want.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(log.columns()))
        writer.writerows([getattr(s, k) for k in log.columns()] for s in samples)
    assert write_steps_csv(tmp_path / "got.csv", log).read_bytes() == (tmp_path / "want.csv").read_bytes()


def shared_prefix_prompts(dtype, n: int = 40, seed: int = 5):
    """PromptArrays of n prompts, each one of three prefixes (or none) and a tail of its own, and the
    same prompts as tuples."""
    from sim.prompt_arrays import PromptArrays

    rng = np.random.default_rng(seed)
    high = 1 << 16 if dtype == np.uint16 else 1 << 62
    prefixes = [rng.integers(10, high, size=k, dtype=np.int64) for k in (0, 7, 33, 70)]
    parts, lengths = [], []
    for _ in range(n):
        prompt = np.concatenate([prefixes[rng.integers(len(prefixes))],
                                 rng.integers(10, high, size=int(rng.integers(0, 60)), dtype=np.int64)])
        parts.append(prompt)
        lengths.append(len(prompt))
    prompts = PromptArrays(np.concatenate(parts).astype(dtype), lengths)
    return prompts, [tuple(p.tolist()) for p in parts]


@pytest.mark.parametrize("dtype", [np.uint16, np.int64])
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_prompt_arrays_know_the_schedulers_prefix_hashes(dtype, block_size):
    from scheduler.kv import KVPool

    prompts, tuples = shared_prefix_prompts(dtype)
    pool = KVPool(4, block_size, 2)
    for i, ids in enumerate(tuples):
        tokens = prompts.prompt(i)
        assert tokens == ids
        for max_blocks in (len(ids) // block_size, (len(ids) - 1) // block_size, 2, 0, -1, 10**9):
            want = pool.chain_hashes(ids, max_blocks)  # a tuple: hashed block by block
            assert tokens.prefix_hashes(block_size, max_blocks) == want
            assert pool.chain_hashes(tokens, max_blocks) == want


def test_int_lanes_are_python_int_hashes():
    from sim.prompt_arrays import _int_lanes

    values = [0, 1, -1, -2, 2**61 - 2, 2**61 - 1, 2**61, -(2**61) + 1, -(2**61), 2**62 + 5, 2**63 - 1, -(2**63), 123]
    lanes = _int_lanes(np.array(values, dtype=np.int64)).view(np.int64).tolist()
    assert lanes == [hash(v) for v in values]


def test_prompt_windows_pickles_and_forgotten_hashes():
    from sim.prompt_arrays import forget_prefix_hashes

    prompts, tuples = shared_prefix_prompts(np.uint16, n=6)
    tokens = prompts.prompt(3)
    window = tokens.window(2, 9)
    assert len(window) == 7 and window == tuples[3][2:9] and tuple(window) == tuples[3][2:9]
    assert window[1:4] == tuples[3][3:6] and window[-1] == tuples[3][8] and hash(window) == hash(tuples[3][2:9])
    for part in (slice(5, None, -1), slice(6, 1, -2), slice(None, None, -1), slice(1, 6, 2), slice(-3, None)):
        assert tokens[part] == tuples[3][part] and window[part] == tuples[3][2:9][part]
    assert Request("a", tokens).chunk_tokens(2, 9) == tuples[3][2:9]
    assert isinstance(Request("a", tuples[3]).chunk_tokens(2, 9), tuple)
    hashes = tokens.prefix_hashes(4, 100)
    assert prompts._hashes and hashes
    forget_prefix_hashes([tokens, tuples[0]])
    assert not prompts._hashes and tokens.prefix_hashes(4, 100) == hashes
    copies = pickle.loads(pickle.dumps([prompts.prompt(i) for i in range(6)]))
    assert copies == [prompts.prompt(i) for i in range(6)] and copies[0].owner is copies[5].owner
    assert copies[3].prefix_hashes(4, 100) == hashes


@pytest.mark.parametrize("policy", ["chunked", "continuous"])
def test_a_replay_with_compact_prompts_shares_what_tuples_share(policy, monkeypatch):
    from dataclasses import asdict

    from backends.cost import LinearCostModel
    from backends.synthetic import SyntheticBackend
    from scheduler import SchedulerConfig
    from sim import prompt_arrays
    from sim.model import run_workload
    from sim.workload import Workload, WorkloadRequest

    made = []
    hash_all = prompt_arrays.chain_hashes
    monkeypatch.setattr(prompt_arrays, "chain_hashes", lambda *a: made.append(a[-1]) or hash_all(*a))
    prompts, tuples = shared_prefix_prompts(np.uint16, n=80)
    cfg = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=64, num_kv_blocks=60, block_size=4,
                          max_model_len=512)
    runs = []
    for ids in ([prompts.prompt(i) for i in range(len(tuples))], tuples):
        w = Workload(tuple(WorkloadRequest(f"r{i}", 0.05 * i, p, 3 + i % 7) for i, p in enumerate(ids)), "w", {})
        runs.append(run_workload(w, policy, cfg, [SyntheticBackend(LinearCostModel())]))
    compact, plain = runs
    assert [asdict(r) for r in compact.records] == [asdict(r) for r in plain.records]
    assert compact.steps == plain.steps
    assert sum(r.num_cached_tokens for r in plain.records) > 0  # prefixes were shared
    assert made == [4] and not prompts._hashes  # made once for the run, and dropped after it
