"""Score a flow's inpainting of a set of images against the three baselines, in one call:
`evaluate(model, params, images, mask, method) -> (metrics, arrays)`."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdnn import conditional_mean
from jaxdnn.data.preprocess import to_pixels
from jaxdnn.flows.distribution import FlowDistribution
from jaxdnn.inpainting.baselines import knn_mean, mean_fill, nearest_neighbor, pixel_mean
from jaxdnn.inpainting.latent import as_flow
from jaxdnn.inpainting.masks import (
    IMAGE_SHAPE,
    batch_masks,
    check_images,
    check_mask,
    make_mask,
    masked_mse,
    masked_psnr,
)
from jaxdnn.inpainting.methods import DEFAULTS, METHODS, inpaint

__all__ = ["BASELINES", "evaluate"]

BASELINES = ("mean_fill", "nearest_neighbor", "knn_mean")


def _batched(fn, n: int, batch_size: int):
    """Calls fn(lo, hi) over [0, n) in slices of one size (the tail is re-run on a full-size
    window ending at n, so every call has the same shape) and concatenates the results."""
    size = min(batch_size, n)
    outs = []
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        start = max(0, hi - size)
        out = fn(start, start + size)
        outs.append(jax.tree.map(lambda a, lo=lo, start=start, hi=hi: a[lo - start:hi - start], out))
    return jax.tree.map(lambda *a: jnp.concatenate(a), *outs)


def evaluate(model, params, images, mask="hw10", method: str = "latent", *, train_images, key=None,
             indices=None, steps: int | None = None, lr: float | None = None, batch_size: int = 100,
             labels=None, **options):
    """Inpaints `images` with the flow (model, params) and scores it against the baselines.

    images: float (N, 28, 28, 1) in [0, 1]. mask: a name from `MASKS`, or a bool/0-1 array
        (28, 28, 1) or (N, 28, 28, 1) with 1 = observed.
    method, steps, lr, options: as `inpaint`. train_images: float (M, 28, 28, 1), the baselines'
        data and the `latent` method's reference set (never the scored images).
    key: master key (default `jax.random.key(0)`); its first subkey draws random masks, its
        second the methods' noise. Image i uses fold_in(subkey, indices[i]), so results do not
        depend on the range or the batch size. indices: the images' numbers (default 0..N-1).
    batch_size: images per call (one compilation: a short tail re-runs a full window).
    labels: the images' digits (N,); given, metrics gain "accuracy": the fraction of the method's
        and each baseline's completions the plausibility classifier reads as the true digit,
        with "ceiling" (the original images) and "floor" (observed pixels only, the rest 0).

    Returns (metrics, arrays). metrics: {"psnr", "mse", "bpd", "baselines": {name: {"psnr",
    "mse"}}, "paired": {name: {"mean", "stderr"}}, "seconds", "method_seconds"}: means over the
    images of the per-image PSNR / MSE over the missing pixels, the mean bits/dim of the inpainted
    images rounded to 8 bits (the bound the cards report: the model's own dequantizer), the wall
    time of the whole call and of the method alone (its compilation included).
    Baselines: `BASELINES`, and for "latent" the matched ones,
    "knn_matched" (knn_mean over as many neighbours as the method has starts), "conditional_mean"
    (the supervised network of `jaxdnn.conditional_mean`: what the flow adds over it) and "start" (the method at
    0 steps, its own starting point). "paired": for each baseline, the mean over the
    images of (method's PSNR - baseline's PSNR) and its standard error (the spread of a paired
    difference, not of either score). arrays (NumPy): original, corrupted, inpainted, masks,
    each baseline's fill and per-image psnr ("psnr_<name>"), psnr, mse, bpd (per image),
    losses (N, steps).
    """
    t0 = time.perf_counter()
    images = check_images(images, "images")
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"images must have shape (N, 28, 28, 1), got {images.shape}")
    n = images.shape[0]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    indices = np.arange(n) if indices is None else np.asarray(indices).reshape(-1)
    if indices.shape != (n,):
        raise ValueError(f"indices must have one entry per image ({n}), got {indices.shape}")
    key = jax.random.key(0) if key is None else key
    mask_key, noise_key = jax.random.split(key)
    if isinstance(mask, str):  # one shared (28, 28, 1) mask unless it is drawn per image
        masks = batch_masks(mask, indices, mask_key) if mask == "random50" else make_mask(mask)
    else:
        masks = check_mask(mask, images.shape, "mask")
    shared = masks.ndim == 3
    masks_b = jnp.broadcast_to(masks, images.shape)
    if not bool((~masks_b).any(axis=(1, 2, 3)).all()):
        raise ValueError("every image needs at least one missing pixel (mask 0)")
    keys = jax.vmap(lambda i: jax.random.fold_in(noise_key, i))(jnp.asarray(indices, jnp.int32))
    train_images = check_images(train_images, "train_images")
    reference = {"reference": train_images} if method == "latent" else {}

    flow = as_flow(model, params)

    def run(lo, hi):
        res = inpaint(flow, images[lo:hi], masks if shared else masks[lo:hi], keys[lo:hi], method=method,
                      steps=steps, lr=lr, return_losses=True, **reference, **options)
        return res.images, res.losses

    inpainted, losses = jax.block_until_ready(_batched(run, n, batch_size))
    method_seconds = time.perf_counter() - t0
    # bits/dim as the card scores test images: 8-bit pixels, the model's own dequantizer; image i's
    # noise from fold_in(noise_key, indices[i]), so it does not depend on the batch or the process
    dist, pixels = FlowDistribution(model, params), to_pixels(inpainted)
    bpd = jnp.concatenate([dist.bits_per_dim(pixels[i:i + 1], jax.random.fold_in(noise_key, int(indices[i])))
                           for i in range(n)])
    fills = {"mean_fill": mean_fill(images, masks_b, pixel_mean(train_images)),
             "nearest_neighbor": nearest_neighbor(images, masks_b, train_images)[0],
             "knn_mean": knn_mean(images, masks_b, train_images)}
    if method == "latent":  # its neighbours, its starts, and the supervised network (a named baseline)
        starts = options.get("starts", DEFAULTS["latent"]["starts"])
        fills["knn_matched"] = knn_mean(images, masks_b, train_images, k=starts)
        fills["conditional_mean"] = conditional_mean.predict(images, masks_b)
        first = {**options, "rounds": 1}  # the first round's starts
        fills["start"] = _batched(lambda lo, hi: inpaint(flow, images[lo:hi], masks if shared else masks[lo:hi],
                                                         keys[lo:hi], method=method, steps=0, lr=lr, **reference,
                                                         **first), n, batch_size)

    def scores(x):
        return (np.asarray(masked_psnr(x, images, masks_b), np.float64),
                np.asarray(masked_mse(x, images, masks_b), np.float64))

    psnr, mse = scores(inpainted)
    baselines, paired, per_image = {}, {}, {}
    for name, filled in fills.items():
        p, m = scores(filled)
        baselines[name] = {"psnr": float(p.mean()), "mse": float(m.mean())}
        d = psnr - p
        paired[name] = {"mean": float(d.mean()), "stderr": float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")}
        per_image[f"psnr_{name}"] = p
    start_value = options.get("init", DEFAULTS[method].get("init", 0.0))
    if labels is not None:
        from jaxdnn.inpainting.plausibility import predict as read_digits

        labels = np.asarray(labels).reshape(-1)
        floor = jnp.where(masks_b, images, 0.0)
        read = {"method": inpainted, **fills, "ceiling": images, "floor": floor}
        per_image.update({f"correct_{k}": read_digits(v) == labels for k, v in read.items()})
    metrics = {"psnr": float(psnr.mean()), "mse": float(mse.mean()),
               "bpd": float(np.mean(np.asarray(bpd, np.float64))), "baselines": baselines, "paired": paired,
               "seconds": time.perf_counter() - t0, "method_seconds": method_seconds}
    if labels is not None:
        metrics["accuracy"] = {k[len("correct_"):]: float(v.mean()) for k, v in per_image.items()
                               if k.startswith("correct_")}
    arrays = {"original": np.asarray(images), "masks": np.asarray(masks_b),
              "corrupted": np.asarray(jnp.where(masks_b, images, start_value)),
              "inpainted": np.asarray(inpainted), **{k: np.asarray(v) for k, v in fills.items()},
              **per_image, "psnr": psnr, "mse": mse, "bpd": np.asarray(bpd), "losses": np.asarray(losses)}
    return metrics, arrays
