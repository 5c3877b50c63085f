"""Fills that need no flow, to score every flow method against: the training set's per-pixel
mean, the nearest training image on the observed pixels, and the mean of the k nearest.

The k nearest training images are also where the `latent` method starts its searches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxdnn.inpainting.masks import check_images, check_mask

__all__ = ["KNN", "knn_mean", "mean_fill", "nearest_neighbor", "nearest_training_images", "pixel_mean"]

KNN = 10  # knn_mean averages this many neighbours


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


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _knn_search(queries, observed, train, train_sq, valid, k, chunk):
    """The k training rows nearest each query on its observed pixels, nearest first:
    d_j = ||m x||^2 - 2 (m x) . t_j + m . t_j^2 as two matmuls per chunk of `chunk` rows.
    queries, observed (Q, D), train (N, D) -> indices (Q, k)."""
    mx = observed * queries
    base = (mx * queries).sum(-1)
    hi = jax.lax.Precision.HIGHEST

    def body(carry, xs):
        best_d, best_i = carry
        t, t_sq, ok, offset = xs
        d = (base[:, None] - 2.0 * jnp.matmul(mx, t.T, precision=hi)
             + jnp.matmul(observed, t_sq.T, precision=hi))
        d = jnp.where(ok[None, :], d, jnp.inf)
        cand_d = jnp.concatenate([best_d, d], 1)  # the best so far first: ties keep the lower index
        cand_i = jnp.concatenate([best_i, jnp.broadcast_to(offset + jnp.arange(chunk), d.shape)], 1)
        neg, pos = jax.lax.top_k(-cand_d, k)
        return (-neg, jnp.take_along_axis(cand_i, pos, 1)), None

    n_chunks = train.shape[0] // chunk
    xs = (train.reshape(n_chunks, chunk, -1), train_sq.reshape(n_chunks, chunk, -1),
          valid.reshape(n_chunks, chunk), jnp.arange(n_chunks, dtype=jnp.int32) * chunk)
    init = (jnp.full((queries.shape[0], k), jnp.inf, queries.dtype),
            jnp.zeros((queries.shape[0], k), jnp.int32))
    (_, idx), _ = jax.lax.scan(body, init, xs)
    return idx


def nearest_training_images(images, masks, train_images, k: int = 1, chunk_size: int = 8192,
                            query_batch: int = 512) -> jax.Array:
    """Indices (B, k) of the k training images closest to each image on its observed pixels
    (squared error over the pixels where the mask is True), nearest first.

    images (B, H, W, C) or (H, W, C); masks as `check_mask`; train_images (N, H, W, C).
    Computed chunk by chunk of the training set with matmuls (about 0.1 s per 100 queries
    against 60k images on 2 CPU cores)."""
    images = check_images(images, "images")
    images = images if images.ndim == 4 else images[None]
    masks = jnp.broadcast_to(check_mask(masks, images.shape, "masks"), images.shape)
    train_images = check_images(train_images, "train_images")
    if train_images.ndim != 4 or train_images.shape[1:] != images.shape[1:]:
        raise ValueError(f"train_images must have shape (N, {', '.join(map(str, images.shape[1:]))}),"
                         f" got {train_images.shape}")
    n_train = train_images.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_train:
        raise ValueError(f"k must be an integer in [1, {n_train}] (the training images), got {k!r}")
    chunk = int(min(chunk_size, n_train))
    pad = (-n_train) % chunk
    train = jnp.pad(train_images.reshape(n_train, -1), ((0, pad), (0, 0)))
    valid = jnp.arange(n_train + pad) < n_train
    queries = images.reshape(images.shape[0], -1)
    observed = masks.reshape(images.shape[0], -1).astype(jnp.float32)
    idx = []
    for i in range(0, queries.shape[0], query_batch):  # pad the tail: one compiled shape
        q, o = queries[i:i + query_batch], observed[i:i + query_batch]
        m = q.shape[0]
        if i and m < query_batch:
            q = jnp.pad(q, ((0, query_batch - m), (0, 0)))
            o = jnp.pad(o, ((0, query_batch - m), (0, 0)))
        idx.append(_knn_search(q, o, train, train * train, valid, k, chunk)[:m])
    return jnp.concatenate(idx)


def _fill(images, masks, values):
    """Observed pixels from `images`, missing ones from `values` (B, H, W, C); unbatched for one image."""
    images = check_images(images, "images")
    single = images.ndim == 3
    batch = images.reshape(-1, *images.shape[-3:])
    masks = jnp.broadcast_to(check_mask(masks, batch.shape, "masks"), batch.shape)
    filled = jnp.where(masks, batch, values)
    return filled[0] if single else filled


def nearest_neighbor(images, masks, train_images, chunk_size: int = 8192,
                     query_batch: int = 512) -> tuple[jax.Array, jax.Array]:
    """Fills the missing pixels from the training image closest on the observed pixels.
    Returns (filled images (B, H, W, C), index of the neighbour (B,)) (unbatched for one image)."""
    idx = nearest_training_images(images, masks, train_images, 1, chunk_size, query_batch)[:, 0]
    filled = _fill(images, masks, jnp.asarray(train_images, jnp.float32)[idx])
    return filled, (idx if filled.ndim == 4 else idx[0])


def knn_mean(images, masks, train_images, k: int = KNN) -> jax.Array:
    """Missing pixels set to the mean of the k training images nearest on the observed pixels
    (shape of `images`)."""
    idx = nearest_training_images(images, masks, train_images, k)
    return _fill(images, masks, jnp.asarray(train_images, jnp.float32)[idx].mean(1))
