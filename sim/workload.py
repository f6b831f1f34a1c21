"""Workloads: the requests a run replays, from generators or traces, with how to repeat them."""

from __future__ import annotations

import json
import math
import operator
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sim.arrivals import generate_arrivals
from sim.lengths import as_length_model

if TYPE_CHECKING:  # pragma: no cover
    from sim.prompt_arrays import PromptArrays

MIN_TOKEN_ID = 10  # ids below this are left for special tokens (bos, eos, pad) of any vocabulary


class CompactTokens(Sequence):
    """A prompt's token ids held compactly, made into Python ints only when read.

    A long-context trace holds ~10^8 prompt tokens: as tuples that is 8 bytes a token for as long as the
    run lasts. A slice gives a tuple (so the scheduler, which reads prompts in slices, sees what a tuple
    would give); it equals, and hashes like, the tuple of the same ids. window() gives a range lazily.
    """

    __slots__ = ()

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            positions = range(start, stop, step)
            if not positions:
                return ()
            if step > 0 and len(positions) < len(self) and id(self) not in _cache:  # a part: only its ids, not kept
                return tuple(self._ids(start, stop, step).tolist())
            return _materialized(self)[index]
        n = len(self)
        i = operator.index(index)
        if not -n <= i < n:
            raise IndexError("token index out of range")
        i %= n
        return int(self._ids(i, i + 1, 1)[0])

    def __iter__(self):
        return iter(self[:])

    def __eq__(self, other):
        if isinstance(other, (tuple, CompactTokens)):
            return len(self) == len(other) and self[:] == tuple(other)
        return NotImplemented

    def __hash__(self):
        return hash(self[:])

    def __add__(self, other):
        return self[:] + tuple(other)

    def __radd__(self, other):
        return tuple(other) + self[:]

    def __repr__(self):
        return f"{type(self).__name__}({len(self)} tokens)"

    def window(self, start: int, stop: int) -> TokenWindow:
        """Positions [start, stop) (0 <= start <= stop <= len) as compact tokens of their own, equal to the
        slice and read only when used: a plan's prefill chunk, which a simulated backend only counts."""
        return TokenWindow(self, start, stop)

    def _ids(self, start: int, stop: int, step: int) -> np.ndarray:
        raise NotImplementedError


class TokenWindow(CompactTokens):
    """A range of positions of compact tokens (CompactTokens.window)."""

    __slots__ = ("base", "start", "_n")

    def __init__(self, base: CompactTokens, start: int, stop: int) -> None:
        self.base, self.start, self._n = base, start, stop - start

    def __len__(self) -> int:
        return self._n

    def _ids(self, start: int, stop: int, step: int) -> np.ndarray:
        return self.base._ids(self.start + start, self.start + stop, step)


# Prompts read whole lately, as tuples: one read whole (e.g. hashed at admission, when it cannot give its
# prefix hashes itself) is often read again in parts as it runs; a budget of tokens, not of prompts, bounds
# what this cache holds. A part of a prompt not held here is made on its own.
_CACHE_TOKENS = 1 << 18
_cache: OrderedDict[int, tuple[CompactTokens, tuple[int, ...]]] = OrderedDict()
_cached_tokens = 0


def _materialized(tokens: CompactTokens) -> tuple[int, ...]:
    """tokens as a tuple, from the cache of recently read prompts when there."""
    global _cached_tokens
    key = id(tokens)
    hit = _cache.get(key)
    if hit is not None:  # the entry holds tokens, so its id cannot have been reused
        _cache.move_to_end(key)
        return hit[1]
    ids = _as_tuple(tokens._ids(0, len(tokens), 1))
    _cache[key] = (tokens, ids)
    _cached_tokens += len(ids)
    while _cached_tokens > _CACHE_TOKENS and len(_cache) > 1:
        _cached_tokens -= len(_cache.popitem(last=False)[1][1])
    return ids


# one int object per uint16 id, shared: a prompt made of them allocates (and later frees) no ints
_UINT16_INTS = np.array(range(1 << 16), dtype=object)


