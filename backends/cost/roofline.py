"""Roofline step times for named GPU + model presets, with the scheduler capacity they imply.

Assumptions, all visible in describe() and in the JSON params:
- dtype bf16 (2 bytes) for weights and KV cache; peak is dense bf16 tensor-core FLOP/s
  (H100 SXM 989 TFLOP/s, A100 SXM 312 TFLOP/s); HBM 80 GiB per GPU at 3.35 TB/s (H100 SXM)
  or 2.0 TB/s (A100 SXM 80GB).
- Llama-3.1-8B: 8.03e9 params, 32 layers, hidden 4096, 32 query heads, 8 KV heads, head_dim 128.
  Llama-3.1-70B: 70.6e9 params, 80 layers, hidden 8192, 64 query heads, 8 KV heads, head_dim 128,
  run tensor-parallel on 4 GPUs (the 70B presets are tp=4). Both take their real 131072-token
  context as max_model_len (Llama-3's shapes; the preset names keep "llama3").
- step = max(compute, memory) + fixed overhead (scheduling, sampling, launch gaps, and for
  tp>1 the per-layer all-reduce latency; all-reduce bandwidth is not modelled).
- compute = 2*params*tokens + 4*layers*heads*head_dim*(query-key pairs), over
  num_gpus*peak*mfu; pairs = sum_sq_prefill_tokens + num_context_tokens, which counts each
  prefill chunk's own context once more (an overcount of 1/len of its attention).
  2*params also charges the embedding lookup as a matmul (about 7% of the 8B's params).
- memory = weight bytes + KV bytes read (context) and written (new tokens) + 2x copied KV,
  over num_gpus*bandwidth*mbu.
- capacity: KV tokens = memory_fraction*HBM - weights (no activation or CUDA-graph reserve,
  so an upper bound), in blocks of block_size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from backends.cost.base import (
    MIN_STEP_S,
    CostModelError,
    StepFeatures,
    check_params,
    features,
    floor_time,
    require_params,
)
from scheduler.messages import StepPlan

GIB = 1024**3
ROOFLINE_TEXT_PARAMS = ("gpu", "model")
ROOFLINE_NUMBER_PARAMS = (
    "num_gpus",
    "peak_tflops",
    "hbm_tb_s",
    "hbm_gib",
    "num_params",
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "dtype_bytes",
    "kv_dtype_bytes",
    "mfu",
    "mbu",
    "overhead_s",
    "memory_fraction",
    "block_size",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
)
_INT_PARAMS = (
    "num_gpus",
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "block_size",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
)


@dataclass(frozen=True, slots=True)
class RooflineCostModel:
    """step = max(FLOPs / (peak * mfu), bytes / (bandwidth * mbu)) + overhead_s."""

    gpu: str
    model: str
    num_gpus: int
    peak_tflops: float  # per GPU, dense bf16
    hbm_tb_s: float  # per GPU, 1e12 bytes/s
    hbm_gib: float  # per GPU
    num_params: float
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: float = 2  # bytes per weight: 2 for f16/bf16, 1 for fp8/int8, about 0.56 for llama.cpp's Q4_K_M
    kv_dtype_bytes: float | None = None  # bytes per K or V element (None: dtype_bytes)
    mfu: float = 0.5  # vLLM-class prefill reaches 40-60% of dense peak
    mbu: float = 0.8  # decode kernels reach 70-85% of HBM bandwidth
    overhead_s: float = 0.002
    memory_fraction: float = 0.9  # vLLM's gpu_memory_utilization default
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    name: str = "roofline"
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.kv_dtype_bytes is None:
            object.__setattr__(self, "kv_dtype_bytes", self.dtype_bytes)
        src = f"roofline cost model {self.name!r}"
        nums = check_params(
            "roofline",
            {n: getattr(self, n) for n in ROOFLINE_NUMBER_PARAMS},
            ROOFLINE_NUMBER_PARAMS,
            src,
        )
        for n, value in nums.items():
            if n in ("overhead_s",):
                continue
            if value <= 0 or (n in _INT_PARAMS and value != int(value)):
                kind = "a positive integer" if n in _INT_PARAMS else "> 0"
                raise CostModelError(
                    f"{src}: {n} must be {kind}, got {getattr(self, n)!r}"
                )
        for n in ("mfu", "mbu", "memory_fraction"):
            if nums[n] > 1:
                raise CostModelError(
                    f"{src}: {n} is a fraction of peak and must be <= 1, got {nums[n]!r}"
                )
        for n in ROOFLINE_TEXT_PARAMS:
            if not isinstance(getattr(self, n), str) or not getattr(self, n):
                raise CostModelError(
                    f"{src}: {n} must be a non-empty string, got {getattr(self, n)!r}"
                )
        if self.kv_capacity_tokens < self.max_model_len:
            raise CostModelError(
                f"{src}: {self.model} weights leave room for {self.kv_capacity_tokens} KV tokens on "
                f"{self.num_gpus}x {self.gpu}, fewer than max_model_len={self.max_model_len}; add GPUs"
            )

    @property
    def weight_bytes(self) -> float:
        """Bytes of all weights (summed over GPUs)."""
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V bytes of one token over all layers."""
        return (
            2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes
        )

    @property
    def kv_capacity_tokens(self) -> int:
        """KV tokens that fit after weights, in whole blocks."""
        free = (
            self.memory_fraction * self.hbm_gib * GIB * self.num_gpus
            - self.weight_bytes
        )
        blocks = int(max(free, 0) // (self.kv_bytes_per_token * self.block_size))
        return blocks * self.block_size

    def capacity(self) -> dict:
        """SchedulerConfig keyword arguments for this preset: SchedulerConfig(**model.capacity())."""
        return {
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_model_len": self.max_model_len,
            "num_kv_blocks": self.kv_capacity_tokens // self.block_size,
            "block_size": self.block_size,
            "slot_choice": "adjacent",  # paged KV on a GPU: the slot layout costs nothing, so no compaction moves
        }

    def rates(self) -> tuple[float, float, float, float, float, float, float]:
        """The constants every price is made of: (2 x params, attention FLOPs per query-key pair, FLOP/s at mfu,
        weight bytes, KV bytes per token, bytes/s at mbu, overhead_s)."""
        return (2 * self.num_params, 4 * self.num_layers * self.num_heads * self.head_dim,
                self.num_gpus * self.peak_tflops * 1e12 * self.mfu, self.weight_bytes, self.kv_bytes_per_token,
                self.num_gpus * self.hbm_tb_s * 1e12 * self.mbu, self.overhead_s)

    def compute_s(self, feats: StepFeatures) -> float:
        """Time the step's FLOPs take at mfu of peak."""
        tokens, pairs, _ = _counts(feats)
        return _compute_s(self.rates(), tokens, pairs)

    def memory_s(self, feats: StepFeatures) -> float:
        """Time the step's HBM traffic takes at mbu of bandwidth."""
        _, _, kv_cells = _counts(feats)
        return _memory_s(self.rates(), kv_cells, feats.has_batch)

    def predict_s(self, feats: StepFeatures) -> float:
        """Seconds for a step with these features."""
        return floor_time(feats, _step_s(self.rates(), *_counts(feats), feats.has_batch))

    def step_time_s(self, plan: StepPlan) -> float:
        """Seconds the plan's step takes (0 for an empty plan)."""
        return self.predict_s(features(plan))

    def decode_pricer(self, slots: Sequence[int]) -> Callable[[int], float]:
        """price(num_context_tokens): predict_s of a pure-decode step over these slots, through the same
        _step_s with the model's constants computed once."""
        n = len(slots)
        if n == 0:
            return lambda ctx: 0.0
        rates = self.rates()
        return lambda ctx: max(_step_s(rates, n, ctx, ctx + n, 1), MIN_STEP_S)

    def to_dict(self) -> dict:
        """{"kind": "roofline", "params", "meta"}."""
        params = {
            n: getattr(self, n) for n in ROOFLINE_TEXT_PARAMS + ROOFLINE_NUMBER_PARAMS
        }
        return {"kind": "roofline", "params": params, "meta": dict(self.meta)}

    @classmethod
    def from_dict(
        cls, params: object, meta: dict, name: str, source: str
    ) -> RooflineCostModel:
        """Build from a JSON params object; source names the file in errors."""
        if isinstance(params, dict) and "kv_dtype_bytes" not in params and "dtype_bytes" in params:
            params = {**params, "kv_dtype_bytes": params["dtype_bytes"]}  # files before kv_dtype_bytes existed
        params = require_params("roofline", params, ROOFLINE_TEXT_PARAMS + ROOFLINE_NUMBER_PARAMS, source)
        text = {n: params[n] for n in ROOFLINE_TEXT_PARAMS}
        for n, value in text.items():
            if not isinstance(value, str) or not value:
                raise CostModelError(
                    f"{source}: roofline param {n!r} must be a non-empty string, got {value!r}"
                )
        nums = check_params(
            "roofline",
            {k: v for k, v in params.items() if k not in text},
            ROOFLINE_NUMBER_PARAMS,
            source,
        )
        for n in _INT_PARAMS:
            if nums[n] != int(nums[n]):
                raise CostModelError(
                    f"{source}: roofline param {n!r} must be an integer, got {params[n]!r}"
                )
            nums[n] = int(nums[n])
        try:
            return cls(**text, **nums, name=name, meta=meta)
        except ValueError as exc:
            raise CostModelError(f"{source}: {exc}") from None

    def describe(self) -> str:
        """One line with every assumption behind the numbers."""
        return (
            f"roofline '{self.name}': {self.model} ({self.num_params:.3g} params, {self.num_layers} layers, "
            f"hidden {self.hidden_size}, {self.num_heads} heads / {self.num_kv_heads} KV heads x {self.head_dim}, "
            f"{8 * self.dtype_bytes:g}-bit weights, {8 * self.kv_dtype_bytes:g}-bit KV) on {self.num_gpus}x {self.gpu} "
            f"({self.peak_tflops:g} TFLOP/s dense, "
            f"{self.hbm_tb_s:g} TB/s, {self.hbm_gib:g} GiB each); t = max(FLOPs/(peak*{self.mfu:g}), "
            f"bytes/(BW*{self.mbu:g})) + {self.overhead_s * 1e3:g} ms; KV {self.kv_capacity_tokens} tokens at "
            f"{self.memory_fraction:g} of HBM, block {self.block_size}; TP all-reduce bandwidth not modelled"
        )


_H100 = {
    "gpu": "H100-SXM-80GB",
    "peak_tflops": 989.0,
    "hbm_tb_s": 3.35,
    "hbm_gib": 80.0,
}
_A100 = {"gpu": "A100-SXM-80GB", "peak_tflops": 312.0, "hbm_tb_s": 2.0, "hbm_gib": 80.0}
# H200 SXM: the H100's compute (989 TFLOP/s dense bf16) with 141 GB of HBM3e at 4.8 TB/s (datasheet);
# nvidia-smi reports 143771 MiB, about 140 GiB
_H200 = {"gpu": "H200-SXM-141GB", "peak_tflops": 989.0, "hbm_tb_s": 4.8, "hbm_gib": 140.0}
LLAMA31_CONTEXT_TOKENS = 131072  # max_position_embeddings of Llama-3.1-8B and -70B
_LLAMA3_8B = {
    "model": "Llama-3.1-8B",
    "num_params": 8.03e9,
    "num_layers": 32,
    "hidden_size": 4096,
    "num_heads": 32,
    "num_kv_heads": 8,
    "head_dim": 128,
    "num_gpus": 1,
    "overhead_s": 0.002,
    "max_model_len": LLAMA31_CONTEXT_TOKENS,
}
# tp=4: 141 GB of bf16 weights need more than one 80 GiB GPU; the extra overhead is
# 160 all-reduces per step at roughly 10 us each.
_LLAMA3_70B = {
    "model": "Llama-3.1-70B",
    "num_params": 70.6e9,
    "num_layers": 80,
    "hidden_size": 8192,
    "num_heads": 64,
    "num_kv_heads": 8,
    "head_dim": 128,
    "num_gpus": 4,
    "overhead_s": 0.004,
    "max_model_len": LLAMA31_CONTEXT_TOKENS,
}

ROOFLINE_PRESETS: dict[str, RooflineCostModel] = {
    name: RooflineCostModel(
        **gpu, **model, name=name, meta={"source": "preset, datasheet numbers"}
    )
    for name, gpu, model in (
        ("h100-llama3-8b", _H100, _LLAMA3_8B),
        ("a100-llama3-8b", _A100, _LLAMA3_8B),
        ("h100-llama3-70b", _H100, _LLAMA3_70B),
        ("a100-llama3-70b", _A100, _LLAMA3_70B),
        ("h200-llama3-8b", _H200, _LLAMA3_8B),
        # 141 GB of bf16 weights fit two H200s: tp=2, half the 4-GPU all-reduces' latency
        ("h200-llama3-70b", _H200, {**_LLAMA3_70B, "num_gpus": 2, "overhead_s": 0.003}),
    )
}


def _counts(feats: StepFeatures) -> tuple[int, int, int]:
    """(tokens, query-key pairs, KV cells read or written) of a step."""
    tokens = feats.num_prefill_tokens + feats.num_decode_seqs
    pairs = feats.sum_sq_prefill_tokens + feats.num_context_tokens
    return tokens, pairs, feats.num_context_tokens + tokens + 2 * feats.num_copied_tokens


def _compute_s(rates: tuple, tokens: int, pairs: int) -> float:
    return (rates[0] * tokens + rates[1] * pairs) / rates[2]


def _memory_s(rates: tuple, kv_cells: int, has_batch: int) -> float:
    return (rates[3] * has_batch + rates[4] * kv_cells) / rates[5]


def _step_s(rates: tuple, tokens: int, pairs: int, kv_cells: int, has_batch: int) -> float:
    """max(compute, memory) + overhead of a step with these counts: the one formula every roofline price uses."""
    return max(_compute_s(rates, tokens, pairs), _memory_s(rates, kv_cells, has_batch)) + rates[6] * has_batch
