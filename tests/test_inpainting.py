"""Inpainting (P3): constraints hold exactly (observed pixels bit-for-bit, values in [0, 1])
for every method on a tiny untrained flow, the pixel methods reach the known constrained
minimizer (or posterior mean) of a separable Gaussian, the latent methods the closed-form
posterior of a linear-Gaussian flow, vmapped batches equal per-image calls, masks, metrics,
baselines against brute force, and the command line's errors.

Compilation dominates the cost, so the flow runs once per method (module fixture) and the
command-line end-to-end test reuses that compilation (same model, shape and step count).
"""

import functools
import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import inpaint as cli
from jaxdnn import inpainting as ip
from jaxdnn.data import to_unit_interval
from jaxdnn.flows import build_model
from jaxdnn.flows.checks import perturb
from jaxdnn.flows.distribution import FlowDistribution

TINY_FLOW = ("glow", {"levels_count": 1, "steps_per_level": 1, "hidden": 4})
FLOW_STEPS = 20
FLOW_OPTIONS = {"latent": {"starts": 2}}  # fewer searches than the default 32
N_FLOW = 3
MISSING = {"hw10": 105, "top_half": 392, "bottom_half": 392, "left_half": 392, "center": 196,
           "random50": 392}


def synthetic_pixels(seed: int, n: int) -> np.ndarray:
    """uint8 (n, 28, 28) with some pixels at 0 and 255 (to_unit_interval keeps them inside)."""
    rng = np.random.default_rng(seed)
    pix = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    pix[:, :4] = 0
    pix[:, -3:] = 255
    return pix


def flow_images() -> jax.Array:
    """Values in [0, 1] including exact 0.0 and 1.0 (the logit flow's worst case)."""
    x = np.asarray(to_unit_interval(synthetic_pixels(0, N_FLOW))).copy()
    x[:, 0, :5] = 0.0
    x[:, 27, :5] = 1.0
    return jnp.asarray(x)


def tiny_flow():
    name, cfg = TINY_FLOW
    model = build_model(name, **cfg)
    params = jax.jit(model.init)(jax.random.key(0), flow_images())  # ActNorm sees real data
    # zero-initialized conditioners make an untrained flow the identity: perturb them so the
    # density couples pixels
    return model, perturb(params, jax.random.key(1), scale=0.2)


@pytest.fixture(scope="module")
def flow_runs():
    model, params = tiny_flow()
    flow = ip.as_flow(model, params)
    x = flow_images()
    mask = ip.make_mask("hw10")
    keys = jax.random.split(jax.random.key(2), N_FLOW)

    class Runs(dict):  # each method runs once, when a test first asks for it
        def __missing__(self, m):
            self[m] = ip.inpaint(flow, x, mask, keys, method=m, steps=FLOW_STEPS, return_losses=True,
                                 **FLOW_OPTIONS.get(m, {}))
            return self[m]

    runs = Runs()
    return {"flow": flow, "lp": flow.log_prob, "x": x, "mask": mask, "keys": keys, "runs": runs,
            "model": (model, params)}


# ----------------------------------------------------------------------------- a Gaussian


MU = jnp.asarray(np.random.default_rng(3).uniform(-0.4, 1.4, (28, 28, 1)), jnp.float32)
SCALE = 0.1


def gaussian_log_prob(x):
    """Independent N(MU, 0.1^2) pixels: the constrained minimizer is clip(MU, 0, 1)."""
    return -0.5 * (((x - MU[None]) / SCALE) ** 2).reshape(x.shape[0], -1).sum(-1)


def gaussian_images(n: int) -> jax.Array:
    return to_unit_interval(synthetic_pixels(5, n))


def test_pgd_reaches_the_constrained_minimizer():
    x = gaussian_images(2)
    mask = ip.make_mask("center")
    out = ip.inpaint(gaussian_log_prob, x, mask, None, method="pgd")  # lr 1e-3, 300 steps
    want = jnp.where(mask, x, jnp.clip(MU, 0.0, 1.0)[None])
    np.testing.assert_allclose(out, want, atol=1e-5)


