"""Latent-space inpainting: search the flow's latents z, not the pixels (Asim et al., ICML 2020,
"Invertible generative models for inverse problems").

With x = decode(z), the posterior of the latents given the observed pixels y = M*X_true under
Gaussian observation noise of std `noise_std` (s) is p(z | y) ~ exp(-E(z)),

    E(z) = ||M * (decode(z) - y)||^2 / (2 s^2) - prior_weight * log p_Z(z),

summed over every level's latents (log p_Z(z) = -||z||^2 / 2 + const for a standard normal
prior). Maximizing log p(x) over pixels is mode-seeking and its log-determinant terms reward
saturated, simple images; in latent space the prior term is a plain ||z||^2, whose small-norm
points decode to typical digits, and the decoder keeps every candidate on the flow's manifold.

- ``latent_map``: argmin E from z = 0 (the prior's mode) by Adam, `steps` steps.
- ``latent``: the estimate PSNR rewards, the posterior mean of the missing pixels,
  approximated by the decoded fills of `starts` such searches from different starts, weighted
  by softmax(-E / temperature) of their final energies (self-normalized importance weights):
  the encodings of the `starts` training images nearest on the observed pixels when a
  `reference` set is given (diverse, plausible modes), else `init_scale` times prior noise.
  With a reference and `rounds` > 1, each later round of searches starts from the training
  images nearest to the last estimate on every pixel (the flow's fill picks the neighbours),
  and the estimate weighs every round's fills.
  A flow trained with variational dequantization encodes each neighbour's pixels as its own
  dequantizer places them inside their bins (`Flow.dequantize`): its density sits where q put
  the noise, and searches started from pixel centres drift off.

Both end with the projection onto C (observed pixels exact, values clipped to [0, 1]). Every
step is E's gradient through the decoder, so one step costs about one pixel-space step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxdnn.data.preprocess import to_pixels
from jaxdnn.inpainting.baselines import nearest_training_images
from jaxdnn.inpainting.chunks import run_chunks

__all__ = ["LATENT_DEFAULTS", "LATENT_MAP_DEFAULTS", "Flow", "as_flow", "latent", "latent_energy", "posterior_weights",
           "latent_map"]

# Observation noise std s (pixel units), Adam step and prior weight of E; for `latent` also the
# searches per image, the std of random starts (no reference set) and the temperature T of the
# weights softmax(-E / T). Chosen on the validation split (docs/inpainting.md, "Methods").
LATENT_MAP_DEFAULTS = {"lr": 0.05, "noise_std": 0.1, "prior_weight": 1.0}
LATENT_DEFAULTS = {"lr": 0.05, "noise_std": 0.05, "prior_weight": 1.0, "starts": 32, "rounds": 1, "init_scale": 0.7,
                   "temperature": 200.0}
START_MARGIN = 0.5 / 256  # reference images are encoded from inside the flow's support


@struct.dataclass
class Flow:
    """A flow as the inpainting methods see it: pure functions (`jax.tree_util.Partial`) whose
    leaves are its parameters, so jitted code takes them as arguments and compiles once.

    log_prob: x (B, H, W, C) -> (B,); encode: x -> list of latents; decode: latents -> x;
    prior_log_prob: latents -> (B,), the log-density of the latents under the prior;
    dequantize: (uint8 pixels (B, H, W), key) -> x (B, H, W, C) by the flow's variational
    dequantizer, or None (uniform noise: reference images are encoded at their pixel centres);
    kind: the Flax model's class name ("RealNVP", "Glow"; static), which picks per-flow defaults
    (`inpainting.default_steps`)."""

    log_prob: jax.tree_util.Partial
    encode: jax.tree_util.Partial
    decode: jax.tree_util.Partial
    prior_log_prob: jax.tree_util.Partial
    dequantize: jax.tree_util.Partial | None = None
    kind: str = struct.field(pytree_node=False, default="")


@functools.cache
def _methods(model):
    def log_prob(params, x):
        return model.apply(params, x, method=model.log_prob)

    def encode(params, x):
        return model.apply(params, x, method=model.encode)[0]

    def decode(params, latents):
        return model.apply(params, list(latents), method=model.decode)

    def prior_log_prob(params, latents):
        return model.apply(params, list(latents), method=model.prior_log_prob)

    def dequantize(params, pixels, key):
        return model.apply(params, pixels, key, method=model.dequantize)[0]

    return log_prob, encode, decode, prior_log_prob, dequantize


def as_flow(model, params) -> Flow:
    """The `Flow` of a Flax flow from `jaxdnn.flows` (one compilation per model and shape)."""
    *methods, dequantize = (jax.tree_util.Partial(f, params) for f in _methods(model))
    return Flow(*methods, dequantize if getattr(model, "dequantization", "uniform") == "variational" else None,
                kind=type(model).__name__)


def latent_energy(flow: Flow, latents, images, masks, noise_std, prior_weight) -> jax.Array:
    """E(z) per image (B,): the observed pixels' squared misfit / (2 s^2) minus the weighted
    prior log-density. latents: as `flow.encode` returns; images (B, H, W, C); masks bool."""
    x = flow.decode(latents)
    misfit = jnp.where(masks, x - images, 0.0) ** 2
    return (misfit.reshape(x.shape[0], -1).sum(-1) / (2.0 * noise_std**2)
            - prior_weight * flow.prior_log_prob(latents))


def _finish(flow: Flow, latents, images, masks):
    """decode(z) projected onto C: observed pixels exact, missing ones clipped to [0, 1]."""
    x = jnp.clip(jnp.nan_to_num(flow.decode(latents)), 0.0, 1.0)
    return jnp.where(masks, images, x)


@jax.jit
def _adam_init(hyper, latents):
    return optax.adam(hyper["lr"]).init(latents)


@functools.partial(jax.jit, static_argnames=("chunk", "unroll"))
def _run_steps(flow, images, masks, hyper, carry, first, chunk, unroll):
    """`chunk` Adam steps on E from carry = (latents, Adam state); returns E at each step's
    starting point (B, chunk)."""
    del first  # Adam keeps its own step count
    opt = optax.adam(hyper["lr"])

    def step(c, _):
        z, state = c
        values, vjp = jax.vjp(
            lambda v: latent_energy(flow, v, images, masks, hyper["noise_std"], hyper["prior_weight"]), z)
        (grad,) = vjp(jnp.ones_like(values))
        grad = jax.tree.map(jnp.nan_to_num, grad)
        updates, state = opt.update(grad, state, z)
        return (optax.apply_updates(z, updates), state), values

    carry, losses = jax.lax.scan(step, carry, None, length=chunk, unroll=chunk if unroll else 1)
    return carry, losses.T


def _search(flow, images, masks, hyper, latents, steps):
    """Adam on E from `latents` for `steps` steps -> (fill (B, H, W, C), energies (B, steps),
    E at the end (B,))."""
    carry = (latents, _adam_init(hyper, latents))
    (z, _), losses = run_chunks(
        lambda c, first, n, unroll: _run_steps(flow, images, masks, hyper, c, first, n, unroll),
        carry, steps, images.shape[0])
    return (*_finish_jit(flow, z, images, masks, hyper), losses)


@jax.jit
def _finish_jit(flow, latents, images, masks, hyper):
    """(decode(z) projected onto C, E(z) at the end (B,))."""
    energy = latent_energy(flow, latents, images, masks, hyper["noise_std"], hyper["prior_weight"])
    return _finish(flow, latents, images, masks), energy


_encode = jax.jit(lambda flow, x: flow.encode(x))
_dequantize = jax.jit(lambda flow, pixels, key: flow.dequantize(pixels, key))
START_SEED = 0  # the dequantizer's noise for reference starts: jax.random.key(START_SEED)


def latent_map(flow: Flow, images, masks, hyper, steps: int):
    """The MAP fill from z = 0: (fill (B, H, W, C), E per step (B, steps))."""
    shapes = jax.eval_shape(flow.encode, images)
    zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    fill, _, losses = _search(flow, images, masks, hyper, zeros, steps)
    return fill, losses


class Candidates(NamedTuple):
    """`starts` = K searches per image: fills (B, K, H, W, C) inside C; energy (B, K), E(z) at
    each search's end; losses (B, steps), the mean E per step."""

    fills: jax.Array
    energy: jax.Array
    losses: jax.Array


