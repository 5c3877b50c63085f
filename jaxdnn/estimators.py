"""Monte Carlo gradient estimators of grad_theta E_{x ~ q_theta}[f(x)].

Two families, both pure and jit/vmap friendly:

- `score_function` (log-derivative, REINFORCE):
  grad = E[f(x) grad_theta log q_theta(x)], with the sample x stop-gradiented
  and f(x) treated as a constant; optional baselines ("control variates") that
  keep it unbiased: a moving average of f from earlier calls (optax-style
  `(init, update)` state), leave-one-out (RLOO), and the per-coordinate optimal
  scalar control variate b_j = E[f s_j^2] / E[s_j^2] (estimated leave-one-out so
  that it stays independent of the sample it multiplies).
- `pathwise` (reparameterization): grad = E[grad_theta f(x(theta, eps))]. It
  refuses, at trace time, distributions whose samples do not depend
  differentiably on a parameter the density depends on (discrete samplers,
  stop-gradiented samplers, mixture weights), which would otherwise give
  silently zero (biased) gradients.

`q_theta` is a distrax distribution built from a parameter pytree by a user
function `make_dist(params)` (float leaves); `f` maps ONE sample (of the distribution's event
shape) to a scalar and is vmapped over the samples. Every estimator returns an
`Estimate`: the gradient (same pytree structure as `params`), optionally the
per-sample gradients (each leaf with a leading `num_samples` axis, their mean
is the estimate) for variance diagnostics, and the values f(x_i). Per-sample
gradients use forward mode, one pass per parameter coordinate: meant for
diagnostics on small parameter vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import distrax
import jax
import jax.numpy as jnp

from jaxdnn.jaxpr_dependence import dependent_inputs

PyTree = Any
MakeDist = Callable[[PyTree], distrax.Distribution]
Cost = Callable[[jax.Array], jax.Array]

BASELINES = ("none", "moving_average", "rloo", "optimal")


class NotReparameterizableError(ValueError):
    """The pathwise estimator would silently return zero gradients for some parameters."""


class Estimate(NamedTuple):
    """A Monte Carlo gradient estimate.

    grad: pytree like `params`, the estimate (mean of `per_sample`).
    per_sample: None, or pytree like `params` with a leading `num_samples` axis.
    values: f(x_i), shape (num_samples,) (feed to `moving_average_update`).
    """

    grad: PyTree
    per_sample: PyTree | None
    values: jax.Array


# --------------------------------------------------------------------------------------
# Moving-average baseline: optax-style (init, update) pair, NamedTuple state of arrays.


class MovingAverageState(NamedTuple):
    """Exponential moving average of f with bias correction.

    ema: decay-weighted sum of past batch means of f; weight: decay-weighted sum of
    the (1 - decay) factors, so `ema / weight` is the bias-corrected average
    (0 before the first update).
    """

    ema: jax.Array
    weight: jax.Array


def moving_average_init() -> MovingAverageState:
    return MovingAverageState(ema=jnp.zeros((), jnp.float32), weight=jnp.zeros((), jnp.float32))


def moving_average_update(
    state: MovingAverageState, values: jax.Array, decay: float = 0.9
) -> MovingAverageState:
    """Folds the batch mean of `values` into the average."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    mean = jnp.mean(jax.lax.stop_gradient(values))
    return MovingAverageState(
        ema=decay * state.ema + (1.0 - decay) * mean,
        weight=decay * state.weight + (1.0 - decay),
    )


def moving_average_value(state: MovingAverageState) -> jax.Array:
    """The bias-corrected average (0 before any update)."""
    return jnp.where(state.weight > 0, state.ema / jnp.maximum(state.weight, 1e-30), 0.0)


class MovingAverageBaseline(NamedTuple):
    """`(init, update)` pair like `optax.GradientTransformation`."""

    init: Callable[[], MovingAverageState]
    update: Callable[[MovingAverageState, jax.Array], MovingAverageState]


