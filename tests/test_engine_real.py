"""The engine on the real default model: text, stops, seeds, streaming, rejection, aborts, no leaks."""

import threading

import pytest

from scheduler import SamplingParams


@pytest.fixture()
def core(llama_model):
    from backends.llamacpp import LlamaCppBackend
    from serve.engine import EngineCore

    backend = LlamaCppBackend(llama_model, n_ctx=2048, n_seq_max=4, n_threads=2)
    yield EngineCore(backend, "continuous")
    backend.close()


def run_all(core, ids):
    done = {}
    while not all(i in done for i in ids):  # step() also reports requests rejected or aborted earlier
        for c in core.step():
            done[c.request_id] = c
    return [done[i] for i in ids]


def finished_now(core, rid):
    r = core.scheduler.requests[rid]
    return r.is_finished


def test_max_tokens_stop_strings_and_stop_tokens(core):
    a = core.add(core.encode("1, 2, 3, 4,"), SamplingParams(max_tokens=12), "len")
    b = core.add(core.encode("1, 2, 3, 4,"), SamplingParams(max_tokens=40, stop=(" 7",)), "stopstr")
    first = core.scheduler.requests
    ca, cb = run_all(core, [a, b])
    assert ca.finish_reason == "length" and ca.num_output_tokens == 12
    assert cb.finish_reason == "stop" and cb.detail == "stop string"
    assert " 7" not in cb.text and cb.text.strip().startswith("5")  # text before the stop string is kept
    tok = ca.token_ids[0]
    c = core.add(core.encode("1, 2, 3, 4,"), SamplingParams(max_tokens=12, stop_token_ids=(tok,)), "stoptok")
    (cc,) = run_all(core, [c])
    assert cc.finish_reason == "stop" and cc.num_output_tokens == 1
    assert first["len"].output_token_ids == list(ca.token_ids)


def test_eos_stops_unless_ignored(core):
    # base gemma-3-270m rarely ends a greedy completion by itself, so the 5th sampled token is
    # replaced by the model's own end-of-generation token at the seam (real compute, injected EOS)
    eog = core.backend.eog_token_ids
    assert set(eog) == set(core.scheduler.config.eos_token_ids) and eog
    real_step = core.backend.step
    count = {}

    def step(plan):
        result = real_step(plan)
        for rid in result.sampled_token_ids:
            count[rid] = count.get(rid, 0) + 1
            if count[rid] == 5:
                result.sampled_token_ids[rid] = eog[0]
        return result

    core.backend.step = step
    try:
        prompt = core.encode("The end.")
        a = core.add(prompt, SamplingParams(max_tokens=16), "eos")
        b = core.add(prompt, SamplingParams(max_tokens=16, ignore_eos=True), "noeos")
        ca, cb = run_all(core, [a, b])
    finally:
        del core.backend.step
    assert ca.finish_reason == "stop" and ca.num_output_tokens == 5 and ca.token_ids[-1] == eog[0]
    assert ca.text == core.tokenizer.decode(list(ca.token_ids[:4]))  # the EOS token adds no text
    assert cb.finish_reason == "length" and cb.num_output_tokens == 16


def test_seeded_sampling_is_reproducible(core):
    prompt = core.encode("Once upon a time")
    sp = lambda seed: SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=seed)  # noqa: E731
    ids = [core.add(prompt, sp(7), "s7a"), core.add(prompt, sp(7), "s7b"), core.add(prompt, sp(8), "s8")]
    a, b, c = run_all(core, ids)
    assert a.token_ids == b.token_ids  # same seed, same batch shape position aside: same draws
    assert a.token_ids != c.token_ids


def test_utf8_streaming_never_splits_a_character(core):
    pieces = []
    rid = core.add(core.encode("日本語の文章を書いてください。東京は"), SamplingParams(max_tokens=40, ignore_eos=True),
                   "utf8", sink=lambda p: pieces.append(p) if isinstance(p, str) else None)
    (c,) = run_all(core, [rid])
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == c.text == core.tokenizer.decode(list(c.token_ids))
    assert any(ord(ch) > 0x2E80 for ch in c.text)  # it really produced multi-byte text


def test_too_long_prompt_is_rejected_and_engine_goes_on(core):
    long_prompt = list(range(1000, 1000 + core.scheduler.config.max_model_len + 10))
    bad = core.add(long_prompt, SamplingParams(max_tokens=4), "toolong")
    assert finished_now(core, bad)
    r = core.scheduler.requests[bad]
    assert r.finish_reason.value == "rejected" and "exceeds" in r.finish_detail
    ok = core.add(core.encode("Hello"), SamplingParams(max_tokens=4), "fine")
    (c,) = run_all(core, [ok])
    assert c.finish_reason == "length"


@pytest.mark.parametrize("kv_unified", [False, True])
def test_nothing_leaks_after_aborts_rejections_and_preemptions(llama_model, kv_unified):
    from backends.llamacpp import LlamaCppBackend
    from serve.engine import EngineCore

    backend = LlamaCppBackend(llama_model, n_ctx=1024, n_seq_max=4, n_threads=2, kv_unified=kv_unified)
    # a KV budget far below 4 x the requests' needs forces preemptions
    core = EngineCore(backend, "continuous", num_kv_blocks=12, block_size=16)
    try:
        system = core.encode("You are a terse assistant. Answer in one line. " * 3)
        ids = [core.add(system + core.encode(f" Question {i}:"), SamplingParams(max_tokens=40, ignore_eos=True),
                        f"q{i}") for i in range(8)]
        core.add(list(range(500, 1300)), SamplingParams(max_tokens=8), "rejected")
        for _ in range(6):
            core.step()
        core.abort("q1")
        core.abort("q6")
        done = {}
        while core.scheduler.has_unfinished():
            for c in core.step():
                done[c.request_id] = c
        assert core.scheduler.stats.num_preemptions > 0
        assert core.scheduler.requests["q1"].finish_reason.value == "abort"
        assert all(done[i].num_output_tokens == 40 for i in ids if i not in ("q1", "q6"))
        core.release_cache()
        assert set(backend.debug_kv_state().values()) == {(-1, -1)}
        assert core.scheduler.pool.num_used_blocks == 0
    finally:
        backend.close()


def test_online_engine_streams_and_aborts_from_other_threads(core):
    from serve.engine import OnlineEngine

    engine = OnlineEngine(core)
    try:
        results = {}

        def client(name, max_tokens):
            stream = engine.submit("Tell me a story about a fox.", SamplingParams(max_tokens=max_tokens,
                                                                                   ignore_eos=True), request_id=name)
            results[name] = ("".join(stream), stream.completion)

        threads = [threading.Thread(target=client, args=(f"c{i}", 10 + i)) for i in range(3)]
        for t in threads:
            t.start()
        long_stream = engine.submit("Count to one thousand:", SamplingParams(max_tokens=400, ignore_eos=True),
                                    request_id="long")
        pieces = iter(long_stream)
        next(pieces)
        engine.abort("long")
        for t in threads:
            t.join(timeout=120)
        rest = list(pieces)
        assert long_stream.completion.finish_reason == "abort" and long_stream.completion.num_output_tokens < 400
        assert isinstance(rest, list)
        for i in range(3):
            text, comp = results[f"c{i}"]
            assert comp.finish_reason == "length" and comp.num_output_tokens == 10 + i and text == comp.text
    finally:
        engine.shutdown()
