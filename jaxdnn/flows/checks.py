"""Problem 4 verified numerically: every layer's reported log-det against slogdet of the
brute-force Jacobian (`jax.jacfwd` on the flattened input), in float64 so the comparison
tests the formula rather than float32 rounding. Shared by the tests and
`experiments.glow_logdet`."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxdnn.flows import layers as L
from jaxdnn.flows import models as M


def layer_cases() -> dict[str, tuple]:
    """name -> (module, input shape (1, ...)), every bijective layer on a small input."""
    cond = dict(hidden=8, depth=1)
    return {
        "additive_coupling_mlp": (L.Coupling(mask=(0, 2, 4), affine=False, conditioner="mlp", **cond), (1, 6)),
        "affine_coupling_checkerboard": (L.Coupling(mask=L.checkerboard_mask(1, 0), conditioner="resnet", **cond),
                                         (1, 4, 4, 4)),
        "affine_coupling_channel": (L.Coupling(mask=L.half_mask(4), conditioner="resnet", **cond), (1, 4, 4, 4)),
        "affine_coupling_glow": (L.Coupling(mask=L.half_mask(4), conditioner="glow", hidden=8), (1, 4, 4, 4)),
        "split_prior": (L.Coupling(mask=L.half_mask(4), conditioner="conv"), (1, 4, 4, 4)),
        "scaling": (L.Scaling(), (1, 6)),
        "actnorm": (L.ActNorm(), (1, 4, 4, 3)),
        "invconv1x1_lu": (L.InvConv1x1(), (1, 3, 3, 4)),
        "conditional_invconv1x1": (L.ConditionalInvConv1x1(hidden=8), (1, 3, 3, 6)),
        "squeeze": (L.Squeeze(), (1, 4, 4, 2)),
        "logit": (L.Logit(), (1, 3, 3, 1)),
        "repeat_glow_step": (L.Repeat(make=partial(L.Chain, layers=(
            L.ActNorm, L.InvConv1x1, partial(L.Coupling, mask=(0, 1), conditioner="glow", hidden=8))), num=2),
            (1, 4, 4, 4)),
    }


def model_cases() -> dict[str, M.MultiScaleFlow]:
    """Tiny configurations of every model (the real ones differ only in widths and counts)."""
    return {
        "nice": M.NICE(hidden=16, depth=1, couplings=4),
        "realnvp": M.RealNVP(hidden=8, pairs=1, final_pairs=1, blocks=1),
        "glow": M.Glow(hidden=8, steps_per_level=2),
    }


def random_input(key: jax.Array, shape: tuple, unit_interval: bool = False) -> jax.Array:
    if unit_interval:
        return jax.random.uniform(key, shape, minval=0.05, maxval=0.95)
    return jax.random.normal(key, shape)


@jax.jit
def perturb(params, key: jax.Array, scale: float = 0.1):
    """params plus N(0, scale^2) noise on every leaf (jitted: one compilation a tree, not a leaf shape)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return tree.unflatten([a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)])


def perturbed_params(module, key: jax.Array, x: jax.Array, scale: float = 0.1):
    """Initialized parameters plus noise, so no layer is the identity it starts as."""
    k_init, k_noise = jax.random.split(key)
    return perturb(jax.jit(module.init)(k_init, x), k_noise, scale)


def logdet_check(apply_fn, x: jax.Array) -> tuple[float, float]:
    """(reported log_det, slogdet of the brute-force Jacobian) for `apply_fn(x (1, ...)) ->
    (y or list of latents, log_det (1,))`, both in float64."""
    with jax.enable_x64(True):
        x = np.asarray(x, np.float64)

        def flat(v):
            out, _ = apply_fn(v.reshape(x.shape))
            return jnp.concatenate([o.reshape(-1) for o in (out if isinstance(out, list) else [out])])

        _, reported = jax.jit(apply_fn)(x)
        sign, brute = jnp.linalg.slogdet(jax.jit(jax.jacfwd(flat))(x.reshape(-1)))
        return float(reported[0]), float(brute) if float(sign) != 0 else float("-inf")


