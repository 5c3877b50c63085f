"""Problem 1: a VAE on dynamically binarized MNIST, trained with the log-derivative
(score-function) or the reparameterization encoder gradient at an equal sample budget.

    python -m experiments.vae --estimator {log_derivative,reparameterization} [--epochs N]
                              [--json] [--out DIR]

Reports the test ELBO and the importance-weighted bound (IWAE, k samples), both in nats
per image (negative; higher is better), and writes reconstructions and samples into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from experiments.common import ArgumentParser, save_figure

PROG = "python -m experiments.vae"
DEFAULT_EPOCHS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--estimator", required=True, choices=("log_derivative", "reparameterization"),
                   help="encoder gradient estimator")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help=f"training epochs (default {DEFAULT_EPOCHS})")
    p.add_argument("--samples", type=int, default=2,
                   help="latent samples per image per step, for either estimator (default 2)")
    p.add_argument("--baseline", choices=("rloo", "none"), default=None,
                   help="log_derivative baseline (default rloo when --samples >= 2)")
    p.add_argument("--iwae-samples", type=int, default=100,
                   help="k of the importance-weighted test bound (default 100)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--latent", type=int, default=32, help="latent dimension (default 32)")
    p.add_argument("--hidden", type=int, default=512, help="hidden width (default 512)")
    p.add_argument("--depth", type=int, default=1,
                   help="hidden layers in encoder and decoder (default 1)")
    p.add_argument("--train-size", type=int, default=60000,
                   help="use the first N training images (default all 60000)")
    p.add_argument("--test-size", type=int, default=10000,
                   help="evaluate on the first N test images (default all 10000)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    p.add_argument("--out", default="results", help="figure directory (default results/)")
    p.add_argument("--no-plot", action="store_true", help="skip the figures")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = p.parse_args(argv)
    for name, lo in (("epochs", 0), ("samples", 1), ("iwae_samples", 1), ("batch", 1),
                     ("latent", 1), ("hidden", 1), ("depth", 0), ("train_size", 1),
                     ("test_size", 1)):
        if getattr(a, name) < lo:
            p.error(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(a, name)}")
    if a.train_size > 60000:
        p.error(f"--train-size must be <= 60000, got {a.train_size}")
    if a.test_size > 10000:
        p.error(f"--test-size must be <= 10000, got {a.test_size}")
    if a.batch > a.train_size:
        p.error(f"--batch {a.batch} exceeds --train-size {a.train_size}")
    if not (math.isfinite(a.lr) and a.lr > 0):
        p.error(f"--lr must be positive, got {a.lr}")
    if a.baseline is None:
        a.baseline = "rloo" if a.estimator == "log_derivative" and a.samples >= 2 else "none"
    if a.baseline != "none" and a.estimator != "log_derivative":
        p.error("--baseline applies to --estimator log_derivative only")
    if a.baseline == "rloo" and a.samples < 2:
        p.error(f"--baseline rloo needs --samples >= 2, got {a.samples}")
    if not a.no_plot:
        try:
            Path(a.out).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"--out: cannot create {a.out!r}: {e.strerror}")
    return a


def _grid(images, rows: int, cols: int):
    import numpy as np

    imgs = np.asarray(images).reshape(rows, cols, 28, 28)
    return imgs.transpose(0, 2, 1, 3).reshape(rows * 28, cols * 28)


def plot(out: Path, estimator: str, originals, recons, samples) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    n = originals.shape[0]
    fig, ax = plt.subplots(figsize=(n * 0.6, 1.5))
    ax.imshow(np.concatenate([_grid(originals, 1, n), _grid(recons, 1, n)]), cmap="gray",
              vmin=0, vmax=1)
    ax.set_title(f"VAE ({estimator}): binarized test images (top), reconstructions (bottom)",
                 fontsize=7)
    ax.axis("off")
    path = out / f"vae_{estimator}_reconstructions.png"
    save_figure(fig, path)
    paths.append(str(path))

    side = int(math.isqrt(samples.shape[0]))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(_grid(samples[: side * side], side, side), cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"VAE ({estimator}): Bernoulli means of p(x|z), z ~ N(0, I)", fontsize=8)
    ax.axis("off")
    path = out / f"vae_{estimator}_samples.png"
    save_figure(fig, path)
    paths.append(str(path))
    return paths


def run(a: argparse.Namespace) -> dict:
    import jax
    from tqdm import tqdm

    from jaxdnn import vae
    from jaxdnn.data import load_mnist

    config = vae.VAEConfig(
        estimator=a.estimator, baseline=a.baseline, samples=a.samples, latent=a.latent,
        hidden=a.hidden, depth=a.depth, lr=a.lr, batch=a.batch,
    ).validate()
    train_images = load_mnist("train")[0][: a.train_size]
    test_images = load_mnist("test")[0][: a.test_size]

    key = jax.random.key(a.seed)
    k_train, k_plot = jax.random.split(key)
    k_eval = jax.random.key(10_000)  # one binarized test set for every run and seed
    bar = tqdm(total=a.epochs, desc=f"vae {a.estimator}", unit="epoch", file=sys.stderr,
               disable=None)

    def on_epoch(epoch, state, record):
        bar.set_postfix(train_elbo=f"{record['train_elbo']:.2f}")
        bar.update(1)

    t0 = time.perf_counter()
    state, history = vae.train(k_train, config, train_images, a.epochs, on_epoch=on_epoch)
    bar.close()
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    elbo, iwae = vae.evaluate(k_eval, state.params, config, test_images,
                              num_samples=a.iwae_samples)
    eval_seconds = time.perf_counter() - t1
    result = {
        "estimator": a.estimator,
        "epochs": a.epochs,
        "test_elbo": elbo,
        "test_iwae": iwae,
        "iwae_samples": a.iwae_samples,
        "samples": a.samples,
        "baseline": a.baseline,
        "config": config._asdict(),
        "train_size": int(train_images.shape[0]),
        "test_size": int(test_images.shape[0]),
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "history": history,
    }
    if not a.no_plot:
        k_rec, k_samp = jax.random.split(k_plot)
        originals = vae.binarize(jax.random.fold_in(k_rec, 1),
                                 vae.as_probabilities(test_images[:10]))
        recons = vae.reconstruct(k_rec, state.params, config, originals)
        samples = vae.sample(k_samp, state.params, config, 64)
        result["figures"] = plot(Path(a.out), a.estimator, originals, recons, samples)
    return result


def summary(r: dict) -> str:
    c = r["config"]
    base = f", baseline {r['baseline']}" if r["estimator"] == "log_derivative" else ""
    lines = [
        f"VAE on dynamically binarized MNIST, encoder gradient: {r['estimator']}{base}",
        f"  MLP {c['depth']}x{c['hidden']}, latent {c['latent']}, batch {c['batch']}, "
        f"Adam lr {c['lr']:g}, {r['samples']} latent sample(s) per image per step, "
        f"{r['epochs']} epochs on {r['train_size']} images ({r['train_seconds']:.0f} s)",
        f"  test ELBO                 {r['test_elbo']:9.2f} nats  ({r['test_size']} images)",
        f"  test IWAE bound, k={r['iwae_samples']:<5d} {r['test_iwae']:9.2f} nats",
    ]
    for path in r.get("figures", []):
        lines.append(f"  figure: {path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from jaxdnn.data import FetchError

    try:
        result = run(a)
    except (FetchError, FloatingPointError, OSError) as e:  # one line, no traceback
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 1
    print(json.dumps(result) if a.json else summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
