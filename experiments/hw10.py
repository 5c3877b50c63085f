"""The main job: `python -m experiments.hw10 [--out results] [--fast]` reproduces the whole
problem set into `--out`: report.md (a worked solution), summary.json (every number) and the
figures. Each part runs its experiment script with `--json`, so every number here is what
`python -m experiments.<name> ... --json` prints. The results directory is built beside the
target and swapped in at the end: an interrupted run never leaves it half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from experiments.common import ArgumentParser, fail, save_figure

POSTERIOR_IMAGES = {False: "0:8", True: "0:1"}
IMAGES_DEFAULT, IMAGES_FAST = "0:10", "0:2"  # P3: the 10 images its figures show (README: 100-image table)
P3_MASKS = ("hw10", "top_half", "center")
P3_METHODS = ("pgd", "annealed", "latent_map", "latent")  # the course's method, pixel vs latent space
COST = {"p3_glow": 4, "p3_posterior_realnvp": 3.5, "p3_realnvp": 3, "p1_vae_reparameterization": 2,
        "p1_vae_log_derivative": 2}  # longest first


def parts(fast: bool) -> list[tuple[str, str, list[str]]]:
    """(key, module, arguments) of every experiment run, the course's settings unless --fast."""
    vae_epochs = ["--epochs", "1", "--train-size", "2000", "--test-size", "500", "--iwae-samples", "10"] if fast \
        else ["--epochs", "20", "--iwae-samples", "100"]
    sgd = ["--seeds", "4", "--variance-samples", str(1 << 20)] if fast else ["--seeds", "20"]
    images = IMAGES_FAST if fast else IMAGES_DEFAULT
    runs = [
        ("p1_vae_reparameterization", "vae", ["--estimator", "reparameterization", *vae_epochs]),
        ("p1_vae_log_derivative", "vae", ["--estimator", "log_derivative", *vae_epochs]),
        ("p4_logdet", "glow_logdet", ["--quick"] if fast else ["--layers-only"]),
        ("p5_constant_q055", "gamblers_ruin", ["--proposal", "constant", "--q", "0.55", "--sweep"]),
        ("p5_optimal_q", "gamblers_ruin", ["--proposal", "optimal"]),
        ("p5_state_tilt", "gamblers_ruin", ["--proposal", "state"]),
        ("p6_from_0_1", "sgd_tricks", ["--init-mu", "0", "--init-sigma", "1", *sgd]),
        ("p6_from_2_2", "sgd_tricks", ["--init-mu", "2", "--init-sigma", "2", *sgd]),
    ]
    masks = ["hw10"] if fast else list(P3_MASKS)
    steps = ["--steps", "3"] if fast else []  # fast: a few steps of each method (a smoke run)
    for model in ("realnvp",) if fast else ("realnvp", "glow"):  # one process a model: shared compilations
        runs.append((f"p3_{model}", "inpaint", ["--model", model, "--mask", ",".join(masks),
                                               "--method", ",".join(P3_METHODS), "--images", images, *steps]))
    # the flow's own posterior (HMC at T = 1) on test digits with the center missing, beside two ensembles
    sampler = ["--chains", "4", "--warmup", "4", "--draws", "2", "--leapfrog", "2"] if fast else ["--chains", "16"]
    runs.append(("p3_posterior_realnvp", "inpaint_posterior", ["--model", "realnvp", "--mask", "center", "--split",
                                                              "test", "--images", POSTERIOR_IMAGES[fast], *sampler]))
    return runs


