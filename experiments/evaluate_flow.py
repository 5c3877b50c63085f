"""Test-set bits/dim of a shipped flow, and sample grids:
`python -m experiments.evaluate_flow --model realnvp [--limit N] [--json] [--out DIR]`; the
evaluation runs on every device of every process (`--coordinator ...`), process 0 reports."""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from experiments.common import ArgumentParser, fail, print_json, save_figure
from jaxdnn import distributed, pretrained


def sample_grid(model, params, key, path, temperatures=(0.7, 1.0), n=64):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(temperatures), figsize=(4.2 * len(temperatures), 4.4))
    for ax, t in zip(np.atleast_1d(axes), temperatures, strict=True):
        x = np.asarray(jax.jit(lambda p, k, t=t: model.apply(p, k, n, t, method=model.sample))(params, key))
        side = int(np.sqrt(n))
        grid = x[: side * side, :, :, 0].reshape(side, side, 28, 28).transpose(0, 2, 1, 3).reshape(side * 28, -1)
        ax.imshow(np.clip(grid, 0, 1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"temperature {t}")
        ax.axis("off")
    return save_figure(fig, path)


def main(argv=None) -> int:
    prog = "python -m experiments.evaluate_flow"
    parser = ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--model", required=True, choices=pretrained.available())
    parser.add_argument("--limit", type=int, default=None, help="first N test images (default all 10000)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default="results")
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.limit is not None and not 1 <= args.limit <= 10000:
        fail(prog, f"--limit must be in 1..10000, got {args.limit}")
    if args.model not in pretrained.available():
        fail(prog, f"no shipped weights for {args.model}; shipped: {pretrained.available()}")
    distributed.initialize_from_args(args, prog)  # before anything touches a JAX backend
    t0 = time.time()
    try:
        result = pretrained.test_bpd(args.model, args.limit)
    except (FileNotFoundError, ValueError) as e:
        fail(prog, str(e))
    if not distributed.is_main():
        return 0
    model, params = pretrained.load(args.model)
    grid = sample_grid(model, params, jax.random.key(1), f"{args.out}/samples_{args.model}.png")
    result["seconds"] = round(time.time() - t0, 1)
    if args.json:
        print_json(result)
    else:
        print(f"{args.model}: {result['bpd']:.4f} +- {result['bpd_stderr']:.4f} bits/dim on {result['images']} "
              f"MNIST test images ({result['seconds']} s); samples: {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
