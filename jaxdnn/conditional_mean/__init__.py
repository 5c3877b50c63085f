"""A learned conditional mean: networks trained on training images under random masks that
regress the missing pixels on the observed ones, E[x | observed pixels], for any mask.

PSNR is a squared error, and the estimate that minimizes it is the posterior mean; these networks
are trained for that, with no flow (`train(objective="psnr")`: the mean over images of log MSE,
which is what a mean PSNR scores). They are a supervised baseline for the flow's inpainting
methods (`jaxdnn.inpainting.evaluate` reports it as "conditional_mean"), never part of them.

Two kinds of network: `ConditionalMeanNet`, a dense core over the whole image with a small
convolutional `Refiner` adding a correction to its logits (starting at zero, so a core's weights
load as they were), and `UNetMeanNet`, a small U-Net. The shipped estimate is the weighted mean of
the members its card lists (`ensemble()`, `member_weights()`, float16 on disk);
`predict(images, masks)` fills with it, and `python -m experiments.train_conditional_mean --ship
MEMBER [--weight W]` trains and exports one member.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import serialization

from jaxdnn.inpainting.baselines import _fill
from jaxdnn.inpainting.masks import IMAGE_SHAPE, MASKS, check_images, check_mask, make_mask
from jaxdnn.pretrained.store import SHIPPED_DIR, read_card, read_weights

__all__ = ["OBJECTIVES", "REFINER", "ConditionalMeanNet", "Refiner", "UNetMeanNet", "card", "describe", "ensemble",
           "load", "member_file", "member_weights", "model_of", "predict", "random_masks", "train", "to_bytes"]

_HERE = SHIPPED_DIR  # the shipped members and their card live with every other shipped file
CARD = _HERE / "conditional_mean.json"  # the shipped ensemble's card: its members' files and stages, its scores
PIXELS = int(np.prod(IMAGE_SHAPE))  # 784: MNIST only
OBJECTIVES = ("mse", "psnr")  # train's objective: the pooled squared error, or the mean log MSE of the images
PSNR_EPS = 1e-4  # objective "psnr": log(MSE + this), so a near-perfect fill (> 40 dB) stops pulling
TRAINABLE = ("all", "refiner")  # train's trainable: every weight, or the refiner's alone (the core frozen)
REFINER = 32  # channels of a fresh refiner (`load` of a core alone; the training CLI's default)
DILATIONS = (1, 2, 4, 8, 1)  # the refiner's 3 x 3 convolutions: together they see 33 x 33 pixels, the image


class Refiner(nn.Module):
    """(observed pixels m * x, mask m, the core's estimate), each (B, 784) -> a correction to the core's
    logits (B, 784): `len(DILATIONS)` dilated 3 x 3 convolutions of `channels` with GELU, and a last
    3 x 3 convolution to one channel that starts at zero."""

    channels: int = 32

    @nn.compact
    def __call__(self, xm, m, estimate):
        h = jnp.stack([xm, m, estimate], -1).reshape(-1, *IMAGE_SHAPE[:2], 3)
        for d in DILATIONS:
            h = nn.gelu(nn.Conv(self.channels, (3, 3), kernel_dilation=d)(h))
        return nn.Conv(1, (3, 3), kernel_init=nn.initializers.zeros)(h).reshape(-1, PIXELS)


class ConditionalMeanNet(nn.Module):
    """(observed pixels m * x, mask m), each (B, 784) -> every pixel's estimate (B, 784) in (0, 1):
    a dense core (`depth` layers of `width` with GELU and dropout, then one logit per pixel) and, for
    `refiner` > 0 channels, a `Refiner` adding its correction to those logits; a sigmoid output."""

    width: int = 1024
    depth: int = 3
    dropout: float = 0.1
    refiner: int = REFINER

    @nn.compact
    def __call__(self, x, m, train: bool = False):
        mf = m.astype(jnp.float32)
        h = jnp.concatenate([x * mf, mf], -1)
        for _ in range(self.depth):
            h = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(nn.Dense(self.width)(h)))
        logits = nn.Dense(PIXELS)(h)
        if self.refiner:
            logits = logits + Refiner(self.refiner, name="refiner")(x * mf, mf, nn.sigmoid(logits))
        return nn.sigmoid(logits)


class UNetMeanNet(nn.Module):
    """(observed pixels m * x, mask m), each (B, 784) -> every pixel's estimate (B, 784) in (0, 1),
    the ensemble's convolutional member: a small U-Net, two 3 x 3 convolutions at each of 28, 14 and
    7 pixels (`channels`, twice and four times as many; strided on the way down), a dense bottleneck
    of `width` units with dropout over the 7 x 7 map (the whole image: which digit), and transposed
    convolutions back up, each joined to the map of its size on the way down; GELU, a sigmoid output.
    Its errors are less like the dense members' than theirs are like each other's."""

    channels: int = 16
    width: int = 512
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, m, train: bool = False):
        mf = m.astype(jnp.float32)
        c, act = self.channels, nn.gelu
        h = jnp.stack([x * mf, mf], -1).reshape(-1, *IMAGE_SHAPE[:2], 2)
        e1 = act(nn.Conv(c, (3, 3))(h))
        e1 = act(nn.Conv(c, (3, 3))(e1))  # (B, 28, 28, c)
        e2 = act(nn.Conv(2 * c, (3, 3), strides=2)(e1))
        e2 = act(nn.Conv(2 * c, (3, 3))(e2))  # (B, 14, 14, 2c)
        e3 = act(nn.Conv(4 * c, (3, 3), strides=2)(e2))
        e3 = act(nn.Conv(4 * c, (3, 3))(e3))  # (B, 7, 7, 4c)
        g = nn.Dropout(self.dropout, deterministic=not train)(act(nn.Dense(self.width)(e3.reshape(len(e3), -1))))
        g = act(nn.Dense(e3[0].size)(g)).reshape(e3.shape)
        d3 = act(nn.Conv(4 * c, (3, 3))(jnp.concatenate([e3, g], -1)))
        d2 = act(nn.ConvTranspose(2 * c, (3, 3), strides=(2, 2))(d3))
        d2 = act(nn.Conv(2 * c, (3, 3))(jnp.concatenate([d2, e2], -1)))
        d1 = act(nn.ConvTranspose(c, (3, 3), strides=(2, 2))(d2))
        d1 = act(nn.Conv(c, (3, 3))(jnp.concatenate([d1, e1], -1)))
        return nn.sigmoid(nn.Conv(1, (3, 3))(d1).reshape(-1, PIXELS))


def random_masks(key: jax.Array, batch: int, named: int = 0) -> jax.Array:
    """Training masks (batch, 784), True = observed, in three families taking turns by row: a
    missing rectangle (sides 4..28, anywhere), a missing side (top, bottom, left or right, cut at
    7..21), missing pixels at random (each with one probability drawn from [0.1, 0.9]). The first
    `named` rows instead take the named masks (`masks.MASKS`) in turn, random50 drawn afresh."""
    if not 0 <= named <= batch:
        raise ValueError(f"named must lie in 0..{batch}, got {named}")
    ks = jax.random.split(key, 8)
    yy, xx = jnp.arange(28)[None, :, None], jnp.arange(28)[None, None, :]
    h = jax.random.randint(ks[0], (batch, 1, 1), 4, 29)
    w = jax.random.randint(ks[1], (batch, 1, 1), 4, 29)
    y0 = (jax.random.uniform(ks[2], (batch, 1, 1)) * (29 - h)).astype(int)
    x0 = (jax.random.uniform(ks[3], (batch, 1, 1)) * (29 - w)).astype(int)
    box = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
    cut = jax.random.randint(ks[4], (batch, 1, 1), 7, 22)
    side = jax.random.randint(ks[5], (batch, 1, 1), 0, 4)
    half = jnp.select([side == 0, side == 1, side == 2], [yy < cut, yy >= cut, xx < cut], xx >= cut)
    p = jax.random.uniform(ks[6], (batch, 1, 1), minval=0.1, maxval=0.9)
    scattered = jax.random.uniform(ks[7], (batch, 28, 28)) < p
    family = jnp.arange(batch)[:, None, None] % 3
    missing = jnp.select([family == 0, family == 1], [box, half], scattered).reshape(batch, PIXELS)
    if named:
        with jax.ensure_compile_time_eval():  # constants, also when traced inside `train`'s step
            fixed = np.stack([~np.asarray(make_mask(n)).reshape(PIXELS) for n in MASKS if n != "random50"])
        rank = jnp.argsort(jnp.argsort(jax.random.uniform(jax.random.fold_in(key, 8), (batch, PIXELS)), axis=1), axis=1)
        which = jnp.arange(batch) % len(MASKS)
        chosen = jnp.where((which == len(fixed))[:, None], rank < PIXELS // 2,
                           jnp.asarray(fixed)[jnp.minimum(which, len(fixed) - 1)])
        missing = jnp.where((jnp.arange(batch) < named)[:, None], chosen, missing)
    return ~missing


def train(images, steps: int, seed: int = 1, params=None, *, init_seed: int = 0, lr: float = 1e-3,
          batch_size: int = 256, warmup: int = 500, weight_decay: float = 1e-4, named: int = 0, objective: str = "mse",
          trainable: str = "all", model: ConditionalMeanNet | None = None,
          callback: Callable[[int, float, dict], None] | None = None):
    """Parameters after `steps` of AdamW (a warm-up of `warmup` steps to `lr`, then a cosine to 0)
    on `objective` over the missing pixels: "mse", their squared error pooled over the batch (the
    estimate it rewards is the posterior mean), or "psnr", the batch mean of each image's log MSE
    (minus the mean PSNR, up to a constant: what the scores average; images already filled well
    weigh as much as the hard ones). images: float (N, 28, 28, 1) in [0, 1], the training split;
    step i (1-based) draws its batch, masks and dropout from fold_in(key(seed), i).
    params: continue from these (a fresh optimizer and schedule); None: initialise from key(init_seed).
    named: rows of each batch under the named masks (`random_masks`); 0 = random families only.
    trainable: "all", or "refiner" (the core's weights stay as they are; its dropout still acts).
    callback(step, loss, params) is called after every step (progress, checkpoints)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= warmup or warmup < 0:
        raise ValueError(f"steps must be an integer above warmup ({warmup}), got {steps!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    model = ConditionalMeanNet() if model is None else model
    if trainable == "refiner" and not getattr(model, "refiner", 0):
        raise ValueError("trainable='refiner' needs a model with a refiner (refiner > 0 channels)")
    x_all = jnp.asarray(check_images(images, "images")).reshape(-1, PIXELS)
    if params is None:
        params = model.init(jax.random.key(init_seed), x_all[:2], jnp.ones((2, PIXELS), bool))
    opt, step = _optimizer_and_step(model, steps, lr, batch_size, warmup, weight_decay, named, objective, trainable)
    state = opt.init(params)

    key = jax.random.key(seed)
    for i in range(1, steps + 1):
        params, state, value = step(params, state, x_all, jax.random.fold_in(key, i))
        if callback is not None:
            callback(i, value, params)
    return params


@functools.cache
def _optimizer_and_step(model, steps, lr, batch_size, warmup, weight_decay, named, objective, trainable):
    """`train`'s optimizer and jitted step, built once per setting (repeated calls do not recompile)."""
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps), weight_decay=weight_decay)
    if trainable == "refiner":  # the core's updates are zero (and AdamW's decay skips it)
        labels = lambda p: {"params": {k: "train" if k == "refiner" else "keep" for k in p["params"]}}  # noqa: E731
        opt = optax.multi_transform({"train": opt, "keep": optax.set_to_zero()}, labels)

    @jax.jit
    def step(params, state, data, key):
        k_batch, k_mask, k_drop = jax.random.split(key, 3)
        x = data[jax.random.randint(k_batch, (batch_size,), 0, data.shape[0])]
        m = random_masks(k_mask, batch_size, named)

        def loss(p):
            squared = (model.apply(p, x, m, True, rngs={"dropout": k_drop}) - x) ** 2 * ~m
            if objective == "mse":
                return squared.sum() / (~m).sum()
            return jnp.log(squared.sum(1) / jnp.maximum((~m).sum(1), 1) + PSNR_EPS).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    return opt, step


def to_bytes(params) -> bytes:
    """The weights as shipped: msgpack of float16 arrays (half the bytes; PSNR moves by < 0.001 dB)."""
    return serialization.to_bytes(jax.tree.map(lambda a: np.asarray(a, np.float16), jax.device_get(params)))


def _template(model: ConditionalMeanNet | UNetMeanNet):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, PIXELS)), jnp.ones((1, PIXELS), bool))


