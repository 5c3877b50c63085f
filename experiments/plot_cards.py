"""Validation bits/dim against epochs and wall time from model cards:
`python -m experiments.plot_cards CARD.json [CARD.json ...] [--out results/training_curves.png]`.

A card's `validation_curve` (written by `train_flow --export`) holds its last stage; the stages it
continued (`initialized_from`, nested) are drawn before it, so one line runs over the whole
campaign. Also prints the stage table (steps, epochs, hours, validation and test bits/dim)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from experiments.common import ArgumentParser, fail, save_figure


def stages(card: dict) -> list[dict]:
    """The card's stages, oldest first (each a card, without its nested `initialized_from`)."""
    older = stages(card["initialized_from"]) if "initialized_from" in card else []
    return [*older, {k: v for k, v in card.items() if k != "initialized_from"}]


def curve(card: dict) -> list[tuple[float, float, float]]:
    """(epoch, wall hours, validation bpd) over every stage, epochs and hours cumulative."""
    points, epochs0, hours0 = [], 0.0, 0.0
    for stage in stages(card):
        batch = stage["train_config"]["batch_size"]
        start = stage.get("init_step", 0)
        for row in stage.get("validation_curve", []):
            points.append((epochs0 + (row["step"] - start) * batch / 55000, hours0 + row["wall_seconds"] / 3600,
                           row["val_bpd"]))
        epochs0 += stage.get("epochs", 0.0)
        hours0 += stage.get("wall_seconds", 0.0) / 3600
    return points


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m experiments.plot_cards", description=__doc__.split("\n\n")[0])
    p.add_argument("cards", nargs="+", metavar="CARD.json")
    p.add_argument("--out", default="results/training_curves.png")
    a = p.parse_args(argv)
    import matplotlib.pyplot as plt

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    for path in a.cards:
        try:
            card = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            fail("python -m experiments.plot_cards", f"{path}: {e}")
        points = curve(card)
        label = f"{card['model']} ({Path(path).name})"
        if points:
            by_epoch.plot([e for e, _, _ in points], [v for _, _, v in points], "o-", ms=3, label=label)
            by_time.plot([h for _, h, _ in points], [v for _, _, v in points], "o-", ms=3, label=label)
        print(f"{label}: stage | steps | epochs | hours | validation bpd | test bpd")
        for s in stages(card):
            command = s.get("command", s.get("training_command", ""))[:60]
            print(f"  {command:<60} | {s.get('init_step', 0)}->{s['steps']} | "
                  f"{s.get('epochs', float('nan')):.1f} | {s.get('wall_seconds', 0) / 3600:.2f} | "
                  f"{_metric(s, 'val_bpd'):.4f} | {_metric(s, 'test_bpd'):.4f}")
    by_epoch.set(xlabel="epochs", ylabel="validation bits/dim (averaged weights)")
    by_time.set(xlabel="wall hours (2-core CPU)")
    for ax in (by_epoch, by_time):
        ax.grid(alpha=0.3)
    by_epoch.legend(fontsize=8)
    save_figure(fig, a.out)
    print(f"figure: {a.out}")
    return 0



def _metric(card: dict, name: str) -> float:
    """A card's metric: under "metrics" (the shared card schema) or at the top (cards before it)."""
    return card.get("metrics", {}).get(name, {}).get("value", card.get(name, float("nan")))

if __name__ == "__main__":
    sys.exit(main())
