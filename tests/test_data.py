"""MNIST pipeline: IDX parsing, checksummed fetch, preprocessing, batching, and the real files."""

import hashlib
import math
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdnn import data
from jaxdnn.data import mnist


def test_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data.write_idx(tmp_path / "a", arr)
    np.testing.assert_array_equal(data.parse_idx(tmp_path / "a"), arr)
    ints = np.array([-5, 7, 1 << 20], np.int32)
    data.write_idx(tmp_path / "b", ints)
    np.testing.assert_array_equal(data.parse_idx(tmp_path / "b"), ints)


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\x00", "trailing bytes"),
    (lambda b: b"\x01" + b[1:], "magic number"),
    (lambda b: b[:2] + b"\x07" + b[3:], "dtype code"),
    (lambda b: b[:6], "truncated header"),
    (lambda b: b"", "shorter than"),
])
def test_idx_corrupt_files_raise_value_error_naming_the_file(tmp_path, corrupt, message):
    path = tmp_path / "images-idx3-ubyte"
    data.write_idx(path, np.zeros((2, 3, 4), np.uint8))
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as err:
        data.parse_idx(path)
    assert str(path) in str(err.value)


def test_idx_wrong_dims(tmp_path):
    data.write_idx(tmp_path / "x", np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(ValueError, match=r"dimensions \(2, 3, 4\), expected \(2, 28, 28\)"):
        data.parse_idx(tmp_path / "x", expected_shape=(2, 28, 28))


def _fake_files(tmp_path):
    """Two tiny IDX 'MNIST' files and their checksums."""
    contents = {}
    for name, arr in {"a-idx1-ubyte": np.arange(5, dtype=np.uint8),
                      "b-idx1-ubyte": np.arange(7, dtype=np.uint8)}.items():
        data.write_idx(tmp_path / name, arr)
        contents[name] = (tmp_path / name).read_bytes()
    files = {n: hashlib.sha256(c).hexdigest() for n, c in contents.items()}
    return contents, files


def _source(contents, calls, corrupt=False, gz=False):
    import gzip

    def fetch(names, workdir):
        calls.append(list(names))
        out = {}
        for n in names:
            blob = contents[n][:-1] + b"\xff" if corrupt else contents[n]
            out[n] = workdir / (n + ".gz" if gz else n)
            out[n].write_bytes(gzip.compress(blob) if gz else blob)
        return out

    return fetch


def test_fetch_checksum_mismatch_leaves_no_file_and_next_source_wins(tmp_path):
    (tmp_path / "src").mkdir()
    contents, files = _fake_files(tmp_path / "src")
    cache = tmp_path / "cache"
    bad_calls, good_calls = [], []
    sources = [("bad", _source(contents, bad_calls, corrupt=True)),
               ("good", _source(contents, good_calls, gz=True))]
    data.fetch_mnist(cache, sources=sources, files=files, log=lambda _: None)
    assert bad_calls and good_calls
    assert sorted(p.name for p in cache.iterdir()) == sorted(files)  # no temp files left behind
    for name, sha in files.items():
        assert mnist.sha256(cache / name) == sha
    # Cached: nothing is fetched again.
    again = []
    data.fetch_mnist(cache, sources=[("good", _source(contents, again))], files=files, log=lambda _: None)
    assert again == []


def test_fetch_every_source_failing_lists_what_was_tried(tmp_path):
    (tmp_path / "src").mkdir()
    contents, files = _fake_files(tmp_path / "src")

    def offline(names, workdir):
        raise OSError("network unreachable")

    with pytest.raises(data.FetchError) as err:
        data.fetch_mnist(tmp_path / "cache", sources=[("mirror-x", offline),
                                                     ("bad", _source(contents, [], corrupt=True))],
                         files=files, log=lambda _: None)
    msg = str(err.value)
    assert "mirror-x: OSError: network unreachable" in msg and "checksum mismatch" in msg
    assert "by hand" in msg
    assert list((tmp_path / "cache").iterdir()) == []


def test_load_mnist_missing_file_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m jaxdnn.data fetch"):
        data.load_mnist("test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split"):
        data.load_mnist("valid", data_dir=tmp_path)


def test_logit_log_det_matches_jacobian(key):
    x = jax.random.uniform(key, (2, 3, 3, 1), minval=0.01, maxval=0.99)
    y, log_det = data.logit_transform(x)
    chex.assert_shape(log_det, (2,))
    for i in range(2):
        jac = jax.jacfwd(lambda v: data.logit_transform(v.reshape(1, 3, 3, 1))[0].reshape(-1))(x[i].reshape(-1))
        np.testing.assert_allclose(log_det[i], jnp.linalg.slogdet(jac)[1], rtol=1e-5)
    x_back, inv_log_det = data.inverse_logit_transform(y)
    np.testing.assert_allclose(x_back, x, atol=1e-6)
    np.testing.assert_allclose(inv_log_det, -log_det, rtol=1e-5)


def test_bits_per_dim_of_the_uniform_density_is_8():
    # The uniform density on [0,1]^D has log p = 0: exactly 8 bits per 8-bit pixel.
    np.testing.assert_allclose(data.bits_per_dim(jnp.zeros(3), 784), 8.0, rtol=1e-6)
    np.testing.assert_allclose(data.bits_per_dim(jnp.array([784 * math.log(2.0)]), 784), 7.0, rtol=1e-6)


def test_dequantize_stays_in_its_pixel_bin(key):
    pixels = jnp.array([[0, 128, 255]], jnp.uint8).reshape(1, 1, 3)
    x = data.dequantize(key, pixels)
    chex.assert_shape(x, (1, 1, 3, 1))
    np.testing.assert_array_equal(jnp.floor(x * 256).astype(jnp.int32)[..., 0], pixels)


def test_to_pixels_inverts_every_value_of_a_bin(key):
    pixels = jnp.arange(256, dtype=jnp.uint8).reshape(1, 16, 16)
    np.testing.assert_array_equal(data.to_pixels(data.to_unit_interval(pixels)), pixels)
    np.testing.assert_array_equal(data.to_pixels(data.dequantize(key, pixels)), pixels)
    np.testing.assert_array_equal(data.to_pixels(jnp.array([-0.1, 1.0, 1.5]).reshape(1, 1, 3, 1)), [[[0, 255, 255]]])


def test_batches_are_deterministic_and_resumable(key):
    values = np.arange(100)
    stream = data.batches(key, values, 16)
    first = [next(stream) for _ in range(15)]
    resumed = data.batches(key, values, 16, start_step=9)
    for step, batch in first[9:]:
        s, b = next(resumed)
        assert s == step
        np.testing.assert_array_equal(b, batch)
    epoch = np.concatenate([b for _, b in first[:6]])
    assert len(set(epoch.tolist())) == 96  # a permutation: no repeats within an epoch


@pytest.mark.mnist
def test_real_mnist():
    """Needs `python -m jaxdnn.data fetch` (the README's test command runs it first)."""
    train_x, train_y = data.load_mnist("train+validation")
    test_x, test_y = data.load_mnist("test")
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == np.uint8
    split_x = np.concatenate([data.load_mnist("train")[0], data.load_mnist("validation")[0]])
    assert data.load_mnist("train")[0].shape == (55000, 28, 28)
    np.testing.assert_array_equal(split_x, train_x)  # train then validation: the whole file, no overlap
    assert test_x.shape == (10000, 28, 28)
    assert np.bincount(train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert int(train_x.astype(np.int64).sum()) == 1567298545


@pytest.mark.mnist
def test_fetch_cli_on_a_filled_cache_fetches_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxdnn.data", "fetch"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "already cached" in out.stdout
