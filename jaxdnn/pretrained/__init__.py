"""Pretrained flows shipped inside the package, no network: `load(name) -> (model, params)` and
`load_distribution(name)`, the same flow as a jitted `distrax.Distribution` over images.

Each model has `<name>.msgpack` (Flax-serialized parameters) and `<name>.json` (its card:
config, the exact training command, steps, wall time, hardware, test-set bits/dim).
Weights are produced by `python -m experiments.train_flow` and exported with `export`.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import serialization

from jaxdnn.files import atomic_write_bytes
from jaxdnn.flows import build_model
from jaxdnn.flows.distribution import FlowDistribution

_HERE = resources.files(__name__)


def available() -> list[str]:
    """Names of the shipped models."""
    return sorted(p.name[: -len(".json")] for p in _HERE.iterdir() if p.name.endswith(".json"))


def card(name: str) -> dict:
    """The JSON card of a shipped model."""
    path = _HERE / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no pretrained model {name!r}; shipped: {available()}")
    return json.loads(path.read_text())


@functools.cache
def load(name: str):
    """(model, params) of the shipped model `name` ("nice" | "realnvp" | "glow"), read once per
    process (the arrays are immutable)."""
    info = card(name)
    model = build_model(info["model"], **info["model_config"])
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    blob = (_HERE / f"{name}.msgpack").read_bytes()
    params = serialization.from_bytes(template, blob)
    return model, jax.tree.map(jnp.asarray, params)


def load_distribution(name: str) -> FlowDistribution:
    """The shipped model `name` as a `distrax.Distribution` over images (event shape (28, 28, 1),
    values in [0, 1]): `log_prob`, `sample(seed=..., sample_shape=...)`, `sample_and_log_prob`,
    and `.bijector`, the flow as a `distrax.Bijector` from packed latents to images."""
    return FlowDistribution(*load(name))


def test_bpd(name: str, limit: int | None = None, key=None) -> dict:
    """Bits/dim of the shipped model `name` on the first `limit` MNIST test images (all 10,000 by
    default), uniformly dequantized with `key` (default: the training run's "eval" key, the one
    its card was scored with), on every device of every process: {"model", "bpd", "bpd_stderr",
    "images"}."""
    from jaxdnn import train
    from jaxdnn.data import load_mnist

    model, params = load(name)
    images = load_mnist("test")[0][:limit]
    key = train.run_keys(card(name)["train_config"].get("seed", 0))["eval"] if key is None else key
    mesh = train.data_mesh()
    result = train.score(model, train.replicate(params, mesh), images, key, mesh=mesh)
    return {"model": name, **{k: result[k] for k in ("bpd", "bpd_stderr", "images")}}


def export(params, info: dict, name: str, directory: str | os.PathLike | None = None) -> Path:
    """Writes `<name>.msgpack` and `<name>.json` (temp names, then renamed) into `directory`
    (default: this package's folder)."""
    directory = Path(directory) if directory is not None else Path(str(_HERE))
    blob = serialization.to_bytes(jax.device_get(params))
    for suffix, data in ((".msgpack", blob), (".json", json.dumps(info, indent=2).encode())):
        atomic_write_bytes(directory / f"{name}{suffix}", data)
    return directory / f"{name}.msgpack"
