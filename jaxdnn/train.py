"""Generic flow training: one jitted pure step, data-parallel over every device, atomic
checkpoints with exact resume (data order and keys are functions of the step number)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdnn.data.preprocess import bits_per_dim, dequantize


class TrainState(NamedTuple):
    step: jax.Array  # () int32
    params: Any
    opt_state: Any
    skipped: jax.Array  # () int32, updates skipped for a non-finite loss or gradient
    bad_streak: jax.Array  # () int32, consecutive skipped updates


def run_keys(seed: int) -> dict[str, jax.Array]:
    """The named keys of a training run from its seed: "init", "data" (batch order), "step"
    (dequantization noise) and "eval" (the test-set evaluation, also used to score shipped models)."""
    return dict(zip(("init", "data", "step", "eval"), jax.random.split(jax.random.key(seed), 4), strict=True))


def make_optimizer(lr: float, steps: int, warmup: int, clip: float) -> optax.GradientTransformation:
    """Adam with linear warmup then cosine decay to lr/10 at `steps`, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1),
                                                  end_value=lr / 10)
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(schedule))


def data_mesh() -> Mesh:
    """A 1-D mesh named "data" over every visible device (one device is the same code path)."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """Splits the leading (batch) axis over the mesh's "data" axis."""
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))


def init_state(model, key: jax.Array, init_batch: np.ndarray, optimizer) -> TrainState:
    """Initializes parameters with a data-dependent pass on `init_batch` (uint8 (B, 28, 28))."""
    k_deq, k_init = jax.random.split(key)
    x = dequantize(k_deq, init_batch)
    params = jax.jit(model.init)(k_init, x)
    zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the step donates its state
    return TrainState(zero(), params, optimizer.init(params), zero(), zero())


def make_train_step(model, optimizer) -> Callable:
    """(state, batch uint8 (B, 28, 28), key) -> (state, metrics): one Adam step on mean bits/dim
    of the dequantized batch; a non-finite loss or gradient leaves the parameters unchanged."""

    def loss_fn(params, x):
        bpd = bits_per_dim(model.apply(params, x, method=model.log_prob))
        return bpd.mean()

    def step(state: TrainState, batch: jax.Array, key: jax.Array):
        x = dequantize(jax.random.fold_in(key, state.step), batch)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            skipped=state.skipped + (~ok).astype(jnp.int32),
            bad_streak=jnp.where(ok, 0, state.bad_streak + 1),
        )
        return new, {"bpd": loss, "grad_norm": grad_norm, "ok": ok}

    return jax.jit(step, donate_argnums=0)


def make_eval_fn(model) -> Callable:
    """(params, batch uint8 (B, 28, 28), key) -> bits/dim per image (B,)."""

    def evaluate(params, batch, key):
        x = dequantize(key, batch)
        return bits_per_dim(model.apply(params, x, method=model.log_prob))

    return jax.jit(evaluate)


def evaluate_bpd(eval_fn, params, images: np.ndarray, key: jax.Array, batch_size: int = 500,
                 mesh: Mesh | None = None) -> np.ndarray:
    """Bits/dim of every image (N,), batch by batch with per-batch keys (a ragged tail is padded)."""
    out = []
    n_dev = 1 if mesh is None else mesh.size
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        pad = (-len(chunk)) % n_dev
        padded = np.concatenate([chunk, chunk[:pad]]) if pad else chunk
        batch = padded if mesh is None else shard_batch(padded, mesh)
        out.append(np.asarray(eval_fn(params, batch, jax.random.fold_in(key, i)))[: len(chunk)])
    return np.concatenate(out)


def save_checkpoint(path: str | os.PathLike, state: TrainState, extra: dict | None = None) -> None:
    """Writes the state (msgpack) to a temp name and renames it: never half-written."""
    path = Path(path)
    blob = serialization.to_bytes({"state": jax.device_get(state)._asdict(), "extra": extra or {}})
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, template: TrainState) -> tuple[TrainState, dict]:
    """Restores a state saved by `save_checkpoint` into the structure of `template`."""
    with open(path, "rb") as f:
        raw = serialization.msgpack_restore(f.read())
    state = serialization.from_state_dict(template._asdict(), raw["state"])
    return TrainState(**state), raw.get("extra", {})


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))
