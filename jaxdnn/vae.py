"""Problem 1: a VAE trained with the log-derivative trick or the reparameterization trick.

A VAE (Flax Linen MLP encoder/decoder, diagonal Gaussian latent, standard normal prior,
Bernoulli decoder) on dynamically binarized MNIST, whose encoder gradient is either the
log-derivative form grad_phi E_q[log(p(x, Z) / q_phi(Z))] = E_q[(grad_phi log q_phi) log(p/q)]
(optionally with a leave-one-out RLOO baseline over the samples of each data point) or the
pathwise one, with the same number of latent samples per data point; the decoder gradient is
the same in both. `evaluate` gives the ELBO and the importance-weighted bound (IWAE, k
samples). The numerical check of the identity itself is `jaxdnn.log_derivative_identity`.

Images are NHWC float32 (B, 28, 28, 1) in [0, 1] (Bernoulli means) or uint8 (B, 28, 28).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from jaxdnn import estimators
from jaxdnn.data.batches import epoch_permutation

ESTIMATORS = ("log_derivative", "reparameterization")
VAE_BASELINES = ("none", "rloo")
NUM_PIXELS = 784


# --------------------------------------------------------------------------------------
# Model.


class EncoderDecoderMLP(nn.Module):
    """The VAE's encoder and decoder network: `depth` Dense + ReLU layers of width `hidden`,
    then a Dense layer to `out`, every layer with Flax's default (LeCun normal) init.

    Not `jaxdnn.flows.layers.MLP`, whose last layer is zero-initialized so that a coupling
    starts as the identity: here that would start every encoder at q(z | x) = N(0, I) and
    the decoder at logits 0 whatever the input (and give the earlier layers zero gradient at
    the first step), a different initialization and so different results.
    """

    hidden: int
    depth: int
    out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.out)(x)


class VAE(nn.Module):
    """Encoder x (..., 784) -> (mean, log_std) (..., latent); decoder z -> logits (..., 784)."""

    latent: int = 32
    hidden: int = 512
    depth: int = 1

    def setup(self):
        self.encoder = EncoderDecoderMLP(self.hidden, self.depth, 2 * self.latent)
        self.decoder = EncoderDecoderMLP(self.hidden, self.depth, NUM_PIXELS)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.encoder(x)
        return h[..., : self.latent], h[..., self.latent:]

    def decode(self, z: jax.Array) -> jax.Array:
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:  # for init: touches both networks
        mean, _ = self.encode(x)
        return self.decode(mean)


class VAEConfig(NamedTuple):
    """Hashable (static under jit) settings."""

    estimator: str = "reparameterization"
    baseline: str = "none"  # log_derivative only: "none" or "rloo" (needs samples >= 2)
    samples: int = 1  # latent samples per data point per step (the same for both estimators)
    latent: int = 32
    hidden: int = 512
    depth: int = 1
    lr: float = 1e-3
    batch: int = 128

    def model(self) -> VAE:
        return VAE(latent=self.latent, hidden=self.hidden, depth=self.depth)

    def validate(self) -> VAEConfig:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.baseline not in VAE_BASELINES:
            raise ValueError(f"baseline must be one of {VAE_BASELINES}, got {self.baseline!r}")
        if self.baseline != "none" and self.estimator != "log_derivative":
            raise ValueError("a baseline applies to the log_derivative estimator only")
        if self.baseline == "rloo" and self.samples < 2:
            raise ValueError(f"baseline 'rloo' needs samples >= 2, got {self.samples}")
        for name in ("samples", "latent", "hidden", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.depth < 0:
            raise ValueError(f"depth must be >= 0, got {self.depth}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        return self


def _flat(x: jax.Array) -> jax.Array:
    if x.shape[1:] not in ((28, 28, 1), (28, 28), (NUM_PIXELS,)):
        raise ValueError(f"images must be (B, 28, 28, 1), (B, 28, 28) or (B, 784), got {x.shape}")
    return x.reshape(x.shape[0], NUM_PIXELS)


def as_probabilities(images: Any) -> np.ndarray:
    """uint8 pixels -> p / 255, floats kept; flattened to (B, 784) float32 (host-side numpy:
    data preparation compiles nothing)."""
    x = np.asarray(images)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return _flat(x)


def binarize(key: jax.Array, probs: jax.Array) -> jax.Array:
    """Dynamic binarization: x ~ Bernoulli(probs), float32."""
    return jax.random.bernoulli(key, probs).astype(jnp.float32)


def posterior(model: VAE, params: Any, x: jax.Array) -> distrax.Distribution:
    mean, log_std = model.apply(params, x, method=VAE.encode)
    return distrax.MultivariateNormalDiag(mean, jnp.exp(log_std))


def log_joint(model: VAE, params: Any, x: jax.Array, z: jax.Array) -> jax.Array:
    """log p(x, z) = log p(x | z) + log N(z; 0, I); z (S, B, L), x (B, 784) -> (S, B)."""
    logits = model.apply(params, z, method=VAE.decode)
    xs = jnp.broadcast_to(x[None], logits.shape)
    log_lik = distrax.Independent(distrax.Bernoulli(logits=logits), 1).log_prob(xs)
    log_prior = distrax.Normal(0.0, 1.0).log_prob(z).sum(-1)
    return log_lik + log_prior


def log_weights(key: jax.Array, model: VAE, params: Any, x: jax.Array, num_samples: int):
    """log w = log p(x, z) - log q(z | x) for z ~ q (reparameterized), shape (S, B)."""
    z, log_q = _sample_and_log_prob(key, posterior(model, params, x), num_samples)
    return log_joint(model, params, x, z) - log_q


def _sample_and_log_prob(key: jax.Array, q: distrax.Distribution, num_samples: int):
    # One sample per key, vmapped, and log_prob separately: distrax's Normal
    # `sample_and_log_prob` and `log_prob` of a sample_shape-d value broadcast (S, B, L)
    # against (B, L), which jax_numpy_rank_promotion='raise' rejects.
    z = jax.vmap(lambda k: q.sample(seed=k))(jax.random.split(key, num_samples))
    return z, jax.vmap(q.log_prob)(z)


def surrogate_loss(
    params: Any, key: jax.Array, x: jax.Array, config: VAEConfig
) -> tuple[jax.Array, dict]:
    """A loss whose gradient is minus the chosen ELBO gradient estimate; x binary (B, 784).

    reparameterization: -mean log w(z(phi, eps)).
    log_derivative: z stop-gradiented; decoder gradient of mean log p(x, z) (the same
    pathwise decoder gradient as above) plus the encoder term
    -mean[stop_gradient(log w - b) * log q_phi(z)], b the RLOO baseline or 0.
    """
    model = config.model()
    q = posterior(model, params, x)
    z, log_q = _sample_and_log_prob(key, q, config.samples)  # (S, B, L), (S, B)
    if config.estimator == "log_derivative":
        z = jax.lax.stop_gradient(z)
        log_q = jax.vmap(q.log_prob)(z)  # differentiable in phi at the fixed sample
    log_p = log_joint(model, params, x, z)
    log_w = log_p - log_q  # (S, B)
    if config.estimator == "reparameterization":
        surrogate = jnp.mean(log_w)
    else:
        signal = jax.lax.stop_gradient(log_w)
        if config.baseline == "rloo":
            signal = signal - estimators.leave_one_out_mean(signal, axis=0)
        surrogate = jnp.mean(log_p) + jnp.mean(signal * log_q)
    elbo = jax.lax.stop_gradient(jnp.mean(log_w))
    return -surrogate, {"elbo": elbo}


class VAEState(train_state.TrainState):
    """Flax's `TrainState` (step, params, Adam state) of a VAE; a different thing from
    `jaxdnn.train.TrainState`, the flows' NamedTuple that also counts skipped updates."""


