"""Shared CLI plumbing for the experiment scripts: argument errors, JSON output, atomic files."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jaxdnn import one_cpu_device_per_core  # noqa: F401  (re-exported for the CLIs)
from jaxdnn.files import atomic_write_bytes

os.environ.setdefault("MPLBACKEND", "Agg")  # figures are files; never open a window


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line on stderr and exits 2."""

    def error(self, message):  # noqa: D401 - argparse hook
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(prog: str, message: str, code: int = 2) -> None:
    """Exit with one clear line on stderr (no traceback): status 2 for bad input (the default)."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(code)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=None, sort_keys=False))


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