def candidates(flow: Flow, images, masks, keys, hyper, steps: int, starts: int, reference=None,
               rounds: int = 1) -> Candidates:
    """All `starts` searches of every image as one batch of B * K searches (one compilation), and
    with several rounds every round's: K = rounds * starts candidates per image.

    reference: float training images (N, H, W, C): search k starts from the encoding of the
    k-th nearest on the observed pixels (dequantized by the flow's q if it has one); None: from
    `init_scale` * N(0, I) drawn from fold_in(keys[b], k) for image b (one round only).
    rounds (with a reference): each round after the first starts from the `starts` reference
    images nearest to the weighted mean of the candidates so far on every pixel (the observed
    ones and the fill), so the flow's fill chooses the next neighbours. losses: (B, rounds * steps)."""
    if rounds > 1 and reference is None:
        raise ValueError(f"rounds={rounds}: each round after the first starts from the reference images nearest to "
                         "the last estimate; pass a reference set")
    b = images.shape[0]
    repeat = lambda a: jnp.repeat(a, starts, axis=0)

    def search(z0):  # z0 image-major: row b * K + k
        fills, energy, losses = _search(flow, repeat(images), repeat(masks), hyper, z0, steps)
        return Candidates(fills.reshape(b, starts, *images.shape[1:]), energy.reshape(b, starts),
                          losses.reshape(b, starts, -1).mean(1))

    if reference is None:
        shapes = jax.eval_shape(flow.encode, images)
        return search(_prior_noise(keys, starts, tuple(s.shape[1:] for s in shapes), hyper["init_scale"]))
    every_pixel = jnp.ones_like(masks)
    nearest = nearest_training_images(images, masks, reference, starts)  # (B, K)
    rounds_found = []
    for r in range(rounds):
        start = jnp.asarray(reference)[nearest.reshape(-1)]
        if flow.dequantize is None:
            start = jnp.clip(start, START_MARGIN, 1.0 - START_MARGIN)
        else:  # where the flow's dequantizer puts these pixels (fixed noise: deterministic)
            start = _dequantize(flow, to_pixels(start), jax.random.key(START_SEED))
        rounds_found.append(search(_encode(flow, start)))
        found = Candidates(*(jnp.concatenate(parts, axis=1) for parts in zip(*rounds_found, strict=True)))
        if r + 1 < rounds:
            nearest = nearest_training_images(_weighted_mean(found, images, masks, hyper["temperature"]), every_pixel,
                                               reference, starts)
    return found


