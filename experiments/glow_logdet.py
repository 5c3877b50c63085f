"""Problem 4 verified: `python -m experiments.glow_logdet [--json]`.

For every layer and model (tiny configs, small random inputs) the log-det the layer reports
against slogdet of the brute-force Jacobian, plus P4 (b) reshape order, (c) the 1x1 conv
formula m n sum log|s_i|, (d) the conditional coupling."""

from __future__ import annotations

import sys

from experiments.common import ArgumentParser, print_json
from jaxdnn.flows.checks import GLOW_STEP, all_checks


def run(models: bool = True, layers=None) -> dict:
    checks = all_checks(models=models, layers=layers)
    return {"checks": checks, "max_abs_error": max(c["abs_error"] for c in checks)}


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m experiments.glow_logdet", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", default=None, help="accepted for uniformity with the other scripts (no figures)")
    parser.add_argument("--layers-only", action="store_true", help="skip the whole-model checks (faster)")
    parser.add_argument("--quick", action="store_true",
                        help="only a Glow step's layers (ActNorm, LU 1x1 conv, affine coupling) and (b)-(d)")
    args = parser.parse_args(argv)
    result = run(models=not (args.layers_only or args.quick), layers=GLOW_STEP if args.quick else None)
    if args.json:
        print_json(result)
        return 0
    print(f"{'check':38s} {'shape':16s} {'reported':>16s} {'brute force':>16s} {'abs error':>10s}")
    for c in result["checks"]:
        print(f"{c['name']:38s} {str(tuple(c['shape'])):16s} {c['reported']:16.8f} {c['brute_force']:16.8f}"
              f" {c['abs_error']:10.2e}")
    print(f"max abs error {result['max_abs_error']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
