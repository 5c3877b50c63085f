"""Flows to load, no network: `load(source) -> (model, params)`, `card(source)` and
`load_distribution(source)` (the same flow as a jitted `distrax.Distribution` over images).

A source is one of
- a shipped name ("nice", "realnvp", "glow"): `<name>.msgpack` (Flax-serialized parameters) and
  `<name>.json` (its card) inside this package;
- an exported weights file `path/to/<name>.msgpack` with its card `path/to/<name>.json` beside it
  (what `python -m experiments.train_flow --export` writes, by default into the run's workdir);
- a training workdir (it holds config.json): its latest checkpoint's averaged weights.
Cards carry the config, every training stage's command, steps, epochs, wall time and hardware,
and the validation and test bits/dim; an exported card also the sha256 of its weights file
("weights_sha256"), so that a card copied without its weights (or the reverse) is refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import serialization

from jaxdnn.files import atomic_write_bytes, sha256
from jaxdnn.flows import build_model
from jaxdnn.flows.distribution import FlowDistribution

SHIPPED_DIR = Path(str(resources.files(__name__)))


def available() -> list[str]:
    """Names of the shipped models."""
    return sorted(p.name[: -len(".json")] for p in SHIPPED_DIR.iterdir() if p.name.endswith(".json"))


def _kind(source: str | os.PathLike) -> tuple[str, Path]:
    """("shipped" | "file" | "workdir", path) of a source; ValueError naming what was looked for."""
    text = str(source)
    if text in available():
        return "shipped", SHIPPED_DIR / f"{text}.msgpack"
    path = Path(text).expanduser()
    if path.suffix == ".msgpack" and path.is_file():
        if not path.with_suffix(".json").is_file():
            raise ValueError(f"{path} has no card {path.with_suffix('.json').name} beside it")
        return "file", path
    if path.is_dir() and (path / "config.json").is_file():
        return "workdir", path
    raise ValueError(f"{text!r} is neither a shipped model ({', '.join(available())}), an exported "
                     f"weights file (<name>.msgpack with its .json card) nor a training workdir (with config.json)")


def short_name(source: str | os.PathLike) -> str:
    """A name for files and titles: the shipped name, the weights file's stem or the workdir's name."""
    kind, path = _kind(source)
    return path.name if kind == "workdir" else path.stem


def _file_card(path: Path) -> dict:
    """The card beside weights file `path`, checked to belong to it where it names its weights' sha256."""
    info = json.loads(path.with_suffix(".json").read_text())
    expected = info.get("weights_sha256")
    if expected is not None and sha256(path) != expected:
        raise ValueError(f"{path.with_suffix('.json')} is the card of other weights than {path} (their sha256 "
                         "differs from its weights_sha256): copy the .msgpack and its .json together")
    return info


def card(source: str | os.PathLike) -> dict:
    """The card of `source`; for a workdir, its config with "steps" of its latest checkpoint."""
    kind, path = _kind(source)
    if kind != "workdir":
        return _file_card(path)
    steps = [int(p.name) for p in (path / "checkpoints").glob("*") if p.name.isdigit()]
    if not steps:
        raise ValueError(f"training workdir {path} has no checkpoint yet")
    return {**json.loads((path / "config.json").read_text()), "steps": max(steps)}  # read, no backend touched


def _restore_workdir(path: Path):
    from jaxdnn import trainer

    state = trainer.setup(json.loads((path / "config.json").read_text()), path)[2]
    if state is None:
        raise ValueError(f"training workdir {path} has no checkpoint yet")
    return state


@functools.cache
def _load(kind: str, path: Path):
    if kind == "workdir":
        info = json.loads((path / "config.json").read_text())
        model = build_model(info["model"], **info["model_config"])
        return model, jax.device_get(_restore_workdir(path).ema_params)
    info = _file_card(path)
    model = build_model(info["model"], **info["model_config"])
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    params = serialization.from_bytes(template, path.read_bytes())
    return model, jax.tree.map(jnp.asarray, params)


def load(source: str | os.PathLike):
    """(model, params) of `source` (a shipped name, an exported .msgpack, or a workdir), read once
    per process (the arrays are immutable)."""
    kind, path = _kind(source)
    return _load(kind, path.absolute())


def load_distribution(source: str | os.PathLike, temperature: float = 1.0) -> FlowDistribution:
    """`source` as a `distrax.Distribution` over images (event shape (28, 28, 1)) at `temperature`:
    `log_prob`, `sample(seed=..., sample_shape=...)`, `sample_and_log_prob`, and `.bijector`, the
    flow as a `distrax.Bijector` from packed latents to images (`FlowDistribution`)."""
    return FlowDistribution(*load(source), temperature=temperature)


def score_split(source: str | os.PathLike, split: str = "test", limit: int | None = None, key=None,
                samples: int = 1) -> dict:
    """Bits/dim of `source` on the first `limit` images of MNIST `split` ("test", "validation";
    all by default), uniformly dequantized with `key` (default: the training run's "eval" key, the
    one its card was scored with), `samples` = K importance samples each (K = 1: the usual bound;
    `train.make_eval_fn`), on every device of every process: {"model", "split", "bpd",
    "bpd_stderr", "images", "samples"}."""
    from jaxdnn import train
    from jaxdnn.data import load_mnist

    model, params = load(source)
    images = load_mnist(split)[0][:limit]
    key = train.run_keys(card(source)["train_config"].get("seed", 0))["eval"] if key is None else key
    mesh = train.data_mesh()
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    result = train.score(model, train.replicate(params, mesh), images, key, mesh=mesh, samples=samples)
    return {"model": str(source), "split": split,
            **{k: result[k] for k in ("bpd", "bpd_stderr", "images", "samples")}}


def test_bpd(source: str | os.PathLike, limit: int | None = None, key=None, samples: int = 1) -> dict:
    """`score_split(source, "test", limit, key, samples)`: the number a card reports."""
    return score_split(source, "test", limit, key, samples)


def export(params, info: dict, name: str, directory: str | os.PathLike) -> Path:
    """Writes `<name>.msgpack` and `<name>.json` (temp names, then renamed) into `directory`
    (`SHIPPED_DIR` ships them with the package: maintainers only); the card `info` gains the
    weights' sha256 ("weights_sha256")."""
    directory = Path(directory)
    blob = serialization.to_bytes(jax.device_get(params))
    info = {**info, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    for suffix, data in ((".msgpack", blob), (".json", json.dumps(info, indent=2).encode())):
        atomic_write_bytes(directory / f"{name}{suffix}", data)
    return directory / f"{name}.msgpack"