def _as_tuple(ids: np.ndarray) -> tuple[int, ...]:
    """ids as a tuple of Python ints (shared ones when they fit in uint16)."""
    if ids.dtype == np.uint16:
        return tuple(_UINT16_INTS[ids].tolist())
    return tuple(ids.tolist())


class TokenArray(CompactTokens):
    """Token ids in a numpy array (often a view of one shared array): 2 bytes a token for vocabularies
    up to 65536. A prompt of a sim.prompt_arrays.PromptArrays (its owner) knows its prefix hashes."""

    __slots__ = ("array", "_n", "_owner", "_index")

    def __init__(self, array: np.ndarray, owner: PromptArrays | None = None, index: int = 0) -> None:
        self.array = array
        self._n = len(array)  # the scheduler asks for the length often
        self._owner, self._index = owner, index

    def __len__(self) -> int:
        return self._n

    def __reduce__(self):
        # an owner's prompt pickles as a reference into it: the owner's ids are pickled once, not per prompt
        return (self._owner.prompt, (self._index,)) if self._owner is not None else (TokenArray, (self.array,))

    @property
    def owner(self) -> PromptArrays | None:
        """The PromptArrays this prompt belongs to, or None."""
        return self._owner

    def prefix_hashes(self, block_size: int, max_blocks: int) -> list[int] | None:
        """scheduler.kv.KVPool.chain_hashes of these ids, when an owner computed them (else None)."""
        return None if self._owner is None else self._owner.prefix_hashes(self._index, block_size, max_blocks)

    def _ids(self, start: int, stop: int, step: int) -> np.ndarray:
        return self.array[start:stop:step]