def init_state(key: jax.Array, config: VAEConfig) -> VAEState:
    """Parameters and Adam state, built in one compiled call."""
    config.validate()
    return _init_state(key, config.model(), config.lr)


@functools.partial(jax.jit, static_argnames=("model", "lr"))
def _init_state(key: jax.Array, model: VAE, lr: float) -> VAEState:
    params = model.init(key, jnp.zeros((1, NUM_PIXELS), jnp.float32))
    return VAEState.create(apply_fn=model.apply, params=params, tx=optax.adam(lr))


def train_step(state: VAEState, probs: jax.Array, key: jax.Array, config: VAEConfig):
    """(state, batch of Bernoulli means (B, 784), key) -> (state, metrics); pure."""
    k_bin, k_z = jax.random.split(key)
    x = binarize(k_bin, probs)
    (loss, metrics), grads = jax.value_and_grad(surrogate_loss, has_aux=True)(
        state.params, k_z, x, config
    )
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.apply_gradients(grads=grads), metrics


@functools.partial(jax.jit, static_argnames="config", donate_argnums=0)
def train_steps(state: VAEState, batches: jax.Array, key: jax.Array, config: VAEConfig):
    """`train_step` over batches (T, B, 784) in one lax.scan; step s uses fold_in(key, s)."""

    def body(state, batch):
        return train_step(state, batch, jax.random.fold_in(key, state.step), config)

    return jax.lax.scan(body, state, batches)


