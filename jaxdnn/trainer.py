"""A flow's training run, the way the Flax examples do it: `train_and_evaluate(config, workdir)`.

One code path for one process or many (`jaxdnn.distributed`): every process runs the same loop
on its slice of each global batch; process 0 alone writes logs and results; stops (SIGTERM,
`stop_after`) and time-based checkpoints are agreed across processes, so none is left waiting in
a collective. Checkpoints are orbax's (`CheckpointManager`: atomic, the last two kept, restored
onto the current mesh). The data order and keys are functions of the step number, so a resumed
run is bit-identical to one that never stopped (same process and device count).

The run trains on the training split (images 0..54999), evaluates the Polyak-averaged weights
on the validation split (55000..59999) and never reads a test image: `export` (the CLI's
--export) scores the test set once, for the card.

The workdir's layout (config.json, history.jsonl, metrics.jsonl, checkpoints/, init_card.json,
final.json) is `jaxdnn.workdir`'s.
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
from tqdm import tqdm

from jaxdnn import pretrained, train
from jaxdnn.config import Field, check_config
from jaxdnn.data import batches, load_mnist
from jaxdnn.distributed import from_every_process, is_main
from jaxdnn.flows import build_model
from jaxdnn.workdir import CONFIG, FINAL, HISTORY, INIT_CARD, METRICS, checkpoint_manager, restore_latest, save

SYNC_EVERY = 10  # steps between agreements on stopping and checkpointing (more than one process)


def _agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag true on any process (a collective: every process calls it at the same step)."""
    seen = from_every_process(np.asarray(flags, np.int32))
    return tuple(bool(v) for v in seen.any(axis=0))


TRAIN_SCHEMA = {  # the training keys of a run's config: type, default, range (one home)
    "batch_size": Field(int, 64, low=1),
    "lr": Field(float, 1e-3, low=0.0, open_low=True),
    "steps": Field(int, 5000, low=0),  # the run's last global step; 0 (or the start's step): evaluate only
    "warmup": Field(int, 300, low=0),
    "clip": Field(float, 100.0, low=0.0, open_low=True),
    "seed": Field(int, 0, low=0),
    "ema": Field(float, 0.999, low=0.0, high=1.0, open_high=True),  # Polyak decay; 0: none
    "eval_every": Field(int, 1000, low=1),
    "eval_images": Field(int, 5000, low=1, high=5000),  # validation images of the periodic evaluation
    "log_every": Field(int, 50, low=1),
    "checkpoint_minutes": Field(float, 3.0, low=0.0, open_low=True),
    "max_bad_streak": Field(int, 100, low=1),
}
RUN_KEYS = ("model", "model_config", "train_config", "init_from", "init_step")
DEQUANTIZER_KEYS = ("dequantization", "dequantizer_hidden", "dequantizer_couplings")


def default_config(model: str, init_from: str | None = None, **overrides) -> dict:
    """A complete, checked run config {"model", "model_config", "train_config", "init_from",
    "init_step"}: the defaults updated by `overrides` (model and training keys in one namespace);
    with `init_from` (a shipped name, exported .msgpack or workdir: `jaxdnn.pretrained`) the
    model config is the source's (a variational dequantizer may join one trained with uniform
    noise: `DEQUANTIZER_KEYS`) and the run starts at the source's step. Raises ValueError
    (unknown key with its nearest name, type, range) in one line."""
    from jaxdnn.flows import config_schema

    model_schema = config_schema(model)
    init_step = 0
    if init_from is not None:
        try:
            info = pretrained.card(init_from)
        except ValueError as e:  # the source's own error (a missing, corrupt or mismatched file), under its flag
            raise ValueError(f"init_from: {e}") from None
        if info["model"] != model:
            raise ValueError(f"init_from {init_from} is a {info['model']}, not a {model}")
        source = {**{k: f.default for k, f in model_schema.items()}, **info["model_config"]}
        free = DEQUANTIZER_KEYS if source["dequantization"] == "uniform" else ()  # a dequantizer may join
        clash = sorted(k for k in overrides if k in source and k not in free and overrides[k] != source[k])
        if clash:
            raise ValueError(f"init_from {init_from} fixes the model config; drop {clash[0]}")
        overrides, init_step = {**info["model_config"], **overrides}, int(info["steps"])
    cfg = check_config(f"config ({model})", {**model_schema, **TRAIN_SCHEMA}, overrides)
    return {"model": model, "model_config": {k: v for k, v in cfg.items() if k in model_schema},
            "train_config": {k: v for k, v in cfg.items() if k not in model_schema},
            "init_from": None if init_from is None else str(init_from), "init_step": init_step}


def config_dict(model: str, **overrides):
    """`default_config(model, **overrides)` as one flat `ml_collections.ConfigDict` (model and
    training keys side by side, "model" naming the model): what `experiments/configs/*.py`'s
    `get_config()` returns and `--config.KEY=VALUE` overrides."""
    import ml_collections

    config = default_config(model, **overrides)
    return ml_collections.ConfigDict({"model": model, **config["model_config"], **config["train_config"]})


