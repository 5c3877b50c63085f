"""Problem 3: inpaint MNIST test (or validation) images with a pretrained flow.

    python -m experiments.inpaint [--model SOURCE] [--mask NAME[,NAME...] | --mask-file PATH.npy] [--split test]
        [--images START:STOP] [--method NAME[,NAME...]] [--steps N] [--lr LR] [--starts K]
        [--rounds R] [--temperature T] [--seed 0] [--batch-size 100] [--out DIR] [--json]

Fills the missing pixels of images START..STOP-1 of the split with any of the methods of
`jaxdnn.inpainting` (latent space: `latent`, the default, the weighted mean of searches
from the training images nearest on the observed pixels, and `latent_map`; pixel space: `pgd`,
the course's 300 plain steps of 1e-3 from missing pixels at 1, `annealed`, `langevin`).
Reports, over the missing pixels only, the mean PSNR (peak 1), the mean MSE, the mean bits/dim
of the inpainted images (rounded to 8-bit pixels and scored as the model's card scores test
images: `FlowDistribution.bits_per_dim`) and the plausibility classifier's accuracy, beside
baselines computed in the same run (mean_fill, nearest_neighbor, knn_mean of 10, and for
`latent` the matched knn_matched, the supervised conditional-mean network, and start) with
paired differences (mean and standard error). Writes one figure per mask,
DIR/inpaint_<model>_<mask>_<methods>[_<options>].png (options: those given that are not the
defaults, so runs of other methods or options never overwrite each other): rows original,
observed, one per method, knn_mean.

Your own mask: `--mask-file PATH.npy`, a saved NumPy array (28, 28) or (28, 28, 1), bool or 0/1,
True / 1 = observed, with at least one observed and one missing pixel (docs/masks.md).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import numpy as np

from experiments.common import ArgumentParser, fail, print_json, save_figure
from jaxdnn import distributed, pretrained
from jaxdnn import inpainting as ip
from jaxdnn.data import FetchError, load_mnist, to_unit_interval

PROG = "python -m experiments.inpaint"
JSON_KEYS = ("model", "mask", "method", "split", "images", "steps", "settings", "psnr", "mse", "bpd", "baselines",
             "paired", "accuracy", "seconds", "method_seconds")
TEST_IMAGES = 10000
FIGURE_COLUMNS = 10


def figure(rows: list[tuple[str, np.ndarray, np.ndarray | None]], title: str = "",
           columns: int = FIGURE_COLUMNS):
    """One row per (label, images (N, 28, 28, 1), per-image PSNR or None) for the first
    `columns` images (a matplotlib figure; save it with `experiments.common.save_figure`)."""
    import matplotlib.pyplot as plt

    k = min(columns, len(rows[0][1]))
    fig, axes = plt.subplots(len(rows), k, figsize=(1.1 * k + 1.3, 1.2 * len(rows) + 0.4), squeeze=False)
    for r, (label, imgs, psnr) in enumerate(rows):
        for c in range(k):
            ax = axes[r, c]
            ax.imshow(imgs[c, :, :, 0], cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if psnr is not None:
                ax.set_xlabel(f"{psnr[c]:.1f} dB", fontsize=6, labelpad=1)
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


def split_range_error(images: tuple[int, int], split: str) -> str | None:
    """Why START:STOP does not fit `split` (5000 validation images), or None."""
    if split == "validation" and images[1] > 5000:
        return f"--images {images[0]}:{images[1]} is out of range for the 5000 validation images"
    return None


def load_mask_file(text: str) -> np.ndarray:
    """--mask-file PATH.npy -> bool (28, 28, 1), True = observed; ValueError naming what is wrong."""
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"{text}: no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        why = "not an array of numbers" if "pickle" in str(e) else " ".join(str(e).split())
        raise ValueError(f"{text}: not a NumPy .npy file of a mask ({why}; write one with np.save)") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{text}: holds several arrays (.npz); save one mask with np.save") from None
    if arr.shape not in ((28, 28), (28, 28, 1)):
        raise ValueError(f"{text}: shape {arr.shape}, need (28, 28) or (28, 28, 1)")
    if arr.dtype != bool:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise ValueError(f"{text}: dtype {arr.dtype}, need bool or 0/1 numbers")
        bad = arr[~np.isin(arr, (0, 1))]
        if bad.size:
            raise ValueError(f"{text}: {bad.size} values other than 0 and 1 (e.g. {bad.flat[0].item()!r}); "
                             "need bool or 0/1, 1 = observed")
    mask = (arr != 0).reshape(28, 28, 1)
    if mask.all():
        raise ValueError(f"{text}: every pixel is observed (1): nothing to inpaint")
    if not mask.any():
        raise ValueError(f"{text}: no pixel is observed (all 0): nothing to condition on")
    return mask


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
    p.add_argument("--model", default="realnvp", metavar="SOURCE",
                   help=f"a shipped flow ({', '.join(pretrained.available())}; default realnvp), an exported "
                        ".msgpack or a training workdir")
    p.add_argument("--mask", default=None, type=choice_list(ip.MASKS), metavar="NAME[,NAME...]",
                   help=f"missing region(s) from {', '.join(ip.MASKS)} (default hw10: rows 5..11, cols 5..19)")
    p.add_argument("--mask-file", default=None, metavar="PATH.npy",
                   help="your own mask instead: a .npy array (28, 28) or (28, 28, 1), bool or 0/1, True = "
                        "observed (np.save; docs/masks.md)")
    p.add_argument("--images", type=parse_range, default=(0, 10), metavar="START:STOP",
                   help="images START..STOP-1 of --split (default 0:10)")
    p.add_argument("--split", default="test", choices=("test", "validation"),
                   help="test images (default; read once, for reported numbers) or the validation split "
                        "(training images 55000..59999: choose methods and settings here); neighbours and the "
                        "baselines' data always come from the training split 0..54999")
    p.add_argument("--method", default=["latent"], type=choice_list(ip.METHODS), metavar="NAME[,NAME...]",
                   help=f"from {', '.join(ip.METHODS)} (default latent, the best on validation; pgd is the "
                        "course's); with several masks or methods --json prints a list, one object per (mask, method)")
    p.add_argument("--steps", type=int, default=None,
                   help="iterations, per search for the latent methods (default: "
                        + ", ".join(f"{m} {n}" for m, n in ip.STEPS.items())
                        + "".join(f"; {m} {n} with {kind}" for (m, kind), n in ip.FLOW_STEPS.items()) + ")")
    p.add_argument("--lr", type=float, default=None,
                   help="step size (default: " + ", ".join(f"{m} {d['lr']:g}" for m, d in ip.DEFAULTS.items()) + ")")
    p.add_argument("--starts", type=int, default=None,
                   help=f"latent: searches per image (default {ip.LATENT_DEFAULTS['starts']})")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"latent: rounds of searches, each after the first from the training images nearest to the "
                        f"last estimate (default {ip.LATENT_DEFAULTS['rounds']})")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"latent: T of the searches' weights softmax(-E / T), inf for equal weights "
                        f"(default {ip.LATENT_DEFAULTS['temperature']:g})")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    p.add_argument("--batch-size", type=int, default=100,
                   help="images per vmapped call (default 100)")
    p.add_argument("--out", default="results", help="figure directory (default results/)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    distributed.add_arguments(p)
    a = p.parse_args(argv)
    if a.mask is not None and a.mask_file is not None:
        p.error("--mask and --mask-file: give one of them")
    a.masks = {name: name for name in (a.mask or ["hw10"])}  # label -> a name or a bool (28, 28, 1) array
    if a.mask_file is not None:
        try:
            a.masks = {f"file:{Path(a.mask_file).name}": load_mask_file(a.mask_file)}
        except ValueError as e:
            p.error(f"--mask-file {e}")
    if split_range_error(a.images, a.split):
        p.error(split_range_error(a.images, a.split))
    if a.steps is not None and a.steps < 0:
        p.error(f"--steps must be >= 0, got {a.steps}")
    if latent_options(a) and a.method != ["latent"]:
        p.error("--starts, --rounds and --temperature set the latent method: use them with --method "
                "latent alone")
    for method in a.method:
        try:
            settings(a, method)
        except ValueError as e:
            p.error(f"--{e}")
    if a.seed < 0:
        p.error(f"--seed must be >= 0, got {a.seed}")
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    try:
        pretrained.card(a.model)
    except ValueError as e:
        p.error(f"--model: {e}")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {a.out!r} exists and is not a directory")
    return a


def latent_options(a: argparse.Namespace) -> dict:
    """--starts, --rounds and --temperature as `inpaint` options (only those given)."""
    return {k: v for k, v in (("starts", a.starts), ("rounds", a.rounds), ("temperature", a.temperature))
            if v is not None}


def settings(a: argparse.Namespace, method: str) -> dict:
    """Every setting `method` runs with (defaults, --lr, --starts, --rounds, --temperature), checked by
    `inpainting.check_options`; infinite values as the string "inf" (JSON has no infinity)."""
    options = latent_options(a) if method == "latent" else {}
    checked = ip.check_options(method, lr=a.lr, **options)
    return {k: v if math.isfinite(v) else str(v) for k, v in checked.items()}


def given_options(a: argparse.Namespace, method: str) -> dict:
    """The options of `method` this run sets that are not their defaults (steps, lr, the latent
    method's): what tells its outputs apart from a default run's."""
    defaults = ip.check_options(method)
    given = {"lr": a.lr, **(latent_options(a) if method == "latent" else {})}
    out = {k: v for k, v in given.items() if v is not None and v != defaults.get(k)}
    return ({"steps": a.steps} if a.steps is not None else {}) | out


def run_label(a: argparse.Namespace, method: str, steps: int) -> str:
    """'latent (15 steps)', 'latent (5 steps, starts 8, temperature inf)': the method and every
    option that sets it apart from its defaults."""
    extra = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in given_options(a, method).items()
             if k != "steps"]
    return f"{method} ({', '.join([f'{steps} steps', *extra])})"


def figure_name(a: argparse.Namespace, mask_label: str) -> str:
    """inpaint_<model>_<mask>_<method>[+<method>...][_<option><value>...][_seed<S>][_validation].png."""
    mask = mask_label.removeprefix("file:").removesuffix(".npy")
    parts = [pretrained.short_name(a.model), mask, "+".join(a.method)]
    options: dict = {}  # --steps and --lr are shared by the methods; the latent options go with latent alone
    for method in a.method:
        for k, v in given_options(a, method).items():
            options.setdefault(k, v)
    parts += [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in options.items()]
    if a.seed:
        parts.append(f"seed{a.seed}")
    if a.split != "test":
        parts.append(a.split)
    name = "_".join(parts)
    return "inpaint_" + "".join(c if c.isalnum() or c in "+-._" else "-" for c in name) + ".png"


def main(argv=None) -> int:
    """The command line; returns the exit status (2: bad input, one line on stderr)."""
    try:
        return _main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def combine(metrics: dict, arrays: dict, n: int) -> dict:
    """Means over the images of every process from each process's n images (paired differences
    from their sums and sums of squares; `seconds`, `method_seconds`: the slowest process's); the
    identity for one process."""
    names, readers = list(metrics["baselines"]), list(metrics["accuracy"])
    diffs = [arrays["psnr"] - arrays[f"psnr_{b}"] for b in names]
    local = [n, metrics["seconds"], *(n * metrics[k] for k in ("psnr", "mse", "bpd")),
             *(n * metrics["baselines"][b][k] for b in names for k in ("psnr", "mse")),
             *(v for d in diffs for v in (d.sum(), (d * d).sum())), *(n * metrics["accuracy"][r] for r in readers),
             metrics["method_seconds"]]
    every = distributed.from_every_process(np.asarray(local, np.float64))
    total = every[:, 0].sum()
    sums = [float(v) for v in every[:, 2:].sum(axis=0)]
    means = [v / total for v in sums[: 3 + 2 * len(names)]]
    paired, first_accuracy = {}, 3 + 4 * len(names)
    accuracy = {r: sums[first_accuracy + i] / total for i, r in enumerate(readers)}
    for i, b in enumerate(names):
        s1, s2 = sums[3 + 2 * len(names) + 2 * i: 5 + 2 * len(names) + 2 * i]
        var = (s2 - s1 * s1 / total) / (total - 1) if total > 1 else float("nan")
        paired[b] = {"mean": s1 / total, "stderr": float(np.sqrt(max(var, 0.0) / total))}
    return {"psnr": means[0], "mse": means[1], "bpd": means[2],
            "baselines": {b: {"psnr": means[3 + 2 * i], "mse": means[4 + 2 * i]} for i, b in enumerate(names)},
            "paired": paired, "accuracy": accuracy, "seconds": float(every[:, 1].max()),
            "method_seconds": float(every[:, -1].max())}


def _main(argv) -> int:
    a = parse_args(argv)
    distributed.initialize_from_args(a, PROG)  # before anything touches a JAX backend
    try:
        model, params = pretrained.load(a.model)
    except (ValueError, OSError) as e:
        fail(PROG, f"--model {a.model}: no pretrained weights could be loaded ({e})")
    start, stop = a.images
    try:  # each process inpaints its share of the images; the means are combined
        lo, hi = (start + i for i in distributed.process_share(stop - start))
    except ValueError as e:
        fail(PROG, f"--images {start}:{stop}: {e}")
    try:
        images, labels = load_mnist(a.split)
        images, labels = to_unit_interval(images[lo:hi]), labels[lo:hi]
        train = to_unit_interval(load_mnist("train")[0])
    except (FetchError, OSError) as e:
        fail(PROG, f"MNIST is not available: {e}", code=1)
    outs = []
    for mask_label, mask in a.masks.items():
        rows = []
        for method in a.method:
            try:
                metrics, arrays = ip.evaluate(model, params, images, mask, method, train_images=train,
                                              key=jax.random.key(a.seed), indices=np.arange(lo, hi),
                                              steps=a.steps, lr=a.lr, batch_size=a.batch_size, labels=labels,
                                              **latent_options(a))
            except ValueError as e:
                fail(PROG, str(e))
            if not rows:
                observed = np.where(arrays["masks"], arrays["original"], 0.5)
                rows = [("original", arrays["original"], None), ("observed", observed, None)]
            steps = ip.default_steps(method, model) if a.steps is None else a.steps
            rows.append((run_label(a, method, steps), arrays["inpainted"], arrays["psnr"]))
            out = {"model": a.model, "mask": mask_label, "method": method, "split": a.split,
                   "images": f"{start}:{stop}",
                   "steps": steps, "settings": settings(a, method), **combine(metrics, arrays, hi - lo)}
            assert tuple(out) == JSON_KEYS
            outs.append(out)
            if not a.json and distributed.is_main():
                report(out, run_label(a, method, steps))
        if not distributed.is_main():
            continue  # process 0 (the first images) draws the figure
        knn = np.asarray(ip.masked_psnr(arrays["knn_mean"], arrays["original"], arrays["masks"]))
        rows.append(("knn_mean", arrays["knn_mean"], knn))
        path = Path(a.out) / figure_name(a, mask_label)
        title = (f"{a.model}, mask {mask_label} (missing pixels grey in 'observed'), {a.split} images "
                 f"{start}..{min(hi, start + FIGURE_COLUMNS) - 1}; PSNR over the missing pixels")
        try:
            save_figure(figure(rows, title), path)
        except OSError as e:
            fail(PROG, f"cannot write the figure to {path}: {e}")
        if not a.json:
            print(f"  figure: {path}")
    if a.json and distributed.is_main():
        print_json(outs[0] if len(outs) == 1 else outs)
    return 0


def report(out: dict, label: str) -> None:
    b = out["baselines"]
    rows = [(label, out), *b.items()]
    print(f"Inpainting MNIST {out['split']} images {out['images']} with {out['model']}, "
          f"mask {out['mask']}; scores over the missing pixels")
    for name, m in rows:
        d = out["paired"].get(name)
        vs = f"   method - this: {d['mean']:+.3f} +- {2 * d['stderr']:.3f} dB (2 SE, paired)" if d else ""
        print(f"  {name:<{max(22, len(label))}} PSNR {m['psnr']:7.3f} dB   MSE {m['mse']:.5f}{vs}")
    acc = out["accuracy"]
    print("  read as the right digit by the classifier: " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()))
    print(f"  bits/dim of the inpainted images (8-bit, dequantized as the card's test bits/dim): "
          f"{out['bpd']:.4f}; {out['seconds']:.1f} s "
          f"(the method {out['method_seconds']:.1f} s, its compilation included)")


if __name__ == "__main__":
    sys.exit(main())
