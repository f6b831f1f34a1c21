"""`--cost NAME:param=value,...`: a named or file cost model with some scalar parameters changed.

The result goes through the kind's own from_dict, so an override is checked like a profile file's field
(h200-llama3-8b:mfu=1.5 is refused: mfu is a fraction of peak). Only scalar parameters can be overridden;
lists and tables (a calibrated profile's knots) are edited in a copy of the file instead.
"""

from __future__ import annotations

from collections.abc import Callable

from backends.cost.base import CostModelError


def parse_overrides(spec: str) -> tuple[str, dict[str, str]]:
    """'NAME:a=1,b=x' -> ('NAME', {'a': '1', 'b': 'x'}); bad items raise CostModelError naming them."""
    base, _, rest = spec.rpartition(":")  # the last colon: a file path may hold colons, parameters never do
    if not base or not rest:
        raise CostModelError(f"--cost {spec!r}: write NAME:param=value,... e.g. h200-llama3-8b:mfu=0.7")
    out: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise CostModelError(f"--cost {spec!r}: {item!r} must look like param=value, e.g. mfu=0.7")
        out[key.strip()] = value.strip()
    return base, out


def _value(text: str, current: object, where: str) -> object:
    if isinstance(current, bool) or not isinstance(current, (int, float, str)):
        raise CostModelError(f"{where}: only scalar parameters can be overridden; edit a copy of the profile "
                             "file for lists and tables (`tokenstep cost show NAME --json > my.json`)")
    if isinstance(current, str):
        return text
    try:
        number = float(text)
    except ValueError:
        raise CostModelError(f"{where}: {text!r} is not a number") from None
    return int(number) if isinstance(current, int) and number == int(number) else number


def load_with_overrides(spec: str, load: Callable[[str], object]):
    """The model `load(base)` names, with the spec's parameters replaced, checked by its kind's from_dict."""
    from backends.cost import COST_MODELS

    base, items = parse_overrides(spec)
    model = load(base)
    data = model.to_dict()  # type: ignore[attr-defined]
    params = dict(data["params"])
    for key, text in items.items():
        where = f"--cost {spec!r}, parameter {key!r}"
        if key not in params:
            raise CostModelError(f"{where}: {data['kind']} models have no such parameter; they have "
                                 f"{', '.join(sorted(params))}")
        params[key] = _value(text, params[key], where)
    meta = {**data.get("meta", {}), "overrides": items, "base": base}
    return COST_MODELS[data["kind"]].from_dict(params, meta, spec, f"--cost {spec!r}")