@pytest.mark.slow
def test_annealed_reaches_the_constrained_minimizer(key):
    x = gaussian_images(2)
    mask = ip.make_mask("top_half")
    res = ip.inpaint(gaussian_log_prob, x, mask, key, method="annealed", return_losses=True)
    want = jnp.where(mask, x, jnp.clip(MU, 0.0, 1.0)[None])
    np.testing.assert_allclose(res.images, want, atol=2e-2)
    chex.assert_shape(res.losses, (2, 300))
    again = ip.inpaint(gaussian_log_prob, x, mask, key, method="annealed")
    np.testing.assert_array_equal(res.images, again)  # deterministic given the key
    other = ip.inpaint(gaussian_log_prob, x, mask, jax.random.key(7), method="annealed",
                       noise_until=1.0)  # noisy to the end: the result depends on the key
    first = ip.inpaint(gaussian_log_prob, x, mask, key, method="annealed", noise_until=1.0)
    assert not np.array_equal(other, first)


@pytest.mark.slow
def test_langevin_estimates_the_posterior_mean(key, optimized_xla):
    """Independent Gaussian pixels restricted to [0, 1]: the posterior mean of a missing pixel
    is the truncated normal's mean, in closed form. (Two runs of 800 steps of 2 x 32 chains:
    running them dominates, so XLA optimizes this test's programs.)"""
    x = gaussian_images(2)
    mask = ip.make_mask("center")
    res = ip.inpaint(gaussian_log_prob, x, mask, key, method="langevin", lr=0.01, steps=800,
                     chains=32, return_losses=True)
    a, b = (0.0 - MU) / SCALE, (1.0 - MU) / SCALE
    norm = jax.scipy.stats.norm
    mean = MU + SCALE * (norm.pdf(a) - norm.pdf(b)) / (norm.cdf(b) - norm.cdf(a))
    want = jnp.where(mask, x, mean[None])
    missing = ~np.broadcast_to(np.asarray(mask), x.shape)
    err = np.abs(np.asarray(res.images) - np.asarray(want))[missing]
    assert err.mean() < 0.01 and err.max() < 0.06, (err.mean(), err.max())
    chex.assert_shape(res.losses, (2, 800))
    again = ip.inpaint(gaussian_log_prob, x, mask, key, method="langevin", lr=0.01, steps=800,
                       chains=32)
    np.testing.assert_array_equal(res.images, again)  # deterministic given the key


@pytest.mark.parametrize("method", [m if m == "pgd" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in ip.PIXEL_METHODS])
def test_vmapped_batch_equals_per_image_calls(method, key):
    x = gaussian_images(3)
    masks = jnp.stack([ip.make_mask(m) for m in ("hw10", "left_half", "bottom_half")])
    keys = jax.random.split(key, 3)
    batch = ip.inpaint(gaussian_log_prob, x, masks, keys, method=method, steps=40)
    chex.assert_shape(batch, (3, 28, 28, 1))
    for i in range(3):
        one = ip.inpaint(gaussian_log_prob, x[i], masks[i], keys[i], method=method, steps=40)
        chex.assert_shape(one, (28, 28, 1))
        np.testing.assert_allclose(one, batch[i], rtol=0, atol=1e-6)
    # one key for the batch means jax.random.split(key, B)
    np.testing.assert_array_equal(
        ip.inpaint(gaussian_log_prob, x, masks, key, method=method, steps=40), batch)


def test_constraints_hold_even_with_nonfinite_gradients(key):
    """sqrt and a NaN region: gradients are inf / NaN, the iterates still obey the box."""

    def nasty(x):
        v = jnp.sqrt(x) + jnp.where(x > 0.9, jnp.nan, 0.0)
        return v.reshape(x.shape[0], -1).sum(-1)

    x = gaussian_images(2)
    mask = ip.make_mask("random50", key)
    for method in ip.PIXEL_METHODS:
        for init in (0.0, 1.0):
            out = np.asarray(ip.inpaint(nasty, x, mask, key, method=method, steps=5, init=init))
            obs = np.broadcast_to(np.asarray(mask), out.shape)
            np.testing.assert_array_equal(out[obs], np.asarray(x)[obs])
            assert np.all((out >= 0) & (out <= 1))


# ----------------------------------------------------------------------------- the flow


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in ("annealed", "langevin") else m
                                    for m in ip.METHODS])
