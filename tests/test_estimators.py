"""Monte Carlo gradient estimators: unbiasedness against closed forms (z-tests whose
tolerance comes from the sample count), baselines, and the classic JAX mistakes."""

from __future__ import annotations

import math

import chex
import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdnn import estimators as E
from jaxdnn.jaxpr_dependence import dependent_inputs

# Two-sided z threshold: over the ~60 coordinates tested below, a false alarm at a fixed
# key has probability about 60 * 2e-6 (Bonferroni), while a bias of a few standard
# errors is caught (see test_z_test_detects_the_naive_score_function).
Z = 4.75
N = 40_000


def make_normal(params):
    return distrax.Normal(params["mu"], jnp.exp(params["log_sigma"]))


def make_mvn(params):
    return distrax.MultivariateNormalDiag(params["mu"], jnp.exp(params["log_sigma"]))


def expected_xsinx(mu, sigma):
    return jnp.exp(-(sigma**2) / 2) * (mu * jnp.sin(mu) + sigma**2 * jnp.cos(mu))


# cost f(x) for one scalar sample, and E_{N(mu, sigma^2)}[f] in closed form
COSTS = {
    "linear": (lambda x: 3.0 * x - 1.0, lambda mu, s: 3.0 * mu - 1.0),
    "quadratic": (lambda x: x**2 - 2.0 * x, lambda mu, s: mu**2 + s**2 - 2.0 * mu),
    "xsinx": (lambda x: x * jnp.sin(x), expected_xsinx),
}
PARAMS = {"mu": jnp.float32(0.4), "log_sigma": jnp.float32(-0.3)}


def exact_grad(cost_name, params):
    _, mean = COSTS[cost_name]
    return jax.grad(lambda p: mean(p["mu"], jnp.exp(p["log_sigma"])))(params)


def z_scores(estimate: E.Estimate, exact) -> np.ndarray:
    """(estimate - exact) / standard error, the standard error from the per-sample
    spread and the sample count: std / sqrt(n). A coordinate with no spread (e.g. the
    pathwise mu-gradient of a linear cost) must be exact to float32 rounding."""
    n = jax.tree.leaves(estimate.per_sample)[0].shape[0]

    def z(per_sample, grad, exact):
        se = np.std(np.asarray(per_sample, np.float64), axis=0, ddof=1) / math.sqrt(n)
        diff = np.asarray(grad, np.float64) - np.asarray(exact, np.float64)
        exact_enough = np.abs(diff) <= 1e-5 * (1 + np.abs(np.asarray(exact)))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(se > 0, diff / se, np.where(exact_enough, 0.0, np.inf))

    zs = jax.tree.map(z, estimate.per_sample, estimate.grad, exact)
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(zs)])


def run(estimator, key, cost, baseline):
    if estimator == "pathwise":
        fn = lambda k, p: E.pathwise(k, make_normal, p, cost, N, return_per_sample=True)
    else:
        fn = lambda k, p: E.score_function(k, make_normal, p, cost, N, baseline=baseline,
                                           return_per_sample=True)
    return fn(key, PARAMS)


CASES = [("pathwise", "none")] + [("score_function", b) for b in ("none", "rloo", "optimal")]


@pytest.mark.parametrize("cost_name", sorted(COSTS))
@pytest.mark.parametrize(("estimator", "baseline"), CASES)
def test_unbiased_against_closed_form(key, estimator, baseline, cost_name):
    est = run(estimator, key, COSTS[cost_name][0], baseline)
    chex.assert_trees_all_equal_shapes(est.grad, PARAMS)
    chex.assert_tree_all_finite(est)
    chex.assert_shape(est.per_sample["mu"], (N,))
    z = z_scores(est, exact_grad(cost_name, PARAMS))
    assert np.all(np.abs(z) < Z), z


