"""Train the conditional-mean network (`jaxdnn.conditional_mean`) and score it on validation:

    python -m experiments.train_conditional_mean [--steps 20000] [--seed 1] [--named ROWS]
        [--objective mse|psnr] [--lr 1e-3] [--trainable all|refiner] [--refiner CHANNELS] [--init-seed N]
        [--width 1024] [--depth 3] [--unet CHANNELS] [--dropout 0.1]
        [--init-from FILE [--refiner-from FILE]]
        [--val-images 0:500]
        [--out DIR] [--ship [MEMBER] [--weight W]]

Training images 0..54999 under random masks; the card gives, for validation images (never test
images) and every named mask, the network's PSNR over the missing pixels beside the mean of the
32 training images nearest on the observed pixels (paired difference, mean and standard error).
Writes DIR/conditional_mean.msgpack (float32: `--init-from` continues from it bit for bit, with a
fresh optimizer and schedule) and DIR/conditional_mean.json; `--ship MEMBER` also writes the float16
copy into the shipped files (`jaxdnn.pretrained`) as that member of the ensemble
(`conditional_mean.member_file`; 1 if no number follows) and the ensemble's card (every member's
stage; as metrics the ensemble's validation PSNR per mask, what `conditional_mean.predict` gives).

The shipped ensemble (chosen by `python -m experiments.choose_conditional_mean`, docs/inpainting.md):
member 1, a dense core with a refiner: `--steps 20000 --seed 1`, then `--steps 20000 --seed 2`,
`--steps 10000 --seed 3 --named 64`, `--steps 10000 --seed 4 --named 128`, `--steps 10000 --seed 5
--named 128`, `--steps 10000 --seed 6 --named 128 --objective psnr --lr 3e-4 --warmup 200` (the dense
core alone), `--steps 3000 --seed 8 --named 128 --objective psnr --warmup 200 --trainable refiner
--refiner 64` (a convolutional refiner on the frozen core), each `--init-from` the last one's output;
member 2, a U-Net: `--steps 7000 --seed 17 --init-seed 17 --unet 16 --named 128 --objective psnr
--lr 1e-3 --warmup 300 --ship 2 --weight 0.818`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import ArgumentParser, fail
from experiments.inpaint import parse_range, split_range_error
from jaxdnn.files import atomic_write_bytes, sha256

PROG = "python -m experiments.train_conditional_mean"
NEIGHBOURS = 32  # the baseline on the card: the mean of this many nearest training images (latent's starts)


def main(argv=None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20000, help="AdamW steps of 256 images (default 20000)")
    p.add_argument("--seed", type=int, default=1, help="draws batches, masks and dropout (default 1)")
    p.add_argument("--warmup", type=int, default=500, help="steps of linear warm-up before the cosine (default 500)")
    p.add_argument("--named", type=int, default=0, metavar="ROWS",
                   help="rows of each 256-image batch under the named masks, in turn (default 0: random masks only)")
    p.add_argument("--objective", choices=("mse", "psnr"), default="mse",
                   help="mse: the squared error pooled over the batch; psnr: the mean of each image's log MSE "
                        "(default mse)")
    p.add_argument("--lr", type=float, default=1e-3, help="the peak learning rate (default 0.001)")
    p.add_argument("--trainable", choices=("all", "refiner"), default="all",
                   help="all: every weight; refiner: the convolutional refiner alone, the dense core frozen "
                        "(default all)")
    p.add_argument("--refiner", type=int, default=None, metavar="CHANNELS",
                   help="channels of the convolutional refiner (default: that of --init-from's weights, or "
                        "32 where they have none; 0: none, a fresh dense core alone)")
    p.add_argument("--width", type=int, default=None, help="units of each dense layer of a fresh core (default 1024)")
    p.add_argument("--depth", type=int, default=None, help="dense layers of a fresh core (default 3)")
    p.add_argument("--unet", type=int, default=None, metavar="CHANNELS",
                   help="a fresh UNetMeanNet of these channels (at 28 pixels) instead of a dense core; "
                        "--width is its bottleneck's (default 512)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout after each dense layer while training (default 0.1)")
    p.add_argument("--init-seed", type=int, default=0, metavar="N",
                   help="initializes a fresh network (default 0; not with --init-from)")
    p.add_argument("--init-from", default=None, metavar="FILE", help="continue from these weights (a .msgpack)")
    p.add_argument("--refiner-from", default=None, metavar="FILE",
                   help="with --init-from: the refiner's weights (and width) from this network's file instead")
    p.add_argument("--val-images", type=parse_range, default=(0, 500), metavar="START:STOP",
                   help="validation images scored on the card (default 0:500)")
    p.add_argument("--out", default="results/conditional_mean", help="where the weights and card go")
    p.add_argument("--ship", type=int, nargs="?", const=1, default=None, metavar="MEMBER",
                   help="also write into the package as this member of the shipped ensemble (default 1; "
                        "maintainers)")
    p.add_argument("--weight", type=float, default=None, metavar="W",
                   help="with --ship: this member's weight in the ensemble's mean, the others keeping their "
                        "proportions (default: its weight before, or 1/N for a new member of N)")
    a = p.parse_args(argv if argv is not None else sys.argv[1:])
    if not 0 <= a.warmup < a.steps:
        p.error(f"--steps must exceed --warmup >= 0, got --steps {a.steps} --warmup {a.warmup}")
    if not a.lr > 0:
        p.error(f"--lr must be positive, got {a.lr}")
    if not 0 <= a.named <= 256:
        p.error(f"--named must lie in 0..256 (rows of a batch), got {a.named}")
    if a.refiner is not None and a.refiner < (1 if a.init_from else 0):
        p.error(f"--refiner must be a positive number of channels (0 only for a fresh network), got {a.refiner}")
    if a.init_from is not None and a.init_seed != 0:
        p.error("--init-seed initializes a fresh network: not with --init-from")
    if a.init_from is not None and (a.width, a.depth) != (None, None):
        p.error("--width and --depth shape a fresh network: --init-from's weights have theirs")
    if a.width is not None and a.width < 1 or a.depth is not None and a.depth < 1:
        p.error(f"--width and --depth must be positive, got {a.width} and {a.depth}")
    if a.unet is not None and (a.unet < 1 or a.init_from or a.depth or a.refiner or a.trainable != "all"):
        p.error(f"--unet shapes a fresh U-Net of a positive number of channels, without --init-from, --depth, "
                f"--refiner or --trainable refiner; got --unet {a.unet}")
    if a.dropout is not None and not 0 <= a.dropout < 1:
        p.error(f"--dropout must lie in [0, 1), got {a.dropout}")
    if a.refiner_from is not None and a.init_from is None:
        p.error("--refiner-from replaces the refiner of --init-from's weights: give --init-from too")
    if a.ship is not None and a.ship < 1:
        p.error(f"--ship must name a member 1, 2, ..., got {a.ship}")
    if a.weight is not None and (a.ship is None or not 0 < a.weight <= 1):
        p.error(f"--weight is a shipped member's weight in (0, 1]: give it with --ship; got --weight {a.weight}")
    if split_range_error(a.val_images, "validation"):
        p.error(split_range_error(a.val_images, "validation"))
    for flag, path in (("--init-from", a.init_from), ("--refiner-from", a.refiner_from)):
        if path is not None and not Path(path).is_file():
            p.error(f"{flag} {path}: no such file")
    import jax
    from tqdm import tqdm

    from jaxdnn import conditional_mean
    from jaxdnn.data import FetchError, load_mnist, to_unit_interval
    from jaxdnn.inpainting import MASKS, batch_masks, knn_mean, masked_psnr

    try:
        train_x = to_unit_interval(load_mnist("train")[0])
        val_x = to_unit_interval(load_mnist("validation")[0][slice(*a.val_images)])
    except (FetchError, OSError) as e:
        fail(PROG, f"MNIST is not available: {e}", code=1)
    shipped = len(conditional_mean.card()["members"]) if conditional_mean.CARD.is_file() else 0
    if a.ship is not None and a.ship > shipped + 1:
        fail(PROG, f"--ship {a.ship}: the shipped ensemble has {shipped} member(s); ship {shipped + 1} next")
    if a.weight is not None and a.weight < 1 and max(shipped, a.ship) == 1:
        fail(PROG, f"--weight {a.weight}: the ensemble would have one member, whose weight is 1")
    init = None
    if a.init_from is not None:
        try:
            init = conditional_mean.load(a.init_from, a.refiner)
        except (ValueError, OSError) as e:
            fail(PROG, f"--init-from {a.init_from}: cannot read these weights ({e})")
    if a.refiner_from is not None:
        try:
            refiner = conditional_mean.load(a.refiner_from)["params"]["refiner"]
        except (ValueError, OSError) as e:
            fail(PROG, f"--refiner-from {a.refiner_from}: cannot read these weights ({e})")
        except KeyError:
            fail(PROG, f"--refiner-from {a.refiner_from}: a network without a refiner")
        if "refiner" not in init["params"]:
            fail(PROG, f"--refiner-from: --init-from {a.init_from} is a network without a refiner")
        init = {"params": {**init["params"], "refiner": refiner}}
    default = conditional_mean.ConditionalMeanNet()
    dropout = default.dropout if a.dropout is None else a.dropout
    if init is not None:
        model = conditional_mean.model_of(init, dropout)
    elif a.unet is not None:
        model = conditional_mean.UNetMeanNet(channels=a.unet, width=a.width or conditional_mean.UNetMeanNet.width,
                                             dropout=dropout)
    else:
        model = default.clone(width=a.width or default.width, depth=a.depth or default.depth, dropout=dropout,
                              refiner=conditional_mean.REFINER if a.refiner is None else a.refiner)
    bar = tqdm(total=a.steps, dynamic_ncols=True, mininterval=5, desc="conditional mean")

    def progress(step, loss, params):
        bar.update(1)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")

    t0 = time.time()
    try:
        params = conditional_mean.train(train_x, a.steps, a.seed, init, init_seed=a.init_seed, lr=a.lr, warmup=a.warmup,
                                  named=a.named, objective=a.objective, trainable=a.trainable, model=model,
                                  callback=progress)
    except ValueError as e:
        fail(PROG, str(e))
    bar.close()
    seconds = round(time.time() - t0, 1)

    indices = np.arange(*a.val_images)
    masks = {mask: batch_masks(mask, indices, jax.random.split(jax.random.key(0))[0]) for mask in MASKS}
    knn = {mask: np.asarray(masked_psnr(knn_mean(val_x, m, train_x, k=NEIGHBOURS), val_x, m), np.float64)
           for mask, m in masks.items()}  # random50 draws each image's pixels from its number, as experiments.inpaint

    def validation(params, weights=None) -> dict:
        """Every mask's validation PSNR for these parameters (one network, or an ensemble and its
        weights), beside knn."""
        scores = {}
        for mask, m in masks.items():
            net = np.asarray(masked_psnr(conditional_mean.predict(val_x, m, params, weights), val_x, m), np.float64)
            d = net - knn[mask]
            scores[mask] = {"psnr": round(float(net.mean()), 3),
                            f"knn_mean_{NEIGHBOURS}": round(float(knn[mask].mean()), 3),
                            "paired": {"mean": round(float(d.mean()), 3),
                                       "stderr": round(float(d.std(ddof=1) / np.sqrt(len(d))), 3)}}
        return {"images": f"{a.val_images[0]}:{a.val_images[1]}", "scores": scores,
                "note": f"PSNR over the missing pixels; paired: network - mean of the {NEIGHBOURS} "
                        "training images nearest on the observed pixels"}

    stage = {"command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]), "steps": a.steps,
             "seed": a.seed, "warmup": a.warmup, "lr": a.lr, "named": a.named, "objective": a.objective,
             "trainable": a.trainable, "wall_seconds": seconds,
             "hardware": f"{jax.device_count()} x {jax.default_backend()}"}
    if a.init_from is None:
        stage["init_seed"] = a.init_seed
    for key, path in (("init_from", a.init_from), ("refiner_from", a.refiner_from)):
        if path is not None:
            stage[key] = {"path": path, "sha256": sha256(path)}
    card = {"model": conditional_mean.describe(model),
            "trained_on": "training images 0..54999 under random masks (conditional_mean.random_masks; "
                          f"this stage: {a.named} of 256 rows the named masks)",
            "stage": stage, "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
            "validation": validation(params)}
    from flax import serialization

    out = Path(a.out)
    atomic_write_bytes(out / "conditional_mean.msgpack", serialization.to_bytes(jax.device_get(params)))
    atomic_write_bytes(out / "conditional_mean.json", json.dumps(card, indent=2).encode())
    if a.ship is not None:
        ship(a.ship, params, card, validation, a.weight)
    print(json.dumps(card))
    return 0


def ship(member: int, params, card: dict, validation, weight: float | None = None) -> None:
    """Write `params` (float16) into the shipped files (`jaxdnn.pretrained`) as this member of the
    ensemble, and the ensemble's card (`jaxdnn.pretrained.store` schema): every member's card (this
    one's replaced or appended) with its weight in the mean (this one's `weight`, the others keeping
    their proportions; None: its weight before, or 1/N for a new member of N), and as metrics the
    validation PSNR of all of them together, read back as `conditional_mean.predict` reads them."""
    from jaxdnn import conditional_mean
    from jaxdnn.pretrained import store

    members = conditional_mean.card()["members"] if conditional_mean.CARD.is_file() else []
    before = list(conditional_mean.member_weights()) if members else []
    if weight is None:
        weight = before[member - 1] if member <= len(before) else 1 / (len(before) + 1)
    others = before[:member - 1] + before[member:]
    weights = [w * (1 - weight) / sum(others) for w in others] if others else []
    weights.insert(member - 1, 1.0 if not others else weight)
    path = conditional_mean.member_file(member)
    atomic_write_bytes(path, conditional_mean.to_bytes(params))
    members = [*members[:member - 1], {"file": path.name, **card}, *members[member:]]
    members = [{**m, "weight": w} for m, w in zip(members, weights, strict=True)]
    scores = validation([conditional_mean.load(path.parent / m["file"]) for m in members], weights)
    measure = f"python -m experiments.choose_conditional_mean --val-images {scores['images']}"
    files = {m["file"]: (path.parent / m["file"]).read_bytes() for m in members}
    store.write(path.parent, conditional_mean.CARD.stem, files, {
        "kind": "conditional_mean", "weights": {},
        "split": f"trained on training images 0..54999 under random masks; scored on validation images "
                 f"{scores['images']}",
        "command": f"{PROG} --ship MEMBER (each member's command: members[].stage)",
        "metrics": {f"psnr_{mask}": {"value": v["psnr"], "command": measure} for mask, v in scores["scores"].items()},
        "model": f"an ensemble of {len(members)} networks, the weighted mean of their estimates",
        "members": members})


if __name__ == "__main__":
    sys.exit(main())
