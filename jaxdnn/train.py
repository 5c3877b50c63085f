"""The pieces of flow training: the optimizer, one jitted pure step, data-parallel over a mesh of
every device of every process, and the test-set evaluation. The run around them (checkpoints,
logs, stops) is `jaxdnn.trainer.train_and_evaluate`."""

from __future__ import annotations

import functools
import math
import warnings
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
    step: jax.Array  # () int32, the run's global step (a run continued from an export carries it on)
    params: Any
    opt_state: Any  # optax.ApplyIfFiniteState: also counts the skipped (non-finite) updates
    ema_params: Any  # Polyak (exponential moving) average of params: what is evaluated and exported


def run_keys(seed: int) -> dict[str, jax.Array]:
    """The named keys of a training run from its seed: "init", "data" (batch order), "step"
    (dequantization noise) and "eval" (the test-set evaluation, also used to score shipped models)."""
    return dict(zip(("init", "data", "step", "eval"), jax.random.split(jax.random.key(seed), 4), strict=True))


def capped_warmup(warmup: int, steps: int, start_step: int = 0) -> int:
    """`warmup`, or a tenth of the run (at least 1 step) with a warning when the warm-up would
    last as long as the run's `steps - start_step` updates or longer (the learning rate would
    never reach its peak: e.g. `--config.steps=100` under the default 300-step warm-up)."""
    run = steps - start_step
    if run < 1 or warmup < run:
        return warmup
    capped = max(1, run // 10)
    warnings.warn(f"warmup {warmup} is not shorter than this run's {run} steps (steps {steps}, from step "
                  f"{start_step}): the learning rate would never reach its peak; warm-up capped to {capped} "
                  f"steps (set --config.warmup to choose)", stacklevel=3)
    return capped


def learning_rate(lr: float, steps: int, warmup: int, start_step: int = 0) -> optax.Schedule:
    """The learning rate at optimizer count c (0 when an optimizer starts): a cosine from `lr` at
    global step 0 to lr/10 at global step `steps`, read at global step `start_step + c`, times a
    linear warm-up over this optimizer's first `warmup` counts (a run continued from an export
    starts a fresh Adam at its step: a short warm-up, the schedule carried on). A warm-up as long
    as the run or longer is capped to a tenth of it, with a warning (`capped_warmup`)."""
    warmup = capped_warmup(warmup, steps, start_step)
    cosine = optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.1)
    return lambda count: cosine(count + start_step) * jnp.minimum(1.0, count / max(warmup, 1))


def make_optimizer(lr: float, steps: int, warmup: int, clip: float, start_step: int = 0
                   ) -> optax.GradientTransformation:
    """Adam on the `learning_rate` schedule, after global-norm clipping; an update with a
    non-finite gradient is never applied (`optax.apply_if_finite`: parameters and moments stay,
    the skip is counted; the training loop stops a run after a long streak)."""
    inner = optax.chain(optax.clip_by_global_norm(clip), optax.adam(learning_rate(lr, steps, warmup, start_step)))
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


def init_state(model, key: jax.Array, init_batch: np.ndarray, optimizer, params=None, step: int = 0) -> TrainState:
    """A fresh state at global `step`: `params` if given (weights to continue from; a variational
    dequantizer they lack starts fresh, i.e. as uniform noise), else initialized with a
    data-dependent pass on `init_batch` (uint8 (B, 28, 28)); a fresh optimizer."""
    if params is None or (model.dequantization == "variational" and "dequantizer" not in params["params"]):
        k_deq, k_init = jax.random.split(key)
        fresh = jax.jit(model.init)(k_init, dequantize(k_deq, init_batch))
        params = fresh if params is None else {"params": {**fresh["params"], **params["params"]}}
    params = jax.tree.map(jnp.asarray, params)
    return TrainState(jnp.asarray(step, jnp.int32), params, optimizer.init(params), jax.tree.map(jnp.copy, params))


def ema_decay(decay: float, count: jax.Array) -> jax.Array:
    """The averaging weight after `count` updates: min(decay, (1 + count) / (10 + count)), so the
    average forgets its starting point quickly and then settles at `decay` (0: no averaging)."""
    return jnp.minimum(decay, (1.0 + count) / (10.0 + count))


