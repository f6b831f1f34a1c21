"""llama.cpp's cell allocation in one unified KV stream, replayed: the KV range (n_kv) each ubatch attends over.

With kv_unified=True every sequence shares one stream of cells. llama.cpp's attention of a ubatch runs over
the cells 0 .. n_kv - 1, where n_kv is the highest cell in use plus one, padded to 256
(llama_kv_cache::get_n_kv), whatever the ubatch's own sequences hold; the KQ mask it builds on the host is
n_tokens x n_kv. Where a sequence's cells land is llama_kv_cache::find_slot's choice: from the stream's head
(the cell after the last ubatch placed), the first empty cells one by one, wrapping at the end; the head goes
back to 0 first when more than used + 2 x n_tokens cells lie before it; llama_memory_seq_rm pulls the head
back to the lowest cell it frees. A long queue keeps admitting prompts at the head while earlier sequences
finish below it, so the live cells spread far beyond their count and every step attends over the spread.

UnifiedKV replays those rules (llama-kv-cache.cpp of llama-cpp-python 0.3.36's llama.cpp) over the plans the
backend runs, as LlamaCppBackend.step issues them: the plan's removes, then its prefix copies (seq_cp shares
cells within one stream; a move then drops the source), then its chunks sorted by slot in n_batch windows of
n_ubatch rows, then the pad tokens' removal.
"""

from __future__ import annotations

import numpy as np

from backends.cost.graph import KV_PAD, kv_cells


