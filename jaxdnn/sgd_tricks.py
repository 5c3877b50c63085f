"""Problem 6: SGD with the log-derivative and the reparameterization tricks.

    minimize over (mu, sigma > 0):  J(mu, sigma) = E_{X ~ N(mu, sigma^2)}[X sin X]
                                                  + (mu - 1)^2 / 2 + sigma - log sigma

in the unconstrained coordinates theta = (mu, tau), sigma = exp(tau). Only the
expectation term is estimated by Monte Carlo (`jaxdnn.estimators`); the other
two terms are deterministic and differentiated exactly. The closed form
E[X sin X] = exp(-sigma^2 / 2) (mu sin mu + sigma^2 cos mu) gives the exact
objective, its stationary points (found deterministically: L-BFGS then Newton),
and the exact gradients the tests compare against.

The objective has a local minimum near (0.442, 0.606) (the one SGD from the
course's start (0, 1) reaches), a global one near (1.367, 1.962) and a saddle
between them near (0.863, 1.174).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdnn import estimators

ESTIMATORS = ("log_derivative", "reparameterization")
DEFAULT_LR = 1e-2
DEFAULT_BATCH = 16
DEFAULT_ITERATIONS = 500


# --------------------------------------------------------------------------------------
# The objective.


def expected_xsinx(mu: jax.Array, sigma: jax.Array) -> jax.Array:
    """E[X sin X] for X ~ N(mu, sigma^2), in closed form."""
    return jnp.exp(-(sigma**2) / 2) * (mu * jnp.sin(mu) + sigma**2 * jnp.cos(mu))


def regularizer(mu: jax.Array, sigma: jax.Array) -> jax.Array:
    """The deterministic part (mu - 1)^2 / 2 + sigma - log sigma."""
    return (mu - 1.0) ** 2 / 2 + sigma - jnp.log(sigma)


def objective(mu: jax.Array, sigma: jax.Array) -> jax.Array:
    """The exact objective J(mu, sigma)."""
    return expected_xsinx(mu, sigma) + regularizer(mu, sigma)


def objective_theta(theta: jax.Array) -> jax.Array:
    """J at theta = (mu, tau), sigma = exp(tau)."""
    return objective(theta[0], jnp.exp(theta[1]))


def make_dist(theta: jax.Array) -> distrax.Normal:
    """q_theta = N(mu, exp(tau)^2)."""
    return distrax.Normal(theta[0], jnp.exp(theta[1]))


def cost(x: jax.Array) -> jax.Array:
    """f(x) = x sin x, the integrand of the stochastic term."""
    return x * jnp.sin(x)


def exact_term_grad(theta: jax.Array) -> jax.Array:
    """Exact gradient in theta of E[X sin X] (what the estimators estimate)."""
    return jax.grad(lambda t: expected_xsinx(t[0], jnp.exp(t[1])))(theta)


def _regularizer_grad(theta: jax.Array) -> jax.Array:
    return jax.grad(lambda t: regularizer(t[0], jnp.exp(t[1])))(theta)


# --------------------------------------------------------------------------------------
# SGD as one lax.scan.


class SGDResult(NamedTuple):
    """trajectory: (iterations + 1, 2) iterates (mu, tau), start included;
    final: (2,) last iterate; averaged: (2,) Polyak-Ruppert average of the iterates
    after `average_from` steps (equals `final` when averaging is off)."""

    trajectory: jax.Array
    final: jax.Array
    averaged: jax.Array


def _check_sgd_args(estimator, lr, batch, iterations, baseline, average_from):
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if baseline not in estimators.BASELINES:
        raise ValueError(f"baseline must be one of {estimators.BASELINES}, got {baseline!r}")
    if estimator == "reparameterization" and baseline != "none":
        raise ValueError("baselines apply to the log_derivative estimator only")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if average_from is not None and not 0 <= average_from < iterations:
        raise ValueError(f"average_from must be in [0, iterations), got {average_from}")


def stochastic_grad(
    key: jax.Array,
    theta: jax.Array,
    estimator: str,
    batch: int,
    baseline: str = "none",
    baseline_state: estimators.MovingAverageState | None = None,
) -> estimators.Estimate:
    """Estimate of grad_theta J: Monte Carlo for E[X sin X] plus the exact rest."""
    if estimator == "reparameterization":
        est = estimators.pathwise(key, make_dist, theta, cost, batch)
    else:
        est = estimators.score_function(
            key, make_dist, theta, cost, batch, baseline=baseline, baseline_state=baseline_state
        )
    return est._replace(grad=est.grad + _regularizer_grad(theta))


def run_sgd(
    key: jax.Array,
    estimator: str = "reparameterization",
    *,
    init_mu: float = 0.0,
    init_tau: float = 0.0,
    lr: float = DEFAULT_LR,
    batch: int = DEFAULT_BATCH,
    iterations: int = DEFAULT_ITERATIONS,
    baseline: str = "none",
    average_from: int | None = None,
    decay: float = 0.9,
) -> SGDResult:
    """Plain SGD theta <- theta - lr * g_t in (mu, tau); step t uses fold_in(key, t).

    average_from: Polyak-Ruppert averaging of the iterates theta_{t} for
    t > average_from (None: no averaging, `averaged` is the last iterate). Averaging
    the second half (`iterations // 2`) removes the transient from the start.
    jit/vmap friendly in `key`, `init_mu`, `init_tau` (the rest is static).
    """
    _check_sgd_args(estimator, lr, batch, iterations, baseline, average_from)
    theta0 = jnp.stack([jnp.asarray(init_mu, jnp.float32), jnp.asarray(init_tau, jnp.float32)])
    start = iterations if average_from is None else average_from

    def step(carry, t_key):
        (theta, avg, ma_state), (t, step_key) = carry, t_key
        est = stochastic_grad(step_key, theta, estimator, batch, baseline, ma_state)
        if baseline == "moving_average":
            ma_state = estimators.moving_average_update(ma_state, est.values, decay)
        theta = theta - lr * est.grad
        # Running mean over iterates t + 1 = start + 1, ..., iterations.
        n = jnp.maximum(t + 1 - start, 1).astype(jnp.float32)
        avg = jnp.where(t + 1 > start, avg + (theta - avg) / n, theta)
        return (theta, avg, ma_state), theta

    carry0 = (theta0, theta0, estimators.moving_average_init())
    steps = jnp.arange(iterations)
    # Every step's per-sample keys are derived before the loop (one vectorized op, the same
    # keys as fold_in(key, t) split inside it): XLA:CPU pays a fixed cost per op per loop
    # iteration, which dominates this tiny problem (1.9x faster than deriving them inside).
    step_keys = jax.vmap(lambda t: estimators.sample_keys(jax.random.fold_in(key, t), batch))(steps)
    (final, avg, _), thetas = jax.lax.scan(step, carry0, (steps, step_keys))
    trajectory = jnp.concatenate([theta0[None], thetas], axis=0)
    return SGDResult(trajectory=trajectory, final=final, averaged=avg if average_from is not None
                     else final)


def run_seeds(key: jax.Array, num_seeds: int, estimator: str, **kwargs) -> SGDResult:
    """`run_sgd` for seeds fold_in(key, s), s < num_seeds, vmapped; leaves get a seed axis."""
    if not isinstance(num_seeds, int) or num_seeds < 1:
        raise ValueError(f"num_seeds must be a positive int, got {num_seeds!r}")
    init_mu = kwargs.pop("init_mu", 0.0)
    init_tau = kwargs.pop("init_tau", 0.0)
    unknown = set(kwargs) - _STATIC
    if unknown:
        raise TypeError(f"unexpected arguments {sorted(unknown)}")
    return _run_seeds(key, init_mu, init_tau, num_seeds=num_seeds, estimator=estimator, **kwargs)


_STATIC = {"lr", "batch", "iterations", "baseline", "average_from", "decay"}


@functools.partial(jax.jit, static_argnames=("num_seeds", "estimator", *sorted(_STATIC)))
def _run_seeds(key, init_mu, init_tau, *, num_seeds, estimator, **kwargs) -> SGDResult:
    keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(num_seeds))
    return jax.vmap(lambda k: run_sgd(k, estimator, init_mu=init_mu, init_tau=init_tau,
                                      **kwargs))(keys)


# --------------------------------------------------------------------------------------
# Exact stationary points of the closed form.


class StationaryPoint(NamedTuple):
    mu: float
    sigma: float
    value: float
    kind: str  # "minimum", "saddle" or "maximum"

    def as_dict(self) -> dict:
        return {"mu": self.mu, "sigma": self.sigma, "value": self.value}


def _newton(theta: jax.Array, steps: int = 20) -> jax.Array:
    """Undamped Newton on grad J = 0 (converges to the nearby stationary point)."""
    g = jax.grad(objective_theta)
    h = jax.hessian(objective_theta)

    def body(theta, _):
        step = jnp.linalg.solve(h(theta), g(theta))
        return jnp.where(jnp.all(jnp.isfinite(step)), theta - step, theta), None

    return jax.lax.scan(body, theta, None, length=steps)[0]


def _lbfgs(theta: jax.Array, max_steps: int = 200) -> jax.Array:
    """optax.lbfgs (zoom line search) on the closed form until |grad| <= 1e-6."""
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective_theta)

    def cond(carry):
        _, state, i = carry
        grad = optax.tree.get(state, "grad")
        return (i == 0) | ((i < max_steps) & (optax.tree.norm(grad) > 1e-6))

    def body(carry):
        theta, state, i = carry
        value, grad = value_and_grad(theta, state=state)
        updates, state = solver.update(
            grad, state, theta, value=value, grad=grad, value_fn=objective_theta
        )
        return optax.apply_updates(theta, updates), state, i + 1

    theta, _, _ = jax.lax.while_loop(cond, body, (theta, solver.init(theta), 0))
    return theta


@functools.partial(jax.jit, static_argnames="descend")
def _stationary(thetas: jax.Array, descend: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batched: (points (k, 2), values (k,), Hessian eigenvalues (k, 2))."""

    def one(theta):
        if descend:
            theta = _lbfgs(theta)
        theta = _newton(theta, steps=20 if descend else 50)
        eig = jnp.linalg.eigvalsh(jax.hessian(objective_theta)(theta))
        return theta, objective_theta(theta), eig

    return jax.vmap(one)(thetas)