def model_of(params, dropout: float = ConditionalMeanNet.dropout) -> ConditionalMeanNet | UNetMeanNet:
    """The network these parameters belong to: a `UNetMeanNet` of their channels and bottleneck width,
    or a `ConditionalMeanNet`, a dense core of their width and depth and a refiner of as many channels
    as their refiner has (none if they have none). Dropout leaves no weights: `dropout` (training
    only; the estimates do not depend on it)."""
    p = params["params"]
    if _is_unet(p):
        return UNetMeanNet(channels=p["Conv_0"]["kernel"].shape[-1], width=p["Dense_0"]["kernel"].shape[-1],
                           dropout=dropout)
    depth = sum(1 for k in p if k.startswith("Dense_")) - 1
    refiner = p.get("refiner")
    return ConditionalMeanNet(width=p["Dense_0"]["kernel"].shape[-1] if depth else ConditionalMeanNet.width,
                              depth=depth, dropout=dropout,
                              refiner=0 if refiner is None else refiner["Conv_0"]["kernel"].shape[-1])


def _is_unet(p: dict) -> bool:
    return "ConvTranspose_0" in p


def describe(model: ConditionalMeanNet | UNetMeanNet) -> str:
    """One line for a card: the network's kind and shape."""
    if isinstance(model, UNetMeanNet):
        return (f"UNetMeanNet (convolutions of {model.channels}, {2 * model.channels} and {4 * model.channels} "
                f"channels at 28, 14 and 7 pixels; dense bottleneck: width {model.width}, dropout {model.dropout})")
    return (f"ConditionalMeanNet (dense core: width {model.width}, depth {model.depth}, dropout {model.dropout}; "
            f"refiner: {model.refiner} channels, dilations {DILATIONS})")


