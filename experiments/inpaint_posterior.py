"""Posterior completions with uncertainty: `python -m experiments.inpaint_posterior --model realnvp
--mask top_half,center --split validation --images 0:32 [--temperature inf,1000,300,100]
[--calibrate 100:200] [--json]`.

For each mask: the `latent` method's searches as a weighted sample (`inpaint_posterior`), scored
at each temperature of the weights: PSNR of the weighted mean over the missing pixels, the
fraction of true missing pixels inside the per-pixel 90% interval (calibration: 0.90 is the
target) and its mean width, the mean effective sample size; beside knn_mean over as many
neighbours as starts. With `--calibrate`, the intervals are widened by the split-conformal margin
(`Posterior.interval_margin`) computed on that range of validation images (disjoint from the
scored ones), and the coverage and width of the calibrated intervals are reported too.
Writes a figure per mask: the first 10 images, observed pixels, the weighted mean and the
per-pixel standard deviation (at the first temperature), and each image's 5 completions of the
largest weights at the default temperature.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import ArgumentParser, fail, print_json, save_figure
from experiments.inpaint import choice_list, figure, parse_range, split_range_error
from jaxdnn import inpainting as ip
from jaxdnn import pretrained

PROG = "python -m experiments.inpaint_posterior"


def main(argv=None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="realnvp", metavar="SOURCE", help="shipped name, .msgpack or workdir")
    p.add_argument("--mask", default=["top_half", "center"], type=choice_list(ip.MASKS), metavar="NAME[,NAME...]")
    p.add_argument("--split", default="validation", choices=("validation", "test"))
    p.add_argument("--images", type=parse_range, default=(0, 32), metavar="START:STOP")
    p.add_argument("--starts", type=int, default=ip.LATENT_DEFAULTS["starts"], help="searches per image")
    p.add_argument("--temperature", default=f"{ip.LATENT_DEFAULTS['temperature']:g},inf,1000,300,100,30",
                   metavar="T[,T...]",
                   help="weight temperatures to score (default: the method's, then a sweep; inf = equal weights)")
    p.add_argument("--calibrate", type=parse_range, default=None, metavar="START:STOP",
                   help="validation images to calibrate the 90%% intervals on (conformal margin)")
    p.add_argument("--out", default="results")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        temperatures = [float(t) for t in a.temperature.split(",")]
    except ValueError:
        fail(PROG, f"--temperature must be numbers, got {a.temperature!r}")
    if not temperatures or not all(t > 0 for t in temperatures):
        fail(PROG, f"--temperature must be > 0, got {a.temperature!r}")
    if a.starts < 2:
        fail(PROG, f"--starts must be >= 2, got {a.starts}")
    if split_range_error(a.images, a.split):
        fail(PROG, split_range_error(a.images, a.split))
    if a.calibrate is not None:
        if split_range_error(a.calibrate, "validation"):
            fail(PROG, "--calibrate: " + split_range_error(a.calibrate, "validation"))
        if a.split == "validation" and max(a.images[0], a.calibrate[0]) < min(a.images[1], a.calibrate[1]):
            fail(PROG, f"--calibrate {a.calibrate[0]}:{a.calibrate[1]} overlaps the scored validation images "
                       f"{a.images[0]}:{a.images[1]}")
    try:
        flow = pretrained.load_distribution(a.model)
    except ValueError as e:
        fail(PROG, f"--model: {e}")
    from jaxdnn.data import load_mnist, to_unit_interval

    try:
        x = np.asarray(to_unit_interval(load_mnist(a.split)[0][a.images[0]:a.images[1]]))
        train = to_unit_interval(load_mnist("train")[0])
        held = None if a.calibrate is None else np.asarray(
            to_unit_interval(load_mnist("validation")[0][a.calibrate[0]:a.calibrate[1]]))
    except OSError as e:
        fail(PROG, f"MNIST is not available: {e}", code=1)
    out = []
    for mask_name in a.mask:
        t0 = time.time()
        mask = ip.make_mask(mask_name)
        post = ip.inpaint_posterior(flow, x, mask, reference=train, starts=a.starts, temperature=temperatures[0])
        knn = float(np.mean(ip.masked_psnr(ip.knn_mean(x, mask, train, k=a.starts), x, mask)))
        held_post = None if held is None else ip.inpaint_posterior(flow, held, mask, reference=train, starts=a.starts)
        rows = []
        for t in temperatures:
            weighted = post.at_temperature(t)
            rows.append({"temperature": t if math.isfinite(t) else "inf",
                         "psnr": float(np.mean(ip.masked_psnr(weighted.mean, x, mask))),
                         "coverage90": weighted.coverage(x, mask), "width90": weighted.width(mask),
                         "ess": float(np.mean(weighted.ess))})
            if held_post is not None:
                margin = held_post.at_temperature(t).interval_margin(held, mask)
                rows[-1].update(margin=margin, coverage90_calibrated=weighted.coverage(x, mask, margin=margin),
                                width90_calibrated=weighted.width(mask, margin=margin))
        result = {"model": a.model, "mask": mask_name, "split": a.split, "images": f"{a.images[0]}:{a.images[1]}",
                  "starts": a.starts, "knn_matched_psnr": knn, "by_temperature": rows,
                  "calibrated_on": None if held is None else f"validation {a.calibrate[0]}:{a.calibrate[1]}",
                  "seconds": round(time.time() - t0, 1)}
        out.append(result)
        samples, _ = post.at_temperature(ip.LATENT_DEFAULTS["temperature"]).heaviest(min(5, a.starts))
        samples = np.asarray(samples)
        panels = [("original", x, None), ("observed", np.where(np.asarray(mask), x, 0.5), None),
                  ("weighted mean", np.asarray(post.mean), None),
                  ("std x 4", np.clip(4 * np.asarray(post.std), 0, 1), None)]
        panels += [(f"weight rank {k + 1}", samples[:, k], None) for k in range(samples.shape[1])]
        path = Path(a.out) / f"posterior_{pretrained.short_name(a.model)}_{mask_name}.png"
        save_figure(figure(panels, f"{a.model}, {mask_name}, {a.split} images: completions and uncertainty"), path)
        if not a.json:
            print(f"{a.model} {mask_name} ({a.split} {result['images']}, {a.starts} starts): knn_mean of "
                  f"{a.starts} {knn:.3f} dB; figure {path}")
            for r in rows:
                calibrated = ("" if "margin" not in r else f"  calibrated (margin {r['margin']:.3f}): coverage "
                              f"{r['coverage90_calibrated']:.3f} width {r['width90_calibrated']:.3f}")
                print(f"  T={r['temperature']:>6}  PSNR {r['psnr']:.3f} dB  90% coverage {r['coverage90']:.3f} width "
                      f"{r['width90']:.3f}  ESS {r['ess']:.2f}{calibrated}")
    if a.json:
        print_json(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