class HashedTokens(CompactTokens):
    """Tokens of a prompt given as hash ids of its blocks (Mooncake): n tokens, each a pure function of
    its block's id and its position in the block, so equal ids give equal tokens; nothing else is kept.

    Blocks hold block_tokens tokens; the last block used takes the remainder (cut, or extended when the
    ids run out before n tokens).
    """

    __slots__ = ("hash_ids", "num_tokens", "block_tokens", "vocab_size")

    def __init__(self, hash_ids, num_tokens: int, block_tokens: int, vocab_size: int) -> None:
        self.hash_ids = np.asarray(hash_ids, dtype=np.uint64)
        self.num_tokens, self.block_tokens, self.vocab_size = num_tokens, block_tokens, vocab_size

    def __len__(self) -> int:
        return self.num_tokens

    def _ids(self, start: int, stop: int, step: int) -> np.ndarray:
        pos = np.arange(start, stop, step, dtype=np.int64)
        k = min(len(self.hash_ids), -(-self.num_tokens // self.block_tokens))
        block = np.minimum(pos // self.block_tokens, k - 1)
        offset = (pos - block * self.block_tokens).astype(np.uint64)
        ids = splitmix_tokens(self.hash_ids[block], offset, self.vocab_size)
        return ids.astype(np.uint16) if self.vocab_size <= 1 << 16 else ids


def splitmix_tokens(ids: np.ndarray, positions: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids in [MIN_TOKEN_ID, vocab_size) from splitmix64 of (id, position), as uint64 arrays."""
    x = ids * np.uint64(0x9E3779B97F4A7C15) + positions  # uint64 arrays wrap
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x % np.uint64(vocab_size - MIN_TOKEN_ID) + np.uint64(MIN_TOKEN_ID)).astype(np.int64)


def random_ids(rng: np.random.Generator, num_tokens: int, vocab_size: int) -> np.ndarray:
    """num_tokens ids uniform in [MIN_TOKEN_ID, vocab_size), as uint16 when the vocabulary fits (else int64).

    Drawn in pieces (the Generator gives the same stream as one call of the full size), so the int64
    draw never holds more than a piece at once.
    """
    out = np.empty(num_tokens, dtype=np.uint16 if vocab_size <= 1 << 16 else np.int64)
    draw = np.int32 if vocab_size < 1 << 31 else np.int64  # int32 draws the same values as int64, faster
    piece = 1 << 22
    for start in range(0, num_tokens, piece):
        stop = min(start + piece, num_tokens)
        out[start:stop] = rng.integers(MIN_TOKEN_ID, vocab_size, size=stop - start, dtype=draw)
    return out


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """One request of a workload: when it arrives, what it asks, how many tokens it may get."""

    request_id: str
    arrival_s: float
    prompt_token_ids: tuple[int, ...] | CompactTokens
    max_tokens: int
    priority: int = 0
    prompt: str | None = None  # text, when the workload carries it (real backend tokenizes it)
    messages: tuple | None = None  # chat messages (dicts), when given; treat as read-only

    def __post_init__(self):
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id={self.request_id!r} must be a non-empty string")
        if not isinstance(self.arrival_s, (int, float)) or not math.isfinite(self.arrival_s) or self.arrival_s < 0:
            raise ValueError(f"request {self.request_id}: arrival_s={self.arrival_s!r} must be a finite number >= 0")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"request {self.request_id}: max_tokens={self.max_tokens!r} must be an int >= 1")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise TypeError(f"request {self.request_id}: priority={self.priority!r} must be an int")
        if not isinstance(self.prompt_token_ids, (tuple, CompactTokens)):
            raise TypeError(f"request {self.request_id}: prompt_token_ids must be a tuple of ints or CompactTokens")
        if not self.prompt_token_ids and self.prompt is None and self.messages is None:
            raise ValueError(f"request {self.request_id}: give prompt_token_ids, prompt or messages")

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length in tokens (0 when only text is known: a tokenizer must fill the ids)."""
        return len(self.prompt_token_ids)


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests in arrival order, a description for reports, and the config that repeats them."""

    requests: tuple[WorkloadRequest, ...]
    description: str  # human-readable source + scale factors, goes in reports
    source: dict  # machine-readable config to repeat it (see workload_from_source)

    def __post_init__(self):
        seen: set[str] = set()
        prev = -math.inf
        for r in self.requests:
            if r.arrival_s < prev:
                raise ValueError(f"request {r.request_id} arrives at {r.arrival_s} s, before the one ahead of it")
            if r.request_id in seen:
                raise ValueError(f"request_id {r.request_id!r} appears twice; request ids must be unique")
            seen.add(r.request_id)
            prev = r.arrival_s


def request_id(index: int) -> str:
    """The workload's id for the index-th request in arrival order, e.g. 'r00042'."""
    return f"r{index:05d}"


@lru_cache(maxsize=4)
def _int_pool(vocab_size: int) -> tuple[int, ...]:
    # one shared int object per id: millions of prompt tokens then cost 8 bytes each, not 36
    return tuple(range(vocab_size))


def ids_to_tuple(ids: np.ndarray, vocab_size: int) -> tuple[int, ...]:
    """Convert an int array of token ids (< vocab_size) to a tuple of shared Python ints."""
    if ids.size == 0:
        return ()
    if ids.size == 1:
        return (_int_pool(vocab_size)[int(ids[0])],)
    return operator.itemgetter(*ids.tolist())(_int_pool(vocab_size))


def check_vocab_size(vocab_size: int) -> int:
    """Return vocab_size if it leaves room for ids in [MIN_TOKEN_ID, vocab_size), else raise ValueError."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= MIN_TOKEN_ID + 1:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int > {MIN_TOKEN_ID + 1}")
    return vocab_size


def random_prompts(
    rng: np.random.Generator,
    lengths: np.ndarray,
    vocab_size: int = 32000,
    shared_prefix_tokens: int = 0,
    num_prefix_groups: int = 1,
) -> list[tuple[int, ...]]:
    """Random prompts of the given lengths, each after one of G shared prefixes when shared_prefix_tokens > 0.

    Ids are uniform in [MIN_TOKEN_ID, vocab_size); two independent prompts share
    a first block of 16 tokens with probability ~vocab^-16, so prefixes are shared
    only where asked. The shared prefix is prepended: a prompt is N + length tokens.
    """
    check_vocab_size(vocab_size)
    if isinstance(shared_prefix_tokens, bool) or not isinstance(shared_prefix_tokens, int) or shared_prefix_tokens < 0:
        raise ValueError(f"shared_prefix_tokens={shared_prefix_tokens!r} must be an int >= 0")
    if isinstance(num_prefix_groups, bool) or not isinstance(num_prefix_groups, int) or num_prefix_groups < 1:
        raise ValueError(f"num_prefix_groups={num_prefix_groups!r} must be an int >= 1")
    lengths = np.asarray(lengths, dtype=np.int64)
    prefixes: list[tuple[int, ...]] = [()]
    groups = np.zeros(lengths.size, dtype=np.int64)
    if shared_prefix_tokens:
        groups = rng.integers(0, num_prefix_groups, size=lengths.size)
        table = rng.integers(MIN_TOKEN_ID, vocab_size, size=(num_prefix_groups, shared_prefix_tokens))
        prefixes = [ids_to_tuple(row, vocab_size) for row in table]
    flat = rng.integers(MIN_TOKEN_ID, vocab_size, size=int(lengths.sum()))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    return [
        prefixes[g] + ids_to_tuple(flat[s:e], vocab_size)
        for g, s, e in zip(groups.tolist(), starts.tolist(), ends.tolist(), strict=True)
    ]


def synthetic_workload(
    arrival: str,
    rate: float,
    num_requests: int,
    prompt_lengths,
    output_lengths,
    seed: int,
    cv: float | None = None,
    shared_prefix_tokens: int = 0,
    num_prefix_groups: int = 1,
    vocab_size: int = 32000,
    **arrival_params,
) -> Workload:
    """Seeded synthetic workload: arrivals from sim.arrivals, lengths from sim.lengths specs or models.

    prompt_lengths / output_lengths take an int, a spec string ("lognormal:200,1.0")
    or a length model; output lengths become max_tokens. cv is the gap CV of
    gamma arrivals (poisson accepts only cv=1). The same arguments give a
    byte-identical workload.
    """
    prompt_model = as_length_model(prompt_lengths)
    output_model = as_length_model(output_lengths)
    params = dict(arrival_params)
    if cv is not None:
        if arrival == "poisson":
            if float(cv) != 1.0:
                raise ValueError(f"poisson arrivals have cv=1; for cv={cv} use arrival='gamma'")
        else:
            params["cv"] = cv
    rng = np.random.default_rng(seed)
    arrivals = generate_arrivals(arrival, rng, num_requests, rate, **params)
    prompt_len = prompt_model.sample(rng, num_requests)
    output_len = output_model.sample(rng, num_requests)
    prompts = random_prompts(rng, prompt_len, vocab_size, shared_prefix_tokens, num_prefix_groups)
    requests = tuple(
        WorkloadRequest(request_id(i), t, ids, m)
        for i, (t, ids, m) in enumerate(zip(arrivals.tolist(), prompts, output_len.tolist(), strict=True))
    )
    shown = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
    rate_text = f"rate {rate:g} req/s" if rate is not None else "no base rate"
    desc = (
        f"synthetic: {num_requests} requests, {arrival} arrivals ({rate_text}{', ' + shown if shown else ''}), "
        f"prompt {prompt_model.describe()}, output {output_model.describe()}, seed {seed}"
    )
    if shared_prefix_tokens:
        desc += f", {shared_prefix_tokens}-token shared prefix from {num_prefix_groups} group(s) prepended"
    source = {
        "kind": "synthetic",
        "arrival": arrival,
        "rate": rate,
        "num_requests": num_requests,
        "prompt_lengths": prompt_model.spec,
        "output_lengths": output_model.spec,
        "seed": seed,
        "cv": cv,
        "shared_prefix_tokens": shared_prefix_tokens,
        "num_prefix_groups": num_prefix_groups,
        "vocab_size": vocab_size,
        "arrival_params": dict(arrival_params),
    }
    return Workload(requests, desc, source)


def scale_count(n: int, scale: float) -> int:
    """round(n * scale) half up, at least 1: the length rule shared by scale_workload and load_trace."""
    return max(1, math.floor(n * scale + 0.5))


def check_scale(name: str, value: float) -> float:
    """Return value as a float if it is finite and > 0, else raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0 (1.0 leaves the workload unchanged)")
    return float(value)


def scale_ids(ids: tuple[int, ...] | CompactTokens, length_scale: float) -> tuple[int, ...]:
    """Resize a prompt by a position map (position i takes token floor(i / scale)).

    The map depends only on positions, so prompts that share their first P
    tokens still share their first ~P*scale tokens and differ after: prefix
    structure survives both shrinking and growing (growing repeats tokens).
    """
    ids = ids[:] if isinstance(ids, CompactTokens) else ids  # one read, not one per position
    n = scale_count(len(ids), length_scale)
    src = np.minimum((np.arange(n) / length_scale).astype(np.int64), len(ids) - 1)
    return tuple(operator.itemgetter(*src.tolist())(ids)) if n > 1 else (ids[int(src[0])],)


def scale_workload(w: Workload, time_scale: float = 1.0, length_scale: float = 1.0) -> Workload:
    """Multiply arrival times (so gaps) by time_scale and prompt/output lengths by length_scale.

    Lengths are rounded half up and kept >= 1 token. A request that carries
    text (prompt or messages) cannot be length-scaled and raises ValueError.
    """
    time_scale = check_scale("time_scale", time_scale)
    length_scale = check_scale("length_scale", length_scale)
    out = []
    for r in w.requests:
        if length_scale == 1.0:
            out.append(replace(r, arrival_s=r.arrival_s * time_scale))
            continue
        if r.prompt is not None or r.messages is not None:
            raise ValueError(
                f"request {r.request_id} has a text prompt, which length_scale={length_scale} cannot resize; "
                "use length_scale=1.0 or a workload of token ids"
            )
        out.append(
            replace(
                r,
                arrival_s=r.arrival_s * time_scale,
                prompt_token_ids=scale_ids(r.prompt_token_ids, length_scale),
                max_tokens=scale_count(r.max_tokens, length_scale),
            )
        )
    desc = f"{w.description}; scaled: time_scale={time_scale:g}, length_scale={length_scale:g}"
    source = {"kind": "scaled", "base": w.source, "time_scale": time_scale, "length_scale": length_scale}
    return Workload(tuple(out), desc, source)


def request_to_dict(r: WorkloadRequest) -> dict:
    """One request as a dict in tokenstep's JSONL trace format (fixed key order)."""
    d: dict = {"request_id": r.request_id, "arrival_s": r.arrival_s, "max_tokens": r.max_tokens}
    if r.priority:
        d["priority"] = r.priority
    if r.prompt_token_ids:
        d["prompt_token_ids"] = list(r.prompt_token_ids)
    if r.prompt is not None:
        d["prompt"] = r.prompt
    if r.messages is not None:
        d["messages"] = list(r.messages)
    return d


def workload_to_jsonl(w: Workload, path: str | Path) -> Path:
    """Write the workload as tokenstep JSONL (readable by sim.traces.load_trace) and return the path."""
    path = Path(path)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in w.requests:
            f.write(json.dumps(request_to_dict(r), separators=(",", ":"), ensure_ascii=False))
            f.write("\n")
    return path


def workload_from_source(source: dict) -> Workload:
    """Rebuild a workload from its source dict (synthetic, trace, default or scaled)."""
    kind = source.get("kind") if isinstance(source, dict) else None
    params = {k: v for k, v in source.items() if k != "kind"} if kind else {}
    if kind == "synthetic":
        extra = params.pop("arrival_params", {})
        return synthetic_workload(**params, **extra)
    if kind == "scaled":
        return scale_workload(workload_from_source(params["base"]), params["time_scale"], params["length_scale"])
    if kind in ("trace", "default"):
        from sim import traces  # traces builds on this module

        return traces.load_trace(**params) if kind == "trace" else traces.default_workload(**params)
    raise ValueError(f"workload source kind {kind!r} is unknown; expected synthetic, trace, default or scaled")
