"""How a training set is split among the peers of a job.

Every peer computes the whole split from the labels, ``total`` and a seed, and keeps its own part;
the parts are disjoint because every peer computes the same split. Schemes (spelled on the command
line as :func:`parse_partition` reads them):

``iid`` (the default)
    A seeded permutation cut into ``total`` equal parts; the remainder is dropped. The same
    indices as :func:`learner.data.shard` always gave.
``dirichlet:ALPHA``
    Label skew after Hsu, Qi and Brown, "Measuring the effects of non-identical data distribution
    for federated visual classification" (2019), section 3: for every class, the proportions of
    its samples that go to each peer are drawn from Dir(ALPHA, ..., ALPHA). Small ALPHA (0.1):
    most peers see few classes; large ALPHA (100): close to IID. Every sample is used; every peer
    gets at least one (draws are repeated, then fixed deterministically, until that holds).
``classes:K``
    Pathological skew (McMahan et al. 2017): each peer holds K classes, assigned round-robin over
    a seeded order of the classes so that every class is used when ``total * K >= classes``;
    each class's samples are split equally among the peers holding it.

The draws use numpy's ``default_rng(seed)``: peers of one job must run the same numpy version
(numpy keeps ``Generator`` streams stable across releases but does not promise it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = [
    "SCHEMES",
    "all_parts",
    "dataset_labels",
    "describe",
    "parse_partition",
    "partition",
    "split_dataset",
]

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "classes")

# Hsu et al. redraw when a client comes out empty; after this many draws we fix it instead.
_DIRICHLET_DRAWS = 10


def parse_partition(spec: str) -> tuple[str, dict[str, Any]]:
    """Read a partition spec: ``iid``, ``dirichlet:ALPHA`` or ``classes:K``.

    Returns ``(scheme, keyword arguments for partition())``, e.g. ``("dirichlet", {"alpha":
    0.5})``. A bare ``dirichlet`` or ``classes`` takes the defaults (alpha 0.5, K 2). Raises
    ``ValueError`` with a message fit for the command line otherwise.
    """
    usage = "use iid, dirichlet:ALPHA (e.g. dirichlet:0.5) or classes:K (e.g. classes:2)"
    if not isinstance(spec, str):
        raise ValueError(f"partition spec must be a string, got {spec!r}; {usage}")
    scheme, sep, arg = spec.strip().partition(":")
    scheme = scheme.strip().lower()
    arg = arg.strip()
    if scheme == "iid":
        if sep:
            raise ValueError(f"partition {spec!r}: iid takes no parameter; {usage}")
        return "iid", {}
    if scheme == "dirichlet":
        if not sep:
            return "dirichlet", {"alpha": 0.5}
        try:
            alpha = float(arg)
        except ValueError:
            raise ValueError(f"partition {spec!r}: ALPHA must be a number; {usage}") from None
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"partition {spec!r}: ALPHA must be a finite number > 0")
        return "dirichlet", {"alpha": alpha}
    if scheme == "classes":
        if not sep:
            return "classes", {"classes_per_peer": 2}
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(f"partition {spec!r}: K must be an integer; {usage}") from None
        if k < 1:
            raise ValueError(f"partition {spec!r}: K must be at least 1")
        return "classes", {"classes_per_peer": k}
    raise ValueError(f"unknown partition {spec!r}; {usage}")


def _as_labels(labels: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"partition: labels must be one-dimensional, got shape {array.shape}")
    return array


def _check_num_total(num: int, total: int) -> None:
    if isinstance(total, bool) or not isinstance(total, int | np.integer) or total < 1:
        raise ValueError(f"partition: total must be a positive integer, got {total!r}")
    if isinstance(num, bool) or not isinstance(num, int | np.integer) or not 0 <= num < total:
        raise ValueError(f"partition: num must be an integer in [0, {total}), got {num!r}")


def partition(labels: np.ndarray | torch.Tensor | Sequence[int], num: int, total: int,
              scheme: str = "iid", *, alpha: float = 0.5, classes_per_peer: int = 2,
              seed: int = 0) -> np.ndarray:
    """Indices (``int64``) of peer ``num``'s part of a data set with these ``labels``.

    See the module docstring for the schemes. The result depends only on the arguments, so every
    peer process computes the same split and the ``total`` parts are disjoint. Raises
    ``ValueError`` for bad arguments or a data set too small for the split.
    """
    _check_num_total(num, total)
    return all_parts(labels, total, scheme, alpha=alpha, classes_per_peer=classes_per_peer,
                     seed=seed)[num]


def all_parts(labels: np.ndarray | torch.Tensor | Sequence[int], total: int,
              scheme: str = "iid", *, alpha: float = 0.5, classes_per_peer: int = 2,
              seed: int = 0) -> list[np.ndarray]:
    """The parts of all ``total`` peers (what :func:`partition` picks from); for logs and tests."""
    _check_num_total(0, total)
    y = _as_labels(labels)
    if scheme == "iid":
        return _iid(len(y), total, seed)
    if scheme == "dirichlet":
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"partition: alpha must be a finite number > 0, got {alpha!r}")
        return _dirichlet(y, total, alpha, seed)
    if scheme == "classes":
        if isinstance(classes_per_peer, bool) or not isinstance(classes_per_peer, int) \
                or classes_per_peer < 1:
            raise ValueError(f"partition: classes_per_peer must be an integer >= 1, "
                             f"got {classes_per_peer!r}")
        return _classes(y, total, classes_per_peer, seed)
    raise ValueError(f"partition: unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def _iid(n: int, total: int, seed: int) -> list[np.ndarray]:
    size = n // total
    if size == 0:
        raise ValueError(f"partition: cannot cut {n} examples into {total} non-empty parts")
    # torch's generator, not numpy's: these are the indices shard() has always produced.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return [order[i * size:(i + 1) * size].astype(np.int64) for i in range(total)]


def _dirichlet(y: np.ndarray, total: int, alpha: float, seed: int) -> list[np.ndarray]:
    n = len(y)
    if n < total:
        raise ValueError(f"partition: cannot give each of {total} peers a sample of {n}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    parts: list[list[np.ndarray]] = []
    for _ in range(_DIRICHLET_DRAWS):
        parts = [[] for _ in range(total)]
        for idx in by_class:
            proportions = rng.dirichlet(np.full(total, alpha))
            cuts = (np.cumsum(proportions) * len(idx)).astype(np.int64)[:-1]
            for peer, piece in enumerate(np.split(idx, cuts)):
                parts[peer].append(piece)
        if all(sum(len(p) for p in pieces) for pieces in parts):
            break
    result = [np.sort(np.concatenate(pieces)).astype(np.int64) for pieces in parts]
    # Still an empty peer (tiny alpha, many peers): hand it the last sample of the largest part.
    for peer in range(total):
        if len(result[peer]) == 0:
            donor = max(range(total), key=lambda p: (len(result[p]), -p))
            result[peer] = result[donor][-1:]
            result[donor] = result[donor][:-1]
    return result


def _classes(y: np.ndarray, total: int, k: int, seed: int) -> list[np.ndarray]:
    classes = np.unique(y)
    if k > len(classes):
        raise ValueError(f"partition: classes:{k} asks for more classes than the "
                         f"{len(classes)} the data set has")
    rng = np.random.default_rng(seed)
    order = classes[rng.permutation(len(classes))]
    holders: dict[int, list[int]] = {i: [] for i in range(len(classes))}
    for peer in range(total):
        for j in range(k):
            holders[(peer * k + j) % len(classes)].append(peer)
    unused = [order[i].item() for i, peers in holders.items() if not peers]
    if unused:
        log.warning("partition classes:%d with %d peers leaves classes %s unused", k, total,
                    unused)
    parts: list[list[np.ndarray]] = [[] for _ in range(total)]
    for i, peers in holders.items():
        if not peers:
            continue
        idx = rng.permutation(np.flatnonzero(y == order[i]))
        if len(idx) < len(peers):
            raise ValueError(f"partition: class {order[i].item()} has {len(idx)} samples, "
                             f"fewer than the {len(peers)} peers holding it")
        for peer, piece in zip(peers, np.array_split(idx, len(peers)), strict=True):
            parts[peer].append(piece)
    return [np.sort(np.concatenate(pieces)).astype(np.int64) for pieces in parts]


def describe(labels: np.ndarray | torch.Tensor | Sequence[int],
             parts: Sequence[np.ndarray] | Mapping[int, np.ndarray]) -> str:
    """One line per part: ``peer N: S samples, labels {label: count, ...}``.

    ``parts`` is a list (numbered from 0) or a mapping from peer number to indices.
    """
    y = _as_labels(labels)
    items = parts.items() if isinstance(parts, Mapping) else enumerate(parts)
    lines = []
    for num, indices in items:
        values, counts = np.unique(y[np.asarray(indices, dtype=np.int64)], return_counts=True)
        histogram = ", ".join(f"{v.item()}: {c}" for v, c in zip(values, counts, strict=True))
        lines.append(f"peer {num}: {len(indices)} samples, {len(values)} labels {{{histogram}}}")
    return "\n".join(lines)


def dataset_labels(dataset: Dataset[Any]) -> np.ndarray:
    """The labels of ``dataset``: a TensorDataset's second tensor, ``.targets`` (torchvision data
    sets, :class:`learner.data.ImageFiles`), a Subset of those, or else item by item."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return _as_labels(dataset.tensors[1])
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return _as_labels(targets)
    n = len(dataset)  # type: ignore[arg-type]
    labels = []
    for i in range(n):
        label = dataset[i][1]
        labels.append(int(label.item() if isinstance(label, torch.Tensor) else label))
    return np.asarray(labels, dtype=np.int64)


def split_dataset(dataset: Dataset[Any], num: int, total: int, spec: str = "iid",
                  seed: int = 0) -> Subset[Any]:
    """Peer ``num``'s part of ``dataset`` under the partition ``spec`` (see
    :func:`parse_partition`); logs the split at INFO. ``iid`` reads no labels."""
    scheme, options = parse_partition(spec)
    _check_num_total(num, total)
    if scheme == "iid":
        n = len(dataset)  # type: ignore[arg-type]
        indices = _iid(n, total, seed)[num]
        return Subset(dataset, indices.tolist())
    labels = dataset_labels(dataset)
    parts = all_parts(labels, total, scheme, seed=seed, **options)
    log.info("partition %s of %d samples among %d peers:\n%s", spec, len(labels), total,
             describe(labels, parts))
    return Subset(dataset, parts[num].tolist())
