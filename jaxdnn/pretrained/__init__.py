"""The one home of shipped files: flows, the plausibility classifier and the conditional-mean
regressor, each weights plus a card of one schema (`store.Card`: sha256 of the weights, data
split, the command that made them, each metric with the command that measures it), read by one
loader (`store.read_weights`).

Flows: `load(source) -> (model, params)`, `card(source)` and `load_distribution(source)` (the
same flow as a jitted `distrax.Distribution` over images). A source is one of
- a shipped name ("nice", "realnvp", "glow"): `<name>.msgpack` and its card `<name>.json` here;
- an exported weights file `path/to/<name>.msgpack` with its card `path/to/<name>.json` beside it
  (what `python -m experiments.train_flow --export` writes, by default into the run's workdir);
- a training workdir (it holds config.json): its latest checkpoint's averaged weights.
A card copied without its weights (or the reverse) is refused: its sha256 differs.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import serialization

from jaxdnn import workdir
from jaxdnn.files import sha256
from jaxdnn.flows import build_model
from jaxdnn.flows.distribution import FlowDistribution
from jaxdnn.pretrained.store import SHIPPED_DIR, Card, read_card, read_weights, write

FLOW_MODELS = ("nice", "realnvp", "glow")


def available() -> list[str]:
    """Names of the shipped flows."""
    return sorted(n for n in FLOW_MODELS if (SHIPPED_DIR / f"{n}.json").is_file())


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
    if workdir.is_workdir(path):
        return "workdir", path
    raise ValueError(f"{text!r} is neither a shipped model ({', '.join(available())}), an exported "
                     f"weights file (<name>.msgpack with its .json card) nor a training workdir (with config.json)")


def short_name(source: str | os.PathLike) -> str:
    """A name for files and titles: the shipped name, the weights file's stem or the workdir's name."""
    kind, path = _kind(source)
    return path.name if kind == "workdir" else path.stem


def flow_card(info: dict, weights_name: str, weights_sha256: str, source: str | None = None) -> dict:
    """A flow's card in the shared schema from what `experiments.train_flow --export` gathers (the
    run's config, "training_command", "split", "val_bpd", "test_bpd", ...; also the cards of
    exports written before this schema): metrics move under "metrics", each with its command
    (`evaluate_flow --model SOURCE`; `source` defaults to the model's shipped name)."""
    if "kind" in info:
        return info
    info = dict(info)
    name = info["model"]
    evaluate = f"python -m experiments.evaluate_flow --model {source or name}"
    commands = {"val_bpd": f"{evaluate} --split validation", "val_bpd_stderr": f"{evaluate} --split validation",
                "test_bpd": evaluate, "test_bpd_stderr": evaluate, "test_bpd_first256": f"{evaluate} --limit 256"}
    metrics = {k: {"value": info.pop(k), "command": c} for k, c in commands.items() if k in info}
    info.pop("weights_sha256", None)
    if isinstance(info.get("weights"), str):  # which weights: "Polyak average (ema)" or "last step"
        info["averaging"] = info.pop("weights")
    return {"kind": "flow", "weights": {weights_name: weights_sha256},
            "split": info.pop("split", "trained on MNIST training images 0..54999"),
            "command": info.pop("training_command", "") or "python -m experiments.train_flow --model " + name,
            "metrics": metrics, **info}


def _card_view(card: Card) -> dict:
    """A flow card as `card()` returns it: the JSON, and each metric's value also at the top level
    (card["test_bpd"])."""
    return {**card.to_dict(), **{k: m.value for k, m in card.metrics.items()}}


def _file_card(path: Path) -> Card:
    """The card beside weights file `path` (a card of the shared schema, or one exported before it
    with its weights' sha256, read as the shared schema), checked to be the card of these weights."""
    beside = path.with_suffix(".json")
    try:
        info = json.loads(beside.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{beside}: not a card (not JSON)") from None
    if isinstance(info, dict) and "kind" not in info and "model_config" in info:  # exported before the schema
        info = flow_card(info, path.name, info.get("weights_sha256") or sha256(path))
    card = Card.from_dict(info, str(beside)) if "kind" in info else read_card(beside)
    if card.kind != "flow":
        raise ValueError(f"{beside}: the card of a {card.kind}, not of a flow")
    want = card.sha256_of(path)
    if want is not None and sha256(path) != want:  # say what is wrong: corrupt, another model, or other weights
        model = build_model(card.details["model"], **card.details["model_config"])
        read_weights(path, _template(model), card, identify=_identify, expected=card.details["model"])
        raise ValueError(f"{path}: its card is the card of other weights (sha256 differs): copy the "
                         ".msgpack and its .json together")
    return card


def card(source: str | os.PathLike) -> dict:
    """The card of `source`; for a workdir, its config with "steps" of its latest checkpoint."""
    kind, path = _kind(source)
    if kind != "workdir":
        return _card_view(_file_card(path))
    steps = workdir.checkpoint_steps(path)
    if not steps:
        raise ValueError(f"training workdir {path} has no checkpoint yet")
    return {**workdir.read_config(path), "steps": steps[-1]}  # read, no backend touched


def _restore_workdir(path: Path):
    from jaxdnn import train

    config = workdir.read_config(path)
    cfg = config["train_config"]
    optimizer = train.make_optimizer(cfg["lr"], cfg["steps"], cfg["warmup"], cfg["clip"], config["init_step"])
    resumed = workdir.restore_latest(config, path, optimizer, train.data_mesh())
    if resumed is None:
        raise ValueError(f"training workdir {path} has no checkpoint yet")
    return resumed[0]


@functools.cache
def _load(kind: str, path: Path):
    if kind == "workdir":
        info = workdir.read_config(path)
        model = build_model(info["model"], **info["model_config"])
        return model, jax.device_get(_restore_workdir(path).ema_params)
    info = _file_card(path)
    model = build_model(info.details["model"], **info.details["model_config"])
    params = read_weights(path, _template(model), info, identify=_identify, expected=info.details["model"])
    return model, params


def _template(model):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def _identify(raw: dict) -> str | None:
    """Which shipped flow's architecture these raw weights have (by their shapes), or None."""
    for name in available():
        shipped = read_card(SHIPPED_DIR / f"{name}.json").details
        template = _template(build_model(name, **shipped["model_config"]))
        try:
            serialization.from_state_dict(template, raw)
            return name
        except (ValueError, KeyError, TypeError):
            continue
    return None


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
    """Writes `<name>.msgpack` and its card `<name>.json` (temp names, then renamed) into
    `directory` (`SHIPPED_DIR` ships them with the package: maintainers only); `info` as
    `flow_card` takes it, the card gains the weights' sha256."""
    blob = serialization.to_bytes(jax.device_get(params))
    shipped = Path(directory).resolve() == SHIPPED_DIR.resolve()
    card = flow_card(info, f"{name}.msgpack", "0" * 64, None if shipped else str(Path(directory) / f"{name}.msgpack"))
    write(directory, name, {f"{name}.msgpack": blob}, card)
    return Path(directory) / f"{name}.msgpack"