def to64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)  # NumPy: no compilation per leaf shape


GLOW_STEP = ("actnorm", "invconv1x1_lu", "affine_coupling_glow")


def all_checks(key: jax.Array | None = None, models: bool = True, layers=None) -> list[dict]:
    """Problem 4 table: each layer (those named in `layers`, default all) and model, plus (b)
    reshape-order invariance, (c) the 1x1 conv formula m n sum log|s|, (d) the conditional coupling."""
    key = jax.random.key(0) if key is None else key
    rows = []

    def row(name, shape, reported, brute):
        rows.append({"name": name, "shape": list(shape), "reported": reported, "brute_force": brute,
                     "abs_error": abs(reported - brute)})

    for i, (name, (mod, shape)) in enumerate(layer_cases().items()):
        if layers is not None and name not in layers:
            continue
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        x = random_input(k1, shape, unit_interval=name == "logit")
        params = perturbed_params(mod, k2, x)
        with jax.enable_x64(True):
            p64 = to64(params)
            rep, bf = logdet_check(lambda v, p64=p64, mod=mod: mod.apply(p64, v), x)
        row(name, shape, rep, bf)
    for i, (name, model) in enumerate(model_cases().items() if models else []):
        k1, k2 = jax.random.split(jax.random.fold_in(key, 100 + i))
        x = random_input(k1, (1, 28, 28, 1), unit_interval=True)
        params = perturbed_params(model, k2, x, scale=0.02)
        with jax.enable_x64(True):
            p64 = to64(params)
            rep, bf = logdet_check(lambda v, p64=p64, model=model: model.apply(p64, v, method=model.encode), x)
        row(f"model_{name}", (1, 28, 28, 1), rep, bf)

    # (b) h on R^{a x b x c} defined through two reshape orders (C and Fortran) has the same |det|.
    k1, k2 = jax.random.split(jax.random.fold_in(key, 200))
    w = jax.random.normal(k1, (24, 24)) / 5 + jnp.eye(24)
    x = jax.random.normal(k2, (2, 3, 4))
    with jax.enable_x64(True):
        w64, x64 = jnp.asarray(w, jnp.float64), jnp.asarray(x, jnp.float64)
        for order in ("C", "F"):
            def h(v, order=order):
                return (w64 @ v.reshape(-1, order=order)).reshape(x.shape, order=order)

            det_c = float(jnp.linalg.slogdet(jax.jacfwd(lambda v: h(v.reshape(x.shape)).reshape(-1))(
                x64.reshape(-1)))[1])
            row(f"b_reshape_order_{order}", x.shape, float(jnp.linalg.slogdet(w64)[1]), det_c)

    # (c) the 1x1 convolution with kernel A on C x m x n: log|det| = m n sum log|s_i|.
    mod = L.InvConv1x1()
    x = random_input(jax.random.fold_in(key, 300), (1, 5, 3, 4))
    params = perturbed_params(mod, jax.random.fold_in(key, 301), x, scale=0.3)
    log_s = np.asarray(params["params"]["log_s"], np.float64)
    with jax.enable_x64(True):
        p64 = to64(params)
        _, bf = logdet_check(lambda v: mod.apply(p64, v), x)
    row("c_invconv1x1_formula_mn_sum_log_s", x.shape, float(5 * 3 * log_s.sum()), bf)

    # (d) conditional coupling: L, U, s predicted from X[:C]; log|det| = m n sum log|s_i(X[:C])|.
    mod = L.ConditionalInvConv1x1(hidden=8)
    x = random_input(jax.random.fold_in(key, 400), (1, 3, 4, 6))
    params = perturbed_params(mod, jax.random.fold_in(key, 401), x, scale=0.3)
    with jax.enable_x64(True):
        p64 = to64(params)
        rep, bf = logdet_check(lambda v: mod.apply(p64, v), x)
    row("d_conditional_coupling", x.shape, rep, bf)
    return rows
