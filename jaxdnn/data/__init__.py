"""MNIST data: IDX parsing, a checksummed cache, preprocessing and batching."""

from jaxdnn.data.batches import batches, epoch_permutation
from jaxdnn.data.idx import parse_idx, write_idx
from jaxdnn.data.mnist import FetchError, default_data_dir, fetch_mnist, load_mnist
from jaxdnn.data.preprocess import (
    LOGIT_ALPHA,
    bits_per_dim,
    dequantize,
    inverse_logit_transform,
    logit_transform,
    to_pixels,
    to_unit_interval,
)

__all__ = [
    "LOGIT_ALPHA", "FetchError", "batches", "bits_per_dim", "default_data_dir",
    "dequantize", "epoch_permutation", "fetch_mnist", "inverse_logit_transform", "load_mnist",
    "logit_transform", "parse_idx", "to_pixels", "to_unit_interval", "write_idx",
]
