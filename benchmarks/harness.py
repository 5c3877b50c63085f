"""Timing and reporting helpers for `python -m benchmarks` (the method: README, "Performance").

Every measurement: one first call (warm-up; for jaxdnn it includes tracing and compilation),
optional further warm-up calls, then `repeats` (>= 5) timed calls, each ending in
`jax.block_until_ready` on its result. Rates are `work / seconds` in the case's unit (higher is
better); median/min/max are over the timed calls. For jaxdnn, `compile_seconds` is the first
call's time minus the median timed call (tracing + compilation + first-call overheads).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from jaxdnn.files import atomic_write_bytes

MIN_REPEATS = 5


def _block(x):
    import jax

    return jax.block_until_ready(x)


def measure(fn: Callable[[], object], work: float, repeats: int = MIN_REPEATS,
            warmup: int = 1, compile_time: bool = False) -> dict:
    """Rates (work / s) of `repeats` timed calls of `fn` after `warmup` untimed calls."""
    repeats = max(int(repeats), MIN_REPEATS)
    t0 = time.perf_counter()
    _block(fn())
    first = time.perf_counter() - t0
    for _ in range(max(warmup, 1) - 1):
        _block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - t0)
    rates = [work / max(t, 1e-12) for t in times]
    out = {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
    if compile_time:
        out["compile_seconds"] = max(first - statistics.median(times), 0.0)
    return out


def device_info() -> dict:
    import flax
    import jax
    import jaxlib
    import numpy as np

    devices = jax.devices()
    try:
        import torch

        torch_version = torch.__version__
        torch_threads = torch.get_num_threads()
    except ImportError:
        torch_version, torch_threads = None, None
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "torch": torch_version,
        "torch_threads": torch_threads,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def with_ratios(case: dict) -> dict:
    """Adds ratios jaxdnn / peer (None where the peer is missing)."""
    ours = case["jaxdnn"].get("median")
    case["ratios"] = {
        name: (ours / res["median"] if ours is not None and "median" in res and res["median"] > 0
               else None)
        for name, res in case["peers"].items()
    }
    return case


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def markdown(report: dict) -> str:
    d = report["device"]
    lines = [
        f"Backend {d['backend']} ({d['device_count']} x {d['device_kind']}), "
        f"{d['cpu_count']} CPUs; jax {d['jax']}, jaxlib {d['jaxlib']}, flax {d['flax']}, "
        f"torch {d['torch'] or 'not installed'}; XLA_FLAGS `{d['xla_flags']}`.",
        "",
        "| case | unit | jaxdnn median (min-max) | compile s | peer | peer median (min-max) "
        "| jaxdnn / peer |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        j = c["jaxdnn"]
        if "median" in j:
            ours = f"{_fmt(j['median'])} ({_fmt(j['min'])}-{_fmt(j['max'])})"
            comp = f"{j['compile_seconds']:.1f}"
        else:
            ours, comp = f"error: {j.get('error', '?')}", "-"
        peers = c["peers"] or {"-": {"missing": "no peer"}}
        for name, p in peers.items():
            theirs = (f"{_fmt(p['median'])} ({_fmt(p['min'])}-{_fmt(p['max'])})" if "median" in p
                      else f"missing: {p.get('missing')}")
            ratio = c["ratios"].get(name)
            where = f" ({p['device']})" if "device" in p else ""
            lines.append(f"| {c['name']} | {c['unit']} | {ours} | {comp} | {name}{where} | {theirs} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    atomic_write_bytes(out, (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(out.with_suffix(".md"), markdown(report).encode())


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
