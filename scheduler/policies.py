"""Scheduling strategies, by name.

A policy decides only *which waiting requests to try to admit, in what order*, and
a few switches (chunked prefill, token budget, padding). The scheduler core does
the mechanics (slots, KV blocks, budget, preemption) the same way for all of them.

A custom policy is a subclass of ``Policy`` overriding ``select`` (and optionally
``wake_at_s`` / ``max_num_seqs``), or a plain function ``fn(sched, now_s, limit)``
returning waiting requests in the order to try. Use it by name after
``register_policy``, or anywhere a policy name is taken as ``module:attribute``.
"""

from __future__ import annotations

import heapq
import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .core import Scheduler
    from .request import Request

QUEUE_ORDERS: dict[str, tuple[str, Callable[[Request], Any] | None]] = {
    "fcfs": ("first come, first served (arrival order)", None),
    "priority": ("lowest priority value first, then arrival", lambda r: (r.priority, r.arrival_s)),
    "sjf": ("shortest prompt first, then arrival", lambda r: (r.num_prompt_tokens, r.arrival_s)),
    "sjf-total": ("shortest known job (prompt + max_tokens) first",
                  lambda r: (r.num_prompt_tokens + r.max_tokens, r.arrival_s)),
}


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"policy parameter {name} must be true or false, got {value!r}")


def _parse_number(name: str, value: Any, kind: type, minimum: float) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"policy parameter {name} must be a {kind.__name__}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"policy parameter {name} must be >= {minimum}, got {value!r}")
    return number


class Policy:
    """Base policy: FCFS continuous batching, whole prompts, no token budget."""

    name = "policy"
    description = "base class for policies"
    params: dict[str, str] = {}  # parameter -> one-line help
    chunked_prefill = False  # may split one prompt over several steps
    uses_token_budget = True  # stop admitting once the step's token budget is spent
    padding = False  # emulate padded static batching
    order = "fcfs"

    def __init__(self, order: str = "fcfs") -> None:
        if order not in QUEUE_ORDERS:
            raise ValueError(f"unknown queue order {order!r}; choose one of {', '.join(QUEUE_ORDERS)}")
        self.order = order
        self._key = QUEUE_ORDERS[order][1]

    def max_num_seqs(self, sched: Scheduler) -> int:
        """How many requests may run at once right now."""
        return sched.config.max_num_seqs

    def select(self, sched: Scheduler, now_s: float, limit: int) -> Sequence[Request]:
        """Waiting requests to try to admit this step, in order (at most limit are admitted)."""
        waiting = sched.waiting
        if self._key is None:
            return waiting[:limit]
        return heapq.nsmallest(limit, waiting, key=self._key)

    def wake_at_s(self, sched: Scheduler, now_s: float) -> float | None:
        """When nothing runs and the policy holds requests back: when to ask again."""
        return None

    def describe(self) -> str:
        """The policy with its parameters, for reports."""
        return self.name if self.order == "fcfs" else f"{self.name}:order={self.order}"


class Sequential(Policy):
    """One request at a time."""

    name = "sequential"
    description = "one request at a time, in queue order"
    params = {"order": "queue order: " + ", ".join(QUEUE_ORDERS)}
    uses_token_budget = False

    def max_num_seqs(self, sched: Scheduler) -> int:
        """Exactly one."""
        return 1


class Continuous(Policy):
    """Iteration-level (Orca) batching: a finished request's slot is refilled on the next step."""

    name = "continuous"
    description = ("iteration-level (Orca) batching: refill free slots every step; whole prompts, and one longer "
                   "than max_num_batched_tokens runs in a step of its own at the head of the queue (decodes "
                   "pause that step)")
    params = {"order": "queue order: " + ", ".join(QUEUE_ORDERS)}


class Chunked(Policy):
    """Continuous batching with a token budget and chunked prefill (vLLM v1 / Sarathi)."""

    name = "chunked"
    description = "continuous with a per-step token budget: decodes first, then prefill chunks"
    params = {"order": "queue order: " + ", ".join(QUEUE_ORDERS)}
    chunked_prefill = True


