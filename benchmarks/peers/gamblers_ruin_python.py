"""Course-style peer: importance sampling for Gambler's ruin, one path at a time in pure Python.

Plays each game with win probability q using NumPy scalar draws and multiplies the
likelihood ratio of the games played until absorption (the stopped ratio), exactly like the
course's reference programs (about a thousand paths per second).
"""

from __future__ import annotations

import numpy as np


def run(paths: int, seed: int, start: int = 100, target: int = 200, p: float = 18 / 37,
        q: float = 0.55, games: int = 600) -> float:
    """Mean weight over `paths` paths: an unbiased estimate of P(reach target)."""
    rng = np.random.default_rng(seed)
    win_ratio, loss_ratio = p / q, (1 - p) / (1 - q)
    total = 0.0
    for _ in range(paths):
        money, weight = start, 1.0
        for _ in range(games):
            if rng.random() < q:
                money += 1
                weight *= win_ratio
            else:
                money -= 1
                weight *= loss_ratio
            if money == 0 or money == target:
                break
        if money == target:
            total += weight
    return total / paths