class UnifiedKV:
    """The cells of one unified KV stream of `size` cells: which hold data, and each slot's cells by position."""

    __slots__ = ("size", "count", "blocks", "head", "used", "seqs")

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"UnifiedKV size must be a positive number of cells, got {size!r}")
        self.size = size
        self.count = np.zeros(size, dtype=np.int32)  # sequences holding each cell
        self.blocks = np.zeros(-(-size // KV_PAD), dtype=np.int64)  # cells in use per 256-cell block
        self.head = 0
        self.used = 0
        self.seqs: dict[int, list[int]] = {}  # slot -> its cells, by position from 0

    # -- what llama.cpp reports ----------------------------------------------------
    def n_kv(self) -> int:
        """The KV range the next ubatch attends over: the highest cell in use + 1, padded to 256 cells."""
        nz = np.flatnonzero(self.blocks)
        return min(self.size, kv_cells((int(nz[-1]) + 1) * KV_PAD if len(nz) else 0))

    def used_max_p1(self) -> int:
        """The highest cell in use + 1 (0 when none is), as llama_kv_cells::used_max_p1."""
        nz = np.flatnonzero(self.count)
        return int(nz[-1]) + 1 if len(nz) else 0

    # -- the memory calls ----------------------------------------------------------
    def seq_rm(self, slot: int, p0: int = 0) -> None:
        """llama_memory_seq_rm(slot, p0, -1): the slot drops positions p0 and on; the head moves back to the
        lowest cell that became empty, if that lies before it."""
        cells = self.seqs.get(slot)
        if not cells or p0 >= len(cells):
            return
        gone = np.asarray(cells[max(p0, 0):], dtype=np.int64)
        del cells[max(p0, 0):]
        if not cells:
            del self.seqs[slot]
        self.count[gone] -= 1
        freed = gone[self.count[gone] == 0]
        if len(freed):
            self.used -= len(freed)
            np.subtract.at(self.blocks, freed // KV_PAD, 1)
            low = int(freed.min())
            if low < self.head:
                self.head = low

    def seq_cp(self, src: int, dst: int, num_tokens: int) -> None:
        """LlamaCppBackend's prefix copy in one stream: dst ends up sharing src's first num_tokens cells."""
        if src != dst:
            self.seq_rm(dst)
            shared = self.seqs.get(src, [])[:num_tokens]
            if shared:
                self.count[np.asarray(shared, dtype=np.int64)] += 1
                self.seqs[dst] = list(shared)
        else:
            self.seq_rm(dst, num_tokens)

    def place(self, rows: list[tuple[int, int]]) -> int:
        """find_slot and apply_ubatch for one ubatch of rows (slot, tokens) in order; returns its n_kv."""
        n = sum(k for _, k in rows)
        if n > self.size - self.used:
            raise ValueError(f"a ubatch of {n} tokens does not fit in the {self.size - self.used} free cells")
        head = 0 if self.head > self.used + 2 * n else self.head
        found = self._free_from(head, n)
        if len(found) < n:  # wrap to the start
            found = np.concatenate([found, self._free_from(0, n - len(found))])
        self.count[found] += 1
        np.add.at(self.blocks, found // KV_PAD, 1)
        self.used += n
        self.head = int(found[-1]) + 1
        cells, seqs, i = found.tolist(), self.seqs, 0
        for slot, k in rows:
            if slot in seqs:
                seqs[slot].extend(cells[i:i + k])
            else:
                seqs[slot] = cells[i:i + k]
            i += k
        return self.n_kv()

    def _free_from(self, start: int, n: int) -> np.ndarray:
        """The first n empty cells at or after start (fewer if the stream ends first)."""
        out, span = [], max(4 * n, 1024)
        got = 0
        while start < self.size and got < n:
            idx = np.flatnonzero(self.count[start:start + span] == 0)[: n - got] + start
            out.append(idx)
            got += len(idx)
            start += span
            span *= 2
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    # -- a plan, as the backend runs it ----------------------------------------------
    def run_plan(self, plan, n_batch: int, n_ubatch: int) -> tuple[int, ...]:
        """Apply a plan's KV work as LlamaCppBackend.step does; the n_kv of each ubatch it runs, in order."""
        for rm in plan.removes:
            self.seq_rm(rm.slot, rm.start_pos)
        for cp in plan.copies:
            self.seq_cp(cp.src_slot, cp.dst_slot, cp.num_tokens)
            if cp.move and cp.src_slot != cp.dst_slot:
                self.seq_rm(cp.src_slot)
        pieces = sorted((c.slot, len(c.token_ids) + c.num_pad_tokens) for c in plan.chunks
                        if c.token_ids or c.num_pad_tokens)
        out = []
        for ubatch in ubatch_rows(pieces, n_batch, n_ubatch):
            out.append(self.place(ubatch))
        for c in plan.chunks:
            if c.num_pad_tokens:
                self.seq_rm(c.slot, c.start_pos + len(c.token_ids))
        return tuple(out)


def ubatch_rows(pieces: list[tuple[int, int]], n_batch: int, n_ubatch: int) -> list[list[tuple[int, int]]]:
    """A batch's (slot, tokens) pieces in slot order cut as one stream's llama_decode calls cut them: n_batch
    rows per call, n_ubatch rows per ubatch (split_simple), each ubatch as (slot, tokens) rows."""
    out: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    in_ub = in_batch = 0
    for slot, n in pieces:
        while n:
            k = min(n, n_ubatch - in_ub, n_batch - in_batch)
            cur.append((slot, k))
            n, in_ub, in_batch = n - k, in_ub + k, in_batch + k
            if in_ub == n_ubatch or in_batch == n_batch:
                out.append(cur)
                cur, in_ub = [], 0
                if in_batch == n_batch:
                    in_batch = 0
    if cur:
        out.append(cur)
    return out


def compact_n_kv(plan, size: int) -> tuple[int, ...]:
    """Without the stream's history: each ubatch's n_kv as if the step's sequences were the only ones and lay
    packed from cell 0 (a lower bound of the real range)."""
    held = sum(c.start_pos + len(c.token_ids) + c.num_pad_tokens for c in plan.chunks)
    return (min(size, kv_cells(held)),)


def kv_ranges(plans, n_batch: int, n_ubatch: int, size: int, runs=None) -> list[tuple[int, ...]]:
    """Each plan's ubatch n_kv, the plans run in order on one context; runs (one label per plan): a new label
    starts on an empty cache (every real run and calibration scenario clears it first)."""
    out, kv, last = [], UnifiedKV(size), object()
    for i, plan in enumerate(plans):
        label = runs[i] if runs is not None else None
        if runs is not None and label != last:
            kv, last = UnifiedKV(size), label
        try:
            out.append(kv.run_plan(plan, n_batch, n_ubatch))
        except ValueError:  # the recorded steps overflow this size: start over rather than fail the fit
            kv = UnifiedKV(size)
            out.append(kv.run_plan(plan, n_batch, n_ubatch))
    return out
