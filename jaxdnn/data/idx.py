"""IDX file format (LeCun's MNIST container): parse with every header field checked."""

from __future__ import annotations

import os

import numpy as np

# Third byte of the magic number -> numpy dtype (big-endian where multi-byte).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(path: str | os.PathLike, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Reads an uncompressed IDX file into a numpy array of its declared shape.

    Raises ValueError naming the file when the magic number, dtype, number of
    dimensions, declared shape or exact file size is wrong.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: not a valid IDX file: {what}")

    if len(raw) < 4:
        raise bad(f"only {len(raw)} bytes, shorter than the 4-byte magic number")
    if raw[0] != 0 or raw[1] != 0:
        raise bad(f"magic number starts with {raw[0]:#04x} {raw[1]:#04x}, expected 0x00 0x00")
    if raw[2] not in _IDX_DTYPES:
        raise bad(f"unknown dtype code {raw[2]:#04x} in the magic number")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if ndim == 0:
        raise bad("zero dimensions declared")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise bad(f"truncated header: {len(raw)} bytes, need {header} for {ndim} dimensions")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if expected_shape is not None and shape != tuple(expected_shape):
        raise bad(f"dimensions {shape}, expected {tuple(expected_shape)}")
    size = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != size:
        kind = "truncated" if len(raw) < size else "trailing bytes"
        raise bad(f"{kind}: file has {len(raw)} bytes, header {shape} implies {size}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes an array as an IDX file (used by tests and by hand-placed data)."""
    code = {v.newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    dtype = np.dtype(array.dtype)
    if dtype not in code:
        raise ValueError(f"dtype {dtype} has no IDX code")
    be = _IDX_DTYPES[code[dtype]]
    with open(path, "wb") as f:
        f.write(bytes([0, 0, code[dtype], array.ndim]))
        f.write(np.asarray(array.shape, ">u4").tobytes())
        f.write(np.ascontiguousarray(array, be).tobytes())
