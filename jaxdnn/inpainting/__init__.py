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
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdnn.flows.distribution import FlowDistribution
from jaxdnn.inpainting import latent, pixel
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
from jaxdnn.inpainting.pixel import (
    ANNEALED_DEFAULTS,
    LANGEVIN_DEFAULTS,
    PGD_DEFAULTS,
    annealed_optimizer,
    pgd_optimizer,
)

__all__ = [
    "ANNEALED_DEFAULTS", "BASELINES", "DEFAULTS", "IMAGE_SHAPE", "KNN", "LANGEVIN_DEFAULTS", "LATENT_DEFAULTS",
    "LATENT_MAP_DEFAULTS", "LATENT_METHODS", "MASKS", "METHODS", "PGD_DEFAULTS", "PIXEL_METHODS", "STEPS",
    "FLOW_STEPS", "Flow", "InpaintResult", "Posterior", "annealed_optimizer", "as_flow", "batch_masks", "check_images",
    "check_mask", "check_options", "default_steps", "evaluate", "inpaint_posterior",
    "flow_log_prob", "inpaint", "knn_mean", "latent_energy", "make_mask", "masked_mse", "masked_psnr",
    "mean_fill", "nearest_neighbor", "nearest_training_images", "pgd_optimizer", "pixel_mean",
]

PIXEL_METHODS = ("pgd", "annealed", "langevin")
LATENT_METHODS = ("latent_map", "latent")
METHODS = PIXEL_METHODS + LATENT_METHODS
DEFAULTS = {"pgd": PGD_DEFAULTS, "annealed": ANNEALED_DEFAULTS, "langevin": LANGEVIN_DEFAULTS,
            "latent_map": LATENT_MAP_DEFAULTS, "latent": LATENT_DEFAULTS}
STEPS = {"pgd": 300, "annealed": 300, "langevin": 300, "latent_map": 120, "latent": 15}  # per search
# ... and where a flow type has its own (validation images 0..99, 32 searches at T = 200, PSNR over
# the 32 neighbours' mean after 5 / 10 / 15 steps: Glow top_half +0.40 / +0.36 / +0.30 dB, center
# +0.46 / +0.51 / +0.47, its searches drift off after a few steps; RealNVP top_half +0.42 / +0.55 / +0.65)
FLOW_STEPS = {("latent", "Glow"): 10}
_COUNTS = {"chains", "starts", "rounds"}  # integer options (static: they set shapes or loop counts)


class InpaintResult(NamedTuple):
    """images: the inpainted images (shape of the input); losses (B, steps) (or (steps,) for one
    image): -log p(x_k) in nats at each iterate a step was taken from (pixel methods), or the
    latent energy E(z_k) (latent methods, mean over the starts)."""

    images: jax.Array
    losses: jax.Array


def flow_log_prob(model, params) -> jax.tree_util.Partial:
    """`x (B, H, W, C) -> log p(x) (B,)` of a Flax flow, for the pixel methods (`as_flow(...).log_prob`)."""
    return as_flow(model, params).log_prob


def default_steps(method: str, flow=None) -> int:
    """Iterations (per search) of `method` when `steps` is None: `FLOW_STEPS` where the flow's type
    has its own (flow: a `Flow`, a `FlowDistribution` or a Flax flow model), else `STEPS[method]`."""
    _check_method(method)
    model = flow.model if isinstance(flow, FlowDistribution) else flow
    kind = model.kind if isinstance(model, Flow) else type(model).__name__
    return FLOW_STEPS.get((method, kind), STEPS[method])


