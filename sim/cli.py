"""The `tokenstep` command line: subcommands from a registry, one error policy, TOML configs.

Exit status: 0 on success; 2 on bad usage or bad input (bad flags, ValueError,
TraceError, missing files: one message on stderr, no traceback); 1 on an
internal failure (a short message and the traceback on stderr); 141 when
stdout is closed early (as on SIGPIPE); 130 on Ctrl-C. Set TOKENSTEP_DEBUG=1
to get a traceback for usage errors too.

Plugging in a subcommand: add an entry to SUBCOMMANDS naming a module with
``add_arguments(parser)`` and ``run(args) -> int`` (the module docstring's
first line is its help). Entries whose module does not exist are skipped, so
generate, calibrate and validate appear once their modules land. Reuse the flag
builders and workload/config builders in sim.cli_common.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import importlib.util
import os
import signal
import sys
import threading
import traceback
from types import ModuleType

# name -> (module, add_arguments function, run function)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "simulate": ("sim.cli_simulate", "add_arguments", "run"),
    "compare": ("sim.cli_compare", "add_arguments", "run"),
    "sweep": ("sim.cli_sweep", "add_arguments", "run"),
    "capacity": ("sim.cli_capacity", "add_arguments", "run"),
    "generate": ("sim.cli_generate", "add_arguments", "run"),
    "calibrate": ("calib.cli_calibrate", "add_arguments", "run"),
    "validate": ("calib.cli_validate", "add_arguments", "run"),
    "cost": ("sim.cli_cost", "add_arguments", "run"),
    "serve": ("serve.cli_serve", "add_arguments", "run"),
    "bench": ("sim.cli_bench", "add_arguments", "run"),
}
PROG = "tokenstep"
# the project's required dependencies (pyproject.toml), by import name: a missing one is an install problem
REQUIRED_PACKAGES = frozenset({"simpy", "numpy", "hypothesis", "matplotlib"})


def missing_package(exc: BaseException) -> str | None:
    """The required package (REQUIRED_PACKAGES) whose absence raised exc, if that is what it is."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    return top if top in REQUIRED_PACKAGES else None


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_commands(selected: str | None = None, only: bool = False) -> dict[str, ModuleType]:
    """Importable subcommand modules by name; a broken module is skipped with a warning unless selected.

    only=True: just the selected command's module (a command line that names one needs no other).
    """
    out: dict[str, ModuleType] = {}
    for name, (module_name, _, _) in SUBCOMMANDS.items():
        if only and name != selected:
            continue
        if not _module_exists(module_name):
            continue
        try:
            out[name] = importlib.import_module(module_name)
        except Exception as exc:
            if name == selected or missing_package(exc):
                raise
            print(f"{PROG}: warning: subcommand {name!r} is unavailable ({module_name} failed to import)",
                  file=sys.stderr)
    return out


