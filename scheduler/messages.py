"""The plain data that crosses the scheduler-backend seam."""

from __future__ import annotations

from dataclasses import dataclass, field

from .request import SamplingParams


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """Tokens of one request to run this step, in its slot, from start_pos on.

    sample is True when the chunk reaches the end of the request's known tokens,
    so the backend samples the next token from the chunk's last position.
    num_pad_tokens is compute the backend must spend but whose results are
    discarded (padded static batching); such a chunk may carry no real tokens.
    """

    request_id: str
    slot: int
    start_pos: int
    token_ids: tuple[int, ...]
    sample: bool
    num_pad_tokens: int = 0
    is_decode: bool = False  # one generated token being fed back
    sampling: SamplingParams | None = None  # the request's parameters, for the backend's sampler


@dataclass(frozen=True, slots=True)
class KVCopy:
    """Copy the first num_tokens positions of src_slot's KV into dst_slot (llama_memory_seq_cp)."""

    src_slot: int
    dst_slot: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class KVRemove:
    """Drop slot's KV from start_pos to the end (llama_memory_seq_rm(slot, start_pos, -1))."""

    slot: int
    start_pos: int = 0


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step: KV removals, then prefix copies, then one batch of chunks.

    The counters are the features cost models use; they are computed once by
    the scheduler so that backends never walk the chunks to price a step.
    """

    step_id: int
    now_s: float
    chunks: tuple[ScheduledChunk, ...]
    removes: tuple[KVRemove, ...] = ()
    copies: tuple[KVCopy, ...] = ()
    num_prefill_tokens: int = 0  # prompt (or recomputed) tokens in this batch
    num_decode_seqs: int = 0  # chunks that feed back one generated token
    num_context_tokens: int = 0  # KV positions attended, summed over chunks (start_pos + len)
    sum_sq_prefill_tokens: int = 0  # sum over prefill chunks of len * (start_pos + len)
    num_pad_tokens: int = 0
    num_copied_tokens: int = 0
    wake_at_s: float | None = None  # when empty: the policy wants to be asked again then
    finished_request_ids: tuple[str, ...] = ()  # finished since the last plan: backends drop their state

    @property
    def num_scheduled_tokens(self) -> int:
        """Real tokens in the batch (prefill + decode), without padding."""
        return self.num_prefill_tokens + self.num_decode_seqs

    @property
    def num_seqs(self) -> int:
        """Chunks (requests) in the batch."""
        return len(self.chunks)

    @property
    def is_empty(self) -> bool:
        """True when there is nothing for a backend to do."""
        return not (self.chunks or self.removes or self.copies)


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a backend returns: one sampled token per sampling chunk, the step's time, failures."""

    sampled_token_ids: dict[str, int]
    elapsed_s: float
    failed: dict[str, str] = field(default_factory=dict)  # request_id -> reason


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """Per-request event from commit/abort/add: new tokens, and the finish if it finished."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: str | None = None
    detail: str | None = None


# ---- fast construction for the per-request messages of every step ------------------------
# A frozen dataclass's generated __init__ sets each field through object.__setattr__,
# which made building one ScheduledChunk and one RequestOutput per running request the
# largest cost of a step. Writing the slots through their descriptors skips that lookup
# and yields the same frozen, equal-comparing objects (neither class has __post_init__).
_new = object.__new__
(_c_request_id, _c_slot, _c_start_pos, _c_token_ids, _c_sample, _c_num_pad_tokens, _c_is_decode,
 _c_sampling) = (ScheduledChunk.__dict__[name].__set__ for name in ScheduledChunk.__slots__)
_o_request_id, _o_new_token_ids, _o_finished, _o_finish_reason, _o_detail = (
    RequestOutput.__dict__[name].__set__ for name in RequestOutput.__slots__)


def new_chunk(request_id: str, slot: int, start_pos: int, token_ids: tuple[int, ...], sample: bool,
              num_pad_tokens: int, is_decode: bool, sampling: SamplingParams | None) -> ScheduledChunk:
    """ScheduledChunk(...) with every field given, about twice as fast as the constructor."""
    c = _new(ScheduledChunk)
    _c_request_id(c, request_id)
    _c_slot(c, slot)
    _c_start_pos(c, start_pos)
    _c_token_ids(c, token_ids)
    _c_sample(c, sample)
    _c_num_pad_tokens(c, num_pad_tokens)
    _c_is_decode(c, is_decode)
    _c_sampling(c, sampling)
    return c


def new_output(request_id: str, new_token_ids: tuple[int, ...], finished: bool = False,
               finish_reason: str | None = None, detail: str | None = None) -> RequestOutput:
    """RequestOutput(...), about twice as fast as the constructor."""
    o = _new(RequestOutput)
    _o_request_id(o, request_id)
    _o_new_token_ids(o, new_token_ids)
    _o_finished(o, finished)
    _o_finish_reason(o, finish_reason)
    _o_detail(o, detail)
    return o

