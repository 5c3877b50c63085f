"""Flow layers and models: one test per property, over a registry of every layer and model."""

import functools
import zlib

import chex
import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm

from jaxdnn.data import logit_transform
from jaxdnn.flows import CONFIGS, build_model, layers
from jaxdnn.flows import MODELS as MODELS_BY_NAME
from jaxdnn.flows.checks import layer_cases, logdet_check, model_cases, perturb, perturbed_params, random_input, to64
from jaxdnn.flows.distribution import FlowBijector, FlowDistribution

LAYERS = layer_cases()
MODELS = model_cases()


@functools.cache
def _layer_setup(name):
    """(module, input, perturbed parameters) of a layer, made once for its tests."""
    mod, shape = LAYERS[name]
    k1, k2 = jax.random.split(jax.random.key(zlib.crc32(name.encode())))  # stable across processes (hash() is salted)
    x = random_input(k1, (3,) + shape[1:], unit_interval=name == "logit")
    return mod, x, perturbed_params(mod, k2, x)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_logdet_matches_brute_force_jacobian(name):
    mod, x, params = _layer_setup(name)
    with jax.enable_x64(True):
        p64 = to64(params)
        reported, brute = logdet_check(lambda v: mod.apply(p64, v), x[:1])
    np.testing.assert_allclose(reported, brute, atol=1e-6, rtol=1e-8)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_round_trip_shapes_and_finiteness(name):
    """Eager and jitted, each round trip holds, and the two agree."""
    mod, x, params = _layer_setup(name)
    fwd = lambda p, v: mod.apply(p, v)
    inv = lambda p, v: mod.apply(p, v, inverse=True)
    forward = {}
    for jit in (False, True):
        f, i = (jax.jit(fwd), jax.jit(inv)) if jit else (fwd, inv)
        y, log_det = f(params, x)
        x_back, inv_log_det = i(params, y)
        chex.assert_shape(log_det, (x.shape[0],))
        chex.assert_tree_all_finite((y, log_det, x_back, inv_log_det))
        np.testing.assert_allclose(x_back, x, atol=1e-5)
        np.testing.assert_allclose(inv_log_det, -log_det, atol=1e-4, rtol=1e-5)
        forward[jit] = y, log_det
    (y_eager, ld_eager), (y, log_det) = forward[False], forward[True]
    # jit and eager agree (to TF32 rounding where GPUs convolve float32 in TF32)
    np.testing.assert_allclose(y, y_eager, atol=1e-5 if jax.default_backend() == "cpu" else 1e-3)
    np.testing.assert_allclose(log_det, ld_eager, atol=1e-4, rtol=1e-5)


class _PerModel(dict):
    """{model name: make(name)}, each made when a test first asks for it (the fast loop, which
    skips RealNVP's model tests, never compiles its `init`)."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, name):
        self[name] = self.make(name)
        return self[name]


@pytest.fixture(scope="module")
def model_inits():
    """(x, initialized parameters of each model, noise key): `init` is the models' costliest
    compilation (seconds each), so it runs once per model for all the model tests."""
    x = random_input(jax.random.key(1), (2, 28, 28, 1), unit_interval=True)
    k_init, k_noise = jax.random.split(jax.random.key(2))  # as perturbed_params(m, key(2), x)
    return x, _PerModel(lambda n: jax.jit(MODELS[n].init)(k_init, x)), k_noise


@pytest.fixture(scope="module")
def model_params(model_inits):
    """(x, parameters of each model): perturbed_params(m, key(2), x, scale=0.02), reusing the
    initialization."""
    x, inits, k_noise = model_inits
    return x, _PerModel(lambda n: perturb(inits[n], k_noise, scale=0.02))


@functools.cache
def _log_prob(name):
    """A model's jitted log_prob, one per model: the tests that call it share its compilation."""
    model = MODELS[name]
    return jax.jit(lambda p, v: model.apply(p, v, method=model.log_prob))


