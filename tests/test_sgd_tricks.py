"""Problem 6: the closed form, the exact stationary points, SGD with both estimators,
the variance figures, and the CLI contract."""

from __future__ import annotations

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sgd_tricks as cli
from jaxdnn import sgd_tricks as S

LOCAL = (0.442297, 0.606495, 1.696168)
GLOBAL = (1.366699, 1.962198, 1.664401)
SADDLE = (0.862958, 1.174332)
Z = 4.5


@pytest.mark.parametrize(("mu", "sigma"), [(0.0, 1.0), (0.442297, 0.606495), (2.0, 2.0)])
def test_closed_form_matches_monte_carlo(key, mu, sigma):
    n = 200_000
    x = mu + sigma * jax.random.normal(key, (n,))
    f = np.asarray(S.cost(x), np.float64)
    se = f.std(ddof=1) / math.sqrt(n)
    assert abs(f.mean() - float(S.expected_xsinx(mu, sigma))) < Z * se


@pytest.mark.slow
def test_exact_stationary_points():
    local, glob = S.basin_minima(np.array([[0.0, 1.0], [2.0, 2.0]]))
    saddle = S.stationary_point(0.9, 1.2)
    for point, ref, kind in ((local, LOCAL, "minimum"), (glob, GLOBAL, "minimum"),
                             (saddle, SADDLE, "saddle")):
        assert point.kind == kind
        np.testing.assert_allclose([point.mu, point.sigma], ref[:2], atol=2e-5)
        assert float(jnp.linalg.norm(jax.grad(S.objective_theta)(
            jnp.array([point.mu, math.log(point.sigma)])))) < 1e-4
    np.testing.assert_allclose([local.value, glob.value], [LOCAL[2], GLOBAL[2]], atol=2e-6)
    assert glob.value < local.value
    # the starts go in fixed-size groups: one compilation serves any number of them
    compiled = S._stationary._cache_size()
    assert len(S.basin_minima(np.tile([[0.5, 1.5]], (S._PAD + 1, 1)))) == S._PAD + 1
    np.testing.assert_allclose(S.basin_minimum(2.0, 2.0)[:3], glob[:3], rtol=1e-6)
    assert S._stationary._cache_size() == compiled


@pytest.mark.slow
@pytest.mark.parametrize("estimator", S.ESTIMATORS)
def test_stochastic_gradient_unbiased(key, estimator):
    """Mean of many batch-16 gradients of the whole objective vs jax.grad of the closed form."""
    theta = jnp.array([0.3, -0.2])
    keys = jax.random.split(key, 8_000)
    g = jax.vmap(lambda k: S.stochastic_grad(k, theta, estimator, 16).grad)(keys)
    exact = jax.grad(S.objective_theta)(theta)
    se = jnp.std(g, axis=0, ddof=1) / math.sqrt(g.shape[0])
    assert np.all(np.abs(np.asarray((g.mean(0) - exact) / se)) < Z)


def test_pathwise_sgd_reaches_local_minimum(key):
    """The course's run: pathwise SGD, lr 1e-2, batch 16, 500 iterations from (0, 1)."""
    r = S.run_sgd(key, "reparameterization", average_from=400)
    chex.assert_shape(r.trajectory, (501, 2))
    chex.assert_trees_all_equal(r.trajectory[0], jnp.zeros(2))
    chex.assert_trees_all_equal(r.trajectory[-1], r.final)
    for theta in (r.final, r.averaged):
        dist = math.hypot(float(theta[0]) - LOCAL[0], math.exp(float(theta[1])) - LOCAL[1])
        assert dist < 0.03, (theta, dist)


