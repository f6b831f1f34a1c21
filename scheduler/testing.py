"""Property-testing kit for scheduling policies (imports hypothesis; ``import scheduler`` does not).

Point the ready state machine at your policy in two lines::

    from scheduler.testing import policy_state_machine
    TestMyPolicy = policy_state_machine(MyPolicy).TestCase   # collected by pytest

Hypothesis then adds, steps, aborts and times requests at random, checks every
invariant (``check_invariants``, ``check_plan``) after every step, drains the
scheduler at teardown, and checks each request ended with exactly the tokens it
was owed (max_tokens, or up to its scripted EOS) or with a stated reason.
A failure comes back shrunk to a short sequence of steps.
"""

from __future__ import annotations

import inspect
import zlib
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from .config import SLOT_CHOICES, VICTIM_RULES, SchedulerConfig
from .core import Scheduler
from .kv import RUNNING as SLOT_RUNNING
from .kv import one_run
from .loop import release_kv, run_step
from .messages import StepPlan, StepResult
from .policies import Policy, make_policy
from .request import FinishReason, Request, RequestStatus, SamplingParams

EOS = 2
_OWED_REASONS = ("stop", "length")


class InvariantError(AssertionError):
    """A scheduler invariant does not hold."""


def _fail(message: str) -> None:
    raise InvariantError(message)


def content_token(kv_tokens: Sequence[int]) -> int:
    """The executor's next token after a slot holding exactly kv_tokens (never EOS).

    It depends on the slot's whole KV content, as a model's does: a prefix copied from the wrong slot,
    a removal at the wrong position or a token fed to the wrong slot changes every later token.
    """
    return 10 + zlib.crc32(array("q", kv_tokens).tobytes()) % 990


class DeterministicExecutor:
    """Executes plans like a model would: a mirror of every slot's KV, tokens from its content, scripted EOS.

    fail_next: the next step fails the request of its first chunk (reason "injected failure"), with
    garbage left in its slot, as a backend error may leave it.
    """

    def __init__(self, scripted_eos: dict[str, int] | None = None) -> None:
        self.scripted_eos = scripted_eos if scripted_eos is not None else {}
        self.num_sampled: dict[str, int] = {}
        self.kv: dict[int, list[int]] = {}  # slot -> the tokens its KV holds, position by position
        self.fail_next = False

    def step(self, plan: StepPlan) -> StepResult:
        """Removals, copies, then the batch; one token per sampling chunk; one second per step."""
        for request_id in plan.finished_request_ids:
            self.num_sampled.pop(request_id, None)
        kv = self.kv
        for rm in plan.removes:
            del kv.setdefault(rm.slot, [])[rm.start_pos:]
        for cp in plan.copies:
            src = kv.get(cp.src_slot, [])
            if cp.num_tokens > len(src):
                _fail(f"prefix copy {cp.src_slot}->{cp.dst_slot} of {cp.num_tokens} tokens: the slot holds {len(src)}")
            kv[cp.dst_slot] = src[: cp.num_tokens]
            if cp.move and cp.src_slot != cp.dst_slot:
                kv[cp.src_slot] = []
        sampled: dict[str, int] = {}
        failed: dict[str, str] = {}
        for i, c in enumerate(plan.chunks):
            held = kv.setdefault(c.slot, [])
            if c.token_ids and c.start_pos != len(held):
                _fail(f"{c.request_id}: chunk starts at {c.start_pos} but slot {c.slot} holds {len(held)} tokens")
            if self.fail_next and i == 0:
                held += [-1] * len(c.token_ids)  # garbage: nothing may read it again
                failed[c.request_id] = "injected failure"
                continue
            held += c.token_ids
            if c.sample:
                n = self.num_sampled.get(c.request_id, 0)
                self.num_sampled[c.request_id] = n + 1
                sampled[c.request_id] = EOS if self.scripted_eos.get(c.request_id) == n else content_token(held)
        if plan.chunks:
            self.fail_next = False
        return StepResult(sampled, 1.0, failed)


