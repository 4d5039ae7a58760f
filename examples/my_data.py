"""Your own data for ``peerlearn peer --data examples.my_data:load``.

A ``--data`` function returns ``(train_dataset, test_dataset)``: map-style torch Datasets (with
``len()``) whose items are ``(x, y)``, ``x`` a float tensor the model takes and ``y`` an integer
class label. Here: a small synthetic image task that needs no download -- ten classes, each a
bright square at its own place on a noisy 28 x 28 canvas, jittered by up to two pixels.

``load()`` gives the whole data set, and every peer keeps the part that ``--partition`` assigns it.
``load_own_part(num, total)`` shows the other form: a function of two parameters is called with
this peer's number and the number of peers and returns the peer's *own* training set (e.g. the
files on this machine); the peer trains on all of it.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

CLASSES = 10
SIZE = 28


def _make(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    images = 0.3 * torch.randn(count, 1, SIZE, SIZE, generator=generator)
    jitter = torch.randint(-2, 3, (count, 2), generator=generator)
    for i in range(count):
        label = int(labels[i])
        top = 3 + 6 * (label // 4) + int(jitter[i, 0])  # a 3 x 4 grid of places, 10 used
        left = 2 + 6 * (label % 4) + int(jitter[i, 1])
        images[i, 0, top:top + 6, left:left + 6] += 1.0
    images = (images - images.mean()) / images.std()
    return TensorDataset(images, labels)


def load() -> tuple[TensorDataset, TensorDataset]:
    """3,000 training and 600 test images, the same on every peer (fixed seeds)."""
    return _make(3000, seed=1), _make(600, seed=2)


def load_own_part(num: int, total: int) -> tuple[TensorDataset, TensorDataset]:
    """Peer ``num`` of ``total``: its own 1,000 training images (a different draw on each
    peer, as private data would be) and the shared test set."""
    return _make(1000, seed=100 + num), _make(600, seed=2)
