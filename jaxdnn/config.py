"""Typed configurations: a config is a dict checked against a schema of typed, documented
defaults, so a typo, a wrong type or a value a model does not know fails with one clear line
instead of training something else. Used by `jaxdnn.flows.build_model` (the schema is each
model's own dataclass fields) and the training command line."""

from __future__ import annotations

import difflib
from typing import Any, NamedTuple

__all__ = ["Field", "check_config"]


class Field(NamedTuple):
    """A config key: its type (int, float, str or bool), default, and allowed values (None: any)."""

    type: type
    default: Any
    choices: tuple | None = None


def _typed(kind: str, key: str, field: Field, value):
    want = field.type
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if not ok:
        raise ValueError(f"{kind} key {key!r} must be {want.__name__}, got {value!r} ({type(value).__name__})")
    if field.choices is not None and value not in field.choices:
        raise ValueError(f"{kind} key {key!r} must be one of {', '.join(map(repr, field.choices))}; got {value!r}")
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
