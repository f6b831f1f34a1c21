"""Scheduler limits."""

from __future__ import annotations

from dataclasses import dataclass

VICTIM_RULES = ("newest", "lowest_priority", "fewest_computed")
# adjacent: a new request takes the free (else cached) slot next to the most running ones, and a prefix hit takes
# over the cached holder of its prefix next to the most running ones, since llama.cpp with a KV stream per slot
# runs one forward pass per run of consecutive slots; any: a free slot, else the LRU cached one; the lowest holder;
# compact: as adjacent, and when the running slots still leave a gap (a request in the middle finished), running
# requests move into it (a KVCopy with move=True: one copy of the slot's KV stream), so that the running slots are
# always one run and every decode step is one forward pass
SLOT_CHOICES = ("compact", "adjacent", "any")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits one scheduler works within; a backend supplies the capacity fields."""

    max_num_seqs: int = 16  # slots (llama.cpp n_seq_max)
    max_num_batched_tokens: int = 512  # token budget of one step
    max_model_len: int = 4096  # longest prompt + output of one request
    num_kv_blocks: int = 256  # KV capacity in blocks (n_ctx / block_size)
    block_size: int = 16  # tokens per KV block (the prefix-sharing unit)
    max_prefill_chunk_tokens: int | None = None  # per-request chunk cap; None: the budget
    enable_prefix_caching: bool = True
    preemption_victim: str = "newest"
    slot_choice: str = "compact"
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_kv_blocks", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive integer, got {value!r}")
        chunk = self.max_prefill_chunk_tokens
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ValueError(
                f"SchedulerConfig.max_prefill_chunk_tokens must be a positive integer or None, got {chunk!r}"
            )
        if self.preemption_victim not in VICTIM_RULES:
            raise ValueError(
                f"unknown preemption_victim {self.preemption_victim!r}; choose one of {', '.join(VICTIM_RULES)}"
            )
        if self.slot_choice not in SLOT_CHOICES:
            raise ValueError(f"unknown slot_choice {self.slot_choice!r}; choose one of {', '.join(SLOT_CHOICES)}")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def kv_capacity_tokens(self) -> int:
        """Total KV cells the blocks stand for."""
        return self.num_kv_blocks * self.block_size
