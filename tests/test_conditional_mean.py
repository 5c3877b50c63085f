"""The conditional-mean network (`jaxdnn.conditional_mean`): its training masks, training that is
deterministic (and, by the CLI, continues from given weights), fills that keep the observed pixels,
the shipped weights against their card, and the training command line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from experiments import train_conditional_mean as cli
from jaxdnn import conditional_mean as cm
from jaxdnn import inpainting as ip
from jaxdnn.data import to_unit_interval

TINY = cm.ConditionalMeanNet(width=16, depth=1, dropout=0.0, refiner=0)  # the dense core alone: fast
REFINED = TINY.clone(refiner=2)


def one_pattern(n: int) -> np.ndarray:
    """n copies of one image (a ramp from 0.05 to 0.95): its conditional mean is itself."""
    ramp = np.linspace(0.05, 0.95, 784, dtype=np.float32).reshape(28, 28, 1)
    return np.broadcast_to(ramp, (n, 28, 28, 1)).copy()


def test_random_masks_take_turns_over_three_families():
    masks = np.asarray(cm.random_masks(jax.random.key(0), 300)).reshape(300, 28, 28)
    np.testing.assert_array_equal(masks, np.asarray(cm.random_masks(jax.random.key(0), 300)).reshape(
        300, 28, 28))
    missing = ~masks
    for box in missing[0::3]:  # one rectangle of sides 4..28
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        assert 4 <= len(rows) <= 28 and 4 <= len(cols) <= 28
        assert box.sum() == len(rows) * len(cols) and np.ptp(rows) == len(rows) - 1
    for side in missing[1::3]:  # a side cut at 7..21: whole rows or whole columns from an edge
        rows, cols = side.all(1), side.all(0)
        assert (rows.sum() * 28 == side.sum() and 7 <= rows.sum() <= 21) or (
            cols.sum() * 28 == side.sum() and 7 <= cols.sum() <= 21)
        line = rows if rows.any() else cols
        assert line[0] or line[-1]
    fractions = missing[2::3].mean((1, 2))  # scattered pixels at one rate per image
    assert fractions.min() > 0.05 and fractions.max() < 0.95 and np.ptp(fractions) > 0.4
    named = np.asarray(cm.random_masks(jax.random.key(0), 300, named=14)).reshape(300, 28, 28, 1)
    np.testing.assert_array_equal(named[14:, ..., 0], masks[14:])  # the other rows as before
    for i in range(14):  # the named masks in turn; random50 exactly half, drawn afresh
        name = ip.MASKS[i % len(ip.MASKS)]
        if name == "random50":
            assert (~named[i]).sum() == 392
        else:
            np.testing.assert_array_equal(named[i], ip.make_mask(name))
    assert (named[5] != named[11]).any()
    with pytest.raises(ValueError, match="named"):
        cm.random_masks(jax.random.key(0), 4, named=5)


@pytest.mark.slow  # over 5 s on 2 cores, or reads the shipped weights
def test_training_is_deterministic_and_learns():
    images = one_pattern(64)
    losses = []
    params = cm.train(images, 120, seed=3, model=TINY, lr=1e-2, warmup=5,
                              callback=lambda step, loss, p: losses.append(float(loss)))
    assert len(losses) == 120 and np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    again = cm.train(images, 120, seed=3, model=TINY, lr=1e-2, warmup=5)
    jax.tree.map(np.testing.assert_array_equal, params, again)  # continuing from params: the CLI test
    other = cm.train(images, 120, seed=3, model=TINY, lr=1e-2, warmup=5, init_seed=1)
    assert not np.allclose(jax.tree.leaves(other)[0], jax.tree.leaves(params)[0])  # its own initialization
    with pytest.raises(ValueError, match="above warmup"):
        cm.train(images, 5, model=TINY, warmup=5)


@pytest.mark.slow  # over 5 s on 2 cores, or reads the shipped weights
def test_the_refiner_starts_at_zero_and_trains_alone_on_request():
    """A fresh refiner adds nothing (its last convolution is zero): the estimates are the dense
    core's alone; trainable="refiner" moves the refiner's weights and leaves the core's bit for bit."""
    x = jnp.asarray(one_pattern(4).reshape(4, 784))
    m = cm.random_masks(jax.random.key(1), 4)
    params = REFINED.init(jax.random.key(0), x, m)
    core_params = {"params": {k: v for k, v in params["params"].items() if k != "refiner"}}
    np.testing.assert_array_equal(REFINED.apply(params, x, m), TINY.apply(core_params, x, m))
    after = cm.train(one_pattern(64), 6, seed=2, params=params, model=REFINED, lr=1e-2, warmup=1,
                             batch_size=8, trainable="refiner")
    jax.tree.map(np.testing.assert_array_equal, core_params["params"],
                 {k: v for k, v in after["params"].items() if k != "refiner"})
    assert not np.array_equal(after["params"]["refiner"]["Conv_5"]["kernel"], 0)
    with pytest.raises(ValueError, match="trainable must be one of"):
        cm.train(one_pattern(8), 2, model=REFINED, warmup=1, trainable="core")
    with pytest.raises(ValueError, match="needs a model with a refiner"):
        cm.train(one_pattern(8), 2, model=TINY, warmup=1, trainable="refiner")


