"""Problem 6: SGD with the log-derivative and the reparameterization tricks.

    python -m experiments.sgd_tricks [--init-mu M --init-sigma S --iterations N --lr LR
                                      --batch B --seeds K] [--json] [--out DIR]

Runs both estimators over K seeds from (M, S), reports the Polyak-Ruppert averaged
final iterates (mean and std over seeds), the exact minimum of the basin reached,
the exact local and global minima, and the per-sample gradient variance (trace of
the covariance in (mu, tau)) of every estimator/baseline at the start and at the
optimum. Writes `sgd_tricks_trajectories.png` into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from experiments.common import ArgumentParser, save_figure

PROG = "python -m experiments.sgd_tricks"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--init-mu", type=float, default=0.0, help="start mu (default 0)")
    p.add_argument("--init-sigma", type=float, default=1.0, help="start sigma > 0 (default 1)")
    p.add_argument("--iterations", type=int, default=500, help="SGD steps (default 500)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 1e-2)")
    p.add_argument("--batch", type=int, default=16, help="samples per step (default 16)")
    p.add_argument("--seeds", type=int, default=20, help="independent runs (default 20)")
    p.add_argument("--baseline", default="none",
                   choices=("none", "moving_average", "rloo", "optimal"),
                   help="baseline of the log-derivative runs (default none, the course's)")
    p.add_argument("--average-from", type=int, default=None,
                   help="Polyak-Ruppert average of the iterates after this step "
                        "(default: the last 20%% of the run)")
    p.add_argument("--no-average", action="store_true", help="report the last iterates")
    p.add_argument("--variance-samples", type=int, default=1 << 24,
                   help="samples for the variance table, a multiple of 2^20 (default 2^24)")
    p.add_argument("--seed", type=int, default=0, help="master PRNG seed (default 0)")
    p.add_argument("--out", default="results", help="figure directory (default results/)")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = p.parse_args(argv)
    if not math.isfinite(a.init_mu):
        p.error(f"--init-mu must be finite, got {a.init_mu}")
    if not (math.isfinite(a.init_sigma) and a.init_sigma > 0):
        p.error(f"--init-sigma must be positive, got {a.init_sigma}")
    if a.iterations < 1:
        p.error(f"--iterations must be >= 1, got {a.iterations}")
    if not (math.isfinite(a.lr) and a.lr > 0):
        p.error(f"--lr must be positive, got {a.lr}")
    if a.batch < 1:
        p.error(f"--batch must be >= 1, got {a.batch}")
    if a.baseline in ("rloo", "optimal") and a.batch < 2:
        p.error(f"--baseline {a.baseline} needs --batch >= 2, got {a.batch}")
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    if a.average_from is None:
        a.average_from = (4 * a.iterations) // 5
    if a.no_average:
        a.average_from = None
    elif not 0 <= a.average_from < a.iterations:
        p.error(f"--average-from must be in [0, {a.iterations}), got {a.average_from}")
    chunk = 1 << 20
    if a.variance_samples < chunk or a.variance_samples % chunk:
        p.error(f"--variance-samples must be a positive multiple of {chunk}, "
                f"got {a.variance_samples}")
    if not a.no_plot:
        try:
            Path(a.out).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"--out: cannot create {a.out!r}: {e.strerror}")
    return a


def plot(path: Path, runs: dict, exact: dict, start: tuple[float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from jaxdnn import sgd_tricks

    pts = [np.array([start]), np.array([[p.mu, p.sigma] for p in exact.values()])]
    for r in runs.values():
        tr = np.asarray(r.trajectory)
        pts.append(np.stack([tr[..., 0].ravel(), np.exp(tr[..., 1]).ravel()], 1))
    allp = np.concatenate(pts)
    lo, hi = allp.min(0), allp.max(0)
    pad = 0.15 * (hi - lo) + 0.2
    mus = np.linspace(lo[0] - pad[0], hi[0] + pad[0], 300)
    sigmas = np.linspace(max(lo[1] - pad[1], 0.05), hi[1] + pad[1], 300)
    M, S = np.meshgrid(mus, sigmas)
    J = np.asarray(sgd_tricks.objective(M, S))

    fig, ax = plt.subplots(figsize=(7, 5.5))
    levels = np.quantile(J, np.linspace(0.0, 0.9, 30))
    cs = ax.contour(M, S, J, levels=np.unique(levels), cmap="viridis", linewidths=0.7)
    fig.colorbar(cs, ax=ax, label="J(mu, sigma)")
    colors = {"log_derivative": "tab:red", "reparameterization": "tab:blue"}
    for name, r in runs.items():
        tr = np.asarray(r.trajectory)
        for s in range(tr.shape[0]):
            ax.plot(tr[s, :, 0], np.exp(tr[s, :, 1]), color=colors[name], lw=0.4, alpha=0.25)
        ax.plot(tr[0, :, 0], np.exp(tr[0, :, 1]), color=colors[name], lw=1.2,
                label=f"{name} (seed 0; faint: all seeds)")
        avg = np.asarray(r.averaged)
        ax.scatter(avg[:, 0], np.exp(avg[:, 1]), s=8, color=colors[name], zorder=4,
                   label=f"{name}: averaged final iterates")
    marker = dict(zorder=5, markeredgecolor="white", linestyle="none")
    ax.plot(*start, "ko", label="start", **marker)
    ax.plot(exact["local"].mu, exact["local"].sigma, "k^", ms=10, **marker,
            label=f"local min ({exact['local'].mu:.4f}, {exact['local'].sigma:.4f})")
    ax.plot(exact["global"].mu, exact["global"].sigma, "k*", ms=15, **marker,
            label=f"global min ({exact['global'].mu:.4f}, {exact['global'].sigma:.4f})")
    ax.plot(exact["saddle"].mu, exact["saddle"].sigma, "kX", ms=10, label="saddle", **marker)
    ax.set_xlabel("mu")
    ax.set_ylabel("sigma")
    ax.set_title("SGD on E[X sin X] + (mu-1)^2/2 + sigma - log sigma")
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)


def run(a: argparse.Namespace) -> tuple[dict, dict]:
    import jax
    import numpy as np
    from tqdm import tqdm

    from jaxdnn import sgd_tricks

    key = jax.random.key(a.seed)
    k_sgd, k_var = jax.random.split(key)
    t0 = time.perf_counter()
    exact = sgd_tricks.exact_points()
    init_tau = math.log(a.init_sigma)
    runs, report = {}, {}
    for i, name in enumerate(tqdm(sgd_tricks.ESTIMATORS, desc="sgd", file=sys.stderr,
                                  disable=None)):
        r = sgd_tricks.run_seeds(
            jax.random.fold_in(k_sgd, i), a.seeds, name,
            init_mu=a.init_mu, init_tau=init_tau, lr=a.lr, batch=a.batch,
            iterations=a.iterations, average_from=a.average_from,
            baseline=a.baseline if name == "log_derivative" else "none",
        )
        runs[name] = r
        avg = np.asarray(r.averaged, np.float64)
        if not np.all(np.isfinite(avg)):
            raise FloatingPointError(f"{name}: SGD diverged (try a smaller --lr)")
        mu, sigma = avg[:, 0], np.exp(avg[:, 1])
        values = np.asarray(sgd_tricks.objective(mu, sigma))
        basin = sgd_tricks.basin_minimum(float(mu.mean()), float(sigma.mean()))
        ends = sgd_tricks.basin_minima(np.stack([mu, sigma], 1))
        dist = np.hypot(mu - basin.mu, sigma - basin.sigma)
        report[name] = {
            "mu": float(mu.mean()), "sigma": float(sigma.mean()), "value": float(values.mean()),
            "mu_std": float(mu.std(ddof=1)) if a.seeds > 1 else 0.0,
            "sigma_std": float(sigma.std(ddof=1)) if a.seeds > 1 else 0.0,
            "basin": _which(basin, exact),
            "basin_minimum": basin.as_dict(),
            "distance_of_mean": float(math.hypot(mu.mean() - basin.mu,
                                                 sigma.mean() - basin.sigma)),
            "mean_distance": float(dist.mean()),
            "seeds_per_basin": _count_basins(ends, exact),
        }
    # Variance at the start and at the minimum the reparameterization runs reached.
    opt = sgd_tricks.basin_minimum(report["reparameterization"]["mu"],
                                   report["reparameterization"]["sigma"])
    chunks = a.variance_samples >> 20
    variance: dict[str, dict[str, float]] = {}
    with tqdm(total=2 * chunks, desc="variance", file=sys.stderr, disable=None) as bar:
        points = (("start", (a.init_mu, a.init_sigma)), ("optimum", (opt.mu, opt.sigma)))
        for i, (where, (m, s)) in enumerate(points):
            v = sgd_tricks.gradient_variances(jax.random.fold_in(k_var, i), m, s,
                                              num_samples=a.variance_samples,
                                              progress=lambda: bar.update(1))
            for name, value in v.items():
                variance.setdefault(name, {})[where] = value
    result = {
        "exact": {name: p.as_dict() for name, p in exact.items()},
        **report,
        "variance": variance,
        "settings": {
            "init_mu": a.init_mu, "init_sigma": a.init_sigma, "iterations": a.iterations,
            "lr": a.lr, "batch": a.batch, "seeds": a.seeds, "baseline": a.baseline,
            "average_from": a.average_from, "variance_samples": a.variance_samples,
            "variance_optimum": opt.as_dict(),
        },
        "seconds": time.perf_counter() - t0,
    }
    return result, runs | {"_exact": exact}


def _which(p, exact) -> str:
    for name in ("local", "global"):
        if math.hypot(p.mu - exact[name].mu, p.sigma - exact[name].sigma) < 1e-3:
            return name
    return "other"


def _count_basins(points, exact) -> dict[str, int]:
    counts = {"local": 0, "global": 0, "other": 0}
    for p in points:
        counts[_which(p, exact)] += 1
    return counts


def summary(r: dict) -> str:
    ex, st = r["exact"], r["settings"]
    lines = [
        f"Problem 6: SGD from (mu, sigma) = ({st['init_mu']:g}, {st['init_sigma']:g}), "
        f"lr {st['lr']:g}, batch {st['batch']}, {st['iterations']} iterations, "
        f"{st['seeds']} seeds, "
        + ("last iterates" if st["average_from"] is None
           else f"Polyak-Ruppert average after step {st['average_from']}"),
        "",
        "exact stationary points of J (closed form, L-BFGS + Newton):",
    ]
    for name in ("local", "global", "saddle"):
        p = ex[name]
        kind = {"local": "local minimum (NOT the global one)", "global": "global minimum",
                "saddle": "saddle"}[name]
        lines.append(f"  {kind:36s} mu={p['mu']:.6f} sigma={p['sigma']:.6f} J={p['value']:.6f}")
    lines.append("")
    lines.append(f"  {'estimator':20s} {'mu':>17s} {'sigma':>17s} {'J':>9s}  basin   "
                 f"|mean-min| mean|run-min|  seeds local/global/other")
    for name in ("log_derivative", "reparameterization"):
        e = r[name]
        c = e["seeds_per_basin"]
        lines.append(
            f"  {name:20s} {e['mu']:.4f} +- {e['mu_std']:.4f} {e['sigma']:.4f} +- "
            f"{e['sigma_std']:.4f} {e['value']:9.6f}  {e['basin']:6s}  {e['distance_of_mean']:.4f}"
            f"     {e['mean_distance']:.4f}        {c['local']}/{c['global']}/{c['other']}"
        )
    reached = {r[n]["basin"] for n in ("log_derivative", "reparameterization")}
    if "local" in reached:
        g = ex["global"]
        lines.append(f"  note: the runs stop at a LOCAL minimum; the global minimum is at "
                     f"mu={g['mu']:.6f}, sigma={g['sigma']:.6f} (J={g['value']:.6f})")
    o = st["variance_optimum"]
    lines += [
        "",
        f"per-sample gradient variance of the E[X sin X] term, trace of Cov in (mu, tau), "
        f"{st['variance_samples']} samples;",
        f"  start = ({st['init_mu']:g}, {st['init_sigma']:g}), "
        f"optimum = ({o['mu']:.4f}, {o['sigma']:.4f}):",
    ]
    for name, v in r["variance"].items():
        lines.append(f"  {name:34s} start {v['start']:7.3f}   optimum {v['optimum']:7.3f}")
    lines.append(f"({r['seconds']:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        result, runs = run(a)
        if not a.no_plot:
            exact = runs.pop("_exact")
            path = Path(a.out) / "sgd_tricks_trajectories.png"
            plot(path, runs, exact, (a.init_mu, a.init_sigma))
            result["figure"] = str(path)
    except (FloatingPointError, OSError) as e:  # one line, no traceback
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 1
    if a.json:
        print(json.dumps(result))
    else:
        print(summary(result))
        if "figure" in result:
            print(f"figure: {result['figure']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
