"""KV operations of the real backend: prefix copies, removes, padding, failures, batch splits."""

from __future__ import annotations

import numpy as np
import pytest

from backends.llamacpp import LlamaCppBackend
from scheduler.messages import KVCopy, KVRemove, ScheduledChunk, StepPlan

# Measured (docs/llamacpp-notes.md): a 128-token shared system prompt copied from a slot that
# computed it inside a longer prefill, then the rest decoded, gave KL <= 0.010 and
# max |diff| <= 1.7 against a full recompute (random tokens: KL <= 0.059, max |diff| <= 2.4);
# only the micro-batch shapes differ, the math is the same.
MAX_PREFIX_KL = 0.05
MAX_PREFIX_ABS_DIFF = 4.0
MAX_RANDOM_TOKENS_KL = 0.15  # the same comparison on random token ids, whose distributions are flatter


def _ids(n: int, seed: int = 0) -> tuple[int, ...]:
    rng = np.random.default_rng(seed)
    return tuple(int(t) for t in rng.integers(1000, 30000, n))


def _kl(test: np.ndarray, ref: np.ndarray) -> float:
    def ls(x):
        x = x - x.max()
        return x - np.log(np.exp(x).sum())

    return float((np.exp(ls(ref)) * (ls(ref) - ls(test))).sum())


def _run(backend, chunks=(), removes=(), copies=(), finished=(), step_id=0):
    return backend.step(
        StepPlan(
            step_id,
            0.0,
            tuple(chunks),
            removes=tuple(removes),
            copies=tuple(copies),
            finished_request_ids=tuple(finished),
        )
    )


@pytest.fixture
def backend(llama_backend):
    llama_backend.clear_kv()
    yield llama_backend
    llama_backend.clear_kv()


def _empty(backend) -> bool:
    return all(v == (-1, -1) for v in backend.debug_kv_state().values())


# -- prefix copies --------------------------------------------------------------------


def test_partial_copy_holds_exactly_the_prefix_and_matches_the_uncopied_run(backend):
    """KVCopy = full seq_cp + seq_rm(dst, n, -1): dst holds [0, n) and computes as if it had prefilled it."""
    prefix, rest, other = _ids(32, 1), _ids(8, 2), _ids(12, 3)
    # Source: the prefix as its own prefill, then 12 more tokens the copy must not carry along.
    _run(backend, [ScheduledChunk("src", 0, 0, prefix, False)])
    _run(backend, [ScheduledChunk("src", 0, 32, other, True)])
    # Reference: the same prefix prefill and the rest in slot 5, no copy involved.
    _run(backend, [ScheduledChunk("ref", 5, 0, prefix, False)])
    _run(backend, [ScheduledChunk("ref", 5, 32, rest, True)])
    ref = backend.logits_for_last_step()["ref"]

    _run(backend, copies=[KVCopy(0, 3, 32)])
    assert backend.debug_kv_state()[3] == (0, 31)
    assert backend.debug_kv_state()[0] == (0, 43)  # the source is untouched
    before = backend.num_decoded_tokens
    result = _run(backend, [ScheduledChunk("dst", 3, 32, rest, True)])
    assert result.failed == {}
    assert backend.num_decoded_tokens - before == len(rest)  # only the rest was decoded
    got = backend.logits_for_last_step()["dst"]
    assert np.allclose(got, ref, rtol=0, atol=1e-4), float(np.abs(got - ref).max())
    assert backend.debug_kv_state()[3] == (0, 39)


def test_move_carries_the_kv_and_frees_the_source_for_a_new_request_in_the_same_step(backend):
    """KVCopy(move=True), as slot compaction plans it: the request continues in dst as if it had never moved,
    and its old slot is empty at once, so a new request can prefill there in the same batch."""
    prompt, rest, other = _ids(20, 11), _ids(6, 12), _ids(9, 13)
    _run(backend, [ScheduledChunk("mv", 4, 0, prompt, True)])
    _run(backend, [ScheduledChunk("ref", 6, 0, prompt, True)])
    _run(backend, [ScheduledChunk("ref", 6, 20, rest, True)])
    ref = backend.logits_for_last_step()["ref"]
    _run(backend, [ScheduledChunk("alone", 7, 0, other, True)])
    alone = backend.logits_for_last_step()["alone"]

    result = _run(backend, [ScheduledChunk("mv", 1, 20, rest, True), ScheduledChunk("new", 4, 0, other, True)],
                  copies=[KVCopy(4, 1, 20, move=True)])
    assert result.failed == {}
    state = backend.debug_kv_state()
    assert state[1] == (0, 25)  # the moved request: its 20 positions plus the 6 new ones
    assert state[4] == (0, 8)  # only the new request: the move emptied the slot before the batch wrote it
    got = backend.logits_for_last_step()
    assert np.allclose(got["mv"], ref, rtol=0, atol=1e-4), float(np.abs(got["mv"] - ref).max())
    assert np.allclose(got["new"], alone, rtol=0, atol=1e-4), float(np.abs(got["new"] - alone).max())


