"""Inpainting with a flow (Problem 3): fill the missing pixels of X_true given the observed ones.

    minimize_X  -log p(X)   subject to  M*X = M*X_true,  0 <= X <= 1     (M: 1 = observed)

One entry point, `inpaint(flow, image, mask, key, method=...)`, over five methods in two
families, every one ending inside the constraint set C (observed pixels bit-for-bit, values in
[0, 1]) and running on the whole batch in jitted chunks:

- pixel space (`pixel.py`): ``pgd`` (the course: 300 projected gradient steps of 1e-3 from
  missing pixels at 1), ``annealed`` (projected, Adam-preconditioned Langevin with annealing),
  ``langevin`` (posterior mean of Langevin chains in logit coordinates);
- latent space (`latent.py`): ``latent_map`` (the MAP of the flow's latents given the observed
  pixels, decoded) and ``latent`` (several such searches weighted by their posterior energies:
  the posterior mean that PSNR rewards; `inpaint_posterior` returns the searches themselves).

Also: masks, input checks and scores (`masks.py`), fills without a flow (`baselines.py`). The
supervised conditional-mean network (`jaxdnn.conditional_mean`) is a baseline that `evaluate`
scores beside the flow, never part of a flow method.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdnn.flows.distribution import FlowDistribution
from jaxdnn.inpainting import latent
from jaxdnn.inpainting.baselines import (
    KNN,
    knn_mean,
    mean_fill,
    nearest_neighbor,
    nearest_training_images,
    pixel_mean,
)
from jaxdnn.inpainting.latent import LATENT_DEFAULTS, LATENT_MAP_DEFAULTS, Flow, as_flow, latent_energy
from jaxdnn.inpainting.masks import (
    IMAGE_SHAPE,
    MASKS,
    batch_masks,
    check_images,
    check_mask,
    make_mask,
    masked_mse,
    masked_psnr,
)
from jaxdnn.inpainting.methods import (
    DEFAULTS,
    FLOW_STEPS,
    LATENT_METHODS,
    METHODS,
    PIXEL_METHODS,
    STEPS,
    InpaintResult,
    _hyperparameters,
    _image_keys,
    _steps,
    check_options,
    default_steps,
    flow_log_prob,
    inpaint,
)
from jaxdnn.inpainting.pixel import (
    ANNEALED_DEFAULTS,
    LANGEVIN_DEFAULTS,
    PGD_DEFAULTS,
    annealed_optimizer,
    pgd_optimizer,
)
from jaxdnn.inpainting.scoring import BASELINES, evaluate

__all__ = [
    "ANNEALED_DEFAULTS", "BASELINES", "DEFAULTS", "IMAGE_SHAPE", "KNN", "LANGEVIN_DEFAULTS", "LATENT_DEFAULTS",
    "LATENT_MAP_DEFAULTS", "LATENT_METHODS", "MASKS", "METHODS", "PGD_DEFAULTS", "PIXEL_METHODS", "STEPS",
    "FLOW_STEPS", "Flow", "InpaintResult", "Posterior", "annealed_optimizer", "as_flow", "batch_masks", "check_images",
    "check_mask", "check_options", "default_steps", "evaluate", "inpaint_posterior",
    "flow_log_prob", "inpaint", "knn_mean", "latent_energy", "make_mask", "masked_mse", "masked_psnr",
    "mean_fill", "nearest_neighbor", "nearest_training_images", "pgd_optimizer", "pixel_mean",
]


class Posterior(NamedTuple):
    """Completions of each image as a weighted sample of its posterior (`inpaint_posterior`).

    samples (B, K, H, W, C): the K searches' fills, inside C; weights (B, K): self-normalized
    importance weights, softmax(-E_k / temperature) of the searches' final energies; mean and
    std (B, H, W, C): the weighted per-pixel mean and standard deviation; ess (B,): the
    effective sample size 1 / sum_k w_k^2 (K for equal weights, 1 when one search takes all);
    energy (B, K): the searches' final energies E(z_k), from which `at_temperature` reweighs."""

    samples: jax.Array
    weights: jax.Array
    mean: jax.Array
    std: jax.Array
    ess: jax.Array
    energy: jax.Array

    def at_temperature(self, temperature: float) -> Posterior:
        """The same samples weighted by softmax(-E / temperature) (no search rerun)."""
        return _weigh(self.samples, self.energy, jnp.float32(temperature))

    def heaviest(self, k: int) -> tuple[jax.Array, jax.Array]:
        """Each image's `k` completions of largest weight, largest first: (samples (B, k, H, W, C),
        weights (B, k))."""
        order = jnp.argsort(-self.weights, axis=1)[:, :k]
        return (jnp.take_along_axis(self.samples, order[:, :, None, None, None], axis=1),
                jnp.take_along_axis(self.weights, order, axis=1))

    def interval(self, level: float = 0.9, margin: float = 0.0) -> tuple[jax.Array, jax.Array]:
        """Per-pixel weighted (1 - level)/2 and (1 + level)/2 quantiles of the samples, each
        (B, H, W, C): the central `level` interval of the sample, widened by `margin` on each side
        and clipped to [0, 1] (`interval_margin` calibrates it on held-out images)."""
        lo, hi = self._quantiles(level)
        return jnp.clip(lo - margin, 0.0, 1.0), jnp.clip(hi + margin, 0.0, 1.0)

    def coverage(self, targets, masks, level: float = 0.9, margin: float = 0.0) -> float:
        """The fraction of the missing pixels (mask False) of `targets` (B, H, W, C) inside their
        `interval(level, margin)`: `level` for calibrated intervals."""
        lo, hi = (np.asarray(v) for v in self.interval(level, margin))
        targets = np.asarray(targets)
        return float(((lo <= targets) & (targets <= hi))[_missing(masks, targets.shape)].mean())

    def width(self, masks, level: float = 0.9, margin: float = 0.0) -> float:
        """The mean width of `interval(level, margin)` over the missing pixels (mask False)."""
        lo, hi = (np.asarray(v) for v in self.interval(level, margin))
        return float((hi - lo)[_missing(masks, lo.shape)].mean())

    def interval_margin(self, targets, masks, level: float = 0.9) -> float:
        """The split-conformal margin (Vovk et al.; Angelopoulos & Bates 2021) for these images
        held out from the ones it will serve: the smallest m with at least a `level` fraction of
        the missing pixels of `targets` inside `interval(level, m)`: the ceil((n + 1) level)-th
        smallest of the n scores max(lo - y, y - hi, 0) (the finite-sample correction). Pixels of
        one image are not exchangeable, images are: read the coverage it gives on other images."""
        lo, hi = (np.asarray(v, np.float64) for v in self._quantiles(level))
        targets = np.asarray(targets, np.float64)
        scores = np.maximum(np.maximum(lo - targets, targets - hi), 0.0)[_missing(masks, targets.shape)]
        k = min(scores.size, math.ceil((scores.size + 1) * level))
        return float(np.sort(scores)[k - 1])

    def _quantiles(self, level: float) -> tuple[jax.Array, jax.Array]:
        order = jnp.argsort(self.samples, axis=1)
        values = jnp.take_along_axis(self.samples, order, 1)
        w = jnp.take_along_axis(jnp.broadcast_to(self.weights[:, :, None, None, None], self.samples.shape), order, 1)
        cum = jnp.cumsum(w, 1)

        def quantile(q):
            idx = jnp.sum(cum < q - 1e-6, axis=1, keepdims=True).clip(0, self.samples.shape[1] - 1)
            return jnp.take_along_axis(values, idx, 1)[:, 0]

        return quantile((1.0 - level) / 2), quantile((1.0 + level) / 2)