# RealNVP is the costliest model to compile (its init alone ~4 s): its model tests are slow
SLOW_REALNVP = [pytest.param(n, marks=pytest.mark.slow) if n == "realnvp" else n for n in sorted(MODELS)]


@pytest.mark.parametrize("name", SLOW_REALNVP)
def test_model_round_trip_log_prob_and_sample(name, model_params):
    x, all_params = model_params
    model, params = MODELS[name], all_params[name]
    latents, log_det = jax.jit(lambda p, v: model.apply(p, v, method=model.encode))(params, x)
    x_back = jax.jit(lambda p, z: model.apply(p, z, method=model.decode))(params, latents)
    assert float(jnp.abs(x_back - x).max()) <= 1e-4
    assert [z.shape[1:] for z in latents] == [tuple(s) for s in model.apply(params, method=model.latent_shapes)]
    log_prob = _log_prob(name)(params, x)
    chex.assert_shape(log_prob, (2,))
    chex.assert_tree_all_finite((log_prob, log_det))
    samples = jax.jit(lambda p, k: model.apply(p, k, 5, 0.7, method=model.sample))(params, jax.random.key(3))
    chex.assert_shape(samples, (5, 28, 28, 1))
    chex.assert_tree_all_finite(samples)


@pytest.mark.parametrize("name", ["nice", "glow", pytest.param("realnvp", marks=pytest.mark.slow)])
def test_model_logdet_matches_brute_force_jacobian(name, model_params):
    x, all_params = model_params
    model = MODELS[name]
    with jax.enable_x64(True):
        p64 = to64(all_params[name])
        reported, brute = logdet_check(lambda v: model.apply(p64, v, method=model.encode), x[:1])
    np.testing.assert_allclose(reported, brute, rtol=1e-9, atol=1e-6)


def _zero_actnorm(params):
    def fix(path, a):
        keys = [getattr(k, "key", "") for k in path]
        return jnp.zeros_like(a) if "ActNorm_0" in keys else a
    return jax.tree_util.tree_map_with_path(fix, params)


@pytest.mark.parametrize("name", SLOW_REALNVP)
def test_identity_initialized_flow_is_the_base_density_after_preprocessing(name, model_inits):
    """Zero-initialized conditioners make every coupling the identity; with ActNorm set to the
    identity too, log p(x) is the prior density of the preprocessed x plus its log-det. (With
    ActNorm's data-dependent initialization zeroed, parameters initialized on other data serve.)"""
    x = random_input(jax.random.key(4), (2, 28, 28, 1), unit_interval=True)
    params = _zero_actnorm(model_inits[1][name])
    log_prob = _log_prob(name)(params, x)  # the round-trip test's compilation (same shapes)
    if name == "nice":  # no preprocessing, logistic prior
        z = x.reshape(2, -1)
        expected = (-jax.nn.softplus(z) - jax.nn.softplus(-z)).sum(-1)
    else:
        y, log_det = logit_transform(x)
        expected = log_det + norm.logpdf(y).reshape(2, -1).sum(-1)
    np.testing.assert_allclose(log_prob, expected, rtol=1e-5, atol=2e-3)  # float32 sums of 784 terms


def test_invconv1x1_is_invertible_for_any_parameters():
    mod = layers.InvConv1x1()
    x = jax.random.normal(jax.random.key(6), (2, 3, 3, 5))
    params = perturbed_params(mod, jax.random.key(7), x, scale=5.0)
    p = params["params"]
    a = layers.lu_matrix(layers.reverse_permutation(5), p["lower"], p["upper"], p["log_s"])
    sign, logabsdet = jnp.linalg.slogdet(a)
    assert float(jnp.abs(sign)) == 1.0
    np.testing.assert_allclose(logabsdet, p["log_s"].sum(), rtol=1e-4)


