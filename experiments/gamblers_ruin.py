"""Problem 5: Gambler's ruin with importance sampling.

    python -m experiments.gamblers_ruin [--start 100 --target 200 --p 18/37 --games 600
        --paths 3000 --proposal {naive,constant,optimal,state} --q 0.55 --seed 0]
        [--sweep] [--out DIR] [--json]

Prints the exact probability (dynamic programming), the estimate with its 95% confidence
interval and relative error, the exact relative error per path of the chosen proposal, and
paths per second after compilation. Proposals: naive (q = p, plain Monte Carlo), constant
(--q), optimal (the constant q of least variance: exact DP, adaptive for huge problems),
state (q(t, x) tilted toward the straight line to the target). q is simulated rounded to
k/256 and the likelihood ratio uses the rounded value, so every estimate is unbiased.
--sweep also plots relative error per path against q (exact curve, estimated points) into
DIR/gamblers_ruin_sweep.png. On CPU the paths are sharded over one XLA device per core.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from fractions import Fraction
from pathlib import Path

from experiments.common import ArgumentParser, one_cpu_device_per_core, save_figure

one_cpu_device_per_core()  # the sharded paths use every core

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxdnn import distributed  # noqa: E402
from jaxdnn import gamblers_ruin as gr  # noqa: E402

PROG = "python -m experiments.gamblers_ruin"
BITS = 8  # q is simulated as k / 2^BITS
NAIVE_BITS = 16  # q = p to within 2^-17: plain Monte Carlo up to negligible weights
DP_LIMIT = 5 * 10**7  # games * target above which "optimal" adapts q by simulation
JSON_KEYS = ("exact", "estimate", "std_error", "ci95", "relative_error",
             "relative_error_per_path_exact", "proposal", "q", "paths", "paths_per_second")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _fraction(text: str) -> float:
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected a fraction like 18/37 or a decimal, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", type=_int, default=100, help="starting balance (default 100)")
    ap.add_argument("--target", type=_int, default=200, help="target balance (default 200)")
    ap.add_argument("--p", type=_fraction, default=18 / 37,
                    help="win probability, fraction or decimal (default 18/37)")
    ap.add_argument("--games", type=_int, default=600, help="games at most (default 600)")
    distributed.add_arguments(ap)
    ap.add_argument("--paths", type=_int, default=3000, help="simulated paths (default 3000)")
    ap.add_argument("--proposal", default="constant",
                    choices=("naive", "constant", "optimal", "state"),
                    help="sampling distribution (default constant)")
    ap.add_argument("--q", type=_fraction, default=0.55,
                    help="win probability of --proposal constant (default 0.55)")
    ap.add_argument("--seed", type=_int, default=0, help="PRNG seed (default 0)")
    ap.add_argument("--sweep", action="store_true",
                    help="also plot relative error per path against q")
    ap.add_argument("--out", default="results", help="figure directory (default results/)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    if not 0 < a.p < 1:
        ap.error(f"--p must be in (0, 1), got {a.p:g}")
    if not 0 < a.q < 1:
        ap.error(f"--q must be in (0, 1), got {a.q:g}")
    if not 0 < a.start < a.target:
        ap.error(f"need 0 < --start < --target, got --start {a.start} --target {a.target}")
    if a.games < 1:
        ap.error(f"--games must be >= 1, got {a.games}")
    if a.paths < 1:
        ap.error(f"--paths must be >= 1, got {a.paths}")
    if a.seed < 0:
        ap.error(f"--seed must be >= 0, got {a.seed}")
    checks = [("--q", a.q, BITS)] + ([("--p", a.p, NAIVE_BITS)] if a.proposal == "naive" else [])
    for name, v, bits in checks:
        if not 0 < round(v * (1 << bits)) < 1 << bits:
            ap.error(f"{name} {v:g} rounds to 0 or 1 on the k/{1 << bits} grid the simulation "
                     "uses")
    return a


def _proposal(a, problem):
    """(library proposal, bits, JSON q, description, exact relative error per path)."""
    if a.proposal == "state":
        prop = gr.tilt(a.target, a.p, a.games)
        rel = gr.relative_error_per_path(prop, **problem, bits=BITS)
        return prop, BITS, None, (
            f"state tilt q(t, x) = clip((1 + ({a.target} - x)/({a.games} - t))/2, "
            f"{prop.lo:.4f}, {prop.hi}), rounded to k/{1 << BITS}"), rel
    bits = BITS
    if a.proposal == "naive":
        q, how, bits = a.p, "naive (plain Monte Carlo, q = p)", NAIVE_BITS
    elif a.proposal == "constant":
        q, how = a.q, f"constant q = {a.q:g}"
    elif gr.exact_probability(**problem) == 0:
        q, how = gr.straight_line_q(**problem), "any q (the target is unreachable)"
    elif a.games * a.target <= DP_LIMIT:
        q, _ = gr.best_constant_q(**problem, bits=BITS)
        how = "optimal constant q (exact second moment)"
    else:
        q = gr.adapt_q(jax.random.fold_in(jax.random.key(a.seed), 1), **problem, bits=BITS).q
        how = "optimal constant q (adaptive, cross-entropy)"
    k, qr = gr.quantize(q, bits)
    rel = gr.relative_error_per_path(qr, **problem)
    return qr, bits, qr, f"{how}, simulated as {k}/{1 << bits} = {qr:.8g}", rel


def _sweep(a, problem, key, out: Path) -> Path | None:
    """Relative error per path against constant q: exact curve and estimated points."""
    if gr.exact_probability(**problem) == 0.0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q_best, rel_best = gr.best_constant_q(**problem)
    naive = gr.relative_error_per_path(a.p, **problem)
    # up to where the exact error climbs back to plain Monte Carlo's
    fine = np.linspace(a.p, min(0.97, q_best + 3 * (q_best - a.p) + 0.05), 160)
    exact = np.array([gr.relative_error_per_path(q, **problem) for q in fine])
    beyond = np.nonzero((fine > q_best) & (exact > max(naive, 10.0)))[0]
    if beyond.size:
        fine, exact = fine[:beyond[0] + 1], exact[:beyond[0] + 1]
    points = []
    for i, q in enumerate(np.linspace(fine[0], fine[-1], 15)):
        qr = gr.quantize(float(q), BITS)[1]
        r = gr.estimate(jax.random.fold_in(key, 1000 + i), a.paths, qr, **problem, bits=BITS)
        if r.estimate > 0 and math.isfinite(r.relative_error):
            points.append((qr, r.relative_error * math.sqrt(a.paths)))
    state = gr.relative_error_per_path(gr.tilt(a.target, a.p, a.games), **problem, bits=BITS)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.semilogy(fine, exact, "-", color="C0", label="exact (dynamic programming)")
    if points:
        ax.semilogy(*zip(*points, strict=True), "o", color="C1",
                    label=f"estimated from {a.paths} paths")
    ax.axvline(q_best, color="0.6", ls=":", label=f"best q = {q_best:.3f} ({rel_best:.2f})")
    ax.axhline(state, color="C2", ls="--", label=f"state tilt q(t, x) ({state:.2f})")
    ax.set_xlabel("constant proposal q")
    ax.set_ylabel("relative error per path")
    ax.set_title(f"Gambler's ruin {a.start}->{a.target}, p = {a.p:.4f}, {a.games} games")
    ax.legend(fontsize=8)
    if not distributed.is_main():  # every process computed the sweep; process 0 writes it
        plt.close(fig)
        return None
    return save_figure(fig, out / "gamblers_ruin_sweep.png")


def _finite(v):
    return v if v is None or math.isfinite(v) else None


def main(argv=None) -> int:
    try:
        a = parse_args(argv)
        distributed.initialize_from_args(a, PROG)  # before anything touches a JAX backend
    except SystemExit as e:
        return int(e.code or 0)
    problem = {"start": a.start, "target": a.target, "p": a.p, "games": a.games}
    key = jax.random.key(a.seed)
    try:
        exact = gr.exact_probability(**problem)
        prop, bits, q_json, how, rel_exact = _proposal(a, problem)
        t0 = time.perf_counter()  # compile on one chunk (same program as the timed run)
        warm = min(a.paths, gr.default_chunk_size(a.paths, jax.devices()[0].platform))
        gr.estimate(jax.random.fold_in(key, 2), warm, prop, **problem, bits=bits)
        t1 = time.perf_counter()
        r = gr.estimate(key, a.paths, prop, **problem, bits=bits)
        t2 = time.perf_counter()
        figure = _sweep(a, problem, key, Path(a.out)) if a.sweep else None
    except ValueError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    pps = a.paths / max(t2 - t1, 1e-9)
    if a.json:
        out = {"exact": exact, "estimate": r.estimate, "std_error": _finite(r.std_error),
               "ci95": [r.ci95_lo, _finite(r.ci95_hi)], "relative_error":
               _finite(r.relative_error), "relative_error_per_path_exact": _finite(rel_exact),
               "proposal": a.proposal, "q": q_json, "paths": a.paths, "paths_per_second": pps}
        assert tuple(out) == JSON_KEYS
        if distributed.is_main():
            print(json.dumps(out))
        return 0
    devices = jax.devices()
    n_paths = f"{a.paths} paths"
    rows = [(f"exact P(reach {a.target})", f"{exact:.8e}  (dynamic programming)"),
            ("proposal", how),
            (f"estimate ({n_paths})", f"{r.estimate:.6e} +- {r.std_error:.2e}   95% CI "
                                      f"[{r.ci95_lo:.4e}, {r.ci95_hi:.4e}]")]
    naive_rel = math.sqrt(1 / exact - 1) if exact > 0 else math.nan
    if r.estimate > 0:
        rows += [("relative error", f"{r.relative_error:.4g} estimated, "
                                    f"{rel_exact / math.sqrt(a.paths):.4g} exact"),
                 ("relative error per path", f"{r.relative_error * math.sqrt(a.paths):.4g} "
                  f"estimated, {rel_exact:.4g} exact (plain Monte Carlo: {naive_rel:.4g})")]
    else:
        rows += [("relative error per path", f"{rel_exact:.4g} exact (plain Monte Carlo: "
                  f"{naive_rel:.4g}); none of the paths reached {a.target}")]
    rows += [("effective sample size", f"{r.ess:.1f}"),
             ("speed", f"{pps:.3g} paths/s ({t2 - t1:.3g} s; first call with compilation "
                       f"{t1 - t0:.3g} s; {len(devices)} {devices[0].platform} device(s))")]
    if exact > 0 and math.isfinite(rel_exact):
        n1 = math.ceil((rel_exact / 0.01) ** 2)
        n_naive = math.ceil((1 / exact - 1) / 0.01**2)
        if n1 <= 10**7:  # measure it, on the chunk size already compiled
            chunk = gr.default_chunk_size(a.paths, devices[0].platform)
            t3 = time.perf_counter()
            gr.estimate(jax.random.fold_in(key, 3), n1, prop, **problem, bits=bits,
                        chunk_size=chunk)
            took = f"{time.perf_counter() - t3:.2g} s measured"
        else:
            took = f"~{n1 / pps:.2g} s at this speed"
        rows.append(("1% relative error", f"{n1:.3g} paths ({took}); plain Monte Carlo "
                     f"needs {n_naive:.3g} paths"))
    if figure:
        rows.append(("sweep figure", str(figure)))
    if not distributed.is_main():
        return 0
    print(f"Gambler's ruin: start {a.start}, target {a.target}, p = {a.p:.6g}, "
          f"at most {a.games} games")
    width = max(len(k) for k, _ in rows) + 2
    for k, v in rows:
        print(f"  {k:<{width}}{v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
