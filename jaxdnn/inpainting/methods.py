"""`inpaint(flow, image, mask, key, method=...)`: one entry point over the flow's five methods
(`pixel.py`, `latent.py`), their defaults and the checks of their options (the package's
docstring describes the methods)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxdnn.inpainting.latent as latent
import jaxdnn.inpainting.pixel as pixel
from jaxdnn.flows.distribution import FlowDistribution
from jaxdnn.inpainting.latent import LATENT_DEFAULTS, LATENT_MAP_DEFAULTS, Flow, as_flow
from jaxdnn.inpainting.masks import (
    check_images,
    check_mask,
)
from jaxdnn.inpainting.pixel import (
    ANNEALED_DEFAULTS,
    LANGEVIN_DEFAULTS,
    PGD_DEFAULTS,
)

__all__ = ["DEFAULTS", "FLOW_STEPS", "LATENT_METHODS", "METHODS", "PIXEL_METHODS", "STEPS", "InpaintResult",
           "check_options", "default_steps", "flow_log_prob", "inpaint"]

PIXEL_METHODS = ("pgd", "annealed", "langevin")
LATENT_METHODS = ("latent_map", "latent")
METHODS = PIXEL_METHODS + LATENT_METHODS
DEFAULTS = {"pgd": PGD_DEFAULTS, "annealed": ANNEALED_DEFAULTS, "langevin": LANGEVIN_DEFAULTS,
            "latent_map": LATENT_MAP_DEFAULTS, "latent": LATENT_DEFAULTS}
STEPS = {"pgd": 300, "annealed": 300, "langevin": 300, "latent_map": 120, "latent": 15}  # per search
# ... and where a flow type has its own: Glow's latent searches drift off after a few steps, so
# they stop earlier (chosen on the validation split, docs/inpainting.md, "Methods").
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