@pytest.mark.parametrize(("estimator", "baseline"), CASES[:3])
def test_per_sample_path_gives_the_plain_estimate(key, estimator, baseline):
    """return_per_sample=True (forward mode, mean of per-sample terms) and the default
    (reverse mode through the mean) are two computations of one estimate. ("optimal" always
    takes the per-sample path.)"""
    cost = COSTS["xsinx"][0]
    if estimator == "pathwise":
        est = lambda per: E.pathwise(key, make_normal, PARAMS, cost, 64, return_per_sample=per)
    else:
        est = lambda per: E.score_function(key, make_normal, PARAMS, cost, 64, baseline=baseline,
                                           return_per_sample=per)
    plain, with_per_sample = est(False), est(True)
    assert plain.per_sample is None
    chex.assert_trees_all_close(with_per_sample.grad, plain.grad, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(with_per_sample.values, plain.values)


def test_moving_average_baseline_unbiased(key):
    """Each step's baseline comes from earlier steps only: pooled over 10 steps of 4000
    samples (with a baseline that moves between steps) the estimator stays unbiased,
    for each cost."""
    ma = E.moving_average(decay=0.8)
    names = sorted(COSTS)

    def step(states, k):
        out, new = {}, {}
        for name in names:
            est = E.score_function(k, make_normal, PARAMS, COSTS[name][0], N // 10,
                                   baseline="moving_average", baseline_state=states[name],
                                   return_per_sample=True)
            new[name] = ma.update(states[name], est.values)
            out[name] = (est.per_sample, E.moving_average_value(states[name]))
        return new, out

    keys = jax.random.split(key, 10)
    _, out = jax.lax.scan(step, {name: ma.init() for name in names}, keys)
    for name in names:
        per_sample, baselines = out[name]
        assert float(baselines[0]) == 0.0 and float(jnp.abs(baselines[-1])) > 0.0
        pooled = jax.tree.map(lambda a: a.reshape(N), per_sample)
        est = E.Estimate(grad=jax.tree.map(lambda a: a.mean(0), pooled), per_sample=pooled,
                         values=jnp.zeros(N))
        z = z_scores(est, exact_grad(name, PARAMS))
        assert np.all(np.abs(z) < Z), (name, z)


def test_baselines_reduce_variance(key):
    cost = COSTS["xsinx"][0]
    var = {b: float(E.trace_covariance(run("score_function", key, cost, b).per_sample))
           for b in ("none", "rloo", "optimal")}
    assert var["optimal"] < var["rloo"] < var["none"]


def test_multivariate_pytree_params_unbiased(key):
    """Vector parameters (an event of dimension 3) with a quadratic cost."""
    params = {"mu": jnp.array([0.5, -1.0, 2.0]), "log_sigma": jnp.array([0.0, -0.5, 0.3])}
    a = jnp.array([1.0, 2.0, 0.5])
    cost = lambda x: jnp.sum(a * x**2)
    exact = jax.grad(lambda p: jnp.sum(a * (p["mu"] ** 2 + jnp.exp(2 * p["log_sigma"]))))(params)
    both = jax.jit(lambda k, p: (
        E.pathwise(k, make_mvn, p, cost, N, return_per_sample=True),
        E.score_function(k, make_mvn, p, cost, N, baseline="optimal", return_per_sample=True),
    ))
    for est in both(key, params):
        chex.assert_shape(est.per_sample["mu"], (N, 3))
        z = z_scores(est, exact)
        assert np.all(np.abs(z) < Z), z


def test_score_function_on_a_discrete_distribution(key):
    """Bernoulli(sigmoid(theta)): d/dtheta E[f] = p (1 - p) (f(1) - f(0))."""
    theta = jnp.float32(0.3)
    f = lambda x: 2.0 + 3.0 * x
    p = jax.nn.sigmoid(theta)
    make = lambda t: distrax.Bernoulli(logits=t)
    for baseline in ("none", "rloo"):
        est = E.score_function(key, make, theta, f, N, baseline=baseline, return_per_sample=True)
        z = z_scores(est, p * (1 - p) * 3.0)
        assert np.all(np.abs(z) < Z), z


def test_z_test_detects_the_naive_score_function(key):
    """The classic mistake: differentiating log q(x(theta)) through a reparameterized
    sample. log q(mu + sigma eps) does not depend on mu, so grad_mu is exactly 0 instead
    of 3 for f(x) = 3x - 1. The same z-test that
    passes the real estimator must reject it."""
    f = COSTS["linear"][0]
    n = 2_000

    def naive_per_sample(p, k):
        # gradient flows through the sample x(theta) as well as through log q's parameters
        x = make_normal(p).sample(seed=k)  # NOT stop-gradiented
        return jax.grad(lambda q: jax.lax.stop_gradient(f(x)) * make_normal(q).log_prob(
            make_normal(q).sample(seed=k)))(p)

    keys = jax.random.split(key, n)
    per_sample = jax.vmap(naive_per_sample, in_axes=(None, 0))(PARAMS, keys)
    naive = E.Estimate(jax.tree.map(lambda a: a.mean(0), per_sample), per_sample, jnp.zeros(n))
    exact = exact_grad("linear", PARAMS)
    np.testing.assert_allclose(naive.grad["mu"], 0.0, atol=1e-5)  # the silent wrong answer
    assert np.max(np.abs(z_scores(naive, exact))) > Z
    good = E.score_function(key, make_normal, PARAMS, f, n, return_per_sample=True)
    assert np.all(np.abs(z_scores(good, exact)) < Z)


def test_score_function_stops_gradient_through_sample(key):
    """Even with a reparameterizable q and an f that would carry gradient, the score
    function sees only f(x) * grad log q(x): for f(x) = x at n = 1, the estimate is
    exactly f(x) * d/dtheta log q(x) with x held fixed."""
    est = E.score_function(key, make_normal, PARAMS, lambda x: x, 1, return_per_sample=True)
    x = est.values[0]
    expected = jax.grad(lambda p: make_normal(p).log_prob(x))(PARAMS)
    chex.assert_trees_all_close(est.grad, jax.tree.map(lambda g: x * g, expected), rtol=1e-5)


class _StopGradientNormal(distrax.Normal):
    """A sampler that (wrongly) blocks gradients: its samples are constants to autodiff."""

    def _sample_n(self, key, n):
        return jax.lax.stop_gradient(super()._sample_n(key, n))


@pytest.mark.parametrize(
    "make",
    [
        lambda p: distrax.Bernoulli(logits=p["mu"]),  # integer samples
        lambda p: distrax.Bernoulli(logits=p["mu"], dtype=jnp.float32),  # float, but no path
        lambda p: _StopGradientNormal(p["mu"], jnp.exp(p["log_sigma"])),
        # mixture weights: the sample depends on the locations but not on the logits
        lambda p: distrax.MixtureSameFamily(
            distrax.Categorical(logits=jnp.stack([p["mu"], -p["mu"]])),
            distrax.Normal(jnp.stack([p["log_sigma"], 1.0]), 1.0)),
    ],
    ids=["bernoulli_int", "bernoulli_float", "stop_gradient_sampler", "mixture_weights"],
)
def test_pathwise_refuses_non_reparameterizable(key, make):
    with pytest.raises(E.NotReparameterizableError):
        E.pathwise(key, make, PARAMS, lambda x: x, 8)


def test_pathwise_refuses_at_trace_time_under_jit(key):
    make = lambda p: distrax.Bernoulli(logits=p["mu"], dtype=jnp.float32)
    with pytest.raises(E.NotReparameterizableError, match=r"\['mu'\]"):
        jax.jit(lambda p: E.pathwise(key, make, p, lambda x: x, 8).grad)(PARAMS)


def test_pathwise_check_accepts_reparameterizable(key):
    for make in (make_normal, make_mvn,
                 lambda p: distrax.Laplace(p["mu"], jnp.exp(p["log_sigma"]))):
        params = PARAMS if make is not make_mvn else jax.tree.map(lambda a: a * jnp.ones(2),
                                                                  PARAMS)
        E.check_reparameterizable(key, make, params)


@pytest.mark.slow
def test_jit_vmap_and_determinism(key):
    """jit(vmap over keys) gives the eager numbers; same key, same result. (RLOO runs under
    jit/vmap in the VAE and SGD tests.)"""
    f = COSTS["xsinx"][0]
    state = E.moving_average_update(E.moving_average_init(), jnp.array([0.5, 0.7]))

    def est(k, p):
        return {b: E.score_function(k, make_normal, p, f, 16, baseline=b,
                                    baseline_state=state).grad
                for b in ("none", "moving_average", "optimal")} | {
            "pathwise": E.pathwise(k, make_normal, p, f, 16).grad}

    keys = jax.random.split(key, 3)
    batched = jax.jit(jax.vmap(est, in_axes=(0, None)))(keys, PARAMS)
    eager = est(keys[2], PARAMS)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[2], batched), eager, rtol=1e-5,
                                atol=1e-6)
    chex.assert_trees_all_equal(est(keys[2], PARAMS), eager)
    assert not np.allclose(batched["none"]["mu"][0], batched["none"]["mu"][1])


