"""Gambler's ruin (P5): exact DP, unbiased importance sampling, invariance to chunks and devices,
q rounding, the random bits' statistics, adaptive q, and the experiment's command line.

Unbiasedness is a z-test at a fixed key: |estimate - P| < 5 sd / sqrt(N) with sd the exact
standard deviation of one weighted path (from the DP), so the tolerance follows the sample
count. The random words are z-tested at a fixed key too (frequencies and serial correlations,
Bonferroni thresholds at a family-wise level ALPHA). Each kernel configuration compiles once
(about 2 s), so the cases share them.
"""

import functools
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest

from experiments import gamblers_ruin as cli
from jaxdnn import gamblers_ruin as gr
from jaxdnn.gamblers_ruin import bits as random_bits

COURSE = gr.COURSE
SMALL = {"start": 3, "target": 10, "p": 0.3, "games": 20}  # odd start: one game per step
WIDE = {"start": 2041, "target": 2049, "p": 0.45, "games": 40}  # int32-packed balances
N = 1 << 15
CHUNK = 1 << 14


def brute_force(start, target, p, games, q=0.5, stopped=True):
    """(P, E_q[W^2 1{hit}]) by enumerating all 2^games win/loss sequences.

    q: a float or a (games, target + 1) table q[t, x] (x frozen after absorption); W weights
    the games until absorption (stopped) or all games.
    """
    prob = second = 0.0
    for seq in itertools.product((True, False), repeat=games):
        x, done, hit = start, False, False
        lp_all = lq_all = lp_w = lq_w = 1.0
        for t, win in enumerate(seq):
            qt = q if np.isscalar(q) else q[t, x]
            fp, fq = (p, qt) if win else (1 - p, 1 - qt)
            lp_all, lq_all = lp_all * fp, lq_all * fq
            if not done or not stopped:
                lp_w, lq_w = lp_w * fp, lq_w * fq
            if not done:
                x += 1 if win else -1
                if x in (0, target):
                    done, hit = True, x == target
        prob += lp_all * hit
        second += lq_all * (lp_w / lq_w) ** 2 * hit
    return prob, second


@functools.cache
def best_q(bits=None):
    """The course's best constant q and its relative error per path (golden section, ~0.3 s)."""
    return gr.best_constant_q(**COURSE, bits=bits)


def z_tolerance(q, problem, n, stopped=True, bits=None):
    """5 exact standard deviations of the mean of n weighted paths."""
    prob = gr.exact_probability(**problem)
    m2 = gr.second_moment(q, **problem, stopped=stopped, bits=bits)
    return 5 * math.sqrt(max(m2 - prob * prob, 0.0) / n)


# ----------------------------------------------------------------------------- exact


@pytest.mark.parametrize("start,target,p,games", [
    (1, 2, 0.3, 1), (2, 5, 0.45, 9), (3, 6, 0.6, 10), (2, 9, 0.4, 6), (5, 8, 0.5, 11),
])
def test_dp_matches_brute_force(start, target, p, games):
    prob, m2 = brute_force(start, target, p, games, q=0.6)
    assert gr.exact_probability(start, target, p, games) == pytest.approx(prob, rel=1e-12,
                                                                          abs=1e-300)
    assert gr.second_moment(0.6, start, target, p, games) == pytest.approx(m2, rel=1e-12,
                                                                            abs=1e-300)
    _, m2_all = brute_force(start, target, p, games, q=0.6, stopped=False)
    assert gr.second_moment(0.6, start, target, p, games, stopped=False) == pytest.approx(
        m2_all, rel=1e-12, abs=1e-300)
    tl = gr.tilt(target, p, games)  # state-dependent q(t, x), rounded to k / 256
    t, x = np.arange(games)[:, None], np.arange(target + 1)[None, :]
    table = np.asarray(tl.quantized(t, x, 8), np.float64) / 256
    _, m2_tilt = brute_force(start, target, p, games, q=np.broadcast_to(table, (games,
                                                                                  target + 1)))
    assert gr.second_moment(tl, start, target, p, games, bits=8) == pytest.approx(
        m2_tilt, rel=1e-12, abs=1e-300)