def test_flow_inpainting_keeps_the_constraints_exactly(flow_runs, method):
    res, x, mask = flow_runs["runs"][method], flow_runs["x"], flow_runs["mask"]
    out = np.asarray(res.images)
    chex.assert_shape(out, (N_FLOW, 28, 28, 1))
    chex.assert_shape(res.losses, (N_FLOW, FLOW_STEPS))
    chex.assert_tree_all_finite((res.images, res.losses))
    obs = np.broadcast_to(np.asarray(mask), out.shape)
    np.testing.assert_array_equal(out[obs], np.asarray(x)[obs])  # bit for bit
    assert out.dtype == np.float32
    assert np.all((out >= 0.0) & (out <= 1.0))
    rtol = 1e-4 if jax.default_backend() == "cpu" else 1e-3  # GPUs: TF32 convolutions, other batch shape
    if method in ip.LATENT_METHODS:
        assert len(np.unique(out[~obs])) > 10  # decoded fills, not a constant
        if method == "latent_map":  # the losses are E(z_k): the first one is E(0)
            zeros = [jnp.zeros(s.shape) for s in jax.eval_shape(flow_runs["flow"].encode, x)]
            hyper = ip.LATENT_MAP_DEFAULTS
            e0 = jax.jit(ip.latent_energy)(flow_runs["flow"], zeros, x, jnp.broadcast_to(mask, x.shape),
                                           hyper["noise_std"], hyper["prior_weight"])
            np.testing.assert_allclose(res.losses[:, 0], e0, rtol=rtol)
        return
    init = ip.DEFAULTS[method]["init"]
    assert np.any(out[~obs] != init)  # the missing pixels moved
    # the losses are -log p of the iterates: the first one is the starting image's
    start = jnp.where(mask, x, init)
    np.testing.assert_allclose(res.losses[:, 0], -jax.jit(flow_runs["lp"])(start), rtol=rtol)


@pytest.mark.slow
def test_flow_batch_is_per_image(flow_runs):
    """Reordering the batch (and its keys) reorders the results: images do not interact."""
    perm = np.array([2, 0, 1])
    flow, x, mask, keys = flow_runs["flow"], flow_runs["x"], flow_runs["mask"], flow_runs["keys"]
    for method in ip.METHODS:
        out = ip.inpaint(flow, x[perm], mask, keys[perm], method=method, steps=FLOW_STEPS,
                         **FLOW_OPTIONS.get(method, {}))
        np.testing.assert_allclose(out, flow_runs["runs"][method].images[perm], atol=1e-5)


# ----------------------------------------------------------------------------- latent space


LIN_SHAPE = (4, 4, 1)


def linear_gaussian_flow(seed: int = 4):
    """x = MU_L + L z with z ~ N(0, I) on 4 x 4 images: a flow whose posterior given the observed
    pixels is Gaussian, so its MAP and its posterior mean are one closed form."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(LIN_SHAPE))
    mu = jnp.asarray(rng.uniform(0.35, 0.65, d), jnp.float32)
    lower = jnp.asarray(np.tril(rng.normal(0.0, 0.06, (d, d))) + 0.08 * np.eye(d), jnp.float32)

    def decode(mu, lower, latents):
        (z,) = latents
        return (mu[None] + z.reshape(z.shape[0], -1) @ lower.T).reshape(-1, *LIN_SHAPE)

    def encode(mu, lower, x):
        r = x.reshape(x.shape[0], -1) - mu[None]
        return [jax.scipy.linalg.solve_triangular(lower, r.T, lower=True).T.reshape(-1, *LIN_SHAPE)]

    def prior_log_prob(latents):
        (z,) = latents
        return -0.5 * (z**2).reshape(z.shape[0], -1).sum(-1) - 0.5 * d * np.log(2 * np.pi)

    def log_prob(mu, lower, x):
        (z,) = encode(mu, lower, x)
        return prior_log_prob([z]) - jnp.log(jnp.abs(jnp.diag(lower))).sum()

    partial = jax.tree_util.Partial
    return ip.Flow(partial(log_prob, mu, lower), partial(encode, mu, lower), partial(decode, mu, lower),
                   partial(prior_log_prob)), np.asarray(mu), np.asarray(lower)


def linear_gaussian_posterior_fill(mu, lower, y, observed, s):
    """The missing pixels' posterior mean (= MAP) under x = mu + L z, y_O = x_O + s * noise."""
    o = observed.reshape(-1)
    lo = lower[o]
    precision = lo.T @ lo / s**2 + np.eye(lower.shape[1])
    z = np.linalg.solve(precision, lo.T @ (y.reshape(-1)[o] - mu[o]) / s**2)
    return np.where(o, y.reshape(-1), mu + lower @ z).reshape(LIN_SHAPE)


