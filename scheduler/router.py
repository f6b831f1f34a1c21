"""Multi-instance serving: N independent schedulers behind a router.

prefix_affinity follows the cache-aware routers of SGLang and vLLM's production stack: a cached prefix
decides only while load stays balanced. An instance may take a request for its cache only while its
load (waiting + running requests) exceeds the least loaded instance's by at most a quarter of
max_num_seqs (SGLang's default of 64 at 256 sequences), or is at most 1.5x it (SGLang's default);
past that bound the least loaded instance takes the request. Without the bound, prompts that all
share a first block would all go to one instance.
"""

from __future__ import annotations

from collections.abc import Sequence

from .core import Scheduler
from .request import Request

BALANCE_ABS_FRACTION = 0.25  # of max_num_seqs: the absolute threshold, in requests, unless one is given
BALANCE_REL_THRESHOLD = 1.5

PREFIX_AFFINITY_RULE = (
    "the instance caching the longest prefix of the prompt (else the one that first saw its first block), "
    "among the instances holding at most max_num_seqs/4 more waiting + running requests than the least "
    f"loaded one, or at most {BALANCE_REL_THRESHOLD:g}x as many; when none of those caches a prefix, the "
    "least loaded instance"
)
ROUTERS = {
    "round_robin": "instances in turn",
    "least_outstanding": "the instance with the fewest waiting + running requests",
    "prefix_affinity": PREFIX_AFFINITY_RULE,
}


class Router:
    """Chooses an instance for each new request."""

    def __init__(self, kind: str = "least_outstanding", balance_abs_threshold: int | None = None,
                 balance_rel_threshold: float = BALANCE_REL_THRESHOLD) -> None:
        if kind not in ROUTERS:
            raise ValueError(f"unknown router {kind!r}; choose one of {', '.join(ROUTERS)}")
        if balance_abs_threshold is not None and (isinstance(balance_abs_threshold, bool)
                                                  or not isinstance(balance_abs_threshold, int)
                                                  or balance_abs_threshold < 0):
            raise ValueError(f"balance_abs_threshold={balance_abs_threshold!r} must be an int >= 0 (requests), "
                             f"or None for a quarter of max_num_seqs")
        if isinstance(balance_rel_threshold, bool) or not isinstance(balance_rel_threshold, (int, float)) \
                or not balance_rel_threshold >= 1:
            raise ValueError(f"balance_rel_threshold={balance_rel_threshold!r} must be a number >= 1")
        self.kind = kind
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = float(balance_rel_threshold)
        self._next = 0
        self._affinity: dict[int, int] = {}  # hash of the first block -> instance
        self._num_homes: dict[int, int] = {}  # instance -> first blocks it is home to

    def abs_threshold(self, scheduler: Scheduler) -> int:
        """The absolute load threshold in requests: the one given, else a quarter of max_num_seqs (at least 1)."""
        if self.balance_abs_threshold is not None:
            return self.balance_abs_threshold
        return max(1, int(scheduler.config.max_num_seqs * BALANCE_ABS_FRACTION))

    def within_bound(self, load: int, min_load: int, abs_threshold: int) -> bool:
        """Whether an instance with this load may still take a request for its cache."""
        return load - min_load <= abs_threshold or load <= self.balance_rel_threshold * min_load

    def route(self, request: Request, schedulers: Sequence[Scheduler]) -> int:
        """Index of the scheduler that should take the request."""
        n = len(schedulers)
        if n == 1:
            return 0
        if self.kind == "round_robin":
            i = self._next % n
            self._next += 1
            return i
        loads = [s.num_unfinished for s in schedulers]
        least = min(range(n), key=lambda i: (loads[i], i))
        if self.kind == "least_outstanding":
            return least
        return self._prefix_affinity(request, schedulers, loads, least)

    def _prefix_affinity(self, request: Request, schedulers: Sequence[Scheduler], loads: list[int],
                         least: int) -> int:
        """Longest cached prefix among the instances within the load bound; ties go to the less loaded."""
        bound = self.abs_threshold(schedulers[least])
        eligible = [i for i in range(len(schedulers)) if self.within_bound(loads[i], loads[least], bound)]
        # with nothing cached, the least loaded instance, and among those the home of the fewest first blocks,
        # so distinct prefixes spread (as SGLang sends a miss to its smallest tree) instead of piling on index 0
        best = min(eligible, key=lambda i: (loads[i], self._num_homes.get(i, 0), i))
        best_depth = 0
        for i in eligible:
            pool = schedulers[i].pool
            hashes = pool.chain_hashes(request.prompt_token_ids, (request.num_prompt_tokens - 1) // pool.block_size)
            depth, _ = pool.match_prefix(hashes)
            if depth > best_depth or (depth == best_depth > 0 and loads[i] < loads[best]):
                best, best_depth = i, depth
        bs = schedulers[0].pool.block_size
        if request.num_prompt_tokens <= bs:
            return best
        key = hash(request.prompt_token_ids[:bs])
        home = self._affinity.get(key)
        if home is None:
            self._affinity[key] = home = best
            self._num_homes[home] = self._num_homes.get(home, 0) + 1
        if best_depth == 0 and home in eligible:
            best = home
        return best