def check_plan(sched: Scheduler, plan: StepPlan) -> None:
    """Limits and wiring of one plan, checked right after schedule()."""
    c = sched.config
    if len(plan.chunks) > c.max_num_seqs:
        _fail(f"plan has {len(plan.chunks)} chunks > max_num_seqs {c.max_num_seqs}")
    policy = sched.policy
    if policy.uses_token_budget and plan.num_scheduled_tokens > c.max_num_batched_tokens:
        # only a whole prompt longer than the budget may exceed it, in a step of its own
        if policy.chunked_prefill or len(plan.chunks) != 1:
            _fail(f"plan runs {plan.num_scheduled_tokens} tokens > budget {c.max_num_batched_tokens} "
                  f"in {len(plan.chunks)} chunks")
    if policy.chunked_prefill:
        cap = c.max_prefill_chunk_tokens or c.max_num_batched_tokens
        for ch in plan.chunks:
            if len(ch.token_ids) > cap:
                _fail(f"{ch.request_id}: prefill chunk of {len(ch.token_ids)} tokens > chunk cap {cap}")
    slots = [ch.slot for ch in plan.chunks]
    if len(set(slots)) != len(slots):
        _fail(f"a slot appears twice in one batch: {slots}")
    if len({ch.request_id for ch in plan.chunks}) != len(plan.chunks):
        _fail("a request appears twice in one batch")
    for ch in plan.chunks:
        r = sched.requests[ch.request_id]
        if r.status is not RequestStatus.RUNNING or r.slot != ch.slot:
            _fail(f"chunk for {ch.request_id} is not in its running slot")
        if r.padding:
            continue
        if ch.start_pos != r.num_computed_tokens:
            _fail(f"{ch.request_id}: chunk starts at {ch.start_pos}, computed {r.num_computed_tokens}")
        if tuple(ch.token_ids) != r.token_at(ch.start_pos, ch.start_pos + len(ch.token_ids)):
            _fail(f"{ch.request_id}: chunk tokens differ from the request's tokens")
        if not ch.token_ids:
            _fail(f"{ch.request_id}: empty chunk for a live request")
        if ch.sample != (ch.start_pos + len(ch.token_ids) == r.num_tokens):
            _fail(f"{ch.request_id}: sample flag wrong")
        if sched.pool.slot_tokens[ch.slot] > ch.start_pos:
            _fail(f"{ch.request_id}: slot {ch.slot} holds {sched.pool.slot_tokens[ch.slot]} tokens, chunk starts at "
                  f"{ch.start_pos}")
    # the backend runs copies in order, and moves (slot compaction) come after every plain copy: a copy may
    # read a slot whose running request a later move takes elsewhere, never one a move already emptied
    moves_from = {cp.src_slot for cp in plan.copies if cp.move}
    moved = False
    for cp in plan.copies:
        if cp.move:  # slot compaction: a running request's KV now lives in dst, src is empty
            if sched.pool.slot_state[cp.dst_slot] != SLOT_RUNNING or sched.pool.slot_state[cp.src_slot] == SLOT_RUNNING:
                _fail(f"move {cp.src_slot}->{cp.dst_slot} does not leave its request running in {cp.dst_slot}")
            moved = True
        elif moved:
            _fail(f"prefix copy {cp.src_slot}->{cp.dst_slot} after a move: moves must come after every copy")
        elif sched.pool.slot_state[cp.src_slot] != SLOT_RUNNING and cp.src_slot not in moves_from:
            _fail(f"prefix copy from slot {cp.src_slot}, which no running request owns")
    if c.slot_choice == "compact":
        running = sorted(r.slot for r in sched.running)
        if not one_run(running):
            _fail(f"slot_choice compact left the running slots {running} with a gap")
    if sched.has_unfinished() and not plan.chunks:
        if sched.running and not all(r.padding for r in sched.running):
            _fail("deadlock: requests are running but the plan runs nothing")
        if sched.waiting and not sched.running and plan.wake_at_s is None:
            _fail(f"deadlock: {len(sched.waiting)} requests wait, nothing runs, and the policy set no wake-up time")


