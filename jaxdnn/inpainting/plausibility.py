"""Is the completion the right digit? A small MNIST classifier trained on the training split only
(images 0..54999, its card carries its validation and test accuracy), and the accuracy of
completed images against the true labels, beside PSNR: PSNR rewards blur, the classifier asks
whether a filled-in 7 still reads as a 7.

`accuracy(images, labels)` uses the shipped weights (`jaxdnn/pretrained/classifier.msgpack` and
its card); `python -m experiments.train_classifier` trains and exports them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from jaxdnn.inpainting.masks import check_images
from jaxdnn.pretrained.store import SHIPPED_DIR, read_card, read_weights

__all__ = ["DigitClassifier", "accuracy", "load", "predict", "predict_proba", "train"]

WEIGHTS, CARD = SHIPPED_DIR / "classifier.msgpack", SHIPPED_DIR / "classifier.json"


class DigitClassifier(nn.Module):
    """Two 3x3 convolutions (32, 64 channels) with max pooling, a dense layer of 128: (B, 28, 28, 1)
    images in [0, 1] -> (B, 10) logits."""

    @nn.compact
    def __call__(self, x):
        for features in (32, 64):
            x = nn.relu(nn.Conv(features, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def train(key: jax.Array, images: np.ndarray, labels: np.ndarray, epochs: int = 2, batch_size: int = 128,
          lr: float = 1e-3):
    """Parameters of `DigitClassifier` after `epochs` of Adam on uint8 images (N, 28, 28) with
    labels (N,), each pixel x (p + 0.5) / 256 as the flows see them."""
    model = DigitClassifier()
    x_all = (images.astype(np.float32)[..., None] + 0.5) / 256.0
    k_init, k_data = jax.random.split(key)
    params = model.init(k_init, jnp.zeros((1, 28, 28, 1)))
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(
            lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean())(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    per_epoch = len(images) // batch_size
    for epoch in range(epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(k_data, epoch), len(images)))
        for i in range(per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            params, state, _ = step(params, state, x_all[idx], labels[idx].astype(np.int32))
    return params


@functools.cache
def load():
    """The shipped classifier's parameters."""
    if not WEIGHTS.is_file():
        raise FileNotFoundError(f"{WEIGHTS} is missing: python -m experiments.train_classifier --ship")
    template = jax.eval_shape(DigitClassifier().init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    return read_weights(WEIGHTS, template, read_card(CARD), expected="DigitClassifier")


def card() -> dict:
    """The shipped classifier's card (`store.Card` as JSON: training split, the command that made
    it, validation and test accuracy under "metrics")."""
    return read_card(CARD).to_dict()


@jax.jit
def _logits(params, x):
    return DigitClassifier().apply(params, x)


def predict_proba(images, params=None, batch_size: int = 1000) -> np.ndarray:
    """The classifier's digit probabilities (N, 10) of float images (N, 28, 28, 1) in [0, 1]."""
    images = check_images(images, "images")
    params = load() if params is None else params
    n, out = images.shape[0], []
    for lo in range(0, n, batch_size):
        chunk = images[lo:lo + batch_size]
        pad = batch_size - chunk.shape[0] if n > batch_size else 0  # one compiled shape for long inputs
        padded = jnp.concatenate([chunk, jnp.zeros((pad, *chunk.shape[1:]), chunk.dtype)]) if pad else chunk
        out.append(np.asarray(jax.nn.softmax(_logits(params, padded), -1))[: chunk.shape[0]])
    return np.concatenate(out)


def predict(images, params=None, batch_size: int = 1000) -> np.ndarray:
    """Predicted digits (N,) of float images (N, 28, 28, 1) in [0, 1] (completions, originals)."""
    return predict_proba(images, params, batch_size).argmax(-1)


def accuracy(images, labels, params=None) -> float:
    """The fraction of `images` (N, 28, 28, 1) in [0, 1] the classifier reads as their `labels` (N,)."""
    labels = np.asarray(labels).reshape(-1)
    predicted = predict(images, params)
    if predicted.shape != labels.shape:
        raise ValueError(f"labels must have one entry per image ({predicted.shape[0]}), got {labels.shape}")
    return float((predicted == labels).mean())
