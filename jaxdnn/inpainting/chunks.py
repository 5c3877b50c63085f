"""How every iterative inpainting method runs its steps: one jitted call on GPU/TPU, unrolled
jitted chunks of `CPU_CHUNK` steps on CPU (on XLA:CPU a `lax.scan` around a flow's gradient
step runs many times slower than the same steps unrolled), plus the two step-indexed weights
the methods share."""

from __future__ import annotations

import jax
import jax.numpy as jnp

CPU_CHUNK = 10  # steps per unrolled, jitted chunk on CPU


def run_chunks(run_steps, carry, steps: int, batch: int):
    """Runs `run_steps(carry, first, n, unroll) -> (carry, losses (B, n))` over `steps` steps.
    Returns (carry, losses (B, steps))."""
    cpu = jax.default_backend() == "cpu"
    chunk = min(CPU_CHUNK, steps) if cpu else steps
    losses, done = [], 0
    while done < steps:
        n = min(chunk, steps - done)
        carry, loss = run_steps(carry, jnp.float32(done), n, cpu)
        losses.append(loss)
        done += n
    return carry, (jnp.concatenate(losses, 1) if losses else jnp.zeros((batch, 0)))


def averaged(k, average, steps):
    """1.0 where the iterate x_k (k = 1 .. steps) enters the average of the last `average`
    fraction of the steps (the final iterate always does), else 0.0."""
    return ((k > (1.0 - average) * steps) | (k == steps)).astype(jnp.float32)


def cosine(t):
    """1 at t = 0, 0 from t = 1 on (half a cosine); works on traced hyperparameters."""
    return 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(t, 0.0, 1.0)))