def member_file(member: int) -> Path:
    """Where the shipped ensemble's member (1, 2, ...) lies: conditional_mean.msgpack for the first,
    conditional_mean_<member>.msgpack for the others."""
    if isinstance(member, bool) or not isinstance(member, int) or member < 1:
        raise ValueError(f"member must be a positive integer, got {member!r}")
    return _HERE / ("conditional_mean.msgpack" if member == 1 else f"conditional_mean_{member}.msgpack")


def ensemble() -> tuple:
    """The shipped ensemble: each member's parameters (float32), in the card's order, read by the
    shared loader (`jaxdnn.pretrained.store.read_weights`: checked against the card's sha256)."""
    return tuple(_read_member(_HERE / m["file"], CARD, _version(_HERE / m["file"]), _version(CARD))
                 for m in card()["members"])


def _version(path: Path):
    stat = path.stat() if path.is_file() else None
    return None if stat is None else (stat.st_mtime_ns, stat.st_size)


@functools.cache
def _read_member(path: Path, card_path: Path, *versions):
    del versions  # a file written anew is read anew
    return read_weights(path, lambda raw: _template(model_of(raw)), read_card(card_path),
                        expected="a conditional-mean network")


def member_weights() -> tuple[float, ...]:
    """The shipped members' weights in `predict`'s mean, in the card's order (each member's
    "weight"; equal where the card gives none)."""
    members = card()["members"]
    given = [m.get("weight") for m in members]
    return tuple(1 / len(members) for _ in members) if None in given else tuple(float(w) for w in given)


