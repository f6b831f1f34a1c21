"""Real-backend instances for the SimPy model (``--backend llama``)."""

from __future__ import annotations

from typing import Any

from scheduler import SchedulerConfig
from sim.executor import available_cpus

# kv_unified=False (one KV stream per slot) is what the bundled profile was calibrated on. With one stream
# llama.cpp splits a batch with split_simple (every sequence in one micro-batch); with a stream per slot it
# uses split_equal(sequential), which groups only consecutive slot ids with equal token counts (the cost
# model prices those passes). --llama-option kv_unified=true switches; calibrate a profile for it.
# The CPUs this process may run on: instances share them unless n_threads is given (2 CPUs and 2 instances:
# 1 thread each).
CPU_THREADS = available_cpus()
DEFAULT_LLAMA_OPTIONS = {"n_ctx": 8192, "n_seq_max": 16, "n_threads": CPU_THREADS, "kv_unified": False}


def threads_per_instance(num_instances: int, given: int | None = None) -> int:
    """Threads of each context: the given number, else the CPU_THREADS shared out (at least 1)."""
    return given if given is not None else max(1, CPU_THREADS // num_instances)


def make_llama_instances(model: str | None, num_instances: int = 1,
                         options: dict[str, Any] | None = None) -> tuple[list[Any], SchedulerConfig]:
    """num_instances llama.cpp contexts over one loaded model, and the scheduler config they support.

    options: n_ctx, n_seq_max, n_threads (per context), n_batch, n_ubatch, kv_unified, swa_full, n_gpu_layers.
    Without n_threads the instances share the machine's CPU_THREADS (threads_per_instance): in real time
    they step at the same time, each on its own thread (sim.rt), as independent engines on one machine.
    """
    from backends.llamacpp import LlamaCppBackend
    from backends.models import DEFAULT_MODEL, LlamaModel

    if num_instances < 1:
        raise ValueError(f"--instances must be >= 1, got {num_instances}")
    opts = {**DEFAULT_LLAMA_OPTIONS, **(options or {})}
    opts["n_threads"] = threads_per_instance(num_instances, (options or {}).get("n_threads"))
    n_gpu_layers = int(opts.pop("n_gpu_layers", 0))
    shared = LlamaModel(model or DEFAULT_MODEL, n_gpu_layers=n_gpu_layers)
    backends = [LlamaCppBackend(shared, n_gpu_layers=n_gpu_layers, **opts) for _ in range(num_instances)]
    return backends, backends[0].scheduler_config()


def close_instances(backends: list[Any]) -> None:
    """Free every context, then the shared model."""
    model = backends[0].model if backends else None
    for b in backends:
        b.close()
    if model is not None and not model.closed:
        model.close()
