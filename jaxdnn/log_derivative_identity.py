"""Problem 1: numerical check of the log-derivative (score-function) identity.

For q_phi(z) differentiable in phi and h(z) > 0 (docs/problems.md, P1):

    grad_phi E_q[log(h(Z) / q_phi(Z))] = E_q[(grad_phi log q_phi(Z)) log(h(Z) / q_phi(Z))]

(the extra term E[grad_phi log q_phi] vanishes). With h(z) = p_theta(x, z) the left side is
the encoder gradient of a VAE's ELBO (`jaxdnn.vae`). `p1_identity_check` computes both sides
for a diagonal Gaussian q and h(z) = exp(-a |z|^2 / 2 + b . z), whose left side is known in
closed form: the right side by the score-function estimator, the left by reparameterization.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import distrax
import jax
import jax.numpy as jnp

from jaxdnn import estimators


class IdentityCheck(NamedTuple):
    """Gradients w.r.t. (mu, log_sigma), each of shape (2, d).

    exact: closed-form grad of E_q[log(h/q)] (the left side).
    log_derivative / log_derivative_stderr: Monte Carlo right side E_q[(grad log q) log(h/q)].
    pathwise / pathwise_stderr: Monte Carlo left side by reparameterization.
    """

    exact: jax.Array
    log_derivative: jax.Array
    log_derivative_stderr: jax.Array
    pathwise: jax.Array
    pathwise_stderr: jax.Array

    def z_scores(self) -> tuple[jax.Array, jax.Array]:
        return ((self.log_derivative - self.exact) / self.log_derivative_stderr,
                (self.pathwise - self.exact) / self.pathwise_stderr)


def _gaussian(params: dict) -> distrax.Distribution:
    return distrax.MultivariateNormalDiag(params["mu"], jnp.exp(params["log_sigma"]))


@functools.partial(jax.jit, static_argnames=("a", "b", "num_samples"))
def p1_identity_check(
    key: jax.Array,
    mu: jax.Array,
    log_sigma: jax.Array,
    a: float = 1.0,
    b: float = 0.5,
    num_samples: int = 100_000,
) -> IdentityCheck:
    """Both sides of the P1 identity for q = N(mu, diag(exp(log_sigma))^2) in d dimensions
    and h(z) = exp(-a |z|^2 / 2 + b sum(z)) > 0.

    Exact left side: E_q[log h] = -a (|mu|^2 + sum sigma^2) / 2 + b sum(mu) and
    E_q[-log q] = sum(log sigma) + d log(2 pi e) / 2, so the gradient is
    (-a mu + b, 1 - a sigma^2).
    """
    mu = jnp.atleast_1d(jnp.asarray(mu, jnp.float32))
    log_sigma = jnp.atleast_1d(jnp.asarray(log_sigma, jnp.float32))
    if mu.shape != log_sigma.shape or mu.ndim != 1:
        raise ValueError(f"mu and log_sigma must be vectors of one shape, got {mu.shape}, "
                         f"{log_sigma.shape}")
    params = {"mu": mu, "log_sigma": log_sigma}
    log_h = lambda z: -0.5 * a * jnp.sum(z**2) + b * jnp.sum(z)
    exact = jnp.stack([-a * mu + b, 1.0 - a * jnp.exp(2 * log_sigma)])

    k_score, k_path = jax.random.split(key)
    # Right side: the score-function estimator with f = log(h/q_phi) at the current phi
    # (treated as a constant, exactly the integrand of the identity's right side).
    f = lambda z: log_h(z) - _gaussian(params).log_prob(z)
    rhs = estimators.score_function(k_score, _gaussian, params, f, num_samples,
                                    return_per_sample=True)

    # Left side by reparameterization, differentiating log q_phi in phi as well.
    def per_sample_lhs(p, eps):
        z = p["mu"] + jnp.exp(p["log_sigma"]) * eps
        return log_h(z) - _gaussian(p).log_prob(z)

    eps = jax.random.normal(k_path, (num_samples, mu.shape[0]))
    lhs = jax.vmap(jax.grad(per_sample_lhs), in_axes=(None, 0))(params, eps)

    def stack(tree):  # per-sample (n, 2, d): rows d/dmu and d/dlog_sigma
        return jnp.stack([tree["mu"], tree["log_sigma"]], axis=-2)

    ld, pw = stack(rhs.per_sample), stack(lhs)
    return IdentityCheck(exact, ld.mean(0), estimators.standard_error(ld), pw.mean(0),
                         estimators.standard_error(pw))