@functools.partial(jax.jit, static_argnames=("model", "num_samples"))
def _eval_chunk(params, key, index, probs, model: VAE, num_samples: int):
    k_bin, k_z = jax.random.split(jax.random.fold_in(key, index))
    x = binarize(k_bin, probs)
    lw = log_weights(k_z, model, params, x, num_samples)  # (k, B)
    elbo = jnp.mean(lw, axis=0)
    iwae = jax.nn.logsumexp(lw, axis=0) - math.log(num_samples)
    return elbo, iwae


def evaluate(
    key: jax.Array,
    params: Any,
    config: VAEConfig,
    images: Any,
    num_samples: int = 100,
    chunk: int = 250,
) -> tuple[float, float]:
    """(ELBO, IWAE bound) in nats per image, averaged over `images` (binarized with
    fold_in(key, chunk index), so a fixed key gives a fixed binarized test set).

    ELBO: mean over k samples of log w; IWAE: log mean_k exp(log w) (<= log p(x))."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    probs = as_probabilities(images)
    n = probs.shape[0]
    elbos, iwaes = [], []
    for i, start in enumerate(range(0, n, chunk)):
        e, w = _eval_chunk(params, key, i, probs[start:start + chunk], config.model(),
                           num_samples)
        elbos.append(np.asarray(e))
        iwaes.append(np.asarray(w))
    return float(np.concatenate(elbos).mean()), float(np.concatenate(iwaes).mean())


def reconstruct(key: jax.Array, params: Any, config: VAEConfig, images: Any) -> jax.Array:
    """Bernoulli means of p(x | z), z ~ q(z | x) for binarized images; (B, 28, 28, 1)."""
    return _reconstruct(key, params, as_probabilities(images), config.model())


@functools.partial(jax.jit, static_argnames="model")
def _reconstruct(key, params, probs, model: VAE):
    k_bin, k_z = jax.random.split(key)
    x = binarize(k_bin, probs)
    z = posterior(model, params, x).sample(seed=k_z)  # (B, L): no sample_shape
    return jax.nn.sigmoid(model.apply(params, z, method=VAE.decode)).reshape(-1, 28, 28, 1)


@functools.partial(jax.jit, static_argnames=("config", "num"))
def sample(key: jax.Array, params: Any, config: VAEConfig, num: int) -> jax.Array:
    """Bernoulli means of p(x | z), z ~ N(0, I); (num, 28, 28, 1)."""
    z = jax.random.normal(key, (num, config.latent))
    logits = config.model().apply(params, z, method=VAE.decode)
    return jax.nn.sigmoid(logits).reshape(-1, 28, 28, 1)


def train(
    key: jax.Array,
    config: VAEConfig,
    images: Any,
    epochs: int,
    *,
    chunk: int = 100,
    progress: Callable[[Iterable], Iterable] | None = None,
    on_epoch: Callable[[int, VAEState, dict], None] | None = None,
) -> tuple[VAEState, list[dict]]:
    """Trains for `epochs` epochs of shuffled batches (ragged tail dropped); returns the
    state and per-epoch metrics (mean training ELBO estimate, seconds). `chunk` bounds the
    number of steps per compiled `train_steps` call.

    Keys: init, data order (epoch_permutation(k_data, epoch)), and per-step keys
    fold_in(k_step, step) for binarization and latent samples.
    """
    import time

    config.validate()
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    probs = as_probabilities(images)
    n = probs.shape[0]
    per_epoch = n // config.batch
    if per_epoch == 0:
        raise ValueError(f"batch {config.batch} exceeds the {n} training images")
    # steps per compiled call: the largest divisor of the epoch's steps up to `chunk`, so
    # that one compilation serves the whole run
    chunk = max(d for d in range(1, min(chunk, per_epoch) + 1) if per_epoch % d == 0)
    k_init, k_data, k_step = jax.random.split(key, 3)
    state = init_state(k_init, config)
    history = []
    wrap = progress or (lambda it: it)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        perm = epoch_permutation(k_data, epoch, n)[: per_epoch * config.batch]
        data = probs[perm].reshape(per_epoch, config.batch, NUM_PIXELS)  # host-side gather
        elbos = []
        for start in wrap(range(0, per_epoch, chunk)):
            state, metrics = train_steps(state, data[start:start + chunk], k_step, config)
            elbos.append(metrics["elbo"])
        elbo = float(np.concatenate([np.asarray(e) for e in elbos]).mean())
        if not math.isfinite(elbo):
            raise FloatingPointError(f"training diverged in epoch {epoch} (ELBO {elbo})")
        record = {"epoch": epoch + 1, "train_elbo": elbo, "seconds": time.perf_counter() - t0}
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, state, record)
    return state, history
