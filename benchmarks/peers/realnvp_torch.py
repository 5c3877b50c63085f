"""PyTorch peer: the same RealNVP as `jaxdnn.flows.RealNVP` (for timing comparisons only).

Mirrors jaxdnn/flows/models.py and layers.py, in PyTorch's NCHW layout: logit preprocessing
(alpha = 1e-6), per level a squeeze (sub-pixel (dy, dx) of channel c -> channel (2dy+dx)C + c,
as `jaxdnn.flows.squeeze`), `pairs` pairs of checkerboard couplings (channel masks after the
squeeze), `pairs` pairs of channel-wise couplings, half the channels factored out; then
`final_pairs` pairs of channel-wise couplings. Affine couplings with log s = 2 tanh(h / 2) and
a ResNet conditioner (3x3 conv, `blocks` residual blocks of two 3x3 convs with ReLU, zero-init
3x3 output conv on relu(h)); all convs have biases like flax's `nn.Conv`. Same parameter
count as the flax model (the benchmark asserts it). Standard normal prior; log p in nats on
[0, 1]^784 including the preprocessing log-det; loss = mean bits/dim of the batch uniformly
dequantized, as `build_model("realnvp")` (dequantization="uniform", the config's default; the
shipped recipe's variational dequantizer is not mirrored, so the constructor refuses it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

LOGIT_ALPHA = 1e-6


def checkerboard_mask(channels: int, parity: int = 0) -> tuple[int, ...]:
    subpixels = [0, 3] if parity == 0 else [1, 2]
    return tuple(s * channels + c for s in subpixels for c in range(channels))


def half_mask(channels: int, first: bool = True) -> tuple[int, ...]:
    half = channels // 2
    return tuple(range(half)) if first else tuple(range(half, channels))


def squeeze(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def logit_transform(x: torch.Tensor, alpha: float = LOGIT_ALPHA):
    s = alpha + (1.0 - 2.0 * alpha) * x
    y = torch.log(s) - torch.log1p(-s)
    log_det = math.log1p(-2.0 * alpha) - torch.log(s) - torch.log1p(-s)
    return y, log_det.flatten(1).sum(1)


class ResNet(nn.Module):
    def __init__(self, cin: int, hidden: int, blocks: int, out: int):
        super().__init__()
        self.inp = nn.Conv2d(cin, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Conv2d(hidden, hidden, 3, padding=1),
                           nn.Conv2d(hidden, hidden, 3, padding=1)]) for _ in range(blocks))
        self.out = nn.Conv2d(hidden, out, 3, padding=1)
        nn.init.zeros_(self.out.weight)

    def forward(self, x):
        h = self.inp(x)
        for c1, c2 in self.blocks:
            r = c1(torch.relu(h))
            h = h + c2(torch.relu(r))
        return self.out(torch.relu(h))


class Coupling(nn.Module):
    """Affine coupling over channels; `mask` lists the channels passed through unchanged."""

    def __init__(self, channels: int, mask, hidden: int, blocks: int):
        super().__init__()
        keep = list(mask)
        change = [i for i in range(channels) if i not in set(keep)]
        order = sorted(range(channels), key=lambda j: (keep + change)[j])
        self.n = len(change)
        self.register_buffer("keep", torch.tensor(keep), persistent=False)
        self.register_buffer("change", torch.tensor(change), persistent=False)
        self.register_buffer("order", torch.tensor(order), persistent=False)
        self.net = ResNet(len(keep), hidden, blocks, 2 * self.n)

    def forward(self, x):
        x_a, x_b = x.index_select(1, self.keep), x.index_select(1, self.change)
        h = self.net(x_a)
        t, log_s = h[:, : self.n], 2.0 * torch.tanh(h[:, self.n:] / 2.0)
        y_b = x_b * torch.exp(log_s) + t
        return torch.cat([x_a, y_b], 1).index_select(1, self.order), log_s.flatten(1).sum(1)


class RealNVP(nn.Module):
    def __init__(self, levels_count: int = 2, pairs: int = 1, final_pairs: int = 2,
                 hidden: int = 48, blocks: int = 1, dequantization: str = "uniform",
                 dequantizer_hidden: int = 32, dequantizer_couplings: int = 4):
        super().__init__()
        if dequantization != "uniform":  # the same model on both sides: refuse what is not mirrored here
            raise ValueError(f"the PyTorch peer mirrors uniform dequantization only, got {dequantization!r}")
        del dequantizer_hidden, dequantizer_couplings  # unused with uniform noise, as in jaxdnn
        c = 1
        self.levels = nn.ModuleList()
        self.keep = []
        for _ in range(levels_count):
            layers = []
            for _ in range(pairs):
                layers += [Coupling(4 * c, checkerboard_mask(c, p), hidden, blocks) for p in (0, 1)]
            c *= 4
            for _ in range(pairs):
                layers += [Coupling(c, half_mask(c, f), hidden, blocks) for f in (True, False)]
            self.levels.append(nn.ModuleList(layers))
            self.keep.append(c // 2)
            c //= 2
        final = []
        for _ in range(final_pairs):
            final += [Coupling(c, half_mask(c, f), hidden, blocks) for f in (True, False)]
        self.final = nn.ModuleList(final)

    def log_prob(self, x):
        """x (B, 1, 28, 28) in [0, 1] -> log p(x) in nats (B,)."""
        h, log_det = logit_transform(x)
        latents = []
        for i, level in enumerate(self.levels):
            h = squeeze(h)
            for layer in level:
                h, ld = layer(h)
                log_det = log_det + ld
            latents.append(h[:, self.keep[i]:])
            h = h[:, : self.keep[i]]
        for layer in self.final:
            h, ld = layer(h)
            log_det = log_det + ld
        latents.append(h)
        log_norm = 0.5 * math.log(2 * math.pi)
        for z in latents:
            log_det = log_det + (-0.5 * z * z - log_norm).flatten(1).sum(1)
        return log_det


def bits_per_dim(log_prob: torch.Tensor, num_dims: int = 784) -> torch.Tensor:
    return (-log_prob + num_dims * math.log(256.0)) / (num_dims * math.log(2.0))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_train_step(model: RealNVP, lr: float = 1e-3, clip: float = 1.0):
    """A course-style step: dequantize, mean bpd, backward, clip, Adam."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(batch_uint8: torch.Tensor) -> float:
        noise = torch.rand(batch_uint8.shape, device=batch_uint8.device)
        x = (batch_uint8.float() + noise).unsqueeze(1) / 256.0
        loss = bits_per_dim(model.log_prob(x)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return loss.item()

    return step


def load_flax_params(model: RealNVP, params) -> None:
    """Copies the parameters of `jaxdnn.flows.build_model("realnvp")` (same config) into
    `model`, so both compute the same function (used to check that the architectures match)."""
    import numpy as np

    p = params["params"]

    def coupling_params(tree, k, j):  # Repeat stacks copies on a leading axis
        return {name: {kk: np.asarray(v[k]) for kk, v in conv.items()}
                for name, conv in tree[f"Coupling_{j}"]["ResNet_0"].items()}

    def load(coupling: Coupling, cp: dict) -> None:
        net = coupling.net
        convs = [net.inp] + [c for pair in net.blocks for c in pair] + [net.out]
        for i, conv in enumerate(convs):
            src = cp[f"Conv_{i}"]
            conv.weight.data.copy_(torch.from_numpy(src["kernel"].transpose(3, 2, 0, 1).copy()))
            conv.bias.data.copy_(torch.from_numpy(src["bias"].copy()))

    for li, level in enumerate(model.levels):
        lp = p[f"levels_{li}"]
        pairs = len(level) // 4
        for idx, layer in enumerate(level):
            rep, rest = divmod(idx, 2 * pairs)
            k, j = divmod(rest, 2)
            load(layer, coupling_params(lp[f"Repeat_{rep}"]["stack"], k, j))
    fp = p[f"levels_{len(model.levels)}"]["stack"]
    for idx, layer in enumerate(model.final):
        k, j = divmod(idx, 2)
        load(layer, coupling_params(fp, k, j))
