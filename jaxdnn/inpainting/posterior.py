"""The flow's posterior over an image given an observation of it, sampled at temperature 1 by HMC.

Target: p(x | y) proportional to p(x) p(y | x), p the flow's density on [0, 1]^784 and y one of
- a mask with the observed pixels known to their 8-bit bin (`noise_std=0`, the default): the
  likelihood is 1[floor(256 x_o) = y_o]; the observed pixels' place inside their bins (their
  dequantization noise) is sampled alongside the missing pixels, so the missing pixels' marginal
  is exactly p(x_m | x_o in its bins): the density the flow was trained on, never at bin centres;
- the masked pixels with Gaussian noise, y_o = x_o + N(0, noise_std^2);
- 2x2 block means with Gaussian noise (`downsample=2`): y = avgpool(x) + N(0, noise_std^2), 14x14.

Every pixel is sampled in unconstrained coordinates t: x = sigmoid(t) for a free pixel,
x = (y_o + sigmoid(t)) / 256 for a binned one, the log-Jacobians added, so the constraint holds
exactly at every step. Hamiltonian Monte Carlo (exact in the limit: Metropolis-adjusted) runs
`chains` chains per image from given starts (they set where the chains begin, never the target;
`inpaint_posterior` places them inside their bins with the flow's own dequantizer);
during `warmup` iterations each image's step size is tuned by blackjax's dual averaging on its
chains' mean acceptance and its diagonal mass matrix set to the variance of its chains' states
(two windows); then `draws` iterations are kept for the effective sample size, and the chains'
last states are the samples. The leapfrog loop is Python over one jitted gradient of the whole
batch: XLA:CPU compiles and runs a flow's gradient inside lax loops (blackjax's integrators)
far slower.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxdnn.data.preprocess import to_pixels
from jaxdnn.flows.distribution import FlowDistribution
from jaxdnn.inpainting.baselines import nearest_training_images
from jaxdnn.inpainting.latent import as_flow
from jaxdnn.inpainting.masks import check_images, check_mask

__all__ = ["POSTERIOR_DEFAULTS", "Posterior", "block_means", "crps", "energy_score", "inpaint_posterior",
           "sample_posterior"]

# chains per image, warm-up and kept iterations, leapfrog steps per iteration, target acceptance
POSTERIOR_DEFAULTS = {"chains": 32, "warmup": 40, "draws": 10, "leapfrog": 10, "acceptance": 0.7}


class Posterior(NamedTuple):
    """Samples of each image's posterior (`inpaint_posterior`).

    samples (B, K, H, W, C): K completions per image (the chains' last states; observed pixels
    inside their bins, or free where the observation is noisy); weights (B, K): equal (1 / K);
    mean and std (B, H, W, C): per-pixel sample mean and standard deviation; ess (B,): the
    effective sample size of the kept draws (median over the unobserved pixels, blackjax's
    multi-chain estimate over chains x draws); acceptance (B,): mean acceptance of the kept draws."""

    samples: jax.Array
    weights: jax.Array
    mean: jax.Array
    std: jax.Array
    ess: jax.Array
    acceptance: jax.Array

    def interval(self, level: float = 0.9) -> tuple[jax.Array, jax.Array]:
        """Per-pixel (1 - level)/2 and (1 + level)/2 sample quantiles (linear), each (B, H, W, C).
        From K exact samples they cover a new draw with probability level (K - 1) / (K + 1)."""
        q = jnp.quantile(self.samples, jnp.array([(1.0 - level) / 2, (1.0 + level) / 2]), axis=1)
        return q[0], q[1]

    def coverage(self, targets, masks, level: float = 0.9) -> float:
        """The fraction of the missing pixels (mask False) of `targets` inside their `interval(level)`."""
        lo, hi = (np.asarray(v) for v in self.interval(level))
        targets = np.asarray(targets)
        return float(((lo <= targets) & (targets <= hi))[_missing(masks, targets.shape)].mean())

    def width(self, masks, level: float = 0.9) -> float:
        """The mean width of `interval(level)` over the missing pixels (mask False)."""
        lo, hi = (np.asarray(v) for v in self.interval(level))
        return float((hi - lo)[_missing(masks, lo.shape)].mean())


def _missing(masks, shape) -> np.ndarray:
    return ~np.broadcast_to(np.asarray(masks, bool), shape)


# ----------------------------------------------------------------------------- scores


def crps(samples, targets, masks) -> jax.Array:
    """The fair (unbiased) CRPS of an ensemble, per image (B,), averaged over the missing pixels:
    mean_k |x_k - y| - sum_{j,k} |x_j - x_k| / (2 K (K - 1)) (Ferro 2014). samples (B, K, ...)."""
    k = samples.shape[1]
    miss = ~jnp.broadcast_to(masks, targets.shape)
    skill = jnp.abs(samples - targets[:, None]).mean(1)
    # sum_{j,k} |x_j - x_k| from the sorted sample: sum_i (2i - K - 1) x_(i), i = 1..K
    ranks = (2.0 * jnp.arange(1, k + 1) - k - 1).reshape(1, k, *([1] * (samples.ndim - 2)))
    spread = 2.0 * (jnp.sort(samples, axis=1) * ranks).sum(1) / (2.0 * k * (k - 1))
    per_pixel = skill - spread
    return (per_pixel * miss).sum((1, 2, 3)) / miss.sum((1, 2, 3))


def energy_score(samples, targets, masks) -> jax.Array:
    """The fair energy score per image (B,) over the missing pixels as one vector:
    mean_k ||x_k - y|| - sum_{j != k} ||x_j - x_k|| / (2 K (K - 1)) (Gneiting & Raftery 2007)."""
    k = samples.shape[1]
    miss = ~jnp.broadcast_to(masks, targets.shape)
    m = miss[:, None].reshape(samples.shape[0], 1, -1)
    s = samples.reshape(*samples.shape[:2], -1) * m
    y = targets.reshape(targets.shape[0], 1, -1) * m
    skill = jnp.sqrt(((s - y) ** 2).sum(-1)).mean(1)
    d = jnp.sqrt(jnp.maximum(((s[:, :, None] - s[:, None]) ** 2).sum(-1), 0.0))
    return skill - d.sum((1, 2)) / (2.0 * k * (k - 1))


# ----------------------------------------------------------------------------- target


def block_means(x):
    """The 2x2 block means (B, H/2, W/2, C) of images (B, H, W, C): the downsampled observation."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))