SYSTEM_PROMPT = 3 * (
    "You are a careful assistant for a public library. Answer questions about opening hours, "
    "membership, book loans, late fees and events. Be brief, polite and precise; if you do not know, say so. "
)


@pytest.mark.parametrize("question", ["How long can I keep a borrowed novel?", "Can I renew a loan online?"])
def test_shared_system_prompt_copy_close_to_full_recompute(backend, question):
    prompt = tuple(backend.tokenizer.encode_chat([{"role": "user", "content": SYSTEM_PROMPT + question}]))
    assert len(prompt) > 140
    _run(backend, [ScheduledChunk("full", 0, 0, prompt, True)])
    full = backend.logits_for_last_step()["full"]
    before = backend.num_decoded_tokens
    result = _run(backend, [ScheduledChunk("cp", 6, 128, prompt[128:], True)], copies=[KVCopy(0, 6, 128)])
    assert result.failed == {}
    assert backend.num_decoded_tokens - before == len(prompt) - 128  # only the rest was decoded
    got = backend.logits_for_last_step()["cp"]
    assert _kl(got, full) <= MAX_PREFIX_KL
    assert float(np.abs(got - full).max()) <= MAX_PREFIX_ABS_DIFF
    assert got.argmax() == full.argmax() == result.sampled_token_ids["cp"]


def test_copy_chain_in_one_step_and_copy_replaces_dst(backend):
    prompt = _ids(40, 5)
    _run(backend, [ScheduledChunk("a", 0, 0, prompt, True)])
    _run(backend, [ScheduledChunk("junk", 2, 0, _ids(20, 6), False)])
    # 0 -> 1 -> 2 in one step; slot 2's old content is replaced, and the data copies
    # (deferred by llama.cpp to the next decode) run in order.
    result = _run(
        backend,
        [ScheduledChunk("c", 2, 16, prompt[16:], True)],
        copies=[KVCopy(0, 1, 32), KVCopy(1, 2, 16)],
    )
    assert result.failed == {}
    assert backend.debug_kv_state()[1] == (0, 31)
    assert backend.debug_kv_state()[2] == (0, 39)
    full = _run(backend, [ScheduledChunk("again", 7, 0, prompt, True)])
    assert result.sampled_token_ids["c"] == full.sampled_token_ids["again"]


def test_invalid_copy_fails_only_the_destination_request(backend):
    _run(backend, [ScheduledChunk("a", 0, 0, _ids(10), False)])
    result = _run(
        backend,
        [ScheduledChunk("bad", 1, 16, _ids(4), True), ScheduledChunk("ok", 4, 0, _ids(4), True)],
        copies=[KVCopy(0, 1, 16)],
    )
    assert "bad" in result.failed and "holds positions up to 9" in result.failed["bad"]
    assert set(result.sampled_token_ids) == {"ok"}
    assert backend.debug_kv_state()[1] == (-1, -1)


def test_copy_in_unified_kv_shares_cells_and_matches(llama_model):
    with LlamaCppBackend(llama_model, n_ctx=1024, n_seq_max=4, kv_unified=True, return_logits=True) as be:
        assert be.slot_capacity_tokens == be.n_ctx == 1024
        prefix, rest = _ids(32, 7), _ids(8, 8)
        _run(be, [ScheduledChunk("src", 0, 0, prefix, False)])
        _run(be, [ScheduledChunk("src", 0, 32, _ids(5, 9), False)])
        _run(be, [ScheduledChunk("ref", 1, 0, prefix, False)])
        ref = _run(be, [ScheduledChunk("ref", 1, 32, rest, True)])
        ref_logits = be.logits_for_last_step()["ref"]
        got = _run(be, [ScheduledChunk("dst", 2, 32, rest, True)], copies=[KVCopy(0, 2, 32)])
        assert got.failed == {}
        assert be.debug_kv_state()[2] == (0, 39)
        assert got.sampled_token_ids["dst"] == ref.sampled_token_ids["ref"]
        assert _kl(be.logits_for_last_step()["dst"], ref_logits) <= MAX_PREFIX_KL


