"""Token-length models for synthetic workloads, parsed from specs like "lognormal:200,1.0".

Every model samples int64 lengths >= 1 from a numpy Generator. Where a model
could produce 0 (lognormal values below 0.5 round to 0), those draws are
redrawn, i.e. the model is conditioned on length >= 1; its describe() states
the redrawn probability, and a model that would redraw most draws is rejected
with ValueError. Nothing is clamped.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from sim.arrivals import check_positive
from sim.data import data_path

SPEC_HELP = (
    "length specs: N | fixed:N | uniform:LO,HI (inclusive) | lognormal:MEDIAN,SIGMA | "
    "lognormal:mean=MEAN,sigma=SIGMA | zipf:A,MAX | empirical:PATH:COLUMN | sharegpt-prompt | sharegpt-output"
)


class LengthModel(Protocol):
    """Anything with a spec string and sample(rng, n) -> int64 array of lengths >= 1."""

    spec: str

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray: ...

    def describe(self) -> str: ...


def _pos_int(name: str, value) -> int:
    """Parse value as an int >= 1 or raise ValueError naming the parameter."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number; expected an integer >= 1") from None
    if not x.is_integer() or x < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    return int(x)


@dataclass(frozen=True, slots=True)
class Fixed:
    """Every length equals value."""

    value: int

    def __post_init__(self):
        _pos_int("value", self.value)

    @property
    def spec(self) -> str:
        """Spec string that parses back to this model."""
        return f"fixed:{self.value}"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n copies of value."""
        return np.full(n, int(self.value), dtype=np.int64)

    def describe(self) -> str:
        """Human-readable summary."""
        return f"fixed {self.value}"


@dataclass(frozen=True, slots=True)
class Uniform:
    """Integers uniform on [lo, hi], both inclusive."""

    lo: int
    hi: int

    def __post_init__(self):
        if _pos_int("lo", self.lo) > _pos_int("hi", self.hi):
            raise ValueError(f"uniform lo={self.lo} is greater than hi={self.hi}")

    @property
    def spec(self) -> str:
        """Spec string that parses back to this model."""
        return f"uniform:{self.lo},{self.hi}"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n integers uniform on [lo, hi]."""
        return rng.integers(int(self.lo), int(self.hi) + 1, size=n, dtype=np.int64)

    def describe(self) -> str:
        """Human-readable summary."""
        return f"uniform [{self.lo}, {self.hi}]"


@dataclass(frozen=True, slots=True)
class LogNormal:
    """exp(Normal(log(median), sigma)) rounded to the nearest int; draws that round to 0 are redrawn."""

    median: float
    sigma: float

    def __post_init__(self):
        check_positive("median", self.median)
        if not math.isfinite(self.sigma) or self.sigma < 0:
            raise ValueError(f"sigma={self.sigma!r} must be a finite number >= 0")
        if self.p_redraw > 0.5:
            raise ValueError(
                f"lognormal median={self.median}, sigma={self.sigma} puts {self.p_redraw:.0%} of draws "
                "below 0.5 tokens; raise the median or lower sigma"
            )

    @classmethod
    def from_mean(cls, mean: float, sigma: float) -> LogNormal:
        """Lognormal whose (unrounded) mean is mean: median = mean * exp(-sigma^2 / 2)."""
        return cls(check_positive("mean", mean) * math.exp(-sigma * sigma / 2), sigma)

    @property
    def p_redraw(self) -> float:
        """Probability that one draw rounds to 0 and is redrawn."""
        if self.sigma == 0:
            return 1.0 if self.median < 0.5 else 0.0
        z = (math.log(0.5) - math.log(self.median)) / self.sigma
        return 0.5 * math.erfc(-z / math.sqrt(2))

    @property
    def spec(self) -> str:
        """Spec string that parses back to this model."""
        return f"lognormal:{self.median!r},{self.sigma!r}"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n draws, each redrawn until it rounds to >= 1 (p_redraw <= 0.5, so this ends fast)."""
        out = np.rint(rng.lognormal(math.log(self.median), self.sigma, size=n)).astype(np.int64)
        bad = np.flatnonzero(out < 1)
        while bad.size:
            out[bad] = np.rint(rng.lognormal(math.log(self.median), self.sigma, size=bad.size))
            bad = bad[out[bad] < 1]
        return out

    def describe(self) -> str:
        """Human-readable summary."""
        return f"lognormal median {self.median:g} sigma {self.sigma:g} (P(<0.5)={self.p_redraw:.2g} redrawn)"


@dataclass(frozen=True, slots=True)
class Zipf:
    """Truncated Zipf on 1..max: P(k) proportional to k^-a (exact; no mass beyond max)."""

    a: float
    max: int

    def __post_init__(self):
        check_positive("a", self.a)
        _pos_int("max", self.max)

    @property
    def spec(self) -> str:
        """Spec string that parses back to this model."""
        return f"zipf:{self.a!r},{self.max}"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n draws by inverse CDF over the finite support."""
        weights = np.arange(1, int(self.max) + 1, dtype=np.float64) ** -float(self.a)
        cdf = np.cumsum(weights)
        idx = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
        return np.minimum(idx, int(self.max) - 1).astype(np.int64) + 1  # guards u*cdf[-1] == cdf[-1] in floats

    def describe(self) -> str:
        """Human-readable summary."""
        return f"zipf a={self.a:g} on 1..{self.max}"