@jax.jit
def _weighted_mean(found: Candidates, images, masks, temperature):
    w = posterior_weights(found.energy, temperature)[:, :, None, None, None]
    return jnp.where(masks, images, (w * found.fills).sum(1))


def latent(flow: Flow, images, masks, keys, hyper, steps: int, starts: int, reference=None, rounds: int = 1):
    """The weighted average of the rounds * `starts` searches' fills (B, H, W, C), weights
    `posterior_weights(E, hyper["temperature"])`, and their mean E per step (B, rounds * steps)."""
    found = candidates(flow, images, masks, keys, hyper, steps, starts, reference, rounds)
    return _weighted_mean(found, images, masks, hyper["temperature"]), found.losses


def posterior_weights(energy: jax.Array, temperature) -> jax.Array:
    """Self-normalized weights softmax(-E / T) over the searches (B, K) -> (B, K): T = inf gives
    equal weights; a search whose E is not finite gets none (all of them: equal weights)."""
    logits = jnp.where(jnp.isfinite(energy), -energy / temperature, -jnp.inf)
    logits = jnp.where(jnp.isneginf(logits).all(1, keepdims=True), 0.0, logits)
    return jax.nn.softmax(logits, axis=1)


@functools.partial(jax.jit, static_argnames=("starts", "shapes"))
def _prior_noise(keys, starts, shapes, scale):
    """init_scale * N(0, I) latents for (image b, start k) from fold_in(keys[b], k), stacked
    image-major: (B * K, ...) per level."""

    def one(key, k):
        parts = jax.random.split(jax.random.fold_in(key, k), len(shapes))
        return [scale * jax.random.normal(p, s) for p, s in zip(parts, shapes, strict=True)]

    per_image = jax.vmap(lambda key: jax.vmap(lambda k: one(key, k))(jnp.arange(starts)))(keys)
    return [z.reshape(-1, *z.shape[2:]) for z in per_image]