@pytest.mark.parametrize("method", ip.LATENT_METHODS)
def test_latent_methods_reach_the_linear_gaussian_posterior(method, key):
    flow, mu, lower = linear_gaussian_flow()
    rng = np.random.default_rng(5)
    images = rng.uniform(0.3, 0.7, (2, *LIN_SHAPE)).astype(np.float32)
    masks = rng.random((2, *LIN_SHAPE)) < 0.5
    s = 0.1
    out = ip.inpaint(flow, images, masks, key, method=method, steps=400, noise_std=s,
                     **({"starts": 3} if method == "latent" else {}))
    for i in range(2):
        want = linear_gaussian_posterior_fill(mu, lower, images[i], masks[i], s)
        np.testing.assert_allclose(out[i], want, atol=2e-3)


def test_a_variationally_dequantized_flow_starts_where_its_dequantizer_puts_the_neighbours(flow_runs):
    """With variational dequantization, zero steps return the mean of the k nearest reference
    images as the flow's q dequantizes them (fixed noise), each inside its pixel's bin."""
    name, cfg = TINY_FLOW
    model = build_model(name, **cfg, dequantization="variational", dequantizer_hidden=4, dequantizer_couplings=1)
    params = perturb(jax.jit(model.init)(jax.random.key(0), flow_images()), jax.random.key(1), scale=0.2)
    flow = ip.as_flow(model, params)
    assert flow.dequantize is not None and flow_runs["flow"].dequantize is None
    x, mask = flow_images()[:2], ip.make_mask("top_half")
    pixels = synthetic_pixels(6, 12)
    reference = jnp.asarray(to_unit_interval(pixels))
    zero = ip.inpaint(flow, x, mask, None, method="latent", steps=0, starts=3, reference=reference, rounds=1,
                      temperature=np.inf)
    nearest = np.asarray(ip.nearest_training_images(x, mask, reference, 3))
    starts = jax.jit(flow.dequantize)(pixels[nearest.reshape(-1)], jax.random.key(ip.latent.START_SEED))
    want = jnp.where(mask, x, np.asarray(starts).reshape(2, 3, 28, 28, 1).mean(1))
    np.testing.assert_allclose(zero, want, atol=1e-4)
    assert np.abs(np.asarray(zero) - ip.knn_mean(x, mask, reference, k=3)).max() < 1 / 256


def test_latent_starts_from_the_nearest_reference_images(flow_runs):
    """With a reference set the searches start from encodings of the nearest images: no key
    needed, deterministic, and zero steps return the mean of those starts' decodings, which for
    an exact flow is the k-nearest mean itself."""
    flow, x, mask = flow_runs["flow"], flow_runs["x"], flow_runs["mask"]
    reference = jnp.asarray(to_unit_interval(synthetic_pixels(6, 12)))
    margin = ip.latent.START_MARGIN
    zero = ip.inpaint(flow, x, mask, None, method="latent", steps=0, starts=3, reference=reference, rounds=1,
                      temperature=np.inf)  # equal weights
    want = ip.knn_mean(x, mask, jnp.clip(reference, margin, 1 - margin), k=3)
    np.testing.assert_allclose(zero, want, atol=1e-4)
    out = ip.inpaint(flow, x, mask, None, method="latent", steps=FLOW_STEPS, starts=3, reference=reference)
    np.testing.assert_array_equal(out, ip.inpaint(flow, x, mask, None, method="latent", steps=FLOW_STEPS,
                                                  starts=3, reference=reference))
    obs = np.broadcast_to(np.asarray(mask), out.shape)
    np.testing.assert_array_equal(np.asarray(out)[obs], np.asarray(x)[obs])
    assert np.all((np.asarray(out) >= 0) & (np.asarray(out) <= 1))
    with pytest.raises(ValueError, match="fewer than starts"):
        ip.inpaint(flow, x, mask, None, method="latent", starts=20, reference=reference)


