"""Adapting a constant q by simulation, for problems too large for the exact dynamic program:
cross-entropy updates, or Adam on the importance-sampled second moment."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdnn.gamblers_ruin.bits import TILE, k_planes
from jaxdnn.gamblers_ruin.exact import (
    check_integer,
    check_probability,
    quantize,
    straight_line_q,
    validate,
)
from jaxdnn.gamblers_ruin.kernels import CPU_COMPILER_OPTIONS, ConstantKernel


class AdaptResult(NamedTuple):
    """q: the adapted constant q (mean of the second half of the iterates for "sgd");
    history: (steps + 1,) the iterates, starting at q0."""

    q: float
    history: np.ndarray


@functools.lru_cache(maxsize=8)
def _sampler(kernel: ConstantKernel, tiles: int):
    """Jitted (key, planes) -> (hit, games until absorption), flat over tiles * TILE paths."""
    def run(key, planes):
        x, n, _ = kernel.walk_lanes(key, 0, tiles, planes)
        return (x == kernel.target).reshape(-1), n.reshape(-1)

    options = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(run, compiler_options=options)


def adapt_q(key, start=100, target=200, p=18 / 37, games=600, *, method: str = "ce",
            steps: int = 10, paths: int = 1 << 14, q0: float | None = None, bits: int = 8,
            learning_rate: float = 0.05) -> AdaptResult:
    """Adapts a constant q by simulation, for problems too large for the DP.

    Every step simulates `paths` paths with the current q (rounded to bits) and key
    fold_in(key, step), then
    - "ce" (cross-entropy): q <- sum W w / sum W n over hits (w wins, n games until
      absorption), the Bernoulli q closest in KL to the zero-variance proposal;
    - "sgd": one Adam step (cosine-decayed learning rate) on logit q along jax.grad of the log
      of the importance-sampled second moment M(q') = E_q[1{hit} L_p^2 / (L_q' L_q)]
      (L: path likelihoods); the result averages the second half of the iterates.
    q0 defaults to `straight_line_q`. Returns `AdaptResult`.
    """
    start, target, p, games = validate(start, target, p, games)
    if method not in ("ce", "sgd"):
        raise ValueError(f"method must be 'ce' or 'sgd', got {method!r}")
    q = straight_line_q(start, target, p, games) if q0 is None else check_probability("q0", q0)
    kernel = ConstantKernel.make(start, target, games, bits, True)
    sample = _sampler(kernel, -(-check_integer("paths", paths) // TILE))
    d = target - start
    lo, hi = 1.0 / (1 << bits), 1.0 - 1.0 / (1 << bits)

    def log_m2(theta, n, hit, qr):  # log E_q[1{hit} L_p^2 / (L_theta L_q)] up to log N
        w, l = (n + d) / 2.0, (n - d) / 2.0
        lp = w * math.log(p) + l * math.log(1 - p)
        lq = w * jnp.log(qr) + l * jnp.log1p(-qr)
        lt = -w * jax.nn.softplus(-theta) - l * jax.nn.softplus(theta)
        return jax.nn.logsumexp(jnp.where(hit, 2 * lp - lt - lq, -jnp.inf))

    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1)))

    @jax.jit
    def sgd_step(theta, state, n, hit, qr):
        updates, state = opt.update(jax.grad(log_m2)(theta, n, hit, qr), state)
        return optax.apply_updates(theta, updates), state

    theta = jnp.float32(math.log(q / (1 - q)))
    state = opt.init(theta)
    history = [q]
    for i in range(steps):
        k, qr = quantize(min(max(q, lo), hi), bits)
        hit, n = sample(jax.random.fold_in(key, i), k_planes(k, bits))
        nh = np.asarray(n, np.float64)[np.asarray(hit)]
        if nh.size == 0:  # no path reached the target: push q up
            q = 0.5 * (q + 1.0)
            theta = jnp.float32(math.log(q / (1 - q)))
        elif method == "ce":
            w, l = (nh + d) / 2, (nh - d) / 2
            lw = w * math.log(p / qr) + l * math.log((1 - p) / (1 - qr))
            wt = np.exp(lw - lw.max())
            q = float(np.sum(wt * w) / np.sum(wt * nh))
        else:
            theta, state = sgd_step(theta, state, n, hit, np.float32(qr))
            q = float(1 / (1 + math.exp(-float(theta))))
        history.append(q)
    if method == "sgd":
        q = float(np.mean(history[len(history) // 2:]))
    return AdaptResult(min(max(q, lo), hi), np.asarray(history))
