"""Bijective layers. Each is a Flax module called as `layer(x, inverse=False) -> (y, log_det)`;
x is a batch (B, ...) and log_det has shape (B,).

`log_det` is always log|det| of the Jacobian of the map actually applied, so
`inverse(forward(x)[0])[1] == -forward(x)[1]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxdnn.data.preprocess import LOGIT_ALPHA, inverse_logit_transform, logit_transform


def _batch_sum(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0], -1).sum(-1)


def take_last(x: jax.Array, idx: Sequence[int]) -> jax.Array:
    """x[..., idx] as a concatenation of static slices over runs of consecutive indices
    (XLA:CPU gathers and their scatter-add gradients are far slower than slices)."""
    idx = [int(i) for i in idx]
    step = idx[1] - idx[0] if len(idx) > 1 else 1
    if step > 0 and idx == list(range(idx[0], idx[-1] + 1, step)):  # one (strided) slice
        return x[..., idx[0]: idx[-1] + 1: step]
    runs, start = [], 0
    for j in range(1, len(idx) + 1):
        if j == len(idx) or idx[j] != idx[j - 1] + 1:
            runs.append(x[..., idx[start]: idx[j - 1] + 1])
            start = j
    return runs[0] if len(runs) == 1 else jnp.concatenate(runs, -1)


class FlowLayer(nn.Module):
    """Base of every layer here: a Flax module called as `layer(x, inverse=False) -> (y, log_det)`.
    (`jaxdnn.flows.distribution.FlowBijector` is the distrax view of a whole model.)"""


# ----------------------------------------------------------------------------- conditioners


class MLP(nn.Module):
    """Dense net (B, D) -> (B, out); last layer zero-initialized (coupling starts as identity)."""

    hidden: int
    num_hidden: int
    out: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.num_hidden):
            x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.out, kernel_init=nn.initializers.zeros)(x)


class ResNet(nn.Module):
    """Conv net (B, H, W, C) -> (B, H, W, out): 3x3 conv, `blocks` residual blocks, zero 3x3 conv."""

    hidden: int
    blocks: int
    out: int

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.hidden, (3, 3))(x)
        for _ in range(self.blocks):
            r = nn.Conv(self.hidden, (3, 3))(nn.relu(h))
            h = h + nn.Conv(self.hidden, (3, 3))(nn.relu(r))
        return nn.Conv(self.out, (3, 3), kernel_init=nn.initializers.zeros)(nn.relu(h))


class GlowNet(nn.Module):
    """Glow's conditioner: 3x3 conv, ReLU, 1x1 conv, ReLU, zero-initialized 3x3 conv.
    The 1x1 conv is a Dense on the channel axis (same map; XLA:CPU runs it ~3x faster)."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(self.hidden, (3, 3))(x))
        h = nn.relu(nn.Dense(self.hidden)(h))
        return nn.Conv(self.out, (3, 3), kernel_init=nn.initializers.zeros)(h)


def make_conditioner(kind: str, out: int, hidden: int, depth: int) -> nn.Module:
    """Conditioner by name: "mlp" (depth hidden layers), "resnet" (depth blocks), "glow", or
    "conv" (one zero-initialized 3x3 conv: Glow's learned prior for split latents)."""
    if kind == "conv":
        return nn.Conv(out, (3, 3), kernel_init=nn.initializers.zeros)
    if kind == "mlp":
        return MLP(hidden, depth, out)
    if kind == "resnet":
        return ResNet(hidden, depth, out)
    if kind == "glow":
        return GlowNet(hidden, out)
    raise ValueError(f"unknown conditioner {kind!r}")


# ----------------------------------------------------------------------------- couplings


def bounded_log_scale(h: jax.Array) -> jax.Array:
    """log s = 2 tanh(h / 2): 0 at h = 0 (identity at init), |log s| <= 2 (numerically safe)."""
    return 2.0 * jnp.tanh(h / 2.0)