def test_each_round_starts_from_the_reference_images_nearest_to_the_last_estimate(flow_runs):
    """rounds=2 is: one round of searches, then the same search from the `starts` reference images
    nearest to its weighted mean on every pixel; the estimate weighs both rounds' fills together
    and the losses are both rounds'. Without a reference set there is one round: asking for two
    is an error."""
    flow, x, mask = flow_runs["flow"], flow_runs["x"][:1], flow_runs["mask"]
    reference = jnp.asarray(to_unit_interval(synthetic_pixels(6, 12)))
    run = functools.partial(ip.inpaint, flow, method="latent", steps=FLOW_STEPS, starts=3, return_losses=True)
    first = run(x, mask, reference=reference, rounds=1)
    nearest = ip.nearest_training_images(first.images, jnp.ones_like(x, bool), reference, 3)[0]
    # from those 3 images alone the first round's neighbours are exactly them
    second = run(x, mask, reference=reference[nearest], rounds=1)
    both = run(x, mask, reference=reference, rounds=2)
    np.testing.assert_allclose(both.losses, np.concatenate([first.losses, second.losses], axis=1), rtol=1e-5)
    assert run(x, mask, jax.random.key(0)).losses.shape == (1, FLOW_STEPS)  # no reference: one round
    with pytest.raises(ValueError, match="pass a reference set"):
        run(x, mask, jax.random.key(0), rounds=2)


@pytest.mark.slow
def test_hyperparameter_values_do_not_recompile(key):
    """inpaint's promise: one compilation per model, shape, method and step count, whatever the
    hyperparameter values (they are traced arguments, not constants)."""
    x = gaussian_images(2)
    mask = ip.make_mask("center")
    flow, _, _ = linear_gaussian_flow()
    small, small_mask = x[:, :4, :4], mask[:4, :4]
    runs = [(ip.pixel._run_steps, lambda v: ip.inpaint(gaussian_log_prob, x, mask, key, method="annealed", steps=10,
                                                      lr=v, noise=v / 2)),
            (ip.latent._run_steps, lambda v: ip.inpaint(flow, small, small_mask, key, method="latent_map", steps=10,
                                                      lr=v, noise_std=v, prior_weight=2 * v))]
    for jitted, run in runs:
        run(0.01)
        compiled = jitted._cache_size()
        run(0.03)
        assert jitted._cache_size() == compiled


def test_a_flow_type_may_have_its_own_step_count(flow_runs):
    """`steps=None` is `default_steps`: STEPS unless FLOW_STEPS names the flow's type, read from
    a Flow (its static `kind`), a FlowDistribution or the model."""
    model, params = flow_runs["model"]  # a tiny Glow
    flow = flow_runs["flow"]
    assert flow.kind == "Glow"
    glow_steps = ip.FLOW_STEPS[("latent", "Glow")]
    assert ip.default_steps("latent", flow) == ip.default_steps("latent", model) == glow_steps != ip.STEPS["latent"]
    assert ip.default_steps("latent", FlowDistribution(model, params)) == glow_steps
    realnvp = build_model("realnvp", levels_count=1, pairs=1, hidden=4)
    assert ip.default_steps("latent", realnvp) == ip.default_steps("latent") == ip.STEPS["latent"]
    assert ip.default_steps("pgd", flow) == ip.STEPS["pgd"]
    x, mask = flow_runs["x"][:1], flow_runs["mask"]
    for kind, steps in (("Glow", glow_steps), ("", ip.STEPS["latent"])):
        losses = ip.inpaint(flow.replace(kind=kind), x, mask, method="latent", reference=x, starts=1,
                            return_losses=True).losses
        assert losses.shape == (1, ip.LATENT_DEFAULTS["rounds"] * steps)
    with pytest.raises(ValueError, match="unknown method"):
        ip.default_steps("sgd")


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", ip.MASKS)
def test_masks_shapes_and_counts(name, key):
    m = np.asarray(ip.make_mask(name, key))
    assert m.shape == (28, 28, 1) and m.dtype == bool
    assert (~m).sum() == MISSING[name]
    region = {"hw10": np.s_[5:12, 5:20], "top_half": np.s_[:14], "bottom_half": np.s_[14:],
              "left_half": np.s_[:, :14], "center": np.s_[7:21, 7:21]}
    if name in region:
        want = np.ones((28, 28, 1), bool)
        want[region[name]] = False
        np.testing.assert_array_equal(m, want)


