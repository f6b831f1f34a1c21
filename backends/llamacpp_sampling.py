"""How LlamaCppBackend picks each step's tokens: device greedy chains, the host argmax, sampler chains, logprobs.

LlamaCppBackend inherits SamplingMixin; the mixin reads the backend's ctx, vocab_size, seed, num_slots,
device_sampling and return_logits, and owns the per-request and per-slot sampler chains.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import llama_cpp as L
import numpy as np

from scheduler.messages import ScheduledChunk
from scheduler.request import SamplingParams


def row_logprobs(row: np.ndarray, token_id: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The log-softmax of one logits row at token_id, and its k most likely (token_id, logprob), best first."""
    x = row.astype(np.float64)
    top = x.max()
    lse = top + np.log(np.exp(x - top).sum())
    best: tuple[tuple[int, float], ...] = ()
    if k:
        idx = np.argpartition(-x, k)[:k]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        best = tuple((int(i), float(x[i] - lse)) for i in idx)
    return float(x[token_id] - lse), best


# Host argmax over the logits matrix: split the rows across threads past this many floats (numpy releases the GIL).
# On an H200's host (16 cores), 128 rows of a 128k vocabulary (65 MB) took 7.1 ms on one core and 2.5 ms on 16
# (bench_decode --split); below ~4M floats the threads' start costs more than they save.
_PARALLEL_ARGMAX_FLOATS = 4_000_000
_ARGMAX_THREADS = 16


