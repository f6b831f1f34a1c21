"""Requests and their sampling parameters."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    """Where a request is in its lifecycle."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a request finished."""

    STOP = "stop"  # a stop/EOS token or stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # aborted by the client
    REJECTED = "rejected"  # could never run (too long, empty prompt, ...)
    ERROR = "error"  # the backend failed on it


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample a request's tokens and when to stop."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's log-probability and the k most likely

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
            raise ValueError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass(slots=True, eq=False)
class Request:
    """One generation request; mutated only by the scheduler that owns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]  # or a Sequence[int] whose slices are tuples (kept, not copied)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0  # lower value runs first, as in vLLM
    arrival_s: float = 0.0
    # -- state below is owned by the scheduler --
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    slot: int | None = None
    finish_reason: FinishReason | None = None
    finish_detail: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    padding: bool = False  # finished, but kept in its slot to emulate a padded batch

    def __post_init__(self) -> None:
        p = self.prompt_token_ids
        # any other Sequence whose slices are tuples is kept as given (a compact prompt that makes its ids
        # when read); lists and iterables are copied, so the prompt cannot change under the scheduler
        if not isinstance(p, tuple) and not (isinstance(p, Sequence) and isinstance(p[0:0], tuple)):
            self.prompt_token_ids = tuple(p)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, prompt={len(self.prompt_token_ids)} tokens, "
                f"max_tokens={self.sampling.max_tokens}, priority={self.priority}, arrival_s={self.arrival_s:g}, "
                f"{self.status.value}, out={len(self.output_token_ids)}, computed={self.num_computed_tokens})")

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length in tokens."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_tokens(self) -> int:
        """The output length limit."""
        return self.sampling.max_tokens

    def token_at(self, start: int, stop: int) -> tuple[int, ...]:
        """Token ids in positions [start, stop) of prompt + output."""
        n = len(self.prompt_token_ids)
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        if start >= n:
            return tuple(self.output_token_ids[start - n : stop - n])
        return self.prompt_token_ids[start:] + tuple(self.output_token_ids[: stop - n])

    def chunk_tokens(self, start: int, stop: int) -> Sequence[int]:
        """token_at(start, stop) for a plan's chunk; a range of a prompt that offers windows (window(start, stop),
        as sim.workload's compact prompts do) comes as its window, equal to that tuple and read only if used."""
        p = self.prompt_token_ids
        if stop <= len(p) and not isinstance(p, tuple):
            window = getattr(p, "window", None)
            if window is not None:
                return window(start, stop)
        return self.token_at(start, stop)

    @property
    def is_finished(self) -> bool:
        """True once the request has a finish reason."""
        return self.status is RequestStatus.FINISHED
