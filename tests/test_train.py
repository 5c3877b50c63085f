"""Training: the loss decreases, a killed run resumes to identical parameters, one or two devices
agree, and the shipped weights reproduce their cards."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import compilation_cache_env
from flax import linen as nn

from jaxdnn import pretrained, train
from jaxdnn.flows import build_model

TINY = ["--config.hidden=8", "--config.depth=1", "--config.batch_size=8", "--config.log_every=1",
        "--config.warmup=2", "--config.eval_every=5", "--config.eval_images=1", "--config.lr=0.003"]


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
    """The tiny NICE run: the recipe file with --config.KEY=VALUE overrides."""
    return [sys.executable, "-m", "experiments.train_flow", "--config", "experiments/configs/nice.py", "--workdir",
            str(workdir), "--quiet", *TINY, "--config.steps=6", *extra]


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
    same state bit for bit. Two local processes of two devices each
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
    assert final_whole["val_bpd"] == final_resumed["val_bpd"]  # (export: the README recipe's test)

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
    assert final_two["val_bpd"] == pytest.approx(final_whole["val_bpd"], rel=1e-5)
    # the periodic evaluation at step 5 scores one validation image: padded, not dropped, on 4 devices
    one_image = [r["val_bpd"] for r in _metrics(tmp_path / "two_processes") if r["step"] == 5]
    assert one_image == pytest.approx([r["val_bpd"] for r in whole if r["step"] == 5], rel=1e-5)


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
    ("--config.lr=-1", "'lr' must be > 0"),
    ("--config.lr=inf", "'lr' must be > 0"),
    ("--config.steps=-5", "'steps' must be >= 0"),
    ("--config.batch_size=0", "'batch_size' must be >= 1"),
    ("--config.ema=1", "'ema' must be in [0.0, 1.0)"),
    ("--config.hidden=0", "'hidden' must be >= 1"),
    ("--init-from=nowhere", "neither a shipped model"),
    ("--init-from=glow", "is a glow, not a nice"),
])
def test_bad_configs_exit_2_with_one_line(flag, match, tmp_path, capsys):
    """Bad values, types, keys and sources, given with --model or over a recipe file."""
    from experiments import train_flow

    for head in (["--model", "nice"], ["--config", "experiments/configs/nice.py"]):
        with pytest.raises(SystemExit) as exit_:
            train_flow.main([*head, flag, "--workdir", str(tmp_path / "run")])
        stderr = capsys.readouterr().err
        assert exit_.value.code == 2 and len(stderr.strip().splitlines()) == 1 and match in stderr, stderr
        assert not (tmp_path / "run").exists()  # nothing written


def test_an_exported_card_belongs_to_its_weights(tmp_path):
    """export writes the weights' sha256 into the card; a card beside other weights (one file copied
    without the other) is refused by `card` and `load`, naming both files."""
    model = build_model("nice", **pretrained.card("nice")["model_config"])
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    info = {**pretrained.card("nice"), "steps": 7}
    path = pretrained.export(params, info, "small", tmp_path)
    assert pretrained.card(path)["steps"] == 7 and len(pretrained.card(path)["weights"]["small.msgpack"]) == 64
    other = jax.tree.map(lambda a: a + 1, params)
    pretrained.export(other, info, "other", tmp_path)
    path.with_suffix(".json").write_text((tmp_path / "other.json").read_text())  # the card of other weights
    for read in (pretrained.card, pretrained.load):
        with pytest.raises(ValueError, match=r"small.msgpack: its card is the card of other weights"):
            read(path)


@pytest.mark.parametrize("name", ["nice", "realnvp", "glow"])
def test_recipe_files_are_complete_checked_configs(name):
    from experiments import train_flow
    from jaxdnn import trainer

    recipe = train_flow.load_config_file(f"experiments/configs/{name}.py")
    assert recipe.pop("model") == name
    config = trainer.default_config(name, **recipe)
    assert {**config["model_config"], **config["train_config"]} == recipe  # every key, nothing unknown


def test_ema_decay_forgets_the_start_then_settles():
    decays = [float(train.ema_decay(0.999, jnp.asarray(c))) for c in (0, 10, 10_000)]
    assert decays[0] == pytest.approx(0.1) and decays[1] == pytest.approx(11 / 20) and decays[2] == pytest.approx(0.999)
    assert float(train.ema_decay(0.0, jnp.asarray(5))) == 0.0


def test_learning_rate_continued_from_a_step_carries_the_cosine_on():
    whole, continued = train.learning_rate(1e-3, 1000, 10), train.learning_rate(1e-3, 1000, 10, start_step=600)
    assert float(continued(0)) == 0.0  # a fresh optimizer warms up again
    np.testing.assert_allclose(float(continued(50)), float(whole(650)), rtol=1e-6)  # then the same schedule
    np.testing.assert_allclose(float(whole(1000)), 1e-4, rtol=1e-5)  # lr/10 at the last step


def test_a_warmup_as_long_as_the_run_warns_and_is_capped():
    """--config.steps=100 under the default 300-step warm-up: the rate would peak at 1/3 of lr,
    never reached; capped to a tenth of the run with a warning naming both. Shorter: unchanged."""
    with pytest.warns(UserWarning, match=r"warmup 300 is not shorter than this run's 100 steps.*capped to 10"):
        schedule = train.learning_rate(1e-3, 100, 300)
    assert float(schedule(10)) == pytest.approx(float(optax.cosine_decay_schedule(1e-3, 100, alpha=0.1)(10)))
    with pytest.warns(UserWarning, match="run's 40 steps"):  # a continued run counts its own steps
        train.learning_rate(1e-3, 100, 50, start_step=60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(train.learning_rate(1e-3, 1000, 300)(150)) == pytest.approx(0.5e-3, rel=0.06)  # half warmed up


def test_the_averaged_weights_follow_the_raw_ones():
    model = build_model("nice", hidden=8, depth=1)
    images = (np.random.default_rng(0).random((8, 28, 28)) < 0.2).astype(np.uint8) * 255
    opt = train.make_optimizer(1e-2, 20, 1, 100.0)
    state = train.init_state(model, jax.random.key(0), images, opt)
    start = jax.tree.map(np.asarray, state.params)
    step = train.make_train_step(model, opt, ema=0.9)
    for _ in range(3):
        previous = jax.tree.map(np.asarray, state.ema_params)
        state, _ = step(state, images, jax.random.key(1))
    # after update c (here the third, c = 3): ema = d * previous + (1 - d) * params, d = min(0.9, 4/13)
    d = 4 / 13
    jax.tree.map(lambda e, p, q: np.testing.assert_allclose(e, d * q + (1 - d) * np.asarray(p), rtol=1e-5, atol=1e-7),
                 state.ema_params, state.params, previous)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.ema_params, start)
    assert max(jax.tree.leaves(moved)) > 0


def test_default_config_is_complete_and_checked():
    from jaxdnn import trainer

    config = trainer.default_config("realnvp", lr=5e-4)
    assert config["train_config"]["lr"] == 5e-4 and config["model_config"]["hidden"] == 48
    assert config["init_step"] == 0 and config["init_from"] is None
    for bad, match in (({"warmpu": 10}, "did you mean 'warmup'"), ({"lr": "5e-4"}, "'lr' must be float"),
                       ({"warmup": -1}, "'warmup' must be >= 0")):
        with pytest.raises(ValueError, match=match):
            trainer.default_config("realnvp", **bad)
    with pytest.raises(ValueError, match="model required"):
        trainer.check_run_config({"train_config": {}})
    # Continuing shipped weights fixes the flow, but a variational dequantizer may join them.
    config = trainer.default_config("realnvp", init_from="realnvp", dequantization="variational")
    assert config["model_config"]["dequantization"] == "variational" and config["init_step"] > 0
    with pytest.raises(ValueError, match="fixes the model config; drop hidden"):
        trainer.default_config("realnvp", init_from="realnvp", hidden=32)


@pytest.mark.mnist
def test_the_trainer_reads_no_test_image_and_writes_tensorboard(tmp_path, monkeypatch):
    """Training, its periodic and final evaluations read the training and validation splits only;
    process 0 writes the logged scalars and sample grids as TensorBoard events."""
    from jaxdnn import data, trainer

    read = []
    real = data.load_mnist

    def spy(split, *args, **kwargs):
        read.append(split)
        if split not in ("train", "validation"):
            raise AssertionError(f"the trainer read the {split} split")
        return real(split, *args, **kwargs)

    monkeypatch.setattr(trainer, "load_mnist", spy)
    config = trainer.default_config("nice", hidden=8, depth=1, batch_size=8, steps=3, warmup=1, eval_every=2,
                                    eval_images=16, log_every=1)
    handler = signal.getsignal(signal.SIGTERM)
    final = trainer.train_and_evaluate(config, tmp_path / "run", progress=False)
    assert signal.getsignal(signal.SIGTERM) is handler  # the trainer puts back the handler it replaced
    assert sorted(set(read)) == ["train", "validation"] and "test_bpd" not in final and np.isfinite(final["val_bpd"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "val_bpd" in rows[1] and "val_bpd_raw" in rows[1] and not any("test_bpd" in r for r in rows)
    # a fresh workdir continues from this one's latest checkpoint, at its step
    again = trainer.default_config("nice", init_from=tmp_path / "run", hidden=8, depth=1, batch_size=8, steps=5,
                                   warmup=1, eval_every=2, eval_images=16, log_every=1)
    assert again["init_step"] == 3 and again["model_config"] == config["model_config"]
    trainer.train_and_evaluate(again, tmp_path / "continued", progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "continued" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 5] and json.loads((tmp_path / "continued" / "init_card.json").read_text())["steps"] == 3
    # its source moved on since (a newer export at the same path): resuming says to start a new stage
    new_stage = r"init_step: 3 -> 4\); .*run has changed since this run started from it: continue from it as a new"
    with pytest.raises(ValueError, match=new_stage):
        trainer.train_and_evaluate({**again, "init_step": 4}, tmp_path / "continued", progress=False)
    # TensorBoard: the same scalars, and a sample grid at each evaluation
    board = read_tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in board["train/bits_per_dim"]] == [1, 2, 3]
    assert [v for _, v in board["validation/bits_per_dim"]] == pytest.approx([r["val_bpd"] for r in rows[1:]])
    assert {"train/learning_rate", "train/grad_norm", "train/images_per_second"} <= set(board)
    assert [h for _, h in board["samples/temperature_0.7"]] == [4 * 28, 4 * 28]


class _BinnedDensity(nn.Module):
    """A density constant on every pixel bin [p/256, (p+1)/256): its discrete likelihood is known in
    closed form, log P(pixels) = sum log w[p] (weights w over the 256 values, summing to 1), so
    every importance-weighted bound equals it exactly."""

    @nn.compact
    def log_prob(self, x):
        logits = self.param("logits", nn.initializers.normal(1.0), (256,))
        log_w = jax.nn.log_softmax(logits)
        bins = jnp.clip(jnp.floor(x * 256), 0, 255).astype(jnp.int32)
        return (log_w[bins] + math.log(256.0)).reshape(x.shape[0], -1).sum(-1)

    def pixel_log_prob(self, pixels, key):  # uniform dequantization, as the flows' default
        return self.log_prob(train.dequantize(key, pixels))

    def __call__(self, x):
        return self.log_prob(x)


def _images(n, seed=0):
    return (np.random.default_rng(seed).random((n, 28, 28)) * 256).astype(np.uint8)


def test_importance_weighted_bpd_is_exact_for_a_binned_density():
    model = _BinnedDensity()
    images = _images(6)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    log_w = np.asarray(jax.nn.log_softmax(params["params"]["logits"]), np.float64)
    exact = -log_w[images.reshape(6, -1)].sum(-1) / (784 * math.log(2.0))
    for k in (1, 4):
        np.testing.assert_allclose(train.evaluate_bpd(model, params, images, jax.random.key(1), samples=k), exact,
                                   rtol=1e-5)


def test_importance_weighted_bpd_tightens_with_more_samples():
    """K = 1 is today's number (same keys); the bound falls as K grows: over 64 images the mean
    drops by many standard errors of the paired difference from K = 1 to 4 to 16."""
    from jaxdnn.flows import checks

    model = build_model("nice", couplings=2, hidden=8, depth=1, preprocessing="logit")
    images = _images(64, seed=2) // 64 * 85  # four grey levels: a spread density the flow fits badly
    params = checks.perturb(model.init(jax.random.key(0), train.dequantize(jax.random.key(3), images[:8])),
                            jax.random.key(4), 0.3)
    key = jax.random.key(5)
    one = train.evaluate_bpd(model, params, images, key)
    np.testing.assert_array_equal(one, train.evaluate_bpd(model, params, images, key, samples=1))
    previous = one
    for k in (4, 16):
        bpd = train.evaluate_bpd(model, params, images, key, samples=k)
        gain = previous - bpd
        assert gain.mean() > 3 * gain.std(ddof=1) / math.sqrt(len(gain)), (k, gain.mean())
        previous = bpd


def read_tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every event file under `logdir`, read from the TFRecord framing
    (length, its CRC, the Event proto, its CRC) with tensorboardX's own protobuf classes."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
                elif value.HasField("image"):
                    out.setdefault(value.tag, []).append((event.step, value.image.height))
    return out


def test_card_curves_run_over_every_stage(tmp_path):
    """plot_cards joins a card's nested stages: epochs and hours add up across stages."""
    from experiments import plot_cards

    first = {"model": "realnvp", "train_config": {"batch_size": 55}, "init_step": 0, "steps": 2000, "epochs": 2.0,
             "wall_seconds": 3600.0, "val_bpd": 1.3, "validation_curve": [
                 {"step": 1000, "wall_seconds": 1800.0, "val_bpd": 1.4}, {"step": 2000, "wall_seconds": 3600.0,
                                                                          "val_bpd": 1.3}]}
    second = {**first, "init_step": 2000, "steps": 3000, "epochs": 1.0, "val_bpd": 1.2, "initialized_from": first,
              "validation_curve": [{"step": 3000, "wall_seconds": 1800.0, "val_bpd": 1.2}]}
    assert plot_cards.curve(second) == [(1.0, 0.5, 1.4), (2.0, 1.0, 1.3), (3.0, 1.5, 1.2)]
    path = tmp_path / "card.json"
    path.write_text(json.dumps(second))
    assert plot_cards.main([str(path), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 0
