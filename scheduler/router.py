"""Multi-instance serving: N independent schedulers behind a router."""

from __future__ import annotations

from collections.abc import Sequence

from .core import Scheduler
from .request import Request

ROUTERS = {
    "round_robin": "instances in turn",
    "least_outstanding": "the instance with the fewest waiting + running requests",
    "prefix_affinity": "the instance caching the longest prefix of the prompt, else the one that "
                       "first saw its first block, else least outstanding",
}


class Router:
    """Chooses an instance for each new request."""

    def __init__(self, kind: str = "least_outstanding") -> None:
        if kind not in ROUTERS:
            raise ValueError(f"unknown router {kind!r}; choose one of {', '.join(ROUTERS)}")
        self.kind = kind
        self._next = 0
        self._affinity: dict[int, int] = {}  # hash of the first block -> instance

    def route(self, request: Request, schedulers: Sequence[Scheduler]) -> int:
        """Index of the scheduler that should take the request."""
        n = len(schedulers)
        if n == 1:
            return 0
        if self.kind == "round_robin":
            i = self._next % n
            self._next += 1
            return i
        least = min(range(n), key=lambda i: (schedulers[i].num_unfinished, i))
        if self.kind == "least_outstanding":
            return least
        best, best_depth = least, 0
        for i, s in enumerate(schedulers):
            pool = s.pool
            hashes = pool.chain_hashes(request.prompt_token_ids, (request.num_prompt_tokens - 1) // pool.block_size)
            depth, _ = pool.match_prefix(hashes)
            if depth > best_depth:
                best, best_depth = i, depth
        bs = schedulers[0].pool.block_size
        if request.num_prompt_tokens <= bs:
            return best
        key = hash(request.prompt_token_ids[:bs])
        if best_depth == 0:
            best = self._affinity.get(key, least)
        self._affinity.setdefault(key, best)
        return best