def test_seeds_vmapped_and_deterministic(key):
    kw = dict(iterations=60, batch=8, baseline="moving_average", average_from=30)
    r = S.run_seeds(key, 3, "log_derivative", **kw)
    chex.assert_shape(r.trajectory, (3, 61, 2))
    chex.assert_tree_all_finite(r)
    one = S.run_sgd(jax.random.fold_in(key, 1), "log_derivative", **kw)
    chex.assert_trees_all_close(one.averaged, r.averaged[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(r.final[0], r.final[1])  # different seeds, different runs


def test_key_and_start_do_not_recompile(key):
    """run_sgd's promise: jit/vmap friendly in key, init_mu, init_tau (traced; the other
    settings are static): another key and start reuse the compiled run_seeds."""
    kw = dict(iterations=60, batch=8, baseline="moving_average", average_from=30)  # as above
    S.run_seeds(key, 3, "log_derivative", **kw)
    compiled = S._run_seeds._cache_size()
    r = S.run_seeds(jax.random.fold_in(key, 7), 3, "log_derivative", init_mu=0.5, init_tau=-0.3,
                    **kw)
    assert S._run_seeds._cache_size() == compiled
    chex.assert_trees_all_close(r.trajectory[:, 0], jnp.broadcast_to(jnp.array([0.5, -0.3]),
                                                                     (3, 2)))


@pytest.mark.slow
def test_variance_figures_at_local_minimum(key):
    """Trace of the per-sample gradient covariance of the E[X sin X] term at the local
    minimum against the exact figures (score 5.36, RLOO over a chunk = mean baseline 2.48,
    per-coordinate optimal baselines 1.32, pathwise 0.83), within 5%."""
    v = S.gradient_variances(key, LOCAL[0], LOCAL[1], num_samples=1 << 21)
    ref = {"log_derivative": 5.36, "log_derivative_rloo": 2.48,
           "log_derivative_optimal_baseline": 1.32, "reparameterization": 0.83}
    for name, value in ref.items():
        assert v[name] == pytest.approx(value, rel=0.05), (name, v[name])
    # RLOO at batch 16 costs a factor about 16/15 over the exact mean baseline
    assert v["log_derivative_rloo_batch16"] == pytest.approx(2.48 * 16 / 15, rel=0.05)
    assert set(v) == set(S.VARIANCE_METHODS)


def test_variance_point_key_and_chunk_do_not_recompile(key):
    """gradient_variances at another point, key and chunk index reuses the compiled chunk
    (the CLI evaluates 2 points x 16 chunks)."""
    small = dict(num_samples=1 << 11, chunk=1 << 10)  # a chunk size of this test only
    compiled = S._variance_chunk._cache_size()
    first = S.gradient_variances(key, 0.0, 1.0, **small)
    second = S.gradient_variances(jax.random.fold_in(key, 1), LOCAL[0], LOCAL[1], **small)
    assert S._variance_chunk._cache_size() == compiled + 1
    assert first != second


def test_bad_sgd_arguments(key):
    with pytest.raises(ValueError, match="estimator"):
        S.run_sgd(key, "bogus")
    with pytest.raises(ValueError, match="lr"):
        S.run_sgd(key, lr=0.0)
    with pytest.raises(ValueError, match="log_derivative"):
        S.run_sgd(key, "reparameterization", baseline="rloo")


# ------------------------------------------------------------------------------- CLI

KEYS = {"exact", "log_derivative", "reparameterization", "variance"}
SMALL = ["--iterations", "40", "--seeds", "2", "--variance-samples", str(1 << 20)]


@pytest.mark.slow
def test_cli_json(tmp_path, capsys):
    assert cli.main([*SMALL, "--json", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    r = json.loads(out)
    assert KEYS <= set(r)
    for name in ("local", "global"):
        assert set(r["exact"][name]) == {"mu", "sigma", "value"}
    np.testing.assert_allclose([r["exact"]["local"]["mu"], r["exact"]["global"]["mu"]],
                               [LOCAL[0], GLOBAL[0]], atol=1e-4)
    for name in ("log_derivative", "reparameterization"):
        assert {"mu", "sigma", "value", "mu_std", "sigma_std"} <= set(r[name])
        assert all(math.isfinite(r[name][k]) for k in ("mu", "sigma", "value"))
    assert set(r["variance"]) >= {"log_derivative", "reparameterization"}
    for v in r["variance"].values():
        assert set(v) == {"start", "optimum"} and all(x > 0 for x in v.values())
    assert (tmp_path / "sgd_tricks_trajectories.png").stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize(
    "argv",
    [["--init-sigma", "0"], ["--iterations", "0"], ["--lr", "-1"], ["--batch", "x"],
     ["--seeds", "0"], ["--bogus"], ["--variance-samples", "1000"],
     ["--average-from", "600"]],
)
def test_cli_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err and "Traceback" not in err