@pytest.mark.slow  # over 5 s on 2 cores, or reads the shipped weights
def test_weights_of_the_core_alone_load_with_a_zero_refiner(tmp_path):
    """Files written before the refiner (the dense core's weights only) load and estimate as before."""
    core = cm.ConditionalMeanNet(refiner=0)
    x, m = jnp.asarray(one_pattern(2).reshape(2, 784)), cm.random_masks(jax.random.key(2), 2)
    params = core.init(jax.random.key(4), x, m)
    path = tmp_path / "core.msgpack"
    path.write_bytes(cm.to_bytes(params))
    loaded = cm.load(str(path))
    assert set(loaded["params"]) == set(params["params"]) | {"refiner"}
    core16 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float16), jnp.float32), params)
    np.testing.assert_allclose(cm.ConditionalMeanNet().apply(loaded, x, m), core.apply(core16, x, m),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # over 5 s on 2 cores, or reads the shipped weights
def test_the_refiner_width_is_read_from_the_weights(tmp_path):
    """A refiner of any width loads as it was trained (`model_of` reads its channels); a core alone
    takes a zero refiner of the width asked for; a width that does not match the file is refused."""
    x, m = jnp.asarray(one_pattern(2).reshape(2, 784)), cm.random_masks(jax.random.key(2), 2)
    wide = cm.ConditionalMeanNet(refiner=8)
    params = wide.init(jax.random.key(4), x, m)
    params = jax.tree.map(lambda a: a + 0.01, params)  # a refiner that adds something
    path = tmp_path / "wide.msgpack"
    path.write_bytes(cm.to_bytes(params))
    loaded = cm.load(str(path))
    assert cm.model_of(loaded) == wide
    np.testing.assert_allclose(cm.predict(one_pattern(2), m.reshape(2, 28, 28, 1), loaded),
                               cm.predict(one_pattern(2), m.reshape(2, 28, 28, 1),
                                                  cm.load(str(path), 8)))
    with pytest.raises(ValueError, match="8 channels, not 16"):
        cm.load(str(path), 16)
    with pytest.raises(ValueError, match="positive"):
        cm.load(str(path), 0)
    core = {"params": {k: v for k, v in params["params"].items() if k != "refiner"}}
    path.write_bytes(cm.to_bytes(core))
    assert cm.model_of(cm.load(str(path), 4)).refiner == 4
    assert cm.model_of(cm.load(str(path))).refiner == cm.REFINER
    assert cm.model_of(core).refiner == 0


@pytest.mark.slow  # over 5 s on 2 cores, or reads the shipped weights
def test_the_core_shape_is_read_from_the_weights(tmp_path):
    """`model_of` reads a core's width and depth from its weights, so members of other shapes load
    and predict as they were trained; dropout leaves no weights and is whatever is asked."""
    x = jnp.zeros((1, 784))
    for net in (TINY, TINY.clone(width=24, depth=2, refiner=3), cm.ConditionalMeanNet(depth=4, refiner=0)):
        params = net.init(jax.random.key(1), x, jnp.ones((1, 784), bool))
        assert cm.model_of(params, net.dropout) == net
        assert cm.model_of(params, 0.3).dropout == 0.3
    path = tmp_path / "deep.msgpack"
    path.write_bytes(cm.to_bytes(params))
    assert cm.model_of(cm.load(path)) == net.clone(refiner=cm.REFINER)


@pytest.mark.slow  # over 5 s on 2 cores, or reads the shipped weights
def test_a_unet_member_loads_as_trained_and_joins_an_ensemble(tmp_path):
    """A UNetMeanNet's channels and bottleneck are read from its weights; it loads with no refiner
    added (a refiner asked of it is refused), predicts as trained through float16, and averages with
    a dense member (the CLI's test trains one)."""
    net = cm.UNetMeanNet(channels=4, width=8, dropout=0.0)
    x = jnp.asarray(one_pattern(2)).reshape(2, 784)
    m = jnp.stack([ip.make_mask("top_half"), ip.make_mask("center")]).reshape(2, 784)
    params = net.init(jax.random.key(1), x, m)
    assert cm.model_of(params, 0.0) == net and "refiner" not in params["params"]
    assert "UNetMeanNet (convolutions of 4, 8 and 16 channels" in cm.describe(net)
    path = tmp_path / "unet.msgpack"
    path.write_bytes(cm.to_bytes(params))
    loaded = cm.load(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    np.testing.assert_allclose(net.apply(loaded, x, m), net.apply(params, x, m), atol=2e-3)
    with pytest.raises(ValueError, match="has no refiner"):
        cm.load(path, 4)
    dense = TINY.init(jax.random.key(2), x, m)
    images, masks = x.reshape(2, 28, 28, 1), m.reshape(2, 28, 28, 1)
    both = [np.asarray(cm.predict(images, masks, p)) for p in (dense, params)]
    np.testing.assert_allclose(cm.predict(images, masks, [dense, params]), (both[0] + both[1]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="needs a model with a refiner"):
        cm.train(np.asarray(images), 2, model=net, warmup=1, trainable="refiner")


@pytest.mark.parametrize("objective", cm.OBJECTIVES)
@pytest.mark.slow  # over 5 s on 2 cores, or reads the shipped weights
def test_the_objective_is_the_pooled_mse_or_the_mean_log_mse_of_the_batch(objective):
    images = np.random.default_rng(0).uniform(size=(40, 28, 28, 1)).astype(np.float32)
    first = []
    cm.train(images, 2, seed=5, model=TINY, warmup=1, batch_size=8, objective=objective,
                     callback=lambda step, loss, p: first.append(float(loss)) if step == 1 else None)
    # step 1 by hand: its batch, masks and (no) dropout from fold_in(key(5), 1), the initial weights
    k_batch, k_mask, _ = jax.random.split(jax.random.fold_in(jax.random.key(5), 1), 3)
    x = images[np.asarray(jax.random.randint(k_batch, (8,), 0, 40))]
    m = np.asarray(cm.random_masks(k_mask, 8)).reshape(x.shape)
    flat = jnp.asarray(x).reshape(8, -1)
    params = TINY.init(jax.random.key(0), flat[:2], jnp.ones((2, 784), bool))
    fill = np.asarray(TINY.apply(params, flat, jnp.asarray(m).reshape(8, -1))).reshape(x.shape)
    squared = ((fill - x) ** 2 * ~m).astype(np.float64)
    expected = (squared.sum() / (~m).sum() if objective == "mse" else
                np.mean(np.log(np.asarray(ip.masked_mse(jnp.asarray(fill), jnp.asarray(x), m), np.float64)
                               + cm.PSNR_EPS)))
    np.testing.assert_allclose(first[0], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="objective"):
        cm.train(images, 2, model=TINY, warmup=1, objective="l1")


@pytest.mark.slow  # over 5 s on 2 cores, or reads the shipped weights
def test_weights_round_trip_through_float16(tmp_path):
    params = TINY.init(jax.random.key(0), jnp.zeros((1, 784)), jnp.ones((1, 784), bool))
    path = tmp_path / "w.msgpack"
    path.write_bytes(cm.to_bytes(params))
    assert cm.model_of(cm.load(path)) == TINY.clone(dropout=0.1, refiner=cm.REFINER)
    wrong = {"params": {"Dense_0": {"kernel": np.zeros((10, 16), np.float32), "bias": np.zeros(16, np.float32)},
                        "Dense_1": {"kernel": np.zeros((16, 784), np.float32), "bias": np.zeros(784, np.float32)}}}
    path.write_bytes(cm.to_bytes(wrong))  # a dense core that does not read (image, mask) pairs
    with pytest.raises(ValueError, match="not of the shipped network's shapes"):
        cm.load(str(path))
    small = cm.ConditionalMeanNet(width=64, refiner=4)  # the shipped kind, smaller: the same round trip
    params = small.init(jax.random.key(1), jnp.zeros((1, 784)), jnp.ones((1, 784), bool))
    path.write_bytes(cm.to_bytes(params))
    back = cm.load(str(path))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        assert b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.slow  # over 5 s on 2 cores, or reads the shipped weights
def test_predict_keeps_the_observed_pixels_and_checks_its_input():
    x = jnp.asarray(to_unit_interval(np.random.default_rng(0).integers(0, 256, (3, 28, 28), np.uint8)))
    masks = jnp.stack([ip.make_mask(m) for m in ("hw10", "top_half", "center")])
    out = cm.predict(x, masks)
    obs = np.asarray(masks)
    np.testing.assert_array_equal(np.asarray(out)[obs], np.asarray(x)[obs])
    assert np.all((np.asarray(out) >= 0) & (np.asarray(out) <= 1)) and not np.allclose(out, x)
    np.testing.assert_allclose(cm.predict(x[1], masks[1]), out[1], atol=1e-6)
    with pytest.raises(ValueError, match="MNIST images"):
        cm.predict(x[:, :14, :14], masks[:, :14, :14])


@pytest.mark.mnist
@pytest.mark.slow  # over 5 s on 2 cores, or reads the shipped weights
def test_the_shipped_network_reproduces_its_card(optimized_xla):
    """Every member trained on the training split only; on the card's validation images the
    ensemble scores what the card says."""
    from jaxdnn.data import load_mnist

    card = cm.card()
    assert all(m["trained_on"].startswith("training images 0..54999") for m in card["members"])
    assert {m["command"] for m in card["metrics"].values()} == {
        "python -m experiments.choose_conditional_mean --val-images 0:500"}
    lo, hi = 0, 500
    x = to_unit_interval(load_mnist("validation")[0][lo:hi])
    for mask in ip.MASKS:
        masks = ip.batch_masks(mask, np.arange(lo, hi), jax.random.split(jax.random.key(0))[0])
        psnr = float(np.mean(np.asarray(ip.masked_psnr(cm.predict(x, masks), x, masks), np.float64)))
        assert psnr == pytest.approx(card["metrics"][f"psnr_{mask}"]["value"], abs=1e-3), mask


def fake_mnist(split):
    pix = np.random.default_rng(1 if split == "train" else 2).integers(0, 256, (40 if split == "train" else 30, 28, 28),
                                                                       np.uint8)
    return pix, np.zeros(len(pix), np.uint8)


@pytest.mark.parametrize("argv, match", [(["--steps", "10", "--warmup", "10"], "--steps must exceed --warmup"),
                                         (["--val-images", "0:6000"], "out of range"),
                                         (["--init-from", "/no/such.msgpack"], "no such file"),
                                         (["--named", "257"], "--named must lie in 0..256"),
                                         (["--refiner-from", "x.msgpack"], "give --init-from too"),
                                         (["--init-seed", "3", "--init-from", "x.msgpack"], "not with --init-from"),
                                         (["--refiner", "0", "--init-from", "x.msgpack"], "0 only for a fresh"),
                                         (["--depth", "4", "--init-from", "x.msgpack"], "shape a fresh network"),
                                         (["--width", "0"], "must be positive"),
                                         (["--dropout", "1"], "--dropout must lie in [0, 1)"),
                                         (["--unet", "0"], "--unet shapes a fresh U-Net"),
                                         (["--unet", "8", "--depth", "2"], "--unet shapes a fresh U-Net"),
                                         (["--unet", "8", "--init-from", "x.msgpack"], "--unet shapes a fresh U-Net"),
                                         (["--ship", "0"], "--ship must name a member"),
                                         (["--weight", "0.5"], "give it with --ship"),
                                         (["--ship", "2", "--weight", "0"], "weight in (0, 1]")])
def test_cli_bad_arguments_exit_2_with_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and match in err, err


@pytest.mark.slow  # over 5 s on 2 cores, or reads the shipped weights
def test_cli_continues_trains_and_scores(monkeypatch, tmp_path, capsys):
    """Three steps on synthetic data from given weights: the weights it writes (float32, what
    --init-from reads) and a card naming its start by hash, with every mask's validation scores."""
    import hashlib

    import jaxdnn.data

    monkeypatch.setattr(jaxdnn.data, "load_mnist", fake_mnist)
    monkeypatch.setattr(cli, "NEIGHBOURS", 4)
    start = tmp_path / "start.msgpack"
    start.write_bytes(cm.to_bytes(cm.ConditionalMeanNet().init(
        jax.random.key(3), jnp.zeros((1, 784)), jnp.ones((1, 784), bool))))
    out = tmp_path / "out"
    assert cli.main(["--steps", "3", "--warmup", "1", "--val-images", "0:20", "--init-from", str(start),
                     "--named", "8", "--out", str(out)]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["stage"]["init_from"]["sha256"] == hashlib.sha256(start.read_bytes()).hexdigest()
    assert set(card["validation"]["scores"]) == set(ip.MASKS) and card["stage"]["steps"] == 3
    assert card["stage"]["named"] == 8
    for score in card["validation"]["scores"].values():
        assert np.isfinite(score["psnr"]) and score["paired"]["mean"] == pytest.approx(
            score["psnr"] - score["knn_mean_4"], abs=2e-3)
    assert json.loads((out / "conditional_mean.json").read_text()) == card
    trained = cm.load(str(out / "conditional_mean.msgpack"))
    assert not np.allclose(jax.tree.leaves(trained)[0], jax.tree.leaves(cm.load(str(start)))[0])


@pytest.mark.slow  # over 5 s on 2 cores, or reads the shipped weights
def test_cli_trains_a_fresh_core_of_the_shape_asked(monkeypatch, tmp_path, capsys):
    """--width, --depth, --dropout and --refiner 0 shape a fresh network; its card says so and its
    weights load as that network."""
    import jaxdnn.data

    monkeypatch.setattr(jaxdnn.data, "load_mnist", fake_mnist)
    monkeypatch.setattr(cli, "NEIGHBOURS", 4)
    out = tmp_path / "out"
    assert cli.main(["--steps", "2", "--warmup", "1", "--val-images", "0:10", "--width", "24", "--depth", "2",
                     "--dropout", "0.2", "--refiner", "0", "--init-seed", "5", "--out", str(out)]) == 0
    card = json.loads(capsys.readouterr().out)
    assert "width 24, depth 2, dropout 0.2; refiner: 0 channels" in card["model"]
    assert card["stage"]["init_seed"] == 5
    params = serialization.msgpack_restore((out / "conditional_mean.msgpack").read_bytes())
    assert cm.model_of(params, 0.2) == cm.ConditionalMeanNet(width=24, depth=2, dropout=0.2,
                                                                              refiner=0)


@pytest.mark.slow  # over 5 s on 2 cores, or reads the shipped weights
def test_cli_trains_a_fresh_unet_member(monkeypatch, tmp_path, capsys):
    """--unet CHANNELS (--width its bottleneck) trains a fresh UNetMeanNet; its card names it and
    its weights load as that network; a refiner cannot be taken from it."""
    import jaxdnn.data

    monkeypatch.setattr(jaxdnn.data, "load_mnist", fake_mnist)
    monkeypatch.setattr(cli, "NEIGHBOURS", 4)
    out = tmp_path / "out"
    assert cli.main(["--steps", "2", "--warmup", "1", "--val-images", "0:10", "--unet", "4", "--width", "8",
                     "--out", str(out)]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["model"].startswith("UNetMeanNet (convolutions of 4, 8 and 16 channels")
    trained = out / "conditional_mean.msgpack"
    assert cm.model_of(cm.load(trained)) == cm.UNetMeanNet(channels=4, width=8)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--steps", "2", "--warmup", "1", "--init-from", str(trained), "--refiner-from", str(trained)])
    assert exit_.value.code == 2 and "without a refiner" in capsys.readouterr().err


@pytest.mark.slow  # over 5 s on 2 cores, or reads the shipped weights
def test_cli_ships_the_members_of_the_ensemble(monkeypatch, tmp_path, capsys):
    """--ship 1, then --ship 2 (another seed): two float16 files in the package and one card with
    both members' stages and the validation scores of their mean, which `predict` reproduces; a
    member past the next one is refused before any training."""
    import jaxdnn.data

    monkeypatch.setattr(jaxdnn.data, "load_mnist", fake_mnist)
    monkeypatch.setattr(cli, "NEIGHBOURS", 4)
    monkeypatch.setattr(cm, "_HERE", tmp_path)
    monkeypatch.setattr(cm, "CARD", tmp_path / "conditional_mean.json")
    start = tmp_path / "start.msgpack"
    start.write_bytes(cm.to_bytes(cm.ConditionalMeanNet(refiner=2).init(
        jax.random.key(3), jnp.zeros((1, 784)), jnp.ones((1, 784), bool))))
    core = tmp_path / "core.msgpack"  # another core alone, its own initialization
    core.write_bytes(cm.to_bytes(cm.ConditionalMeanNet(refiner=0).init(
        jax.random.key(7), jnp.zeros((1, 784)), jnp.ones((1, 784), bool))))
    common = ["--steps", "2", "--warmup", "1", "--val-images", "0:10", "--out", str(tmp_path / "out")]
    assert cli.main([*common, "--init-from", str(start), "--seed", "1", "--ship"]) == 0
    assert cli.main([*common, "--init-from", str(core), "--refiner-from", str(start), "--trainable", "refiner",
                     "--seed", "2", "--ship", "2"]) == 0
    assert [m["weight"] for m in cm.card()["members"]] == [0.5, 0.5]
    assert cli.main([*common, "--init-from", str(core), "--refiner-from", str(start), "--trainable", "refiner",
                     "--seed", "2", "--ship", "2", "--weight", "0.75"]) == 0  # the same member, weighed anew
    capsys.readouterr()
    card = cm.card()
    assert [m["weight"] for m in card["members"]] == [0.25, 0.75] == list(cm.member_weights())
    assert [m["file"] for m in card["members"]] == ["conditional_mean.msgpack", "conditional_mean_2.msgpack"]
    assert [m["stage"]["seed"] for m in card["members"]] == [1, 2]
    assert card["members"][1]["stage"]["refiner_from"]["path"] == str(start)
    members = cm.ensemble()
    assert len(members) == 2 and cm.model_of(members[1]).refiner == 2  # the width of start's refiner
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-3),  # the core kept (float16 on disk)
                 {k: v for k, v in members[1]["params"].items() if k != "refiner"},
                 {k: v for k, v in cm.load(str(core))["params"].items() if k != "refiner"})
    x = to_unit_interval(fake_mnist("validation")[0][:10])
    masks = ip.batch_masks("top_half", np.arange(10), jax.random.split(jax.random.key(0))[0])
    psnr = np.asarray(ip.masked_psnr(cm.predict(x, masks), x, masks), np.float64).mean()
    assert psnr == pytest.approx(card["metrics"]["psnr_top_half"]["value"], abs=1e-3)
    assert card["metrics"]["psnr_top_half"]["command"] == ("python -m experiments.choose_conditional_mean "
                                                           "--val-images 0:10")
    from experiments import choose_conditional_mean  # the command the card names reproduces its metrics

    assert choose_conditional_mean.main(["--val-images", "0:10", "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)
    both = next(r for r in chosen["subsets"] if len(r["members"]) == 2)
    assert both["weights"] == [0.25, 0.75]
    for mask, value in both["psnr"].items():
        assert value == pytest.approx(card["metrics"][f"psnr_{mask}"]["value"], abs=2e-3), mask
    with pytest.raises(SystemExit) as exit_:
        cli.main([*common, "--init-from", str(start), "--ship", "4"])
    assert exit_.value.code == 2 and "ship 3 next" in capsys.readouterr().err


def test_an_ensemble_averages_its_members():
    """predict with several networks' parameters fills with the mean of their estimates, or the
    weighted mean for weights given; one network in a list is that network; an empty list and
    weights that are not one non-negative number per network are refused."""
    x = jnp.asarray(one_pattern(3))
    masks = jnp.stack([ip.make_mask(m) for m in ("hw10", "top_half", "center")])
    nets = [cm.ConditionalMeanNet(width=64, refiner=r).init(jax.random.key(r), jnp.zeros((1, 784)),
                                                         jnp.ones((1, 784), bool)) for r in (2, 4)]
    nets[0] = jax.tree.map(lambda a: a + 0.01, nets[0])  # a refiner that adds something
    one = [np.asarray(cm.predict(x, masks, p)) for p in nets]
    np.testing.assert_allclose(cm.predict(x, masks, nets), (one[0] + one[1]) / 2, atol=1e-6)
    np.testing.assert_array_equal(cm.predict(x, masks, nets[:1]), one[0])
    np.testing.assert_allclose(cm.predict(x, masks, nets, (1, 3)), (one[0] + 3 * one[1]) / 4, atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        cm.predict(x, masks, [])
    for bad in ((1,), (1, -1), (0, 0), (1, np.nan)):
        with pytest.raises(ValueError, match="one non-negative number per network"):
            cm.predict(x, masks, nets, bad)
