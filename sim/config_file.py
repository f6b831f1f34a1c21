"""TOML config files for the CLI: keys are long flag names, flags on the command line win.

A file holds top-level keys for every command, and optionally one table per
command (``[sweep]``, ``[capacity]``, ...) whose keys apply to that command only
and override the top-level ones. Keys are the long flag names with dashes or
underscores (``max-num-seqs`` or ``max_num_seqs``). Values: strings or numbers
for valued flags (a list is joined with commas, so ``rates = [1, 2, 4]`` is
``--rates 1,2,4``), true/false for switches such as ``no-plots``, and a string
or list of strings for repeatable flags such as ``param``. A key that no flag of
the command takes is an error naming the key and the file.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_NOT_KEYS = {"help", "config"}


def load_toml(path: str | Path) -> dict:
    """Parse a TOML file, raising ValueError naming the file if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist or is not a file")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ValueError("TOML config files need Python 3.11+ (or `pip install tomli` on 3.10)") from None
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ValueError(f"config file {path} cannot be read: {exc.strerror or exc}") from None


def _actions_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option name without dashes ("max-num-seqs") -> its action, for every option of the parser."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse keeps no public list of actions
        for option in action.option_strings:
            if option.startswith("--") and option[2:] not in _NOT_KEYS:
                out[option[2:]] = action
    return out


def _scalar_text(value: Any, key: str, path: Path) -> str:
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise ValueError(f"config file {path}: key {key!r} must be a string or a number, got {value!r}")
    return str(value)


def _convert(action: argparse.Action, value: Any, key: str, path: Path) -> Any:
    """Value for one action as the command line would have produced it."""
    if action.nargs == 0:  # a switch: store_true, store_false, store_const
        if not isinstance(value, bool):
            raise ValueError(f"config file {path}: key {key!r} is a switch; write {key} = true or false")
        return action.const if value else action.default
    if isinstance(value, list):
        text = ",".join(_scalar_text(v, key, path) for v in value)
    else:
        text = _scalar_text(value, key, path)
    try:
        converted = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ValueError(f"config file {path}: key {key!r}: bad value {value!r} ({exc})") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ValueError(f"config file {path}: key {key!r}: {value!r} is not one of {choices}")
    return converted


def _entries(data: dict, command: str, commands: Iterable[str], path: Path) -> dict[str, Any]:
    """Top-level keys, then the command's own table on top; other command tables are skipped."""
    commands = set(commands)
    merged: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in commands:
                raise ValueError(
                    f"config file {path}: unknown table [{key}]; tables must be command names "
                    f"({', '.join(sorted(commands))})"
                )
            continue
        merged[key] = value
    table = data.get(command)
    if isinstance(table, dict):
        for key, value in table.items():
            if isinstance(value, dict):
                raise ValueError(f"config file {path}: [{command}] key {key!r} is a table; flags take plain values")
            merged[key] = value
    return merged


def apply_config(parser: argparse.ArgumentParser, command: str, path: str | Path,
                 commands: Iterable[str] = ()) -> Callable[[argparse.Namespace], None]:
    """Set the file's values as the parser's defaults; return a fix-up to call on the parsed args.

    Defaults lose to flags given on the command line. Repeatable (append) flags
    would add to the file's list instead, so the returned fix-up drops the
    file's items wherever the command line gave its own.
    """
    path = Path(path)
    data = load_toml(path)
    actions = _actions_by_key(parser)
    defaults: dict[str, Any] = {}
    appended: dict[str, int] = {}
    for raw_key, value in _entries(data, command, commands, path).items():
        key = str(raw_key).replace("_", "-")
        action = actions.get(key)
        if action is None:
            raise ValueError(
                f"config file {path}: unknown key {raw_key!r}; `tokenstep {command}` has no flag --{key} "
                f"(see tokenstep {command} --help)"
            )
        if isinstance(action, argparse._AppendAction):
            items = value if isinstance(value, list) else [value]
            defaults[action.dest] = [_convert_item(action, v, raw_key, path) for v in items]
            appended[action.dest] = len(items)
        else:
            defaults[action.dest] = _convert(action, value, raw_key, path)
    parser.set_defaults(**defaults)

    def fixup(args: argparse.Namespace) -> None:
        for dest, n in appended.items():
            values = getattr(args, dest, None)
            if isinstance(values, list) and len(values) > n:
                setattr(args, dest, values[n:])

    return fixup


def _convert_item(action: argparse.Action, value: Any, key: str, path: Path) -> Any:
    text = _scalar_text(value, key, path)
    try:
        return action.type(text) if callable(action.type) else text
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ValueError(f"config file {path}: key {key!r}: bad value {value!r} ({exc})") from None
