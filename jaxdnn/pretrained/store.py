"""Shipped files: weights (Flax msgpack) and their cards, one schema and one loader for every
kind (flows, the plausibility classifier, the conditional-mean regressor).

A card is the JSON file `<name>.json` beside its weights:

    {"kind": "flow" | "classifier" | "conditional_mean",
     "weights": {"<file>.msgpack": "<sha256>", ...},        # every weights file it describes
     "split": "trained on training images 0..54999; ...",  # what data made and chose it
     "command": "python -m experiments....",               # the command that made the weights
     "metrics": {"<name>": {"value": <number>, "command": "python -m experiments...."}, ...},
     ...}                                                  # kind-specific details (model, config, history)

Every metric names the command that measures it, so a number on a card can be rerun.
`read_card` checks a card against this schema; `read_weights` reads weights against a template
and their card, with errors that name the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import serialization

from jaxdnn.files import atomic_write_bytes

__all__ = ["KINDS", "SHIPPED_DIR", "Card", "Metric", "read_card", "read_weights", "shipped_card", "write"]

SHIPPED_DIR = Path(str(resources.files("jaxdnn.pretrained")))
KINDS = ("flow", "classifier", "conditional_mean")
_COMMON = ("kind", "weights", "split", "command", "metrics")


@dataclasses.dataclass(frozen=True)
class Metric:
    """One number on a card and the command that measures it."""

    value: float
    command: str


@dataclasses.dataclass(frozen=True)
class Card:
    """A shipped file's card: `kind` (one of `KINDS`), `weights` (file name -> sha256), `split`,
    `command` (what made the weights), `metrics` (name -> `Metric`) and `details` (the rest of
    the JSON: the model, its config, training history; kind-specific)."""

    kind: str
    weights: dict[str, str]
    split: str
    command: str
    metrics: dict[str, Metric]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, where: str = "card") -> Card:
        """The card of this JSON object; ValueError naming `where` and the first bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a card is a JSON object, got {type(data).__name__}")
        missing = [k for k in _COMMON if k not in data]
        if missing:
            raise ValueError(f"{where}: not a card of this version (missing {', '.join(missing)})")
        if data["kind"] not in KINDS:
            raise ValueError(f"{where}: kind must be one of {KINDS}, got {data['kind']!r}")
        weights = data["weights"]
        if not (isinstance(weights, dict) and weights and all(
                isinstance(k, str) and k.endswith(".msgpack") and isinstance(v, str) and len(v) == 64
                for k, v in weights.items())):
            raise ValueError(f"{where}: weights must map each .msgpack file to its sha256")
        for key in ("split", "command"):
            if not (isinstance(data[key], str) and data[key]):
                raise ValueError(f"{where}: {key} must be a non-empty string")
        metrics = {}
        for name, m in data["metrics"].items():
            if not (isinstance(m, dict) and set(m) == {"value", "command"} and isinstance(m["command"], str)
                    and isinstance(m["value"], (int, float)) and not isinstance(m["value"], bool)):
                raise ValueError(f"{where}: metric {name!r} must be {{\"value\": number, \"command\": str}}")
            metrics[name] = Metric(float(m["value"]), m["command"])
        details = {k: v for k, v in data.items() if k not in _COMMON}
        return cls(data["kind"], dict(weights), data["split"], data["command"], metrics, details)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "weights": self.weights, "split": self.split, "command": self.command,
                "metrics": {k: dataclasses.asdict(m) for k, m in self.metrics.items()}, **self.details}

    def sha256_of(self, path: Path) -> str | None:
        """The sha256 this card gives for weights file `path` (by name; the only one for a
        one-file card, whatever the file is called), or None if it names none."""
        if path.name in self.weights:
            return self.weights[path.name]
        return next(iter(self.weights.values())) if len(self.weights) == 1 else None


def read_card(path: str | os.PathLike) -> Card:
    """The card at `path` (JSON), checked against the schema; ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such card")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}: not a card (not JSON)") from None
    return Card.from_dict(data, str(path))


def shipped_card(name: str) -> Card:
    """The card of shipped file `name` (`SHIPPED_DIR/<name>.json`)."""
    return read_card(SHIPPED_DIR / f"{name}.json")


def read_weights(path: str | os.PathLike, template: Any | Callable[[dict], Any], card: Card | None = None, *,
                 identify: Callable[[dict], str | None] | None = None, expected: str = "") -> Any:
    """The parameters in weights file `path` (float32 jax arrays in `template`'s structure).

    template: a pytree of arrays or `jax.ShapeDtypeStruct`s, or a function of the raw state dict
    returning one (for files whose shapes say which network they are). card: checked against
    the file's sha256. identify(raw) -> the name of what the weights are (e.g. "glow"), used in
    the error when they do not fit `template`, which is `expected` (e.g. "realnvp").
    ValueError naming the file: not a weights file (truncated or corrupt), weights of another
    model than the card's, or weights other than the card's (sha256)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    data = path.read_bytes()
    try:
        raw = serialization.msgpack_restore(data)
    except Exception:  # msgpack raises several types for truncated or foreign bytes
        raw = None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: not a weights file (truncated or corrupt)")
    try:
        target = template(raw) if callable(template) else template
        params = serialization.from_state_dict(target, raw)
        fits = (jax.tree.structure(params) == jax.tree.structure(target)
                and all(a.shape == b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(target),
                                                           strict=True)))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        fits = False
    if not fits:
        found = identify(raw) if identify is not None else None
        if found is not None and found != expected:
            raise ValueError(f"{path} holds {found} weights but its card says {expected}")
        raise ValueError(f"{path}: weights of other shapes than {expected or 'expected'}")
    if card is not None:
        want = card.sha256_of(path)
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise ValueError(f"{path}: its card is the card of other weights (sha256 differs): copy the "
                             ".msgpack and its .json together")
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def write(directory: str | os.PathLike, name: str, files: dict[str, bytes], card: dict) -> Path:
    """Writes weights `files` (name -> bytes) and the card `<name>.json` into `directory` (temp
    names, then renamed), the card's "weights" set to the files' sha256; returns the card's path.
    The card is checked against the schema before anything is written."""
    directory = Path(directory)
    card = {**card, "weights": {f: hashlib.sha256(b).hexdigest() for f, b in files.items()}}
    Card.from_dict(card, f"{name}.json")
    for f, b in files.items():
        atomic_write_bytes(directory / f, b)
    return atomic_write_bytes(directory / f"{name}.json", json.dumps(card, indent=2).encode())
