"""A training run's folder: the one owner of its layout, used by the trainer (writes it),
`jaxdnn.pretrained` (reads a workdir as a source of weights) and the CLIs (export, plots).

    config.json       the run's config (model, model_config, train_config, init_from, init_step)
    history.jsonl     one row per stage: the command, the step it started from, its planned steps
    metrics.jsonl     one row per logged step (training loss; validation bits/dim every eval_every)
    checkpoints/      orbax checkpoints <step>/ (the last two): items "state" and "extra" (JSON)
    init_card.json    the card of the weights the run started from (with init_from)
    final.json        the final metrics, once the planned steps are done
    export/           `python -m experiments.train_flow --export` writes <model>.msgpack and its card
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from jaxdnn import train
from jaxdnn.flows import build_model

__all__ = ["CONFIG", "EXPORT", "FINAL", "HISTORY", "INIT_CARD", "METRICS", "checkpoint_manager", "checkpoint_steps",
           "is_workdir", "read_config", "restore", "restore_latest", "save"]

CONFIG, HISTORY, METRICS, CHECKPOINTS = "config.json", "history.jsonl", "metrics.jsonl", "checkpoints"
INIT_CARD, FINAL, EXPORT = "init_card.json", "final.json", "export"


def is_workdir(path: str | Path) -> bool:
    """Whether `path` is a training run's folder (it holds config.json)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file()


def read_config(workdir: str | Path) -> dict:
    """The run's config.json, as written (no backend touched)."""
    return json.loads((Path(workdir) / CONFIG).read_text())


def checkpoint_steps(workdir: str | Path) -> list[int]:
    """The steps of the run's checkpoints, ascending, read from the folder names (no orbax)."""
    folder = Path(workdir) / CHECKPOINTS
    return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit()) if folder.is_dir() else []


def checkpoint_manager(workdir: str | Path) -> ocp.CheckpointManager:
    """The workdir's orbax checkpoints: items "state" (a `train.TrainState`) and "extra" (JSON)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINTS, options=options,
                                 item_names=("state", "extra"))


def save(manager: ocp.CheckpointManager, state: train.TrainState, extra: dict) -> None:
    """Saves `state` at its step unless saved already (every process calls it; orbax writes
    once, atomically)."""
    if int(state.step) in manager.all_steps():
        return
    manager.save(int(state.step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          extra=ocp.args.JsonSave(extra)), force=True)


def restore(manager: ocp.CheckpointManager, target) -> tuple[train.TrainState, dict]:
    """The latest checkpoint, restored onto `target` (a `train.TrainState` of
    `jax.ShapeDtypeStruct`s with the shardings of the current mesh)."""
    out = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
    return train.TrainState(*out["state"]), dict(out["extra"])


def restore_latest(config: dict, workdir: str | Path, optimizer, mesh) -> tuple[train.TrainState, dict] | None:
    """(state replicated on `mesh`, extra) of the run's latest checkpoint, or None if it has none.
    The checkpoint's shapes come from an abstract init (no data-dependent init is run)."""
    with checkpoint_manager(workdir) as manager:
        if manager.latest_step() is None:
            return None
        model = build_model(config["model"], **config["model_config"])
        init_key = train.run_keys(config["train_config"]["seed"])["init"]
        abstract = jax.eval_shape(lambda: train.init_state(model, init_key, np.zeros((1, 28, 28), np.uint8),
                                                           optimizer))
        replicated = NamedSharding(mesh, PartitionSpec())
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
        return restore(manager, target)
