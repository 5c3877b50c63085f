"""The benchmark cases: each `case(quick) -> {"name", "unit", "jaxdnn", "peers"}`.

Peers are timed in the same process right after jaxdnn; a peer that cannot run (torch not
installed, an error) is reported as `{"missing": reason}`, never dropped.
"""

from __future__ import annotations

import traceback

import numpy as np

from benchmarks.harness import log, measure

GR = dict(start=100, target=200, p=18 / 37, games=600)  # the course's problem
Q = 0.55


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_device() -> str:
    """Where the PyTorch flow peers run: "cuda" when jaxdnn runs on a GPU and torch sees one
    (a GPU run compares GPU with GPU), else "cpu"."""
    import jax

    torch = _torch()
    gpu = jax.default_backend() == "gpu" and torch is not None and torch.cuda.is_available()
    return "cuda" if gpu else "cpu"


def _measure_torch(fn, device: str, work: float, repeats: int, **kwargs) -> dict:
    """`measure` of a torch peer on `device`, each call followed by waiting for the GPU when
    torch runs there (timed calls must include it); the result records the device."""
    def run():
        out = fn()
        if device == "cuda":
            _torch().cuda.synchronize()
        return out

    return {**measure(run, work, repeats, **kwargs), "device": device}


def _peer(name: str, peers: dict, fn) -> None:
    """Runs `fn() -> result dict` into peers[name]; a failure is recorded, not raised."""
    log(f"  peer {name} ...")
    try:
        peers[name] = fn()
    except Exception as e:  # noqa: BLE001 - a broken peer must not hide the others
        traceback.print_exc()
        peers[name] = {"missing": f"error: {type(e).__name__}: {e}"}


def _torch_peer(name: str, peers: dict, fn) -> None:
    if _torch() is None:
        peers[name] = {"missing": "torch not installed"}
        log(f"  peer {name}: torch not installed")
        return
    _peer(name, peers, fn)


# ----------------------------------------------------------------------------- gambler's ruin


def gamblers_ruin(quick: bool) -> dict:
    import jax

    from benchmarks.peers import gamblers_ruin_numpy, gamblers_ruin_python
    from jaxdnn import gamblers_ruin as gr

    n_jax = 2**20 if quick else 2**24
    n_py = 100 if quick else 1000
    n_np = 16384 if quick else 131072
    reps = 5 if quick else 10
    key = jax.random.key(0)
    log(f"gamblers_ruin: jaxdnn {n_jax} paths")
    ours = measure(lambda: gr.estimate(key, n_jax, Q, **GR), n_jax, reps, compile_time=True)
    peers: dict = {}
    _peer("python", peers, lambda: measure(
        lambda: gamblers_ruin_python.run(n_py, 0, q=Q, **GR), n_py, 5))
    _peer("numpy", peers, lambda: measure(
        lambda: gamblers_ruin_numpy.run(n_np, 0, q=Q, **GR), n_np, reps))
    return {"name": "gamblers_ruin", "unit": "paths/s", "jaxdnn": ours, "peers": peers}


def gamblers_ruin_state(quick: bool) -> dict:
    """The state-dependent tilt (8 bits): the kernel with per-game proposals and exact weights;
    no peer (the course had none), for comparing jaxdnn versions on one machine."""
    import jax

    from jaxdnn import gamblers_ruin as gr

    n = 2**16 if quick else 2**22
    key = jax.random.key(0)
    log(f"gamblers_ruin_state: jaxdnn {n} paths")
    ours = measure(lambda: gr.estimate(key, n, gr.tilt(), **GR), n, 5, compile_time=True)
    return {"name": "gamblers_ruin_state", "unit": "paths/s", "jaxdnn": ours, "peers": {}}


# ----------------------------------------------------------------------------- SGD tricks


