"""A model in pieces (overlay.pieces): the receiver's store as a unit, then real hosts over a
real rendezvous delivering a multi-MB model in pieces over ZeroMQ and WebRTC, and a delivery
whose link is cut mid-way that resumes from the acknowledged pieces (digest checked)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np
import pytest

from overlay.errors import WireError
from overlay.host import Host
from overlay.models import OutgoingModel
from overlay.pieces import PieceStore, piece_bytes_of, piece_plan
from overlay.transport.base import LinkKind
from overlay.wire import FrameType, Limits, NamedArray, encode_control
from rendezvous.server import run_rendezvous
from testkit.fixtures import running_host, until

JOB = "pieces"
DIGEST = bytes(range(32))


def _header(lengths: list[int], offset: int, digest: bytes = DIGEST) -> dict[str, Any]:
    return {"model": digest, "frames": lengths, "offset": offset}


def _frames(lengths: list[int], seed: int = 0) -> list[memoryview]:
    rng = random.Random(seed)
    return [memoryview(rng.randbytes(n)) for n in lengths]


def test_plan_and_slices_cover_the_frames_end_to_end() -> None:
    frames = _frames([10, 0, 25, 7])
    whole = b"".join(bytes(f) for f in frames)
    plan = piece_plan(len(whole), 8)
    assert plan[0] == (0, 8) and plan[-1] == (40, 2) and sum(n for _, n in plan) == 42
    assert b"".join(piece_bytes_of(frames, o, n) for o, n in plan) == whole
    with pytest.raises(ValueError):
        piece_plan(10, 0)


def test_pieces_in_any_order_with_duplicates_rebuild_the_frames() -> None:
    lengths = [100, 3000, 5000]
    frames = _frames(lengths, 1)
    store = PieceStore()
    plan = piece_plan(sum(lengths), 1024)
    order = plan + plan[:3]  # three duplicates
    random.Random(2).shuffle(order)
    seen = set()
    for offset, n in order:
        if len(seen) == len(plan):
            break
        partial = store.add("alice", _header(lengths, offset),
                            memoryview(piece_bytes_of(frames, offset, n)), now=1.0)
        seen.add(offset)
        assert partial.have == sum(plan_n for o, plan_n in plan if o in seen)
    assert partial.complete and len(store) == 0  # a complete model leaves the store
    assert [bytes(f) for f in partial.frames()] == [bytes(f) for f in frames]


def test_bad_pieces_are_refused_with_a_reason() -> None:
    store = PieceStore(Limits(max_total_bytes=10_000, max_header_bytes=1000))
    data = memoryview(b"x" * 10)
    cases = [
        ({"frames": [20], "offset": 0}, "bad_piece"),  # no digest
        (_header([], 0), "bad_piece"),
        (_header([-1, 20], 0), "bad_piece"),
        (_header([100, 20_000], 0), "too_large"),
        (_header([2000, 10], 0), "header_too_large"),
        (_header([20], 15), "bad_piece"),  # past the end
        (_header([20], -1), "bad_piece"),
    ]
    for header, reason in cases:
        with pytest.raises(WireError) as exc:
            store.add("a", header, data)
        assert exc.value.reason == reason, header
    store.add("a", _header([20, 30], 0), data)
    with pytest.raises(WireError, match="disagree"):
        store.add("a", _header([25, 25], 10), data)
    with pytest.raises(WireError, match="overlaps"):
        store.add("a", _header([20, 30], 5), data)
    with pytest.raises(WireError, match="changed its length"):
        store.add("a", _header([20, 30], 0), memoryview(b"y" * 5))
    with pytest.raises(WireError, match="outside"):
        store.add("a", _header([20, 30], 10), memoryview(b""))


def test_what_a_receiver_holds_is_bounded_and_expires() -> None:
    store = PieceStore(Limits(max_total_bytes=1000), idle_timeout=10, partials_per_sender=2,
                       max_bytes=2500)
    one = memoryview(b"z")
    for i in range(3):  # a third model from one sender drops the oldest
        store.add("a", _header([1000], 0, bytes([i]) * 32), one, now=float(i))
    assert len(store) == 2 and store.held_bytes() == 2000
    with pytest.raises(WireError) as exc:  # the memory bound: another sender's model is busy
        store.add("b", _header([1000], 0), one, now=3.0)
    assert exc.value.reason == "busy"
    assert store.last_progress("a") == 2.0 and store.last_progress("b") is None
    store.expire(11.5)  # the first left (last piece at 1.0), the second (2.0) is kept
    assert len(store) == 1
    store.forget("a")
    assert len(store) == 0


# ---- real hosts ---------------------------------------------------------------------------


def _big(host: Host[Any], epoch: int, mb: float = 5.0) -> OutgoingModel:
    rng = np.random.default_rng(epoch)
    n = int(mb * 1e6 / 4)
    arrays = [NamedArray("w", rng.standard_normal(n, dtype=np.float32)),
              NamedArray("b", rng.standard_normal(300, dtype=np.float32))]
    return OutgoingModel(job=JOB, sender=host.peer_id, epoch=epoch, samples=10, arrays=arrays)


@pytest.mark.timeout(90)
async def test_a_large_model_goes_in_pieces_over_zeromq_and_webrtc() -> None:
    async with run_rendezvous() as server, \
            running_host(server, job=JOB) as public, \
            running_host(server, job=JOB, listen=None) as natted:
        await until(lambda: natted.peer_id in public.members
                    and public.peer_id in natted.members, 10)
        # pieces: 16 MiB on ZeroMQ, 256 KiB on WebRTC
        for sender, receiver, kind, mb in [(natted, public, LinkKind.ZMQ, 40.0),
                                           (public, natted, LinkKind.WEBRTC_DIRECT, 5.0)]:
            encoded = await sender.encode(_big(sender, 3, mb))
            await sender.send_model(receiver.peer_id, encoded)
            got = await asyncio.wait_for(receiver.inbox.get(), 30)
            assert got.digest == encoded.digest and got.epoch == 3
            np.testing.assert_array_equal(got.arrays[0].array,
                                          _big(sender, 3, mb).arrays[0].array)
            assert sender.links[receiver.peer_id].kind is kind
            assert receiver.pieces.completed == 1
            assert len(receiver.pieces) == 0 and receiver.receiving_from(sender.peer_id) is None
        assert public.webrtc is not None
        info = public.webrtc.link_info(natted.peer_id)
        assert info is not None and info["lanes"] >= 2  # striped over several connections


@pytest.mark.timeout(120)
async def test_a_delivery_cut_mid_way_resumes_from_the_acknowledged_pieces() -> None:
    async with run_rendezvous() as server, \
            running_host(server, job=JOB, listen=None, backoff_initial=0.2) as a, \
            running_host(server, job=JOB, listen=None, backoff_initial=0.2) as b:
        await until(lambda: a.peer_id in b.members and b.peer_id in a.members, 10)
        assert a.webrtc is not None and b.webrtc is not None
        encoded = await a.encode(_big(a, 7, mb=12.0))
        sent_before = a.webrtc.stats.bytes_out
        send = asyncio.create_task(a.send_model(b.peer_id, encoded))
        # cut the link from the receiver's side once part of the model has arrived
        await until(lambda: any(p.have >= 3_000_000 for p in b.pieces.partials()), 30)
        had = max(p.have for p in b.pieces.partials())
        await b.webrtc.forget(a.peer_id)
        await asyncio.wait_for(send, 60)
        got = await asyncio.wait_for(b.inbox.get(), 10)
        assert got.digest == encoded.digest  # the resumed model passed every check
        np.testing.assert_array_equal(got.arrays[0].array, _big(a, 7, mb=12.0).arrays[0].array)
        # resumed, not restarted: well under two models' worth went out in all
        sent = a.webrtc.stats.bytes_out - sent_before
        assert sent < encoded.nbytes * 2 - had / 2, (sent, encoded.nbytes, had)
        assert b.pieces.held_bytes() == 0


async def test_a_host_refuses_hostile_piece_headers_with_a_reason() -> None:
    from overlay.host import HostConfig
    from overlay.identity import Identity

    host: Host[Any] = Host(Identity.generate(), HostConfig(rendezvous="127.0.0.1:1", job=JOB))
    data = memoryview(b"x" * 10)
    for header, payloads in [({"model": [1, 2], "frames": [10], "offset": 0}, [data]),
                             ({"model": {"a": 1}, "frames": [10], "offset": 0}, [data]),
                             (_header([10], 0), [data, data]),
                             (_header([10], 0), [])]:
        with pytest.raises(WireError) as exc:
            await host._take_piece(header, payloads, "someone")
        assert exc.value.reason == "bad_piece", header
    # pieces that make something else than a model: refused once complete
    ping = encode_control(FrameType.PING, request_id="r")
    with pytest.raises(WireError, match="do not make a model"):
        await host._take_piece(_header([len(ping)], 0), [memoryview(ping)], "someone")
    assert len(host.pieces) == 0