def run_part(module: str, args: list[str], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", f"experiments.{module}", *args, "--out", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        return {"error": f"exit {proc.returncode}: {tail[0]}", "command": " ".join(cmd[1:])}
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    printed = {"results": printed} if isinstance(printed, list) else printed
    return {**printed, "command": _command(module, args)}


def _command(module, args):
    return " ".join(["python -m experiments." + module, *args, "--json"])


def problem2(out: Path) -> dict:
    """P2: projected gradient on f(x) = ||x - c||^2 / 2 over C = {x1 = a, 0 <= x2 <= 1}."""
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np

    from jaxdnn.projection import problem2_minimizer, problem2_projection, projected_gradient

    a, c, x0 = 0.5, jnp.array([2.0, 1.7]), jnp.array([-1.0, -0.5])
    project = problem2_projection(a)
    result = projected_gradient(lambda x: 0.5 * jnp.sum((x - c) ** 2), project, project(x0), 0.3, 25,
                                return_trajectory=True)
    exact = problem2_minimizer(c, a)
    path = np.asarray(result.trajectory)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([a, a], [0, 1], lw=6, alpha=0.3, color="tab:green", label="C = {x1 = a, 0 <= x2 <= 1}")
    ax.plot(*path.T, "o-", ms=3, label="iterates x_k")
    ax.plot(*np.asarray(x0), "kx", label="x0 (projected first)")
    ax.plot(*np.asarray(c), "r*", ms=12, label="unconstrained minimizer c")
    ax.plot(*np.asarray(exact), "gs", ms=8, mfc="none", label="Pi_C(c), the constrained minimizer")
    ax.set(xlabel="x1", ylabel="x2", title="Problem 2: projected gradient, step 0.3")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_aspect("equal")
    save_figure(fig, out / "p2_projected_gradient.png")
    return {"a": a, "c": np.asarray(c).tolist(), "x_final": np.asarray(result.x).tolist(),
            "exact_minimizer": np.asarray(exact).tolist(),
            "abs_error": float(jnp.abs(result.x - exact).max()), "iterations": 25, "step": 0.3,
            "figure": "p2_projected_gradient.png"}


def main(argv=None) -> int:
    prog = "python -m experiments.hw10"
    parser = ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--out", default="results", help="results directory (default results/)")
    parser.add_argument("--fast", action="store_true",
                        help="small settings (used by a test): about 2 minutes on a 2-core CPU (120 s measured "
                             "with another job running)")
    parser.add_argument("--jobs", type=int, default=2, help="parts run at a time (default 2)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    from jaxdnn.data import default_data_dir, load_mnist

    try:
        load_mnist("test")
    except (FileNotFoundError, ValueError) as e:
        fail(prog, f"{e} (data dir {default_data_dir()})")

    target = Path(args.out)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    t0 = time.time()
    summary = {"fast": args.fast, "parts": {}}
    runs = parts(args.fast)
    bar = tqdm(total=len(runs) + 1, desc="hw10", file=sys.stderr)
    bar.set_postfix_str("p2_projected_gradient")
    summary["parts"]["p2_projected_gradient"] = problem2(staging)
    bar.update(1)
    results = {}

    def run(item):
        key, module, extra = item
        t = time.time()
        result = run_part(module, extra, staging / key)
        result["figures"] = sorted(str(f.relative_to(staging)) for f in (staging / key).glob("*.png"))
        return key, module, result, round(time.time() - t, 1)

    # Parts are separate processes: `--jobs` of them at a time overlap one's compilation (single-threaded)
    # with another's computation; each part's numbers are the same whatever runs beside it.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run, r) for r in sorted(runs, key=lambda r: -COST.get(r[0], 0))]
        for future in as_completed(futures):
            key, module, result, wall = future.result()
            results[key] = (module, result, wall)
            bar.set_postfix_str(key)
            bar.update(1)
    for key, _, _ in runs:  # the summary lists the parts in the order of `parts`, however they finished
        module, result, wall = results[key]
        if module == "inpaint" and "error" not in result:  # one entry per (mask, method)
            for r in result.pop("results"):
                # figures are named inpaint_<model>_<mask>_<methods>[_<options>].png
                r["figures"] = [f for f in result["figures"] if f"_{r['mask']}_" in Path(f).name]
                summary["parts"][f"{key}_{r['mask']}_{r['method']}"] = {**r, "command": result["command"],
                                                                      "wall_seconds": round(r["seconds"], 1)}
        else:
            summary["parts"][key] = {**result, "wall_seconds": wall}
    bar.close()
    summary["wall_seconds"] = round(time.time() - t0, 1)
    (staging / "summary.json").write_text(json.dumps(summary, indent=2))
    from experiments.hw10_report import write_report

    write_report(summary, staging)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    errors = [k for k, v in summary["parts"].items() if "error" in v]
    print(f"wrote {target}/report.md and summary.json in {summary['wall_seconds']} s"
          + (f"; FAILED parts: {errors}" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
