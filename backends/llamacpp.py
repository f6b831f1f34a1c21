"""The real backend: runs StepPlans with llama.cpp's low-level batch API (llama-cpp-python).

One llama.cpp sequence id is one slot. A step runs the plan's KV removals, then
its prefix copies, then every chunk's tokens in one llama_batch (several
llama_decode calls only when the batch exceeds n_batch), then samples one token
per sampling chunk. docs/llamacpp-notes.md records the llama.cpp behaviour this
relies on and the numbers measured on it.
"""

from __future__ import annotations

import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from operator import attrgetter

import llama_cpp as L
import numpy as np

from scheduler.config import SchedulerConfig
from scheduler.messages import KVCopy, ScheduledChunk, StepPlan, StepResult
from scheduler.request import SamplingParams

from .models import DEFAULT_MODEL, LlamaModel, llama_log_mark, llama_log_tail

DECODE_ERRORS: dict[int, str] = {
    1: "no KV slot for the batch (the context is full)",
    2: "aborted",
    -1: "invalid batch (inconsistent positions, bad token or slot id)",
    -2: "memory or compute-graph allocation failed",
    -3: "graph compute failed",
}

_by_slot = attrgetter("slot")


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


# Host argmax over the logits matrix: split the rows across threads past this many floats (numpy releases the GIL);
# 128 rows of a 128k vocabulary are 65 MB, ~4 ms on one core, a third of a GPU decode step at that batch size.
_PARALLEL_ARGMAX_FLOATS = 4_000_000


