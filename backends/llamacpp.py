"""The real backend: runs StepPlans with llama.cpp's low-level batch API (llama-cpp-python).

One llama.cpp sequence id is one slot. A step runs the plan's KV removals, then
its prefix copies, then every chunk's tokens in one llama_batch (several
llama_decode calls only when the batch exceeds n_batch), then samples one token
per sampling chunk. docs/llamacpp-notes.md records the llama.cpp behaviour this
relies on and the numbers measured on it. Filling the llama_batch lives in
llamacpp_batch.py; choosing the sampled tokens (and their logprobs) in llamacpp_sampling.py.
"""

from __future__ import annotations

import os
import time
from operator import attrgetter

import llama_cpp as L
import numpy as np

from scheduler.config import SchedulerConfig
from scheduler.messages import KVCopy, ScheduledChunk, StepPlan, StepResult

from .llamacpp_batch import FlatBatch
from .llamacpp_sampling import SamplingMixin
from .models import DEFAULT_MODEL, LlamaModel, llama_log_mark, llama_log_tail

DECODE_ERRORS: dict[int, str] = {
    1: "no KV slot for the batch (the context is full)",
    2: "aborted",
    -1: "invalid batch (inconsistent positions, bad token or slot id)",
    -2: "memory or compute-graph allocation failed",
    -3: "graph compute failed",
}

_by_slot = attrgetter("slot")


def _cuda_graphs(wanted: bool | None, n_gpu_layers: int, kv_unified: bool) -> bool:
    """Whether llama.cpp's CUDA backend may replay CUDA graphs; sets GGML_CUDA_DISABLE_GRAPHS when not.

    None (the default) turns them off for an offloaded context with one unified KV stream: there, on an H200 with
    llama.cpp from llama-cpp-python 0.3.36, a graph relaunched after a shape change died with "CUDA error: an
    illegal instruction was encountered" (cudaGraphLaunch) at a few dozen requests per second, and the same run
    without graphs finished (docs/GPU.md). llama.cpp reads the variable once per process, at the first graph
    it computes, so the first context decides; a variable the user set wins.
    """
    if n_gpu_layers <= 0:
        return False
    if "GGML_CUDA_DISABLE_GRAPHS" in os.environ:
        return False
    if wanted is None:
        wanted = not kv_unified
    if not wanted:
        os.environ["GGML_CUDA_DISABLE_GRAPHS"] = "1"
    return wanted


class LlamaCppBackend(SamplingMixin):
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
        cuda_graphs: bool | None = None,
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
        self._flat: FlatBatch | None = None
        self._init_sampling()
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
        self.cuda_graphs = _cuda_graphs(cuda_graphs, self.model.n_gpu_layers, kv_unified)
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
        pad_token = self.model.pad_token_id if self.model.pad_token_id >= 0 else 0
        self.device_sampling: bool = bool(device_sampling) and self._attach_device_samplers()
        self._flat = FlatBatch(self.n_batch, max(self.slot_capacity_tokens, self.n_ctx), pad_token)
        self._reset_counters()

    # -- setup and teardown -------------------------------------------------

    def _reset_counters(self) -> None:
        self.num_decode_calls = 0  # llama_decode calls so far (tests count them)
        self.num_decoded_tokens = 0  # tokens handed to llama_decode so far, pads included

    def close(self) -> None:
        """Free the batch, samplers, context and (if this backend loaded it) the model."""
        self._free_request_samplers()
        if self._flat is not None:
            self._flat.free()
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
            self.model._num_contexts -= 1
        self._free_slot_chains()  # after the context, which held them
        self._stop_argmax_pool()
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
        self._free_request_samplers(plan.finished_request_ids)
        if self.return_logits:
            self._last_logits = {}
        self._step_logprobs = None  # filled by _sample for requests that ask for logprobs
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

    def _run_chunks(self, chunks: list[ScheduledChunk], sampled: dict[str, int], failed: dict[str, str]) -> None:
        total, samples = self._flat.fill(chunks)
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
        """Decode flat rows [a, b) of the filled plan in one llama_decode call."""
        batch = self._flat.load(a, b)
        self.num_decode_calls += 1
        self.num_decoded_tokens += b - a
        return L.llama_decode(self.ctx, batch)

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