def inpaint(flow: Flow | FlowDistribution | Callable[[jax.Array], jax.Array], image, mask, key=None,
            method: str = "latent", steps: int | None = None, lr: float | None = None, *,
            init: float | None = None, reference=None, return_losses: bool = False, **options):
    """Inpaints the missing pixels (mask False / 0) of `image`.

    flow: a `FlowDistribution` (e.g. `jaxdnn.pretrained.load_distribution("glow")`) or
        `as_flow(model, params)` (every method), or any log-density `x (B, H, W, C) -> log p(x) (B,)`
        (pixel methods only: the latent ones need the flow's decoder).
    image: float (H, W, C) or a batch (B, H, W, C), values in [0, 1].
    mask: bool or 0/1, shape (H, W, C) (shared by the batch) or (B, H, W, C); 1 = observed.
    key: one key (split into one per image) or a (B,) array of keys; image i of a batch called
        with keys k gives the same result as a call on that image with k[i]. Needed by
        "annealed", "langevin" and "latent" without `reference`; unused (may be None) otherwise.
    method: one of `METHODS` (see the module docstring); "latent" (the default) is the best on
        the validation split, with a `reference` set; "pgd" is the course's method.
    steps: iterations (per search for the latent methods); None: `default_steps(method, flow)`
        (`STEPS[method]`, 300 for the course's pgd, unless the flow type has its own). lr: step
        size; None: `DEFAULTS[method]["lr"]`. init: starting value of the missing pixels (pixel
        methods).
    reference: "latent" only: float training images (N, H, W, C) whose nearest on the observed
        pixels start the searches (recommended); None starts from scaled prior noise.
    options: the other keys of `DEFAULTS[method]` (e.g. noise, chains, noise_std, starts).

    Returns the inpainted images (shape of `image`): observed pixels bit-for-bit those of
    `image`, all values in [0, 1]; with `return_losses=True` an `InpaintResult`. Compiled once per
    model, shape, method and step count (hyperparameter values do not trigger recompilation).
    """
    steps = _steps(method, flow, steps)
    hyper, counts = _hyperparameters(method, lr, init, options)
    if isinstance(flow, FlowDistribution):
        flow = as_flow(flow.model, flow.params)
    if method in LATENT_METHODS and not isinstance(flow, Flow):
        raise ValueError(f"method {method!r} searches the flow's latents and needs its decoder: pass a "
                         "FlowDistribution or jaxdnn.inpainting.as_flow(model, params), not a log-density function")
    log_prob = flow.log_prob if isinstance(flow, Flow) else flow
    if not callable(log_prob):
        raise ValueError(f"flow must be a Flow or a log-density function, got {type(flow).__name__}")
    if reference is not None and method != "latent":
        raise ValueError(f"reference is used by method 'latent' only, not {method!r}")

    image = check_images(image, "image")
    single = image.ndim == 3
    images = image[None] if single else image
    if images.ndim != 4:
        raise ValueError(f"image must have shape (H, W, C) or (B, H, W, C), got {image.shape}")
    masks = check_mask(mask, image.shape, "mask")
    masks = masks[None] if single else masks
    n = images.shape[0]
    if reference is not None:
        reference = check_images(reference, "reference")
        if reference.ndim != 4 or reference.shape[1:] != images.shape[1:]:
            raise ValueError(f"reference must have shape (N, {', '.join(map(str, images.shape[1:]))}), "
                             f"got {reference.shape}")
        if reference.shape[0] < counts.get("starts", 1):
            raise ValueError(f"reference has {reference.shape[0]} images, fewer than starts={counts['starts']}")
    needs_key = method in ("annealed", "langevin") or (method == "latent" and reference is None)
    if needs_key and key is None:
        raise ValueError(f"method {method!r} needs a key")
    keys = _image_keys(key, n, single) if key is not None else jax.random.split(jax.random.key(0), n)

    hyper = {k: jnp.asarray(v, jnp.float32) for k, v in hyper.items()}
    if method in ("pgd", "annealed"):
        out, losses = pixel.mode_search(_partial(log_prob), images, masks, keys, hyper, method, steps)
    elif method == "langevin":
        out, losses = pixel.langevin(_partial(log_prob), images, masks, keys, hyper, steps, counts["chains"])
    elif method == "latent_map":
        out, losses = latent.latent_map(flow, images, jnp.broadcast_to(masks, images.shape), hyper, steps)
    else:
        out, losses = latent.latent(flow, images, jnp.broadcast_to(masks, images.shape), keys, hyper, steps,
                                    counts["starts"], reference, counts["rounds"])
    if single:
        out, losses = out[0], losses[0]
    return InpaintResult(out, losses) if return_losses else out


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


