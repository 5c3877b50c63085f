"""The posterior sampler against closed forms: a Gaussian in logit space with one binned observed
pixel (truncated-normal moments), and a noisy observation integrated on a grid; the scores
against their definitions."""

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm

from jaxdnn.inpainting import posterior

MU = jnp.array([0.3, -0.5, 1.0, 0.0])
A = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.6, 0.8, 0.0, 0.0], [-0.4, 0.3, 0.7, 0.0], [0.2, -0.5, 0.1, 0.6]])
COV = A @ A.T


def _gaussian_in_logits(mu, cov):
    """log p(x) of x (N, 2, 2, 1) in (0, 1)^4 whose logits are N(mu, cov)."""
    prec, logdet = jnp.linalg.inv(cov), jnp.linalg.slogdet(cov)[1]

    def log_prob(x):
        x = x.reshape(x.shape[0], -1)
        t = jnp.log(x) - jnp.log1p(-x)
        d = t - mu[None]
        quad = jnp.einsum("ni,ij,nj->n", d, prec, d)
        jac = -(jnp.log(x) + jnp.log1p(-x)).sum(-1)  # log |dt/dx|
        return -0.5 * quad - 0.5 * logdet - 2.0 * math.log(2 * math.pi) + jac

    return jax.tree_util.Partial(log_prob)


def _truncated_moments(mu, sd, a, b):
    """Mean and variance of N(mu, sd^2) restricted to [a, b]."""
    al, be = (a - mu) / sd, (b - mu) / sd
    z = norm.cdf(be) - norm.cdf(al)
    r = (norm.pdf(al) - norm.pdf(be)) / z
    mean = mu + sd * r
    var = sd**2 * (1 + (al * norm.pdf(al) - be * norm.pdf(be)) / z - r**2)
    return mean, var


def _sample(log_prob, key, starts, data, mask, **kw):
    x, ess, acc = posterior.sample_posterior(log_prob, key, starts, data, mask, warmup=60, draws=5, leapfrog=8, **kw)
    return x, ess, acc


def test_binned_observation_matches_truncated_normal_conditional():
    """Pixel 0 observed in bin 180 (x in [180/256, 181/256)), pixels 1..3 missing: the logits of
    the missing pixels are N(mu_m + S_m0 / S_00 (t0 - mu_0), S_m|0) mixed over t0 ~ N(mu_0, S_00)
    truncated to the bin. The samples' mean and covariance match within Monte Carlo error."""
    chains = 512
    log_prob = _gaussian_in_logits(MU, COV)
    mask = jnp.zeros((1, 2, 2, 1), bool).at[0, 0, 0, 0].set(True)
    data = jnp.full((1, 2, 2, 1), 180.0)
    starts = jax.random.uniform(jax.random.key(1), (1, chains, 2, 2, 1), minval=0.05, maxval=0.95)
    x, ess, acc = _sample(log_prob, jax.random.key(2), starts, data, mask)
    chex.assert_shape(x, (1, chains, 2, 2, 1))
    chex.assert_tree_all_finite((x, ess, acc))
    x0 = np.asarray(x[0, :, 0, 0, 0])
    assert np.all((x0 >= 180 / 256) & (x0 < 181 / 256)), "binned pixel left its bin"
    t = np.asarray(jnp.log(x) - jnp.log1p(-x)).reshape(chains, 4)[:, 1:]

    lo, hi = (math.log(v / (1 - v)) for v in (180 / 256, 181 / 256))
    m0, v0 = _truncated_moments(MU[0], jnp.sqrt(COV[0, 0]), lo, hi)
    beta = COV[1:, 0] / COV[0, 0]
    mean = MU[1:] + beta * (m0 - MU[0])
    cov = COV[1:, 1:] - jnp.outer(COV[1:, 0], COV[0, 1:]) / COV[0, 0] + jnp.outer(beta, beta) * v0

    se = np.sqrt(np.diag(cov) / chains)
    assert np.all(np.abs(t.mean(0) - mean) < 4 * se), (t.mean(0), mean, se)
    emp = np.cov(t.T)
    se_cov = np.sqrt((np.diag(cov)[:, None] * np.diag(cov)[None, :] + np.asarray(cov) ** 2) / chains)
    assert np.all(np.abs(emp - cov) < 4 * se_cov), (emp, cov)
    assert 0.5 < float(acc[0]) <= 1.0