def test_random50_is_keyed_and_batch_masks_follow_indices(key):
    a = ip.make_mask("random50", key)
    np.testing.assert_array_equal(a, ip.make_mask("random50", key))
    assert not np.array_equal(a, ip.make_mask("random50", jax.random.key(9)))
    batch = ip.batch_masks("random50", [3, 7], key)
    chex.assert_shape(batch, (2, 28, 28, 1))
    np.testing.assert_array_equal(batch[1], ip.make_mask("random50", jax.random.fold_in(key, 7)))
    np.testing.assert_array_equal(ip.batch_masks("hw10", [0, 1, 2])[2], ip.make_mask("hw10"))
    with pytest.raises(ValueError, match="needs a key"):
        ip.make_mask("random50")
    with pytest.raises(ValueError, match="unknown mask"):
        ip.make_mask("diagonal")


# ----------------------------------------------------------------------------- bad input


def test_check_options_fills_in_the_defaults_and_names_the_bad_setting():
    assert ip.check_options("latent", starts=4) == {**ip.LATENT_DEFAULTS, "starts": 4}
    assert ip.check_options("pgd", lr=0.5)["lr"] == 0.5
    for method, options, match in [("latent", {"starts": 0}, "starts must be an integer >= 1"),
                                   ("latent", {"temperature": -1.0}, "temperature must be > 0"),
                                   ("pgd", {"lr": -1.0}, "lr must be > 0"), ("sgd", {}, "unknown method")]:
        with pytest.raises(ValueError, match=match):
            ip.check_options(method, **options)


@pytest.mark.parametrize("kwargs, match", [
    ({"mask": np.ones((28, 28), bool)}, "shape"),
    ({"mask": np.ones((2, 28, 28, 1), bool)}, "shape"),
    ({"mask": np.full((28, 28, 1), 0.5)}, "0 or 1"),
    ({"mask": np.full((28, 28, 1), "a")}, "dtype"),
    ({"image": np.full((28, 28, 1), 1.5, np.float32)}, r"\[0, 1\]"),
    ({"image": np.full((28, 28, 1), np.nan, np.float32)}, r"\[0, 1\]"),
    ({"image": np.zeros((28, 28, 1), np.uint8)}, "to_unit_interval"),
    ({"image": np.zeros((0, 28, 28, 1), np.float32)}, "empty"),
    ({"method": "sgd"}, "unknown method"),
    ({"method": "annealed", "key": None}, "needs a key"),
    ({"steps": -1}, "steps"),
    ({"init": 2.0}, "init"),
    ({"method": "pgd", "noise": 0.1}, "unknown options"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"method": "latent_map"}, "decoder"),
    ({"method": "pgd", "reference": np.zeros((3, 28, 28, 1), np.float32)}, "reference"),
])
def test_bad_inputs_raise_clear_errors(kwargs, match):
    args = {"image": np.full((28, 28, 1), 0.5, np.float32), "mask": ip.make_mask("hw10"),
            "key": jax.random.key(0), "method": "pgd", "steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        ip.inpaint(gaussian_log_prob, args.pop("image"), args.pop("mask"), args.pop("key"),
                   **args)


# ----------------------------------------------------------------------------- metrics, baselines


def test_masked_metrics_by_hand():
    rng = np.random.default_rng(0)
    x, y = rng.random((4, 28, 28, 1), np.float32), rng.random((4, 28, 28, 1), np.float32)
    m = np.asarray(ip.batch_masks("random50", range(4), jax.random.key(1)))
    want = np.array([((x[i] - y[i])[~m[i]] ** 2).mean() for i in range(4)])
    np.testing.assert_allclose(ip.masked_mse(x, y, m), want, rtol=1e-5)
    np.testing.assert_allclose(ip.masked_psnr(x, y, m), -10 * np.log10(want), rtol=1e-5)
    # observed pixels do not count; a perfect fill reads 100 dB
    z = np.where(m, 0.0, y).astype(np.float32)
    np.testing.assert_allclose(ip.masked_psnr(z, y, m), 100.0)
    with pytest.raises(ValueError, match="uint8 pixels"):
        ip.masked_psnr(x, (y * 255).astype(np.uint8), m)
    with pytest.raises(ValueError, match="one shape"):
        ip.masked_psnr(x, y[:2], m)


