"""The pieces of flow training: the optimizer, one jitted pure step, data-parallel over a mesh of
every device of every process, and the test-set evaluation. The run around them (checkpoints,
logs, stops) is `jaxdnn.trainer.train_and_evaluate`."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdnn.data.preprocess import bits_per_dim, dequantize
from jaxdnn.distributed import gather


class TrainState(NamedTuple):
    step: jax.Array  # () int32
    params: Any
    opt_state: Any  # optax.ApplyIfFiniteState: also counts the skipped (non-finite) updates


def run_keys(seed: int) -> dict[str, jax.Array]:
    """The named keys of a training run from its seed: "init", "data" (batch order), "step"
    (dequantization noise) and "eval" (the test-set evaluation, also used to score shipped models)."""
    return dict(zip(("init", "data", "step", "eval"), jax.random.split(jax.random.key(seed), 4), strict=True))


def make_optimizer(lr: float, steps: int, warmup: int, clip: float) -> optax.GradientTransformation:
    """Adam with linear warmup then cosine decay to lr/10 at `steps`, after global-norm clipping;
    an update with a non-finite gradient is never applied (`optax.apply_if_finite`: parameters and
    moments stay, the skip is counted; the training loop stops a run after a long streak)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1),
                                                  end_value=lr / 10)
    inner = optax.chain(optax.clip_by_global_norm(clip), optax.adam(schedule))
    return optax.apply_if_finite(inner, max_consecutive_errors=2**31 - 1)


def skipped_updates(state: TrainState) -> tuple[int, int]:
    """(updates skipped in all, skipped in a row now) of a state built by `make_optimizer`."""
    return int(state.opt_state.total_notfinite), int(state.opt_state.notfinite_count)


def data_mesh() -> Mesh:
    """A 1-D mesh named "data" over every device of every process (one device: the same code)."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicate(tree, mesh: Mesh):
    """Every leaf (the same host value on every process) as an array replicated over the mesh."""
    sharding = NamedSharding(mesh, PartitionSpec())
    put = lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx])
    return jax.tree.map(put, jax.device_get(tree))


def shard_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """The global batch (B, ...), the same on every process, as one array split over the mesh's
    "data" axis: each process hands over only the rows its own devices hold."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    rows = [idx[0] for idx in sharding.addressable_devices_indices_map(batch.shape).values()]
    lo, hi = min(r.start or 0 for r in rows), max(len(batch) if r.stop is None else r.stop for r in rows)
    return jax.make_array_from_process_local_data(sharding, batch[lo:hi], batch.shape)


def init_state(model, key: jax.Array, init_batch: np.ndarray, optimizer) -> TrainState:
    """Initializes parameters with a data-dependent pass on `init_batch` (uint8 (B, 28, 28))."""
    k_deq, k_init = jax.random.split(key)
    x = dequantize(k_deq, init_batch)
    params = jax.jit(model.init)(k_init, x)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def make_train_step(model, optimizer) -> Callable:
    """(state, batch uint8 (B, 28, 28), key) -> (state, metrics): one Adam step on mean bits/dim
    of the batch dequantized with fold_in(key, step); metrics "bpd", "grad_norm", "ok"."""

    def loss_fn(params, x):
        bpd = bits_per_dim(model.apply(params, x, method=model.log_prob))
        return bpd.mean()

    def step(state: TrainState, batch: jax.Array, key: jax.Array):
        x = dequantize(jax.random.fold_in(key, state.step), batch)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
        return new, {"bpd": loss, "grad_norm": grad_norm, "ok": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}

    return jax.jit(step, donate_argnums=0)


@functools.cache
def make_eval_fn(model) -> Callable:
    """(params, batch uint8 (B, 28, 28), key) -> bits/dim per image (B,); one jitted function per
    model configuration (equal modules share it, so its compilations)."""

    def evaluate(params, batch, key):
        x = dequantize(key, batch)
        return bits_per_dim(model.apply(params, x, method=model.log_prob))

    return jax.jit(evaluate)


def evaluate_bpd(model, params, images: np.ndarray, key: jax.Array, batch_size: int = 500,
                 mesh: Mesh | None = None) -> np.ndarray:
    """Bits/dim of every image (N,) on every process, batch by batch with per-batch keys (a
    ragged tail is padded); the same numbers for any number of devices or processes."""
    eval_fn, out = make_eval_fn(model), []
    n_dev = 1 if mesh is None else mesh.size
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        pad = (-len(chunk)) % n_dev
        padded = np.concatenate([chunk, chunk[:pad]]) if pad else chunk
        batch = padded if mesh is None else shard_batch(padded, mesh)
        out.append(gather(eval_fn(params, batch, jax.random.fold_in(key, i)))[: len(chunk)])
    return np.concatenate(out)


def score(model, params, images: np.ndarray, key: jax.Array, mesh: Mesh | None = None) -> dict:
    """The flow's bits/dim on `images` (uint8 (N, 28, 28)), dequantized with `key`, as every card,
    final metric and shipped-model check reports it: {"bpd": mean, "bpd_stderr", "images": N,
    "per_image": (N,)}."""
    bpds = evaluate_bpd(model, params, images, key, mesh=mesh)
    mean, stderr = mean_and_stderr(bpds)
    return {"bpd": mean, "bpd_stderr": stderr, "images": len(bpds), "per_image": bpds}


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (float64, ddof=1) of host values (N,)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))
