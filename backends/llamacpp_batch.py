"""Where a step's tokens go: flat per-plan arrays, and the n_batch-row llama_batch each decode call reads a slice of."""

from __future__ import annotations

import llama_cpp as L
import numpy as np

from scheduler.messages import ScheduledChunk


class FlatBatch:
    """One llama_batch of n_batch rows plus flat token/pos/slot/output arrays for a whole plan, grown on demand."""

    def __init__(self, n_batch: int, max_pos: int, pad_token: int) -> None:
        nb = self.n_batch = n_batch
        self.pad_token = pad_token
        self.batch = L.llama_batch_init(nb, 0, 1)
        b = self.batch
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
        self._arange = np.arange(max_pos + nb, dtype=np.int32)

    def _grow(self, n: int) -> None:
        self._tok = np.zeros(n, dtype=np.int32)
        self._pos = np.zeros(n, dtype=np.int32)
        self._seq = np.zeros(n, dtype=np.int32)
        self._out = np.zeros(n, dtype=np.int8)

    def free(self) -> None:
        """Free the llama_batch (idempotent)."""
        if self.batch is not None:
            # llama_batch_free walks seq_id until a NULL, then frees each pointer: we kept them intact.
            L.llama_batch_free(self.batch)
            self.batch = None

    def fill(self, chunks: list[ScheduledChunk]) -> tuple[int, list[tuple[int, ScheduledChunk]]]:
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
                tok[n + k : end] = self.pad_token
                pos[n:end] = ar[start : start + k + p]
                seq[n:end] = c.slot
                out[n:end] = 0
                n = end
            if c.sample:
                last = n - p - 1
                out[last] = 1
                samples.append((last, c))
        return n, samples

    def load(self, a: int, b: int) -> L.llama_batch:
        """Copy flat rows [a, b) into the llama_batch and return it, ready for llama_decode."""
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
        self.batch.n_tokens = m
        return self.batch