def test_unreachable_target_has_probability_zero():
    assert gr.exact_probability(2, 9, 0.4, 6) == 0.0  # needs 7 wins in 6 games
    assert gr.exact_probability(2, 9, 0.4, 7) > 0.0
    assert gr.exact_probability(2, 10, 0.4, 8) == pytest.approx(0.4**8, rel=1e-12)


def test_reference_figures():
    assert gr.exact_probability(**COURSE) == pytest.approx(2.38838345e-6, rel=1e-8)
    assert gr.relative_error_per_path(COURSE["p"], **COURSE) == pytest.approx(647.06, abs=0.01)
    assert gr.relative_error_per_path(0.55, **COURSE) == pytest.approx(3.86, abs=0.005)
    assert gr.relative_error_per_path(0.55, **COURSE, stopped=False) == pytest.approx(6.75,
                                                                                       abs=0.005)
    q, rel = best_q()
    assert q == pytest.approx(0.588, abs=0.001) and rel == pytest.approx(1.337, abs=0.001)
    q8, rel8 = best_q(8)
    assert q8 * 256 == round(q8 * 256) and rel8 <= gr.relative_error_per_path(q8 + 1 / 256,
                                                                              **COURSE)
    assert gr.relative_error_per_path(gr.tilt(), **COURSE) == pytest.approx(0.705, abs=0.001)
    assert gr.relative_error_per_path(gr.tilt(), **COURSE, bits=8) < 0.71


@pytest.mark.parametrize("bad,match", [
    ({"start": 0}, "start < target"), ({"start": 200}, "start < target"),
    ({"start": 1.5}, "start must be an integer"), ({"games": 0}, "games must be"),
    ({"p": 1.0}, "p must be"), ({"p": float("nan")}, "p must be"),
])
def test_validation_names_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        gr.exact_probability(**{**COURSE, **bad})


def test_quantize():
    assert gr.quantize(0.55, 8) == (141, 141 / 256)
    with pytest.raises(ValueError, match="rounds to"):
        gr.quantize(0.999, 8)
    with pytest.raises(ValueError, match="q must be"):
        gr.quantize(1.5, 8)


# ----------------------------------------------------------------------------- random bits

ALPHA = 1e-4  # family-wise false-alarm rate of each statistical test of the random words
BLOCKS, TILES = 8, 4  # 8 blocks x 4 tiles x 2048 words x 32 bits = 2^21 bits per draw


def z_threshold(tests: int) -> float:
    """Two-sided |z| bound of `tests` z-tests at family-wise level ALPHA (Bonferroni)."""
    return statistics.NormalDist().inv_cdf(1 - ALPHA / (2 * tests))


def correlation_z(x, y) -> float:
    """sqrt(n) x Pearson correlation of n paired bits: about N(0, 1) for independent bits
    (nan, so failing any bound, when one side is constant)."""
    x, y = x.reshape(-1).astype(np.float64), y.reshape(-1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.corrcoef(x, y)[0, 1]) * math.sqrt(x.size)


