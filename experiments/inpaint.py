"""Problem 3: inpaint MNIST test images with a pretrained flow by projected gradient.

    python -m experiments.inpaint [--model {nice,realnvp,glow}] [--mask NAME]
        [--images START:STOP] [--method {pgd,annealed,langevin}] [--steps 300] [--lr LR] [--seed 0]
        [--batch-size 100] [--out DIR] [--json]

Minimizes -log p(X) subject to M*X = M*X_true, 0 <= X <= 1 for the test images START..STOP-1
(`pgd`: the course's 300 plain steps of 1e-3 from missing pixels set to 1; `annealed`:
projected Langevin with annealing; `langevin`: the posterior mean over 8 Langevin chains per
image, 8x the cost). Reports over the missing pixels only the mean PSNR
(peak 1), the mean MSE and the mean bits/dim of the inpainted images, beside two non-learned
baselines computed in the same run: mean_fill (training-set per-pixel mean) and
nearest_neighbor (the training image closest on the observed pixels). Writes a figure with
rows original / corrupted / inpainted to DIR/inpaint_<model>_<mask>_<method>.png.

From Python, `evaluate(model, params, images, mask, method)` returns (metrics, arrays).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import ArgumentParser, print_json, save_figure
from jaxdnn import inpainting as ip
from jaxdnn import pretrained
from jaxdnn.data import FetchError, bits_per_dim, load_mnist, to_unit_interval

PROG = "python -m experiments.inpaint"
MODELS = ("nice", "realnvp", "glow")
JSON_KEYS = ("model", "mask", "method", "images", "psnr", "mse", "bpd", "baselines", "seconds")
TEST_IMAGES = 10000
FIGURE_COLUMNS = 10


# ----------------------------------------------------------------------------- reusable core


@jax.jit
def _log_prob(lp, x):
    return lp(x)


def _batched(fn, n: int, batch_size: int):
    """Calls fn(lo, hi) over [0, n) in slices of one size (the tail is re-run on a full-size
    window ending at n, so every call has the same shape) and concatenates the results."""
    size = min(batch_size, n)
    outs = []
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        start = max(0, hi - size)
        out = fn(start, start + size)
        outs.append(_tree_slice(out, lo - start, hi - start))
    return _tree_concat(outs)


def _tree_slice(tree, lo, hi):
    return jax.tree.map(lambda a: a[lo:hi], tree)


def _tree_concat(trees):
    return jax.tree.map(lambda *a: jnp.concatenate(a), *trees)


def evaluate(model, params, images, mask="hw10", method: str = "pgd", *, key=None,
             indices=None, train_images=None, steps: int = 300, lr: float | None = None,
             batch_size: int = 100, **options):
    """Inpaints `images` with the flow (model, params) and scores it against the baselines.

    images: float (N, 28, 28, 1) in [0, 1] (e.g. `to_unit_interval(load_mnist("test")[0][a:b])`).
    mask: a name from `jaxdnn.inpainting.MASKS`, or a bool/0-1 array (28, 28, 1) or
        (N, 28, 28, 1) with 1 = observed.
    method, steps, lr, options: as `jaxdnn.inpainting.inpaint` (lr None: the method's default).
    key: master key (default `jax.random.key(0)`); its subkey "mask" draws random masks, its
        subkey "noise" the annealed noise. Image i uses fold_in(subkey, indices[i]), so results
        do not depend on the range or the batch size. indices: the images' test-set numbers
        (default 0..N-1).
    train_images: float (M, 28, 28, 1) for the baselines (default: the MNIST training set).
    batch_size: images per vmapped call (one compilation: a short tail re-runs a full window).

    Returns (metrics, arrays). metrics: {"psnr", "mse", "bpd", "baselines": {"mean_fill":
    {"psnr", "mse"}, "nearest_neighbor": {"psnr", "mse"}}, "seconds"} with means over the
    images of the per-image PSNR / MSE over the missing pixels, the mean bits/dim of the
    inpainted images, and the wall time of the whole call. arrays (NumPy): original,
    corrupted (missing pixels at the starting value), inpainted, masks (N, 28, 28, 1) bool,
    mean_fill, nearest_neighbor, nn_index, psnr, mse, bpd (per image), losses (N, steps).
    """
    t0 = time.perf_counter()
    images = ip.check_images(images, "images")
    if images.ndim != 4 or images.shape[1:] != ip.IMAGE_SHAPE:
        raise ValueError(f"images must have shape (N, 28, 28, 1), got {images.shape}")
    n = images.shape[0]
    if method not in ip.METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(ip.METHODS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    indices = np.arange(n) if indices is None else np.asarray(indices).reshape(-1)
    if indices.shape != (n,):
        raise ValueError(f"indices must have one entry per image ({n}), got {indices.shape}")
    key = jax.random.key(0) if key is None else key
    mask_key, noise_key = jax.random.split(key)
    if isinstance(mask, str):  # one shared (28, 28, 1) mask unless it is drawn per image
        masks = (ip.batch_masks(mask, indices, mask_key) if mask == "random50"
                 else ip.make_mask(mask))
    else:
        masks = ip.check_mask(mask, images.shape, "mask")
    shared = masks.ndim == 3
    masks_b = jnp.broadcast_to(masks, images.shape)
    if not bool((~masks_b).any(axis=(1, 2, 3)).all()):
        raise ValueError("every image needs at least one missing pixel (mask 0)")
    keys = jax.vmap(lambda i: jax.random.fold_in(noise_key, i))(jnp.asarray(indices, jnp.int32))

    lp = ip.flow_log_prob(model, params)

    def run(lo, hi):
        res = ip.inpaint(lp, images[lo:hi], masks if shared else masks[lo:hi], keys[lo:hi],
                         method=method, steps=steps, lr=lr, return_losses=True, **options)
        return res.images, res.losses

    inpainted, losses = _batched(run, n, batch_size)
    log_p = _batched(lambda lo, hi: _log_prob(lp, inpainted[lo:hi]), n, batch_size)
    bpd = bits_per_dim(log_p)

    if train_images is None:
        train_images = to_unit_interval(load_mnist("train")[0])
    fill_mean = ip.mean_fill(images, masks_b, ip.pixel_mean(train_images))
    fill_nn, nn_index = ip.nearest_neighbor(images, masks_b, train_images)

    def scores(x):
        psnr = np.asarray(ip.masked_psnr(x, images, masks_b), np.float64)
        mse = np.asarray(ip.masked_mse(x, images, masks_b), np.float64)
        return psnr, mse

    psnr, mse = scores(inpainted)
    baselines = {}
    for name, filled in (("mean_fill", fill_mean), ("nearest_neighbor", fill_nn)):
        p, m = scores(filled)
        baselines[name] = {"psnr": float(p.mean()), "mse": float(m.mean())}
    start_value = options.get("init", ip.DEFAULTS[method]["init"])
    jax.block_until_ready((inpainted, fill_nn))
    metrics = {"psnr": float(psnr.mean()), "mse": float(mse.mean()),
               "bpd": float(np.mean(np.asarray(bpd, np.float64))), "baselines": baselines,
               "seconds": time.perf_counter() - t0}
    arrays = {
        "original": np.asarray(images), "masks": np.asarray(masks_b),
        "corrupted": np.asarray(jnp.where(masks_b, images, start_value)),
        "inpainted": np.asarray(inpainted), "mean_fill": np.asarray(fill_mean),
        "nearest_neighbor": np.asarray(fill_nn), "nn_index": np.asarray(nn_index),
        "psnr": psnr, "mse": mse, "bpd": np.asarray(bpd), "losses": np.asarray(losses),
    }
    return metrics, arrays


def figure(arrays: dict, title: str = "", columns: int = FIGURE_COLUMNS):
    """Rows original / corrupted / inpainted for the first `columns` images (a matplotlib
    figure; save it with `experiments.common.save_figure`)."""
    import matplotlib.pyplot as plt

    k = min(columns, len(arrays["original"]))
    rows = (("original", arrays["original"]), ("corrupted", arrays["corrupted"]),
            ("inpainted", arrays["inpainted"]))
    fig, axes = plt.subplots(3, k, figsize=(1.1 * k + 0.9, 3.6), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(k):
            ax = axes[r, c]
            ax.imshow(imgs[c, :, :, 0], cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
            if r == 2 and "psnr" in arrays:
                ax.set_xlabel(f"{arrays['psnr'][c]:.1f} dB", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- command line


def parse_range(text: str) -> tuple[int, int]:
    """'START:STOP' -> (START, STOP) with 0 <= START < STOP <= 10000 (test images)."""
    parts = text.split(":")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected START:STOP, got {text!r}")
    try:
        start, stop = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers START:STOP, got {text!r}") from None
    if not 0 <= start < stop <= TEST_IMAGES:
        what = "an empty range" if 0 <= stop <= start else "out of range"
        raise argparse.ArgumentTypeError(
            f"{text!r} is {what}; need 0 <= START < STOP <= {TEST_IMAGES}")
    return start, stop


def choice_list(choices):
    """argparse type: 'a,b' -> ['a', 'b'], each one of `choices`."""
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return names
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="realnvp", choices=MODELS,
                   help="shipped flow (default realnvp)")
    p.add_argument("--mask", default=["hw10"], type=choice_list(ip.MASKS), metavar="NAME[,NAME...]",
                   help=f"missing region(s) from {', '.join(ip.MASKS)} (default hw10: rows 5..11, cols 5..19)")
    p.add_argument("--images", type=parse_range, default=(0, 10), metavar="START:STOP",
                   help="test images START..STOP-1 (default 0:10)")
    p.add_argument("--method", default=["pgd"], type=choice_list(ip.METHODS), metavar="NAME[,NAME...]",
                   help="pgd (the course, default), annealed and/or langevin; with several masks or methods "
                        "--json prints a list, one object per (mask, method)")
    p.add_argument("--steps", type=int, default=300, help="iterations (default 300)")
    p.add_argument("--lr", type=float, default=None,
                   help="step size (default: 1e-3 for pgd, 0.02 for annealed, 0.1 for langevin)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    p.add_argument("--batch-size", type=int, default=100,
                   help="images per vmapped call (default 100)")
    p.add_argument("--out", default="results", help="figure directory (default results/)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = p.parse_args(argv)
    if a.steps < 0:
        p.error(f"--steps must be >= 0, got {a.steps}")
    if a.lr is not None and not (math.isfinite(a.lr) and a.lr > 0):
        p.error(f"--lr must be positive, got {a.lr}")
    if a.seed < 0:
        p.error(f"--seed must be >= 0, got {a.seed}")
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {a.out!r} exists and is not a directory")
    return a


def main(argv=None) -> int:
    try:
        a = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        model, params = pretrained.load(a.model)
    except (ValueError, OSError) as e:
        return _fail(f"--model {a.model}: no pretrained weights could be loaded ({e})")
    start, stop = a.images
    try:
        test = load_mnist("test")[0][start:stop]
        train = to_unit_interval(load_mnist("train")[0])
    except (FetchError, OSError) as e:
        return _fail(f"MNIST is not available: {e}", code=1)
    images = to_unit_interval(test)
    outs = []
    for mask in a.mask:
        for method in a.method:
            try:
                metrics, arrays = evaluate(model, params, images, mask, method,
                                           key=jax.random.key(a.seed), indices=np.arange(start, stop),
                                           train_images=train, steps=a.steps, lr=a.lr,
                                           batch_size=a.batch_size)
            except ValueError as e:
                return _fail(str(e))
            path = Path(a.out) / f"inpaint_{a.model}_{mask}_{method}.png"
            title = (f"{a.model}, mask {mask}, {method} ({a.steps} steps), test images "
                     f"{start}..{min(stop, start + FIGURE_COLUMNS) - 1}")
            try:
                save_figure(figure(arrays, title), path)
            except OSError as e:
                return _fail(f"cannot write the figure to {path}: {e}")
            out = {"model": a.model, "mask": mask, "method": method, "images": f"{start}:{stop}", **metrics}
            assert tuple(out) == JSON_KEYS
            outs.append(out)
            if not a.json:
                report(out, a.steps, path)
    if a.json:
        print_json(outs[0] if len(outs) == 1 else outs)
    return 0


def report(out: dict, steps: int, path: Path) -> None:
    b = out["baselines"]
    rows = [(f"{out['method']} ({steps} steps)", out),
            ("mean_fill", b["mean_fill"]), ("nearest_neighbor", b["nearest_neighbor"])]
    print(f"Inpainting MNIST test images {out['images']} with {out['model']}, "
          f"mask {out['mask']}; scores over the missing pixels")
    for name, m in rows:
        print(f"  {name:<22} PSNR {m['psnr']:7.3f} dB   MSE {m['mse']:.5f}")
    print(f"  bits/dim of the inpainted images: {out['bpd']:.4f}")
    print(f"  {out['seconds']:.1f} s; figure: {path}")


def _fail(message: str, code: int = 2) -> int:
    """One line on stderr; exit status 2 for bad input (as `experiments.common.fail`)."""
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