_PAD = 32  # batch the starts in fixed-size groups: one compilation serves every call


def _points(mu_sigma, descend: bool) -> list[StationaryPoint]:
    ms = np.asarray(mu_sigma, np.float32).reshape(-1, 2)
    if not np.all(np.isfinite(ms)) or not np.all(ms[:, 1] > 0):
        raise ValueError("mu must be finite and sigma positive")
    k = ms.shape[0]
    padded = np.concatenate([ms, np.tile(ms[:1], (-k % _PAD, 1))], axis=0)
    thetas, values, eigs = [], [], []
    for i in range(0, padded.shape[0], _PAD):
        group = padded[i:i + _PAD]
        t, v, e = _stationary(np.stack([group[:, 0], np.log(group[:, 1])], 1), descend)
        thetas += t.tolist()
        values += v.tolist()
        eigs += e.tolist()
    out = []
    for theta, value, eig in zip(thetas[:k], values[:k], eigs[:k], strict=True):
        kind = "minimum" if eig[0] > 0 else ("maximum" if eig[1] < 0 else "saddle")
        out.append(StationaryPoint(mu=theta[0], sigma=math.exp(theta[1]), value=value,
                                   kind=kind))
    return out


def basin_minimum(mu: float, sigma: float) -> StationaryPoint:
    """The minimum that L-BFGS (a descent method) reaches from (mu, sigma), Newton-polished."""
    return _points([mu, sigma], descend=True)[0]