class Static(Policy):
    """Request-level batching: a new batch only when the previous one has fully drained."""

    name = "static"
    description = "request-level batches of up to batch_size, admitted only when the last batch drained"
    params = {
        "batch_size": "requests per batch (default: max_num_seqs)",
        "wait_s": "wait up to this long for a full batch (default 0: take what is queued)",
        "padding": "run every sequence to the batch's longest prompt and output (default false)",
        "sort": "group the queue by length before forming a batch: none, prompt, total (default none)",
        "sort_window": "sort only the oldest N waiting requests (default 0: the whole queue)",
    }
    uses_token_budget = False

    def __init__(self, batch_size: int | None = None, wait_s: float = 0.0, padding: bool = False,
                 sort: str = "none", sort_window: int = 0, order: str = "fcfs") -> None:
        super().__init__(order)
        self.batch_size = None if batch_size is None else _parse_number("batch_size", batch_size, int, 1)
        self.wait_s = _parse_number("wait_s", wait_s, float, 0.0)
        self.padding = _parse_bool("padding", padding)
        if sort not in ("none", "prompt", "total"):
            raise ValueError(f"policy parameter sort must be none, prompt or total, got {sort!r}")
        self.sort = sort
        self.sort_window = _parse_number("sort_window", sort_window, int, 0)
        self._batch: list[Request] = []

    def _size(self, sched: Scheduler) -> int:
        return min(self.batch_size or sched.config.max_num_seqs, sched.config.max_num_seqs)

    def max_num_seqs(self, sched: Scheduler) -> int:
        """The batch size."""
        return self._size(sched)

    def select(self, sched: Scheduler, now_s: float, limit: int) -> Sequence[Request]:
        """The current batch's members still waiting, or a new batch once everything drained."""
        # a member preempted (recompute) waits again: it rejoins its batch, and no newcomer is taken
        # until every member has finished
        self._batch = [r for r in self._batch if r.status.value != "finished"]
        if self._batch:
            return [r for r in self._batch if r.status.value == "waiting"]
        if sched.running or not sched.waiting:
            return []
        size = self._size(sched)
        if len(sched.waiting) < size and now_s < self._oldest(sched) + self.wait_s:
            return []
        queue = list(super().select(sched, now_s, len(sched.waiting)))
        if self.sort != "none":
            window = queue[: self.sort_window] if self.sort_window else queue
            rest = queue[len(window):]
            if self.sort == "prompt":
                window.sort(key=lambda r: r.num_prompt_tokens)
            else:
                window.sort(key=lambda r: r.num_prompt_tokens + r.max_tokens)
            queue = window + rest
        self._batch = queue[:size]
        return self._batch

    def _oldest(self, sched: Scheduler) -> float:
        return min(r.arrival_s for r in sched.waiting)

    def wake_at_s(self, sched: Scheduler, now_s: float) -> float | None:
        """The wait-to-fill deadline of the oldest waiting request (its arrival when wait_s is 0).

        select holds a partial batch until this time, so it is set whenever nothing runs: a hold
        without a wake-up would never end.
        """
        if sched.waiting and not sched.running:
            return self._oldest(sched) + self.wait_s
        return None

    def describe(self) -> str:
        """Parameters that differ from the defaults."""
        parts = []
        if self.batch_size:
            parts.append(f"batch_size={self.batch_size}")
        if self.wait_s:
            parts.append(f"wait_s={self.wait_s:g}")
        if self.padding:
            parts.append("padding=true")
        if self.sort != "none":
            parts.append(f"sort={self.sort}")
        return self.name + (":" + ",".join(parts) if parts else "")


class Adaptive(Policy):
    """Continuous batching whose batch-size limit follows the queue depth."""

    name = "adaptive"
    description = "continuous, batch limit = min_num_seqs + waiting // queue_per_seq (small when idle)"
    params = {
        "min_num_seqs": "batch limit with an empty queue (default 2)",
        "queue_per_seq": "waiting requests that buy one more running slot (default 1)",
        "order": "queue order",
    }

    def __init__(self, min_num_seqs: int = 2, queue_per_seq: int = 1, order: str = "fcfs") -> None:
        super().__init__(order)
        self.min_num_seqs = _parse_number("min_num_seqs", min_num_seqs, int, 1)
        self.queue_per_seq = _parse_number("queue_per_seq", queue_per_seq, int, 1)

    def max_num_seqs(self, sched: Scheduler) -> int:
        """Grows with the queue, never below what already runs (no forced preemption)."""
        want = self.min_num_seqs + len(sched.waiting) // self.queue_per_seq
        return max(min(want, sched.config.max_num_seqs), min(len(sched.running), sched.config.max_num_seqs))