def test_mean_fill_and_nearest_neighbor_against_brute_force():
    rng = np.random.default_rng(1)
    train = rng.random((37, 6, 6, 1), np.float32)
    queries = train[[4, 30, 11, 0, 21, 8, 35, 2, 17, 25]] + 0.05 * rng.random(
        (10, 6, 6, 1), np.float32)
    queries = np.clip(queries, 0, 1).astype(np.float32)
    masks = rng.random((10, 6, 6, 1)) < 0.5
    filled = np.asarray(ip.mean_fill(queries, masks, ip.pixel_mean(train)))
    np.testing.assert_allclose(filled, np.where(masks, queries, train.mean(0)[None]), rtol=1e-6)
    d = (((queries[:, None] - train[None]) ** 2) * masks[:, None]).sum((2, 3, 4))
    want_idx = d.argmin(1)
    for chunk, qb in ((8, 4), (64, 512)):  # padded training chunks and a padded query tail
        got, idx = ip.nearest_neighbor(queries, masks, train, chunk_size=chunk, query_batch=qb)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_array_equal(got, np.where(masks, queries, train[want_idx]))
    with pytest.raises(ValueError, match="train_images"):
        ip.nearest_neighbor(queries, masks, train[..., 0])


def test_nearest_training_images_and_knn_mean_against_brute_force():
    rng = np.random.default_rng(2)
    train = rng.random((41, 5, 5, 1), np.float32)
    queries = rng.random((7, 5, 5, 1), np.float32)
    masks = rng.random((7, 5, 5, 1)) < 0.6
    d = (((queries[:, None] - train[None]) ** 2) * masks[:, None]).sum((2, 3, 4))
    want = np.argsort(d, 1, kind="stable")[:, :4]
    for chunk in (6, 64):  # several padded chunks, and one
        np.testing.assert_array_equal(ip.nearest_training_images(queries, masks, train, 4, chunk_size=chunk), want)
    np.testing.assert_allclose(ip.knn_mean(queries, masks, train, k=4),
                               np.where(masks, queries, train[want].mean(1)), rtol=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        ip.nearest_training_images(queries, masks, train, 42)


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("argv, match", [
    (["--mask", "diagonal"], "--mask"),
    (["--model", "vae"], "--model"),
    (["--images", "5:5"], "empty range"),
    (["--images", "3"], "START:STOP"),
    (["--images", "0:10001"], "out of range"),
    (["--images", "a:b"], "integers"),
    (["--method", "sgd"], "--method"),
    (["--steps", "-1"], "--steps"),
    (["--lr", "0"], "--lr"),
    (["--starts", "0"], "--starts must be an integer >= 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--method", "pgd", "--starts", "4"], "with --method latent alone"),
    (["--rounds", "0"], "--rounds must be an integer >= 1"),
])
def test_cli_bad_arguments_exit_2_with_one_line(argv, match, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_cli_missing_pretrained_weights_exit_2(monkeypatch, capsys):
    def no_weights(name):
        raise ValueError(f"no pretrained model {name!r}; shipped: []")

    monkeypatch.setattr(cli.pretrained, "load", no_weights)
    assert cli.main(["--model", "glow", "--images", "0:2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model glow" in err and "pretrained" in err


@pytest.mark.slow
def test_cli_module_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "experiments.inpaint", "--images", "9:2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_settings_record_every_option_the_method_runs_with():
    a = cli.parse_args(["--starts", "4", "--temperature", "inf"])
    assert cli.settings(a, "latent") == {**ip.LATENT_DEFAULTS, "starts": 4, "temperature": "inf"}
    assert json.loads(json.dumps(cli.settings(a, "latent")))["temperature"] == "inf"  # strict JSON


def test_cli_json_end_to_end(flow_runs, monkeypatch, tmp_path, capsys):
    """The whole script on the tiny flow and synthetic data (reuses the fixture's compile)."""
    monkeypatch.setattr(cli.pretrained, "load", lambda name: flow_runs["model"])

    def fake_mnist(split):
        pix = synthetic_pixels(11 if split == "train" else 12, 40 if split == "train" else 10)
        return pix, np.zeros(len(pix), np.uint8)

    monkeypatch.setattr(cli, "load_mnist", fake_mnist)
    argv = ["--model", "glow", "--images", f"2:{2 + N_FLOW}", "--method", "pgd", "--steps",
            str(FLOW_STEPS), "--out", str(tmp_path), "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert tuple(out) == cli.JSON_KEYS
    assert out["images"] == f"2:{2 + N_FLOW}" and out["mask"] == "hw10"
    assert set(out["baselines"]) == {"mean_fill", "nearest_neighbor", "knn_mean"}
    assert out["steps"] == FLOW_STEPS and out["settings"] == ip.PGD_DEFAULTS
    for v in (out["psnr"], out["mse"], out["bpd"], *out["baselines"]["mean_fill"].values()):
        assert np.isfinite(v)
    assert set(out["accuracy"]) == {"method", "mean_fill", "nearest_neighbor", "knn_mean", "ceiling", "floor"}
    assert all(0.0 <= v <= 1.0 for v in out["accuracy"].values())
    assert 0.0 < out["method_seconds"] <= out["seconds"]  # the method's own time, inside the whole call's
    for name, d in out["paired"].items():  # the paired mean is the difference of the means
        assert d["mean"] == pytest.approx(out["psnr"] - out["baselines"][name]["psnr"], abs=1e-9) and d["stderr"] >= 0
    assert (tmp_path / f"inpaint_glow_hw10_pgd_steps{FLOW_STEPS}.png").stat().st_size > 0  # method and options


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in ("annealed", "langevin") else m
                                    for m in ip.METHODS] + ["latent_with_reference", "baselines"])
def test_the_missing_pixels_of_the_input_never_leak_into_the_output(flow_runs, method):
    """Whatever the input holds at its missing pixels, every method's output is bit-identical:
    no method reads the pixels it is asked to fill."""
    x, mask, keys = flow_runs["x"], flow_runs["mask"], flow_runs["keys"]
    noise = jax.random.uniform(jax.random.key(9), x.shape)
    leaked = jnp.where(mask, x, noise)  # the same observed pixels, other missing ones
    if method == "baselines":
        train = jnp.asarray(to_unit_interval(synthetic_pixels(7, 20)))
        for fill in (lambda v: ip.mean_fill(v, mask, ip.pixel_mean(train)),
                     lambda v: ip.nearest_neighbor(v, mask, train)[0], lambda v: ip.knn_mean(v, mask, train, k=3)):
            np.testing.assert_array_equal(fill(x), fill(leaked))
        return
    if method == "latent_with_reference":
        reference = jnp.asarray(to_unit_interval(synthetic_pixels(6, 12)))
        run = lambda v: ip.inpaint(flow_runs["flow"], v, mask, None, method="latent", steps=FLOW_STEPS, starts=2,
                                   reference=reference)
        np.testing.assert_array_equal(run(x), run(leaked))
        return
    again = ip.inpaint(flow_runs["flow"], leaked, mask, keys, method=method, steps=FLOW_STEPS,
                       **FLOW_OPTIONS.get(method, {}))
    np.testing.assert_array_equal(again, flow_runs["runs"][method].images)


@pytest.mark.parametrize("argv, match", [
    (["--observation", "blurred"], "invalid choice"),
    (["--mask", "donut"], "choose from"),
    (["--chains", "1"], "--chains must be an integer >= 2"),
    (["--images", "4990:5010"], "out of range"),
    (["--model", "nowhere"], "neither a shipped model"),
])
def test_posterior_cli_bad_arguments_exit_2_with_one_line(argv, match, capsys):
    from experiments import inpaint_posterior

    with pytest.raises(SystemExit) as exit_:
        inpaint_posterior.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and match in err, err


@pytest.mark.mnist
def test_the_plausibility_classifier_card_and_input_checks():
    """Trained on the training split only, and `accuracy` checks its inputs. (That it reads the
    validation and test digits as its card says, through `plausibility.accuracy`, is
    tests/test_pretrained.py::test_the_classifier_card_is_what_its_metric_command_prints, slow.)"""
    from jaxdnn.data import load_mnist
    from jaxdnn.inpainting import plausibility

    card = plausibility.card()
    assert card["split"].startswith("trained on training images 0..54999")
    assert card["metrics"]["test_accuracy"]["value"] > 0.98
    images, labels = load_mnist("validation")
    with pytest.raises(ValueError, match="one entry per image"):
        plausibility.accuracy(to_unit_interval(images[:3]), labels[:2])
    with pytest.raises(ValueError, match="uint8"):
        plausibility.accuracy(images[:3], labels[:3])
