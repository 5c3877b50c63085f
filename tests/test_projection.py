"""Projected gradient method (P2): the box projection onto C = {x1 = a, 0 <= x2 <= 1} against
its closed form, convergence to the known constrained minimizer, optimizer/schedule plumbing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdnn import projection as pj


@pytest.mark.parametrize("a", [-1.5, 0.0, 0.3, 2.0])
def test_problem2_projection_matches_closed_form(key, a):
    y = 3.0 * jax.random.normal(key, (1000, 2))  # covers x2 < 0, inside, > 1
    got = pj.problem2_projection(a)(y)
    want = jnp.stack([jnp.full(1000, a), jnp.clip(y[:, 1], 0.0, 1.0)], -1)
    chex.assert_shape(got, (1000, 2))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.mean((np.asarray(y[:, 1]) < 0) | (np.asarray(y[:, 1]) > 1)) > 0.3


def test_problem2_projection_is_the_nearest_point(key):
    """argmin over a fine grid of C of ||x - y|| agrees with Pi_C(y) (the definition)."""
    a = 0.7
    grid = jnp.stack([jnp.full(2001, a), jnp.linspace(0.0, 1.0, 2001)], -1)
    y = 2.0 * jax.random.normal(key, (50, 2))
    nearest = grid[jnp.argmin(((y[:, None, :] - grid[None]) ** 2).sum(-1), axis=1)]
    np.testing.assert_allclose(pj.problem2_projection(a)(y), nearest, atol=1e-3)


def test_box_projection_is_idempotent_and_pins_equal_bounds(key):
    lower = jnp.array([0.0, 0.5, -1.0])
    upper = jnp.array([1.0, 0.5, 2.0])
    proj = pj.box_projection(lower, upper)
    y = 5.0 * jax.random.normal(key, (3,))
    p = proj(y)
    np.testing.assert_array_equal(proj(p), p)
    assert p[1] == 0.5  # lower == upper: the value itself, bit for bit
    assert bool(jnp.all((p >= lower) & (p <= upper)))


def test_problem2_projection_rejects_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        pj.problem2_projection(0.0)(jnp.zeros(3))


@pytest.mark.parametrize("center", [(2.0, -0.7), (-1.0, 0.4), (0.5, 3.0)])
def test_projected_gradient_converges_to_constrained_minimizer(center):
    """f(x) = (x - c)^T diag(w) (x - c) / 2 over C: the minimizer is (a, clip(c2, 0, 1))."""
    a, c, w = 0.25, jnp.array(center), jnp.array([1.0, 3.0])

    def f(x):
        return 0.5 * jnp.sum(w * (x - c) ** 2)

    res = jax.jit(lambda x0: pj.projected_gradient(f, pj.problem2_projection(a), x0,
                                                   optax.sgd(0.2), 100))(jnp.array([5.0, 5.0]))
    want = pj.problem2_minimizer(c, a)
    np.testing.assert_allclose(res.x, want, atol=1e-6)
    np.testing.assert_allclose(want, [a, np.clip(center[1], 0, 1)])
    chex.assert_shape(res.losses, (100,))
    assert res.trajectory is None
    # monotone decrease after the first (projecting) step for a step size below 1/L
    assert bool(jnp.all(jnp.diff(res.losses[1:]) <= 1e-6))


def test_projected_gradient_trajectory_and_schedules():
    c = jnp.array([0.0, 2.0])

    def f(x):
        return 0.5 * jnp.sum((x - c) ** 2)

    proj = pj.problem2_projection(1.0)
    x0 = jnp.array([3.0, -2.0])
    res = pj.projected_gradient(f, proj, x0, 0.5, 20, return_trajectory=True)
    chex.assert_shape(res.trajectory, (21, 2))
    np.testing.assert_array_equal(res.trajectory[0], x0)
    np.testing.assert_array_equal(res.trajectory[-1], res.x)
    np.testing.assert_allclose(res.losses, jax.vmap(f)(res.trajectory[:-1]), rtol=1e-6)
    # every iterate after x0 is feasible
    assert bool(jnp.all(res.trajectory[1:, 0] == 1.0))
    assert bool(jnp.all((res.trajectory[1:, 1] >= 0) & (res.trajectory[1:, 1] <= 1)))
    # textbook step by hand: x1 = Pi(x0 - 0.5 grad f(x0))
    np.testing.assert_allclose(res.trajectory[1], proj(x0 - 0.5 * (x0 - c)))
    # a schedule and an adaptive optax optimizer reach the same point
    for opt in (optax.exponential_decay(0.5, 10, 0.9), optax.adam(0.1)):
        out = pj.projected_gradient(f, proj, x0, opt, 300)
        np.testing.assert_allclose(out.x, [1.0, 1.0], atol=1e-3)


def test_projected_gradient_on_pytrees_and_zero_steps():
    tree = {"u": jnp.array([2.0, -2.0]), "v": jnp.array(4.0)}

    def f(t):
        return jnp.sum(t["u"] ** 2) + (t["v"] - 1.0) ** 2

    proj = pj.box_projection({"u": -0.5, "v": 2.0}, {"u": 0.5, "v": 3.0})
    res = pj.projected_gradient(f, proj, tree, optax.sgd(0.1), 200)
    np.testing.assert_allclose(res.x["u"], [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(res.x["v"], 2.0)
    none = pj.projected_gradient(f, proj, tree, optax.sgd(0.1), 0, return_trajectory=True)
    chex.assert_trees_all_equal(none.x, tree)
    chex.assert_shape(none.losses, (0,))
    with pytest.raises(ValueError, match="steps"):
        pj.projected_gradient(f, proj, tree, 0.1, -1)
    with pytest.raises(TypeError, match="optimizer"):
        pj.projected_gradient(f, proj, tree, "sgd", 3)