@pytest.mark.parametrize("raw", [False, True])
def test_per_sample_keys_give_the_same_estimate(key, raw):
    """Passing sample_keys(key, n) in place of key changes nothing (typed and raw keys)."""
    key = jax.random.key_data(key) if raw else key
    f = COSTS["xsinx"][0]
    keys = E.sample_keys(key, 16)
    assert keys.shape[0] == 16
    for est in (lambda k: E.score_function(k, make_normal, PARAMS, f, 16, baseline="rloo"),
                lambda k: E.pathwise(k, make_normal, PARAMS, f, 16)):
        chex.assert_trees_all_equal(est(keys), est(key))


def test_moving_average_state_does_not_retrace(key):
    """The baseline state is arrays of one structure and dtype from init on: a jitted step
    that threads it through updates traces once."""
    ma = E.moving_average(decay=0.9)
    f = COSTS["xsinx"][0]
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, k):
        est = E.score_function(k, make_normal, PARAMS, f, 16, baseline="moving_average",
                               baseline_state=state)
        return ma.update(state, est.values), est.grad

    state = ma.init()
    grads = []
    for k in jax.random.split(key, 3):
        state, grad = step(state, k)
        grads.append(grad)
    assert float(E.moving_average_value(state)) != 0.0
    assert not np.allclose(grads[0]["mu"], grads[1]["mu"])