def test_noisy_observation_matches_grid_posterior():
    """Pixel 0 observed as y = x0 + N(0, 0.1^2), the others free: the posterior mean and variance
    of x1 from a 2-D grid over (x0, x1) (x2, x3 integrate out exactly: marginal Gaussian logits)."""
    chains, sigma, y = 512, 0.1, 0.35
    log_prob = _gaussian_in_logits(MU, COV)
    mask = jnp.zeros((1, 2, 2, 1), bool).at[0, 0, 0, 0].set(True)
    data = jnp.full((1, 2, 2, 1), y)
    starts = jax.random.uniform(jax.random.key(3), (1, chains, 2, 2, 1), minval=0.05, maxval=0.95)
    x, _, _ = _sample(log_prob, jax.random.key(4), starts, data, mask, noise_std=sigma)
    x1 = np.asarray(x[0, :, 0, 1, 0])

    g = np.linspace(1e-4, 1 - 1e-4, 1201)
    x0, x1g = np.meshgrid(g, g, indexing="ij")
    t = np.stack([np.log(x0 / (1 - x0)), np.log(x1g / (1 - x1g))], -1) - np.asarray(MU[:2])
    prec = np.linalg.inv(np.asarray(COV[:2, :2]))
    logp = (-0.5 * np.einsum("...i,ij,...j->...", t, prec, t) - np.log(x0 * (1 - x0)) - np.log(x1g * (1 - x1g))
            - 0.5 * (x0 - y) ** 2 / sigma**2)
    w = np.exp(logp - logp.max())
    w /= w.sum()
    mean = (w * x1g).sum()
    var = (w * (x1g - mean) ** 2).sum()
    assert abs(x1.mean() - mean) < 4 * math.sqrt(var / chains), (x1.mean(), mean)
    assert abs(x1.var() - var) < 4 * var * math.sqrt(2 / chains), (x1.var(), var)


def test_scores_against_definitions():
    rng = np.random.default_rng(0)
    samples = jnp.asarray(rng.uniform(size=(2, 5, 2, 2, 1)), jnp.float32)
    targets = jnp.asarray(rng.uniform(size=(2, 2, 2, 1)), jnp.float32)
    masks = jnp.asarray([[[True], [False]], [[False], [False]]])
    s, y, m = np.asarray(samples, np.float64), np.asarray(targets, np.float64), ~np.asarray(masks)
    for i in range(2):
        xs, yt = s[i][:, m], y[i][m]
        k = xs.shape[0]
        pair = np.abs(xs[:, None] - xs[None]).sum((0, 1)) / (2 * k * (k - 1))
        crps = (np.abs(xs - yt).mean(0) - pair).mean()
        assert float(posterior.crps(samples, targets, masks)[i]) == pytest.approx(crps, abs=1e-6)
        dist = np.sqrt(((xs[:, None] - xs[None]) ** 2).sum(-1))
        es = np.sqrt(((xs - yt) ** 2).sum(-1)).mean() - dist.sum() / (2 * k * (k - 1))
        assert float(posterior.energy_score(samples, targets, masks)[i]) == pytest.approx(es, abs=1e-6)
    # an ensemble all at the truth scores 0
    at_truth = jnp.repeat(targets[:, None], 5, 1)
    assert float(posterior.crps(at_truth, targets, masks).max()) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def tiny():
    """A tiny RealNVP (random conditioners) as a FlowDistribution and two synthetic images."""
    from jaxdnn.flows import build_model
    from jaxdnn.flows.distribution import FlowDistribution

    model = build_model("realnvp", levels_count=1, pairs=1, hidden=4)
    x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
    params = model.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    return FlowDistribution(model, params), x


