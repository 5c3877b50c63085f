"""The projected gradient method (Problem 2) as pure functions on top of optax.

    x_{k+1} = Pi_C(x_k - alpha_k grad f(x_k)),   Pi_C(y) = argmin_{x in C} ||x - y||^2

`projected_gradient` runs the whole iteration as one `lax.scan`; the step is any optax
`GradientTransformation` (plain `optax.sgd(alpha)` is the textbook method, a schedule or an
adaptive optimizer works the same way) and the projection any function of the iterate. Every
constraint set in this project is a box, so projections are `optax.projections.projection_box`:
`box_projection(lower, upper)`, and the Problem 2 set

    C = {x in R^2 : x_1 = a, 0 <= x_2 <= 1}  (a box with lower = upper = a on x_1)

whose projection is Pi_C(y) = (a, min(max(y_2, 0), 1)) (`problem2_projection`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "PGDResult", "box_projection", "problem2_minimizer", "problem2_projection",
    "projected_gradient",
]


class PGDResult(NamedTuple):
    """Output of `projected_gradient`.

    x: the last iterate x_steps (same pytree as x0).
    losses: f(x_k) for k = 0 .. steps - 1 (the loss at each iterate a step was taken from),
        shape (steps, *f's shape).
    trajectory: x_0 .. x_steps stacked on a new leading axis (steps + 1, ...), or None.
    opt_state: the optimizer state after the last step (pass it back to continue the run).
    """

    x: Any
    losses: jax.Array
    trajectory: Any = None
    opt_state: Any = None


def box_projection(lower, upper) -> Callable[[Any], Any]:
    """Pi onto {lower <= x <= upper} (scalars or pytrees like x; lower == upper pins a value)."""
    return lambda x: optax.projections.projection_box(x, lower, upper)


def problem2_projection(a) -> Callable[[jax.Array], jax.Array]:
    """Pi_C for C = {x in R^2 : x_1 = a, 0 <= x_2 <= 1}, acting on (..., 2) arrays."""
    a = jnp.asarray(a, jnp.float32)
    lower = jnp.stack([a, jnp.zeros_like(a)])
    upper = jnp.stack([a, jnp.ones_like(a)])

    def project(y: jax.Array) -> jax.Array:
        y = jnp.asarray(y)
        if y.shape[-1:] != (2,):
            raise ValueError(f"problem 2 points have shape (..., 2), got {y.shape}")
        return optax.projections.projection_box(
            y, jnp.broadcast_to(lower, y.shape), jnp.broadcast_to(upper, y.shape))

    return project


def problem2_minimizer(center: jax.Array, a) -> jax.Array:
    """Closed-form minimizer over C of any separable quadratic sum_i w_i (x_i - c_i)^2 / 2 with
    w_i > 0 (e.g. ||x - c||^2 / 2): x_1 = a, x_2 = clip(c_2, 0, 1), i.e. Pi_C(c)."""
    center = jnp.asarray(center, jnp.float32)
    return jnp.stack([jnp.full(center.shape[:-1], a, jnp.float32),
                      jnp.clip(center[..., 1], 0.0, 1.0)], -1)


def _as_optimizer(optimizer) -> optax.GradientTransformation:
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if callable(optimizer) or isinstance(optimizer, (int, float)):  # a schedule or a step size
        return optax.sgd(optimizer)
    raise TypeError("optimizer must be an optax GradientTransformation, a step size or an "
                    f"optax schedule, got {type(optimizer).__name__}")


def projected_gradient(loss_fn: Callable[[Any], jax.Array], project_fn: Callable[[Any], Any],
                       x0, optimizer, steps: int, return_trajectory: bool = False, *,
                       opt_state=None, unroll: bool = False) -> PGDResult:
    """Minimizes `loss_fn` over the set `project_fn` projects onto, from `x0`.

    Each of the `steps` iterations is x <- project_fn(x + optimizer_update(grad loss_fn(x))),
    run as one `lax.scan` (jit-, vmap- and grad-friendly). `optimizer` is an optax
    `GradientTransformation`; a float or an optax schedule means `optax.sgd(optimizer)`, i.e.
    the textbook x_{k+1} = Pi_C(x_k - alpha_k grad f(x_k)). `x0` is used as given (project it
    first if it may be infeasible); every later iterate is feasible. Transformations that need
    the parameters in `update` get the current iterate.

    `loss_fn` may return an array of independent losses (e.g. one per image of a batch whose
    problems do not interact): their sum is minimized and each entry is recorded in `losses`.

    `opt_state` continues a run (with the `opt_state` a previous call returned, schedules and
    moments carry on); `unroll=True` unrolls the loop (XLA:CPU runs convolutions inside a
    while loop several times slower, so CPU callers run short unrolled chunks instead).

    Returns `PGDResult(x, losses, trajectory, opt_state)`; the trajectory (steps + 1 iterates,
    x0 first) only with `return_trajectory=True`.
    """
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    optimizer = _as_optimizer(optimizer)
    value_and_grad = jax.value_and_grad(lambda x: (lambda v: (jnp.sum(v), v))(loss_fn(x)), has_aux=True)

    def step(carry, _):
        x, opt_state = carry
        (_, loss), grad = value_and_grad(x)
        updates, opt_state = optimizer.update(grad, opt_state, x)
        x = project_fn(optax.apply_updates(x, updates))
        return (x, opt_state), (loss, x if return_trajectory else None)

    opt_state = optimizer.init(x0) if opt_state is None else opt_state
    (x, opt_state), (losses, path) = jax.lax.scan(step, (x0, opt_state), None, length=steps,
                                                  unroll=bool(unroll) and steps > 0)
    trajectory = None
    if return_trajectory:
        trajectory = jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]),
                                  x0, path)
    return PGDResult(x, losses, trajectory, opt_state)