def _log_target(log_prob, t, data, mask, noise_std, binned: bool, downsample: int):
    """log p(x(t)) + log p(y | x(t)) + log|dx/dt| per chain, t (N, H, W, C) unconstrained."""
    x = _pixels(t, data, mask, binned)
    log_jac = (jax.nn.log_sigmoid(t) + jax.nn.log_sigmoid(-t)).sum((1, 2, 3))
    if binned:  # the likelihood is the bins' indicator, exact by construction
        log_lik = 0.0
    elif downsample > 1:
        log_lik = -0.5 * ((block_means(x) - data) ** 2).sum((1, 2, 3)) / noise_std**2
    else:
        log_lik = -0.5 * (jnp.where(mask, x - data, 0.0) ** 2).sum((1, 2, 3)) / noise_std**2
    return log_prob(x) + log_lik + log_jac


@functools.partial(jax.jit, static_argnums=3)
def _pixels(t, data, mask, binned: bool):
    s = jax.nn.sigmoid(t)
    if not binned:
        return s
    # below 1 - 2^-15 so that float32 rounding of (y + s) / 256 never reaches the next bin
    return jnp.where(mask, (data + jnp.minimum(s, 1.0 - 2.0**-15)) / 256.0, s)


@functools.partial(jax.jit, static_argnums=3)
def _coordinates(x, data, mask, binned: bool):
    """The inverse of `_pixels` (x moved inside its bin where binned)."""
    u = jnp.clip(x, 1e-4, 1 - 1e-4)
    if binned:
        u = jnp.where(mask, jnp.clip(x * 256.0 - data, 1e-3, 1 - 1e-3), u)
    return jnp.log(u) - jnp.log1p(-u)


@functools.partial(jax.jit, static_argnames=("binned", "downsample"))
def _value_and_grad(log_prob, t, data, mask, noise_std, binned, downsample):
    lp, vjp = jax.vjp(lambda t: _log_target(log_prob, t, data, mask, noise_std, binned, downsample), t)
    return lp, vjp(jnp.ones_like(lp))[0]


@functools.cache
def _dual_averaging(acceptance: float):
    """blackjax's dual averaging of the step size, vmapped over images and jitted: (init, update, final)."""
    import blackjax  # here, not at import: importing blackjax starts a JAX backend (jaxdnn.distributed)

    init, update, final = blackjax.adaptation.step_size.dual_averaging_adaptation(acceptance)
    return jax.jit(jax.vmap(init)), jax.jit(jax.vmap(update)), jax.jit(jax.vmap(final))


