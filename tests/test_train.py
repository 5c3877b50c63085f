"""Training: the loss decreases, a killed run resumes to identical parameters, one or two devices
agree, and the shipped weights reproduce their cards."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import compilation_cache_env

from jaxdnn import pretrained, train
from jaxdnn.flows import build_model

TINY = ["--config.hidden=8", "--config.depth=1", "--config.batch_size=8", "--config.log_every=1",
        "--config.warmup=2", "--config.eval_every=1000", "--config.lr=0.003"]


def test_train_steps_on_synthetic_data_decrease_the_loss():
    model = build_model("glow", levels_count=1, hidden=8, steps_per_level=1)
    rng = np.random.default_rng(0)
    images = (rng.random((16, 28, 28)) < 0.2).astype(np.uint8) * 255  # sparse binary "digits"
    opt = train.make_optimizer(1e-2, 30, 2, 100.0)
    state = train.init_state(model, jax.random.key(0), images, opt)
    step = train.make_train_step(model, opt)
    losses = []
    for _ in range(30):
        state, metrics = step(state, images, jax.random.key(1))
        losses.append(float(metrics["bpd"]))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.03, losses  # step-to-step noise is ~0.01
    assert train.skipped_updates(state) == (0, 0)


def test_non_finite_update_is_skipped_and_counted():
    model = build_model("nice", hidden=8, depth=1)
    images = np.zeros((4, 28, 28), np.uint8)
    opt = train.make_optimizer(1e-3, 10, 1, 100.0)
    state = train.init_state(model, jax.random.key(0), images, opt)
    state = state._replace(params=jax.tree.map(lambda a: a * np.nan, state.params))
    before = jax.tree.map(np.asarray, state.params)
    step = train.make_train_step(model, opt)
    state, metrics = step(state, images, jax.random.key(1))
    assert not bool(metrics["ok"]) and train.skipped_updates(state) == (1, 1)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before, jax.tree.map(np.asarray, state.params))
    state, _ = step(state, images, jax.random.key(2))
    assert train.skipped_updates(state) == (2, 2)


def _command(workdir, *extra):
    return [sys.executable, "-m", "experiments.train_flow", "--model", "nice", "--workdir", str(workdir), "--quiet",
            *TINY, "--config.steps=6", *extra]


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _run(workdir, *extra, env=None):
    """One training process; the runs of a test share a compilation cache (tmp/jax_cache, one
    after the other), so a resumed run loads the programs the first run compiled."""
    cache = compilation_cache_env(workdir.parent / "jax_cache")
    out = subprocess.run(_command(workdir, *extra), capture_output=True, text=True,
                         env={**os.environ, **cache, **(env or {})}, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return _metrics(workdir)


def _params(workdir):
    """(final.json, the latest orbax checkpoint's state as a tree of host arrays)."""
    import orbax.checkpoint as ocp

    latest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    path, checkpointer = (workdir / "checkpoints" / str(latest) / "state").absolute(), ocp.StandardCheckpointer()
    as_numpy = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), checkpointer.metadata(path).item_metadata)
    state = checkpointer.restore(path, as_numpy)
    return json.loads((workdir / "final.json").read_text()), state


@pytest.mark.slow
@pytest.mark.mnist
def test_killed_run_resumes_bit_identically_and_two_processes_of_two_devices_train_like_one(tmp_path):
    """One run of 6 steps is the reference. A run killed after 3 steps and resumed ends with the
    same state bit for bit, and exports as its own figure. Two local processes of two devices each
    (each process loading its half of every batch; only process 0 writes) log the same training
    losses and the same test bits/dim."""
    from test_distributed import free_port

    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    one_device = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags}  # on the host; each run picks its device count
    whole = _run(tmp_path / "whole", env=one_device)
    _run(tmp_path / "killed", "--stop-after", "3", env=one_device)
    assert not (tmp_path / "killed" / "final.json").exists()
    resumed = _run(tmp_path / "killed", env=one_device)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    final_whole, ckpt_whole = _params(tmp_path / "whole")
    final_resumed, ckpt_resumed = _params(tmp_path / "killed")
    jax.tree.map(np.testing.assert_array_equal, ckpt_whole, ckpt_resumed)  # bit-identical state
    assert final_whole["test_bpd"] == final_resumed["test_bpd"]
    exported = subprocess.run(_command(tmp_path / "whole", "--export", "--export-dir", str(tmp_path)),
                              env={**os.environ, **one_device}, capture_output=True, text=True, check=False)
    assert exported.returncode == 0, exported.stderr[-2000:]
    card = json.loads((tmp_path / "nice.json").read_text())  # the checkpoint, rescored: the run's own figure
    assert card["steps"] == 6 and card["test_bpd"] == round(final_whole["test_bpd"], 5)
    assert (tmp_path / "nice.msgpack").stat().st_size > 0

    two_devices = {**one_device, "XLA_FLAGS": xla_flags + " --xla_force_host_platform_device_count=2"}
    peers = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--init-timeout", "50"]
    procs = [subprocess.Popen(_command(tmp_path / "two_processes", *peers, "--process-id", str(i)),
                              env={**os.environ, **two_devices}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[1][0].strip() == ""  # process 1 prints nothing on stdout
    final_two = _params(tmp_path / "two_processes")[0]
    assert final_two["processes"] == 2 and final_two["devices"].startswith("4 x")
    np.testing.assert_allclose([r["train_bpd"] for r in _metrics(tmp_path / "two_processes")],
                               [r["train_bpd"] for r in whole], rtol=1e-4)
    assert final_two["test_bpd"] == pytest.approx(final_whole["test_bpd"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.mnist
@pytest.mark.parametrize("name", pretrained.available())
def test_pretrained_model_reproduces_its_card(name):
    """The shipped weights score what their card says on the first 256 test images, with the
    card's own evaluation key."""
    result = pretrained.test_bpd(name, limit=256)
    assert abs(result["bpd"] - pretrained.card(name)["test_bpd_first256"]) < 1e-3


@pytest.mark.parametrize("flag, match", [
    ("--config.preprocessing=Logit", "must be one of 'none', 'logit'"),
    ("--config.hidden=4.5", "'hidden' must be int"),
    ("--config.stpes=20", "did you mean 'steps'"),
    ("--config.lr=fast", "'lr' must be float"),
])
def test_bad_configs_exit_2_with_one_line(flag, match, tmp_path, capsys):
    from experiments import train_flow

    with pytest.raises(SystemExit) as exit_:
        train_flow.main(["--model", "nice", flag, "--workdir", str(tmp_path / "run")])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and len(stderr.strip().splitlines()) == 1 and match in stderr, stderr
    assert not (tmp_path / "run").exists()  # nothing written
