"""PyTorch peers: flow inpainting one image at a time (the course's loop) and batched.

For each image: the missing pixels (mask 0) start at 1, then `steps` projected gradient steps
x <- clip(x - lr * grad(-log p)(x), 0, 1) with the observed pixels reset to the original, as
`jaxdnn.inpainting.inpaint(method="pgd")` does (lr 1e-3, 300 steps in the course).
"""

from __future__ import annotations

import torch


def run_batched(model, images: torch.Tensor, mask: torch.Tensor, steps: int = 300,
                lr: float = 1e-3) -> torch.Tensor:
    """images (N, 1, H, W), mask (1, H, W) bool (True = observed): every image in one batch."""
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.where(mask, images, torch.ones_like(images)).requires_grad_(True)
    for _ in range(steps):
        grad, = torch.autograd.grad(-model.log_prob(x).sum(), x)
        with torch.no_grad():
            x -= lr * torch.nan_to_num(grad)
            x.clamp_(0.0, 1.0)
            x.copy_(torch.where(mask, images, x))
    return x.detach()


def run(model, images: torch.Tensor, mask: torch.Tensor, steps: int = 300,
        lr: float = 1e-3) -> torch.Tensor:
    """images (N, 1, H, W): the course's loop, one image at a time."""
    return torch.cat([run_batched(model, img[None], mask, steps, lr) for img in images])