@dataclass(frozen=True, slots=True, eq=False)
class Empirical:
    """Lengths drawn uniformly with replacement from a column of a CSV file."""

    spec: str
    source: str
    values: np.ndarray = field(repr=False)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n values picked with replacement."""
        return self.values[rng.integers(0, self.values.size, size=n)]

    def describe(self) -> str:
        """Human-readable summary."""
        return f"empirical {self.source} ({self.values.size} values, mean {self.values.mean():.0f})"


def empirical(path: str | Path, column: str, spec: str | None = None) -> Empirical:
    """Load an empirical model from a CSV column; a value < 1 or not an integer raises ValueError naming the line."""
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read length file {path}: {exc.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or column not in reader.fieldnames:
            raise ValueError(f"{path} line 1: no column {column!r}; columns are {reader.fieldnames}")
        values = []
        for row in reader:
            raw = row[column]
            try:
                x = float(raw)
            except (TypeError, ValueError):
                x = math.nan
            if not x.is_integer() or x < 1:
                raise ValueError(
                    f"{path} line {reader.line_num}, field {column!r}: {raw!r} is not an integer >= 1"
                )
            values.append(int(x))
    if not values:
        raise ValueError(f"{path}: no rows under the header; an empirical length model needs values")
    shown = f"{spec} (bundled sample)" if spec else f"{path}:{column}"
    return Empirical(spec or f"empirical:{path}:{column}", shown, np.asarray(values, np.int64))


def _split_args(args: str, names: tuple[str, ...], kind: str) -> dict[str, str]:
    """Map 'v1,v2' or 'k=v,k=v' onto names, raising ValueError on a wrong count or unknown key."""
    out: dict[str, str] = {}
    parts = [p.strip() for p in args.split(",")] if args else []
    for i, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
        elif i < len(names):
            out[names[i]] = part
        else:
            raise ValueError(f"too many values in {kind} spec {args!r}; {SPEC_HELP}")
    return out


def _parse_lognormal(args: str) -> LogNormal:
    """lognormal:MEDIAN,SIGMA or lognormal:mean=M,sigma=S."""
    kv = _split_args(args, ("median", "sigma"), "lognormal")
    unknown = set(kv) - {"median", "mean", "sigma"}
    if unknown or "sigma" not in kv or ("median" in kv) == ("mean" in kv):
        raise ValueError(f"lognormal needs sigma and exactly one of median, mean; got {args!r}; {SPEC_HELP}")
    try:
        sigma = float(kv["sigma"])
    except ValueError:
        raise ValueError(f"sigma={kv['sigma']!r} is not a number; expected a float >= 0") from None
    if "mean" in kv:
        return LogNormal.from_mean(float(kv["mean"]), sigma)
    return LogNormal(check_positive("median", kv["median"]), sigma)


def _parse_fixed(args: str) -> Fixed:
    """fixed:N."""
    return Fixed(_pos_int("fixed", args))


def _parse_uniform(args: str) -> Uniform:
    """uniform:LO,HI."""
    kv = _split_args(args, ("lo", "hi"), "uniform")
    if set(kv) != {"lo", "hi"}:
        raise ValueError(f"uniform needs lo and hi; got {args!r}; {SPEC_HELP}")
    return Uniform(_pos_int("lo", kv["lo"]), _pos_int("hi", kv["hi"]))


def _parse_zipf(args: str) -> Zipf:
    """zipf:A,MAX."""
    kv = _split_args(args, ("a", "max"), "zipf")
    if set(kv) != {"a", "max"}:
        raise ValueError(f"zipf needs a and max; got {args!r}; {SPEC_HELP}")
    return Zipf(check_positive("a", kv["a"]), _pos_int("max", kv["max"]))


def _parse_empirical(args: str) -> Empirical:
    """empirical:PATH:COLUMN (the path may itself contain ':')."""
    path, sep, column = args.rpartition(":")
    if not sep or not path or not column:
        raise ValueError(f"empirical needs PATH:COLUMN; got {args!r}; {SPEC_HELP}")
    return empirical(path, column)


LENGTHS = {
    "fixed": _parse_fixed,
    "uniform": _parse_uniform,
    "lognormal": _parse_lognormal,
    "zipf": _parse_zipf,
    "empirical": _parse_empirical,
}

# bundled sample of ShareGPT lengths (llama2 tokenizer), see sim/data/ATTRIBUTION.md
SHORTCUTS = {
    "sharegpt-prompt": ("sharegpt_lengths_sample.csv", "num_prefill_tokens"),
    "sharegpt-output": ("sharegpt_lengths_sample.csv", "num_decode_tokens"),
}


def parse_length_spec(spec: str) -> LengthModel:
    """Parse a spec string (see SPEC_HELP) into a length model, raising ValueError with the accepted forms."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"length spec {spec!r} is empty; {SPEC_HELP}")
    spec = spec.strip()
    if spec in SHORTCUTS:
        name, column = SHORTCUTS[spec]
        return empirical(data_path(name), column, spec=spec)
    kind, sep, args = spec.partition(":")
    if not sep and kind.isdigit():
        return Fixed(_pos_int("fixed", kind))
    parser = LENGTHS.get(kind)
    if parser is None:
        raise ValueError(f"unknown length model {kind!r} in {spec!r}; {SPEC_HELP}")
    return parser(args)


def as_length_model(value) -> LengthModel:
    """Accept an int (fixed), a spec string or a length model; anything else raises ValueError."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return Fixed(_pos_int("length", value))
    if isinstance(value, str):
        return parse_length_spec(value)
    if hasattr(value, "sample") and hasattr(value, "spec"):
        return value
    raise ValueError(f"cannot use {value!r} as a length model; {SPEC_HELP}")