def check_invariants(sched: Scheduler) -> None:
    """Request states, slot ownership and KV block accounting, checked between steps."""
    waiting_ids = [r.request_id for r in sched.waiting]
    running_ids = [r.request_id for r in sched.running]
    if len(set(waiting_ids) | set(running_ids)) != len(waiting_ids) + len(running_ids):
        _fail("a request is in more than one queue")
    for r in sched.requests.values():
        where = (r.request_id in waiting_ids) + (r.request_id in running_ids) + (r.status is RequestStatus.FINISHED)
        if where != 1:
            _fail(f"request {r.request_id} is in {where} states (status {r.status.value})")
        expected = {RequestStatus.WAITING: r.request_id in waiting_ids,
                    RequestStatus.RUNNING: r.request_id in running_ids}
        if r.status in expected and not expected[r.status]:
            _fail(f"request {r.request_id} has status {r.status.value} but is not in that queue")
        if r.num_output_tokens > r.max_tokens:
            _fail(f"request {r.request_id} got {r.num_output_tokens} tokens > max_tokens {r.max_tokens}")
        if r.status is RequestStatus.FINISHED and r.finish_reason is None:
            _fail(f"request {r.request_id} finished without a reason")
    slots = [r.slot for r in sched.running]
    if len(set(slots)) != len(slots) or None in slots:
        _fail(f"running requests do not own distinct slots: {slots}")
    if len(sched.running) > sched.config.max_num_seqs:
        _fail("more running requests than slots")
    pool = sched.pool
    for r in sched.running:
        if pool.slot_state[r.slot] != SLOT_RUNNING:
            _fail(f"slot {r.slot} of running {r.request_id} is not marked running")
        if not r.padding and pool.slot_tokens[r.slot] != r.num_computed_tokens:
            _fail(f"slot {r.slot} holds {pool.slot_tokens[r.slot]} tokens, "
                  f"{r.request_id} computed {r.num_computed_tokens}")
        if pool.enable_prefix_caching and not r.padding:
            n = r.num_computed_tokens
            if pool.slot_hashes[r.slot] != pool.chain_hashes(r.token_at(0, n), n // pool.block_size):
                _fail(f"slot {r.slot}: the prefix index hashes are not those of {r.request_id}'s computed tokens")
    try:
        pool.check()
    except AssertionError as exc:
        raise InvariantError(f"KV accounting: {exc}") from None


def owed_tokens(request: Request, scripted_eos: dict[str, int]) -> list[int]:
    """The tokens a request that ran to completion must have produced (its KV always exactly its own tokens)."""
    k = scripted_eos.get(request.request_id)
    n = request.max_tokens if k is None else min(request.max_tokens, k + 1)
    seq = list(request.prompt_token_ids)
    out = []
    for i in range(n):
        token = EOS if i == k else content_token(seq)
        out.append(token)
        seq.append(token)
    return out


def check_finished(request: Request, scripted_eos: dict[str, int]) -> None:
    """A finished request has exactly its owed tokens, or a stated reason for not having them."""
    if request.status is not RequestStatus.FINISHED:
        _fail(f"request {request.request_id} never finished ({request.status.value})")
    reason = request.finish_reason.value
    if reason in _OWED_REASONS:
        if request.output_token_ids != owed_tokens(request, scripted_eos):
            _fail(f"request {request.request_id} finished ({reason}) with {request.num_output_tokens} tokens "
                  f"{request.output_token_ids[:8]}..., owed {len(owed_tokens(request, scripted_eos))}")
    elif reason in ("rejected", "error") and not request.finish_detail:
        _fail(f"request {request.request_id} was {reason} without a stated reason")


# ---- hypothesis strategies ------------------------------------------------------------

def scheduler_configs(max_slots: int = 6) -> st.SearchStrategy[SchedulerConfig]:
    """Small scheduler configurations that make KV pressure, preemption and prefix hits likely."""
    return st.builds(
        SchedulerConfig,
        max_num_seqs=st.integers(1, max_slots),
        max_num_batched_tokens=st.integers(4, 96),
        max_model_len=st.integers(16, 160),
        num_kv_blocks=st.integers(4, 48),
        block_size=st.sampled_from([1, 2, 4, 8]),
        max_prefill_chunk_tokens=st.none() | st.integers(1, 64),
        enable_prefix_caching=st.booleans(),
        preemption_victim=st.sampled_from(VICTIM_RULES),
        slot_choice=st.sampled_from(SLOT_CHOICES),
        eos_token_ids=st.just((EOS,)),
    )


_PREFIXES = [tuple(100 + (i * 37 + j * 11) % 500 for j in range(24)) for i in range(3)]


@st.composite
def prompts(draw, max_len: int = 60) -> tuple[int, ...]:
    """Prompts that often share one of a few prefixes."""
    prefix = draw(st.sampled_from([(), *_PREFIXES]))[: draw(st.integers(0, 24))]
    suffix = draw(st.lists(st.integers(10, 999), min_size=0 if prefix else 1, max_size=max_len))
    return tuple(prefix) + tuple(suffix)


@st.composite
def requests(draw, request_id: str, arrival_s: float = 0.0) -> tuple[Request, int | None]:
    """A request and its scripted EOS index (None: runs to max_tokens)."""
    max_tokens = draw(st.integers(1, 24))
    eos = draw(st.none() | st.integers(0, 30))
    req = Request(request_id, draw(prompts()), SamplingParams(max_tokens=max_tokens, ignore_eos=False),
                  priority=draw(st.integers(0, 3)), arrival_s=arrival_s)
    return req, eos


class SchedulerStateMachine(RuleBasedStateMachine):
    """Adds, steps, aborts and drains requests under one policy; checks every invariant after every step.

    Besides plain steps it explores arrivals later than now, the clock stepping back, aborts between
    schedule() and commit(), release_cache(), backend failures, and (through the executor) KV content
    that must be exactly each request's own tokens.
    """

    policy_factory: Callable[[], Policy | str] = staticmethod(lambda: "continuous")
    max_drain_steps = 5000

    def __init__(self) -> None:
        super().__init__()
        self.sched: Scheduler | None = None
        self.scripted_eos: dict[str, int] = {}
        self.executor = DeterministicExecutor(self.scripted_eos)
        self.now_s = 0.0
        self.counter = 0
        self.mid_step = False  # a check failed inside a step: teardown must not plan again over it

    @initialize(config=scheduler_configs())
    def setup(self, config: SchedulerConfig) -> None:
        """A fresh scheduler with a drawn configuration."""
        self.sched = Scheduler(config, make_policy(self.policy_factory()))

    @rule(data=st.data(), later_s=st.sampled_from([0.0, 0.0, 0.0, 0.5, 3.0]))
    def add(self, data: Any, later_s: float) -> None:
        """A request arrives now, or is added ahead of its arrival time."""
        req, eos = data.draw(requests(f"q{self.counter:04d}", self.now_s + later_s))
        self.counter += 1
        if eos is not None:
            self.scripted_eos[req.request_id] = eos
        out = self.sched.add_request(req, self.now_s)
        if out is not None and not out.detail:
            _fail(f"{req.request_id} rejected without a reason")

    @rule()
    def step(self) -> None:
        """One schedule/execute/commit round."""
        self._step()

    def _step(self, between: Callable[[StepPlan], None] | None = None) -> StepPlan:
        def checks(plan: StepPlan) -> None:
            check_plan(self.sched, plan)
            if between is not None:
                between(plan)

        self.mid_step = True
        ran = run_step(self.sched, self.executor, self.now_s, checks)
        self.mid_step = False
        plan = ran.plan
        if plan.is_empty and plan.wake_at_s is not None:
            self.now_s = max(self.now_s, plan.wake_at_s)
        else:
            self.now_s = ran.now_s
        return plan

    @precondition(lambda self: self.sched is not None and self.sched.has_unfinished())
    @rule(data=st.data())
    def abort(self, data: Any) -> None:
        """The client gives up on a random unfinished request."""
        live = [*self.sched.waiting, *self.sched.running]
        victim = data.draw(st.sampled_from(live))
        out = self.sched.abort(victim.request_id, self.now_s)
        if out is None or out.finish_reason != FinishReason.ABORT.value:
            _fail(f"abort of {victim.request_id} returned {out}")

    @precondition(lambda self: self.sched is not None and self.sched.has_unfinished())
    @rule(data=st.data())
    def abort_during_step(self, data: Any) -> None:
        """The client gives up while a step runs: the abort is applied at commit."""
        victims: list[Request] = []

        def abort(plan: StepPlan) -> None:
            live = [*self.sched.waiting, *self.sched.running]
            if not live:
                return
            victim = data.draw(st.sampled_from(live))
            victims.append(victim)
            out = self.sched.abort(victim.request_id, self.now_s)
            if plan.is_empty and (out is None or out.finish_reason != FinishReason.ABORT.value):
                _fail(f"abort of {victim.request_id} with nothing in flight returned {out}")
            if not plan.is_empty and out is not None:
                _fail(f"abort of {victim.request_id} during a step returned {out} before commit")

        self._step(abort)
        for v in victims:
            if v.status is not RequestStatus.FINISHED:
                _fail(f"{v.request_id} was aborted during a step and is still {v.status.value} after commit")

    @rule()
    def step_failing(self) -> None:
        """The backend fails the first request of the next step that runs anything."""
        self.executor.fail_next = True
        self._step()

    @rule()
    def release(self) -> None:
        """Hand the prefix cache back (its removals go out with the next plan)."""
        if self.sched is not None:
            self.sched.release_cache()

    @rule(dt=st.floats(0.0, 5.0))
    def wait(self, dt: float) -> None:
        """Time passes without a step."""
        self.now_s += dt

    @rule(dt=st.floats(0.0, 5.0))
    def clock_back(self, dt: float) -> None:
        """The clock steps back (a driver's clock is not always monotonic)."""
        self.now_s = max(0.0, self.now_s - dt)

    @invariant()
    def invariants_hold(self) -> None:
        """Every invariant, after every rule."""
        if self.sched is not None:
            check_invariants(self.sched)

    def teardown(self) -> None:
        """Drain: every request must end with its owed tokens or a stated reason, and nothing may leak."""
        if self.sched is None or self.mid_step:
            return  # a failed step already raised its own error: planning again would only hide it
        for _ in range(self.max_drain_steps):
            if not self.sched.has_unfinished():
                break
            plan = self._step()
            check_invariants(self.sched)
            if plan.is_empty and plan.wake_at_s is None and self.sched.has_unfinished():
                _fail(f"deadlock: {self.sched.num_unfinished} requests can never run")
        else:
            _fail(f"requests still unfinished after {self.max_drain_steps} steps")
        for r in self.sched.requests.values():
            check_finished(r, self.scripted_eos)
        release_kv(self.sched, self.executor, self.now_s)
        if self.sched.pool.num_used_blocks or any(self.sched.pool.slot_state):
            _fail("KV blocks or slots leaked after every request finished and the cache was released")
        if any(self.executor.kv.values()):
            _fail("the backend still holds KV after every request finished and the cache was released")


def _makes_a_policy(fn: Callable[..., Any]) -> bool:
    """True for a factory taking no arguments (a select function takes sched, now_s and limit)."""
    try:
        inspect.signature(fn).bind()
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): not a factory we can tell apart
        return False
    return True


def policy_state_machine(policy: Policy | str | Callable[..., Any] | type, *, max_examples: int = 100,
                         stateful_step_count: int = 40) -> type[SchedulerStateMachine]:
    """A SchedulerStateMachine subclass for a policy: a name, a Policy class, an instance factory (called
    with no arguments for every example: a fresh policy each time) or a select function."""

    def factory() -> Policy:
        if isinstance(policy, type) and issubclass(policy, Policy):
            return policy()
        if callable(policy) and not isinstance(policy, (str, type, Policy)) and _makes_a_policy(policy):
            return make_policy(policy())
        return make_policy(policy)

    name = getattr(policy, "__name__", str(policy)).replace(":", "_").replace(".", "_")
    machine = type(f"{name}StateMachine", (SchedulerStateMachine,), {"policy_factory": staticmethod(factory)})
    machine.TestCase.settings = settings(max_examples=max_examples, stateful_step_count=stateful_step_count,
                                         deadline=None, report_multiple_bugs=False)
    return machine