@functools.partial(jax.jit, static_argnums=(1, 2))
def bernoulli_words(key, k, bits):
    """(BLOCKS, TILES, TILE / 2) uint32 words of Bernoulli(k / 2^bits) bits, drawn the way
    the constant-q kernel draws its masks: threefry offsets per (tile key, block, plane),
    hashed Weyl lanes, bit-sliced compare (bit i of word w: game i % 16 of lane 2 w + i // 16).
    k = 1, bits = 1 gives the complement of the raw hashed words the state kernel reads."""
    offsets = random_bits.block_offsets(random_bits.tile_keys(key, 0, TILES), BLOCKS, (bits,))
    lanes = random_bits.lane_weyl(gr.TILE // 2)[None]
    return random_bits.bernoulli_words(lanes, offsets, random_bits.k_planes(k, bits))


def unpack_bits(words):
    """(..., 32) uint8 bits of uint32 words, least significant first."""
    return ((words[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


@pytest.mark.parametrize("k,bits", [(1, 1), (5, 4), (141, 8), (36045, 16)],
                         ids=["raw-words", "5/16", "141/256", "36045/65536"])
def test_random_words_are_independent_bernoulli_bits(k, bits):
    """2^21 bits at a fixed key: every bit position wins with probability k / 2^bits, and
    consecutive games, the two lanes of a word, consecutive words, blocks and tiles are
    uncorrelated."""
    q = k / (1 << bits)
    b = unpack_bits(np.asarray(bernoulli_words(jax.random.key(11), k, bits)))
    games = b.reshape(*b.shape[:-1], 2, 16)  # a lane's 16 consecutive games
    pairs = {
        "consecutive games": (games[..., :-1], games[..., 1:]),
        "lanes 2i, 2i + 1": (b[..., :16], b[..., 16:]),
        "consecutive words": (b[:, :, :-1], b[:, :, 1:]),
        "consecutive blocks": (b[:-1], b[1:]),
        "consecutive tiles": (b[:, :-1], b[:, 1:]),
    }
    bound = z_threshold(32 + 1 + len(pairs))
    per_position = b.reshape(-1, 32)
    n = per_position.shape[0]
    z_bits = (per_position.mean(0) - q) / math.sqrt(q * (1 - q) / n)
    assert np.all(np.abs(z_bits) < bound), (bound, np.round(z_bits, 2))
    z_all = (b.mean() - q) / math.sqrt(q * (1 - q) / b.size)  # a won game: k / 2^bits
    assert abs(z_all) < bound, (bound, z_all)
    for name, (x, y) in pairs.items():
        z = correlation_z(x, y)
        assert abs(z) < bound, (name, bound, z)


def test_raw_words_win_the_state_kernels_games_with_probability_k_over_2_bits():
    """The state kernel reads `bits`-bit fields of raw hashed words and wins when field < k:
    per field position (4 of 8 bits, 2 of 16 bits), the win frequency is k / 2^bits."""
    raw = ~np.asarray(bernoulli_words(jax.random.key(11), 1, 1)).reshape(-1)
    cases = [(8, 141, j) for j in range(4)] + [(16, 36045, j) for j in range(2)]
    bound = z_threshold(len(cases))
    for bits, k, j in cases:
        q = k / (1 << bits)
        wins = ((raw >> np.uint32(bits * j)) & np.uint32((1 << bits) - 1)) < k
        z = (wins.mean() - q) / math.sqrt(q * (1 - q) / wins.size)
        assert abs(z) < bound, (bits, k, j, bound, z)


# ----------------------------------------------------------------------------- simulation


@pytest.mark.parametrize("problem,proposal,stopped,bits", [
    (COURSE, 0.55, True, 8),
    (COURSE, 0.55, False, 8),  # all 600 games weighted: unbiased, but noisier
    (COURSE, "best", True, 8),
    (COURSE, "tilt", True, 8),
    (SMALL, 0.5, True, 4),
    (SMALL, "naive", True, 4),  # q = p rounded to 5/16: plain Monte Carlo
    (WIDE, 0.6, True, 8),
], ids=["q055", "q055-all-games", "best-q", "tilt", "small", "small-naive", "wide"])
def test_estimate_is_unbiased(problem, proposal, stopped, bits):
    if proposal == "best":
        proposal = best_q(bits)[0]
    elif proposal == "tilt":
        proposal = gr.tilt(problem["target"], problem["p"], problem["games"])
    elif proposal == "naive":
        proposal = problem["p"]
    q_exact = proposal if callable(proposal) else gr.quantize(proposal, bits)[1]
    r = gr.estimate(jax.random.key(1), N, proposal, **problem, stopped=stopped, bits=bits,
                    chunk_size=CHUNK)
    chex.assert_tree_all_finite(r)
    assert r.paths == N and r.ci95_lo <= r.estimate <= r.ci95_hi
    prob = gr.exact_probability(**problem)
    tol = z_tolerance(q_exact, problem, N, stopped, bits if callable(proposal) else None)
    assert abs(r.estimate - prob) < tol, (r, prob, tol)
    assert 0 < r.ess <= N


def test_estimated_error_matches_exact_error():
    """The state tilt has light-tailed weights: its estimated relative error per path must
    match the DP's 0.709 closely."""
    tl = gr.tilt()
    r = gr.estimate(jax.random.key(2), N, tl, **COURSE, chunk_size=CHUNK)
    exact = gr.relative_error_per_path(tl, **COURSE, bits=8)
    assert r.relative_error * math.sqrt(N) == pytest.approx(exact, rel=0.05)


def test_unreachable_target_estimates_exactly_zero():
    problem = {"start": 100, "target": 200, "p": 18 / 37, "games": 98}
    r = gr.estimate(jax.random.key(3), 5000, 0.9, **problem)
    assert (r.estimate, r.std_error, r.ci95_lo, r.ci95_hi, r.ess) == (0, 0, 0, 0, 0)
    assert math.isnan(r.relative_error)


def _wrong_weight_mean(q_sampled, q_weights, start, target, p, games):
    """E under q_sampled of a weight that wrongly uses q_weights (stopped ratio), by DP."""
    up, down = q_sampled * p / q_weights, (1 - q_sampled) * (1 - p) / (1 - q_weights)
    v = np.zeros(target + 1)
    v[target] = 1.0
    for _ in range(games):
        v[1:-1] = up * v[2:] + down * v[:-2]
    return v[start]


def test_rounded_q_keeps_the_estimate_unbiased():
    """q = 0.55 at 4 bits samples 9/16: the weights must use 9/16. Weights that used 0.55 would
    be off by many standard errors, so this test can fail."""
    k, qr = gr.quantize(0.55, 4)
    assert (k, qr) == (9, 0.5625)
    prob = gr.exact_probability(**SMALL)
    tol = z_tolerance(qr, SMALL, N)
    wrong = _wrong_weight_mean(qr, 0.55, **SMALL)
    assert abs(wrong - prob) > 2 * tol  # 10 standard errors: the alternative is detectable
    r = gr.estimate(jax.random.key(4), N, 0.55, **SMALL, bits=4, chunk_size=CHUNK)
    assert abs(r.estimate - prob) < tol


def test_chunked_run_equals_single_chunk_run():
    key = jax.random.key(5)
    one = gr.estimate(key, 2 * CHUNK, 0.5, **SMALL, bits=4, chunk_size=2 * CHUNK)
    two = gr.estimate(key, 2 * CHUNK, 0.5, **SMALL, bits=4, chunk_size=CHUNK)
    np.testing.assert_allclose(two, one, rtol=1e-5)
    other = gr.estimate(jax.random.key(6), 2 * CHUNK, 0.5, **SMALL, bits=4, chunk_size=CHUNK)
    assert other.estimate != one.estimate  # a different key gives different paths


@pytest.mark.slow
def test_sharded_run_equals_single_chunk_run():
    """Two XLA CPU devices (the flag must precede jax's start, hence the subprocess)."""
    args = "jax.random.key(5), 2 * 16384, 0.5, start=3, target=10, p=0.3, games=20, bits=4"
    script = textwrap.dedent(f"""
        import json, jax
        from jaxdnn import gamblers_ruin as gr
        assert len(jax.devices()) == 2, jax.devices()
        r = gr.estimate({args}, chunk_size=4096)
        print(json.dumps(r._asdict()))
    """)
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sharded = gr.Estimate(**json.loads(proc.stdout))
    one = gr.estimate(jax.random.key(5), 2 * 16384, 0.5, **SMALL, bits=4, chunk_size=2 * 16384)
    np.testing.assert_allclose(sharded, one, rtol=1e-5)


def test_estimate_validates_arguments():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="paths"):
        gr.estimate(key, 0, 0.55)
    with pytest.raises(ValueError, match="chunk_size"):
        gr.estimate(key, 10, 0.55, chunk_size=1000)
    with pytest.raises(ValueError, match="q must be"):
        gr.estimate(key, 10, 1.2)
    with pytest.raises(ValueError, match="constant q"):
        gr.estimate(key, 10, gr.tilt(), stopped=False)


@pytest.mark.parametrize("method", ["ce", "sgd"])
def test_adapt_q_finds_a_near_optimal_q(method):
    r = gr.adapt_q(jax.random.key(7), **COURSE, method=method, steps=10, paths=CHUNK)
    assert r.history.shape == (11,)
    q_best, rel_best = best_q()
    assert abs(r.q - q_best) < 0.01
    assert gr.relative_error_per_path(r.q, **COURSE) < 1.02 * rel_best


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv,match", [
    (["--p", "1.5"], "--p must be in (0, 1)"),
    (["--p", "abc"], "expected a fraction"),
    (["--p", "1/0"], "expected a fraction"),
    (["--q", "0"], "--q must be in (0, 1)"),
    (["--q", "0.999"], "rounds to 0 or 1"),
    (["--start", "200"], "need 0 < --start < --target"),
    (["--start", "1.5"], "expected an integer"),
    (["--games", "0"], "--games must be >= 1"),
    (["--paths", "0"], "--paths must be >= 1"),
    (["--proposal", "best"], "invalid choice"),
])
def test_cli_bad_arguments_exit_2_with_one_line(argv, match, capsys):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and match in err, err


def test_cli_module_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "experiments.gamblers_ruin", "--games", "-3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_cli_json_keys(capsys):
    assert cli.main(["--json", "--paths", str(CHUNK)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["exact", "estimate", "std_error", "ci95", "relative_error",
                         "relative_error_per_path_exact", "proposal", "q", "paths",
                         "paths_per_second"]
    assert out["proposal"] == "constant" and out["q"] == 141 / 256 and out["paths"] == CHUNK
    assert out["exact"] == pytest.approx(2.38838345e-6, rel=1e-8)
    assert out["ci95"][0] < out["exact"] < out["ci95"][1]
    assert out["paths_per_second"] > 0


def _kernel_expectation(proposal, bits, dtype=np.float64, problem=COURSE):
    """E_q[W 1{reach target}] of the estimator as the kernel computes W, by dynamic programming
    over (t, x): the walk's probabilities are the simulated k / 2^bits, the weights the kernel's
    own factors (`state_factors` of `state_params`, or the constant kernel's slope and offset),
    evaluated in `dtype` (float32: the factors the kernels multiplied before they were float64)."""
    from jaxdnn.gamblers_ruin import exact, kernels

    start, target, p, games = (problem[k] for k in ("start", "target", "p", "games"))
    if callable(proposal):
        t, x = np.arange(games, dtype=np.int32)[:, None], np.arange(target + 1, dtype=np.int32)[None, :]
        k = np.broadcast_to(np.asarray(exact.proposal_k(proposal, t, x, bits)), (games, target + 1))
        with jax.enable_x64(True):
            f_win, f_loss = (np.asarray(f, np.float64) for f in kernels.state_factors(
                tuple(jax.numpy.asarray(v, dtype) for v in kernels.state_params(p, bits)), jax.numpy.asarray(k), bits))
        q = k / float(1 << bits)
        up, down = (lambda t: (q * f_win)[t, 1:-1]), (lambda t: ((1 - q) * f_loss)[t, 1:-1])
        top = np.ones(games + 1)
    else:
        (_, slope), offset, qr = kernels.constant_params(proposal, p, bits, start, target, games, True)
        loss = math.exp(float(dtype(slope)))  # the factor of each loss beyond the minimum
        up, down, top = (lambda t: qr), (lambda t: (1 - qr) * loss), np.full(games + 1, math.exp(offset))
    return exact._dp(start, target, games, up, down, top)


@pytest.mark.parametrize("proposal, bits", [(0.55, 8), ("best", 8), ("tilt", 8), ("tilt", 16)])
def test_the_estimators_expectation_is_the_probability_without_sampling(proposal, bits):
    """With the floating-point factors the kernels really use, the estimator's expectation equals
    the probability to 5e-8 relative (0.07 standard errors of the state tilt at 10^12 paths);
    with float32 factors it did not (~2e-6 for the tilt), so the test can fail."""
    proposal = {"best": best_q(bits)[0] if proposal == "best" else None, "tilt": gr.tilt()}.get(proposal, proposal)
    prob = gr.exact_probability(**COURSE)
    assert abs(_kernel_expectation(proposal, bits) / prob - 1) < 5e-8
    if callable(proposal) or proposal == 0.55:
        assert abs(_kernel_expectation(proposal, bits, np.float32) / prob - 1) > 5e-8


def test_the_state_kernels_weights_are_the_exact_likelihood_ratios():
    """Every simulated path's log-weight equals log prod_games state_factors of that path, in
    float64, to float32 mantissa rounding (1e-6 relative), over all 2^8 paths of a small problem
    enumerated on the host."""
    from jaxdnn.gamblers_ruin.kernels import StateKernel, state_params

    problem = {"start": 3, "target": 6, "p": 0.4, "games": 8}
    tl = gr.tilt(problem["target"], problem["p"], problem["games"])
    exact_logs = set()
    for seq in itertools.product((0, 1), repeat=problem["games"]):
        x, log_w = problem["start"], 0.0
        for t, win in enumerate(seq):
            k = int(gr.exact.proposal_k(tl, np.int32(t), np.int32(x), 8))
            log_w += math.log(problem["p"] * 256 / k) if win else math.log((1 - problem["p"]) * 256 / (256 - k))
            x += 1 if win else -1
            if x in (0, problem["target"]):
                break
        if x == problem["target"]:
            exact_logs.add(round(log_w, 9))
    exact_logs = np.array(sorted(exact_logs))
    kernel = StateKernel(problem["start"], problem["target"], problem["games"], 8, tl)
    with jax.enable_x64(True):
        got = np.asarray(kernel.log_weights(jax.random.key(0), 0, 1, state_params(problem["p"], 8))).ravel()
    got = got[np.isfinite(got)]
    nearest = exact_logs[np.abs(got[:, None] - exact_logs[None, :]).argmin(1)]
    assert len(got) > 100 and np.abs(got - nearest).max() < 1e-6 and len(set(nearest)) > 3


def test_estimate_takes_the_command_lines_proposal_names():
    small = {**SMALL}
    assert gr.proposal_by_name("naive", **small) == SMALL["p"]
    assert gr.proposal_by_name("state", **small) == gr.tilt(SMALL["target"], SMALL["p"], SMALL["games"])
    q = gr.proposal_by_name("optimal", **small, bits=4)
    assert q == gr.best_constant_q(**small, bits=4)[0]
    r = gr.estimate(jax.random.key(0), CHUNK, "optimal", **small, bits=4, chunk_size=CHUNK)
    assert r == gr.estimate(jax.random.key(0), CHUNK, q, **small, bits=4, chunk_size=CHUNK)
    for bad, match in (("constant", "a number"), ("tilted", "one of naive, optimal, state"), (1.5, "in \\(0, 1\\)")):
        with pytest.raises(ValueError, match=match):
            gr.estimate(jax.random.key(0), 10, bad)
