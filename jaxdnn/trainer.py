"""A flow's training run, the way the Flax examples do it: `train_and_evaluate(config, workdir)`.

One code path for one process or many (`jaxdnn.distributed`): every process runs the same loop
on its slice of each global batch; process 0 alone writes logs and results; stops (SIGTERM,
`stop_after`) and time-based checkpoints are agreed across processes, so none is left waiting in
a collective. Checkpoints are orbax's (`CheckpointManager`: atomic, the last two kept, restored
onto the current mesh). The data order and keys are functions of the step number, so a resumed
run is bit-identical to one that never stopped (same process and device count).

Workdir: config.json, history.jsonl (one row per stage), metrics.jsonl, checkpoints/<step>/,
init_card.json (with "init_from": the shipped card it started from), final.json once `steps` are done.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from jaxdnn import train
from jaxdnn.data import batches, load_mnist
from jaxdnn.distributed import from_every_process, is_main
from jaxdnn.flows import build_model

SYNC_EVERY = 10  # steps between agreements on stopping and checkpointing (more than one process)


def checkpoint_manager(workdir: str | Path) -> ocp.CheckpointManager:
    """The workdir's orbax checkpoints: items "state" (a `train.TrainState`) and "extra" (JSON)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options,
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


def _agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag true on any process (a collective: every process calls it at the same step)."""
    seen = from_every_process(np.asarray(flags, np.int32))
    return tuple(bool(v) for v in seen.any(axis=0))


def _check_workdir(workdir: Path, config: dict) -> None:
    path = workdir / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old["model"] != config["model"] or old["model_config"] != config["model_config"]:
            raise ValueError(f"{workdir} holds a run of another model/config; use a new workdir")


def _append_stage(path: Path, command: str, start: int, steps: int) -> None:
    """This invocation in the workdir's history (a run extended with a larger `steps` starts a
    new stage; its cosine schedule continues from the resumed step)."""
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.exists() else []
    rows = [r for r in rows if r["from_step"] <= start]
    if not rows or rows[-1]["steps"] != steps:  # otherwise a plain resume of the last stage
        rows.append({"command": command, "from_step": start, "steps": steps})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def setup(config: dict, workdir: str | Path, train_images: np.ndarray | None = None):
    """(model, optimizer, state on the mesh, extra, mesh) of the run in `workdir`: resumed from
    its latest checkpoint; else, given `train_images`, initialized (from `config["init_from"]`'s
    shipped weights if set); else None for the state and extra (nothing to resume)."""
    cfg = config["train_config"]
    model = build_model(config["model"], **config["model_config"])
    optimizer = train.make_optimizer(cfg["lr"], cfg["steps"], cfg["warmup"], cfg["clip"])
    mesh = train.data_mesh()
    if cfg["batch_size"] % mesh.size:
        raise ValueError(f"batch_size {cfg['batch_size']} must be a multiple of the {mesh.size} devices")
    init_key = train.run_keys(cfg["seed"])["init"]
    with checkpoint_manager(workdir) as manager:
        if manager.latest_step() is not None:  # the checkpoint's shapes, with no data-dependent init
            abstract = jax.eval_shape(lambda: train.init_state(model, init_key, np.zeros((1, 28, 28), np.uint8),
                                                               optimizer))
            replicated = NamedSharding(mesh, PartitionSpec())
            target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
            return model, optimizer, *restore(manager, target), mesh
    if train_images is None:
        return model, optimizer, None, None, mesh
    init_batch = train_images[np.random.default_rng(cfg["seed"]).permutation(len(train_images))[:512]]
    state = train.init_state(model, init_key, init_batch, optimizer)
    if config.get("init_from"):
        from jaxdnn import pretrained

        state = state._replace(params=pretrained.load(config["init_from"])[1])
    return model, optimizer, train.replicate(state, mesh), {"wall_seconds": 0.0}, mesh


def train_and_evaluate(config: dict, workdir: str | Path, *, stop_after: int | None = None,
                       progress: bool = True, command: str = "") -> dict[str, Any] | None:
    """Trains (or resumes) the run `config` = {"model", "model_config", "train_config",
    "init_from"?} in `workdir` and returns its final metrics (test bits/dim over the 10,000 test
    images), or None when it stopped early (SIGTERM, `stop_after` steps of this call): rerun to
    resume. Raises ValueError for a workdir of another run, FileNotFoundError without MNIST."""
    workdir = Path(workdir)
    cfg = config["train_config"]
    _check_workdir(workdir, config)
    train_images, test_images = load_mnist("train")[0], load_mnist("test")[0]
    model, optimizer, state, extra, mesh = setup(config, workdir, train_images)
    keys = train.run_keys(cfg["seed"])
    start, wall = int(state.step), extra["wall_seconds"]
    log_path = workdir / "metrics.jsonl"
    if is_main():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config, indent=2))
        kept = log_path.read_text().splitlines() if start and log_path.exists() else []
        log_path.write_text("".join(ln + "\n" for ln in kept if json.loads(ln)["step"] <= start))
        _append_stage(workdir / "history.jsonl", command, start, cfg["steps"])
        if config.get("init_from") and not start:  # what the run starts from, for its card
            from jaxdnn import pretrained

            (workdir / "init_card.json").write_text(json.dumps(pretrained.card(config["init_from"]), indent=2))
        print(f"{config['model']}: {sum(x.size for x in jax.tree.leaves(state.params)):,} parameters, "
              f"{'resumed at step ' + str(start) if start else 'from step 0'}, {jax.process_count()} "
              f"process(es), {mesh.size} x {jax.devices()[0].platform}", file=sys.stderr)
    step_fn = train.make_train_step(model, optimizer)
    manager = checkpoint_manager(workdir)
    terminated = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: terminated.update(now=True))
    every = 1 if jax.process_count() == 1 else SYNC_EVERY
    last_ckpt = t_last = time.time()
    running = []
    bar = tqdm(total=cfg["steps"], initial=start, disable=not (progress and is_main()), dynamic_ncols=True,
               desc=config["model"])
    for step, batch in batches(keys["data"], train_images, cfg["batch_size"], start_step=start):
        if step >= cfg["steps"]:
            break
        if step % every == 0:
            due = time.time() - last_ckpt > 60 * cfg["checkpoint_minutes"]
            stop, due = _agree(terminated["now"] or (stop_after is not None and step - start >= stop_after), due)
            if stop:
                break
            if due:
                save(manager, state, {"wall_seconds": wall + time.time() - t_last})
                last_ckpt = time.time()
        state, metrics = step_fn(state, train.shard_batch(batch, mesh), keys["step"])
        done = step + 1
        bar.update(1)
        if done % cfg["log_every"] and done != cfg["steps"]:
            continue
        running.append(float(metrics["bpd"]))
        now = time.time()
        wall, t_last = wall + now - t_last, now
        skipped, streak = train.skipped_updates(state)
        row = {"step": done, "train_bpd": float(np.mean(running[-10:])), "grad_norm": float(metrics["grad_norm"]),
               "skipped": skipped, "wall_seconds": round(wall, 1)}
        if done % cfg["eval_every"] == 0:
            row["test_bpd"] = float(train.evaluate_bpd(model, state.params, test_images[: cfg["eval_images"]],
                                                       keys["eval"], mesh=mesh).mean())
        if is_main():
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        test = {"test": f"{row['test_bpd']:.3f}"} if "test_bpd" in row else {}
        bar.set_postfix(bpd=f"{row['train_bpd']:.3f}", **test)
        if streak > cfg["max_bad_streak"]:
            save(manager, state, {"wall_seconds": wall})
            raise FloatingPointError(f"{streak} consecutive non-finite updates at step {done}; lower lr or raise clip")
    bar.close()
    wall += time.time() - t_last
    save(manager, state, {"wall_seconds": wall})
    manager.close()
    if int(state.step) < cfg["steps"]:
        if is_main():
            print(f"stopped at step {int(state.step)}; rerun the same command to resume", file=sys.stderr)
        return None
    test = train.score(model, state.params, test_images, keys["eval"], mesh=mesh)
    final = {**config, "steps": int(state.step), "wall_seconds": round(wall, 1), "test_bpd": test["bpd"],
             "test_bpd_stderr": test["bpd_stderr"], "skipped_updates": train.skipped_updates(state)[0],
             "devices": f"{mesh.size} x {jax.devices()[0].device_kind}", "processes": jax.process_count()}
    if is_main():
        (workdir / "final.json").write_text(json.dumps(final, indent=2))
    return final
