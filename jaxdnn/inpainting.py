"""Likelihood inpainting with a flow (Problem 3), on top of `jaxdnn.projection`.

Given an image X_true in [0,1]^{H x W x C} and a mask M (1 / True = observed pixel),

    minimize_X  -log p(X)   subject to  M*X = M*X_true,  0 <= X <= 1.

The constraint set is a box: lower = upper = X_true on observed pixels, [0, 1] elsewhere, so
the projection is `optax.projections.projection_box` and observed pixels come out of every
step bit-for-bit equal to X_true. Two methods, both `projected_gradient` runs of `steps`
iterations (one `lax.scan`) on the whole batch at once, jitted once per shape:

- ``pgd``: the course's setting. Missing pixels start at 1; plain gradient steps
  x <- Pi(x - lr grad(-log p)(x)) with lr = 1e-3, 300 iterations.
- ``annealed``: projected, preconditioned Langevin dynamics with annealing, after the NICE
  paper's remark (iteration-dependent step size plus added noise). Each step is
  x <- Pi(x - lr_k Adam(grad) + sigma_k xi), xi ~ N(0, I): the per-pixel Adam normalization
  makes the step size mean "pixel units per step" whatever the gradient's scale (log p of a
  logit-preprocessed flow has gradients ~1e6 near 0 and 1), lr_k follows a cosine decay from
  `lr` to `lr * lr_final`, and the noise sigma_k = `noise` * cosine decay reaches 0 after a
  fraction `noise_until` of the steps, leaving noise-free steps that settle into a mode.
  Deterministic given the key.
- ``langevin``: an estimate of the posterior mean E[X | M*X = M*X_true] under the flow, the
  fill that minimizes the expected squared error (what PSNR scores), where the two methods
  above return a mode. `chains` unadjusted Langevin chains per image at temperature 1 run in
  logit coordinates of the missing pixels (x = sigmoid(u), whose log-Jacobian is added to
  log p, so no projection is needed inside the chain): u <- u + lr grad + sqrt(2 lr) xi; the
  result averages sigmoid(u) over the chains and over the last `average` fraction of the
  steps. Costs `chains` times a mode search. Deterministic given the key.

Gradients are made finite (NaN -> 0, +-inf -> +-float max) before the step and a
non-finite update leaves its pixel unchanged; for finite gradients both are the identity, so
``pgd`` is exactly the course's iteration, and no NaN can reach the projection.

Also here: named masks, metrics over the missing pixels (MSE, PSNR with peak 1), and two
non-learned baselines (`mean_fill`, `nearest_neighbor`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdnn.projection import box_projection, projected_gradient

__all__ = [
    "ANNEALED_DEFAULTS", "DEFAULTS", "IMAGE_SHAPE", "MASKS", "METHODS", "PGD_DEFAULTS", "InpaintResult",
    "LANGEVIN_DEFAULTS", "annealed_optimizer", "batch_masks", "check_images", "check_mask", "flow_log_prob",
    "inpaint", "make_mask", "masked_mse", "masked_psnr", "mean_fill", "nearest_neighbor",
    "pgd_optimizer", "pixel_mean",
]

IMAGE_SHAPE = (28, 28, 1)
MASKS = ("hw10", "top_half", "bottom_half", "left_half", "center", "random50")
METHODS = ("pgd", "annealed", "langevin")
# The course's projected gradient: lr 1e-3, missing pixels initialized to 1 (steps=300).
PGD_DEFAULTS = {"lr": 1e-3, "init": 1.0, "margin": 0.0}
# annealed: peak step (pixel units), final step fraction, initial noise std, fraction of the
# steps that carry noise, Adam's moment decays, initial value of missing pixels.
# Missing pixels start black (MNIST's background) and stay inside the support of dequantized
# data, [0.5/256, 1 - 0.5/256]: at exactly 0 or 1 a logit-preprocessed flow is off its support.
ANNEALED_DEFAULTS = {"lr": 0.02, "lr_final": 0.02, "noise": 0.02, "noise_until": 0.7,
                     "b1": 0.5, "b2": 0.9, "init": 0.0, "margin": 0.5 / 256, "average": 0.0}
# langevin: step size in logit units, chains per image, averaged fraction of the steps, initial
# value of missing pixels, per-coordinate gradient clip (the logit flow's gradients explode at
# the boundary of its support).
LANGEVIN_DEFAULTS = {"lr": 0.1, "chains": 8, "average": 0.5, "init": 0.05, "grad_clip": 1e4}
INIT_EPS = 1e-4  # langevin: an init of 0 or 1 starts this far inside (0, 1)
DEFAULTS = {"pgd": PGD_DEFAULTS, "annealed": ANNEALED_DEFAULTS, "langevin": LANGEVIN_DEFAULTS}
PSNR_MSE_FLOOR = 1e-10  # a perfect fill reports 100 dB instead of infinity
GRAD_LIMIT = 1e15  # annealed: per-pixel gradient clip (Adam divides it out; keeps g^2 finite)


# ----------------------------------------------------------------------------- validation


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_images(images, name: str = "image") -> jax.Array:
    """float array (..., H, W, C) with every value in [0, 1]; raises ValueError naming `name`."""
    if isinstance(images, jax.core.Tracer):
        arr = images
    else:
        arr = np.asarray(images)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        hint = (" (convert uint8 pixels with jaxdnn.data.to_unit_interval)"
                if jnp.issubdtype(arr.dtype, jnp.integer) else "")
        raise ValueError(f"{name} must be a float array with values in [0, 1], got dtype "
                         f"{arr.dtype}{hint}")
    if arr.ndim < 3:
        raise ValueError(f"{name} must have shape (H, W, C) or (B, H, W, C), got {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if _concrete(arr):
        bad = ~((arr >= 0) & (arr <= 1))  # NaN counts as bad
        if bad.any():
            finite = arr[~np.isnan(arr)]
            got = f"range [{finite.min():g}, {finite.max():g}]" if finite.size else "only"
            nan = " and NaN" if finite.size < arr.size else ""
            raise ValueError(f"{name} values must lie in [0, 1], got {got}{nan}")
    return jnp.asarray(arr, jnp.float32)


def check_mask(mask, image_shape: tuple[int, ...], name: str = "mask") -> jax.Array:
    """Boolean mask (True = observed) of `image_shape` (one image: (H, W, C)) or of a batch.

    Accepts bool, or integer / float arrays whose values are all 0 or 1. The shape must be
    the image's (H, W, C), or (B, H, W, C) with B the batch of `image_shape`."""
    arr = mask if isinstance(mask, jax.core.Tracer) else np.asarray(mask)
    if arr.dtype != bool:
        if not (jnp.issubdtype(arr.dtype, jnp.integer) or jnp.issubdtype(arr.dtype, jnp.floating)):
            raise ValueError(f"{name} must be boolean (True = observed) or 0/1 numbers, got "
                             f"dtype {arr.dtype}")
        if _concrete(arr) and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} values must be 0 or 1 (1 = observed), got dtype {arr.dtype}"
                             " with other values")
    image_shape = tuple(image_shape)
    per_image = image_shape[-3:]
    if tuple(arr.shape) not in {per_image, image_shape}:
        raise ValueError(f"{name} has shape {tuple(arr.shape)}; it must match one image "
                         f"{per_image} or the batch {image_shape}")
    return jnp.asarray(arr) != 0 if arr.dtype != bool else jnp.asarray(arr)


