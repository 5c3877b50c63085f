"""The README's quickstart and its train-export-continue recipe run as written (so they cannot rot)."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from jaxdnn import pretrained

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TINY_GLOW = ["--config.levels_count=1", "--config.steps_per_level=1", "--config.hidden=8", "--config.batch_size=8",
             "--config.log_every=1", "--config.eval_every=1000", "--config.eval_images=16", "--quiet",
             "--config.dequantizer_hidden=4", "--config.dequantizer_couplings=2"]
TINY_STEPS = {"3000": "4", "6000": "7", "100": "2"}  # the recipe's step counts, scaled down


def section(heading: str, language: str) -> str:
    """The first ```language block under the '## heading' heading."""
    text = README.read_text()
    part = text.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{language}\n(.*?)```", part, re.S).group(1)


def test_readme_is_one_screen_with_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    two = text.split("\n## Two commands", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", two, re.S)
    assert len(commands) == 2 and all(c.startswith("python3 -m venv .venv") for c in commands)
    assert commands[0].endswith("python -m experiments.hw10")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci  # .ci/run runs the README's test command


@pytest.mark.slow
@pytest.mark.mnist
def test_readme_quickstart_runs(capsys):
    scope: dict = {}
    exec(compile(section("Quickstart", "python"), "README.md:quickstart", "exec"), scope)  # noqa: S102
    printed = capsys.readouterr().out
    assert "P(reach $200)" in printed and "quickstart ran in" in printed
    bpd, card = np.asarray(scope["bpd"], np.float64), pretrained.card("glow")["test_bpd"]
    assert bpd.shape == (500,) and "Glow bits/dim of 500 test images" in printed
    assert abs(bpd.mean() - card) < 3 * bpd.std(ddof=1) / np.sqrt(500)  # the card's figure, within the sample's error
    assert scope["samples"].shape == (4, 28, 28, 1) and np.isfinite(scope["samples"]).all()
    assert scope["mean_psnr"].shape == (4,) and np.isfinite(scope["mean_psnr"]).all()
    assert abs(scope["ruin"].estimate / scope["exact"] - 1) < 5 * scope["ruin"].relative_error
    assert 0.3 < scope["mu"] < 0.6 and 0.45 < scope["sigma"] < 0.8  # the local minimum's basin


@pytest.mark.slow
@pytest.mark.mnist
def test_readme_train_export_continue_recipe_runs(tmp_path, monkeypatch, capsys):
    """Each command of the recipe, in this process, on a tiny Glow with its step counts scaled
    down, in tmp_path: the export leaves the package's shipped files alone, the continued run
    starts at the export's step, and resuming a workdir with another config exits 2 naming it."""
    from experiments import evaluate_flow, train_flow
    from jaxdnn import pretrained

    script = section("Train, export, continue", "bash").replace("\\\n", " ")
    commands = [shlex.split(line) for line in script.splitlines() if line.strip()]
    assert [c[2] for c in commands] == ["experiments.train_flow"] * 3 + ["experiments.evaluate_flow"]
    shipped = {p.name: p.stat().st_mtime_ns for p in pretrained.SHIPPED_DIR.iterdir()}
    monkeypatch.chdir(ROOT)
    for argv in commands:
        argv = [re.sub(r"^runs/", f"{tmp_path}/", a) for a in argv[3:]]
        argv = [re.sub(r"=(\d+)$", lambda m: "=" + TINY_STEPS.get(m.group(1), m.group(1)), a) for a in argv]
        main = train_flow.main if "--config" in argv else evaluate_flow.main
        extra = [] if "--export" in argv else TINY_GLOW if main is train_flow.main else [
            "--json", "--limit", "64", "--out", str(tmp_path)]
        assert main([*argv, *extra]) == 0, capsys.readouterr().err[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in pretrained.SHIPPED_DIR.iterdir()} == shipped
    card = pretrained.card(tmp_path / "glow_a" / "export" / "glow.msgpack")
    final = json.loads((tmp_path / "glow_a" / "final.json").read_text())
    assert card["steps"] == 4 and card["val_bpd"] == round(final["val_bpd"], 5)  # rescored: the run's own figure
    assert card["test_images"] == 10000 and np.isfinite(card["test_bpd"])
    assert card["evaluation"].endswith(f"evaluate_flow --model {tmp_path}/glow_a/export/glow.msgpack")  # the export
    continued = json.loads((tmp_path / "glow_b" / "final.json").read_text())
    assert continued["init_step"] == 4 and continued["steps"] == 7
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 64
    with pytest.raises(SystemExit) as exit_:  # the first workdir, resumed with another learning rate
        train_flow.main(["--config", "experiments/configs/glow.py", "--workdir", str(tmp_path / "glow_a"),
                         "--config.steps=4", "--config.lr=0.01", *TINY_GLOW])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "lr: 0.001 -> 0.01" in err and len(err.strip().splitlines()) == 1, err
