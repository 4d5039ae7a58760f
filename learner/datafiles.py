"""What every data set loader shares: the error type, IDX files, the cache folder, tensors.

Nothing here unpickles: IDX files are parsed with :func:`read_idx` and ``.npz`` files are
written atomically and read with ``allow_pickle=False``.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

log = logging.getLogger(__name__)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


class DatasetError(Exception):
    """A data set cannot be found, fetched or parsed; the message says what to do."""


# --------------------------------------------------------------------------------------------
# IDX files (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")

# Type code (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
# Refuse anything that would decompress to more than this (a full MNIST train set is 47 MB).
_IDX_MAX_BYTES = 1 << 30


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed, by its ``.gz`` suffix).

    Checks the magic number, the type code, the number of dimensions and that the payload is
    exactly as long as the dimensions say. Raises :class:`DatasetError` naming the file otherwise.
    The result is a native-endian array (``uint8`` for image and label files).
    """
    p = Path(path)
    try:
        opener: Callable[..., io.BufferedIOBase]
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rb") as f:
            header = f.read(4)
            if len(header) != 4:
                raise DatasetError(f"{p}: not an IDX file (shorter than its 4-byte magic number)")
            zero, code, ndim = struct.unpack(">HBB", header)
            if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
                raise DatasetError(f"{p}: not an IDX file (bad magic number {header.hex()})")
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) != 4 * ndim:
                raise DatasetError(f"{p}: truncated IDX header ({ndim} dimensions announced)")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            dtype = np.dtype(_IDX_DTYPES[code])
            expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
            if expected > _IDX_MAX_BYTES:
                raise DatasetError(f"{p}: IDX dimensions {dims} too large ({expected} bytes)")
            payload = f.read(expected + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"{p}: cannot read IDX file: {exc}") from exc
    if len(payload) != expected:
        what = "truncated" if len(payload) < expected else "has trailing data"
        raise DatasetError(
            f"{p}: IDX file {what}: dimensions {dims} need {expected} bytes of data"
        )
    return np.frombuffer(payload, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")  # some mirrors spell it train-images.idx3-ubyte
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _load_idx_pair(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Images and labels for ``prefix`` ("train" or "t10k") in ``directory``, or None if absent."""
    images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        return None
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(f"{images_path}: expected uint8 N x 28 x 28 images, got "
                           f"{images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != (images.shape[0],):
        raise DatasetError(f"{labels_path}: expected {images.shape[0]} uint8 labels, got "
                           f"{labels.dtype} {labels.shape}")
    if labels.size and int(labels.max()) > 9:
        raise DatasetError(f"{labels_path}: labels outside 0..9")
    return images, labels


def _idx_dirs(data_dir: Path) -> list[Path]:
    return [data_dir, data_dir / "raw", data_dir / "MNIST" / "raw"]


_Arrays4 = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _load_idx_dataset(data_dir: Path) -> _Arrays4 | None:
    for directory in _idx_dirs(data_dir):
        train = _load_idx_pair(directory, "train")
        test = _load_idx_pair(directory, "t10k")
        if train is not None and test is not None:
            log.info("reading IDX files from %s", directory)
            return train[0], train[1], test[0], test[1]
    return None


# --------------------------------------------------------------------------------------------
# Tensors


def _to_dataset(images: np.ndarray, labels: np.ndarray, mean: float, std: float) -> TensorDataset:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).to(torch.float32)
    x = x.div_(255.0).sub_(mean).div_(std).unsqueeze_(1)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
    return TensorDataset(x, y)


def default_cache_dir() -> Path:
    """``$PEERLEARN_CACHE``, else ``~/.cache/peerlearn``."""
    env = os.environ.get("PEERLEARN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "peerlearn"


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Write a compressed ``.npz``; concurrent readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes it private; the cache is shared
            # A file object, so numpy adds no ".npz" suffix. (numpy stubs mistype **kwds.)
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

