"""Partitions among peers (iid, dirichlet, classes) and the ImageFolder loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from learner.data import DatasetError, ImageFiles, load_dataset, load_image_folder, shard
from learner.partition import (
    all_parts,
    dataset_labels,
    describe,
    parse_partition,
    partition,
    split_dataset,
)

# 10 classes of unequal sizes (50..140 samples), shuffled.
LABELS = np.random.default_rng(3).permutation(np.repeat(np.arange(10), np.arange(50, 150, 10)))


def _parts(scheme: str, total: int, **kw: object) -> list[np.ndarray]:
    return [partition(LABELS, i, total, scheme, **kw) for i in range(total)]  # type: ignore[arg-type]


def _mean_entropy(parts: list[np.ndarray]) -> float:
    entropies = []
    for p in parts:
        counts = np.bincount(LABELS[p], minlength=10).astype(float)
        q = counts[counts > 0] / counts.sum()
        entropies.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(entropies))


# ------------------------------------------------------------------------------- partition


@pytest.mark.parametrize("scheme,kw", [("iid", {}), ("dirichlet", {"alpha": 0.3}),
                                       ("classes", {"classes_per_peer": 2})])
def test_deterministic_disjoint(scheme: str, kw: dict[str, object]) -> None:
    parts = _parts(scheme, 7, seed=5, **kw)
    assert [p.tolist() for p in parts] == [p.tolist() for p in _parts(scheme, 7, seed=5, **kw)]
    assert [p.tolist() for p in parts] != [p.tolist() for p in _parts(scheme, 7, seed=6, **kw)]
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat)  # disjoint
    assert all(len(p) >= 1 and p.dtype == np.int64 for p in parts)


def test_coverage() -> None:
    n = len(LABELS)
    iid = np.concatenate(_parts("iid", 7))
    assert len(iid) == n - n % 7 and {len(p) for p in _parts("iid", 7)} == {n // 7}
    for total in (3, 7, 20):
        assert sorted(np.concatenate(_parts("dirichlet", total, alpha=0.5))) == list(range(n))
    # classes: 5 peers x 2 classes cover the 10 classes, so every sample is used
    assert sorted(np.concatenate(_parts("classes", 5, classes_per_peer=2))) == list(range(n))
    assert sorted(np.concatenate(_parts("classes", 7, classes_per_peer=3))) == list(range(n))


def test_iid_is_the_old_shard() -> None:
    data = TensorDataset(torch.arange(103), torch.zeros(103, dtype=torch.int64))
    for seed in (0, 7):
        order = torch.randperm(103, generator=torch.Generator().manual_seed(seed))
        for num in range(4):
            old = order[num * 25:(num + 1) * 25].tolist()  # the shard() of before
            assert list(shard(data, num, 4, seed=seed).indices) == old
            assert partition(np.zeros(103), num, 4, seed=seed).tolist() == old
            assert list(split_dataset(data, num, 4, "iid", seed=seed).indices) == old


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    entropy = {alpha: _mean_entropy(_parts("dirichlet", 10, alpha=alpha, seed=1))
               for alpha in (0.1, 1.0, 100.0)}
    assert entropy[0.1] < entropy[1.0] < entropy[100.0]
    assert entropy[100.0] > 0.9 * np.log(10)  # close to uniform over the 10 labels


def test_dirichlet_every_peer_gets_a_sample() -> None:
    labels = np.repeat(np.arange(3), 20)
    parts = all_parts(labels, 40, "dirichlet", alpha=0.01, seed=0)
    assert all(len(p) >= 1 for p in parts)
    assert sorted(np.concatenate(parts)) == list(range(60))
    with pytest.raises(ValueError, match="each of 61 peers"):
        all_parts(labels, 61, "dirichlet")


def test_classes() -> None:
    parts = _parts("classes", 8, classes_per_peer=2)
    assert all(len(np.unique(LABELS[p])) == 2 for p in parts)
    # each class's samples are split equally among its holders
    for cls in range(10):
        sizes = [int((LABELS[p] == cls).sum()) for p in parts if (LABELS[p] == cls).any()]
        assert max(sizes) - min(sizes) <= 1
    # fewer peer slots than classes: some classes go unused, each peer still has exactly k
    parts = _parts("classes", 2, classes_per_peer=3)
    assert [len(np.unique(LABELS[p])) for p in parts] == [3, 3]
    with pytest.raises(ValueError, match="more classes"):
        partition(LABELS, 0, 2, "classes", classes_per_peer=11)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num must be"):
        partition(LABELS, 3, 3)
    with pytest.raises(ValueError, match="total must be"):
        partition(LABELS, 0, 0)
    with pytest.raises(ValueError, match="unknown scheme"):
        partition(LABELS, 0, 2, "random")
    with pytest.raises(ValueError, match="alpha"):
        partition(LABELS, 0, 2, "dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="one-dimensional"):
        partition(np.zeros((4, 2)), 0, 2)


def test_parse_partition() -> None:
    assert parse_partition("iid") == ("iid", {})
    assert parse_partition("dirichlet:0.5") == ("dirichlet", {"alpha": 0.5})
    assert parse_partition(" Dirichlet:1e-1 ") == ("dirichlet", {"alpha": 0.1})
    assert parse_partition("dirichlet") == ("dirichlet", {"alpha": 0.5})
    assert parse_partition("classes:2") == ("classes", {"classes_per_peer": 2})


@pytest.mark.parametrize("spec,match", [
    ("", "unknown partition"), ("random", "unknown partition"), ("iid:3", "no parameter"),
    ("dirichlet:abc", "must be a number"), ("dirichlet:0", "> 0"), ("dirichlet:-1", "> 0"),
    ("dirichlet:nan", "> 0"), ("dirichlet:inf", "> 0"), ("classes:0", "at least 1"),
    ("classes:1.5", "integer"), ("classes:", "integer"),
])
def test_parse_partition_rejects(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_partition(spec)


def test_describe_and_split_dataset() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    text = describe(labels, [np.array([0, 1, 2]), np.array([3, 4, 5])])
    assert text.splitlines() == ["peer 0: 3 samples, 2 labels {0: 2, 1: 1}",
                                 "peer 1: 3 samples, 2 labels {1: 1, 2: 2}"]
    assert describe(labels, {4: np.array([5])}) == "peer 4: 1 samples, 1 labels {2: 1}"

    data = TensorDataset(torch.zeros(len(LABELS), 2), torch.from_numpy(LABELS))
    part = split_dataset(data, 1, 5, "classes:2", seed=3)
    assert isinstance(part, Subset)
    assert part.indices == _parts("classes", 5, classes_per_peer=2, seed=3)[1].tolist()
    assert np.array_equal(dataset_labels(part), LABELS[part.indices])


# ----------------------------------------------------------------------------- image folder


def _png(path: Path, value: int, size: tuple[int, int] = (10, 12), mode: str = "L") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color: int | tuple[int, int, int] = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, size, color).save(path)


def _folder(root: Path, per_class: dict[str, int]) -> None:
    for c, (name, count) in enumerate(per_class.items()):
        for i in range(count):
            _png(root / name / f"{i:03d}.png", 40 * c + i, mode="RGB" if i % 2 else "L")


def test_image_folder_auto_split(tmp_path: Path) -> None:
    _folder(tmp_path, {"cat": 10, "dog": 5, "emu": 2})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    train, test = load_image_folder(tmp_path)
    assert isinstance(train, TensorDataset) and isinstance(test, TensorDataset)
    assert (len(train), len(test)) == (17 - 4, 4)  # 2 + 1 + 1 to test, stratified
    assert train.tensors[0].shape == (13, 1, 28, 28) and train.tensors[0].dtype == torch.float32
    assert sorted(test.tensors[1].tolist()) == [0, 0, 1, 2]
    x = train.tensors[0]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(unbiased=False)) - 1) < 1e-3
    again, _ = load_image_folder(tmp_path)
    assert isinstance(again, TensorDataset)
    assert torch.equal(again.tensors[0], x) and torch.equal(again.tensors[1], train.tensors[1])
    # the same via load_dataset("folder")
    train2, _ = load_dataset("folder", data_dir=tmp_path)
    assert len(train2) == 13


def test_image_folder_train_test_rgb_and_lazy(tmp_path: Path) -> None:
    _folder(tmp_path / "train", {"a": 3, "b": 3})
    _folder(tmp_path / "val", {"b": 2})  # test set may lack a class; labels follow train/
    train, test = load_image_folder(tmp_path, image_size=16, grayscale=False)
    assert isinstance(train, TensorDataset) and isinstance(test, TensorDataset)
    assert train.tensors[0].shape == (6, 3, 16, 16)
    assert test.tensors[1].tolist() == [1, 1]
    lazy_train, lazy_test = load_image_folder(tmp_path, image_size=16, grayscale=False,
                                              materialize=False)
    assert isinstance(lazy_train, ImageFiles) and len(lazy_test) == 2
    x, y = lazy_train[4]
    assert torch.allclose(x, train.tensors[0][4], atol=1e-5) and y == train.tensors[1][4]
    assert dataset_labels(lazy_train).tolist() == train.tensors[1].tolist()


def test_image_folder_bad_layouts(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(DatasetError, match="needs --data-dir"):
        load_dataset("folder")
    _png(tmp_path / "loose" / "x.png", 3)
    with pytest.raises(DatasetError, match="no class folders .*x.png"):
        load_image_folder(tmp_path / "loose")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match="no images"):
        load_image_folder(tmp_path / "empty")
    _folder(tmp_path / "split" / "train", {"a": 2})
    _folder(tmp_path / "split" / "test", {"a": 1, "z": 1})
    with pytest.raises(DatasetError, match=r"classes \['z'\] that the training folder lacks"):
        load_image_folder(tmp_path / "split")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "1.png").write_bytes(b"not a png")
    (tmp_path / "bad" / "a" / "2.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image"):
        load_image_folder(tmp_path / "bad")
    _folder(tmp_path / "tiny", {"a": 1, "b": 1})
    with pytest.raises(DatasetError, match="too few images"):
        load_image_folder(tmp_path / "tiny")
