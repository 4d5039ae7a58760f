"""ZmqTransport over real sockets on loopback: addressing, handshake timeouts, libzmq's size
limit, dial-back, close.

(What every transport does -- round trip, refusals, limits, timeouts, vanishing peers,
concurrency, close -- is in tests/test_transport_contract.py; CURVE itself, origins and
strangers: tests/test_curve.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from overlay.dialback import dial_back
from overlay.errors import TransportError, WireError
from overlay.identity import Identity
from overlay.transport.base import Frames, Handler, StaticDirectory
from overlay.transport.zeromq import (
    SPLIT_BYTES,
    ZmqTransport,
    is_split,
    join_group,
    split_frames,
    split_groups,
)
from overlay.wire import (
    DEFAULT_HASH,
    FrameType,
    Limits,
    ModelMessage,
    NamedArray,
    PrehashedPayloads,
    decode_header,
    decode_model,
    encode_control,
    encode_model,
    request_id_of,
)
from testkit.fixtures import reserved_port

pytestmark = pytest.mark.timeout(30)

LOOPBACK = "tcp://127.0.0.1:0"
SENDER = Identity.generate()
# Irregular on purpose: a prototype DEALER round-robins B, C, B, C... (or C, B, ...), which a
# strictly alternating sequence could match by luck; this one matches neither rotation.
IRREGULAR = "BCCBCBBCBC"
ALTERNATING = "BCBCBCBCBC"


def addressed_model(to: str, seq: int) -> tuple[list[bytes | memoryview], str, ModelMessage]:
    """An encoded model whose payload names its intended recipient; (frames, request_id, msg)."""
    request_id = secrets.token_hex(8)
    msg = ModelMessage(
        job="j", sender=SENDER.peer_id, epoch=seq, samples=1, request_id=request_id,
        arrays=[NamedArray("to", np.frombuffer(to.encode(), dtype=np.uint8)),
                NamedArray("seq", np.array(seq, dtype=np.int64))],
    )
    return encode_model(msg, SENDER), request_id, msg


class Recorder:
    """A handler that verifies models, records (seq, intended recipient) and acks them."""

    def __init__(self, known: Callable[[str], bytes | None] | None = None) -> None:
        self.got: list[tuple[int, str]] = []
        self.calls = 0
        self._known = known or {SENDER.peer_id: SENDER.public_key}.get

    async def __call__(self, header: dict[str, Any], payloads: list[memoryview],
                       origin: str | None) -> Frames:
        self.calls += 1
        msg = decode_model(header, payloads, self._known)  # WireError -> the transport nacks
        arrays = {a.name: a.array for a in msg.arrays}
        self.got.append((int(arrays["seq"]), arrays["to"].tobytes().decode()))
        return [encode_control(FrameType.ACK, request_id=msg.request_id, digest=msg.digest)]


async def no_handler(header: dict[str, Any], payloads: list[memoryview],
                     origin: str | None) -> Frames:
    raise AssertionError("a sender-only transport got a request")


DIRECTORY = StaticDirectory()
"""Every transport of this module is a member of it, with its bound address."""


@contextlib.asynccontextmanager
async def transport(handler: Handler = no_handler, listen: str | None = LOOPBACK,
                    limits: Limits = Limits(),
                    identity: Identity | None = None) -> AsyncIterator[ZmqTransport]:
    identity = identity or Identity.generate()
    async with ZmqTransport(identity, listen, handler, limits, directory=DIRECTORY) as t:
        DIRECTORY.add(identity.peer_id, identity.public_key, t.address)
        yield t


def curve_dealer(ctx: zmq.asyncio.Context, server: Identity) -> zmq.asyncio.Socket:
    """A bare DEALER that completes the CURVE handshake with ``server`` (throw-away key)."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    public, secret = zmq.curve_keypair()
    dealer.setsockopt(zmq.CURVE_PUBLICKEY, public)
    dealer.setsockopt(zmq.CURVE_SECRETKEY, secret)
    dealer.setsockopt(zmq.CURVE_SERVERKEY, server.curve_public_key)
    return dealer


@contextlib.asynccontextmanager
async def raw_context() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def check_delivery(order: str, got_b: list[tuple[int, str]], got_c: list[tuple[int, str]]) -> None:
    """B got exactly the messages meant for B, C those for C, each once."""
    assert sorted(got_b) == [(i, "B") for i, to in enumerate(order) if to == "B"]
    assert sorted(got_c) == [(i, "C") for i, to in enumerate(order) if to == "C"]


# ---- addressing: the prototype bug ----------------------------------------------------------


