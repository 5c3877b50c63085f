"""`python -m benchmarks --quick --json` runs and reports the documented JSON shape (not speed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.cases import CASES as REGISTERED

ROOT = Path(__file__).resolve().parents[1]
CASES = ["gamblers_ruin", "gamblers_ruin_state", "sgd_tricks", "inpainting", "posterior", "flow_train_step"]
PEERS = {"gamblers_ruin": {"python", "numpy"}, "gamblers_ruin_state": set(), "sgd_tricks": {"torch"},
         "inpainting": {"torch_loop", "torch_batched"}, "posterior": {"gradient_alone"}, "flow_train_step": {"torch"}}
TORCH_PEERS = {"torch", "torch_loop", "torch_batched"}


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_quick_benchmark_json_shape(tmp_path):
    out = tmp_path / "bench.json"
    # the suite's fast compilation stays on (this checks the report's shape, not its speed: 23% faster)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # three cases run (a NumPy peer, a torch peer, the sampler); the torch peers of the other two are
    # built and stepped by test_torch_peers_build_and_run_one_step
    run = ["gamblers_ruin", "sgd_tricks", "posterior"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", ",".join(run), "--json",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    assert out.with_suffix(".md").read_text().count("|") > 10
    assert set(report) == {"device", "cases"}
    for k in ("backend", "device_kind", "device_count", "jax", "jaxlib", "flax", "cpu_count"):
        assert k in report["device"]
    assert list(REGISTERED) == CASES
    assert [c["name"] for c in report["cases"]] == run
    torch_ok = _has_torch()
    for case in report["cases"]:
        assert set(case) == {"name", "unit", "jaxdnn", "peers", "ratios"}
        assert case["unit"].endswith("/s")
        ours = case["jaxdnn"]
        assert set(ours) == {"median", "min", "max", "compile_seconds"}
        assert 0 < ours["min"] <= ours["median"] <= ours["max"]
        assert ours["compile_seconds"] >= 0
        assert set(case["peers"]) == PEERS[case["name"]] == set(case["ratios"])
        for name, peer in case["peers"].items():
            if name in TORCH_PEERS and not torch_ok:
                assert peer == {"missing": "torch not installed"}
                assert case["ratios"][name] is None
                continue
            timing = {"median", "min", "max"}
            if name in TORCH_PEERS:  # torch peers say where they ran (cuda when jaxdnn runs on a GPU)
                timing.add("device")
                assert peer["device"] in ("cpu", "cuda")
            assert set(peer) == timing, (case["name"], name, peer)
            assert 0 < peer["min"] <= peer["median"] <= peer["max"]
            assert isinstance(case["ratios"][name], float) and case["ratios"][name] > 0


@pytest.fixture
def torch_one_thread():
    """torch (skipped where absent) on one thread while the test runs: these tests take single
    small steps, and torch's thread pool waiting beside the other pytest worker made them 2-4x
    slower (one step of each peer: ~4 s instead of 7-15 s on 2 cores)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


def test_torch_peers_build_and_run_one_step(torch_one_thread):
    """Each PyTorch peer of `python -m benchmarks` is built as the harness builds it and runs one
    step (CI installs the [bench] extra; skipped only where torch is absent): the flow peer has
    jaxdnn's RealNVP parameter count, and refuses a dequantization it does not mirror."""
    torch = torch_one_thread
    import jax
    import jax.numpy as jnp

    from benchmarks.cases import _torch_realnvp
    from benchmarks.peers import inpainting_torch, realnvp_torch, sgd_tricks_torch
    from jaxdnn.flows import CONFIGS, build_model

    net = _torch_realnvp("cpu")
    shapes = jax.eval_shape(build_model("realnvp").init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert realnvp_torch.num_params(net) == sum(np.size(a) for a in jax.tree.leaves(shapes))
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    loss = realnvp_torch.make_train_step(net)(batch)
    assert np.isfinite(loss) and 0 < loss < 50
    images = (batch.float() + 0.5).unsqueeze(1) / 256.0
    mask = torch.ones(1, 28, 28, dtype=torch.bool)
    mask[:, 14:] = False
    for run in (inpainting_torch.run, inpainting_torch.run_batched):
        out = run(net, images, mask, steps=1)
        assert out.shape == images.shape and bool(torch.equal(out[:, :, :14], images[:, :, :14]))
    mu, tau = sgd_tricks_torch.run(iterations=2)
    assert np.isfinite([mu, tau]).all() and (mu, tau) != (0.0, 0.0)
    with pytest.raises(ValueError, match="uniform dequantization only"):
        realnvp_torch.RealNVP(**{**CONFIGS["realnvp"], "dequantization": "variational"})


@pytest.mark.slow
def test_torch_flow_peer_is_the_same_function_as_jaxdnns_realnvp(torch_one_thread):
    """With jaxdnn's (perturbed) parameters copied in, the PyTorch RealNVP gives the same log p."""
    torch = torch_one_thread
    import jax

    from benchmarks.cases import _torch_realnvp
    from benchmarks.peers import realnvp_torch
    from jaxdnn.flows import build_model
    from jaxdnn.flows.checks import perturbed_params, random_input

    model = build_model("realnvp")
    x = random_input(jax.random.key(0), (2, 28, 28, 1), unit_interval=True)
    params = perturbed_params(model, jax.random.key(1), x)
    want = np.asarray(jax.jit(lambda p, v: model.apply(p, v, method=model.log_prob))(params, x))
    net = _torch_realnvp("cpu")
    realnvp_torch.load_flax_params(net, jax.device_get(params))
    with torch.no_grad():
        got = net.log_prob(torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=0.05)


def test_a_peer_that_errors_fails_the_run(monkeypatch, capsys):
    """A peer that raises is reported with its error and makes `python -m benchmarks` exit 1; a
    peer that is only missing (torch not installed) does not."""
    bench = pytest.importorskip("benchmarks.__main__")
    from benchmarks import cases

    def case(quick, broken=True):
        peers: dict = {}
        if broken:
            cases._peer("broken", peers, lambda: 1 / 0)
        peers["absent"] = {"missing": "torch not installed"}
        ours = {"median": 2.0, "min": 1.0, "max": 3.0, "compile_seconds": 0.0}
        return {"name": "fake", "unit": "things/s", "jaxdnn": ours, "peers": peers}

    monkeypatch.setattr(bench, "CASES", {"fake": case})
    assert bench.main(["--only", "fake"]) == 1
    assert "failed: fake/broken" in capsys.readouterr().err
    monkeypatch.setattr(bench, "CASES", {"fake": lambda quick: case(quick, broken=False)})
    assert bench.main(["--only", "fake"]) == 0
