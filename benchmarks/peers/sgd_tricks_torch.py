"""PyTorch peer: the course-style SGD loop of Problem 6 (reparameterization trick).

Minimizes J(mu, sigma) = E_{X ~ N(mu, sigma^2)}[X sin X] + (mu - 1)^2 / 2 + sigma - log sigma
over theta = (mu, tau), sigma = exp(tau), by plain SGD: each iteration draws `batch` standard
normals, X = mu + sigma * eps, and backpropagates the Monte Carlo objective. Same problem,
step size, batch and iteration count as `jaxdnn.sgd_tricks.run_sgd` (timing comparison only).
"""

from __future__ import annotations

import torch


def run(iterations: int = 500, batch: int = 16, lr: float = 1e-2, seed: int = 0,
        init_mu: float = 0.0, init_tau: float = 0.0) -> tuple[float, float]:
    """Returns the final (mu, tau)."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.tensor([init_mu, init_tau], requires_grad=True)
    for _ in range(iterations):
        mu, sigma = theta[0], torch.exp(theta[1])
        x = mu + sigma * torch.randn(batch, generator=gen)
        loss = (x * torch.sin(x)).mean() + (mu - 1.0) ** 2 / 2 + sigma - torch.log(sigma)
        grad, = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= lr * grad
    return float(theta[0].detach()), float(theta[1].detach())
