"""What a run records: one record per request and one sample per step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    """Timeline of one request in one run (seconds on the run's clock)."""

    request_id: str
    arrival_s: float
    num_prompt_tokens: int
    max_tokens: int
    instance: int = 0
    priority: int = 0
    first_scheduled_s: float | None = None  # first admission into a batch
    first_token_s: float | None = None  # first output token computed (end of its step)
    finish_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # one per output token
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0
    finish_reason: str | None = None
    detail: str | None = None
    text: str | None = None  # real backend only


@dataclass(slots=True)  # not frozen: a frozen init costs 6x, and a replay makes 300k of these
class StepSample:
    """State of one instance right after one step."""

    instance: int
    start_s: float
    end_s: float
    num_seqs: int  # chunks in the batch
    num_prefill_tokens: int
    num_decode_seqs: int
    num_waiting: int
    num_running: int
    kv_used_blocks: int
    kv_total_blocks: int
    num_pad_tokens: int = 0
    num_copied_tokens: int = 0


@dataclass(slots=True)
class RunResult:
    """Everything one run produced, with the configuration that produced it."""

    policy: str
    records: list[RequestRecord]
    steps: list[StepSample]
    duration_s: float
    config: dict = field(default_factory=dict)
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0
    ttft_timing: str = "computed"  # "computed": end of the step that sampled it; "delivered": seen by the client