def _summary(module: ModuleType) -> str:
    return (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""


def reference_text() -> str:
    """Policies, arrival processes, trace formats, routers and cost models, for --help."""
    from backends.cost import known_cost_models
    from scheduler.policies import describe_policies
    from scheduler.router import ROUTERS
    from sim.arrivals import ARRIVAL_DESCRIPTIONS
    from sim.cli_common import DEFAULT_COST_MODELS
    from sim.lengths import SPEC_HELP
    from sim.traces import FORMATS

    lines = ["policies (NAME or NAME:key=value,...; append +noprefix to turn prefix sharing off for that run):",
             describe_policies(), "", "arrival processes (--arrival):"]
    lines += [f"  {name:<12} {desc}" for name, desc in ARRIVAL_DESCRIPTIONS.items()]
    lines += ["", "trace formats (--trace-format; detected when omitted):"]
    lines += [f"  {name:<12} {desc}" for name, desc in FORMATS.items()]
    lines += ["", "routers (--router):"] + [f"  {name:<18} {desc}" for name, desc in ROUTERS.items()]
    lines += ["", "cost models (--cost NAME or a JSON file; default: the first of "
              f"{', '.join(DEFAULT_COST_MODELS)} that exists):", "  " + ", ".join(known_cost_models())]
    lines += ["", SPEC_HELP]
    return "\n".join(lines)


def build_parser(selected: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one subparser per available subcommand."""
    epilog = reference_text()
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=formatter, epilog=epilog,
        description="One continuous-batching LLM scheduler for real llama.cpp serving and SimPy simulation.\n"
                    "Run `tokenstep compare` with no flags for a quick static-vs-continuous comparison.")
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    sub = parser.add_subparsers(dest="_command", metavar="COMMAND")
    subparsers: dict[str, argparse.ArgumentParser] = {}
    # a command line naming a command parses with that command's parser alone: the others' modules (the
    # calibration lab, the server) are not imported
    only = selected in SUBCOMMANDS and _module_exists(SUBCOMMANDS[selected][0])
    for name, module in available_commands(selected, only).items():
        _, add_name, run_name = SUBCOMMANDS[name]
        p = sub.add_parser(name, help=_summary(module), description=module.__doc__, epilog=epilog,
                           formatter_class=formatter)
        getattr(module, add_name)(p)
        p.set_defaults(_run=getattr(module, run_name))
        subparsers[name] = p
    return parser, subparsers


class _VersionAction(argparse.Action):
    """--version, looked up only when asked for (importlib.metadata is slow to import)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{PROG} {_version()}")
        parser.exit()


def _version() -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version("tokenstep")
    except Exception:
        return "(not installed)"


def _selected(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


# commands whose simulations run on --executor (a local process pool by default)
STUDY_COMMANDS = frozenset({"compare", "sweep", "capacity"})


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _start_pool_early(argv: list[str]) -> None:
    """For a study command on a local pool, start the pool's server before parsing and imports (it then
    loads the simulator on another core meanwhile). A --config file may name the executor: then the command
    starts its pool itself, as does any command line this reading does not cover."""
    if _selected(argv) not in STUDY_COMMANDS or "--config" in argv or any(a in ("-h", "--help") for a in argv):
        return
    if _flag_value(argv, "--backend") == "llama":
        return
    from sim.executor import start_early

    start_early(_flag_value(argv, "--executor"))


def _parse(argv: list[str]) -> argparse.Namespace | int:
    parser, subparsers = build_parser(_selected(argv))
    args = parser.parse_args(argv)
    command = getattr(args, "_command", None)
    if command is None:
        parser.print_help(sys.stderr)
        return 2
    config = getattr(args, "config", None)
    if config:
        from sim.config_file import apply_config

        fixup = apply_config(subparsers[command], command, config, SUBCOMMANDS)
        args = parser.parse_args(argv)
        fixup(args)
    args._argv = list(argv)
    return args


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tokenstep` console script; returns the exit status.

    Called as the program (argv None, no other thread left), it ends the process itself once the command is
    done and its output flushed, after the exit handlers: the interpreter would otherwise free a large
    run's objects one by one (a tenth of a second or more) before the system reclaims the memory at once.
    """
    status = _main(argv)
    if argv is None and threading.current_thread() is threading.main_thread() and threading.active_count() == 1:
        _exit_now(status)
    return status


def _exit_now(status: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken stream: let the interpreter's own exit deal with it
        return
    atexit._run_exitfuncs()
    os._exit(status)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds as Ctrl-C does, so a study stops its workers instead of leaving them running;
        # tokenstep serve installs its own graceful handler once it listens
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        _start_pool_early(argv)
        args = _parse(argv)
        if isinstance(args, int):
            return args
        return int(args._run(args) or 0)
    except SystemExit as exc:  # argparse: --help (0) and bad flags (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): stop quietly, as on SIGPIPE
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # TraceError, CostModelError, ModelError are ValueErrors
        if os.environ.get("TOKENSTEP_DEBUG") == "1":
            traceback.print_exc()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        package = missing_package(exc)
        if package:  # an install problem, not a bug
            print(f"{PROG}: error: the package {package!r} is not installed in this Python ({sys.executable}); "
                  "install tokenstep with its dependencies: pip install -e . (from the repository; add [llama] "
                  "for the real backend)", file=sys.stderr)
            return 2
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