@functools.partial(jax.jit, static_argnums=6)
def _begin(key, t, lp, g, step, inv_mass, k: int):
    """Fresh momenta p ~ N(0, M), the starting energy and the first half step: (the next key, the
    key of the Metropolis test, p after the half step, H0, the step size per chain)."""
    key, k_mom, k_acc = jax.random.split(key, 3)
    step_k = jnp.repeat(step, k).reshape(-1, *[1] * (t.ndim - 1))
    p = jax.random.normal(k_mom, t.shape) / jnp.sqrt(inv_mass)
    return key, k_acc, p + 0.5 * step_k * g, -lp + _kinetic(p, inv_mass), step_k


@functools.partial(jax.jit, static_argnums=11)
def _finish(key, t0, lp0, g0, h0, t, p, lp, g, step, inv_mass, b: int):
    """The last half momentum step and the Metropolis test: (t, log p, grad, each image's mean
    acceptance probability)."""
    p = p + 0.5 * step * g
    h1 = -lp + _kinetic(p, inv_mass)
    prob = jnp.where(jnp.isfinite(h1), jnp.minimum(1.0, jnp.exp(h0 - h1)), 0.0)
    take = jax.random.uniform(key, prob.shape) < prob
    pick = lambda new, old: jnp.where(take.reshape(-1, *[1] * (new.ndim - 1)), new, old)
    return pick(t, t0), pick(lp, lp0), pick(g, g0), prob.reshape(b, -1).mean(1)


def sample_posterior(log_prob, key, starts, data, mask, *, noise_std=None, downsample: int = 1,
                     warmup: int = POSTERIOR_DEFAULTS["warmup"], draws: int = POSTERIOR_DEFAULTS["draws"],
                     leapfrog: int = POSTERIOR_DEFAULTS["leapfrog"],
                     acceptance: float = POSTERIOR_DEFAULTS["acceptance"], tick=None):
    """HMC on `_log_target` for a batch of B observations with K chains each (the module docstring).

    log_prob: a `jax.tree_util.Partial` x (N, H, W, C) -> log p(x) (N,). starts (B, K, H, W, C)
    in [0, 1] (binned pixels are moved inside their bins). data: (B, H, W, C) 8-bit values of the
    observed pixels (noise_std None: bins), noisy values, or (B, H/2, W/2, C) noisy block means
    (downsample 2). mask (B, H, W, C) bool (True = observed; all True for downsampling).
    tick: called after each iteration (a progress bar's update), or None.
    Returns (x (B, K, H, W, C), ess (B,), acceptance (B,))."""
    b, k = starts.shape[:2]
    shape = starts.shape[2:]
    binned = noise_std is None
    sigma = jnp.float32(1.0 if binned else noise_std)
    data_k, mask_k = jnp.repeat(data, k, axis=0), jnp.repeat(mask, k, axis=0)

    def value_and_grad(t):
        return _value_and_grad(log_prob, t, data_k, mask_k, sigma, binned, downsample)

    def iteration(key, t, lp, g, step, inv_mass):
        key, k_acc, pp, h0, step_k = _begin(key, t, lp, g, step, inv_mass, k)
        tt = t
        for i in range(leapfrog):
            tt = _drift(tt, pp, step_k, inv_mass)
            lpp, gg = value_and_grad(tt)
            if i < leapfrog - 1:
                pp = _kick(pp, gg, step_k)
        return key, *_finish(k_acc, t, lp, g, h0, tt, pp, lpp, gg, step_k, inv_mass, b)

    t = _coordinates(starts.reshape(b * k, *shape), data_k, mask_k, binned)
    lp, g = value_and_grad(t)
    inv_mass = jnp.ones_like(t)
    da_init, da_update, da_final = _dual_averaging(acceptance)
    da = da_init(jnp.full((b,), 0.05))
    step = jnp.exp(da.log_step_size)
    windows = (warmup // 4, warmup // 2, warmup)  # identity mass, then two variance windows
    trace, kept, accepted = [], [], []
    for it in range(warmup + draws):
        key, t, lp, g, acc = iteration(key, t, lp, g, step, inv_mass)
        if it < warmup:
            da = da_update(da, acc)
            step = jnp.exp(da.log_step_size)
            if it >= windows[0]:
                trace.append(t)
            if it + 1 in windows[1:]:
                inv_mass = _window_variance(trace, b, k)
                trace = []
                if it + 1 < warmup:  # restart the step size search for the new metric
                    da = da_init(da_final(da))
                    step = jnp.exp(da.log_step_size)
            if it + 1 == warmup:
                step = da_final(da)
        else:
            kept.append(_pixels(t, data_k, mask_k, binned))
            accepted.append(acc)
        if tick is not None:
            tick()
    x = _pixels(t, data_k, mask_k, binned).reshape(b, k, *shape)
    free = ~mask.reshape(b, -1) if downsample == 1 else jnp.ones((b, math.prod(shape)), bool)
    ess = _ess(kept, free, b, k) if draws > 1 else jnp.full((b,), jnp.nan)
    return x, ess, jnp.stack(accepted).mean(0)


@jax.jit
def _kick(p, g, step):
    return p + step * g


@jax.jit
def _kinetic(p, inv_mass):
    return 0.5 * (p * p * inv_mass).reshape(p.shape[0], -1).sum(-1)


@jax.jit
def _drift(t, p, step, inv_mass):
    return t + step * inv_mass * p


@functools.partial(jax.jit, static_argnums=(1, 2))
def _window_variance(states, b, k):
    """Each image's diagonal inverse mass matrix: the variance of its chains' states over the
    window (across chains and iterations: chains that start apart and move slowly would
    understate it within each chain), shrunk towards 1e-3 (Stan's regularization)."""
    trace = jnp.stack(states)
    n = trace.shape[0] * k
    var = trace.reshape(trace.shape[0], b, k, *trace.shape[2:]).var((0, 2))
    var = (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))
    return jnp.repeat(var, k, axis=0)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _ess(kept, free, b: int, k: int):
    """kept: D draws (B K, H, W, C) -> the median over the free pixels of blackjax's effective
    sample size of each image's K chains x D draws."""
    import blackjax

    draws = jnp.stack([d.reshape(b, k, -1) for d in kept], 2)  # (B, K, D, P)
    ess = jax.vmap(lambda d: blackjax.diagnostics.effective_sample_size(d, chain_axis=0, sample_axis=1))(draws)
    ess = jnp.where(free & jnp.isfinite(ess), ess, jnp.nan)
    return jnp.nanmedian(ess, axis=1)




