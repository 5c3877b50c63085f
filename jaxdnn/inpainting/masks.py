"""Masks, input checks and scores over the missing pixels (the part of inpainting without a flow).

Images are float (B, H, W, C) or one image (H, W, C) with values in [0, 1]; a mask is bool of
one image's shape or the batch's, True (or 1) = observed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["IMAGE_SHAPE", "MASKS", "RANDOM_MASKS", "UNSEEN_MASKS", "batch_masks", "check_images", "check_mask",
           "make_mask", "masked_mse", "masked_psnr"]

IMAGE_SHAPE = (28, 28, 1)
MASKS = ("hw10", "top_half", "bottom_half", "left_half", "center", "random50")
UNSEEN_MASKS = ("strokes", "stripes")  # families no model here was trained or tuned on
RANDOM_MASKS = ("random50", "strokes")  # drawn from a key, one per image
PSNR_MSE_FLOOR = 1e-10  # a perfect fill reports 100 dB instead of infinity


# ----------------------------------------------------------------------------- checks


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
    uniformly from `key` (the same pixels in every channel). Two families no model here was
    trained on (`UNSEEN_MASKS`): strokes: four random line segments of width ~2.5 pixels missing
    (`key`); stripes: rows in alternate bands of three missing (rows 3..5, 9..11, ...)."""
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
    elif name == "stripes":
        missing[(np.arange(h) // 3) % 2 == 1] = True
    elif name == "strokes":
        if key is None:
            raise ValueError("mask 'strokes' needs a key")
        ends = jax.random.uniform(key, (4, 2, 2)) * jnp.array([h - 1, w - 1])
        rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
        points = jnp.stack([rows, cols], -1).reshape(-1, 1, 2).astype(jnp.float32)
        a, b = ends[:, 0], ends[:, 1]  # (4, 2) each
        along = jnp.clip(((points - a) * (b - a)).sum(-1) / jnp.maximum(((b - a) ** 2).sum(-1), 1e-6), 0.0, 1.0)
        dist = jnp.linalg.norm(points - (a + along[..., None] * (b - a)), axis=-1).min(-1)
        return jnp.broadcast_to((dist > 1.25).reshape(h, w, 1), (h, w, c))
    else:
        raise ValueError(f"unknown mask {name!r}; choose from {list(MASKS + UNSEEN_MASKS)}")
    return jnp.broadcast_to(jnp.asarray(~missing)[..., None], (h, w, c))


def batch_masks(name: str, indices, key: jax.Array | None = None,
                shape: tuple[int, int, int] = IMAGE_SHAPE) -> jax.Array:
    """Masks (N, H, W, C) for the images numbered `indices`: `random50` draws image i's mask
    from fold_in(key, i), so it does not depend on which range is processed."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if name in RANDOM_MASKS:
        if key is None:
            raise ValueError(f"mask {name!r} needs a key")
        return jnp.stack([make_mask(name, jax.random.fold_in(key, int(i)), shape)
                          for i in indices]) if indices.size else jnp.zeros((0, *shape), bool)
    one = make_mask(name, None, shape)
    return jnp.broadcast_to(one, (indices.size, *shape))


# ----------------------------------------------------------------------------- scores


def masked_mse(images, targets, masks) -> jax.Array:
    """Per-image mean squared error over the missing pixels (mask False), shape (B,); images and
    targets float in [0, 1] of one shape (`check_images`; uint8 pixels are refused).

    An image with no missing pixel gives NaN."""
    images, targets = check_images(images, "images"), check_images(targets, "targets")
    if images.shape != targets.shape:
        raise ValueError(f"images and targets must have one shape, got {images.shape} and {targets.shape}")
    missing = jnp.broadcast_to(~jnp.asarray(masks, bool), images.shape)
    axes = tuple(range(images.ndim - 3, images.ndim))
    err = jnp.where(missing, (images - targets) ** 2, 0.0).sum(axes)
    return err / missing.sum(axes)


def masked_psnr(images, targets, masks, peak: float = 1.0) -> jax.Array:
    """Per-image PSNR in dB over the missing pixels: 10 log10(peak^2 / MSE), shape (B,); the
    MSE is floored at 1e-10 so a perfect fill reads 100 dB (peak 1) rather than infinity."""
    mse = masked_mse(images, targets, masks)
    return 10.0 * jnp.log10(peak**2 / jnp.maximum(mse, PSNR_MSE_FLOOR))
