"""Train a flow on MNIST: `python -m experiments.train_flow --model realnvp [--config.K=V ...]`.

A thin CLI over `jaxdnn.trainer.train_and_evaluate`. Rerunning the same command resumes from the
workdir's latest orbax checkpoint with the same data order and keys; `--coordinator ...` runs it
on several processes (README "More than one process"). Writes config.json, history.jsonl,
metrics.jsonl, checkpoints/, final.json and loss_curve.png to the workdir.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import ArgumentParser, fail, parse_overrides, save_figure
from jaxdnn import distributed
from jaxdnn.config import Field, check_config
from jaxdnn.flows import MODELS, config_schema

PROG = "python -m experiments.train_flow"
TRAIN_DEFAULTS = dict(
    batch_size=64, lr=1e-3, steps=5000, warmup=300, clip=100.0, seed=0,
    eval_every=1000, eval_images=2000, log_every=50, checkpoint_minutes=3.0, max_bad_streak=100,
)


TRAIN_SCHEMA = {k: Field(type(v), v) for k, v in TRAIN_DEFAULTS.items()}


def split_config(model_name: str, overrides: dict, prog: str) -> tuple[dict, dict]:
    """(model config, training config) from `--config.KEY=VALUE` overrides, both typed and
    checked: a bad key, type or value exits 2 with one line."""
    model_schema = config_schema(model_name)
    try:
        cfg = check_config(f"--config ({model_name})", {**model_schema, **TRAIN_SCHEMA}, overrides)
    except ValueError as e:
        fail(prog, str(e))
    return ({k: v for k, v in cfg.items() if k in model_schema},
            {k: v for k, v in cfg.items() if k not in model_schema})


def plot_curve(log_path: Path, out: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["train_bpd"]) for r in rows if "train_bpd" in r]
    te = [(r["step"], r["test_bpd"]) for r in rows if "test_bpd" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr, strict=True), lw=0.8, label="train (running mean)")
    if te:
        ax.plot(*zip(*te, strict=True), "o-", label="test")
    ax.set(xlabel="step", ylabel="bits/dim", title=title)
    if tr:
        ax.set_ylim(min(v for _, v in tr + te) - 0.05, np.percentile([v for _, v in tr], 95) + 0.1)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out)


def main(argv=None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--workdir", default=None, help="default runs/<model>")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop (with a checkpoint) after N steps of this invocation, as if killed")
    parser.add_argument("--init-from", default=None, metavar="NAME",
                        help="start from the shipped model NAME's weights (its model config) with a fresh "
                             "optimizer and warm-up; ignored when the workdir holds a checkpoint")
    parser.add_argument("--export", action="store_true",
                        help="do not train: evaluate the workdir's checkpoint on the full test set and ship it "
                             "as jaxdnn/pretrained/<model>.msgpack with its card")
    parser.add_argument("--export-dir", default=None, metavar="DIR",
                        help="with --export: write <model>.msgpack and .json here instead of the package")
    distributed.add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest, PROG)
    if args.init_from is not None:
        overrides = {**shipped_model_config(args.model, args.init_from, overrides, PROG), **overrides}
    model_cfg, cfg = split_config(args.model, overrides, PROG)
    distributed.initialize_from_args(args, PROG)  # before anything touches a JAX backend
    from jaxdnn import trainer

    workdir = Path(args.workdir or f"runs/{args.model}")
    config = {"model": args.model, "model_config": model_cfg, "train_config": cfg, "init_from": args.init_from}
    try:
        if args.export:
            return export(config, workdir, args.export_dir)
        final = trainer.train_and_evaluate(config, workdir, stop_after=args.stop_after, progress=not args.quiet,
                                           command=command_line(argv))
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        fail(PROG, str(e))
    if final is not None and distributed.is_main():
        plot_curve(workdir / "metrics.jsonl", workdir / "loss_curve.png", f"{args.model} on MNIST")
        print(json.dumps(final))
    return 0


def shipped_model_config(model_name: str, shipped: str, overrides: dict, prog: str) -> dict:
    """The model config of the shipped model `shipped`, checked against `--model` and any
    `--config.` model keys (a shipped model's weights fit only its own architecture)."""
    from jaxdnn import pretrained

    try:
        info = pretrained.card(shipped)
    except ValueError as e:
        fail(prog, str(e))
    if info["model"] != model_name:
        fail(prog, f"--init-from {shipped} is a {info['model']}, not a {model_name}")
    clash = sorted(k for k in overrides if k in info["model_config"] and overrides[k] != info["model_config"][k])
    if clash:
        fail(prog, f"--init-from {shipped} fixes the model config; drop --config.{clash[0]}")
    return info["model_config"]


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


def export(config: dict, workdir: Path, directory: str | None = None) -> int:
    """Scores the workdir's latest checkpoint on the 10,000 test images and ships it with its card
    (a run started with --init-from nests the card it started from: every stage, its hardware and
    wall time)."""
    import platform

    import jax

    from jaxdnn import pretrained, train, trainer
    from jaxdnn.data import load_mnist

    name = config["model"]
    if not (workdir / "config.json").exists():
        fail(PROG, f"no training run in {workdir} to export")
    run = json.loads((workdir / "config.json").read_text())  # the run's own config, not this command's
    if run["model"] != name:
        fail(PROG, f"{workdir} holds a {run['model']} run, not a {name}")
    config = {**config, **run}
    model, _, state, extra, mesh = trainer.setup(config, workdir)
    if state is None:
        fail(PROG, f"no checkpoint in {workdir} to export")
    hist_path = workdir / "history.jsonl"
    history = [json.loads(ln) for ln in hist_path.read_text().splitlines() if ln] if hist_path.exists() else []
    t0 = time.time()
    eval_key = train.run_keys(config["train_config"]["seed"])["eval"]
    test = train.score(model, state.params, load_mnist("test")[0], eval_key, mesh=mesh)
    card = {
        **{k: v for k, v in config.items() if k != "init_from"},
        "training_command": history[-1]["command"] if history else "",
        "training_history": history,
        "steps": int(state.step),
        "planned_steps": config["train_config"]["steps"],
        "wall_seconds": round(extra["wall_seconds"], 1),
        "hardware": f"{mesh.size} x {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()},"
                    f" {__import__('os').cpu_count()} cores)",
        "test_bpd": round(test["bpd"], 5),
        "test_bpd_stderr": round(test["bpd_stderr"], 5),
        "test_images": test["images"],
        "test_bpd_first256": round(float(test["per_image"][:256].mean()), 5),
        "evaluation": "uniform dequantization with a fixed key, python -m experiments.evaluate_flow --model " + name,
        "parameters": int(sum(x.size for x in jax.tree.leaves(state.params))),
    }
    if (workdir / "init_card.json").exists():  # the card of the weights this run started from
        card["initialized_from"] = json.loads((workdir / "init_card.json").read_text())
        card["total_wall_seconds"] = round(card["wall_seconds"] + card["initialized_from"].get(
            "total_wall_seconds", card["initialized_from"]["wall_seconds"]), 1)
    if distributed.is_main():
        path = pretrained.export(state.params, card, name, directory)
        print(json.dumps({"exported": str(path), "test_bpd": card["test_bpd"], "steps": card["steps"],
                          "eval_seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
