"""The flow's posterior scored as a distribution on real digits, beside two baselines scored the
same way: `python -m experiments.inpaint_posterior --model realnvp --mask top_half,strokes
--split test --images 0:16 [--observation bins|noisy|downsample] [--json]`.

For each mask, each image's K samples (`inpaint_posterior`, temperature 1, chains started from
the training images nearest on the observed pixels) and two ensembles of K:
- knn: the K training images nearest on the observed pixels (observed pixels kept);
- network+gaussian: the conditional-mean network's fill (`jaxdnn.conditional_mean`) plus
  Gaussian noise whose per-pixel std is the network's root-mean-square error at that pixel on
  validation images 4500..4999 (the same mask; never scored here), clipped to [0, 1]. With downsampling (the network
  never saw it) the nearest-upsampled observation stands in for the network's fill.
Scores over the unobserved pixels, per image, of every ensemble rounded to 8 bits as the test
images are: the fair CRPS and energy score (lower is better),
raw coverage and width of the 90% intervals, PSNR of the ensemble mean, the classifier's
accuracy over the samples and the Brier score of its mean probabilities against the true digit.
Paired differences flow - baseline, mean +- 2 SE over the images; --json also lists every
image's scores (`per_image`), so runs over disjoint image ranges can be pooled.

Observations: bins (the observed pixels' 8-bit values, the default), noisy (masked pixels plus
N(0, 0.1^2)), downsample (2x2 block means plus N(0, 0.05^2), every pixel scored; --mask unused).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import ArgumentParser, fail, print_json, save_figure
from experiments.inpaint import choice_list, figure, parse_range, split_range_error
from jaxdnn import conditional_mean, pretrained
from jaxdnn import inpainting as ip
from jaxdnn.data import load_mnist, to_unit_interval
from jaxdnn.files import atomic_write_bytes
from jaxdnn.inpainting import plausibility
from jaxdnn.inpainting.masks import MASKS, UNSEEN_MASKS
from jaxdnn.inpainting.posterior import POSTERIOR_DEFAULTS, block_means, crps, energy_score, inpaint_posterior

PROG = "python -m experiments.inpaint_posterior"
NOISE = {"bins": 0.0, "noisy": 0.1, "downsample": 0.05}
CALIBRATION = (4500, 5000)  # validation images that fit the network's per-pixel std


def observe(images, masks, observation: str, key):
    """(what the sampler is given, the mask it is given (None when downsampling), scored pixels)."""
    if observation == "bins":
        return images, masks, masks
    noise = NOISE[observation] * jax.random.normal(key, images.shape if observation == "noisy" else
                                                   (images.shape[0], 14, 14, 1))
    if observation == "noisy":
        return images + noise, masks, masks
    return block_means(images) + noise, None, jnp.zeros_like(masks)


def ensembles(images, masks, given, guide, observed, observation, neighbours, network_std, key):
    """The two baselines' K-member ensembles (B, K, 28, 28, 1); neighbours: the K training images
    nearest to `guide` on the `observed` pixels (the sampler's starts)."""
    k = neighbours.shape[1]
    knn = jnp.where(observed[:, None] & (observation == "bins"), images[:, None], neighbours)
    if observation == "downsample":
        fill = guide
    else:
        fill = conditional_mean.predict(given.clip(0, 1), masks)
    noise = network_std[None, None] * jax.random.normal(key, (images.shape[0], k, *images.shape[1:]))
    net = jnp.clip(fill[:, None] + noise, 0.0, 1.0)
    net = jnp.where(observed[:, None] & (observation == "bins"), images[:, None], net)
    return {"knn": knn, "network+gaussian": net}


def network_std(mask_name: str, observation: str, key) -> jnp.ndarray:
    """Per-pixel RMS error of the network's fill (nearest upsampling when downsampling) on
    validation images `CALIBRATION` where the pixel is missing; 0.1 where never missing."""
    val = to_unit_interval(load_mnist("validation")[0][slice(*CALIBRATION)])
    masks = ip.batch_masks(mask_name, np.arange(*CALIBRATION) + 10**6, jax.random.fold_in(key, 1))
    given, m, scored = observe(val, masks, observation, jax.random.fold_in(key, 10**6 + 1))
    if observation == "downsample":
        fill = jnp.repeat(jnp.repeat(given, 2, 1), 2, 2).clip(0, 1)
    else:
        fill = conditional_mean.predict(given.clip(0, 1), m)
    free = ~scored
    sq = jnp.where(free, (fill - val) ** 2, 0.0).sum(0)
    count = free.sum(0)
    return jnp.where(count > 0, jnp.sqrt(sq / jnp.maximum(count, 1)), 0.1)


def scores(samples, truth, scored, labels) -> dict[str, np.ndarray]:
    """Per-image scores (B,) of an ensemble (B, K, ...) over the unscored (missing) pixels. The
    truth is an 8-bit image at its pixels' bin centres, so every ensemble is scored at 8 bits
    too (each value moved to its bin's centre): where inside a bin a sample lies is no error."""
    samples = (jnp.floor(jnp.clip(samples, 0.0, 1.0 - 2.0**-12) * 256.0) + 0.5) / 256.0
    miss = ~np.broadcast_to(np.asarray(scored), truth.shape)
    s, y = np.asarray(samples), np.asarray(truth)
    lo, hi = np.quantile(s, 0.05, axis=1), np.quantile(s, 0.95, axis=1)
    per = lambda a: np.array([a[i][miss[i]].mean() for i in range(len(a))])
    mean = s.mean(1)
    mse = per((mean - y) ** 2)
    b, k = s.shape[:2]
    probs = plausibility.predict_proba(s.reshape(b * k, *s.shape[2:])).reshape(b, k, -1)
    onehot = np.eye(probs.shape[-1])[np.asarray(labels)]
    return {"crps": np.asarray(crps(samples, truth, scored)),
            "energy": np.asarray(energy_score(samples, truth, scored)),
            "coverage90": per((lo <= y) & (y <= hi)), "width90": per(hi - lo),
            "psnr": -10 * np.log10(np.maximum(mse, 1e-10)),
            "accuracy": (probs.argmax(-1) == np.asarray(labels)[:, None]).mean(1),
            "brier": ((probs.mean(1) - onehot) ** 2).sum(-1)}


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.asarray(a) - np.asarray(b)
    return {"mean": float(d.mean()), "stderr": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")}


def pool(rows: list[dict]) -> dict:
    """One row from the rows of consecutive image ranges: means and paired differences over all
    their images, seconds summed, ESS the median of the ranges' medians."""
    per = {ens: {k: np.concatenate([r["per_image"][ens][k] for r in rows]) for k in rows[0]["per_image"][ens]}
           for ens in rows[0]["per_image"]}
    flow = per["flow"]
    return {"mask": rows[0]["mask"], "seconds": round(sum(r["seconds"] for r in rows), 1),
            "ess": float(np.median([r["ess"] for r in rows])), "images": int(len(flow["crps"])),
            "flow": {k: float(v.mean()) for k, v in flow.items()},
            "baselines": {b: {k: float(v.mean()) for k, v in s.items()} for b, s in per.items() if b != "flow"},
            "paired": {b: {k: paired(flow[k], per[b][k]) for k in ("crps", "energy", "psnr", "brier")}
                       for b in per if b != "flow"},
            "per_image": {b: {k: v.tolist() for k, v in s.items()} for b, s in per.items()},
            "figure": rows[0].get("figure")}


def score_range(a, flow, name: str, lo: int, hi: int, split, train, baseline_std, figure_path) -> dict:
    """Samples and scores images lo..hi-1 of `split` ((uint8 pixels, labels)) under mask `name`
    (one row, with every image's scores in `per_image`); a range is run the same way whatever
    range it is part of."""
    images, labels = to_unit_interval(split[0][lo:hi]), split[1][lo:hi]
    key = jax.random.key(a.seed)
    mask_name = "center" if name == "downsample" else name  # unused by downsampling
    masks = ip.batch_masks(mask_name, np.arange(lo, hi), jax.random.fold_in(key, 1))
    given, sampler_mask, scored = observe(images, masks, a.observation, jax.random.fold_in(key, 2))
    t0 = time.perf_counter()
    observed = sampler_mask if sampler_mask is not None else jnp.ones_like(masks)
    guide = (given if a.observation != "downsample" else jnp.repeat(jnp.repeat(given, 2, 1), 2, 2)).clip(0, 1)
    neighbours = train[ip.nearest_training_images(guide, observed, train, k=a.chains)]  # starts and knn
    try:
        post = inpaint_posterior(flow, given if a.observation != "bins" else images, sampler_mask,
                                 jax.random.fold_in(key, 3), starts=neighbours, noise_std=NOISE[a.observation],
                                 downsample=2 if a.observation == "downsample" else 1, chains=a.chains,
                                 warmup=a.warmup, draws=a.draws, leapfrog=a.leapfrog, progress=not a.json)
    except ValueError as e:
        fail(PROG, str(e))
    seconds = time.perf_counter() - t0
    base = ensembles(images, masks, given, guide, observed, a.observation, neighbours, baseline_std,
                     jax.random.fold_in(key, 4))
    flow_scores = scores(post.samples, images, scored, labels)
    row = {"mask": name, "seconds": round(seconds, 1), "ess": float(jnp.median(post.ess)),
           "flow": {k: float(v.mean()) for k, v in flow_scores.items()}, "baselines": {}, "paired": {},
           "per_image": {"flow": {k: np.round(v, 6).tolist() for k, v in flow_scores.items()}}}
    for bname, ens in base.items():
        bs = scores(ens, images, scored, labels)
        row["baselines"][bname] = {k: float(v.mean()) for k, v in bs.items()}
        row["paired"][bname] = {k: paired(flow_scores[k], bs[k]) for k in ("crps", "energy", "psnr", "brier")}
        row["per_image"][bname] = {k: np.round(v, 6).tolist() for k, v in bs.items()}
    if figure_path is not None:
        save_figure(figure([("observed", np.asarray(jnp.where(observed, guide.clip(0, 1), 0.0)), None),
                            *[(f"sample {j}", np.asarray(post.samples[:, j]), None) for j in range(3)],
                            ("posterior mean", np.asarray(post.mean), flow_scores["psnr"]),
                            ("posterior std x 3", np.asarray(jnp.clip(3 * post.std, 0, 1)), None),
                            ("truth", np.asarray(images), None)],
                           f"{a.model} posterior (HMC, T = 1), {name}, {a.observation}"), figure_path)
        row["figure"] = str(figure_path)
    return row


def main(argv=None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="realnvp", metavar="SOURCE", help="shipped name, .msgpack or workdir")
    p.add_argument("--mask", default=list(MASKS + UNSEEN_MASKS), type=choice_list(MASKS + UNSEEN_MASKS),
                   metavar="NAME[,NAME...]")
    p.add_argument("--observation", default="bins", choices=tuple(NOISE))
    p.add_argument("--split", default="validation", choices=("validation", "test"))
    p.add_argument("--images", type=parse_range, default=(0, 16), metavar="START:STOP")
    for name in ("chains", "warmup", "draws", "leapfrog"):
        p.add_argument(f"--{name}", type=int, default=POSTERIOR_DEFAULTS[name])
    p.add_argument("--chunk", type=int, default=None, metavar="N",
                   help="run the images N at a time, each range saved in --out and reused when the same command "
                        "is run again (a killed run resumes); results pooled over the ranges")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    for name, low in (("chains", 2), ("warmup", 4), ("draws", 1), ("leapfrog", 1)):
        if getattr(a, name) < low:
            fail(PROG, f"--{name} must be an integer >= {low}, got {getattr(a, name)}")
    if a.chunk is not None and a.chunk < 2:
        fail(PROG, f"--chunk must be an integer >= 2, got {a.chunk}")
    if split_range_error(a.images, a.split):
        fail(PROG, split_range_error(a.images, a.split))
    if a.split == "validation" and a.images[1] > CALIBRATION[0]:
        fail(PROG, f"--images {a.images[0]}:{a.images[1]}: validation images {CALIBRATION[0]}.. fit the baseline's "
                   "noise; score images below them")
    try:
        flow = pretrained.load_distribution(a.model)
    except (ValueError, OSError) as e:
        fail(PROG, f"--model: {e}")
    train, split = to_unit_interval(load_mnist("train")[0]), load_mnist(a.split)
    lo, hi = a.images
    step = a.chunk or hi - lo
    ranges = [(s, min(s + step, hi)) for s in range(lo, hi, step)]
    settings = {k: getattr(a, k) for k in ("model", "observation", "split", "chains", "warmup", "draws", "leapfrog",
                                           "seed")}
    rows = []
    for name in ["downsample"] if a.observation == "downsample" else a.mask:
        label = f"{pretrained.short_name(a.model)}_{name}_{a.observation}_{a.split}"
        baseline_std, parts = None, []
        for r_lo, r_hi in ranges:
            saved = Path(a.out) / "posterior_ranges" / f"{label}_{r_lo}-{r_hi}.json"
            cached = json.loads(saved.read_text()) if a.chunk and saved.is_file() else None
            if cached is not None and cached["settings"] == settings:
                parts.append(cached["row"])
                continue
            figure_path = Path(a.out) / f"posterior_{label}.png" if r_lo == lo else None
            if baseline_std is None:
                baseline_std = network_std("center" if name == "downsample" else name, a.observation,
                                           jax.random.key(a.seed))
            parts.append(score_range(a, flow, name, r_lo, r_hi, split, train, baseline_std, figure_path))
            if a.chunk:
                atomic_write_bytes(saved, json.dumps({"settings": settings, "row": parts[-1]}).encode())
        row = pool(parts)
        rows.append(row)
        if not a.json:
            _report(row)
    out = {"model": a.model, "observation": a.observation, "split": a.split, "images": [lo, hi],
           "chains": a.chains, "warmup": a.warmup, "draws": a.draws, "leapfrog": a.leapfrog, "masks": rows}
    if a.json:
        print_json(out)
    return 0


def _report(row: dict) -> None:
    f = row["flow"]
    print(f"{row['mask']} ({row['seconds']:.0f} s, ESS {row['ess']:.1f}): flow CRPS {f['crps']:.4f} energy "
          f"{f['energy']:.3f} coverage90 {f['coverage90']:.3f} width {f['width90']:.3f} PSNR {f['psnr']:.2f} "
          f"accuracy {f['accuracy']:.2f} Brier {f['brier']:.3f}")
    for name, b in row["baselines"].items():
        d = row["paired"][name]
        print(f"   {name:17s} CRPS {b['crps']:.4f} coverage90 {b['coverage90']:.3f} PSNR {b['psnr']:.2f} "
              f"accuracy {b['accuracy']:.2f} Brier {b['brier']:.3f} | flow - it: CRPS {d['crps']['mean']:+.4f} "
              f"+- {2 * d['crps']['stderr']:.4f}, PSNR {d['psnr']['mean']:+.2f} +- {2 * d['psnr']['stderr']:.2f}")
    print(f"   figure {row['figure']}")


if __name__ == "__main__":
    raise SystemExit(main())