def basin_minima(mu_sigma) -> list[StationaryPoint]:
    """`basin_minimum` for each row of a (k, 2) array of (mu, sigma) starts."""
    return _points(mu_sigma, descend=True)


def stationary_point(mu: float, sigma: float) -> StationaryPoint:
    """The stationary point (any kind) that Newton's method reaches from (mu, sigma)."""
    return _points([mu, sigma], descend=False)[0]


def exact_points() -> dict[str, StationaryPoint]:
    """{"local", "global", "saddle"}: the minimum of the basin of the course's start
    (0, 1), the lowest minimum over a grid of starts, and the saddle between them."""
    grid = [(m, s) for m in (-3.0, -1.0, 0.0, 1.0, 2.0, 3.0) for s in (0.3, 1.0, 2.0, 4.0)]
    local, *minima = _points([(0.0, 1.0), *grid], descend=True)
    best = min((p for p in minima if p.kind == "minimum"), key=lambda p: p.value)
    saddle = stationary_point((local.mu + best.mu) / 2, (local.sigma + best.sigma) / 2)
    return {"local": local, "global": best, "saddle": saddle}


# --------------------------------------------------------------------------------------
# Per-sample gradient variance of the E[X sin X] term.

VARIANCE_METHODS = (
    "log_derivative",
    "log_derivative_rloo",
    "log_derivative_optimal_baseline",
    "log_derivative_rloo_batch16",
    "reparameterization",
)


