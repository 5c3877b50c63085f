"""Shuffled mini-batches over epochs, driven by a key (host-side numpy, resumable by step)."""

from __future__ import annotations

import jax
import numpy as np


def epoch_permutation(key: jax.Array, epoch: int, n: int) -> np.ndarray:
    """The data order of `epoch`: a permutation of range(n) derived from (key, epoch)."""
    seed = np.asarray(jax.random.key_data(jax.random.fold_in(key, epoch))).ravel()
    return np.random.default_rng(seed.astype(np.uint64)).permutation(n)


def batches(key: jax.Array, data: np.ndarray, batch_size: int, start_step: int = 0):
    """Yields (step, batch) from `start_step` on, endlessly: batch `step` is the same whatever
    step the stream started from (resumable); each epoch's ragged tail is dropped and its
    permutation computed once."""
    per_epoch = len(data) // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(data)} examples")
    step = start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        perm = epoch_permutation(key, epoch, len(data))
        for j in range(i, per_epoch):
            yield step, data[perm[j * batch_size:(j + 1) * batch_size]]
            step += 1
