"""Bits/dim of a flow on the test (or validation) images, and sample grids:
`python -m experiments.evaluate_flow --model SOURCE [--split validation] [--samples K] [--limit N]
[--json] [--out DIR]`. SOURCE is a shipped name (nice, realnvp, glow), an exported .msgpack (its
card beside it) or a training workdir. `--samples K` gives the importance-weighted bound with K
dequantizations per image (K = 1: the usual bound). The evaluation runs on every device of every
process (`--coordinator ...`), process 0 reports."""

from __future__ import annotations

import math
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
    parser.add_argument("--model", required=True, metavar="SOURCE",
                        help=f"a shipped model ({', '.join(pretrained.available())}), an exported .msgpack or a "
                             "training workdir")
    parser.add_argument("--split", default="test", choices=("test", "validation"))
    parser.add_argument("--samples", type=int, default=1, metavar="K",
                        help="importance samples (dequantizations) per image; 1: the usual bound (default)")
    parser.add_argument("--limit", type=int, default=None, help="first N images of the split (default all)")
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.7, 1.0], metavar="T",
                        help="sample grids at these prior temperatures (default 0.7 1.0)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default="results")
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    size = 10000 if args.split == "test" else 5000
    if args.limit is not None and not 1 <= args.limit <= size:
        fail(prog, f"--limit must be in 1..{size}, got {args.limit}")
    if args.samples < 1:
        fail(prog, f"--samples must be >= 1, got {args.samples}")
    if not all(math.isfinite(t) and t > 0 for t in args.temperature):
        fail(prog, f"--temperature must be > 0, got {args.temperature}")
    try:
        pretrained.card(args.model)
    except ValueError as e:
        fail(prog, f"--model: {e}")
    distributed.initialize_from_args(args, prog)  # before anything touches a JAX backend
    t0 = time.time()
    try:
        result = pretrained.score_split(args.model, args.split, args.limit, samples=args.samples)
    except (FileNotFoundError, ValueError) as e:
        fail(prog, str(e))
    if not distributed.is_main():
        return 0
    model, params = pretrained.load(args.model)
    grid = sample_grid(model, params, jax.random.key(1), f"{args.out}/samples_{pretrained.short_name(args.model)}.png",
                       tuple(args.temperature))
    result["seconds"] = round(time.time() - t0, 1)
    if not math.isfinite(result["bpd_stderr"]):  # one image: no spread to estimate (JSON has no NaN)
        result["bpd_stderr"] = None
    if args.json:
        print_json(result)
    else:
        bound = "bits/dim" if args.samples == 1 else f"bits/dim (importance-weighted, K = {args.samples})"
        spread = f" +- {result['bpd_stderr']:.4f}" if result["bpd_stderr"] is not None else ""
        print(f"{args.model}: {result['bpd']:.4f}{spread} {bound} on {result['images']} "
              f"MNIST {args.split} images ({result['seconds']} s); samples: {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