def sgd_tricks(quick: bool) -> dict:
    import jax

    from jaxdnn import sgd_tricks

    iters, batch = sgd_tricks.DEFAULT_ITERATIONS, sgd_tricks.DEFAULT_BATCH  # 500, 16
    reps = 10 if quick else 50
    run = jax.jit(lambda k: sgd_tricks.run_sgd(k, "reparameterization", batch=batch,
                                               iterations=iters).final)
    key = jax.random.key(0)
    log(f"sgd_tricks: {iters} iterations, batch {batch}")
    ours = measure(lambda: run(key), iters, reps, warmup=3, compile_time=True)
    peers: dict = {}

    def torch_loop():
        from benchmarks.peers import sgd_tricks_torch

        # Scalar work: torch's CPU is its fastest device for it, whatever jaxdnn runs on.
        return _measure_torch(lambda: sgd_tricks_torch.run(iters, batch, sgd_tricks.DEFAULT_LR),
                              "cpu", iters, 5 if quick else 10)

    _torch_peer("torch", peers, torch_loop)
    return {"name": "sgd_tricks", "unit": "iterations/s", "jaxdnn": ours, "peers": peers}


# ----------------------------------------------------------------------------- RealNVP helpers


def _images(n: int, seed: int = 0) -> np.ndarray:
    """Synthetic uint8 digits-like images (N, 28, 28): timing does not depend on content."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def _jax_param_count(params) -> int:
    import jax

    return int(sum(np.size(a) for a in jax.tree.leaves(params)))


def _torch_realnvp(device: str = "cpu"):
    from benchmarks.peers import realnvp_torch
    from jaxdnn.flows import CONFIGS

    config = CONFIGS["realnvp"]  # build_model("realnvp")'s: uniform dequantization, as the peer's
    assert config["dequantization"] == "uniform", config
    return realnvp_torch.RealNVP(**config).to(device)


# ----------------------------------------------------------------------------- inpainting


def inpainting(quick: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxdnn import inpainting as ip
    from jaxdnn.flows import build_model

    n_images = 10 if quick else 100
    steps = 5 if quick else 300
    n_peer = 2 if quick else 3
    model = build_model("realnvp")
    x = (jnp.asarray(_images(n_images), jnp.float32) + 0.5)[..., None] / 256.0
    params = jax.jit(model.init)(jax.random.key(0), x[:1])
    mask = np.ones((28, 28, 1), bool)
    mask[14:] = False  # bottom half missing
    log_prob = ip.flow_log_prob(model, params)
    log(f"inpainting: {n_images} images x {steps} steps, one batch")
    ours = measure(lambda: ip.inpaint(log_prob, x, mask, method="pgd", steps=steps), n_images, 5,
                   compile_time=True)
    peers: dict = {}

    def torch_peer(method: str, n: int):
        """inpainting_torch.<method> (the one-image loop `run`, or `run_batched`) on n images."""
        import torch

        from benchmarks.peers import inpainting_torch

        dev = torch_device()
        net = _torch_realnvp(dev)
        imgs = torch.from_numpy(np.array(x[:n])).permute(0, 3, 1, 2).contiguous().to(dev)
        m = torch.from_numpy(mask).permute(2, 0, 1).contiguous().to(dev)
        run = getattr(inpainting_torch, method)
        return _measure_torch(lambda: run(net, imgs, m, steps=steps), dev, n, 5)

    _torch_peer("torch_loop", peers, lambda: torch_peer("run", n_peer))
    _torch_peer("torch_batched", peers, lambda: torch_peer("run_batched", n_images))
    return {"name": "inpainting", "unit": "images/s", "jaxdnn": ours, "peers": peers}


# ----------------------------------------------------------------------------- posterior sampler


def posterior(quick: bool) -> dict:
    """HMC on the flow's posterior (`inpaint_posterior`, bottom half missing): flow gradients per
    second inside the sampler, against the same batched gradient alone (the sampler's ceiling)."""
    import jax
    import jax.numpy as jnp

    from jaxdnn.flows import build_model
    from jaxdnn.flows.distribution import FlowDistribution
    from jaxdnn.inpainting.posterior import inpaint_posterior

    images, chains = (2, 8) if quick else (8, 16)
    warmup, draws, leapfrog = (4, 1, 2) if quick else (8, 2, 5)
    model = build_model("realnvp")
    x = (jnp.asarray(_images(images), jnp.float32) + 0.5)[..., None] / 256.0
    params = jax.jit(model.init)(jax.random.key(0), x[:1])
    flow = FlowDistribution(model, params)
    mask = np.ones((28, 28, 1), bool)
    mask[14:] = False
    starts = jnp.broadcast_to(x[:, None], (images, chains, 28, 28, 1))
    gradients = images * chains * (warmup + draws) * leapfrog
    log(f"posterior: {images} images x {chains} chains x {warmup + draws} iterations x {leapfrog} leapfrog steps")

    def run():
        return inpaint_posterior(flow, x, mask, jax.random.key(1), starts=starts, chains=chains, warmup=warmup,
                                 draws=draws, leapfrog=leapfrog).samples

    ours = measure(run, gradients, 5, compile_time=True)
    batch = x[np.arange(images * chains) % images]
    grad = jax.jit(jax.grad(lambda v: model.apply(params, v, method=model.log_prob).sum()))
    peers = {}
    _peer("gradient_alone", peers, lambda: measure(lambda: grad(batch), images * chains, 5))
    return {"name": "posterior", "unit": "flow gradients/s", "jaxdnn": ours, "peers": peers}


# ----------------------------------------------------------------------------- flow train step


def flow_train_step(quick: bool) -> dict:
    import jax

    from jaxdnn import train
    from jaxdnn.flows import build_model

    batch_size = 64
    reps = 3 if quick else 20
    batch = _images(batch_size)
    batch_dev = jax.device_put(batch)
    opt = train.make_optimizer(1e-3, 10_000, 100, 1.0)

    def timed_steps(model):
        """Images/s of `train.make_train_step(model, opt)` on one batch, compile time included."""
        holder = [train.init_state(model, jax.random.key(0), batch, opt)]
        step, key = train.make_train_step(model, opt), jax.random.key(1)

        def one():
            holder[0], metrics = step(holder[0], batch_dev, key)
            return metrics

        return measure(one, batch_size, reps, warmup=2, compile_time=True)

    model = build_model("realnvp")
    n_params = _jax_param_count(train.init_state(model, jax.random.key(0), batch, opt).params)
    log(f"flow_train_step: RealNVP ({n_params} params), batch {batch_size}")
    ours = timed_steps(model)
    peers: dict = {}

    def torch_step():
        import torch

        from benchmarks.peers import realnvp_torch

        dev = torch_device()
        net = _torch_realnvp(dev)
        n_torch = realnvp_torch.num_params(net)
        assert n_torch == n_params, f"parameter counts differ: torch {n_torch}, jaxdnn {n_params}"
        tstep = realnvp_torch.make_train_step(net)
        tb = torch.from_numpy(batch).to(dev)
        return _measure_torch(lambda: tstep(tb), dev, batch_size, reps, warmup=2)

    _torch_peer("torch", peers, torch_step)
    if not quick:  # what variational dequantization costs per step (the same model and batch, this run)
        log("flow_train_step: the same RealNVP with variational dequantization")
        peers["jaxdnn_variational_dequantization"] = timed_steps(build_model("realnvp", dequantization="variational"))
    return {"name": "flow_train_step", "unit": "images/s", "jaxdnn": ours, "peers": peers}


CASES = {
    "gamblers_ruin": gamblers_ruin,
    "gamblers_ruin_state": gamblers_ruin_state,
    "sgd_tricks": sgd_tricks,
    "inpainting": inpainting,
    "posterior": posterior,
    "flow_train_step": flow_train_step,
}
