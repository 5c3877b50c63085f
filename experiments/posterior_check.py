"""Simulation-based calibration of the posterior sampler on images the flow drew itself.

`python -m experiments.posterior_check --model realnvp --mask hw10,center --images 8 [--json]`.

There the flow is the true prior, so an exact sampler of its posterior gives: the rank of each
true missing pixel among the K samples uniform on 0..K (chi-square test over one pixel in 8,
p-value), the raw 90% intervals of K samples covering 0.9 (K - 1) / (K + 1) of the true pixels
(the plug-in quantiles of a finite sample: 0.794 for K = 16, 0.845 for K = 32), and one sample's squared
error twice the posterior mean's (E||x - x_1||^2 = 2 E||x - E[x | y]||^2; 2K / (K + 1) against
the mean of the K samples). The truth is the
continuous draw, so a pixel's place inside its 8-bit bin counts; "8-bit" is the coverage of the
true bin by the randomized PIT among the samples' bins (what an 8-bit image shows; 0.90 if exact).
Images: the flow's draws at temperature 1 from `--seed`, their observed pixels given as 8-bit
bins; chains start from the training images (0..54999) nearest on the observed pixels.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import ArgumentParser, fail, print_json
from experiments.inpaint import choice_list
from jaxdnn import inpainting as ip
from jaxdnn import pretrained
from jaxdnn.data import load_mnist, to_unit_interval
from jaxdnn.data.preprocess import to_pixels
from jaxdnn.inpainting.posterior import POSTERIOR_DEFAULTS, inpaint_posterior

PROG = "python -m experiments.posterior_check"


def calibration(samples, truth, masks) -> dict:
    """Coverage of the raw 90% intervals, the single-sample / mean squared-error ratio and the
    rank histogram's chi-square p-value over the missing pixels. samples (B, K, ...), truth (B, ...)."""
    from scipy.stats import chi2

    samples, truth = np.asarray(samples), np.asarray(truth)
    miss = ~np.broadcast_to(np.asarray(masks, bool), truth.shape)
    k = samples.shape[1]
    lo, hi = np.quantile(samples, 0.05, axis=1), np.quantile(samples, 0.95, axis=1)
    mean = samples.mean(1)
    mse_one = np.mean([((samples[:, j] - truth) ** 2)[miss].mean() for j in range(k)])
    mse_mean = ((mean - truth) ** 2)[miss].mean()
    ranks = (samples < truth[:, None]).sum(1)[miss]
    # ranks of neighbouring pixels are dependent: the test uses one pixel in 8; the K + 1 possible
    # ranks fall in 8 groups of (nearly) equal size, each expected in proportion to its size
    sub = ranks[::8]
    group = np.concatenate([np.full(len(g), i) for i, g in enumerate(np.array_split(np.arange(k + 1), 8))])
    counts = np.bincount(group[sub], minlength=8)
    expected = len(sub) * np.bincount(group, minlength=8) / (k + 1)
    stat = ((counts - expected) ** 2 / expected).sum()
    # the same at 8 bits: the randomized PIT of the true pixel's bin among the samples' bins
    sb, yb = np.floor(samples * 256), np.floor(truth * 256)
    u = np.random.default_rng(0).uniform(size=yb.shape)
    pit = ((sb < yb[:, None]).sum(1) + u * ((sb == yb[:, None]).sum(1) + 1)) / (k + 1)
    inside = (lo <= truth) & (truth <= hi)
    # the plug-in interval of K exchangeable draws covers a new one with probability
    # 0.9 (K - 1) / (K + 1) (linear quantiles: positions 1 + 0.05 (K - 1) and 1 + 0.95 (K - 1) of K + 1)
    first_bin = truth < 1.0 / 256.0  # background: where inside its first bin the pixel lies
    return {"coverage90": float(inside[miss].mean()), "coverage90_if_exact": 0.9 * (k - 1) / (k + 1),
            "coverage90_first_bin": float(inside[miss & first_bin].mean()) if (miss & first_bin).any() else None,
            "coverage90_other_bins": float(inside[miss & ~first_bin].mean()) if (miss & ~first_bin).any() else None,
            "coverage90_8bit": float(((pit > 0.05) & (pit < 0.95))[miss].mean()),
            "width90": float((hi - lo)[miss].mean()),
            "mse_ratio": float(mse_one / mse_mean), "mse_ratio_if_exact": 2.0 * k / (k + 1),
            "rank_p": float(chi2.sf(stat, 7)),
            "rank_histogram": counts.tolist()}