def test_standard_error(key):
    per_sample = {"a": jax.random.normal(key, (500, 3)), "b": jnp.arange(8.0)}
    se = E.standard_error(per_sample)
    for name, a in per_sample.items():
        a = np.asarray(a, np.float64)
        np.testing.assert_allclose(se[name], a.std(0, ddof=1) / math.sqrt(a.shape[0]), rtol=1e-5)


def test_dependent_inputs():
    """The jaxpr analysis behind check_reparameterizable: exact through jit, conservative
    elsewhere, and integer values (indices, branches) carry no dependence."""
    args = [jnp.float32(1.0), jnp.float32(2.0), jnp.arange(3.0)]
    assert dependent_inputs(lambda x, y, z: 2 * x + jnp.sum(jnp.sin(z)), 3, args) == {0, 2}
    assert dependent_inputs(lambda x, y, z: jax.jit(lambda u, v: u)(x, y), 3, args) == {0}
    assert dependent_inputs(lambda x, y, z: z[jnp.argmax(y * z)], 3, args) == {2}
    assert dependent_inputs(lambda x, y, z: x * y, 1, args) == {0}  # indices < num_inputs


def test_moving_average_state():
    ma = E.moving_average(decay=0.5)
    s = ma.init()
    assert float(E.moving_average_value(s)) == 0.0
    s = ma.update(s, jnp.array([2.0, 4.0]))
    assert float(E.moving_average_value(s)) == pytest.approx(3.0)  # bias-corrected
    s = ma.update(s, jnp.array([5.0]))
    assert float(E.moving_average_value(s)) == pytest.approx((0.25 * 3 + 0.5 * 5) / 0.75)


def test_leave_one_out_mean():
    v = jnp.array([1.0, 2.0, 6.0])
    np.testing.assert_allclose(E.leave_one_out_mean(v), [4.0, 3.5, 1.5])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"baseline": "bogus"}, "baseline"),
        ({"baseline": "rloo", "num_samples": 1}, "num_samples >= 2"),
        ({"baseline": "moving_average"}, "baseline_state"),
    ],
)
def test_bad_arguments(key, kwargs, match):
    args = {"num_samples": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        E.score_function(key, make_normal, PARAMS, lambda x: x, **args)


def test_bad_shapes(key):
    with pytest.raises(ValueError, match="scalar"):
        E.pathwise(key, make_mvn, jax.tree.map(lambda a: a * jnp.ones(2), PARAMS),
                   lambda x: x, 4)
    with pytest.raises(ValueError, match="batch_shape"):
        E.score_function(key, lambda p: distrax.Normal(p["mu"] * jnp.ones(2), 1.0), PARAMS,
                         lambda x: x, 4)
