"""The README's quickstart runs as written (so it cannot rot)."""

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> str:
    """The first ```python block under the '## Quickstart' heading."""
    text = README.read_text()
    section = text.split("\n## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
@pytest.mark.mnist
def test_readme_quickstart_runs():
    scope: dict = {}
    exec(compile(quickstart(), "README.md:quickstart", "exec"), scope)  # noqa: S102 - our own README
    # what the quickstart prints, checked: finite scores, samples in [0, 1], fills inside C
    assert scope["log_p"].shape == (4,) and np.isfinite(scope["log_p"]).all()
    assert scope["samples"].shape == (4, 28, 28, 1)
    assert 0.0 <= float(scope["samples"].min()) and float(scope["samples"].max()) <= 1.0
    assert float(scope["psnr"].mean()) > 10.0  # the latent fills are digits, not mean-fill blur (~8.5 dB)
    assert abs(scope["ruin"].estimate / scope["exact"] - 1) < 5 * scope["ruin"].relative_error
    assert 0.3 < float(scope["mu"]) < 0.6 and 0.45 < float(scope["sigma"]) < 0.8  # the local minimum's basin