RUN = {"chains": 4, "warmup": 4, "draws": 2, "leapfrog": 2}


@pytest.mark.slow
def test_inpaint_posterior_keeps_bins_and_reports(tiny):
    """K samples per image, binned observed pixels inside their bins, equal weights, finite ESS
    and acceptance, the mean and std of the samples; starts given or drawn from the flow."""
    flow, x = tiny
    mask = jnp.zeros((28, 28, 1), bool).at[:14].set(True)
    starts = jnp.broadcast_to(x[:, None], (2, 4, 28, 28, 1))
    post = posterior.inpaint_posterior(flow, x, mask, jax.random.key(3), starts=starts, **RUN)
    chex.assert_shape((post.samples, post.weights, post.mean, post.ess, post.acceptance),
                      ((2, 4, 28, 28, 1), (2, 4), (2, 28, 28, 1), (2,), (2,)))
    chex.assert_tree_all_finite(post)
    s = np.asarray(post.samples)
    bins = np.floor(np.asarray(x) * 256)
    obs = np.broadcast_to(np.asarray(mask), x.shape)
    assert np.all(np.floor(s * 256)[:, :, obs[0]] == bins[:, None][:, :, obs[0]])
    np.testing.assert_allclose(post.weights, 0.25)
    np.testing.assert_allclose(post.mean, s.mean(1), atol=1e-6)
    lo, hi = post.interval(0.9)
    assert np.all(np.asarray(lo) <= np.asarray(hi))
    assert 0.0 <= post.coverage(x, mask) <= 1.0 and post.width(mask) >= 0.0
    drawn = posterior.inpaint_posterior(flow, x[0], mask, jax.random.key(3), **RUN)  # one image, flow's starts
    chex.assert_shape(drawn.samples, (1, 4, 28, 28, 1))


@pytest.mark.slow
def test_noisy_and_downsampled_observations_run(tiny):
    flow, x = tiny
    mask = jnp.zeros((28, 28, 1), bool).at[:, :14].set(True)
    noisy = posterior.inpaint_posterior(flow, x + 0.1, mask, jax.random.key(4), noise_std=0.1, **RUN)
    blocks = x.reshape(2, 14, 2, 14, 2, 1).mean((2, 4))
    down = posterior.inpaint_posterior(flow, blocks, None, jax.random.key(5), noise_std=0.05, downsample=2, **RUN)
    chex.assert_tree_all_finite((noisy, down))
    chex.assert_shape(down.samples, (2, 4, 28, 28, 1))


@pytest.mark.parametrize("kwargs, match", [
    ({"chains": 1}, "chains must be an integer >= 2"),
    ({"warmup": 2.5}, "warmup must be an integer"),
    ({"noise_std": -1.0}, "noise_std must be"),
    ({"downsample": 3}, "downsample must be 1 or 2"),
    ({"downsample": 2, "noise_std": 0.1}, "pass mask=None"),
])
def test_inpaint_posterior_bad_arguments(kwargs, match):
    """Checked before anything is computed (the flow's parameters are not even read)."""
    from jaxdnn.flows import build_model
    from jaxdnn.flows.distribution import FlowDistribution

    flow, x = FlowDistribution(build_model("realnvp", levels_count=1, hidden=4), None), jnp.zeros((2, 28, 28, 1))
    with pytest.raises(ValueError, match=match):
        posterior.inpaint_posterior(flow, x, jnp.ones((28, 28, 1), bool), jax.random.key(0), **kwargs)


