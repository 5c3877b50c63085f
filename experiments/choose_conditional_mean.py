"""Which members of the conditional-mean ensemble to ship: every non-empty subset of the members
the card lists, scored on validation images (never test images) under the six named masks.

    python -m experiments.choose_conditional_mean [--val-images 0:500] [--json]

A subset weighs its members as the card does, renormalized to sum 1. Prints each subset's PSNR
over the missing pixels per mask and its six-mask mean, and the smallest subset whose six-mask mean
is within --tolerance dB (default 0.05) of the best subset's: the one to ship.
"""

from __future__ import annotations

import itertools
import sys

import numpy as np

from experiments.common import ArgumentParser, fail, print_json
from experiments.inpaint import parse_range, split_range_error

PROG = "python -m experiments.choose_conditional_mean"


def main(argv=None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--val-images", type=parse_range, default=(0, 500), metavar="START:STOP",
                   help="validation images (the split's numbering: 0 is training image 55000; default 0:500)")
    p.add_argument("--tolerance", type=float, default=0.05, help="dB under the best six-mask mean (default 0.05)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = p.parse_args(argv if argv is not None else sys.argv[1:])
    if split_range_error(a.val_images, "validation"):
        p.error(split_range_error(a.val_images, "validation"))
    if not a.tolerance >= 0:
        p.error(f"--tolerance must be >= 0, got {a.tolerance}")
    import jax

    from jaxdnn import conditional_mean
    from jaxdnn.data import FetchError, load_mnist, to_unit_interval
    from jaxdnn.inpainting import MASKS, batch_masks, masked_psnr

    try:
        x = to_unit_interval(load_mnist("validation")[0][slice(*a.val_images)])
    except (FetchError, OSError) as e:
        fail(PROG, f"MNIST is not available: {e}", code=1)
    files = [m["file"] for m in conditional_mean.card()["members"]]
    members, weights = conditional_mean.ensemble(), np.asarray(conditional_mean.member_weights())
    indices = np.arange(*a.val_images)
    masks = {name: batch_masks(name, indices, jax.random.split(jax.random.key(0))[0]) for name in MASKS}
    # each member's fill once per mask; a subset's fill is their weighted mean (predict is linear in them)
    fills = {name: [np.asarray(conditional_mean.predict(x, m, p), np.float64) for p in members]
             for name, m in masks.items()}
    rows = []
    for size in range(1, len(members) + 1):
        for subset in itertools.combinations(range(len(members)), size):
            w = weights[list(subset)] / weights[list(subset)].sum()
            psnr = {}
            for name, m in masks.items():
                fill = sum(wi * fills[name][i] for wi, i in zip(w, subset, strict=True))
                psnr[name] = float(np.mean(np.asarray(masked_psnr(fill.astype(np.float32), x, m), np.float64)))
            rows.append({"members": [files[i] for i in subset], "weights": [round(float(v), 4) for v in w],
                         "psnr": {k: round(v, 3) for k, v in psnr.items()},
                         "mean": round(float(np.mean(list(psnr.values()))), 3)})
    best = max(r["mean"] for r in rows)
    chosen = min((r for r in rows if r["mean"] >= best - a.tolerance), key=lambda r: (len(r["members"]), -r["mean"]))
    result = {"images": f"validation {a.val_images[0]}:{a.val_images[1]}", "masks": list(MASKS), "subsets": rows,
              "best_mean": best, "tolerance": a.tolerance, "chosen": chosen}
    if a.json:
        print_json(result)
        return 0
    print(f"{'members':58s} " + " ".join(f"{n:>11s}" for n in MASKS) + f" {'mean':>7s}")
    for r in rows:
        label = " + ".join(f"{f.removesuffix('.msgpack')} {w:.3f}" for f, w in zip(r["members"], r["weights"],
                                                                                   strict=True))
        print(f"{label:58s} " + " ".join(f"{r['psnr'][n]:11.3f}" for n in MASKS) + f" {r['mean']:7.3f}")
    print(f"best six-mask mean {best:.3f} dB; smallest within {a.tolerance} dB: {' + '.join(chosen['members'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
