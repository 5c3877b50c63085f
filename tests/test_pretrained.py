"""Shipped files (`jaxdnn.pretrained`): one card schema for every kind, provenance that stays in the
repository, and load errors that name the file and what is wrong."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from jaxdnn import pretrained
from jaxdnn.pretrained import store

ROOT = Path(__file__).resolve().parents[1]
CARDS = sorted(store.SHIPPED_DIR.glob("*.json"))


def commands(card: store.Card) -> list[str]:
    """Every command a card names: the one that made it, each metric's, each member's stage."""
    found = [card.command, *(m.command for m in card.metrics.values())]
    found += [m["stage"]["command"] for m in card.details.get("members", [])]
    return found


def test_every_shipped_file_has_a_card_of_the_one_schema():
    """Each card reads as `store.Card` (kind, weights with their sha256, split, command, metrics
    each with a command); every shipped .msgpack is named by exactly one card, with its sha256."""
    named = {}
    assert {c.stem for c in CARDS} >= {"nice", "realnvp", "glow", "classifier", "conditional_mean"}
    for path in CARDS:
        card = store.read_card(path)
        assert card.metrics and card.split
        for name, digest in card.weights.items():
            assert name not in named, name
            named[name] = digest
    assert set(named) == {p.name for p in store.SHIPPED_DIR.glob("*.msgpack")}
    from jaxdnn.files import sha256

    for name, digest in named.items():
        assert sha256(store.SHIPPED_DIR / name) == digest, name


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.stem)
def test_every_card_command_names_code_in_the_repository(path):
    """`python -m X` in every command of every card names a module of this repository."""
    card = store.read_card(path)
    for command in commands(card):
        module = re.match(r"python -m ([\w.]+)", command)
        assert module, command
        parts = module.group(1).split(".")
        assert (ROOT.joinpath(*parts).with_suffix(".py").is_file()
                or (ROOT.joinpath(*parts) / "__init__.py").is_file()), command


def test_no_tracked_file_points_at_scratch_or_a_machine_path():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    pattern = r"/work/|/home/|/Users/|/tmp/[a-z]|scratch/|/scratch|scratch [a-z_]+\.py"
    out = subprocess.run(["git", "grep", "-n", "-E", "-I", pattern, "--", ".", ":!tests/test_pretrained.py"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1, out.stdout[:2000]  # git grep: 1 = no match


def test_a_truncated_weights_file_is_named(tmp_path):
    shutil.copy(store.SHIPPED_DIR / "realnvp.json", tmp_path / "realnvp.json")
    (tmp_path / "realnvp.msgpack").write_bytes((store.SHIPPED_DIR / "realnvp.msgpack").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"realnvp.msgpack: not a weights file \(truncated or corrupt\)"):
        pretrained.card(tmp_path / "realnvp.msgpack")


def test_weights_of_another_flow_beside_a_card_are_named(tmp_path):
    shutil.copy(store.SHIPPED_DIR / "realnvp.json", tmp_path / "realnvp.json")
    shutil.copy(store.SHIPPED_DIR / "glow.msgpack", tmp_path / "realnvp.msgpack")
    with pytest.raises(ValueError, match="realnvp.msgpack holds glow weights but its card says realnvp"):
        pretrained.load(tmp_path / "realnvp.msgpack")


def test_a_card_outside_the_schema_is_refused(tmp_path):
    good = json.loads((store.SHIPPED_DIR / "classifier.json").read_text())
    for broken, match in (({k: v for k, v in good.items() if k != "split"}, "missing split"),
                          ({**good, "kind": "vae"}, "kind must be one of"),
                          ({**good, "metrics": {"x": {"value": 1.0}}}, "metric 'x'"),
                          ({**good, "weights": {"classifier.msgpack": "00"}}, "sha256")):
        (tmp_path / "c.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=match):
            store.read_card(tmp_path / "c.json")


@pytest.mark.mnist
@pytest.mark.slow
def test_the_classifier_card_is_what_its_metric_command_prints(capsys):
    """`python -m experiments.train_classifier --score`, the command the classifier's card names
    for its metrics, prints them."""
    from experiments import train_classifier

    card = store.shipped_card("classifier")
    assert {m.command for m in card.metrics.values()} == {"python -m experiments.train_classifier --score"}
    assert train_classifier.main(["--score"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {k: m.value for k, m in card.metrics.items()}