def test_calibration_check_on_an_exact_sampler():
    """Truth and K = 16 samples drawn independently from one distribution per pixel (an exact
    posterior): the plug-in 90% interval covers 0.9 (K - 1) / (K + 1), the 8-bit PIT interval
    0.90, one sample's squared error is 2K / (K + 1) times the sample mean's, and the ranks pass
    the chi-square test."""
    from experiments.posterior_check import calibration

    rng = np.random.default_rng(0)
    centre = rng.uniform(0.2, 0.8, size=(300, 28, 28, 1))
    draw = lambda *shape: np.clip(centre.reshape(300, *[1] * (len(shape) - 4), 28, 28, 1)
                                  + 0.1 * rng.standard_normal(shape), 0.0, 1.0)
    truth, samples = draw(300, 28, 28, 1), draw(300, 16, 28, 28, 1)
    masks = np.ones((300, 28, 28, 1), bool)
    masks[:, 10:18, 10:18] = False  # 64 missing pixels an image, 19,200 in all
    out = calibration(samples, truth, masks)
    n = 300 * 64
    assert out["coverage90_if_exact"] == pytest.approx(0.9 * 15 / 17)
    assert abs(out["coverage90"] - out["coverage90_if_exact"]) < 4 * math.sqrt(0.2 / n) + 0.005
    assert abs(out["coverage90_8bit"] - 0.9) < 4 * math.sqrt(0.09 / n)
    assert out["mse_ratio_if_exact"] == pytest.approx(32 / 17)  # 2K / (K + 1): the mean of K samples
    assert out["mse_ratio"] == pytest.approx(out["mse_ratio_if_exact"], abs=0.05)
    assert out["rank_p"] > 1e-3
    narrow = np.clip(centre[:, None] + 0.05 * rng.standard_normal((300, 16, 28, 28, 1)), 0.0, 1.0)
    wrong = calibration(narrow, truth, masks)  # half the posterior's spread: every check sees it
    assert wrong["rank_p"] < 1e-6 and wrong["coverage90"] < 0.6 and wrong["mse_ratio"] < 1.5


@pytest.mark.mnist
def test_a_chunked_run_saves_each_range_resumes_and_pools(tmp_path, monkeypatch, capsys):
    """`--chunk N` scores the images N at a time, saves each range and reuses it when the command
    runs again; the pooled row is the mean (and paired SE) over every image of every range."""
    from experiments import inpaint_posterior as cli

    calls = []

    def fake_range(a, flow, name, lo, hi, split, train, std, figure_path):
        calls.append((lo, hi))
        n = hi - lo
        per = {e: {k: list(np.arange(lo, hi) * w + off) for k in ("crps", "energy", "psnr", "brier")}
               for e, w, off in (("flow", 1.0, 0.0), ("knn", 1.0, 0.5), ("network+gaussian", 2.0, 0.0))}
        return {"mask": name, "seconds": float(n), "ess": float(lo), "per_image": per,
                "flow": {}, "baselines": {}, "paired": {}}

    monkeypatch.setattr(cli, "score_range", fake_range)
    monkeypatch.setattr(cli, "network_std", lambda *args: None)
    monkeypatch.setattr(cli.pretrained, "load_distribution", lambda source: None)
    argv = ["--split", "test", "--images", "0:5", "--chunk", "2", "--mask", "center", "--out", str(tmp_path), "--json"]
    assert cli.main(argv) == 0
    assert calls == [(0, 2), (2, 4), (4, 5)]
    first = capsys.readouterr().out
    (row,) = json.loads(first)["masks"]
    assert row["images"] == 5 and row["seconds"] == 5.0 and row["ess"] == 2.0
    assert row["flow"]["crps"] == pytest.approx(2.0)
    assert row["baselines"]["network+gaussian"]["crps"] == pytest.approx(4.0)
    diff = -np.arange(5.0)  # flow - network per image
    assert row["paired"]["network+gaussian"]["crps"]["mean"] == pytest.approx(diff.mean())
    assert row["paired"]["network+gaussian"]["crps"]["stderr"] == pytest.approx(diff.std(ddof=1) / np.sqrt(5))
    assert row["paired"]["knn"]["crps"] == {"mean": pytest.approx(-0.5), "stderr": pytest.approx(0.0)}
    assert cli.main(argv) == 0 and calls == [(0, 2), (2, 4), (4, 5)]  # every range reused
    assert capsys.readouterr().out == first
    assert cli.main([*argv, "--chains", "8"]) == 0 and len(calls) == 6  # other settings: run again