def test_sliding_window_prefix_copies(llama_model):
    """gemma-3 attends 512 positions in its SWA layers; swa_full decides whether old prefixes stay usable."""
    assert llama_model.n_swa == 512
    prompt = _ids(800, 10)
    for swa_full in (True, False):
        # swa_full=False sizes the SWA cache at pad256(n_swa + n_ubatch) = 768 cells, so 800 tokens evict.
        with LlamaCppBackend(llama_model, n_ctx=2048, n_seq_max=2, n_ubatch=256, swa_full=swa_full) as be:
            assert _run(be, [ScheduledChunk("src", 0, 0, prompt, False)]).failed == {}
            lo, hi = be.debug_kv_state()[0]
            result = _run(be, [ScheduledChunk("dst", 1, 300, prompt[300:304], True)], copies=[KVCopy(0, 1, 300)])
            if swa_full:
                assert (lo, hi) == (0, 799)
                assert result.failed == {} and be.debug_kv_state()[1] == (0, 303)
            else:
                assert lo > 0 and hi == 799  # the sliding-window cache dropped positions [0, lo)
                assert "sliding-window" in result.failed["dst"]
                assert be.debug_kv_state()[1] == (-1, -1)
                # A prefix whose window is still cached copies fine.
                ok = _run(be, [ScheduledChunk("dst2", 1, 700, prompt[700:702], True)], copies=[KVCopy(0, 1, 700)])
                assert ok.failed == {}


# -- removes, padding, leaks ----------------------------------------------------------


def test_mixed_steps_leave_no_kv_behind(backend):
    a, b, c = _ids(20, 11), _ids(9, 12), _ids(33, 13)
    r = _run(backend, [ScheduledChunk("a", 0, 0, a, True), ScheduledChunk("b", 1, 0, b, True)])
    ta, tb = r.sampled_token_ids["a"], r.sampled_token_ids["b"]
    r = _run(
        backend,
        [
            ScheduledChunk("a", 0, 20, (ta,), True, is_decode=True),
            ScheduledChunk("b", 1, 9, (tb,), True, is_decode=True),
            ScheduledChunk("c", 2, 0, c[:16], False),
        ],
    )
    r = _run(backend, [ScheduledChunk("c", 2, 16, c[16:], True)], copies=[KVCopy(0, 5, 16)], removes=[KVRemove(1)])
    assert backend.debug_kv_state()[1] == (-1, -1)
    assert backend.debug_kv_state()[5] == (0, 15)
    r = _run(backend, [ScheduledChunk("d", 5, 16, a[16:20], True)], removes=[KVRemove(0, 10)], finished=["b"])
    assert r.failed == {}
    assert backend.debug_kv_state()[0] == (0, 9)
    _run(backend, removes=[KVRemove(s) for s in (0, 2, 5)], finished=["a", "c", "d"])
    assert _empty(backend)


def test_padding_spends_compute_but_leaves_the_requests_kv_unchanged(backend):
    a, b = _ids(12, 14), _ids(5, 15)
    _run(backend, [ScheduledChunk("a", 0, 0, a, True), ScheduledChunk("b", 1, 0, b, True, num_pad_tokens=7)])
    assert backend.debug_kv_state()[1] == (0, 4)  # the 7 pads ran after b's tokens and were dropped
    before = backend.num_decoded_tokens
    r = _run(
        backend,
        [
            ScheduledChunk("a", 0, 12, (5,), True, is_decode=True),
            ScheduledChunk("b", 1, 5, (), False, num_pad_tokens=1),  # finished, kept to pad the batch
        ],
    )
    assert backend.num_decoded_tokens - before == 2
    assert set(r.sampled_token_ids) == {"a"} and r.failed == {}
    assert backend.debug_kv_state()[1] == (0, 4)
    # b's KV is intact: continuing it matches an unpadded run of the same tokens.
    r = _run(backend, [ScheduledChunk("b", 1, 5, (7,), True, is_decode=True)])
    got = backend.logits_for_last_step()["b"]
    _run(backend, [ScheduledChunk("b2", 2, 0, b + (7,), True)])
    assert _kl(got, backend.logits_for_last_step()["b2"]) <= MAX_RANDOM_TOKENS_KL