@pytest.mark.parametrize(("order", "concurrent"), [(ALTERNATING, False), (IRREGULAR, True)])
async def test_each_model_reaches_the_peer_it_is_addressed_to(order: str,
                                                              concurrent: bool) -> None:
    rec_b, rec_c = Recorder(), Recorder()
    async with transport(rec_b) as b, transport(rec_c) as c, transport(listen=None) as a:
        peer = {"B": b.identity.peer_id, "C": c.identity.peer_id}

        async def send(seq: int, to: str) -> None:
            frames, request_id, msg = addressed_model(to, seq)
            header, _ = await a.request(peer[to], frames, request_id, timeout=5.0)
            assert header["type"] == FrameType.ACK.value
            assert header["request_id"] == request_id
            assert header["digest"] == msg.digest

        if concurrent:
            await asyncio.gather(*(send(i, to) for i, to in enumerate(order)))
        else:
            for i, to in enumerate(order):
                await send(i, to)
        check_delivery(order, rec_b.got, rec_c.got)
        assert len(rec_b.got) == len(rec_c.got) == 5
        assert a.stats.messages_out == 10
        assert b.stats.messages_in == c.stats.messages_in == 5
        assert not b.stats.rejected and not c.stats.rejected


async def test_the_prototype_single_dealer_misdelivers() -> None:
    """The prototype's pattern (one DEALER connected to every peer) fails the check above.

    (One DEALER has one CURVE server key, so here B and C share an identity.)"""
    rec_b, rec_c = Recorder(), Recorder()
    shared = Identity.generate()
    async with transport(rec_b, identity=shared) as b, \
            transport(rec_c, identity=shared) as c, raw_context() as ctx:
        dealer = curve_dealer(ctx, shared)
        assert b.address is not None and c.address is not None
        dealer.connect(b.address)
        dealer.connect(c.address)
        for i, to in enumerate(IRREGULAR):
            frames, _, _ = addressed_model(to, i)
            await dealer.send_multipart(frames, copy=False)
        for _ in IRREGULAR:  # every message is acked... by whoever got it
            reply = await asyncio.wait_for(dealer.recv_multipart(), 5.0)
            assert len(reply) == 1
        await eventually(lambda: len(rec_b.got) + len(rec_c.got) == len(IRREGULAR))
        with pytest.raises(AssertionError):
            check_delivery(IRREGULAR, rec_b.got, rec_c.got)
        misdelivered = [m for m in rec_b.got if m[1] == "C"] + [m for m in rec_c.got if m[1] == "B"]
        assert misdelivered


# ---- timeouts and links ---------------------------------------------------------------------


async def test_nobody_listening_times_out_drops_the_link_and_recovers() -> None:
    with reserved_port() as port:  # refused until the listener below binds it
        address = f"tcp://127.0.0.1:{port}"
        peer = Identity.generate()
        DIRECTORY.add(peer.peer_id, peer.public_key, address)
        async with transport(listen=None) as a:
            frames, request_id, _ = addressed_model("B", 0)
            started = time.monotonic()
            with pytest.raises(TransportError, match="handshake"):
                await a.request(peer.peer_id, frames, request_id, timeout=0.5)
            assert time.monotonic() - started < 0.5 + 1.0
            assert not a._links

            rec = Recorder()
            async with transport(rec, listen=address, identity=peer) as b:
                assert b.address == address
                frames, request_id, _ = addressed_model("B", 1)
                header, _ = await a.request(peer.peer_id, frames, request_id, timeout=5.0)
                assert header["type"] == FrameType.ACK.value
                assert rec.got == [(1, "B")]


# ---- hostile input --------------------------------------------------------------------------


async def test_frame_over_maxmsgsize_drops_the_connection_and_serving_goes_on() -> None:
    limits = Limits(max_total_bytes=1000, max_header_bytes=1000)
    rec = Recorder()
    async with transport(rec, limits=limits) as b, transport(listen=None) as a, \
            raw_context() as ctx:
        assert b.address is not None
        dealer = curve_dealer(ctx, b.identity)
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED
                                            | zmq.EVENT_DISCONNECTED)
        dealer.connect(b.address)

        async def next_event() -> int:
            event = parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), 5.0))
            return int(event["event"])

        assert await next_event() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        await dealer.send(b"x" * 100_000)
        assert await next_event() == zmq.EVENT_DISCONNECTED
        dealer.disable_monitor()
        assert rec.calls == 0 and b.stats.messages_in == 0

        frames, request_id, _ = addressed_model("B", 3)
        assert sum(len(f) for f in frames) < 1000
        header, _ = await a.request(b.identity.peer_id, frames, request_id, timeout=5.0)
        assert header["type"] == FrameType.ACK.value
        assert rec.got == [(3, "B")]


# ---- large frames travel split ----------------------------------------------------------------


def unsplit(frames: list[bytes | memoryview], limits: Limits = Limits()) -> list[bytes]:
    """What a receiver makes of ``frames`` as they travel."""
    views = [memoryview(f).cast("B") for f in frames]
    if not is_split(views[0]):
        return [bytes(v) for v in views]
    return [bytes(join_group(g)) for g in split_groups(views[0], views[1:], limits)]


