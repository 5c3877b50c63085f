"""Shared CLI plumbing for the experiment scripts: argument errors, JSON output, atomic files."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")  # figures are files; never open a window


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line on stderr and exits 2."""

    def error(self, message):  # noqa: D401 - argparse hook
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(prog: str, message: str) -> None:
    """Exit 2 with one clear line on stderr (no traceback)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def one_cpu_device_per_core() -> None:
    """Asks XLA for one host (CPU) device per core, so sharded work uses every core.

    Call before jax is imported; appends to the user's XLA_FLAGS and leaves a device count
    the user already set alone. Only the CPU platform is affected."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" not in sys.modules and "host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={os.cpu_count() or 1}").strip()


def print_json(obj) -> None:
    print(json.dumps(obj, indent=None, sort_keys=False))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Saves a matplotlib figure atomically (temp name, then rename) and closes it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def parse_overrides(pairs: list[str], prog: str) -> dict:
    """`--config.key=value` / `--config.key value` leftovers -> {key: python value}."""
    out, i = {}, 0
    while i < len(pairs):
        arg = pairs[i]
        if not arg.startswith("--config."):
            fail(prog, f"unrecognized argument {arg!r}")
        key, eq, value = arg[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(pairs):
                fail(prog, f"--config.{key} needs a value")
            value, i = pairs[i + 1], i + 1
        out[key] = _literal(value)
        i += 1
    return out


def _literal(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)
