"""Serve the engine over an OpenAI-compatible HTTP API (streaming, batching, prefix sharing, /metrics).

`tokenstep serve` runs the same Scheduler as every other command behind /v1/completions,
/v1/chat/completions, /v1/models, /health and /metrics. --backend llama (default) serves the real model;
--backend sim serves the simulator in real time: synthetic tokens, each step lasting what the cost model
prices. SIGINT/SIGTERM stop accepting requests, let in-flight ones finish (--shutdown-timeout, then they
are aborted with the reason "server shutting down") and exit 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import asdict, replace
from types import FrameType
from typing import Any

from sim.cli_common import (
    UsageError,
    add_gpu_args,
    add_scheduler_args,
    build_config,
    nonnegative_int,
    positive_float,
    resolve_cost_model,
)

NOPREFIX = "+noprefix"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `tokenstep serve`."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    g.add_argument("--port", type=nonnegative_int, default=8000, help="port (default 8000)")
    g.add_argument("--served-model-name", action="append", metavar="NAME",
                   help="model name(s) clients use (repeatable; default: the --model value)")
    g.add_argument("--max-queue", type=nonnegative_int, metavar="N",
                   help="waiting requests allowed beyond those running; past it: 429 with Retry-After "
                        "(default: unbounded)")
    g.add_argument("--shutdown-timeout", type=positive_float, default=30.0, metavar="S",
                   help="on SIGINT/SIGTERM, seconds in-flight requests get to finish before they are aborted "
                        "(default 30)")
    g.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    g.add_argument("--access-log", action="store_true", help="log every HTTP request (off: it costs time)")
    b = parser.add_argument_group("engine")
    b.add_argument("--backend", choices=["llama", "sim"], default="llama",
                   help="llama: the real model (default); sim: the simulator in real time, steps priced by --cost")
    b.add_argument("--model", metavar="NAME|PATH", help="GGUF model (default gemma3-270m); with --backend sim "
                   "only its tokenizer is read")
    b.add_argument("--policy", default="continuous", metavar="SPEC",
                   help="scheduling policy, e.g. continuous, chunked, static:batch_size=8, mymod:MyPolicy; "
                        "append +noprefix to turn prefix sharing off (default continuous)")
    b.add_argument("--cost", metavar="NAME|FILE", help="--backend sim: cost model (default: the calibrated "
                   "profile); --backend llama: only reported in /v1/models, for `tokenstep bench --predict`")
    b.add_argument("--threads", type=int, metavar="N", help="--backend llama: CPU threads (default 2)")
    b.add_argument("--llama-option", action="append", metavar="KEY=VALUE",
                   help="--backend llama: context option such as n_ubatch=256 (repeatable)")
    b.add_argument("--seed", type=int, default=0, help="seed of sampling when a request gives none (default 0)")
    add_gpu_args(b)
    add_scheduler_args(parser)


def _policy(spec: str) -> tuple[str, bool]:
    """(policy spec, prefix caching on) from SPEC[+noprefix]; an unknown policy is a usage error."""
    from scheduler import make_policy

    spec = spec.strip()
    prefix = not spec.endswith(NOPREFIX)
    if not prefix:
        spec = spec[: -len(NOPREFIX)].strip()
    make_policy(spec)  # raises ValueError naming the problem
    return spec, prefix


def _check(args: argparse.Namespace) -> None:
    if args.instances != 1:
        raise UsageError("--instances: tokenstep serve runs one engine; start one server per instance and put a "
                         "router in front")
    if args.backend == "sim":
        given = [f for f, v in (("--threads", args.threads), ("--llama-option", args.llama_option),
                                ("--n-gpu-layers", args.n_gpu_layers), ("--device", args.device)) if v]
        if given:
            raise UsageError(f"{', '.join(given)} apply to --backend llama; --backend sim prices steps with --cost")


def _llama_loader(args: argparse.Namespace, policy: str, prefix: bool, info: Any) -> Any:
    """A function that loads the model and builds the engine (run in the server's loading thread)."""
    from backends.models import DEFAULT_MODEL, resolve_model

    model = args.model or DEFAULT_MODEL
    info.model_path = str(resolve_model(model))  # a missing model fails here, before the server starts

    def load() -> Any:
        from serve.engine import EngineCore
        from sim.cli_runs import llama_options
        from sim.real import make_llama_instances

        backends, base = make_llama_instances(model, 1, llama_options(args))
        backend = backends[0]
        config = build_config(args, None, base=base)
        if not prefix:
            config = replace(config, enable_prefix_caching=False)
        info.tokenizer = f"{backend.model.name} (the model's own)"
        return EngineCore(backend, policy, **asdict(config))

    return load


def _sim_loader(args: argparse.Namespace, policy: str, prefix: bool, info: Any) -> Any:
    from serve.engine import EngineCore
    from serve.sim_backend import RealTimeSyntheticBackend, load_tokenizer

    cost, cost_name, _ = resolve_cost_model(args)
    config = build_config(args, cost)
    if not prefix:
        config = replace(config, enable_prefix_caching=False)
    info.cost = cost_name

    def load() -> Any:
        tokenizer, description, path = load_tokenizer(args.model)
        info.model_path, info.tokenizer = path, description
        return EngineCore(RealTimeSyntheticBackend(cost, config, tokenizer), policy)

    return load


def run(args: argparse.Namespace) -> int:
    """Start the server; return 0 after a clean shutdown."""
    import uvicorn

    from serve.app import ServerInfo, ServerState, create_app

    _check(args)
    policy, prefix = _policy(args.policy)
    from backends.models import DEFAULT_MODEL

    names = tuple(args.served_model_name or [str(args.model or DEFAULT_MODEL)])
    info = ServerInfo(names, args.backend, policy, args.cost, None)  # +noprefix: enable_prefix_caching=False
    loader = (_sim_loader if args.backend == "sim" else _llama_loader)(args, policy, prefix, info)
    server: Any = None

    def load_failed(_message: str) -> None:
        if server is not None:
            server.failed = True
            server.should_exit = True

    state = ServerState(info, loader, args.max_queue, args.shutdown_timeout, load_failed)
    config = uvicorn.Config(create_app(state), host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, timeout_graceful_shutdown=args.shutdown_timeout + 5,
                            lifespan="on")
    server = _make_server(config, state)
    print(f"tokenstep serve: {args.backend} backend, model {names[0]}, policy {args.policy}, listening on "
          f"http://{args.host}:{args.port} (GET /health turns 200 once the model is loaded)", file=sys.stderr)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot listen (it has logged why)
        if exc.code in (0, None):
            return 0
        print(f"tokenstep: error: could not serve on {args.host}:{args.port} (is the port in use? pick another "
              "with --port)", file=sys.stderr)
        return 2
    return 2 if server.failed else 0


def _make_server(config: Any, state: Any) -> Any:
    """A uvicorn Server that drains the engine on SIGINT/SIGTERM and exits 0 (no re-raised signal)."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with tokenstep's shutdown."""

        def __init__(self, config: Any, state: Any) -> None:
            super().__init__(config)
            self.state = state
            self.failed = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop now
                return
            print(f"tokenstep serve: {signal.Signals(sig).name}: no new requests; finishing those in flight "
                  f"(at most {self.state.shutdown_timeout_s:g} s, then aborted)", file=sys.stderr)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self.state.begin_shutdown(loop)
            self.should_exit = True

    return Server(config, state)