# ----------------------------------------------------------------------------- masks


def make_mask(name: str, key: jax.Array | None = None,
              shape: tuple[int, int, int] = IMAGE_SHAPE) -> jax.Array:
    """The named mask, bool (H, W, C), True = observed.

    hw10: rows 5..11, cols 5..19 missing (zero-based [5:12, 5:20], the course's mask);
    top_half / bottom_half / left_half: that half missing; center: the centred (H/2 x W/2)
    square (14 x 14 on MNIST) missing; random50: exactly half the pixels missing, chosen
    uniformly from `key` (the same pixels in every channel)."""
    h, w, c = shape
    missing = np.zeros((h, w), bool)
    if name == "hw10":
        if (h, w) != (28, 28):
            raise ValueError(f"mask 'hw10' is defined for 28 x 28 images, got {(h, w)}")
        missing[5:12, 5:20] = True
    elif name == "top_half":
        missing[: h // 2] = True
    elif name == "bottom_half":
        missing[h - h // 2:] = True
    elif name == "left_half":
        missing[:, : w // 2] = True
    elif name == "center":
        r0, c0 = (h - h // 2) // 2, (w - w // 2) // 2
        missing[r0:r0 + h // 2, c0:c0 + w // 2] = True
    elif name == "random50":
        if key is None:
            raise ValueError("mask 'random50' needs a key")
        order = jax.random.permutation(key, h * w)
        observed = jnp.zeros(h * w, bool).at[order[: h * w - (h * w) // 2]].set(True)
        return jnp.broadcast_to(observed.reshape(h, w, 1), (h, w, c))
    else:
        raise ValueError(f"unknown mask {name!r}; choose from {list(MASKS)}")
    return jnp.broadcast_to(jnp.asarray(~missing)[..., None], (h, w, c))


def batch_masks(name: str, indices, key: jax.Array | None = None,
                shape: tuple[int, int, int] = IMAGE_SHAPE) -> jax.Array:
    """Masks (N, H, W, C) for the images numbered `indices`: `random50` draws image i's mask
    from fold_in(key, i), so it does not depend on which range is processed."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if name == "random50":
        if key is None:
            raise ValueError("mask 'random50' needs a key")
        return jnp.stack([make_mask(name, jax.random.fold_in(key, int(i)), shape)
                          for i in indices]) if indices.size else jnp.zeros((0, *shape), bool)
    one = make_mask(name, None, shape)
    return jnp.broadcast_to(one, (indices.size, *shape))


# ----------------------------------------------------------------------------- optimizers


def _finite_grads() -> optax.GradientTransformation:
    """NaN -> 0, +-inf -> +-float max: the identity on finite gradients."""
    return optax.stateless(lambda g, _params: jax.tree.map(jnp.nan_to_num, g))


def _finite_updates() -> optax.GradientTransformation:
    """A non-finite update leaves its pixel where it is (the identity on finite updates), so
    no NaN ever reaches the projection."""
    return optax.stateless(
        lambda u, _params: jax.tree.map(lambda a: jnp.where(jnp.isfinite(a), a, 0.0), u))


class _NoiseState(NamedTuple):
    count: jax.Array
    keys: jax.Array


def _add_scheduled_noise(keys: jax.Array, std: optax.Schedule) -> optax.GradientTransformation:
    """Adds N(0, std(k)^2) to the updates (B, ...) at step k; image b's noise at step k is
    drawn from fold_in(keys[b], k), so a batch gives each image what a call on it alone would."""

    def init(params):
        del params
        return _NoiseState(jnp.zeros([], jnp.int32), keys)

    def update(updates, state, params=None):
        del params
        sigma = std(state.count)
        draw = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, state.count), updates.shape[1:],
                                                    updates.dtype))
        return updates + sigma * draw(state.keys), _NoiseState(state.count + 1, state.keys)

    return optax.GradientTransformation(init, update)


def pgd_optimizer(lr: float = PGD_DEFAULTS["lr"]) -> optax.GradientTransformation:
    """The course's step: x - lr * grad (finite gradients unchanged)."""
    return optax.chain(_finite_grads(), optax.sgd(lr), _finite_updates())


def annealed_optimizer(keys: jax.Array, steps: int, lr: float = ANNEALED_DEFAULTS["lr"],
                       lr_final: float = ANNEALED_DEFAULTS["lr_final"],
                       noise: float = ANNEALED_DEFAULTS["noise"],
                       noise_until: float = ANNEALED_DEFAULTS["noise_until"],
                       b1: float = ANNEALED_DEFAULTS["b1"],
                       b2: float = ANNEALED_DEFAULTS["b2"]) -> optax.GradientTransformation:
    """Adam-normalized steps with a cosine step-size decay from `lr` to `lr * lr_final`, plus
    Gaussian noise whose std decays from `noise` to 0 (cosine) over the first
    `noise_until * steps` steps; for a batch (B, ...) of images with keys (B,)."""
    horizon = max(int(steps), 1)

    def step_size(count):
        return lr * (lr_final + (1.0 - lr_final) * _cosine(count / horizon))

    def std(count):
        return noise * _cosine(count / jnp.maximum(noise_until * horizon, 1.0))

    return optax.chain(
        _finite_grads(),
        optax.clip(GRAD_LIMIT),  # Adam squares the gradient: keep that finite
        optax.scale_by_adam(b1=b1, b2=b2),
        optax.scale_by_learning_rate(step_size),
        _add_scheduled_noise(keys, std),
        _finite_updates(),
    )


def _averaged(k, average, steps):
    """1.0 where the iterate x_k (k = 1 .. steps) enters the average of the last `average`
    fraction of the steps (the final iterate always does), else 0.0."""
    return ((k > (1.0 - average) * steps) | (k == steps)).astype(jnp.float32)


def _cosine(t):
    """1 at t = 0, 0 from t = 1 on (half a cosine); works on traced hyperparameters."""
    return 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(t, 0.0, 1.0)))


# ----------------------------------------------------------------------------- inpainting


@functools.cache
def _model_log_prob(model) -> Callable:
    def log_prob(params, x):
        return model.apply(params, x, method=model.log_prob)

    return log_prob


def flow_log_prob(model, params) -> jax.tree_util.Partial:
    """`x (B, H, W, C) -> log p(x) (B,)` for a flax flow, as a `jax.tree_util.Partial` whose
    leaves are the parameters: `inpaint` passes them to its jitted core as arguments (not as
    baked-in constants) and reuses one compilation for every call with the same model."""
    return jax.tree_util.Partial(_model_log_prob(model), params)


class InpaintResult(NamedTuple):
    """images: the inpainted images (shape of the input); losses: -log p(x_k) in nats at each
    iterate a step was taken from, shape (B, steps) (or (steps,) for one image)."""

    images: jax.Array
    losses: jax.Array


CPU_CHUNK = 10  # steps per unrolled, jitted chunk on CPU


def _problem(images, masks, keys, hp, method, steps):
    """(box projection, starting point, optimizer) of a batch (B, H, W, C)."""
    lower = jnp.where(masks, images, hp["margin"])
    upper = jnp.where(masks, images, 1.0 - hp["margin"])
    x0 = jnp.where(masks, images, hp["init"])
    if method == "pgd":
        opt = pgd_optimizer(hp["lr"])
    else:
        opt = annealed_optimizer(keys, steps, hp["lr"], hp["lr_final"], hp["noise"],
                                 hp["noise_until"], hp["b1"], hp["b2"])
    return box_projection(lower, upper), x0, opt


@functools.partial(jax.jit, static_argnames=("method", "steps"))
def _start(images, masks, keys, hp, method, steps):
    _, x0, opt = _problem(images, masks, keys, hp, method, steps)
    return x0, opt.init(x0), jnp.zeros_like(x0)


@functools.partial(jax.jit, static_argnames=("method", "steps", "chunk", "unroll"))
def _advance(log_prob, images, masks, keys, hp, carry, first, method, steps, chunk, unroll):
    """Steps first .. first + chunk - 1 of the run from carry = (x, optimizer state, running
    weighted sum of the averaged iterates). The flow sees the whole batch at once: log p of
    image b depends on image b only, so the gradient of the summed loss is each image's own."""
    project, _, opt = _problem(images, masks, keys, hp, method, steps)
    x, opt_state, acc = carry
    res = projected_gradient(lambda v: -log_prob(v), project, x, opt, chunk,
                             return_trajectory=method == "annealed", opt_state=opt_state, unroll=unroll)
    if method == "annealed":  # average the iterates x_{k+1} of the last `average` fraction of the steps
        w = _averaged(first + jnp.arange(1, chunk + 1, dtype=jnp.float32), hp["average"], steps)
        acc = acc + jnp.tensordot(w, res.trajectory[1:], axes=1)
    return (res.x, res.opt_state, acc), res.losses.T


def _run_chunks(advance, carry, steps: int, batch: int):
    """Runs `advance(carry, first, n, unroll) -> (carry, losses (B, n))` over `steps` steps: one
    call on GPU/TPU, unrolled chunks of CPU_CHUNK steps on CPU. Returns (carry, losses (B, steps))."""
    cpu = jax.default_backend() == "cpu"
    chunk = min(CPU_CHUNK, steps) if cpu else steps
    losses, done = [], 0
    while done < steps:
        n = min(chunk, steps - done)
        carry, loss = advance(carry, jnp.float32(done), n, cpu)
        losses.append(loss)
        done += n
    return carry, (jnp.concatenate(losses, 1) if losses else jnp.zeros((batch, 0)))


def _inpaint_batch(log_prob, images, masks, keys, hp, method, steps):
    """images (B, H, W, C), masks (H, W, C) or (B, H, W, C), keys (B,) -> (inpainted, losses
    (B, steps)). One scan on GPU/TPU; on CPU unrolled chunks of CPU_CHUNK steps."""
    carry = _start(images, masks, keys, hp, method, steps)
    carry, losses = _run_chunks(
        lambda c, first, n, unroll: _advance(log_prob, images, masks, keys, hp, c, first, method,
                                             steps, n, unroll), carry, steps, images.shape[0])
    x, _, acc = carry
    if method == "pgd" or steps == 0:
        return x, losses
    total = _averaged(jnp.arange(1, steps + 1, dtype=jnp.float32), hp["average"], steps).sum()
    project, _, _ = _problem(images, masks, keys, hp, method, steps)
    return project(acc / total), losses  # re-projected: observed pixels exact again


@functools.partial(jax.jit, static_argnames=("steps", "chunk", "unroll"))
def _langevin_advance(log_prob, images, masks, keys, hp, carry, first, steps, chunk, unroll):
    """Steps first .. first + chunk - 1 of the chains u (B, K, H, W, C); acc sums the averaged
    sigmoid(u). Returns the new carry and -log p of each step's starting iterates, mean over
    the chains (B, chunk)."""
    b, k = carry[0].shape[:2]
    obs = jnp.broadcast_to(jnp.where(masks, images, 0.0)[:, None], carry[0].shape)
    observed = jnp.broadcast_to(jnp.broadcast_to(masks, images.shape)[:, None], carry[0].shape)

    def log_density(u):  # log p(x(u)) + log |dx/du| over the missing pixels, (B * K,)
        x = jnp.where(observed, obs, jax.nn.sigmoid(u))
        lp = log_prob(x.reshape(b * k, *x.shape[2:])).reshape(b, k)
        jac = jnp.where(observed, 0.0, jax.nn.log_sigmoid(u) + jax.nn.log_sigmoid(-u))
        return lp + jac.sum((2, 3, 4)), lp

    def step(c, i):
        u, acc = c
        def objective(v):
            ld, lp = log_density(v)
            return ld.sum(), lp

        (_, lp), grad = jax.value_and_grad(objective, has_aux=True)(u)
        grad = jnp.clip(jnp.nan_to_num(grad), -hp["grad_clip"], hp["grad_clip"])
        count = (first + i).astype(jnp.int32)
        noise = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, count), u.shape[1:]))(keys)
        u = jnp.where(observed, 0.0, u + hp["lr"] * grad + jnp.sqrt(2.0 * hp["lr"]) * noise)
        w = _averaged(first + i + 1.0, hp["average"], steps)
        return (u, acc + w * jax.nn.sigmoid(u)), -lp.mean(1)

    carry, losses = jax.lax.scan(step, carry, jnp.arange(chunk, dtype=jnp.float32),
                                 unroll=chunk if unroll else 1)
    return carry, losses.T


def _langevin_batch(log_prob, images, masks, keys, hp, steps, chains):
    """(posterior-mean estimate (B, H, W, C), losses (B, steps)); chunks as `_inpaint_batch`."""
    shape = (images.shape[0], chains, *images.shape[1:])
    start = jnp.clip(hp["init"], INIT_EPS, 1.0 - INIT_EPS)  # a finite logit
    u = jnp.full(shape, jax.scipy.special.logit(start), jnp.float32)
    carry, losses = _run_chunks(
        lambda c, first, n, unroll: _langevin_advance(log_prob, images, masks, keys, hp, c, first,
                                                      steps, n, unroll),
        (u, jnp.zeros(shape, jnp.float32)), steps, images.shape[0])
    total = _averaged(jnp.arange(1, steps + 1, dtype=jnp.float32), hp["average"], steps).sum()
    fill = carry[1].mean(1) / total if steps else jnp.full(images.shape, hp["init"])
    return jnp.where(masks, images, jnp.clip(fill, 0.0, 1.0)), losses


def inpaint(log_prob_fn: Callable[[jax.Array], jax.Array], image, mask, key=None,
            method: str = "pgd", steps: int = 300, lr: float | None = None, *,
            init: float | None = None, return_losses: bool = False, **options):
    """Inpaints the missing pixels (mask False / 0) of `image` by maximizing log p.

    log_prob_fn: `x (B, H, W, C) -> log p(x) (B,)`; pass `flow_log_prob(model, params)` for a
        flax flow (one compilation per model and shape; a plain closure works too but bakes
        its captured arrays into the compiled program).
    image: float (H, W, C) or a batch (B, H, W, C), values in [0, 1].
    mask: bool or 0/1, shape (H, W, C) (shared by the batch) or (B, H, W, C); 1 = observed.
    key: for "annealed" and "langevin": one key (split into one per image) or a (B,) array of keys; image i
        of a batch called with keys k gives the same result as a call on that image with k[i].
        Unused (may be None) for "pgd".
    method: "pgd" (the course: lr 1e-3, missing pixels start at 1), "annealed" (projected
        Langevin with annealing) or "langevin" (posterior mean over Langevin chains); see the
        module docstring.
    steps: iterations (300 in the course). lr: step size; None means the method's default
        (`DEFAULTS[method]`). init: the starting value of the missing pixels
        (None: the method's default, 1.0 for pgd as in the course).
    options: for "annealed", any of lr_final, noise, noise_until, b1, b2 (see
        `ANNEALED_DEFAULTS`); for "langevin", chains, average, grad_clip (`LANGEVIN_DEFAULTS`).

    Returns the inpainted images (shape of `image`): observed pixels are bit-for-bit those of
    `image`, all values lie in [0, 1]. With `return_losses=True`, an `InpaintResult` with the
    per-step -log p as well. Runs as one jitted call on the batch (compiled once per model, shape,
    method and step count; hyperparameter values do not trigger recompilation).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    defaults = DEFAULTS[method]
    unknown = set(options) - (set(defaults) - {"lr", "init"})
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} for method {method!r}; it takes "
                         f"{sorted(set(defaults) - {'lr', 'init'})}")
    hp = {**defaults, **options}
    if lr is not None:
        hp["lr"] = lr
    if init is not None:
        hp["init"] = init
    for name, value in hp.items():
        if not (isinstance(value, jax.core.Tracer) or math.isfinite(float(value))):
            raise ValueError(f"{name} must be finite, got {value!r}")
    if _concrete(hp["init"]) and not 0.0 <= float(hp["init"]) <= 1.0:
        raise ValueError(f"init must lie in [0, 1], got {hp['init']!r}")
    chains = hp.pop("chains", 1)
    if isinstance(chains, bool) or not isinstance(chains, (int, np.integer)) or chains < 1:
        raise ValueError(f"chains must be an integer >= 1, got {chains!r}")
    if _concrete(hp.get("margin", 0.0)) and not 0.0 <= float(hp.get("margin", 0.0)) < 0.5:
        raise ValueError(f"margin must lie in [0, 0.5), got {hp['margin']!r}")
    if not callable(log_prob_fn):
        raise ValueError(f"log_prob_fn must be callable, got {type(log_prob_fn).__name__}")

    image = check_images(image, "image")
    single = image.ndim == 3
    images = image[None] if single else image
    if images.ndim != 4:
        raise ValueError(f"image must have shape (H, W, C) or (B, H, W, C), got {image.shape}")
    mask = check_mask(mask, images.shape if not single else image.shape, "mask")
    n = images.shape[0]

    if method != "pgd":
        if key is None:
            raise ValueError(f"method {method!r} needs a key")
        keys = _image_keys(key, n, single)
    else:
        keys = jax.random.split(jax.random.key(0), n)  # unused by pgd

    log_prob = (log_prob_fn if isinstance(log_prob_fn, jax.tree_util.Partial)
                else jax.tree_util.Partial(log_prob_fn))
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}
    if method == "langevin":
        out, losses = _langevin_batch(log_prob, images, mask, keys, hp, int(steps), int(chains))
    else:
        out, losses = _inpaint_batch(log_prob, images, mask, keys, hp, method, int(steps))
    if single:
        out, losses = out[0], losses[0]
    return InpaintResult(out, losses) if return_losses else out


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


# ----------------------------------------------------------------------------- metrics


def masked_mse(images, targets, masks) -> jax.Array:
    """Per-image mean squared error over the missing pixels (mask False), shape (B,).

    An image with no missing pixel gives NaN."""
    images, targets = jnp.asarray(images, jnp.float32), jnp.asarray(targets, jnp.float32)
    missing = jnp.broadcast_to(~jnp.asarray(masks, bool), images.shape)
    axes = tuple(range(images.ndim - 3, images.ndim))
    err = jnp.where(missing, (images - targets) ** 2, 0.0).sum(axes)
    return err / missing.sum(axes)


def masked_psnr(images, targets, masks, peak: float = 1.0) -> jax.Array:
    """Per-image PSNR in dB over the missing pixels: 10 log10(peak^2 / MSE), shape (B,); the
    MSE is floored at 1e-10 so a perfect fill reads 100 dB (peak 1) rather than infinity."""
    mse = masked_mse(images, targets, masks)
    return 10.0 * jnp.log10(peak**2 / jnp.maximum(mse, PSNR_MSE_FLOOR))


# ----------------------------------------------------------------------------- baselines


def pixel_mean(train_images) -> jax.Array:
    """Per-pixel mean (H, W, C) of float training images (N, H, W, C)."""
    train_images = check_images(train_images, "train_images")
    return train_images.reshape(-1, *train_images.shape[-3:]).mean(0)


def mean_fill(images, masks, mean) -> jax.Array:
    """Missing pixels set to the training-set mean of that pixel (`pixel_mean`)."""
    images = check_images(images, "images")
    masks = jnp.broadcast_to(check_mask(masks, images.shape, "masks"), images.shape)
    mean = jnp.asarray(mean, jnp.float32)
    if mean.shape != images.shape[-3:]:
        raise ValueError(f"mean must have one image's shape {images.shape[-3:]}, got {mean.shape}")
    return jnp.where(masks, images, jnp.broadcast_to(mean, images.shape))


@functools.partial(jax.jit, static_argnames=("chunk",))
def _nn_search(queries, observed, train, train_sq, valid, chunk):
    """argmin_j sum_p m_ip (x_ip - t_jp)^2 over the training rows, scanning `chunk` rows at a
    time: ||m x||^2 - 2 (m x) . t_j + m . t_j^2 as two matmuls per chunk."""
    mx = observed * queries
    base = (mx * queries).sum(-1)
    hi = jax.lax.Precision.HIGHEST

    def body(carry, xs):
        best, arg = carry
        t, t_sq, ok, offset = xs
        d = (base[:, None] - 2.0 * jnp.matmul(mx, t.T, precision=hi)
             + jnp.matmul(observed, t_sq.T, precision=hi))
        d = jnp.where(ok[None, :], d, jnp.inf)
        j = jnp.argmin(d, axis=1)
        dj = jnp.take_along_axis(d, j[:, None], 1)[:, 0]
        better = dj < best
        return (jnp.where(better, dj, best), jnp.where(better, j + offset, arg)), None

    n_chunks = train.shape[0] // chunk
    xs = (train.reshape(n_chunks, chunk, -1), train_sq.reshape(n_chunks, chunk, -1),
          valid.reshape(n_chunks, chunk), jnp.arange(n_chunks, dtype=jnp.int32) * chunk)
    init = (jnp.full(queries.shape[0], jnp.inf, queries.dtype),
            jnp.zeros(queries.shape[0], jnp.int32))
    (_, arg), _ = jax.lax.scan(body, init, xs)
    return arg


def nearest_neighbor(images, masks, train_images, chunk_size: int = 8192,
                     query_batch: int = 512) -> tuple[jax.Array, jax.Array]:
    """Fills the missing pixels from the training image closest on the observed pixels.

    Distances are squared errors over each image's observed pixels, computed chunk by chunk
    of the training set with matmuls (about 0.1 s per 100 queries against 60k images on 2
    CPU cores). Returns (filled images (B, H, W, C), index of the neighbour (B,))."""
    images = check_images(images, "images")
    batched = images.ndim == 4
    images = images if batched else images[None]
    masks = check_mask(masks, images.shape, "masks")
    masks = jnp.broadcast_to(masks, images.shape)
    train_images = check_images(train_images, "train_images")
    if train_images.ndim != 4 or train_images.shape[1:] != images.shape[1:]:
        raise ValueError(f"train_images must have shape (N, {', '.join(map(str, images.shape[1:]))}),"
                         f" got {train_images.shape}")
    n_train = train_images.shape[0]
    chunk = int(min(chunk_size, n_train))
    pad = (-n_train) % chunk
    train = train_images.reshape(n_train, -1)
    valid = jnp.arange(n_train + pad) < n_train
    train = jnp.pad(train, ((0, pad), (0, 0)))
    train_sq = train * train
    queries = images.reshape(images.shape[0], -1)
    observed = masks.reshape(images.shape[0], -1).astype(jnp.float32)
    idx = []
    for i in range(0, queries.shape[0], query_batch):  # pad the tail: one compiled shape
        q, o = queries[i:i + query_batch], observed[i:i + query_batch]
        m = q.shape[0]
        if i and m < query_batch:
            q = jnp.pad(q, ((0, query_batch - m), (0, 0)))
            o = jnp.pad(o, ((0, query_batch - m), (0, 0)))
        idx.append(_nn_search(q, o, train, train_sq, valid, chunk)[:m])
    idx = jnp.concatenate(idx)
    filled = jnp.where(masks, images, train_images[idx])
    return (filled if batched else filled[0]), (idx if batched else idx[0])