# ----------------------------------------------------------------------------- entry point


def inpaint_posterior(flow: FlowDistribution, image, mask, key, *, reference=None, starts=None,
                      noise_std: float = 0.0, downsample: int = 1, chains: int = POSTERIOR_DEFAULTS["chains"],
                      warmup: int = POSTERIOR_DEFAULTS["warmup"], draws: int = POSTERIOR_DEFAULTS["draws"],
                      leapfrog: int = POSTERIOR_DEFAULTS["leapfrog"], batch_chains: int = 128,
                      progress: bool = False) -> Posterior:
    """Samples the flow's posterior (temperature 1) of each image given its observation.

    flow: a `FlowDistribution` (e.g. `jaxdnn.pretrained.load_distribution("realnvp")`).
    image: (H, W, C) or (B, H, W, C). With downsample=1, values in [0, 1] of which the masked
        pixels are observed: their 8-bit bins floor(256 x) (noise_std 0), or the values
        themselves under Gaussian noise of std `noise_std`. With downsample=2, the observed
        2x2 block means (B, 14, 14, 1) under Gaussian noise `noise_std` (> 0); mask must be None.
    mask: bool or 0/1, (H, W, C) or (B, H, W, C), True = observed.
    key: a `jax.random.key`. reference: training images (N, H, W, C); the chains start from the
        `chains` nearest to each image on its observed pixels (nearest to the upsampled
        observation when downsampling). starts: (B, K, H, W, C) starting images instead.
        Neither: starts are the flow's own draws. Starts do not enter the target.
    chains, warmup, draws, leapfrog: `POSTERIOR_DEFAULTS`; cost: chains x (warmup + draws) x
        leapfrog gradients of the flow per image. batch_chains: chains run in one batch (XLA:CPU
        is fastest near 128; images are processed in groups of min(batch_chains // chains, B),
        each with its own key, so a result depends on the group size).
    Returns a `Posterior` with K = chains samples per image (the result always has the batch axis).
    """
    if not isinstance(flow, FlowDistribution):
        raise ValueError(f"flow must be a FlowDistribution (jaxdnn.pretrained.load_distribution), got "
                         f"{type(flow).__name__}")
    if flow.temperature != 1.0:
        raise ValueError(f"the posterior is the flow's at temperature 1, got temperature {flow.temperature}")
    counts = (("chains", chains, 2), ("warmup", warmup, 4), ("draws", draws, 1), ("leapfrog", leapfrog, 1),
              ("downsample", downsample, 1), ("batch_chains", batch_chains, 1))
    for name, value, low in counts:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if downsample not in (1, 2):
        raise ValueError(f"downsample must be 1 or 2, got {downsample!r}")
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    image = jnp.asarray(image, jnp.float32)
    images = image[None] if image.ndim == 3 else image
    if images.ndim != 4:
        raise ValueError(f"image must have shape (H, W, C) or (B, H, W, C), got {image.shape}")
    n = images.shape[0]
    full = flow.event_shape
    if downsample == 2:
        if mask is not None:
            raise ValueError("downsample=2 observes every 2x2 block mean: pass mask=None")
        if noise_std <= 0:
            raise ValueError("downsample=2 needs noise_std > 0 (block means are observed with Gaussian noise)")
        if images.shape[1:] != (full[0] // 2, full[1] // 2, full[2]):
            raise ValueError(f"with downsample=2, image must have shape (B, {full[0] // 2}, {full[1] // 2}, "
                             f"{full[2]}), got {images.shape}")
        masks = jnp.ones((n, *full), bool)
        data, guide = images, jnp.repeat(jnp.repeat(images, 2, 1), 2, 2).clip(0, 1)
    else:
        if noise_std == 0:
            images = check_images(images, "image")
        masks = jnp.broadcast_to(check_mask(mask, images.shape[1:] if jnp.ndim(mask) <= 3 else images.shape,
                                            "mask"), images.shape)
        data = to_pixels(images)[..., None].astype(jnp.float32) if noise_std == 0 else images
        guide = images.clip(0, 1)
    k_start, k_run = jax.random.split(key)
    if starts is not None:
        starts = check_images(starts, "starts")
        if starts.shape != (n, chains, *full):
            raise ValueError(f"starts must have shape {(n, chains, *full)}, got {starts.shape}")
    elif reference is not None:
        reference = check_images(reference, "reference")
        observed = masks if downsample == 1 else jnp.ones_like(masks)
        starts = reference[nearest_training_images(guide, observed, reference, k=chains)]
    else:
        starts = jnp.clip(flow.sample(seed=k_start, sample_shape=(n, chains)), 0.0, 1.0)
    starts = _dequantize(flow, starts, data if (noise_std == 0 and downsample == 1) else None, masks,
                         jax.random.fold_in(k_start, 1))
    log_prob = as_flow(flow.model, flow.params).log_prob
    sigma = None if (noise_std == 0 and downsample == 1) else float(noise_std)
    size = max(1, min(batch_chains // chains, n))  # images per sampler call: ~batch_chains chains together
    outs, groups = [], range(0, n, size)
    bar = tqdm(total=len(groups) * (warmup + draws), desc="HMC", unit="it", disable=not progress)
    for lo in groups:
        idx = np.minimum(np.arange(lo, lo + size), n - 1)  # the tail repeats the last image: one shape
        outs.append(sample_posterior(log_prob, jax.random.fold_in(k_run, lo), starts[idx], data[idx], masks[idx],
                                     noise_std=sigma, downsample=downsample, warmup=warmup, draws=draws,
                                     leapfrog=leapfrog, tick=lambda: bar.update(1)))
    bar.close()
    x, ess, acc = (jnp.concatenate(parts)[:n] for parts in zip(*outs, strict=True))
    return Posterior(x, jnp.full((n, chains), 1.0 / chains), x.mean(1), x.std(1), ess, acc)


def _dequantize(flow: FlowDistribution, starts, bins, masks, key):
    """Starts placed inside their 8-bit bins where the flow's density is: by its own dequantizer
    (uniform noise for a flow trained without one), the observed pixels' bins set first."""
    n, k = starts.shape[:2]
    pixels = to_pixels(starts)
    if bins is not None:
        pixels = jnp.where(masks[:, None, ..., 0], bins[:, None, ..., 0].astype(pixels.dtype), pixels)
    x = _dequantizer(flow.model)(flow.params, pixels.reshape(n * k, *pixels.shape[2:]), key)
    return jnp.clip(x.reshape(starts.shape), 0.0, 1.0)


@functools.cache
def _dequantizer(model):
    return jax.jit(lambda params, pixels, key: model.apply(params, pixels, key, method=model.dequantize)[0])