def _argmax_each(rows: np.ndarray) -> list[int]:
    """Row-wise argmax one contiguous row at a time: numpy's argmax(axis=1) took up to 1.33x as long on 64-128
    rows of a 131k-262k vocabulary (numpy 2.4, this project's CPU machine), never less."""
    return [int(r.argmax()) for r in rows]


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class SamplingMixin:
    """Token choice for LlamaCppBackend: greedy on the device or host, seeded sampler chains, logprobs."""

    def _init_sampling(self) -> None:
        """Empty sampler state; set before the context exists so close() works on a failed __init__."""
        self._samplers: dict[str, int] = {}
        self._slot_chains: list[int] = []  # per-slot greedy chains run inside llama_decode (device_sampling)
        self._host_slots: set[int] = set()  # slots whose chain is detached: their request samples from host logits
        self._argmax_pool: ThreadPoolExecutor | None = None
        # threads of the host argmax. Offloaded, llama.cpp's CPU threads sit idle while the host reads the logits:
        # take every core; on the CPU leave half to them (their workers spin a while after each graph)
        cpus = _usable_cpus()
        self._argmax_threads = min(_ARGMAX_THREADS, cpus if self.model.n_gpu_layers > 0 else cpus // 2)
        self._last_logits: dict[str, np.ndarray] = {}
        self._step_logprobs: dict | None = None  # filled by _sample for requests that ask for logprobs

    def _free_request_samplers(self, request_ids: Iterable[str] | None = None) -> None:
        """Free the sampler chains of these requests (all of them when None)."""
        ids = list(self._samplers) if request_ids is None else request_ids
        for request_id in ids:
            chain = self._samplers.pop(request_id, None)
            if chain is not None:
                L.llama_sampler_free(chain)

    def _attach_device_samplers(self) -> bool:
        """Give every slot a greedy chain that llama_decode runs on the device; False if llama.cpp refuses."""
        for slot in range(self.num_slots):
            chain = self._greedy_chain()
            self._slot_chains.append(chain)
            if not L.llama_set_sampler(self.ctx, slot, chain):
                for s in range(slot + 1):
                    L.llama_set_sampler(self.ctx, s, None)
                self._free_slot_chains()
                return False
        return True

    @staticmethod
    def _greedy_chain() -> int:
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        return chain

    def _free_slot_chains(self) -> None:
        for chain in self._slot_chains:
            L.llama_sampler_free(chain)
        self._slot_chains.clear()

    def _stop_argmax_pool(self) -> None:
        if self._argmax_pool is not None:
            self._argmax_pool.shutdown(wait=False)
            self._argmax_pool = None

    def _route_sampling(self, chunks: list[ScheduledChunk]) -> None:
        """Detach the device chain of slots whose request samples on the host; reattach it for greedy ones.

        A change makes llama.cpp re-reserve its graph once, so slots switch only when their request changes kind.
        """
        for c in chunks:
            if not c.sample:
                continue
            host = self._samples_on_host(c)
            if host and c.slot not in self._host_slots:
                L.llama_set_sampler(self.ctx, c.slot, None)
                self._host_slots.add(c.slot)
            elif not host and c.slot in self._host_slots:
                # a chain is initialised for the device once: attach a fresh one; the old one left the graph
                # when the decode after its detach rebuilt it
                L.llama_sampler_free(self._slot_chains[c.slot])
                self._slot_chains[c.slot] = self._greedy_chain()
                L.llama_set_sampler(self.ctx, c.slot, self._slot_chains[c.slot])
                self._host_slots.discard(c.slot)

    @staticmethod
    def _samples_on_host(c: ScheduledChunk) -> bool:
        """Whether this chunk's token needs the host's logits row (not greedy, or asks for logprobs)."""
        sp = c.sampling
        return sp is not None and (sp.temperature != 0.0 or getattr(sp, "logprobs", None) is not None)

    def _argmax_rows(self, logits: np.ndarray) -> list[int]:
        """Row-wise argmax; large matrices are split across threads (numpy releases the GIL)."""
        n = logits.shape[0]
        workers = min(self._argmax_threads, n)
        if logits.size < _PARALLEL_ARGMAX_FLOATS or workers < 2:
            return _argmax_each(logits)
        if self._argmax_pool is None:
            self._argmax_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argmax")
        step = -(-n // workers)
        parts = self._argmax_pool.map(lambda i: _argmax_each(logits[i : i + step]), range(0, n, step))
        return [t for part in parts for t in part]

    def _sample(self, rows: list[tuple[int, ScheduledChunk]], a: int, sampled: dict[str, int]) -> None:
        """Sample one token per row of the decode call that started at flat row a."""
        if self.device_sampling:
            self._sample_on_device(rows, a, sampled)
            self._record_logprobs(rows, a, sampled)
            return
        n_vocab = self.vocab_size
        logits = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(len(rows), n_vocab))
        greedy = [i for i, (_, c) in enumerate(rows) if c.sampling is None or c.sampling.temperature == 0.0]
        if len(greedy) == len(rows):
            for (_, c), t in zip(rows, self._argmax_rows(logits), strict=True):
                sampled[c.request_id] = t
        else:
            for i in greedy:
                sampled[rows[i][1].request_id] = int(logits[i].argmax())
            for row, c in rows:
                if c.request_id not in sampled:
                    chain = self._samplers.get(c.request_id) or self._new_sampler(c.request_id, c.sampling)
                    sampled[c.request_id] = L.llama_sampler_sample(chain, self.ctx, row - a)
        if self.return_logits:
            for i, (_, c) in enumerate(rows):
                self._last_logits[c.request_id] = logits[i].copy()
        self._record_logprobs(rows, a, sampled)

    def _record_logprobs(self, rows: list[tuple[int, ScheduledChunk]], a: int, sampled: dict[str, int]) -> None:
        """Log-probabilities of the sampled tokens, for the rows whose request asks for them (numpy, host logits)."""
        for row, c in rows:
            sp = c.sampling
            if sp is None or sp.logprobs is None or c.request_id not in sampled:
                continue
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, row - a), shape=(self.vocab_size,))
            if self._step_logprobs is None:
                self._step_logprobs = {}
            self._step_logprobs[c.request_id] = row_logprobs(logits, sampled[c.request_id], sp.logprobs)

    def _new_sampler(self, request_id: str, sp: SamplingParams) -> int:
        seed = sp.seed if sp.seed is not None else zlib.crc32(f"{self.seed}:{request_id}".encode())
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if sp.top_k > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(sp.top_k))
        if sp.top_p < 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(sp.top_p, 1))
        if sp.min_p > 0.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(sp.min_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(sp.temperature))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        self._samplers[request_id] = chain
        return chain

    def _sample_on_device(self, rows: list[tuple[int, ScheduledChunk]], a: int, sampled: dict[str, int]) -> None:
        """Read the tokens the slots' greedy chains chose; rows of host-sampled requests use their logits row."""
        n_vocab, ctx = self.vocab_size, self.ctx
        for row, c in rows:
            i = row - a
            if c.slot not in self._host_slots:
                token = L.llama_get_sampled_token_ith(ctx, i)
                if token < 0:  # LLAMA_TOKEN_NULL: the slot had no device chain in this decode
                    raise RuntimeError(f"llama.cpp sampled no token for slot {c.slot} (request {c.request_id!r})")
                sampled[c.request_id] = token
                continue
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
            if c.sampling is None or c.sampling.temperature == 0.0:
                sampled[c.request_id] = int(logits.argmax())
            else:
                chain = self._samplers.get(c.request_id) or self._new_sampler(c.request_id, c.sampling)
                sampled[c.request_id] = L.llama_sampler_sample(chain, ctx, i)
