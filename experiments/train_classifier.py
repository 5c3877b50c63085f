"""Train the plausibility classifier (`jaxdnn.inpainting.plausibility`) on the training split and
score it: `python -m experiments.train_classifier [--epochs 2] [--ship] [--out DIR] [--score]`.

Training images 0..54999 only; validation accuracy (55000..59999) and test accuracy (the test
set's one reading) go on the card. `--ship` writes the weights and card into the package (what
`accuracy` loads; `jaxdnn.pretrained`); by default they go to --out. `--score` trains nothing: it
prints the shipped classifier's validation and test accuracy (the numbers on its card)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax

from experiments.common import ArgumentParser, fail

PROG = "python -m experiments.train_classifier"


def main(argv=None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/classifier", help="where the weights and card go without --ship")
    p.add_argument("--ship", action="store_true", help="write into the package (maintainers)")
    p.add_argument("--score", action="store_true", help="score the shipped classifier, train nothing")
    a = p.parse_args(argv)
    if a.score and a.ship:
        fail(PROG, "--score reads the shipped classifier: not with --ship")
    if a.epochs < 1:
        fail(PROG, f"--epochs must be >= 1, got {a.epochs}")
    from flax import serialization

    from jaxdnn.data import load_mnist, to_unit_interval
    from jaxdnn.inpainting import plausibility
    from jaxdnn.pretrained import store

    try:
        train_x, train_y = load_mnist("train")
        val_x, val_y = load_mnist("validation")
        test_x, test_y = load_mnist("test")
    except OSError as e:
        fail(PROG, f"MNIST is not available: {e}", code=1)
    if a.score:
        accuracy = {"validation_accuracy": plausibility.accuracy(to_unit_interval(val_x), val_y),
                    "test_accuracy": plausibility.accuracy(to_unit_interval(test_x), test_y)}
        print(json.dumps(accuracy))
        return 0
    t0 = time.time()
    params = plausibility.train(jax.random.key(a.seed), train_x, train_y, epochs=a.epochs)
    seconds = round(time.time() - t0, 1)
    score = f"{PROG} --score"
    accuracy = {"validation_accuracy": plausibility.accuracy(to_unit_interval(val_x), val_y, params),
                "test_accuracy": plausibility.accuracy(to_unit_interval(test_x), test_y, params)}
    card = {"kind": "classifier", "weights": {},
            "split": "trained on training images 0..54999; validation 55000..59999; test read once, here",
            "command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]),
            "metrics": {k: {"value": v, "command": score} for k, v in accuracy.items()},
            "model": "DigitClassifier (2 conv 3x3 + max pool, dense 128)", "epochs": a.epochs, "seed": a.seed,
            "wall_seconds": seconds, "parameters": int(sum(x.size for x in jax.tree.leaves(params)))}
    out = plausibility.WEIGHTS.parent if a.ship else Path(a.out)
    path = store.write(out, "classifier", {plausibility.WEIGHTS.name: serialization.to_bytes(jax.device_get(params))},
                       card)
    card = json.loads(path.read_text())
    print(json.dumps(card))
    return 0


if __name__ == "__main__":
    sys.exit(main())