def inpaint_posterior(flow: Flow | FlowDistribution, image, mask, key=None, *, reference=None,
                      starts: int | None = None, temperature: float = LATENT_DEFAULTS["temperature"],
                      steps: int | None = None, **options) -> Posterior:
    """K = rounds * `starts` completions of each image with their weights (`Posterior`): the
    `latent` method's searches (from the nearest `reference` images' encodings, every round's;
    else prior noise from `key`, one round), weighted by softmax(-E / temperature) (inf: equal
    weights); `mean` is exactly `inpaint(..., method="latent", blend=1)` at the same temperature. image
    (H, W, C) or (B, H, W, C); the result always has the batch axis. `options`: the `latent`
    method's (lr, noise_std, prior_weight, rounds, init_scale; not blend)."""
    if starts is not None:
        options["starts"] = starts
    if "blend" in options:
        raise ValueError("blend is inpaint's: the posterior's samples and mean are the flow's alone (blend=1)")
    steps = _steps("latent", flow, steps)
    hyper, counts = _hyperparameters("latent", None, None, {**options, "temperature": temperature})
    if isinstance(flow, FlowDistribution):
        flow = as_flow(flow.model, flow.params)
    if not isinstance(flow, Flow):
        raise ValueError("inpaint_posterior needs the flow's decoder: pass a FlowDistribution or "
                         "as_flow(model, params)")
    images = check_images(image, "image")
    images = images[None] if images.ndim == 3 else images
    masks = jnp.broadcast_to(check_mask(mask, images.shape[1:] if jnp.ndim(mask) <= 3 else images.shape, "mask"),
                             images.shape)
    if reference is not None:
        reference = check_images(reference, "reference")
    elif key is None:
        raise ValueError("inpaint_posterior needs a reference set or a key")
    keys = _image_keys(key, images.shape[0], False) if key is not None else None
    hyper = {k: jnp.asarray(v, jnp.float32) for k, v in hyper.items()}
    found = latent.candidates(flow, images, masks, keys, hyper, steps, counts["starts"], reference, counts["rounds"])
    return _weigh(found.fills, found.energy, hyper["temperature"])


@jax.jit
def _weigh(fills, energy, temperature) -> Posterior:
    weights = latent.posterior_weights(energy, temperature)
    w = weights[:, :, None, None, None]
    mean = (w * fills).sum(1)
    std = jnp.sqrt(jnp.maximum((w * (fills - mean[:, None]) ** 2).sum(1), 0.0))
    return Posterior(fills, weights, mean, std, 1.0 / (weights**2).sum(1), energy)


def _missing(masks, shape) -> np.ndarray:
    """The missing pixels (mask False) of a batch of `shape` as a bool array."""
    return ~np.broadcast_to(np.asarray(masks, bool), shape)