class LlamaCppBackend:
    """Executes StepPlans on one llama.cpp context; owns per-request sampler chains."""

    def __init__(
        self,
        model: str | os.PathLike[str] | LlamaModel = DEFAULT_MODEL,
        *,
        n_ctx: int = 4096,
        n_seq_max: int = 16,
        n_threads: int = 2,
        n_batch: int | None = None,
        n_ubatch: int | None = None,
        kv_unified: bool = False,
        swa_full: bool = True,
        n_gpu_layers: int = 0,
        seed: int = 0,
        return_logits: bool = False,
        device_sampling: bool | None = None,
    ) -> None:
        for name, value in (("n_ctx", n_ctx), ("n_seq_max", n_seq_max), ("n_threads", n_threads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if n_seq_max > L.llama_max_parallel_sequences():
            raise ValueError(f"n_seq_max={n_seq_max} exceeds llama.cpp's limit {L.llama_max_parallel_sequences()}")
        self._owns_model = not isinstance(model, LlamaModel)
        self.model = LlamaModel(model, n_gpu_layers=n_gpu_layers) if self._owns_model else model
        if self.model.closed:
            raise ValueError("the shared LlamaModel is closed")
        self.seed = seed
        self.n_threads = n_threads
        self.return_logits = return_logits
        self.kv_unified = kv_unified
        self.swa_full = swa_full
        self.ctx = None
        self._batch = None
        self._samplers: dict[str, int] = {}
        self._slot_chains: list[int] = []  # per-slot greedy chains run inside llama_decode (device_sampling)
        self._host_slots: set[int] = set()  # slots whose chain is detached: their request samples from host logits
        self._argmax_pool: ThreadPoolExecutor | None = None
        self._last_logits: dict[str, np.ndarray] = {}
        self._tokenizer = None
        n_batch = n_batch or 512
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_seq_max = n_seq_max
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch or 512, n_batch)
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = kv_unified
        params.swa_full = swa_full
        # Greedy sampling inside the decode graph: the argmax runs where the logits are (the GPU) and only the
        # token ids come back, instead of n_outputs x n_vocab floats and a host argmax over them. Off unless asked:
        # llama.cpp adds one argmax per slot to the graph, and on an H200 (Llama-3-8B shape) that made a B=128
        # step 21 ms against 15 ms with the threaded host argmax (equal up to B=32; docs/GPU.md).
        if device_sampling is None:
            device_sampling = False
        if device_sampling and return_logits:
            raise ValueError("device_sampling=True keeps the logits on the device; it cannot return_logits")
        if device_sampling:
            params.n_outputs_max_per_seq = 1  # one sampled token per slot per step
        self.ctx = L.llama_init_from_model(self.model.ptr, params)
        if not self.ctx:
            self._release_model()
            raise RuntimeError(f"llama.cpp could not create a context: {' | '.join(llama_log_tail(3))}")
        self.model._num_contexts += 1
        self._mem = L.llama_get_memory(self.ctx)
        self.num_slots: int = L.llama_n_seq_max(self.ctx)
        self.n_ctx: int = L.llama_n_ctx(self.ctx)  # llama.cpp rounds n_ctx/n_seq_max up to 256 per slot
        self.n_batch: int = L.llama_n_batch(self.ctx)
        self.n_ubatch: int = L.llama_n_ubatch(self.ctx)
        self.slot_capacity_tokens: int = L.llama_n_ctx_seq(self.ctx)
        self.max_model_len: int = min(self.slot_capacity_tokens, self.model.n_ctx_train)
        self.vocab_size: int = self.model.vocab_size
        self.eog_token_ids: tuple[int, ...] = self.model.eog_token_ids
        self._pad_token = self.model.pad_token_id if self.model.pad_token_id >= 0 else 0
        self.device_sampling: bool = bool(device_sampling) and self._attach_device_samplers()
        self._init_batch()
        self._reset_counters()

    # -- setup and teardown -------------------------------------------------

    def _init_batch(self) -> None:
        nb = self.n_batch
        self._batch = L.llama_batch_init(nb, 0, 1)
        b = self._batch
        self._b_token = np.ctypeslib.as_array(b.token, shape=(nb,))
        self._b_pos = np.ctypeslib.as_array(b.pos, shape=(nb,))
        self._b_logits = np.ctypeslib.as_array(b.logits, shape=(nb,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(nb,))[:] = 1
        self._b_seq = [b.seq_id[i] for i in range(nb)]  # one int32 per token, written only when it changes
        self._b_seq_now = np.full(nb, -1, dtype=np.int32)
        for p in self._b_seq:
            p[0] = -1
        # Flat per-step arrays for the whole plan, grown on demand; the llama_batch gets n_batch slices.
        self._grow(nb)
        self._arange = np.arange(max(self.slot_capacity_tokens, self.n_ctx) + nb, dtype=np.int32)

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

    def _grow(self, n: int) -> None:
        self._tok = np.zeros(n, dtype=np.int32)
        self._pos = np.zeros(n, dtype=np.int32)
        self._seq = np.zeros(n, dtype=np.int32)
        self._out = np.zeros(n, dtype=np.int8)

    def _reset_counters(self) -> None:
        self.num_decode_calls = 0  # llama_decode calls so far (tests count them)
        self.num_decoded_tokens = 0  # tokens handed to llama_decode so far, pads included

    def close(self) -> None:
        """Free the batch, samplers, context and (if this backend loaded it) the model."""
        for chain in self._samplers.values():
            L.llama_sampler_free(chain)
        self._samplers.clear()
        if self._batch is not None:
            # llama_batch_free walks seq_id until a NULL, then frees each pointer: we kept them intact.
            L.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
            self.model._num_contexts -= 1
        self._free_slot_chains()  # after the context, which held them
        if self._argmax_pool is not None:
            self._argmax_pool.shutdown(wait=False)
            self._argmax_pool = None
        self._release_model()

    def _release_model(self) -> None:
        if self._owns_model and not self.model.closed:
            self.model.close()

    def __enter__(self) -> LlamaCppBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: llama_cpp may already be gone
            pass

    # -- capacity -------------------------------------------------------------

    def scheduler_config(self, **overrides: object) -> SchedulerConfig:
        """A SchedulerConfig whose capacity fields come from this context; overrides win."""
        block_size = int(overrides.get("block_size", SchedulerConfig.__dataclass_fields__["block_size"].default))
        fields: dict[str, object] = {
            "max_num_seqs": self.num_slots,
            "max_num_batched_tokens": self.n_batch,
            "max_model_len": self.max_model_len,
            "num_kv_blocks": self.n_ctx // block_size,
            "block_size": block_size,
            "eos_token_ids": self.eog_token_ids,
            # one KV stream per slot: compaction keeps the running slots one run (one forward pass per decode
            # step); one shared stream batches any slots together, so moves would buy nothing
            "slot_choice": "adjacent" if self.kv_unified else "compact",
        }
        fields.update(overrides)
        return SchedulerConfig(**fields)  # type: ignore[arg-type]

    def debug_kv_state(self) -> dict[int, tuple[int, int]]:
        """Per slot (pos_min, pos_max) as llama.cpp reports them; (-1, -1) for an empty slot."""
        mem = self._mem
        return {
            s: (L.llama_memory_seq_pos_min(mem, s), L.llama_memory_seq_pos_max(mem, s)) for s in range(self.num_slots)
        }

    def logits_for_last_step(self) -> dict[str, np.ndarray]:
        """Copies of the logits rows sampled in the last step (only with return_logits=True)."""
        return dict(self._last_logits)

    def clear_kv(self) -> None:
        """Empty every slot (llama_memory_clear; the buffers keep stale, masked data)."""
        L.llama_memory_clear(self._mem, False)

    @property
    def tokenizer(self):  # noqa: ANN201 - text imports this module's model type
        """A Tokenizer over this model's vocabulary (made once)."""
        if self._tokenizer is None:
            from .text import Tokenizer

            self._tokenizer = Tokenizer(self.model)
        return self._tokenizer

    # -- the step -------------------------------------------------------------

    def step(self, plan: StepPlan) -> StepResult:
        """Run the plan's removes, copies and chunks; sample; return tokens, wall time and failures."""
        t0 = time.perf_counter()
        for request_id in plan.finished_request_ids:
            chain = self._samplers.pop(request_id, None)
            if chain is not None:
                L.llama_sampler_free(chain)
        if self.return_logits:
            self._last_logits = {}
        self._step_logprobs: dict | None = None  # filled by _sample for requests that ask for logprobs
        mem = self._mem
        for rm in plan.removes:
            L.llama_memory_seq_rm(mem, rm.slot, rm.start_pos, -1)
        bad_slots: dict[int, str] = {}
        for cp in plan.copies:
            reason = self._copy_prefix(cp)
            if reason:
                bad_slots[cp.dst_slot] = reason
            if cp.move and cp.src_slot != cp.dst_slot and 0 <= cp.src_slot < self.num_slots:
                # the scheduler counts src empty now; the queued data copy reads the buffer, not the cells
                L.llama_memory_seq_rm(mem, cp.src_slot, -1, -1)
        failed: dict[str, str] = {}
        chunks = self._runnable_chunks(plan.chunks, bad_slots, failed)
        sampled: dict[str, int] = {}
        if chunks:
            if self.device_sampling:
                self._route_sampling(chunks)
            self._run_chunks(chunks, sampled, failed)
        return StepResult(sampled_token_ids=sampled, elapsed_s=time.perf_counter() - t0, failed=failed,
                          logprobs=self._step_logprobs)

    def _copy_prefix(self, cp: KVCopy) -> str | None:
        """Make dst hold exactly positions [0, num_tokens) of src; return a reason if it cannot."""
        mem, src, dst, n = self._mem, cp.src_slot, cp.dst_slot, cp.num_tokens
        if not (0 <= src < self.num_slots and 0 <= dst < self.num_slots):
            return f"prefix copy {src}->{dst}: slot out of range [0, {self.num_slots})"
        src_max = L.llama_memory_seq_pos_max(mem, src)
        if n < 0 or n > src_max + 1:
            L.llama_memory_seq_rm(mem, dst, -1, -1)
            return f"prefix copy {src}->{dst}: src holds positions up to {src_max}, {n} tokens asked"
        if src != dst:
            # Across KV streams (kv_unified=False) llama.cpp copies only whole buffers
            # (seq_cp asserts is_full) and defers the data copy to the next llama_decode;
            # so copy everything and cut dst back to the prefix (metadata only).
            L.llama_memory_seq_rm(mem, dst, -1, -1)
            L.llama_memory_seq_cp(mem, src, dst, -1, -1)
        L.llama_memory_seq_rm(mem, dst, n, -1)
        if n == 0:
            return None
        lo, hi = L.llama_memory_seq_pos_min(mem, dst), L.llama_memory_seq_pos_max(mem, dst)
        # pos_min/max report the sliding-window cache when the model has one: the next
        # token (position n) attends to positions > n - n_swa, which must all be there.
        need_lo = max(0, n - self.model.n_swa + 1) if self.model.n_swa else 0
        if hi != n - 1 or lo > need_lo:
            L.llama_memory_seq_rm(mem, dst, -1, -1)
            return (
                f"prefix copy {src}->{dst} of {n} tokens is unusable: dst would hold [{lo}, {hi}] "
                f"(the sliding-window cache dropped early positions; use swa_full=True)"
            )
        return None

    def _runnable_chunks(
        self, chunks: tuple[ScheduledChunk, ...], bad_slots: dict[int, str], failed: dict[str, str]
    ) -> list[ScheduledChunk]:
        """Chunks that can run, sorted by slot; the others go to failed with a reason."""
        mem, cap, n_vocab = self._mem, self.slot_capacity_tokens, self.vocab_size
        seen: dict[int, str] = {}
        ok: list[ScheduledChunk] = []
        for c in chunks:
            slot, n = c.slot, len(c.token_ids)
            reason = None
            if not 0 <= slot < self.num_slots:
                reason = f"slot {slot} out of range [0, {self.num_slots})"
            elif slot in bad_slots:
                reason = bad_slots[slot]
            elif slot in seen:
                reason = f"slot {slot} also scheduled for request {seen[slot]!r}"
                failed[seen[slot]] = f"slot {slot} also scheduled for request {c.request_id!r}"
            elif c.start_pos + n + c.num_pad_tokens > cap:
                reason = f"positions up to {c.start_pos + n + c.num_pad_tokens} exceed the slot capacity {cap}"
            elif n == 0 and c.sample:
                reason = "sample=True on a chunk without tokens"
            elif n and (min(c.token_ids) < 0 or max(c.token_ids) >= n_vocab):
                reason = f"token id out of the vocabulary [0, {n_vocab})"
            else:
                held = L.llama_memory_seq_pos_max(mem, slot)
                if c.start_pos != held + 1:
                    reason = f"start_pos {c.start_pos} but slot {slot} holds positions up to {held}"
            if slot not in seen and 0 <= slot < self.num_slots:
                seen[slot] = c.request_id
            if reason:
                failed[c.request_id] = reason
            elif n or c.num_pad_tokens:
                ok.append(c)
        ok = [c for c in ok if c.request_id not in failed]
        ok.sort(key=_by_slot)  # split_equal batches only runs of consecutive slot ids
        return ok

    def _fill(self, chunks: list[ScheduledChunk]) -> tuple[int, list[tuple[int, ScheduledChunk]]]:
        """Write every chunk's tokens into the flat arrays; return the token count and sample rows."""
        total = sum(len(c.token_ids) + c.num_pad_tokens for c in chunks)
        if total > len(self._tok):
            self._grow(total)
        tok, pos, seq, out, ar = self._tok, self._pos, self._seq, self._out, self._arange
        samples: list[tuple[int, ScheduledChunk]] = []
        n = 0
        for c in chunks:
            k, p, start = len(c.token_ids), c.num_pad_tokens, c.start_pos
            if k == 1 and not p:
                tok[n] = c.token_ids[0]
                pos[n] = start
                seq[n] = c.slot
                out[n] = 0
                n += 1
            else:
                end = n + k + p
                tok[n : n + k] = c.token_ids
                tok[n + k : end] = self._pad_token
                pos[n:end] = ar[start : start + k + p]
                seq[n:end] = c.slot
                out[n:end] = 0
                n = end
            if c.sample:
                last = n - p - 1
                out[last] = 1
                samples.append((last, c))
        return n, samples

    def _run_chunks(self, chunks: list[ScheduledChunk], sampled: dict[str, int], failed: dict[str, str]) -> None:
        total, samples = self._fill(chunks)
        nb = self.n_batch
        si = 0
        for a in range(0, total, nb):
            b = min(a + nb, total)
            mark = llama_log_mark()
            rc = self._decode(a, b)
            if rc != 0:
                self._fail_from(a, chunks, rc, failed, llama_log_tail(2, since=mark))
                for request_id in failed:
                    sampled.pop(request_id, None)
                break
            j = si
            while j < len(samples) and samples[j][0] < b:
                j += 1
            if j > si:
                self._sample(samples[si:j], a, sampled)
            si = j
        for c in chunks:
            if c.num_pad_tokens and c.request_id not in failed:
                # Padding spent its compute in the request's own slot; drop it so its KV is unchanged.
                L.llama_memory_seq_rm(self._mem, c.slot, c.start_pos + len(c.token_ids), -1)

    def _decode(self, a: int, b: int) -> int:
        """Copy flat rows [a, b) into the llama_batch and decode it."""
        m = b - a
        self._b_token[:m] = self._tok[a:b]
        self._b_pos[:m] = self._pos[a:b]
        self._b_logits[:m] = self._out[a:b]
        seq_new, seq_now = self._seq[a:b], self._b_seq_now[:m]
        changed = np.flatnonzero(seq_new != seq_now)
        if len(changed):
            ptrs = self._b_seq
            for i in changed.tolist():
                ptrs[i][0] = int(seq_new[i])
            seq_now[:] = seq_new
        self._batch.n_tokens = m
        self.num_decode_calls += 1
        self.num_decoded_tokens += m
        return L.llama_decode(self.ctx, self._batch)

    def _fail_from(self, a: int, chunks: list[ScheduledChunk], rc: int, failed: dict[str, str], log: list[str]) -> None:
        """Decode call starting at flat row a failed: fail every chunk with rows at or after a."""
        meaning = DECODE_ERRORS.get(rc, "unknown error")
        detail = " | ".join(log)
        n = 0
        for c in chunks:
            n += len(c.token_ids) + c.num_pad_tokens
            if n > a:
                failed[c.request_id] = f"llama_decode returned {rc}: {meaning}" + (f" [{detail}]" if detail else "")
                # llama.cpp keeps ubatches that finished before the failure: cut back to the chunk's start.
                L.llama_memory_seq_rm(self._mem, c.slot, c.start_pos, -1)

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
        workers = min(8, (os.cpu_count() or 1) // 2, n)
        if logits.size < _PARALLEL_ARGMAX_FLOATS or workers < 2:
            return logits.argmax(axis=1).tolist()
        if self._argmax_pool is None:
            self._argmax_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argmax")
        step = -(-n // workers)
        parts = self._argmax_pool.map(lambda i: logits[i : i + step].argmax(axis=1), range(0, n, step))
        return np.concatenate(list(parts)).tolist()

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
