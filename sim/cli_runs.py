"""Running strategies for the CLI: run specs (a policy plus run options), backends, one run -> summary.

A run spec is a policy spec (``static``, ``static:batch_size=8``, ``mymod:MyPolicy``)
optionally followed by ``+noprefix``, which turns shared-prefix KV reuse off for
that run only (``continuous+noprefix`` is reported as "continuous (no prefix
sharing)"). Lists of specs are comma-separated; a comma-separated item of the
form key=value continues the previous spec's parameters, so
``static:batch_size=8,wait_s=1,continuous`` is two specs. ``;`` also separates.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from scheduler import SchedulerConfig, make_policy
from sim.cli_common import CONFIG_FIELDS, UsageError, build_config, gpu_layers, resolve_cost_model
from sim.metrics import parse_slo, summarize
from sim.model import run_workload
from sim.progress import Progress, progress_enabled
from sim.records import RunResult
from sim.workload import Workload

NOPREFIX = "+noprefix"
LLAMA_HINT = "the llama backend needs the llama extra: pip install -e '.[llama]'"


@dataclass(frozen=True)
class RunSpec:
    """One strategy to run: a policy spec, its column label and run options."""

    label: str
    policy: str
    prefix_caching: bool | None = None  # None: as the scheduler config says
    config_overrides: dict = field(default_factory=dict)  # SchedulerConfig fields for this run only
    params: dict = field(default_factory=dict)  # swept parameters, for reports


def split_specs(text: str) -> list[str]:
    """Split a policy list on commas and semicolons, keeping key=value items with their policy."""
    specs: list[str] = []
    for chunk in str(text).split(";"):
        for item in (p.strip() for p in chunk.split(",")):
            if not item:
                continue
            if "=" in item and ":" not in item.split("=", 1)[0] and specs and ":" in specs[-1]:
                specs[-1] += "," + item
            else:
                specs.append(item)
    if not specs:
        raise UsageError(f"policy list {text!r} names no policy")
    return specs


def _with_params(spec: str, params: dict[str, str]) -> str:
    if not params:
        return spec
    extra = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{spec},{extra}" if "=" in spec else f"{spec}:{extra}"


def parse_run_spec(text: str, params: dict[str, str] | None = None) -> RunSpec:
    """A RunSpec from 'policy[:k=v,...][+noprefix]'; params are swept policy or SchedulerConfig values."""
    spec, prefix = text.strip(), None
    if spec.endswith(NOPREFIX):
        spec, prefix = spec[: -len(NOPREFIX)].strip(), False
    policy_params = {k: v for k, v in (params or {}).items() if k not in CONFIG_FIELDS}
    overrides = {k: v for k, v in (params or {}).items() if k in CONFIG_FIELDS}
    spec = _with_params(spec, policy_params)
    label = make_policy(spec).describe()  # raises ValueError for unknown policies and bad parameters
    if overrides:
        label += " " + ",".join(f"{k}={v}" for k, v in overrides.items())
    if prefix is False:
        label += " (no prefix sharing)"
    return RunSpec(label, spec, prefix, overrides, dict(params or {}))


def parse_run_specs(text: str) -> list[RunSpec]:
    """RunSpecs for a comma-separated policy list."""
    return [parse_run_spec(s) for s in split_specs(text)]


class LlamaSession:
    """Real llama.cpp instances from sim.real.make_llama_instances, reused (KV cleared) across runs."""

    def __init__(self, model: str, num_instances: int, options: dict) -> None:
        try:
            real = importlib.import_module("sim.real")
            self._make = real.make_llama_instances
        except ImportError as exc:
            raise UsageError(f"{LLAMA_HINT} ({exc})") from None
        except AttributeError:
            raise UsageError(f"sim.real has no make_llama_instances; {LLAMA_HINT}") from None
        self.model, self.num_instances, self.options = model, num_instances, options
        self.backends, self.config = self._make(model, num_instances, options)
        self._used = False

    def fresh_backends(self) -> list:
        """Backends with empty KV caches (cleared, or rebuilt when they cannot be cleared)."""
        if self._used:
            if all(callable(getattr(b, "clear_kv", None)) for b in self.backends):  # also drops cached prefixes
                for b in self.backends:
                    b.clear_kv()
            else:
                self.close()
                self.backends, _ = self._make(self.model, self.num_instances, self.options)
        self._used = True
        return self.backends

    def close(self) -> None:
        """Free the contexts and the model (sim.real.close_instances), else close each backend."""
        closer = getattr(importlib.import_module("sim.real"), "close_instances", None)
        if callable(closer):
            closer(self.backends)
            return
        for b in self.backends:
            close = getattr(b, "close", None)
            if callable(close):
                close()


@dataclass
class Context:
    """What every run of one command shares: flags, cost model, scheduler config, SLO, backends."""

    args: argparse.Namespace
    command: str
    cost: Any
    cost_name: str
    cost_note: str
    config: SchedulerConfig
    slo: dict | None
    llama: LlamaSession | None = None

    @property
    def backend(self) -> str:
        """'sim' or 'llama'."""
        return "llama" if self.llama is not None else "sim"

    def header(self, workload: Workload | None = None) -> str:
        """Lines naming the command, backend, cost model, scheduler limits and workload."""
        meta = getattr(self.cost, "meta", {}) or {}
        note = f"; {meta['note']}" if "note" in meta else ""
        c = self.config
        llama = ""
        if self.llama:
            b = self.llama.backends[0]
            llama = f" (model {self.llama.model}, {b.n_threads} thread(s) per context" + (
                f", {len(self.llama.backends)} contexts stepping at the same time)" if len(self.llama.backends) > 1
                else ")")
        lines = [f"tokenstep {self.command}: backend {self.backend}{llama}",
                 f"cost model: {self.cost_name} ({self.cost_note}{note})",
                 f"scheduler: max_num_seqs={c.max_num_seqs}, max_num_batched_tokens={c.max_num_batched_tokens}, "
                 f"max_model_len={c.max_model_len}, kv={c.num_kv_blocks}x{c.block_size} tokens, "
                 f"prefix caching {'on' if c.enable_prefix_caching else 'off'}, "
                 f"{self.args.instances} instance(s), router {self.args.router}"]
        if workload is not None:
            lines.append(f"workload: {workload.description}")
        return "\n".join(lines)


def _option_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def llama_options(args: argparse.Namespace) -> dict:
    """Options for make_llama_instances from the flags given: n_seq_max, n_ctx, n_batch, seed, threads, extras."""
    options: dict = {"seed": args.seed}
    if args.max_num_seqs is not None:
        options["n_seq_max"] = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        options["n_batch"] = args.max_num_batched_tokens
    if args.kv_tokens is not None:
        options["n_ctx"] = args.kv_tokens
    elif args.kv_blocks is not None:
        options["n_ctx"] = args.kv_blocks * (args.block_size or SchedulerConfig().block_size)
    if getattr(args, "threads", None) is not None:
        options["n_threads"] = args.threads
    if gpu_layers(args) is not None:
        options["n_gpu_layers"] = gpu_layers(args)
    for item in getattr(args, "llama_option", None) or []:
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--llama-option {item!r} must look like key=value, e.g. n_ubatch=256")
        if "=" in value:
            raise UsageError(f"--llama-option {item!r} holds several key=value pairs; give one per flag: "
                             "--llama-option n_ctx=8192 --llama-option n_seq_max=16")
        options[key.strip()] = _option_value(value)
    return options


def prepare(args: argparse.Namespace, command: str) -> Context:
    """Resolve the cost model, SLO, llama instances (for --backend llama) and the scheduler config."""
    cost, cost_name, cost_note = resolve_cost_model(args)
    slo = parse_slo(args.slo) if getattr(args, "slo", None) else None
    llama = None
    base = None
    if args.backend == "llama":
        from backends.models import DEFAULT_MODEL

        llama = LlamaSession(args.model or DEFAULT_MODEL, args.instances, llama_options(args))
        base = llama.config
    else:
        given = [flag for flag, value in (("--model", args.model), ("--threads", args.threads),
                                          ("--llama-option", args.llama_option)) if value]
        if gpu_layers(args) is not None:
            given.append("--n-gpu-layers/--device")
        if given:
            raise UsageError(f"{', '.join(given)} apply to --backend llama; the simulator prices steps with --cost")
    config = build_config(args, cost, base=base)
    return Context(args, command, cost, cost_name, cost_note, config, slo, llama)


def make_progress(args: argparse.Namespace, label: str, enabled: bool = True) -> Progress:
    """A progress bar for one task (silent unless enabled and the task runs past its delay)."""
    return Progress(label, enabled=enabled and progress_enabled(getattr(args, "quiet", False)))


def _coerce(name: str, value: Any, config: SchedulerConfig) -> Any:
    current = getattr(config, name)
    if isinstance(current, bool):
        text = str(value).strip().lower()
        if text not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
            raise UsageError(f"{name}={value!r} must be true or false")
        return text in ("1", "true", "on", "yes")
    if isinstance(current, int) or name == "max_prefill_chunk_tokens":
        try:
            return int(value)
        except ValueError:
            raise UsageError(f"{name}={value!r} must be an integer") from None
    return value


def run_config(ctx: Context, spec: RunSpec) -> SchedulerConfig:
    """The context's config with the spec's run options applied."""
    overrides = {k: _coerce(k, v, ctx.config) for k, v in spec.config_overrides.items()}
    if spec.prefix_caching is not None:
        overrides["enable_prefix_caching"] = spec.prefix_caching
    return replace(ctx.config, **overrides) if overrides else ctx.config


def execute(ctx: Context, spec: RunSpec, workload: Workload, simulate: bool = False,
            label: str | None = None, extra: dict | None = None, progress: bool = True,
            on_run: Callable[[RunResult], None] | None = None) -> tuple[RunResult, dict]:
    """Run one spec on the workload (the real backend unless simulate or --backend sim); return run + summary.

    progress=False keeps this run's bar off (when the caller draws one over many runs). on_run(run), if
    given, is called once the run is complete, before it is summarized (e.g. to start drawing its plots).
    """
    from backends.synthetic import SyntheticBackend

    args = ctx.args
    real = ctx.llama is not None and not simulate
    label = label or spec.label
    config = run_config(ctx, spec)
    backends = ctx.llama.fresh_backends() if real else [SyntheticBackend(ctx.cost) for _ in range(args.instances)]
    with make_progress(args, f"{ctx.command} {label}", progress) as bar:
        realtime = real and not getattr(args, "virtual_time", False)
        run = run_workload(workload, spec.policy, config, backends, router=args.router, realtime=realtime,
                           progress=bar)
    run.policy = label
    if on_run is not None:
        on_run(run)
    summary = summarize(run, ctx.slo)
    summary.update({"policy": label, "policy_spec": spec.policy, "backend": "llama" if real else "sim",
                    "prefix_caching": config.enable_prefix_caching, **(extra or {})})
    if spec.params:
        summary["params"] = dict(spec.params)
    return run, summary


def close(ctx: Context) -> None:
    """Release real backends, if any."""
    if ctx.llama is not None:
        ctx.llama.close()