# -- failures -------------------------------------------------------------------------


def test_plan_errors_land_in_failed_and_the_backend_keeps_working(backend):
    cap = backend.slot_capacity_tokens
    _run(backend, [ScheduledChunk("a", 0, 0, _ids(4), False)])
    r = _run(
        backend,
        [
            ScheduledChunk("too_long", 1, 0, _ids(cap + 1), True),
            ScheduledChunk("wrong_pos", 0, 7, (5,), True),
            ScheduledChunk("bad_slot", backend.num_slots, 0, (5,), True),
            ScheduledChunk("bad_token", 3, 0, (backend.vocab_size,), True),
            ScheduledChunk("fine", 2, 0, _ids(3), True),
        ],
    )
    assert set(r.failed) == {"too_long", "wrong_pos", "bad_slot", "bad_token"}
    assert "capacity" in r.failed["too_long"] and "holds positions up to 3" in r.failed["wrong_pos"]
    assert set(r.sampled_token_ids) == {"fine"}
    assert backend.debug_kv_state()[0] == (0, 3) and backend.debug_kv_state()[1] == (-1, -1)
    r = _run(backend, [ScheduledChunk("a", 0, 4, (5,), True)])
    assert r.failed == {} and "a" in r.sampled_token_ids


def test_two_chunks_in_one_slot_both_fail(backend):
    r = _run(backend, [ScheduledChunk("x", 0, 0, (5,), True), ScheduledChunk("y", 0, 0, (6,), True)])
    assert set(r.failed) == {"x", "y"} and backend.debug_kv_state()[0] == (-1, -1)


def test_llama_decode_failure_is_reported_and_kv_stays_consistent(llama_model):
    # kv_unified: one pool of 256 cells for all slots, so a second prompt finds no room (rc=1).
    with LlamaCppBackend(llama_model, n_ctx=256, n_seq_max=2, kv_unified=True) as be:
        assert _run(be, [ScheduledChunk("a", 0, 0, _ids(200), True)]).failed == {}
        r = _run(be, [ScheduledChunk("b", 1, 0, _ids(100), True)])
        assert "llama_decode returned 1" in r.failed["b"] and "no KV slot" in r.failed["b"]
        assert r.sampled_token_ids == {}
        assert be.debug_kv_state() == {0: (0, 199), 1: (-1, -1)}
        r = _run(be, [ScheduledChunk("a", 0, 200, (5,), True), ScheduledChunk("c", 1, 0, _ids(40), True)])
        assert r.failed == {} and set(r.sampled_token_ids) == {"a", "c"}


# -- batch splitting ------------------------------------------------------------------


def test_plan_larger_than_n_batch_is_split_into_several_decodes(llama_model, llama_backend):
    prompts = [_ids(40, 20), _ids(30, 21)]
    llama_backend.clear_kv()
    whole = _run(llama_backend, [ScheduledChunk(f"r{i}", i, 0, p, True) for i, p in enumerate(prompts)])
    llama_backend.clear_kv()
    whole_logits = llama_backend.logits_for_last_step()
    llama_backend.clear_kv()
    with LlamaCppBackend(llama_model, n_ctx=512, n_seq_max=2, n_batch=32, return_logits=True) as be:
        calls = be.num_decode_calls
        split = _run(be, [ScheduledChunk(f"r{i}", i, 0, p, True) for i, p in enumerate(prompts)])
        assert be.num_decode_calls - calls == 3  # 70 tokens, 32 per llama_decode
        assert split.failed == {} and set(split.sampled_token_ids) == {"r0", "r1"}
        for rid, logits in be.logits_for_last_step().items():
            assert _kl(logits, whole_logits[rid]) <= MAX_PREFIX_KL
            assert split.sampled_token_ids[rid] == int(logits.argmax())
        assert be.debug_kv_state() == {0: (0, 39), 1: (0, 29)}
    assert whole.failed == {}
