"""Problem 1: the log-derivative identity, the VAE's two encoder gradients, and the CLI."""

from __future__ import annotations

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import vae as cli
from jaxdnn import vae as V
from jaxdnn.log_derivative_identity import p1_identity_check

Z = 5.0

TINY = dict(latent=2, hidden=8, depth=1, batch=16)


def test_p1_identity(key):
    """Both sides of the identity agree with the closed form within Monte Carlo error
    (z-scores from the sample count), and a visibly non-zero gradient is at stake."""
    r = p1_identity_check(key, jnp.array([-0.3, -0.5, 1.2]), jnp.array([0.1, -0.6, 0.4]),
                          a=1.5, b=0.5, num_samples=100_000)
    chex.assert_shape(r.exact, (2, 3))
    z_ld, z_pw = r.z_scores()
    assert np.all(np.abs(np.asarray(z_ld)) < Z), z_ld
    assert np.all(np.abs(np.asarray(z_pw)) < Z), z_pw
    assert np.min(np.abs(np.asarray(r.exact))) > 10 * float(np.max(r.log_derivative_stderr))


def test_p1_identity_detects_a_wrong_side(key):
    """Power: the same z-test rejects a right side off by the entropy gradient (1 in
    d/dlog_sigma, i.e. the entropy term counted twice)."""
    r = p1_identity_check(key, jnp.array([0.3]), jnp.array([0.1]), num_samples=100_000)
    wrong = r.exact + jnp.array([[0.0], [1.0]])  # d/dlog_sigma of the entropy counted twice
    z = (r.log_derivative - wrong) / r.log_derivative_stderr
    assert np.max(np.abs(np.asarray(z))) > Z


def _synthetic(key, n=64):
    """Bernoulli means: 4 random prototype images, so there is structure to learn."""
    k1, k2 = jax.random.split(key)
    protos = (jax.random.uniform(k1, (4, 784)) > 0.7).astype(jnp.float32) * 0.9 + 0.05
    return protos[jax.random.randint(k2, (n,), 0, 4)].reshape(n, 28, 28, 1)


# The settings below match test_cli_json's, so that the compiled programs are shared.
CONFIGS = {
    "reparameterization": V.VAEConfig(estimator="reparameterization", samples=2, lr=3e-3,
                                      **TINY),
    "log_derivative": V.VAEConfig(estimator="log_derivative", baseline="rloo", samples=2,
                                  lr=3e-3, **TINY),
}


@pytest.mark.slow
@pytest.mark.parametrize("estimator", sorted(CONFIGS))
def test_training_improves_elbo_on_synthetic_data(key, estimator):
    """30 Adam steps of either estimator raise the ELBO (fixed evaluation key) by a margin;
    the IWAE bound stays above the ELBO."""
    cfg = CONFIGS[estimator]
    k_data, k_init, k_train, k_eval = jax.random.split(key, 4)
    probs = V.as_probabilities(_synthetic(k_data))
    state = V.init_state(k_init, cfg)
    elbo = lambda st: V.evaluate(k_eval, st.params, cfg, probs, num_samples=8)
    history = [elbo(state)]
    batch = probs[None, :16]
    for step in range(30):
        state, metrics = V.train_steps(state, batch, jax.random.fold_in(k_train, step), cfg)
    chex.assert_shape(metrics["elbo"], (1,))
    chex.assert_tree_all_finite(state.params)
    history.append(elbo(state))
    (e0, _), (e30, w30) = history
    assert e30 > e0 + 5.0, history  # nats
    assert w30 >= e30 - 1e-3


def test_train_compiles_one_step_program(key):
    """train's promise: its steps per call divide the epoch's steps, so one compiled
    train_steps serves the whole run (6 steps per epoch, chunk 4 -> 2 calls of 3 steps)."""
    cfg = CONFIGS["reparameterization"]
    compiled = V.train_steps._cache_size()
    state, history = V.train(key, cfg, _synthetic(key, 96), epochs=2, chunk=4)
    assert V.train_steps._cache_size() == compiled + 1
    assert [h["epoch"] for h in history] == [1, 2] and int(state.step) == 12


@pytest.mark.slow
def test_one_gradient_step_decreases_loss(key):
    """A small step along minus the reparameterized gradient lowers the loss at a fixed
    key (the same binarization and latent noise)."""
    cfg = CONFIGS["reparameterization"]
    params = V.init_state(key, cfg).params
    x = V.binarize(jax.random.key(1), V.as_probabilities(_synthetic(key, 16)))
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda p: V.surrogate_loss(p, jax.random.key(2), x, cfg)[0]))
    loss0, grads = loss_and_grad(params)
    step = 1e-2 / float(optax.tree.norm(grads))
    loss1, _ = loss_and_grad(jax.tree.map(lambda p, g: p - step * g, params, grads))
    assert float(loss1) < float(loss0)