def make_train_step(model, optimizer, ema: float = 0.0) -> Callable:
    """(state, batch uint8 (B, 28, 28), key) -> (state, metrics): one Adam step on mean bits/dim
    of the batch dequantized with fold_in(key, step) (`model.pixel_log_prob`), and the Polyak average of the parameters
    with decay `ema` (`ema_decay`); metrics "bpd", "grad_norm", "ok", "lr"."""

    def loss_fn(params, batch, key):
        return bits_per_dim(model.apply(params, batch, key, method=model.pixel_log_prob)).mean()

    def step(state: TrainState, batch: jax.Array, key: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, jax.random.fold_in(key, state.step))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = params
        if ema > 0:
            count = opt_state.inner_state[1][0].count  # this optimizer's updates (Adam's count)
            ema_params = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay(ema, count))
        new = TrainState(state.step + 1, params, opt_state, ema_params)
        return new, {"bpd": loss, "grad_norm": grad_norm, "ok": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}

    return jax.jit(step, donate_argnums=0)


@functools.cache
def make_eval_fn(model, samples: int = 1) -> Callable:
    """(params, batch uint8 (B, 28, 28), key) -> bits/dim per image (B,); one jitted function per
    model configuration and sample count (equal modules share it, so its compilations).

    With `samples` = K > 1, the importance-weighted bound of Burda et al. with K dequantizations
    u_k ~ q (uniform: q = 1, or the model's variational q; noise 0 from `key`, noise k from
    fold_in(key, k)): log P(pixels) >= log (1/K) sum_k p((pixels + u_k)/256) / (q(u_k) 256^784),
    so K = 1 is the usual bound and the bound tightens (in expectation) as K grows."""

    def log_prob(params, batch, key):
        return model.apply(params, batch, key, method=model.pixel_log_prob)

    def evaluate(params, batch, key):
        if samples == 1:
            return bits_per_dim(log_prob(params, batch, key))
        others = jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(1, samples))
        keys = jnp.concatenate([key[None], others])  # one batched pass over the K noises
        logs = jax.vmap(lambda k: log_prob(params, batch, k))(keys)  # (K, B)
        return bits_per_dim(jax.nn.logsumexp(logs, axis=0) - math.log(samples))

    return jax.jit(evaluate)


def evaluate_bpd(model, params, images: np.ndarray, key: jax.Array, batch_size: int = 500,
                 mesh: Mesh | None = None, samples: int = 1) -> np.ndarray:
    """Bits/dim of every image (N,) on every process (`make_eval_fn`, `samples` dequantizations
    each), batch by batch with per-batch keys; a ragged batch is padded by repeating its images up
    to a multiple of the device count (any N >= 1, any device count); the same numbers for any
    number of devices or processes."""
    eval_fn, out = make_eval_fn(model, samples), []
    n_dev = 1 if mesh is None else mesh.size
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        pad = (-len(chunk)) % n_dev
        padded = np.concatenate([chunk, np.resize(chunk, (pad, *chunk.shape[1:]))]) if pad else chunk
        batch = padded if mesh is None else shard_batch(padded, mesh)
        out.append(gather(eval_fn(params, batch, jax.random.fold_in(key, i)))[: len(chunk)])
    return np.concatenate(out)


def score(model, params, images: np.ndarray, key: jax.Array, mesh: Mesh | None = None, samples: int = 1) -> dict:
    """The flow's bits/dim on `images` (uint8 (N, 28, 28)), dequantized with `key` (`samples`
    importance samples each: `make_eval_fn`), as every card, final metric and shipped-model check
    reports it: {"bpd": mean, "bpd_stderr", "images": N, "samples", "per_image": (N,)}."""
    bpds = evaluate_bpd(model, params, images, key, mesh=mesh, samples=samples)
    mean, stderr = mean_and_stderr(bpds)
    return {"bpd": mean, "bpd_stderr": stderr, "images": len(bpds), "samples": samples, "per_image": bpds}


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (float64, ddof=1) of host values (N,); the error is nan for N = 1."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))