@functools.partial(jax.jit, static_argnames=("chunk", "rloo_batch"))
def _variance_chunk(key: jax.Array, index, theta: jax.Array, chunk: int, rloo_batch: int):
    """Sums of g and g^2 (per coordinate) of each method's per-sample terms on chunk `index`."""
    key = jax.random.fold_in(key, index)
    out = {}

    def sums(g):
        return jnp.stack([jnp.sum(g, axis=0), jnp.sum(g**2, axis=0)])

    for name, baseline in (
        ("log_derivative", "none"),
        ("log_derivative_rloo", "rloo"),  # leave-one-out mean over `chunk` samples
        ("log_derivative_optimal_baseline", "optimal"),
    ):
        est = estimators.score_function(
            key, make_dist, theta, cost, chunk, baseline=baseline, return_per_sample=True
        )
        out[name] = sums(est.per_sample)
    est = estimators.pathwise(key, make_dist, theta, cost, chunk, return_per_sample=True)
    out["reparameterization"] = sums(est.per_sample)
    # RLOO at a small batch: the batch estimate g_B, scaled so that its variance reads as a
    # per-sample variance: sqrt(B) * g_B has covariance B * Cov(g_B).
    keys = jax.random.split(key, chunk // rloo_batch)
    gb = jax.vmap(
        lambda k: estimators.score_function(
            k, make_dist, theta, cost, rloo_batch, baseline="rloo"
        ).grad
    )(keys)
    out["log_derivative_rloo_batch16"] = sums(jnp.sqrt(float(rloo_batch)) * gb)
    return out


def gradient_variances(
    key: jax.Array,
    mu: float,
    sigma: float,
    num_samples: int = 1 << 24,
    chunk: int = 1 << 20,
    rloo_batch: int = 16,
    progress: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Trace of the covariance, in (mu, tau), of the per-sample gradient of E[X sin X]
    for each method in `VARIANCE_METHODS`, from `num_samples` samples (in chunks).

    "rloo" uses the leave-one-out (RLOO) mean of f over a chunk (= the mean of f up to
    O(1/chunk), so it stands for the mean baseline); "optimal_baseline" the per-coordinate optimal scalar b_j =
    E[f s_j^2]/E[s_j^2], leave-one-out over a chunk; "rloo_batch16" reports
    16 * trace Cov of the batch-16 RLOO estimate (its effective per-sample variance).
    The fourth moments here are heavy-tailed (f s_tau ~ x^3), so the default uses
    2^24 samples to get the figures to about 1%. `progress()` is called after each chunk.
    """
    if num_samples < chunk or num_samples % chunk:
        raise ValueError(f"num_samples must be a positive multiple of chunk={chunk}")
    theta = np.array([mu, math.log(sigma)], np.float32)
    total: dict[str, np.ndarray] = {}
    for c in range(num_samples // chunk):
        part = _variance_chunk(key, c, theta, chunk, rloo_batch)
        for name, sums in part.items():
            total[name] = total.get(name, 0.0) + np.asarray(sums, np.float64)
        if progress is not None:
            progress()
    result = {}
    for name in VARIANCE_METHODS:  # in this order (a jitted dict comes back key-sorted)
        sums = total[name]
        n = num_samples // rloo_batch if name == "log_derivative_rloo_batch16" else num_samples
        mean = sums[0] / n
        var = (sums[1] / n - mean**2) * n / (n - 1)
        result[name] = float(np.sum(var))
    return result