def check_run_config(config: dict) -> dict:
    """`config` completed and checked like `default_config` (a dict from Python or a config.json)."""
    unknown = sorted(set(config) - set(RUN_KEYS))
    if unknown or "model" not in config:
        raise ValueError(f"a run config has keys {', '.join(RUN_KEYS)} (model required); got {sorted(config)}")
    full = default_config(config["model"], **{**config.get("model_config", {}), **config.get("train_config", {})})
    return {**full, "init_from": config.get("init_from"), "init_step": int(config.get("init_step", 0))}


def _check_workdir(workdir: Path, config: dict) -> None:
    """A workdir resumes only the run it holds: any difference but a larger `steps` is an error
    naming the keys (old -> new)."""
    path = workdir / CONFIG
    if not path.exists():
        return
    old = check_run_config(json.loads(path.read_text()))
    flat = lambda c: {**{k: c[k] for k in ("model", "init_from", "init_step")}, **c["model_config"],
                      **{k: v for k, v in c["train_config"].items() if k != "steps"}}
    before, after = flat(old), flat(config)
    diff = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)]
    if config["train_config"]["steps"] < old["train_config"]["steps"]:
        diff.append(f"steps: {old['train_config']['steps']} -> {config['train_config']['steps']} (only a larger "
                    "steps extends a run)")
    if diff:
        advice = "use a new workdir, or the same config to resume"
        if old["init_from"] == config["init_from"] and old["init_step"] != config["init_step"]:
            advice = (f"{config['init_from']} has changed since this run started from it: continue from it as a "
                      "new stage in a new workdir")
        raise ValueError(f"{workdir} holds another run ({'; '.join(diff)}); {advice}")


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
    weights at its step if set); else None for the state and extra (nothing to resume)."""
    cfg = config["train_config"]
    model = build_model(config["model"], **config["model_config"])
    optimizer = train.make_optimizer(cfg["lr"], cfg["steps"], cfg["warmup"], cfg["clip"], config["init_step"])
    mesh = train.data_mesh()
    if cfg["batch_size"] % mesh.size:
        raise ValueError(f"batch_size {cfg['batch_size']} must be a multiple of the {mesh.size} devices")
    init_key = train.run_keys(cfg["seed"])["init"]
    resumed = restore_latest(config, workdir, optimizer, mesh)
    if resumed is not None:
        return model, optimizer, *resumed, mesh
    if train_images is None:
        return model, optimizer, None, None, mesh
    init_batch = train_images[np.random.default_rng(cfg["seed"]).permutation(len(train_images))[:512]]
    params = None
    if config.get("init_from"):
        params = pretrained.load(config["init_from"])[1]
    state = train.init_state(model, init_key, init_batch, optimizer, params, config["init_step"])
    return model, optimizer, train.replicate(state, mesh), {"wall_seconds": 0.0}, mesh


def train_and_evaluate(config: dict, workdir: str | Path, *, stop_after: int | None = None,
                       progress: bool = True, command: str = "") -> dict[str, Any] | None:
    """Trains (or resumes) the run `config` (`default_config`'s dict; checked here) in `workdir`
    on the training split and returns its final metrics (validation bits/dim of the averaged
    weights over the 5,000 validation images), or None when it stopped early (SIGTERM,
    `stop_after` steps of this call): rerun to resume. Reads no test image (`export` does, once).
    Raises ValueError for a bad config or a workdir of another run, FileNotFoundError without MNIST."""
    workdir = Path(workdir)
    config = check_run_config(config)
    cfg = config["train_config"]
    _check_workdir(workdir, config)
    train_images, val_images = load_mnist("train")[0], load_mnist("validation")[0]
    model, optimizer, state, extra, mesh = setup(config, workdir, train_images)
    keys = train.run_keys(cfg["seed"])
    start, wall = int(state.step), extra["wall_seconds"]
    log_path = workdir / METRICS
    if is_main():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / CONFIG).write_text(json.dumps(config, indent=2))
        fresh = not (workdir / HISTORY).exists()
        kept = [] if fresh or not log_path.exists() else log_path.read_text().splitlines()
        log_path.write_text("".join(ln + "\n" for ln in kept if json.loads(ln)["step"] <= start))
        _append_stage(workdir / HISTORY, command, start, cfg["steps"])
        if config.get("init_from") and fresh:  # what the run starts from, for its card
            (workdir / INIT_CARD).write_text(json.dumps(pretrained.card(config["init_from"]), indent=2))
        print(f"{config['model']}: {sum(x.size for x in jax.tree.leaves(state.params)):,} parameters, "
              f"{'at step ' + str(start) if start else 'from step 0'}, {jax.process_count()} "
              f"process(es), {mesh.size} x {jax.devices()[0].platform}", file=sys.stderr)
    writer = _tensorboard(workdir) if is_main() else None
    step_fn = train.make_train_step(model, optimizer, cfg["ema"])
    schedule = train.learning_rate(cfg["lr"], cfg["steps"], cfg["warmup"], config["init_step"])
    manager = checkpoint_manager(workdir)
    terminated = {"now": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: terminated.update(now=True))
    every = 1 if jax.process_count() == 1 else SYNC_EVERY
    last_ckpt = t_last = time.time()
    running, images_since = [], 0
    validation = val_images[: cfg["eval_images"]]
    bar = tqdm(total=cfg["steps"], initial=start, disable=not (progress and is_main()), dynamic_ncols=True,
               desc=config["model"])
    try:
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
            done, images_since = step + 1, images_since + cfg["batch_size"]
            bar.update(1)
            if done % cfg["log_every"] and done != cfg["steps"]:
                continue
            running.append(float(metrics["bpd"]))
            now = time.time()
            row = {"step": done, "epoch": round(done * cfg["batch_size"] / len(train_images), 3),
                   "train_bpd": float(np.mean(running[-10:])), "grad_norm": float(metrics["grad_norm"]),
                   "lr": float(schedule(done - config["init_step"])), "images_per_second":
                   round(images_since / max(now - t_last, 1e-9), 1), "skipped": train.skipped_updates(state)[0]}
            wall, t_last, images_since = wall + now - t_last, now, 0
            row["wall_seconds"] = round(wall, 1)
            evaluated = done % cfg["eval_every"] == 0 or done == cfg["steps"]
            if evaluated:  # every process takes part (the state spans them); process 0 writes
                row.update(_validate(model, state, validation, keys["eval"], mesh, cfg["ema"] > 0))
                grid = _sample_grid(model, state.ema_params, keys["eval"])
            if is_main():
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                _write_scalars(writer, row)
                if evaluated:
                    writer.add_image("samples/temperature_0.7", grid, done, dataformats="HW")
            t_last = time.time() if evaluated else t_last  # evaluation time is not training wall time
            shown = {"val": f"{row['val_bpd']:.3f}"} if "val_bpd" in row else {}
            bar.set_postfix(bpd=f"{row['train_bpd']:.3f}", **shown)
            streak = train.skipped_updates(state)[1]
            if streak > cfg["max_bad_streak"]:
                save(manager, state, {"wall_seconds": wall})
                raise FloatingPointError(f"{streak} consecutive non-finite updates at step {done}; "
                                         "lower lr or raise clip")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        bar.close()
        if writer is not None:
            writer.close()
    wall += time.time() - t_last
    save(manager, state, {"wall_seconds": wall})
    manager.close()
    if int(state.step) < cfg["steps"]:
        if is_main():
            print(f"stopped at step {int(state.step)}; rerun the same command to resume", file=sys.stderr)
        return None
    val = train.score(model, state.ema_params, val_images, keys["eval"], mesh=mesh)
    final = {**config, "steps": int(state.step), "epochs": round(int(state.step) * cfg["batch_size"] /
                                                                 len(train_images), 2),
             "wall_seconds": round(wall, 1), "val_bpd": val["bpd"], "val_bpd_stderr": val["bpd_stderr"],
             "skipped_updates": train.skipped_updates(state)[0],
             "devices": f"{mesh.size} x {jax.devices()[0].device_kind}", "processes": jax.process_count()}
    if is_main():
        (workdir / FINAL).write_text(json.dumps(final, indent=2))
    return final


def _tensorboard(workdir: Path):
    """A TensorBoard writer (tensorboardX, no TensorFlow) into WORKDIR/tensorboard:
    `tensorboard --logdir runs/` shows every run under runs/."""
    # tensorboardX imports torch where it is installed (to accept its tensors; ours are NumPy): ~2 s
    # of each training process. Unless torch is loaded already, tensorboardX is imported without it.
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]

    return SummaryWriter(logdir=str(workdir / "tensorboard"), flush_secs=30)


TENSORBOARD_TAGS = {"train_bpd": "train/bits_per_dim", "grad_norm": "train/grad_norm", "lr": "train/learning_rate",
                    "images_per_second": "train/images_per_second", "val_bpd": "validation/bits_per_dim",
                    "val_bpd_raw": "validation/bits_per_dim_raw_weights"}


def _write_scalars(writer, row: dict) -> None:
    for key, tag in TENSORBOARD_TAGS.items():
        if key in row:
            writer.add_scalar(tag, row[key], row["step"])


def _sample_grid(model, params, key, n: int = 16, temperature: float = 0.7) -> np.ndarray:
    """A (4 * 28, 4 * 28) grid of samples at `temperature`, clipped to [0, 1] for display."""
    x = np.asarray(jax.jit(lambda p, k: model.apply(p, k, n, temperature, method=model.sample))(params, key))
    side = int(np.sqrt(n))
    return np.clip(x[:, :, :, 0].reshape(side, side, 28, 28).transpose(0, 2, 1, 3).reshape(side * 28, -1), 0, 1)


def _validate(model, state: train.TrainState, images: np.ndarray, key, mesh, averaged: bool) -> dict:
    """Validation bits/dim of the weights evaluated and exported ("val_bpd": the average when
    `averaged`) and, beside it, of the raw weights ("val_bpd_raw")."""
    row = {"val_bpd": float(train.evaluate_bpd(model, state.ema_params, images, key, mesh=mesh).mean())}
    if averaged:
        row["val_bpd_raw"] = float(train.evaluate_bpd(model, state.params, images, key, mesh=mesh).mean())
    return row