class Coupling(FlowLayer):
    """Additive or affine coupling over the last axis.

    `mask` lists the last-axis indices that pass through unchanged (x_a); the others
    (x_b) become x_b * exp(log_s(x_a)) + t(x_a) (affine) or x_b + t(x_a) (additive).
    A `context` (B, ..., K) given with x joins x_a as the conditioner's input (a conditional
    bijector of x given the context: variational dequantization).
    For images, channel masks after a squeeze are checkerboard masks of the
    unsqueezed image: `checkerboard_mask` gives them.
    """

    mask: Sequence[int]
    affine: bool = True
    conditioner: str = "resnet"
    hidden: int = 64
    depth: int = 2

    @nn.compact
    def __call__(self, x, inverse=False, context=None):
        size = x.shape[-1]
        fixed = np.asarray(self.mask, dtype=int)
        change = np.setdiff1d(np.arange(size), fixed)
        order = np.argsort(np.concatenate([fixed, change]))
        x_a, x_b = take_last(x, fixed), take_last(x, change)
        out = len(change) * (2 if self.affine else 1)
        inputs = x_a if context is None else jnp.concatenate([x_a, context], -1)
        h = make_conditioner(self.conditioner, out, self.hidden, self.depth)(inputs)
        t = h[..., : len(change)]
        log_s = bounded_log_scale(h[..., len(change):]) if self.affine else jnp.zeros_like(t)
        if inverse:
            y_b = (x_b - t) * jnp.exp(-log_s)
            log_det = -_batch_sum(log_s)
        else:
            y_b = x_b * jnp.exp(log_s) + t
            log_det = _batch_sum(log_s)
        if size % 2 == 0 and fixed[0] in (0, 1) and list(fixed) == list(range(fixed[0], size, 2)):
            # Interleaved halves (NICE's even/odd): re-interleave by stacking, not by a gather.
            pair = (x_a, y_b) if fixed[0] == 0 else (y_b, x_a)
            return jnp.stack(pair, -1).reshape(x.shape), log_det
        return take_last(jnp.concatenate([x_a, y_b], -1), order), log_det


def checkerboard_mask(channels: int, parity: int = 0) -> tuple[int, ...]:
    """Channel indices, after `squeeze` of a `channels`-channel image, that hold the pixels
    (i, j) with (i + j) % 2 == parity: a channel mask here is a checkerboard before squeezing."""
    # squeeze puts sub-pixel (dy, dx) of channel c at index (2 dy + dx) * channels + c.
    subpixels = [0, 3] if parity == 0 else [1, 2]
    return tuple(s * channels + c for s in subpixels for c in range(channels))


def half_mask(channels: int, first: bool = True) -> tuple[int, ...]:
    """The first (or second) half of `channels` indices: RealNVP/Glow channel-wise mask."""
    half = channels // 2
    return tuple(range(half)) if first else tuple(range(half, channels))


# ----------------------------------------------------------------------------- elementwise


class Logit(FlowLayer):
    """x in [0, 1] -> logit(alpha + (1 - 2 alpha) x): the preprocessing layer as a bijector."""

    alpha: float = LOGIT_ALPHA

    def __call__(self, x, inverse=False):
        return (inverse_logit_transform if inverse else logit_transform)(x, self.alpha)


class Scaling(FlowLayer):
    """NICE's diagonal scaling y = x * exp(s), s learned per dimension (zero-initialized)."""

    @nn.compact
    def __call__(self, x, inverse=False):
        s = self.param("log_scale", nn.initializers.zeros, x.shape[1:])
        sign = -1.0 if inverse else 1.0
        return x * jnp.exp(sign * s)[None], jnp.full(x.shape[:1], sign * s.sum())


class ActNorm(FlowLayer):
    """Per-channel affine y = (x + loc) * exp(log_scale), initialized from the first batch seen
    by `init` so that y has zero mean and unit variance per channel (data-dependent init lives
    in the parameters: applying loaded parameters never re-initializes)."""

    @nn.compact
    def __call__(self, x, inverse=False):
        axes = tuple(range(x.ndim - 1))
        loc = self.param("loc", lambda _: -jnp.mean(x, axes))
        log_scale = self.param("log_scale", lambda _: -jnp.log(jnp.std(x, axes) + 1e-6))
        pixels = int(np.prod(x.shape[1:-1]))
        log_det = jnp.full(x.shape[:1], pixels * log_scale.sum())
        bshape = (1,) * (x.ndim - 1) + (-1,)  # explicit broadcast over (B, ..., C)
        loc, scale = loc.reshape(bshape), jnp.exp(log_scale).reshape(bshape)
        if inverse:
            return x / scale - loc, -log_det
        return (x + loc) * scale, log_det


