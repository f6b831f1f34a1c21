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