def check_options(method: str, lr: float | None = None, init: float | None = None, **options) -> dict:
    """Every setting of `method` as `inpaint` would run it: `DEFAULTS[method]` updated with `lr`,
    `init` and `options`, validated (ValueError naming the first bad one: what a command line
    reports before it loads anything)."""
    _check_method(method)
    hyper, counts = _hyperparameters(method, lr, init, options)
    return {**hyper, **counts}


def _hyperparameters(method: str, lr, init, options: dict) -> tuple[dict, dict]:
    """(float hyperparameters, integer counts) of `method`, validated, defaults filled in."""
    defaults = DEFAULTS[method]
    allowed = set(defaults) - {"lr", "init"}
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} for method {method!r}; it takes {sorted(allowed)}")
    hyper = {**defaults, **options}
    if lr is not None:
        hyper["lr"] = lr
    if init is not None:
        if "init" not in defaults:
            raise ValueError(f"init is the starting pixel value of the pixel methods, not of {method!r}")
        hyper["init"] = init
    counts = {k: hyper.pop(k) for k in _COUNTS & set(hyper)}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, value in hyper.items():
        if name == "temperature" and not isinstance(value, jax.core.Tracer):
            if not float(value) > 0:
                raise ValueError(f"temperature must be > 0 (inf: equal weights), got {value!r}")
        elif not (isinstance(value, jax.core.Tracer) or math.isfinite(float(value))):
            raise ValueError(f"{name} must be finite, got {value!r}")
    concrete = {k: float(v) for k, v in hyper.items() if not isinstance(v, jax.core.Tracer)}
    if "init" in concrete and not 0.0 <= concrete["init"] <= 1.0:
        raise ValueError(f"init must lie in [0, 1], got {hyper['init']!r}")
    if not 0.0 <= concrete.get("margin", 0.0) < 0.5:
        raise ValueError(f"margin must lie in [0, 0.5), got {hyper['margin']!r}")
    if concrete.get("lr", 1.0) <= 0.0:
        raise ValueError(f"lr must be > 0, got {hyper['lr']!r}")
    if concrete.get("noise_std", 1.0) <= 0.0:
        raise ValueError(f"noise_std must be > 0, got {hyper['noise_std']!r}")
    return hyper, counts


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")


def _steps(method: str, flow, steps) -> int:
    """`steps`, or `default_steps(method, flow)` when None, checked (and the method)."""
    _check_method(method)
    steps = default_steps(method, flow) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return int(steps)


def _missing(masks, shape) -> np.ndarray:
    """The missing pixels (mask False) of a batch of `shape` as a bool array."""
    return ~np.broadcast_to(np.asarray(masks, bool), shape)


def _partial(log_prob) -> jax.tree_util.Partial:
    """A log-density as a pytree (its arrays become jit arguments, not baked-in constants)."""
    return log_prob if isinstance(log_prob, jax.tree_util.Partial) else jax.tree_util.Partial(log_prob)


def _image_keys(key, n: int, single: bool) -> jax.Array:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype == jnp.uint32 and key.shape[-1:] == (2,):  # raw jax.random.PRNGKey
            key = jax.random.wrap_key_data(key)
        else:
            raise ValueError(f"key must be a jax.random.key, got dtype {key.dtype}")
    if key.ndim == 0:
        return key[None] if single else jax.random.split(key, n)
    if key.shape != (n,):
        raise ValueError(f"key must be one key or one per image ({n},), got shape {key.shape}")
    return key


from jaxdnn.inpainting.scoring import BASELINES, evaluate  # noqa: E402  (scoring uses inpaint above)
