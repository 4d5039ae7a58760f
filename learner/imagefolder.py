"""The ``folder`` data set: your own images in torchvision's ImageFolder layout."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from learner.datafiles import DatasetError

log = logging.getLogger(__name__)


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


class ImageFiles(Dataset[tuple[torch.Tensor, int]]):
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
