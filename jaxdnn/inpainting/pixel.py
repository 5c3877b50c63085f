"""Pixel-space inpainting: iterate on the image itself, inside the box C of the constraints.

Each method maximizes (or samples) log p(x) of the flow over x in
C = {x : M*x = M*X_true, 0 <= x <= 1}, a box, projected by `optax.projections.projection_box`,
so observed pixels come out of every step bit-for-bit equal to X_true:

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
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdnn.inpainting.chunks import averaged, cosine, run_chunks
from jaxdnn.projection import box_projection, projected_gradient

__all__ = ["ANNEALED_DEFAULTS", "LANGEVIN_DEFAULTS", "PGD_DEFAULTS", "annealed_optimizer", "langevin",
           "mode_search", "pgd_optimizer"]

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
GRAD_LIMIT = 1e15  # annealed: per-pixel gradient clip (Adam divides it out; keeps g^2 finite)


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
        return lr * (lr_final + (1.0 - lr_final) * cosine(count / horizon))

    def std(count):
        return noise * cosine(count / jnp.maximum(noise_until * horizon, 1.0))

    return optax.chain(
        _finite_grads(),
        optax.clip(GRAD_LIMIT),  # Adam squares the gradient: keep that finite
        optax.scale_by_adam(b1=b1, b2=b2),
        optax.scale_by_learning_rate(step_size),
        _add_scheduled_noise(keys, std),
        _finite_updates(),
    )


def _box_and_optimizer(images, masks, keys, hyper, method, steps):
    """(box projection, starting point, optimizer) of a batch (B, H, W, C)."""
    lower = jnp.where(masks, images, hyper["margin"])
    upper = jnp.where(masks, images, 1.0 - hyper["margin"])
    x0 = jnp.where(masks, images, hyper["init"])
    if method == "pgd":
        opt = pgd_optimizer(hyper["lr"])
    else:
        opt = annealed_optimizer(keys, steps, hyper["lr"], hyper["lr_final"], hyper["noise"],
                                 hyper["noise_until"], hyper["b1"], hyper["b2"])
    return box_projection(lower, upper), x0, opt


@functools.partial(jax.jit, static_argnames=("method", "steps"))
def _initial_carry(images, masks, keys, hyper, method, steps):
    _, x0, opt = _box_and_optimizer(images, masks, keys, hyper, method, steps)
    return x0, opt.init(x0), jnp.zeros_like(x0)


@functools.partial(jax.jit, static_argnames=("method", "steps", "chunk", "unroll"))
def _run_steps(log_prob, images, masks, keys, hyper, carry, first, method, steps, chunk, unroll):
    """Steps first .. first + chunk - 1 of the run from carry = (x, optimizer state, running
    weighted sum of the averaged iterates). The flow sees the whole batch at once: log p of
    image b depends on image b only, so the gradient of the summed loss is each image's own."""
    project, _, opt = _box_and_optimizer(images, masks, keys, hyper, method, steps)
    x, opt_state, acc = carry
    res = projected_gradient(lambda v: -log_prob(v), project, x, opt, chunk,
                             return_trajectory=method == "annealed", opt_state=opt_state, unroll=unroll)
    if method == "annealed":  # average the iterates x_{k+1} of the last `average` fraction of the steps
        w = averaged(first + jnp.arange(1, chunk + 1, dtype=jnp.float32), hyper["average"], steps)
        acc = acc + jnp.tensordot(w, res.trajectory[1:], axes=1)
    return (res.x, res.opt_state, acc), res.losses.T


def mode_search(log_prob, images, masks, keys, hyper, method, steps):
    """images (B, H, W, C), masks (H, W, C) or (B, H, W, C), keys (B,) -> (inpainted, losses
    (B, steps)). One scan on GPU/TPU; on CPU unrolled chunks of CPU_CHUNK steps."""
    carry = _initial_carry(images, masks, keys, hyper, method, steps)
    carry, losses = run_chunks(
        lambda c, first, n, unroll: _run_steps(log_prob, images, masks, keys, hyper, c, first, method,
                                             steps, n, unroll), carry, steps, images.shape[0])
    x, _, acc = carry
    if method == "pgd" or steps == 0:
        return x, losses
    total = averaged(jnp.arange(1, steps + 1, dtype=jnp.float32), hyper["average"], steps).sum()
    project, _, _ = _box_and_optimizer(images, masks, keys, hyper, method, steps)
    return project(acc / total), losses  # re-projected: observed pixels exact again


@functools.partial(jax.jit, static_argnames=("steps", "chunk", "unroll"))
def _langevin_steps(log_prob, images, masks, keys, hyper, carry, first, steps, chunk, unroll):
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
        grad = jnp.clip(jnp.nan_to_num(grad), -hyper["grad_clip"], hyper["grad_clip"])
        count = (first + i).astype(jnp.int32)
        noise = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, count), u.shape[1:]))(keys)
        u = jnp.where(observed, 0.0, u + hyper["lr"] * grad + jnp.sqrt(2.0 * hyper["lr"]) * noise)
        w = averaged(first + i + 1.0, hyper["average"], steps)
        return (u, acc + w * jax.nn.sigmoid(u)), -lp.mean(1)

    carry, losses = jax.lax.scan(step, carry, jnp.arange(chunk, dtype=jnp.float32),
                                 unroll=chunk if unroll else 1)
    return carry, losses.T


def langevin(log_prob, images, masks, keys, hyper, steps, chains):
    """(posterior-mean estimate (B, H, W, C), losses (B, steps)); chunks as `mode_search`."""
    shape = (images.shape[0], chains, *images.shape[1:])
    start = jnp.clip(hyper["init"], INIT_EPS, 1.0 - INIT_EPS)  # a finite logit
    u = jnp.full(shape, jax.scipy.special.logit(start), jnp.float32)
    carry, losses = run_chunks(
        lambda c, first, n, unroll: _langevin_steps(log_prob, images, masks, keys, hyper, c, first,
                                                      steps, n, unroll),
        (u, jnp.zeros(shape, jnp.float32)), steps, images.shape[0])
    total = averaged(jnp.arange(1, steps + 1, dtype=jnp.float32), hyper["average"], steps).sum()
    fill = carry[1].mean(1) / total if steps else jnp.full(images.shape, hyper["init"])
    return jnp.where(masks, images, jnp.clip(fill, 0.0, 1.0)), losses