class FunctionPolicy(Policy):
    """Wraps a plain function fn(sched, now_s, limit) -> requests to try, in order."""

    description = "a user function"

    def __init__(self, fn: Callable[..., Sequence[Request]], name: str | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")

    def select(self, sched: Scheduler, now_s: float, limit: int) -> Sequence[Request]:
        """Whatever the function returns."""
        return self.fn(sched, now_s, limit)


POLICIES: dict[str, type[Policy]] = {
    "sequential": Sequential,
    "static": Static,
    "continuous": Continuous,
    "chunked": Chunked,
    "adaptive": Adaptive,
}
# shorthands: a queue order on continuous batching
ALIASES: dict[str, tuple[str, dict[str, str]]] = {
    "priority": ("continuous", {"order": "priority"}),
    "sjf": ("continuous", {"order": "sjf"}),
    "static-sorted": ("static", {"sort": "prompt"}),
    "static-padded": ("static", {"padding": "true"}),
}


def register_policy(name: str, policy: type[Policy] | Callable[..., Any]) -> None:
    """Make a custom policy usable by name everywhere."""
    if not isinstance(policy, type):
        fn = policy
        policy = type(name, (FunctionPolicy,), {"__init__": lambda self: FunctionPolicy.__init__(self, fn, name)})
    POLICIES[name] = policy


def parse_policy_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split 'name:key=value,key=value' into the name and its parameters."""
    name, rest = spec, ""
    head, colon, tail = spec.partition(":")
    if colon and "=" not in spec and (head in POLICIES or head in ALIASES):
        name, rest = head, tail
    elif "=" in spec:
        cut = spec.rfind(":", 0, spec.index("="))
        if cut < 0:
            raise ValueError(f"policy {spec!r}: write parameters as name:key=value,key=value")
        name, rest = spec[:cut], spec[cut + 1 :]
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"policy {spec!r}: parameter {item!r} must look like key=value")
        params[key.strip()] = value.strip()
    return name.strip(), params


def make_policy(spec: str | Policy | Callable[..., Any], **params: Any) -> Policy:
    """Build a policy from a name, 'name:k=v,...', 'module:attribute', an instance, or a function."""
    if isinstance(spec, Policy):
        return spec
    if callable(spec) and not isinstance(spec, str):
        return spec(**params) if isinstance(spec, type) else FunctionPolicy(spec)
    name, spec_params = parse_policy_spec(spec)
    merged = {**spec_params, **params}
    if name in ALIASES:
        base, alias_params = ALIASES[name]
        name, merged = base, {**alias_params, **merged}
    if name in POLICIES:
        cls = POLICIES[name]
    elif ":" in name or "." in name:
        cls = _import_policy(name)
    else:
        known = ", ".join([*POLICIES, *ALIASES])
        raise ValueError(f"unknown policy {name!r}; known policies: {known}; or give module:attribute")
    if isinstance(cls, Policy):
        return cls
    if isinstance(cls, type) and issubclass(cls, Policy):
        try:
            return cls(**merged)
        except TypeError as exc:
            allowed = ", ".join(getattr(cls, "params", {})) or "none"
            raise ValueError(f"policy {name!r}: bad parameters {merged} ({exc}); parameters: {allowed}") from None
    if callable(cls):
        return FunctionPolicy(cls, name)
    raise ValueError(f"{name!r} is not a Policy subclass, instance or function")


def _import_policy(path: str) -> Any:
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import policy module {module_name!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None


def describe_policies() -> str:
    """One line per policy with its parameters, for --help."""
    lines = []
    for name, cls in POLICIES.items():
        params = ", ".join(cls.params) or "-"
        lines.append(f"  {name:<12} {cls.description} [{params}]")
    for name, (base, p) in ALIASES.items():
        lines.append(f"  {name:<12} = {base}:" + ",".join(f"{k}={v}" for k, v in p.items()))
    lines.append("  queue orders: " + "; ".join(f"{k}: {v[0]}" for k, v in QUEUE_ORDERS.items()))
    return "\n".join(lines)