@pytest.mark.parametrize("sizes", [
    [10, 0, 300],  # nothing large: sent as it is
    [10, SPLIT_BYTES],  # exactly the limit: not split
    [10, SPLIT_BYTES + 1, 0, 5],
    [10, 3 * SPLIT_BYTES, SPLIT_BYTES * 2 + 7, 1],  # exact multiples and not
])
def test_split_frames_round_trip(sizes: list[int]) -> None:
    rng = np.random.default_rng(len(sizes))
    frames: list[bytes | memoryview] = [rng.bytes(n) for n in sizes]
    sent = split_frames(frames, "r1")
    assert all(len(f) <= SPLIT_BYTES for f in sent[1:])
    assert is_split(sent[0]) == (max(sizes) > SPLIT_BYTES)
    assert unsplit(sent) == frames
    if is_split(sent[0]):  # an old peer refuses the envelope, naming the request
        with pytest.raises(WireError, match="unknown frame type"):
            decode_header(sent[0])
        assert request_id_of(sent[0]) == "r1"
    else:
        assert sent == frames


def test_split_sub_frames_are_views_not_copies() -> None:
    payload = np.arange(SPLIT_BYTES, dtype=np.uint8).repeat(2)  # 2 sub-frames
    sent = split_frames([b"h", payload.data.cast("B")])
    assert len(sent) == 4
    assert all(isinstance(f, memoryview) and f.obj is payload for f in sent[2:])


@pytest.mark.parametrize(("envelope", "n_sub", "reason"), [
    ({"v": 1, "type": "split", "parts": [1, 2]}, 4, "truncated"),
    ({"v": 1, "type": "split", "parts": [1, 2]}, 2, "truncated"),
    ({"v": 1, "type": "split", "parts": [1, 0, 2]}, 3, "malformed"),
    ({"v": 1, "type": "split", "parts": [1, True]}, 2, "malformed"),
    ({"v": 1, "type": "split", "parts": []}, 0, "malformed"),
    ({"v": 1, "type": "split", "parts": "11"}, 2, "malformed"),
    ({"v": 1, "type": "split", "pad": 1}, 2, "malformed"),
])
def test_a_lying_split_envelope_is_refused(envelope: dict[str, Any], n_sub: int,
                                           reason: str) -> None:
    packed = msgpack.packb(envelope)
    assert is_split(packed)
    with pytest.raises(WireError) as info:
        split_groups(packed, [memoryview(b"x")] * n_sub, Limits())
    assert info.value.reason == reason


def test_a_split_frame_beyond_the_size_limit_is_refused() -> None:
    limits = Limits(max_total_bytes=1000, max_header_bytes=100)
    packed = msgpack.packb({"v": 1, "type": "split", "parts": [1, 3]})
    with pytest.raises(WireError) as info:
        split_groups(packed, [memoryview(b"h")] + [memoryview(bytes(400))] * 3, limits)
    assert info.value.reason == "too_large"


class Keeper:
    """Verifies models and keeps what the handler was given."""

    def __init__(self) -> None:
        self.payloads: list[list[memoryview]] = []
        self.arrays: list[list[NamedArray]] = []

    async def __call__(self, header: dict[str, Any], payloads: list[memoryview],
                       origin: str | None) -> Frames:
        self.payloads.append(payloads)
        msg = decode_model(header, payloads, {SENDER.peer_id: SENDER.public_key}.get)
        self.arrays.append(msg.arrays)
        return [encode_control(FrameType.ACK, request_id=msg.request_id, digest=msg.digest)]


