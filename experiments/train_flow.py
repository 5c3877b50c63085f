"""Train a flow on MNIST: `python -m experiments.train_flow --model realnvp [--config.K=V ...]`.

Rerunning the same command resumes from the workdir's checkpoint with the same data order and
keys. Writes metrics.jsonl, checkpoint.msgpack, final.json and loss_curve.png to the workdir.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from experiments.common import ArgumentParser, fail, parse_overrides, save_figure
from jaxdnn import train
from jaxdnn.config import Field, check_config
from jaxdnn.data import batches, load_mnist
from jaxdnn.flows import MODELS, build_model, config_schema

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
    prog = "python -m experiments.train_flow"
    parser = ArgumentParser(prog=prog, description=__doc__)
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
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest, prog)
    if args.init_from is not None:
        model_cfg_from = shipped_model_config(args.model, args.init_from, overrides, prog)
        overrides = {**model_cfg_from, **overrides}
    model_cfg, cfg = split_config(args.model, overrides, prog)
    workdir = Path(args.workdir or f"runs/{args.model}")
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = workdir / "checkpoint.msgpack", workdir / "metrics.jsonl"
    config = {"model": args.model, "model_config": model_cfg, "train_config": cfg}
    if (workdir / "config.json").exists():
        old = json.loads((workdir / "config.json").read_text())
        if old["model"] != args.model or old["model_config"] != model_cfg:
            fail(prog, f"{workdir} holds a run of another model/config; use a new --workdir")
    (workdir / "config.json").write_text(json.dumps(config, indent=2))

    try:
        train_images, _ = load_mnist("train")
        test_images, _ = load_mnist("test")
    except (FileNotFoundError, ValueError) as e:
        fail(prog, str(e))

    model = build_model(args.model, **model_cfg)
    optimizer = train.make_optimizer(cfg["lr"], cfg["steps"], cfg["warmup"], cfg["clip"])
    keys = train.run_keys(cfg["seed"])
    k_init, k_data, k_step, k_eval = keys["init"], keys["data"], keys["step"], keys["eval"]
    mesh = train.data_mesh()
    if cfg["batch_size"] % mesh.size:
        fail(prog, f"batch_size {cfg['batch_size']} must be a multiple of the {mesh.size} devices")

    init_batch = train_images[np.random.default_rng(cfg["seed"]).permutation(len(train_images))[:512]]
    t0 = time.time()
    state = train.init_state(model, k_init, init_batch, optimizer)
    wall = 0.0
    if ckpt_path.exists():
        state, extra = train.load_checkpoint(ckpt_path, state)
        wall = extra.get("wall_seconds", 0.0)
        start = int(state.step)
        kept = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start]
        log_path.write_text("".join(ln + "\n" for ln in kept))
        print(f"resumed {workdir} at step {start}", file=sys.stderr)
    else:
        log_path.write_text("")
        if args.init_from is not None:
            from jaxdnn import pretrained

            state = state._replace(params=pretrained.load(args.init_from)[1])
            print(f"initialized from the shipped {args.init_from} (test bpd "
                  f"{pretrained.card(args.init_from)['test_bpd']})", file=sys.stderr)
    if args.export:
        return export(args.model, workdir, state, model, test_images, k_eval, mesh, config, wall, rest)
    record_stage(workdir / "history.jsonl", argv, int(state.step), cfg["steps"])
    state = train.replicate(state, mesh)
    step_fn = train.make_train_step(model, optimizer)
    eval_fn = train.make_eval_fn(model)
    print(f"{args.model}: {sum(x.size for x in jax.tree.leaves(state.params)):,} parameters, "
          f"init {time.time() - t0:.1f}s, devices {mesh.size} x {jax.devices()[0].platform}",
          file=sys.stderr)

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))

    def checkpoint():
        train.save_checkpoint(ckpt_path, state, {"wall_seconds": wall})

    def log(row):
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    start = int(state.step)
    last_ckpt, t_last = time.time(), time.time()
    running = []
    bar = tqdm(total=cfg["steps"], initial=start, disable=args.quiet, dynamic_ncols=True,
               desc=args.model)
    for step, batch in batches(k_data, train_images, cfg["batch_size"], start_step=start):
        if step >= cfg["steps"] or stop["now"] or (args.stop_after is not None and step - start >= args.stop_after):
            break
        state, metrics = step_fn(state, train.shard_batch(batch, mesh), k_step)
        done = step + 1
        if done % cfg["log_every"] == 0 or done == cfg["steps"]:
            bpd = float(metrics["bpd"])
            running.append(bpd)
            now = time.time()
            wall += now - t_last
            t_last = now
            row = {"step": done, "train_bpd": float(np.mean(running[-10:])),
                   "grad_norm": float(metrics["grad_norm"]), "skipped": int(state.skipped),
                   "wall_seconds": round(wall, 1)}
            if done % cfg["eval_every"] == 0:
                bpds = train.evaluate_bpd(eval_fn, state.params, test_images[: cfg["eval_images"]],
                                          k_eval, mesh=mesh)
                row["test_bpd"] = float(bpds.mean())
            log(row)
            bar.set_postfix(bpd=f"{row['train_bpd']:.3f}",
                            **({"test": f"{row['test_bpd']:.3f}"} if "test_bpd" in row else {}))
            if int(state.bad_streak) > cfg["max_bad_streak"]:
                checkpoint()
                fail(prog, f"{int(state.bad_streak)} consecutive non-finite updates at step {done};"
                     " lower --config.lr or raise --config.clip")
        bar.update(1)
        if time.time() - last_ckpt > 60 * cfg["checkpoint_minutes"]:
            checkpoint()
            last_ckpt = time.time()
    bar.close()
    wall += time.time() - t_last
    checkpoint()
    if int(state.step) < cfg["steps"]:
        print(f"stopped at step {int(state.step)}; rerun the same command to resume",
              file=sys.stderr)
        return 0
    bpds = train.evaluate_bpd(eval_fn, state.params, test_images, k_eval, mesh=mesh)
    mean, stderr = train.mean_and_stderr(bpds)
    final = {**config, "steps": int(state.step), "wall_seconds": round(wall, 1),
             "test_bpd": mean, "test_bpd_stderr": stderr, "skipped_updates": int(state.skipped),
             "devices": f"{mesh.size} x {jax.devices()[0].device_kind}"}
    (workdir / "final.json").write_text(json.dumps(final, indent=2))
    plot_curve(log_path, workdir / "loss_curve.png", f"{args.model} on MNIST")
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


def record_stage(path: Path, argv, start: int, steps: int) -> None:
    """Appends this invocation to the workdir's history (a run extended with a larger
    --config.steps restarts its cosine schedule from the resumed step)."""
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.exists() else []
    rows = [r for r in rows if r["from_step"] <= start]
    if not rows or rows[-1]["steps"] != steps:  # otherwise a plain resume of the last stage
        rows.append({"command": command_line(argv), "from_step": start, "steps": steps})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def export(name, workdir, state, model, test_images, key, mesh, config, wall, overrides) -> int:
    import platform

    from jaxdnn import pretrained

    if int(state.step) == 0:
        fail("python -m experiments.train_flow", f"no checkpoint in {workdir} to export")
    hist_path = workdir / "history.jsonl"
    history = [json.loads(ln) for ln in hist_path.read_text().splitlines() if ln] if hist_path.exists() else []
    t0 = time.time()
    bpds = train.evaluate_bpd(train.make_eval_fn(model), state.params, test_images, key, mesh=mesh)
    mean, stderr = train.mean_and_stderr(bpds)
    card = {
        **config,
        "training_command": history[-1]["command"] if history else command_line([f"--model={name}", *overrides]),
        "training_history": history,
        "steps": int(state.step),
        "planned_steps": config["train_config"]["steps"],
        "wall_seconds": round(wall, 1),
        "hardware": f"{mesh.size} x {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()},"
                    f" {__import__('os').cpu_count()} cores)",
        "test_bpd": round(mean, 5),
        "test_bpd_stderr": round(stderr, 5),
        "test_images": len(test_images),
        "test_bpd_first256": round(float(bpds[:256].mean()), 5),
        "evaluation": "uniform dequantization with a fixed key, python -m experiments.evaluate_flow --model " + name,
        "parameters": int(sum(x.size for x in jax.tree.leaves(state.params))),
    }
    path = pretrained.export(state.params, card, name)
    print(json.dumps({"exported": str(path), "test_bpd": card["test_bpd"], "steps": card["steps"],
                      "eval_seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