def main(argv=None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="realnvp", metavar="SOURCE", help="shipped name, .msgpack or workdir")
    p.add_argument("--mask", default=list(ip.MASKS), type=choice_list(ip.MASKS), metavar="NAME[,NAME...]")
    p.add_argument("--images", type=int, default=8, help="flow draws per mask")
    p.add_argument("--seed", type=int, default=0, help="the draws' seed (and the masks' for random50)")
    for name in ("chains", "warmup", "draws", "leapfrog"):
        p.add_argument(f"--{name}", type=int, default=POSTERIOR_DEFAULTS[name])
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    for name, low in (("chains", 2), ("warmup", 4), ("draws", 1), ("leapfrog", 1)):
        if getattr(a, name) < low:
            fail(PROG, f"--{name} must be an integer >= {low}, got {getattr(a, name)}")
    if a.images < 1:
        fail(PROG, f"--images must be >= 1, got {a.images}")
    try:
        flow = pretrained.load_distribution(a.model)
    except (ValueError, OSError) as e:
        fail(PROG, f"--model: {e}")
    train = to_unit_interval(load_mnist("train")[0][:55000])
    key = jax.random.key(a.seed)
    truth = jnp.clip(flow.sample(seed=jax.random.fold_in(key, 0), sample_shape=(a.images,)), 0.0, 1.0 - 1e-7)
    observed = (to_pixels(truth)[..., None] + 0.5) / 256.0  # what an 8-bit observation of it gives
    rows = []
    for name in a.mask:
        masks = ip.batch_masks(name, np.arange(a.images), jax.random.fold_in(key, 1))
        t0 = time.perf_counter()
        try:
            post = inpaint_posterior(flow, observed, masks, jax.random.fold_in(key, 2), reference=train,
                                     chains=a.chains, warmup=a.warmup, draws=a.draws, leapfrog=a.leapfrog,
                                     progress=not a.json)
        except ValueError as e:
            fail(PROG, str(e))
        seconds = time.perf_counter() - t0
        row = {"mask": name, **calibration(post.samples, truth, masks), "ess": float(jnp.median(post.ess)),
               "acceptance": float(post.acceptance.mean()), "seconds": round(seconds, 1)}
        rows.append(row)
        if not a.json:
            print(f"{name:12s} coverage90 {row['coverage90']:.3f} (exact: {row['coverage90_if_exact']:.3f}; 8-bit "
                  f"{row['coverage90_8bit']:.3f}, exact: 0.900)  width "
                  f"{row['width90']:.3f}  single/mean MSE (exact: {row['mse_ratio_if_exact']:.2f}) "
                  f"{row['mse_ratio']:.2f}  rank p {row['rank_p']:.3g}  ESS {row['ess']:.1f}  "
                  f"accept {row['acceptance']:.2f}  {seconds:.0f} s", flush=True)
    out = {"model": a.model, "images": a.images, "seed": a.seed, "chains": a.chains, "warmup": a.warmup,
           "draws": a.draws, "leapfrog": a.leapfrog, "gradients_per_chain": (a.warmup + a.draws) * a.leapfrog,
           "masks": rows}
    if a.json:
        print_json(out)
    else:
        print(f"targets: coverage90 0.90, single/mean MSE 2.0, rank p > 0.01 "
              f"({out['gradients_per_chain']} gradients per chain, exact as they grow)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