def test_actnorm_initializes_from_data_and_loading_never_reinitializes():
    mod = layers.ActNorm()
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(8), (64, 4, 4, 3))
    params = mod.init(jax.random.key(9), x)
    y, _ = mod.apply(params, x)
    np.testing.assert_allclose(y.mean((0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std((0, 1, 2)), 1.0, atol=1e-4)
    other = jax.random.normal(jax.random.key(10), (8, 4, 4, 3))
    y2, _ = mod.apply(params, other)  # same parameters, other data: no re-initialization
    p = params["params"]
    np.testing.assert_allclose(y2, (other + p["loc"][None, None, None]) * jnp.exp(p["log_scale"])[None, None, None],
                               rtol=1e-6)


def test_registry_builds_default_configs_and_rejects_unknown_names():
    for name in CONFIGS:
        assert build_model(name).__class__.__name__.lower() == name
    with pytest.raises(ValueError, match="unknown model"):
        build_model("maf")
    with pytest.raises(ValueError, match="unknown glow config key 'widht'"):
        build_model("glow", widht=3)


@pytest.mark.parametrize("name, overrides, match", [
    ("nice", {"preprocessing": "Logit"}, "must be one of 'none', 'logit'"),
    ("nice", {"hidden": 4.5}, "'hidden' must be int, got 4.5"),
    ("realnvp", {"pairs": True}, "'pairs' must be int"),
    ("glow", {"hiden": 8}, "did you mean 'hidden'"),
])
def test_model_configs_are_typed(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, **overrides)


def test_module_defaults_are_the_registry_configs():
    """One source: a model built directly has the configuration `build_model` gives it."""
    for name, cls in MODELS_BY_NAME.items():
        assert {k: getattr(cls(), k) for k in CONFIGS[name]} == CONFIGS[name]


# ----------------------------------------------------------------------------- the distrax view


@pytest.mark.parametrize("name", ["nice", "glow", pytest.param("realnvp", marks=pytest.mark.slow)])
def test_distrax_bijector_and_distribution_agree_with_the_model(name, model_params):
    """FlowBijector: exact round trip, forward log-det = -inverse log-det (the inverse is the
    model's encode, whose log-det is checked against the brute-force Jacobian above);
    FlowDistribution.log_prob is the model's and composes with distrax (Transformed of the prior
    by the bijector); samples come with their own exact log-density; the tempered density is the
    scaled prior through the same bijector."""
    x, all_params = model_params
    model, params = MODELS[name], all_params[name]
    bij, dist = FlowBijector(model, params), FlowDistribution(model, params)
    assert isinstance(bij, distrax.Bijector) and isinstance(dist, distrax.Distribution)
    z, inv_log_det = bij.inverse_and_log_det(x)
    chex.assert_shape((z, inv_log_det), ((2, 28, 28, 1), (2,)))
    x_back, fwd_log_det = bij.forward_and_log_det(z)
    np.testing.assert_allclose(x_back, x, atol=1e-4)
    np.testing.assert_allclose(fwd_log_det, -inv_log_det, rtol=1e-5, atol=1e-3)
    want = _log_prob(name)(params, x)  # compiled by the round-trip test
    np.testing.assert_allclose(dist.log_prob(x), want, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda d, v: d.log_prob(v))(dist, x), want, rtol=1e-6)
    if name == "nice":  # the cheapest model: any batch shape in front of the event
        chex.assert_shape(dist.log_prob(x[0]), ())
        chex.assert_shape(dist.sample(seed=jax.random.key(4), sample_shape=(1, 2)), (1, 2, 28, 28, 1))
    prior = distrax.Logistic if name == "nice" else distrax.Normal
    base = distrax.Independent(prior(jnp.zeros(x.shape), jnp.ones(x.shape)), 3)  # (2,): rank promotion is an error here
    np.testing.assert_allclose(distrax.Transformed(base, bij).log_prob(x), want, rtol=1e-5, atol=2e-3)
    samples, log_p = dist.sample_and_log_prob(seed=jax.random.key(3), sample_shape=(2,))  # batch 2: compiled
    chex.assert_shape((samples, log_p), ((2, 28, 28, 1), (2,)))
    if name != "nice":  # a logit flow's support: (-e, 1 + e), e ~ 1e-6
        assert float(samples.min()) >= -2e-6 and float(samples.max()) <= 1 + 2e-6
    np.testing.assert_allclose(log_p, dist.log_prob(samples), rtol=0, atol=1e-2)  # log_prob of exactly the draws
    with pytest.raises(ValueError, match="event shape"):
        dist.log_prob(x[..., 0])
    with pytest.raises(ValueError, match="floats"):
        dist.log_prob(jnp.zeros((28, 28, 1), jnp.uint8))
    if name != "nice":  # outside a logit flow's support: -inf, never NaN
        assert float(dist.log_prob(x[0] * 255.0)) == -np.inf and float(dist.log_prob(x[0] - 0.5)) == -np.inf
    # temperature T: the prior scaled by T, the same bijector
    cold = FlowDistribution(model, params, temperature=0.7)
    scaled = distrax.Independent(prior(jnp.zeros(x.shape), 0.7 * jnp.ones(x.shape)), 3)
    np.testing.assert_allclose(cold.log_prob(x), distrax.Transformed(scaled, bij).log_prob(x), rtol=1e-5, atol=2e-3)
    mode = bij.forward(jnp.zeros((2, 28, 28, 1)))  # batch 2 throughout: the shapes compiled above
    np.testing.assert_allclose(FlowDistribution(model, params, 1e-6).sample(seed=jax.random.key(5), sample_shape=(2,)),
                               mode, atol=1e-4)  # T -> 0 decodes the prior's mode
    with pytest.raises(ValueError, match="temperature"):
        FlowDistribution(model, params, temperature=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["realnvp", "glow"])
def test_shipped_flow_samples_come_with_log_prob_of_exactly_themselves(name):
    """Over 256 draws of each shipped flow (float32, some at the logit's saturation, where the
    decode's own log-det of the unrounded draw was up to 56 nats off)."""
    from jaxdnn import pretrained

    flow = pretrained.load_distribution(name)
    x, log_p = flow.sample_and_log_prob(seed=jax.random.key(0), sample_shape=(256,))
    chex.assert_shape((x, log_p), ((256, 28, 28, 1), (256,)))
    assert np.isfinite(np.asarray(log_p)).all()
    np.testing.assert_allclose(log_p, flow.log_prob(x), rtol=0, atol=1e-2)


@pytest.mark.slow
def test_bits_per_dim_is_the_trainers_bound_with_the_models_dequantizer():
    """`FlowDistribution.bits_per_dim` of uint8 pixels is `train.make_eval_fn`'s bound (the
    shipped Glow's variational dequantizer, K = 1 and K = 2) with noise fold_in(key, batch index),
    for (N, 28, 28) and (..., 28, 28, 1) pixels; it is not bits/dim of log_prob at pixel
    centres; bad pixels are refused with a message naming them."""
    from jaxdnn import pretrained, train
    from jaxdnn.data import bits_per_dim, to_unit_interval

    flow = pretrained.load_distribution("glow")
    pixels = np.asarray(jax.random.randint(jax.random.key(0), (6, 28, 28), 0, 256), np.uint8)
    pixels[:, :10] = 0  # MNIST-like: a black border
    key = jax.random.key(3)
    got = flow.bits_per_dim(pixels, key, batch_size=4)  # two batches: 4 and 2 (padded)
    for k in (1, 2):
        want = [train.make_eval_fn(flow.model, k)(flow.params, pixels[lo:hi], jax.random.fold_in(key, i))
                for i, (lo, hi) in enumerate(((0, 4), (4, 6)))]
        got = flow.bits_per_dim(pixels, key, samples=k, batch_size=4)
        np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-5)
    chex.assert_shape(flow.bits_per_dim(pixels.reshape(2, 3, 28, 28, 1), key, batch_size=4), (2, 3))
    at_centres = bits_per_dim(flow.log_prob(to_unit_interval(pixels)))
    assert not np.allclose(at_centres, got, atol=0.1)  # the density at pixel centres is another number
    for bad, match in ((to_unit_interval(pixels), "integers"), (pixels[:, :27], "end in"),
                       (pixels.astype(np.int32) + 1, "0..255")):
        with pytest.raises(ValueError, match=match):
            flow.bits_per_dim(bad, key)
    with pytest.raises(ValueError, match="samples"):
        flow.bits_per_dim(pixels, key, samples=0)


