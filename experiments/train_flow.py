"""Train a flow on MNIST: `python -m experiments.train_flow --config experiments/configs/realnvp.py
[--config.KEY=VALUE ...]` (or `--model NAME` with the library's defaults).

A thin CLI over `jaxdnn.trainer.train_and_evaluate`. Rerunning the same command resumes from the
workdir's latest orbax checkpoint with the same data order and keys; `--coordinator ...` runs it
on several processes (docs/training.md, "More than one process"; recipes, the campaign and
export: docs/training.md). Writes config.json, history.jsonl,
metrics.jsonl, checkpoints/, final.json and loss_curve.png to the workdir.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import ArgumentParser, fail, parse_overrides, save_figure
from jaxdnn import distributed, trainer
from jaxdnn import workdir as layout
from jaxdnn.flows import MODELS, config_schema

PROG = "python -m experiments.train_flow"


def plot_curve(log_path: Path, out: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["train_bpd"]) for r in rows if "train_bpd" in r]
    te = [(r["step"], r["val_bpd"]) for r in rows if "val_bpd" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr, strict=True), lw=0.8, label="train (running mean)")
    if te:
        ax.plot(*zip(*te, strict=True), "o-", label="validation (averaged weights)")
    ax.set(xlabel="step", ylabel="bits/dim", title=title)
    if tr:
        ax.set_ylim(min(v for _, v in tr + te) - 0.05, np.percentile([v for _, v in tr], 95) + 0.1)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out)


def main(argv=None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__, epilog=config_help(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a recipe, experiments/configs/<model>.py (get_config()); --config.KEY=VALUE overrides it")
    parser.add_argument("--model", default=None, choices=sorted(MODELS), help="the model (or the --config file's)")
    parser.add_argument("--workdir", default=None, help="default runs/<model>")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop (with a checkpoint) after N steps of this invocation, as if killed")
    parser.add_argument("--init-from", default=None, metavar="SOURCE",
                        help="start a fresh workdir from SOURCE's weights at its step (a shipped name, an exported "
                             ".msgpack or a workdir), with its model config, a fresh optimizer and warm-up")
    parser.add_argument("--export", action="store_true",
                        help="do not train: score the workdir's latest averaged weights on the validation and test "
                             "sets and write <model>.msgpack and its card to WORKDIR/export (or --export-dir)")
    parser.add_argument("--export-dir", default=None, metavar="DIR", help="with --export: write here instead")
    parser.add_argument("--ship", action="store_true",
                        help="with --export: replace the package's shipped model (maintainers)")
    distributed.add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest, PROG)
    if args.config is not None:
        try:
            recipe = load_config_file(args.config)
        except (OSError, ValueError, AttributeError, SyntaxError) as e:
            fail(PROG, f"--config {args.config}: {e}")
        model = recipe.pop("model", None)
        if args.model is not None and model != args.model:
            fail(PROG, f"--model {args.model} but --config {args.config} is a {model} recipe")
        args.model, overrides = model, {**recipe, **overrides}
    if args.model not in MODELS:
        fail(PROG, f"give --model ({', '.join(sorted(MODELS))}) or --config FILE")
    if args.stop_after is not None and args.stop_after < 1:
        fail(PROG, f"--stop-after must be >= 1, got {args.stop_after}")
    if (args.export_dir or args.ship) and not args.export:
        fail(PROG, "--export-dir and --ship go with --export")
    if args.export_dir and args.ship:
        fail(PROG, "give --export-dir or --ship, not both")
    try:
        config = trainer.default_config(args.model, args.init_from, **overrides)
    except ValueError as e:
        fail(PROG, f"--config: {e}" if args.init_from is None or "init_from" not in str(e) else
             str(e).replace("init_from", "--init-from").replace("drop ", "drop --config."))
    distributed.initialize_from_args(args, PROG)  # before anything touches a JAX backend
    workdir = Path(args.workdir or f"runs/{args.model}")
    try:
        if args.export:
            from jaxdnn import pretrained

            destination = pretrained.SHIPPED_DIR if args.ship else Path(args.export_dir or workdir / layout.EXPORT)
            return export(args.model, workdir, destination)
        final = trainer.train_and_evaluate(config, workdir, stop_after=args.stop_after, progress=not args.quiet,
                                           command=command_line(argv))
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        fail(PROG, str(e))
    if final is not None and distributed.is_main():
        plot_curve(workdir / layout.METRICS, workdir / "loss_curve.png", f"{args.model} on MNIST")
        print(json.dumps(final))
    return 0


def load_config_file(path: str) -> dict:
    """The flat dict of `get_config()` in the Python file `path` (experiments/configs/*.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_jaxdnn_config_{Path(path).stem}", path)
    if spec is None or not Path(path).is_file():
        raise OSError("no such config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def config_help() -> str:
    """The --config.KEY=VALUE keys of every model with their defaults and ranges, for --help."""
    lines = ["training keys (--config.KEY=VALUE):"]
    lines += [f"  {k}={f.default!r} {f.range_text()}" for k, f in trainer.TRAIN_SCHEMA.items()]
    for name in sorted(MODELS):
        schema = config_schema(name)
        lines.append(f"{name} keys: " + ", ".join(f"{k}={f.default!r}" for k, f in schema.items()))
    return "\n".join(lines)


def command_line(argv) -> str:
    """The invocation as a card records it: without --workdir, which names a path on one machine
    and does not change the result."""
    args, out = list(sys.argv[1:] if argv is None else argv), []
    while args:
        arg = args.pop(0)
        if arg == "--workdir":
            args = args[1:]
        elif not arg.startswith("--workdir="):
            out.append(arg)
    return " ".join(["python -m experiments.train_flow", *out])


def validation_curve(log_path: Path) -> list[dict]:
    """The periodic validation rows of a run's metrics.jsonl (step, epoch, wall seconds, bits/dim
    of the averaged and raw weights), for the card and its figure."""
    keys = ("step", "epoch", "wall_seconds", "val_bpd", "val_bpd_raw")
    rows = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln] if log_path.exists() else []
    return [{k: r[k] for k in keys if k in r} for r in rows if "val_bpd" in r]


def export(name: str, workdir: Path, directory: Path) -> int:
    """Scores the workdir's latest averaged weights on the 5,000 validation and the 10,000 test
    images (the test set's one reading) and writes them with their card into `directory`. A run
    started from other weights nests their card: every stage, its hardware and wall time."""
    import os
    import platform

    import jax

    from jaxdnn import pretrained, train, trainer
    from jaxdnn.data import load_mnist

    if not (workdir / layout.CONFIG).exists():
        fail(PROG, f"no training run in {workdir} to export")
    config = trainer.check_run_config(json.loads((workdir / layout.CONFIG).read_text()))  # the run's own
    if config["model"] != name:
        fail(PROG, f"{workdir} holds a {config['model']} run, not a {name}")
    model, _, state, extra, mesh = trainer.setup(config, workdir)
    if state is None:
        fail(PROG, f"no checkpoint in {workdir} to export")
    hist_path = workdir / layout.HISTORY
    history = [json.loads(ln) for ln in hist_path.read_text().splitlines() if ln] if hist_path.exists() else []
    t0 = time.time()
    eval_key = train.run_keys(config["train_config"]["seed"])["eval"]
    scores = {split: train.score(model, state.ema_params, load_mnist(split)[0], eval_key, mesh=mesh)
              for split in ("validation", "test")}
    steps, batch = int(state.step), config["train_config"]["batch_size"]
    card = {
        **{k: v for k, v in config.items() if k != "init_from"},
        "init_from": config["init_from"],
        "training_command": history[-1]["command"] if history else "",
        "training_history": history,
        "split": "trained on MNIST training images 0..54999; validation 55000..59999; test read once, here",
        "steps": steps,
        "planned_steps": config["train_config"]["steps"],
        "epochs": round((steps - config["init_step"]) * batch / 55000, 2),
        "wall_seconds": round(extra["wall_seconds"], 1),
        "hardware": f"{mesh.size} x {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()},"
                    f" {os.cpu_count()} cores)",
        "averaging": "Polyak average (ema)" if config["train_config"]["ema"] > 0 else "last step",
        "val_bpd": round(scores["validation"]["bpd"], 5),
        "val_bpd_stderr": round(scores["validation"]["bpd_stderr"], 5),
        "test_bpd": round(scores["test"]["bpd"], 5),
        "test_bpd_stderr": round(scores["test"]["bpd_stderr"], 5),
        "test_images": scores["test"]["images"],
        "test_bpd_first256": round(float(scores["test"]["per_image"][:256].mean()), 5),
        "evaluation": f"{config['model_config'].get('dequantization', 'uniform')} dequantization (one sample per "
                      f"image, K = 1) with the run's eval key, python -m experiments.evaluate_flow --model "
                      f"{name if directory == pretrained.SHIPPED_DIR else directory / f'{name}.msgpack'}",
        "parameters": int(sum(x.size for x in jax.tree.leaves(state.ema_params))),
        "validation_curve": validation_curve(workdir / layout.METRICS),
    }
    if (workdir / layout.INIT_CARD).exists():  # the card of the weights this run started from
        card["initialized_from"] = json.loads((workdir / layout.INIT_CARD).read_text())
        before = card["initialized_from"]
        card["total_wall_seconds"] = round(card["wall_seconds"] + before.get("total_wall_seconds",
                                                                             before.get("wall_seconds", 0)), 1)
        card["total_epochs"] = round(card["epochs"] + before.get("total_epochs", before.get("epochs", 0)), 2)
    if distributed.is_main():
        path = pretrained.export(state.ema_params, card, name, directory)
        print(json.dumps({"exported": str(path), "val_bpd": card["val_bpd"], "test_bpd": card["test_bpd"],
                          "steps": card["steps"], "eval_seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
