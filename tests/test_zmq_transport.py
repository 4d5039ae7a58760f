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

import numpy as np
import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from overlay.dialback import dial_back
from overlay.errors import TransportError
from overlay.identity import Identity
from overlay.transport.base import Frames, Handler, StaticDirectory
from overlay.transport.zeromq import ZmqTransport
from overlay.wire import (
    FrameType,
    Limits,
    ModelMessage,
    NamedArray,
    decode_model,
    encode_control,
    encode_model,
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