def load(path, refiner: int | None = None):
    """One network's parameters (float32) from `path` (written by `to_bytes`, or the float32 msgpack
    of `experiments.train_conditional_mean`). Weights of a core alone (no refiner) get a fresh
    refiner of `refiner` channels (None: REFINER) whose correction is zero: the same estimates.
    Weights with a refiner keep its width (`refiner`, if given, must match it). Read once per file
    version (a file written anew is read anew)."""
    if refiner is not None and (isinstance(refiner, bool) or not isinstance(refiner, int) or refiner < 1):
        raise ValueError(f"refiner must be a positive number of channels, got {refiner!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: python -m experiments.train_conditional_mean --ship")
    stat = path.stat()
    return _load(path.resolve(), stat.st_mtime_ns, stat.st_size, refiner)


@functools.cache
def _load(path: Path, mtime_ns: int, size: int, refiner: int | None):
    raw = serialization.msgpack_restore(path.read_bytes())
    if not (isinstance(raw, dict) and isinstance(raw.get("params"), dict)):
        raise ValueError(f"{path}: not the conditional-mean network's weights (no params)")
    unet = _is_unet(raw["params"])
    if unet and refiner is not None:
        raise ValueError(f"{path}: a UNetMeanNet has no refiner (refiner={refiner} asked)")
    if "refiner" not in raw["params"] and not unet:
        fresh = Refiner(REFINER if refiner is None else refiner).init(
            jax.random.key(0), *3 * (jnp.zeros((1, PIXELS)),))["params"]
        raw = {"params": {**raw["params"], "refiner": serialization.to_state_dict(fresh)}}
    try:
        model = model_of(raw)
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: these weights are not of the shipped network's shapes ({e!r})") from None
    if refiner is not None and refiner != getattr(model, "refiner", None):
        raise ValueError(f"{path}: its refiner has {model.refiner} channels, not {refiner}")
    template = _template(model)
    params = serialization.from_state_dict(template, raw)
    if jax.tree.map(lambda a: a.shape, params) != jax.tree.map(lambda a: a.shape, template):
        raise ValueError(f"{path}: these weights are not of the shipped network's shapes ({model})")
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def card() -> dict:
    """The shipped ensemble's card (`jaxdnn.pretrained.store.Card` as JSON): "members" (each one's
    file, weight, training stage and validation PSNR alone) and "metrics" (the ensemble's PSNR
    per mask, "psnr_<mask>", each with the command that measures it)."""
    return read_card(CARD).to_dict()


