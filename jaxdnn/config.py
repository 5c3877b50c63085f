"""Typed configurations: a config is a dict checked against a schema of typed, documented
defaults, so a typo, a wrong type or a value a model does not know fails with one clear line
instead of training something else. Used by `jaxdnn.flows.build_model` (the schema is each
model's own dataclass fields) and the training command line."""

from __future__ import annotations

import difflib
import math
from typing import Any, NamedTuple

__all__ = ["Field", "check_config"]


class Field(NamedTuple):
    """A config key: its type (int, float, str or bool), default, allowed values (None: any) and
    range: `low` <= value <= `high` (None: unbounded; `open_low`/`open_high` make a bound strict).
    Floats must also be finite."""

    type: type
    default: Any
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def range_text(self) -> str:
        """The range as a reader writes it ("> 0", ">= 1", "in [0, 1)"), "" when unbounded."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low}"
        if self.high is not None:
            return f"{'<' if self.open_high else '<='} {self.high}"
        return ""

    def in_range(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        lo_ok = self.low is None or (value > self.low if self.open_low else value >= self.low)
        hi_ok = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return lo_ok and hi_ok


def _typed(kind: str, key: str, field: Field, value):
    want = field.type
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if not ok:
        raise ValueError(f"{kind} key {key!r} must be {want.__name__}, got {value!r} ({type(value).__name__})")
    if field.choices is not None and value not in field.choices:
        raise ValueError(f"{kind} key {key!r} must be one of {', '.join(map(repr, field.choices))}; got {value!r}")
    if want in (int, float) and not field.in_range(value):
        raise ValueError(f"{kind} key {key!r} must be {field.range_text() or 'finite'}, got {value!r}")
    return value


def check_config(kind: str, schema: dict[str, Field], overrides: dict) -> dict:
    """The defaults of `schema` updated by `overrides`, every value checked; raises ValueError
    naming the key, the allowed values, or the nearest known key for an unknown one."""
    for key in overrides:
        if key not in schema:
            near = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"unknown {kind} key {key!r}; {hint}known keys: {', '.join(sorted(schema))}")
    return {key: _typed(kind, key, f, overrides.get(key, f.default)) for key, f in schema.items()}