def test_variational_dequantizer_log_q_matches_brute_force_jacobian():
    """log q(u | pixels) = sum log logistic(eps) - log|det du/deps|, the Jacobian by brute force
    (perturbed parameters: not the identity the dequantizer starts as)."""
    from jaxdnn.flows.dequantization import VariationalDequantizer, log_sigmoid_derivative

    mod = VariationalDequantizer(hidden=8, couplings=2)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(7), 4)
    pixels = jnp.floor(jax.random.uniform(k1, (1, 8, 8, 1)) * 256)  # any even size: a 64 x 64 Jacobian
    eps = jax.random.logistic(k2, (1, 8, 8, 1))
    params = perturb(mod.init(k3, pixels, eps), k4, 0.1)  # (larger: sigmoid saturates, 1 - u == 0)
    with jax.enable_x64(True):
        p64, pix64 = to64(params), jnp.asarray(pixels, jnp.float64)

        def log_det_du_deps(e):
            u, log_q = mod.apply(p64, pix64, e)
            return u, log_sigmoid_derivative(e).reshape(1, -1).sum(-1) - log_q

        reported, brute = logdet_check(log_det_du_deps, eps)
        u = np.asarray(mod.apply(p64, pix64, jnp.asarray(eps, jnp.float64))[0])
    np.testing.assert_allclose(reported, brute, atol=1e-6, rtol=1e-8)
    assert abs(reported) > 0.1  # the perturbed dequantizer is not the identity (log-det 0)
    assert 0.0 < u.min() and u.max() < 1.0


