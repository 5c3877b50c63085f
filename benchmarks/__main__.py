"""jaxdnn against its peers, same machine, one run.

    python -m benchmarks [--quick] [--only NAME[,NAME...]] [--json] [--out FILE]

Cases: gamblers_ruin (paths/s; peers: pure-Python loop, vectorized NumPy), sgd_tricks
(iterations/s; peer: course-style PyTorch loop), inpainting (images/s; peers: PyTorch one
image at a time, and batched), flow_train_step (images/s; peer: the same RealNVP in
PyTorch; without --quick also our RealNVP with variational dequantization, its cost).
Each case: warm-up, compile time measured separately, `jax.block_until_ready`,
median/min/max of >= 5 timed runs, the peers timed in the same invocation, ratios
jaxdnn / peer (higher is better).
A missing optional peer (torch not installed: `pip install -e '.[bench]'`) is reported as
missing; a peer that fails is reported with its error and the command exits 1.

--quick: smaller workloads (under 2 minutes on a 2-core CPU), still >= 5 timed runs.
--json: print the JSON report on stdout (progress goes to stderr).
--out FILE: write the JSON report atomically to FILE and a markdown table to FILE.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxdnn import one_cpu_device_per_core

one_cpu_device_per_core()  # as experiments.gamblers_ruin: the sharded paths use every core

# jaxdnn's XLA:CPU flags must be in XLA_FLAGS before JAX starts its backend
import jaxdnn  # noqa: E402, F401
from benchmarks import harness  # noqa: E402
from benchmarks.cases import CASES  # noqa: E402

PROG = "python -m benchmarks"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small workloads (< 2 min on 2 CPUs)")
    ap.add_argument("--only", metavar="NAME",
                    help=f"comma-separated cases to run, from {', '.join(CASES)}")
    ap.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    ap.add_argument("--out", metavar="FILE", type=Path,
                    help="write the JSON report to FILE and a markdown table to FILE.md")
    args = ap.parse_args(argv)
    names = list(CASES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in CASES]
        if unknown or not names:
            ap.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    args.names = names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.device_info()
    harness.log(f"{PROG}{' --quick' if args.quick else ''}: backend {device['backend']}, "
                f"{device['device_count']} x {device['device_kind']}, {device['cpu_count']} CPUs, "
                f"jax {device['jax']} / jaxlib {device['jaxlib']} / flax {device['flax']}, "
                f"torch {device['torch'] or 'not installed'}")
    cases = []
    for name in args.names:
        try:
            case = CASES[name](args.quick)
        except Exception as e:  # noqa: BLE001 - report the failure, keep the other cases
            import traceback

            traceback.print_exc()
            case = {"name": name, "unit": "", "jaxdnn": {"error": f"{type(e).__name__}: {e}"},
                    "peers": {}}
        cases.append(harness.with_ratios(case))
        harness.log("  " + ", ".join(
            f"{k}: {v:.2f}x" if v is not None else f"{k}: missing"
            for k, v in case["ratios"].items()))
    report = {"device": device, "cases": cases}
    if args.out is not None:
        harness.write_report(report, args.out)
        harness.log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(harness.markdown(report), end="")
    failed = [c["name"] for c in cases if "median" not in c["jaxdnn"]]
    failed += [f"{c['name']}/{name}" for c in cases for name, peer in c["peers"].items()
               if str(peer.get("missing", "")).startswith("error")]
    if failed:
        harness.log(f"{PROG}: error: failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