async def test_a_large_model_travels_split_and_arrives_checked_and_prehashed() -> None:
    rng = np.random.default_rng(3)
    arrays = [NamedArray("big", rng.standard_normal(700_000, dtype=np.float32)),  # 2.8 MB
              NamedArray("small", np.arange(5, dtype=np.int64)),
              NamedArray("edge", rng.standard_normal(SPLIT_BYTES // 4, dtype=np.float32))]
    msg = ModelMessage(job="j", sender=SENDER.peer_id, epoch=1, samples=1, arrays=arrays,
                       request_id="big")
    frames = encode_model(msg, SENDER)
    keeper = Keeper()
    async with transport(keeper) as b, transport(listen=None) as a:
        header, _ = await a.request(b.identity.peer_id, frames, "big", timeout=10)
        assert header["type"] == FrameType.ACK.value and header["digest"] == msg.digest
    (payloads,), (got,) = keeper.payloads, keeper.arrays
    assert isinstance(payloads, PrehashedPayloads) and payloads.hash_name == DEFAULT_HASH
    assert payloads.hashes_of(0, payloads[0], DEFAULT_HASH) is not None  # joined: hashed
    assert payloads.hashes_of(1, payloads[1], DEFAULT_HASH) is None  # small: as it came
    for g, w in zip(got, arrays, strict=True):
        assert g.name == w.name and np.array_equal(g.array, w.array)
    assert not got[0].array.flags.writeable  # a joined payload is our read-only copy


async def test_a_tampered_split_model_is_refused_as_bad_digest() -> None:
    rng = np.random.default_rng(4)
    msg = ModelMessage(job="j", sender=SENDER.peer_id, epoch=1, samples=1, request_id="t",
                       arrays=[NamedArray("big", rng.standard_normal(400_000,
                                                                     dtype=np.float32))])
    frames = encode_model(msg, SENDER)
    flipped = bytearray(frames[1])
    flipped[SPLIT_BYTES + 3] ^= 1  # in the second sub-frame
    keeper = Keeper()
    async with transport(keeper) as b, transport(listen=None) as a:
        header, _ = await a.request(b.identity.peer_id, [frames[0], bytes(flipped)], "t",
                                    timeout=10)
        assert header["type"] == FrameType.NACK.value and header["reason"] == "bad_digest"
        assert b.stats.rejected == {"bad_digest": 1}


async def test_a_split_reply_comes_back_joined() -> None:
    blob = secrets.token_bytes(3 * SPLIT_BYTES + 11)

    async def echo(header: dict[str, Any], payloads: list[memoryview],
                   origin: str | None) -> Frames:
        return [encode_control(FrameType.PONG, request_id=header["request_id"]), *payloads]

    async with transport(echo) as b, transport(listen=None) as a:
        header, payloads = await a.request(
            b.identity.peer_id, [encode_control(FrameType.PING, request_id="e"), blob, b"x"],
            "e", timeout=10)
    assert header["type"] == FrameType.PONG.value
    assert [bytes(p) for p in payloads] == [blob, b"x"]


async def test_a_split_message_with_a_lying_envelope_is_nacked() -> None:
    keeper = Keeper()
    async with transport(keeper) as b, raw_context() as ctx:
        assert b.address is not None
        dealer = curve_dealer(ctx, b.identity)
        dealer.connect(b.address)
        envelope = msgpack.packb({"v": 1, "type": "split", "parts": [1, 5], "request_id": "l"})
        await dealer.send_multipart([envelope, encode_control(FrameType.PING), b"a", b"b"])
        reply = decode_header(await asyncio.wait_for(dealer.recv(), 5.0))
        assert reply["type"] == FrameType.NACK.value and reply["request_id"] == "l"
        assert reply["reason"] == "truncated" and keeper.payloads == []
        nested = msgpack.packb({"v": 1, "type": "split", "parts": [1, 1], "request_id": "n"})
        await dealer.send_multipart([nested, nested, b"x"])
        reply = decode_header(await asyncio.wait_for(dealer.recv(), 5.0))
        assert reply["reason"] == "malformed" and reply["request_id"] == "n"
        assert b.stats.rejected == {"truncated": 1, "malformed": 1}


# ---- dial-back, close -----------------------------------------------------------------------


async def test_dial_back_against_a_real_transport() -> None:
    identity = Identity.generate()
    async with transport(Recorder(), identity=identity) as b, raw_context() as ctx:
        assert b.address is not None
        assert await dial_back(b.address, identity.public_key, timeout=3.0, context=ctx)
        other = Identity.generate().public_key
        assert not await dial_back(b.address, other, timeout=3.0, context=ctx)
        assert not b.stats.rejected


async def test_close_cancels_serving_and_a_sender_only_transport_closes_too() -> None:
    t = ZmqTransport(Identity.generate(), LOOPBACK, Recorder(), directory=DIRECTORY)
    await t.start()
    task, zap = t._serve_task, t._zap_task
    assert task is not None and not task.done()
    assert zap is not None and not zap.done()
    await t.close()
    assert task.cancelled() and zap.cancelled()
    await t.close()
    assert t.address is not None

    sender_only = ZmqTransport(Identity.generate(), None, Recorder(), directory=DIRECTORY)
    await sender_only.start()
    assert sender_only.address is None
    await sender_only.close()
    await sender_only.close()


async def test_a_peer_the_directory_cannot_reach_fails_at_once() -> None:
    stranger = Identity.generate()
    DIRECTORY.add(stranger.peer_id, stranger.public_key)  # a member without an address
    async with transport(listen=None) as a:
        started = time.monotonic()
        with pytest.raises(TransportError, match="no verified ZeroMQ address"):
            await a.request(stranger.peer_id, [encode_control(FrameType.PING)], "x", timeout=5)
        assert time.monotonic() - started < 1
        assert a.link_kind(stranger.peer_id) is None