def test_variational_dequantization_starts_as_uniform_noise(name="nice"):
    """(The dequantizer lives in the models' base class: one model, the cheapest, stands for all.)
    A model with `dequantization="variational"` holds the same flow parameters as its uniform
    twin (same key) plus a dequantizer that starts as uniform noise: log q = 0 and x = (p + u)/256
    inside each pixel's bin, so the two bounds agree; perturbed, x stays in the bins (their
    closure: float32 rounds p + u up to p + 1 for u within 2^-17 of 1)."""
    uniform = MODELS[name]
    model = uniform.clone(dequantization="variational", dequantizer_hidden=8, dequantizer_couplings=2)
    pixels = (np.random.default_rng(0).random((3, 28, 28)) * 256).astype(np.uint8)
    x0 = jnp.asarray(pixels[..., None] + 0.5) / 256
    params, twin = jax.jit(model.init)(jax.random.key(0), x0), jax.jit(uniform.init)(jax.random.key(0), x0)
    chex.assert_trees_all_equal({k: v for k, v in params["params"].items() if k != "dequantizer"}, twin["params"])
    key = jax.random.key(1)
    x, log_q = model.apply(params, pixels, key, method=model.dequantize)  # eager: exactly 0 (jit reorders sums)
    np.testing.assert_array_equal(log_q, 0.0)
    np.testing.assert_allclose(model.apply(params, pixels, key, method=model.pixel_log_prob),
                               uniform.apply(twin, pixels, key, method=uniform.pixel_log_prob), rtol=1e-5)
    x, log_q = model.apply(perturb(params, jax.random.key(2), 0.1), pixels, key, method=model.dequantize)
    offset = np.asarray(x[..., 0], np.float64) * 256 - pixels
    assert offset.min() >= 0.0 and offset.max() <= 1.0 and 0.1 < offset.std() < 0.5
    assert np.all(np.abs(np.asarray(log_q)) > 1.0)
