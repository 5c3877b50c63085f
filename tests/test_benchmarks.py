"""`python -m benchmarks --quick --json` runs and reports the documented JSON shape (not speed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = ["gamblers_ruin", "gamblers_ruin_state", "sgd_tricks", "inpainting", "flow_train_step"]
PEERS = {"gamblers_ruin": {"python", "numpy"}, "gamblers_ruin_state": set(), "sgd_tricks": {"torch"},
         "inpainting": {"torch_loop", "torch_batched"}, "flow_train_step": {"torch"}}
TORCH_PEERS = {"torch", "torch_loop", "torch_batched"}


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_quick_benchmark_json_shape(tmp_path):
    out = tmp_path / "bench.json"
    # the suite's fast compilation stays on (this checks the report's shape, not its speed: 23% faster)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    assert out.with_suffix(".md").read_text().count("|") > 10
    assert set(report) == {"device", "cases"}
    for k in ("backend", "device_kind", "device_count", "jax", "jaxlib", "flax", "cpu_count"):
        assert k in report["device"]
    assert [c["name"] for c in report["cases"]] == CASES
    torch_ok = _has_torch()
    for case in report["cases"]:
        assert set(case) == {"name", "unit", "jaxdnn", "peers", "ratios"}
        assert case["unit"].endswith("/s")
        ours = case["jaxdnn"]
        assert set(ours) == {"median", "min", "max", "compile_seconds"}
        assert 0 < ours["min"] <= ours["median"] <= ours["max"]
        assert ours["compile_seconds"] >= 0
        assert set(case["peers"]) == PEERS[case["name"]] == set(case["ratios"])
        for name, peer in case["peers"].items():
            if name in TORCH_PEERS and not torch_ok:
                assert peer == {"missing": "torch not installed"}
                assert case["ratios"][name] is None
                continue
            timing = {"median", "min", "max"}
            if name in TORCH_PEERS:  # torch peers say where they ran (cuda when jaxdnn runs on a GPU)
                timing.add("device")
                assert peer["device"] in ("cpu", "cuda")
            assert set(peer) == timing, (case["name"], name, peer)
            assert 0 < peer["min"] <= peer["median"] <= peer["max"]
            assert isinstance(case["ratios"][name], float) and case["ratios"][name] > 0