# ----------------------------------------------------------------------------- 1x1 convolutions


def exact_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b in full float32: GPUs otherwise round float32 matmul inputs to TF32 (10-bit
    mantissa), and a 1x1 convolution's inverse would then undo its forward only to ~1e-3."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _lu_factors(perm, lower, upper, log_s):
    """(P, L, U + diag(s)) broadcast to the batch shape of `lower` (..., C, C)."""
    c = log_s.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(c), lower.shape)
    p_mat = jnp.broadcast_to(jnp.eye(c)[perm], lower.shape)
    l_mat = jnp.tril(lower, -1) + eye
    u_mat = jnp.triu(upper, 1) + eye * jnp.exp(log_s)[..., None, :]
    return p_mat, l_mat, u_mat


def lu_matrix(perm: np.ndarray, lower: jax.Array, upper: jax.Array, log_s: jax.Array) -> jax.Array:
    """A = P L (U + diag(s)), s = exp(log_s): L unit lower, U strictly upper (..., C, C)."""
    p_mat, l_mat, u_mat = _lu_factors(perm, lower, upper, log_s)
    return exact_matmul(exact_matmul(p_mat, l_mat), u_mat)


def lu_inverse(perm: np.ndarray, lower: jax.Array, upper: jax.Array, log_s: jax.Array) -> jax.Array:
    """A^{-1} = (U + diag s)^{-1} L^{-1} P^T by two triangular solves (..., C, C)."""
    p_mat, l_mat, u_mat = _lu_factors(perm, lower, upper, log_s)
    eye = jnp.broadcast_to(jnp.eye(log_s.shape[-1]), lower.shape)
    l_inv = jax.scipy.linalg.solve_triangular(l_mat, eye, lower=True, unit_diagonal=True)
    return exact_matmul(jax.scipy.linalg.solve_triangular(u_mat, l_inv, lower=False),
                        jnp.swapaxes(p_mat, -1, -2))


def reverse_permutation(c: int) -> np.ndarray:
    return np.arange(c)[::-1].copy()


class InvConv1x1(FlowLayer):
    """Invertible 1x1 convolution y[h, w] = A x[h, w] with A = P L (U + diag(exp(log_s))).

    P is a fixed channel reversal; L = I, U = 0, log_s = 0 at init. log|det| per example is
    H W sum(log_s), computed in O(C). A is invertible for every parameter value.
    """

    @nn.compact
    def __call__(self, x, inverse=False):
        c = x.shape[-1]
        lower = self.param("lower", nn.initializers.zeros, (c, c))
        upper = self.param("upper", nn.initializers.zeros, (c, c))
        log_s = self.param("log_s", nn.initializers.zeros, (c,))
        perm = reverse_permutation(c)
        pixels = int(np.prod(x.shape[1:-1]))
        log_det = jnp.full(x.shape[:1], pixels * log_s.sum())
        if inverse:
            return exact_matmul(x, lu_inverse(perm, lower, upper, log_s).T), -log_det
        return exact_matmul(x, lu_matrix(perm, lower, upper, log_s).T), log_det