def moving_average(decay: float = 0.9) -> MovingAverageBaseline:
    """The moving-average baseline as an `(init, update)` pair with `decay` bound."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    return MovingAverageBaseline(
        init=moving_average_init,
        update=lambda state, values: moving_average_update(state, values, decay),
    )


# --------------------------------------------------------------------------------------
# Helpers.


def leave_one_out_mean(values: jax.Array, axis: int = 0) -> jax.Array:
    """b_i = mean of the other entries along `axis` (needs at least 2 of them)."""
    n = values.shape[axis]
    if n < 2:
        raise ValueError(f"leave-one-out needs at least 2 samples along axis {axis}, got {n}")
    total = jnp.sum(values, axis=axis, keepdims=True)
    return (total - values) / (n - 1)


def standard_error(per_sample: PyTree) -> PyTree:
    """Monte Carlo standard error of the estimate (the mean of per-sample gradients, leading
    axis = samples): std (ddof=1) / sqrt(num_samples), per coordinate, a pytree like one sample.

    Traceable (jit/vmap); `jaxdnn.train.mean_and_stderr` is the host-side (NumPy, float64)
    counterpart for a 1-D array of per-image scores."""
    return jax.tree.map(lambda a: jnp.std(a, axis=0, ddof=1) / math.sqrt(a.shape[0]), per_sample)


def trace_covariance(per_sample: PyTree) -> jax.Array:
    """Trace of the covariance of per-sample gradients (leading axis = samples, ddof=1)."""
    leaves = jax.tree.leaves(per_sample)
    return sum(jnp.sum(jnp.var(leaf.reshape(leaf.shape[0], -1), axis=0, ddof=1)) for leaf in leaves)


def _mean0(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jnp.mean(a, axis=0), tree)


def _check_num_samples(num_samples: int) -> None:
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")


def _check_scalar_batch(dist: distrax.Distribution) -> None:
    if tuple(dist.batch_shape) != ():
        raise ValueError(
            f"make_dist(params) must have batch_shape () (one density per sample), got "
            f"{tuple(dist.batch_shape)}; wrap it in distrax.Independent to make the batch "
            "dimensions part of the event"
        )


def sample_keys(key: jax.Array, num_samples: int) -> jax.Array:
    """The per-sample keys every estimator uses: `key` split into `num_samples` keys.

    The estimators also accept these (num_samples,) keys directly in place of `key` (same
    result); a loop can then derive them for all its steps in one vectorized op."""
    if _is_key_array(key, num_samples):
        return key
    return jax.random.split(key, num_samples)


def _is_key_array(key: jax.Array, num_samples: int) -> bool:
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    return key.ndim == (1 if typed else 2) and key.shape[0] == num_samples


def _sample(key: jax.Array, dist: distrax.Distribution, num_samples: int) -> jax.Array:
    # One key per sample, vmapped: distrax's batched sampling broadcasts (n, d) against
    # (d,) parameters, which jax_numpy_rank_promotion='raise' rejects.
    return jax.vmap(lambda k: dist.sample(seed=k))(sample_keys(key, num_samples))


def _evaluate(f: Cost, x: jax.Array, num_samples: int) -> jax.Array:
    values = jax.vmap(f)(x)
    if values.shape != (num_samples,):
        raise ValueError(
            f"f must map one sample to a scalar; got output shape {values.shape[1:]} per sample"
        )
    return values


# --------------------------------------------------------------------------------------
# Score function.


def score_function(
    key: jax.Array,
    make_dist: MakeDist,
    params: PyTree,
    f: Cost,
    num_samples: int,
    *,
    baseline: str = "none",
    baseline_state: MovingAverageState | None = None,
    return_per_sample: bool = False,
) -> Estimate:
    """Log-derivative estimate of grad_params E_{x ~ make_dist(params)}[f(x)].

    Per-sample terms are (f(x_i) - b_i) * grad log q(x_i) with x_i stop-gradiented and
    f treated as a constant (its own dependence on anything is ignored), where b_i is

    - "none": 0;
    - "moving_average": `moving_average_value(baseline_state)`, built from earlier calls
      only (update it with `moving_average_update(state, estimate.values)`);
    - "rloo": the mean of f over the other samples (needs num_samples >= 2);
    - "optimal": per coordinate j, sum_{k != i} f_k s_kj^2 / sum_{k != i} s_kj^2, the
      leave-one-out estimate of the variance-minimizing scalar E[f s_j^2] / E[s_j^2].

    Every b_i is independent of x_i, so the estimate is unbiased for any num_samples.
    """
    _check_num_samples(num_samples)
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if baseline in ("rloo", "optimal") and num_samples < 2:
        raise ValueError(f"baseline {baseline!r} needs num_samples >= 2, got {num_samples}")
    if baseline == "moving_average" and baseline_state is None:
        raise ValueError("baseline 'moving_average' needs baseline_state (moving_average_init())")

    dist = make_dist(params)
    _check_scalar_batch(dist)
    # The classic mistake is differentiating log q(x(theta)) through a reparameterized
    # sample: that adds the pathwise term and biases the estimator. Stop it here.
    x = jax.lax.stop_gradient(_sample(key, dist, num_samples))
    values = jax.lax.stop_gradient(_evaluate(f, x, num_samples))

    def log_prob(p):
        return jax.vmap(make_dist(p).log_prob)(x)

    if baseline == "optimal" or return_per_sample:
        # Forward mode: cost is one pass per parameter coordinate, memory O(n * params)
        # (reverse mode would materialize n cotangents of size n).
        scores = jax.jacfwd(log_prob)(params)  # leaves (n, *leaf.shape)

        def weight(s):
            if baseline == "optimal":
                fv = values.reshape((num_samples,) + (1,) * (s.ndim - 1))
                num = jnp.sum(fv * s**2, axis=0, keepdims=True) - fv * s**2
                den = jnp.sum(s**2, axis=0, keepdims=True) - s**2
                b = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
                return (fv - jax.lax.stop_gradient(b)) * s
            w = _weights(values, baseline, baseline_state)
            return w.reshape((num_samples,) + (1,) * (s.ndim - 1)) * s

        per_sample = jax.tree.map(weight, scores)
        return Estimate(
            grad=_mean0(per_sample),
            per_sample=per_sample if return_per_sample else None,
            values=values,
        )

    w = jax.lax.stop_gradient(_weights(values, baseline, baseline_state))
    grad = jax.grad(lambda p: jnp.mean(w * log_prob(p)))(params)
    return Estimate(grad=grad, per_sample=None, values=values)


def _weights(
    values: jax.Array, baseline: str, state: MovingAverageState | None
) -> jax.Array:
    if baseline == "none":
        return values
    if baseline == "moving_average":
        return values - moving_average_value(state)
    if baseline == "rloo":
        return values - leave_one_out_mean(values)
    raise AssertionError(baseline)


# --------------------------------------------------------------------------------------
# Pathwise.


def _float_leaf(a: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def check_reparameterizable(key: jax.Array, make_dist: MakeDist, params: PyTree) -> None:
    """Raises `NotReparameterizableError` if a sample of make_dist(params) is not a
    differentiable function of every parameter leaf that its log-density depends on.

    Runs at trace time (works under jit/vmap/grad); costs one extra trace of the sampler's
    JVP and of the log-density (`jaxdnn.jaxpr_dependence.dependent_inputs` on each).
    """
    dist = make_dist(params)
    x = dist.sample(seed=key)
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        raise NotReparameterizableError(
            f"pathwise estimator: {type(dist).__name__} samples have dtype {jnp.result_type(x)}, "
            "which carries no gradient; use score_function for discrete distributions"
        )
    leaves, treedef = jax.tree.flatten(params)
    idx = [i for i, a in enumerate(leaves) if _float_leaf(a)]
    if not idx:
        return

    def rebuild(float_leaves):
        full = list(leaves)
        for i, a in zip(idx, float_leaves, strict=True):
            full[i] = a
        return jax.tree.unflatten(treedef, full)

    primals = [leaves[i] for i in idx]

    def sample_tangent(*tangents):
        _, t = jax.jvp(
            lambda *fl: make_dist(rebuild(fl)).sample(seed=key), tuple(primals), tuple(tangents)
        )
        return t

    x_fixed = jax.lax.stop_gradient(x)

    def logp_of_params(*fl):
        return make_dist(rebuild(fl)).log_prob(x_fixed)

    sample_deps = dependent_inputs(sample_tangent, len(idx), primals)
    density_deps = dependent_inputs(logp_of_params, len(idx), primals)
    missing = sorted(density_deps - sample_deps)
    if missing:
        paths = jax.tree_util.tree_flatten_with_path(params)[0]
        names = [jax.tree_util.keystr(paths[idx[j]][0]) or "params" for j in missing]
        raise NotReparameterizableError(
            f"pathwise estimator: samples of {type(dist).__name__} do not depend differentiably "
            f"on {', '.join(names)}, so their gradient would silently be zero; use "
            "score_function (or a reparameterizable distribution)"
        )


def pathwise(
    key: jax.Array,
    make_dist: MakeDist,
    params: PyTree,
    f: Cost,
    num_samples: int,
    *,
    return_per_sample: bool = False,
    check: bool = True,
) -> Estimate:
    """Reparameterization estimate: grad of mean_i f(x_i(params, eps_i)).

    With `check=True` (default) raises `NotReparameterizableError` at trace time when
    the sampler is not differentiable in some parameter that the density depends on.
    """
    _check_num_samples(num_samples)
    if check:
        check_reparameterizable(sample_keys(key, num_samples)[0], make_dist, params)

    def values_fn(p):
        return _evaluate(f, _sample(key, make_dist(p), num_samples), num_samples)

    if return_per_sample:
        # Forward mode (one pass per parameter coordinate): leaves (n, *leaf.shape).
        per_sample, values = jax.jacfwd(
            lambda p: (lambda v: (v, jax.lax.stop_gradient(v)))(values_fn(p)), has_aux=True
        )(params)
        return Estimate(grad=_mean0(per_sample), per_sample=per_sample, values=values)
    (_, values), grad = jax.value_and_grad(
        lambda p: (lambda v: (jnp.mean(v), v))(values_fn(p)), has_aux=True
    )(params)
    return Estimate(grad=grad, per_sample=None, values=jax.lax.stop_gradient(values))


ESTIMATORS = {"log_derivative": score_function, "reparameterization": pathwise}