@jax.jit
def _estimate(params, x, m):
    return model_of(params).apply(params, x, m)


def predict(images, masks, params=None, weights=None) -> jax.Array:
    """The network's fill: observed pixels kept, missing ones its estimate. images float (B, 28,
    28, 1) or (28, 28, 1) in [0, 1]; masks as `check_mask` (True = observed); same shape out.
    params: one network's parameters, a list or tuple of networks' (an ensemble: the weighted mean
    of their estimates), or None: the shipped ensemble. weights: one non-negative number per
    network, normalized to sum 1 (None: the card's `member_weights()` for the shipped ensemble, equal
    weights for a list)."""
    images = check_images(images, "images")
    batch = images.reshape(-1, *images.shape[-3:])
    if batch.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"the conditional-mean network fills MNIST images {IMAGE_SHAPE}, got {batch.shape[1:]}")
    masks = jnp.broadcast_to(check_mask(masks, batch.shape, "masks"), batch.shape)
    members = ensemble() if params is None else tuple(params) if isinstance(params, (list, tuple)) else (params,)
    if not members:
        raise ValueError("params: an empty ensemble")
    if weights is None:
        weights = member_weights() if params is None else (1.0,) * len(members)
    w = np.asarray(weights, np.float64)
    if w.shape != (len(members),) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"weights: one non-negative number per network ({len(members)}), not all 0; got {weights!r}")
    x, m = batch.reshape(-1, PIXELS), masks.reshape(-1, PIXELS)
    estimate = sum(float(wi) * _estimate(p, x, m) for wi, p in zip(w / w.sum(), members, strict=True))
    return _fill(images, masks, estimate.reshape(batch.shape))