@pytest.mark.slow
def test_encoder_gradients_agree_in_expectation(key):
    """Log-derivative and pathwise encoder gradients estimate the same vector: z-test of
    their difference over 2048 independent one-sample estimates each, on the encoder's
    output layer and first-layer bias (44 coordinates)."""
    cfg_pw = V.VAEConfig(estimator="reparameterization", **TINY)
    cfg_ld = cfg_pw._replace(estimator="log_derivative")
    k_init, k_data, k_s = jax.random.split(key, 3)
    params = V.init_state(k_init, cfg_pw).params
    x = V.binarize(k_data, V.as_probabilities(_synthetic(k_data, 1)))

    def watched(g):
        enc = g["params"]["encoder"]
        return jnp.concatenate([enc["Dense_0"]["bias"], enc["Dense_1"]["kernel"].ravel(),
                                enc["Dense_1"]["bias"]])

    @jax.jit
    def stats(keys):
        def one(k):
            g = [watched(jax.grad(lambda p, c=c: V.surrogate_loss(p, k, x, c)[0])(params))
                 for c in (cfg_pw, cfg_ld)]
            return jnp.stack(g)

        g = jax.vmap(one)(keys)  # (n, 2, 44)
        return g.mean(0), g.var(0, ddof=1) / g.shape[0]

    mean, var = (np.asarray(a, np.float64) for a in stats(jax.random.split(k_s, 2048)))
    chex.assert_shape(mean, (2, 44))
    se = np.sqrt(var[0] + var[1])
    live = se > 0  # a dead ReLU unit has exactly zero gradient under both estimators
    assert live.sum() >= 20
    np.testing.assert_allclose(mean[0][~live], mean[1][~live], atol=1e-7)
    z = (mean[1] - mean[0])[live] / se[live]
    assert np.all(np.abs(z) < 4.5), z  # Bonferroni over <= 44 coordinates
    assert float(jnp.max(jnp.abs(mean[0]))) > 0.1  # a non-trivial gradient is compared


def test_shapes_and_outputs(key):
    cfg = CONFIGS["log_derivative"]
    state = V.init_state(key, cfg)
    imgs = _synthetic(key, 10)
    recon = V.reconstruct(key, state.params, cfg, imgs)
    samples = V.sample(key, state.params, cfg, 64)
    chex.assert_shape(recon, (10, 28, 28, 1))
    chex.assert_shape(samples, (64, 28, 28, 1))
    for a in (recon, samples):
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    uint8 = (np.asarray(imgs[..., 0]) * 255).astype(np.uint8)
    chex.assert_trees_all_close(V.as_probabilities(uint8), V.as_probabilities(imgs), atol=1e-2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"estimator": "bogus"}, "estimator"), ({"baseline": "rloo"}, "baseline"),
     ({"estimator": "log_derivative", "baseline": "rloo", "samples": 1}, "samples"),
     ({"latent": 0}, "latent")],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        V.VAEConfig(**kwargs).validate()


# ------------------------------------------------------------------------------- CLI


@pytest.mark.slow
@pytest.mark.mnist
def test_cli_json(tmp_path, capsys):
    estimator = "log_derivative"  # the other path is the default of every library test
    argv = ["--estimator", estimator, "--epochs", "2", "--train-size", "16", "--test-size",
            "64", "--batch", "16", "--hidden", "8", "--latent", "2", "--depth", "1",
            "--lr", "3e-3", "--iwae-samples", "8", "--json", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"estimator", "epochs", "test_elbo", "test_iwae"} <= set(r)
    assert r["estimator"] == estimator and r["epochs"] == 2
    assert r["baseline"] == "rloo" and r["samples"] == 2  # the default equal sample budget
    assert math.isfinite(r["test_elbo"]) and r["test_elbo"] < 0
    assert r["test_iwae"] >= r["test_elbo"] - 1e-3
    for name in ("reconstructions", "samples"):
        assert (tmp_path / f"vae_{estimator}_{name}.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv",
    [[], ["--estimator", "bogus"], ["--estimator", "reparameterization", "--epochs", "-1"],
     ["--estimator", "reparameterization", "--baseline", "rloo"],
     ["--estimator", "log_derivative", "--samples", "1", "--baseline", "rloo"],
     ["--estimator", "reparameterization", "--lr", "0"],
     ["--estimator", "reparameterization", "--batch", "0"]],
)
def test_cli_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err and "Traceback" not in err