class ConditionalInvConv1x1(FlowLayer):
    """Problem 4(d): Z[..., :k] = X[..., :k], Z[..., k:] = A(X[..., :k]) X[..., k:] per pixel, with
    the LU factors of A = P L (U + diag s) predicted per example from X[..., :k]
    (conv features, spatial mean, zero-initialized dense). log|det| = H W sum_i log|s_i|."""

    hidden: int = 32

    @nn.compact
    def __call__(self, x, inverse=False):
        k = x.shape[-1] // 2
        x_a, x_b = x[..., :k], x[..., k:]
        c = x_b.shape[-1]
        feats = nn.relu(nn.Conv(self.hidden, (3, 3))(x_a)).mean(axis=(1, 2))
        raw = nn.Dense(2 * c * c + c, kernel_init=nn.initializers.zeros)(feats)
        lower = raw[:, : c * c].reshape(-1, c, c)
        upper = raw[:, c * c: 2 * c * c].reshape(-1, c, c)
        log_s = bounded_log_scale(raw[:, 2 * c * c:])
        perm = reverse_permutation(c)
        pixels = int(np.prod(x.shape[1:-1]))
        log_det = pixels * log_s.sum(-1)
        if inverse:
            a = lu_inverse(perm, lower, upper, log_s)
            log_det = -log_det
        else:
            a = lu_matrix(perm, lower, upper, log_s)
        y_b = jnp.einsum("bij,b...j->b...i", a, x_b, precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([x_a, y_b], -1), log_det


# ----------------------------------------------------------------------------- reshapes


def squeeze(x: jax.Array) -> jax.Array:
    """Space-to-depth (B, H, W, C) -> (B, H/2, W/2, 4C); sub-pixel (dy, dx) -> channels (2dy+dx)C.."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // 2, w // 2, 4 * c)


def unsqueeze(x: jax.Array) -> jax.Array:
    """Depth-to-space, the inverse of `squeeze`."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, 2, 2, c // 4).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, 2 * h, 2 * w, c // 4)


class Squeeze(FlowLayer):
    """`squeeze` as a bijector (log_det 0)."""

    def __call__(self, x, inverse=False):
        return (unsqueeze if inverse else squeeze)(x), jnp.zeros(x.shape[:1])


class Reshape(FlowLayer):
    """(B, *in_shape) <-> (B, *out_shape) with log_det 0 (e.g. image <-> flat vector)."""

    in_shape: Sequence[int]
    out_shape: Sequence[int]

    def __call__(self, x, inverse=False):
        shape = self.in_shape if inverse else self.out_shape
        return x.reshape(x.shape[0], *shape), jnp.zeros(x.shape[:1])


# ----------------------------------------------------------------------------- composition


class Chain(FlowLayer):
    """Layers applied in order (forward) or reverse order with inverse=True; log-dets add."""

    layers: Sequence[Callable[[], FlowLayer]]

    @nn.compact
    def __call__(self, x, inverse=False):
        mods = [make() for make in self.layers]
        log_det = jnp.zeros(x.shape[:1])
        for mod in reversed(mods) if inverse else mods:
            x, ld = mod(x, inverse=inverse)
            log_det = log_det + ld
        return x, log_det


class Repeat(FlowLayer):
    """`num` copies of the bijector built by `make`, parameters stacked on a leading axis.

    On GPU/TPU the copies run under `lax.scan` (one compiled body, whatever `num`). On CPU
    they are unrolled over the same stacked parameters: XLA:CPU runs convolutions inside a
    while loop 10-30x slower (measured: 3.0 s vs 0.11 s for one RealNVP coupling pair).
    `scan=None` picks by backend. Initialization runs the copies in sequence on the data, so
    data-dependent inits (ActNorm) see each copy's real input."""

    make: Callable[[], FlowLayer]
    num: int
    scan: bool | None = None

    @nn.compact
    def __call__(self, x, inverse=False):
        template = self.make(parent=None)  # a free module: its parameters live in "stack"

        def init_stack(rng):
            def body(h, k):
                p = template.init(k, h)["params"]
                return template.apply({"params": p}, h)[0], p

            return jax.lax.scan(body, x, jax.random.split(rng, self.num))[1]

        stacked = self.param("stack", init_stack)

        def body(h, p):
            return template.apply({"params": p}, h, inverse=inverse)

        use_scan = self.scan if self.scan is not None else jax.default_backend() != "cpu"
        if use_scan:
            y, log_dets = jax.lax.scan(body, x, stacked, reverse=inverse)
            return y, log_dets.sum(0)
        log_det = jnp.zeros(x.shape[:1])
        for i in reversed(range(self.num)) if inverse else range(self.num):
            x, ld = body(x, jax.tree.map(lambda a, i=i: a[i], stacked))
            log_det = log_det + ld
        return x, log_det
