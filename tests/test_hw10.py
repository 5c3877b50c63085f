"""The main job end to end in --fast mode: every part runs, report and summary are written.

Its parts are separate processes, two at a time (the job's default)."""

import json
import subprocess
import sys

import pytest

from experiments.hw10 import P3_METHODS


@pytest.mark.slow
@pytest.mark.mnist
def test_hw10_fast_writes_report_summary_and_figures(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "experiments.hw10", "--fast", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert not [k for k, v in summary["parts"].items() if "error" in v]
    parts = summary["parts"]
    assert abs(parts["p5_optimal_q"]["exact"] - 2.38838345e-6) < 1e-12
    assert parts["p4_logdet"]["max_abs_error"] < 1e-4
    assert parts["p2_projected_gradient"]["abs_error"] < 1e-4
    assert {f"p3_realnvp_hw10_{m}" for m in P3_METHODS} <= set(parts)
    assert set(parts["p3_realnvp_hw10_latent"]["baselines"]) == {"mean_fill", "nearest_neighbor", "knn_mean",
                                                                 "knn_matched", "conditional_mean", "start"}
    (posterior,) = parts["p3_posterior_realnvp"]["masks"]  # the flow's own posterior, beside two ensembles
    assert posterior["mask"] == "center" and set(posterior["baselines"]) == {"knn", "network+gaussian"}
    report = (out / "report.md").read_text()
    assert "### The flow's posterior" in report and "| realnvp | center | 1 x 4 |" in report
    for heading in ("## P1", "## P2", "## P3", "## P4", "## P5", "## P6"):
        assert heading in report
    assert "- realnvp, mask hw10: pgd " in report and "latent " in report  # the P3 verdict
    figures = list(out.rglob("*.png"))
    assert len(figures) >= 6
    for name in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (out / name).is_file(), name
    assert not (tmp_path / ".results.partial").exists()
