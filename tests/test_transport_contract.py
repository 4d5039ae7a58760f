"""The transport contract (overlay.transport.base), the same cases against every transport.

Each case runs against two real ZeroMQ transports (CURVE over loopback, a StaticDirectory)
and against two real WebRTC transports (aiortc over loopback, no ICE servers at all, signals
relayed through an in-test queue as JSON, like the rendezvous would).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest

from overlay.errors import TransportError
from overlay.identity import Identity
from overlay.protocol import SignalKind
from overlay.transport.base import (
    Frames,
    LinkKind,
    StaticDirectory,
    Transport,
)
from overlay.transport.webrtc import WebRtcTransport
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

pytestmark = pytest.mark.timeout(60)

KINDS = ["zmq", "webrtc"]


class Server:
    """A handler: acks every request (verifying models) or, with ``echo``, answers a
    ``pong`` carrying the request's payloads; waits for ``release`` first if there is one."""

    def __init__(self) -> None:
        self.known: dict[str, bytes] = {}
        self.calls = 0
        self.origins: list[str | None] = []
        self.entered = asyncio.Event()
        self.release: asyncio.Event | None = None
        self.echo = False

    async def __call__(self, header: dict[str, Any], payloads: list[memoryview],
                       origin: str | None) -> Frames:
        self.calls += 1
        self.origins.append(origin)
        self.entered.set()
        if self.release is not None:
            await self.release.wait()
        if self.echo:
            return [encode_control(FrameType.PONG, request_id=header["request_id"]), *payloads]
        digest = b""
        if header["type"] == FrameType.MODEL.value:
            digest = decode_model(header, payloads, self.known.get).digest  # WireError: nack
        return [encode_control(FrameType.ACK, request_id=header.get("request_id"),
                               digest=digest, nbytes=sum(len(p) for p in payloads))]


@dataclass
class Pair:
    kind: str
    a: Transport
    b: Transport
    id_a: Identity
    id_b: Identity
    server_a: Server
    server_b: Server

    @property
    def b_id(self) -> str:
        return self.id_b.peer_id


PairFactory = Callable[..., contextlib.AbstractAsyncContextManager[Pair]]


@contextlib.asynccontextmanager
async def zmq_pair(limits_b: Limits = Limits()) -> AsyncIterator[Pair]:
    ids = [Identity.generate(), Identity.generate()]
    servers = [Server(), Server()]
    directory = StaticDirectory()
    a = ZmqTransport(ids[0], "tcp://127.0.0.1:0", servers[0], directory=directory)
    b = ZmqTransport(ids[1], "tcp://127.0.0.1:0", servers[1], limits_b, directory=directory)
    async with a, b:
        for ident, t in ((ids[0], a), (ids[1], b)):
            directory.add(ident.peer_id, ident.public_key, t.address)
        yield Pair("zmq", a, b, ids[0], ids[1], *servers)


@contextlib.asynccontextmanager
async def webrtc_pair(limits_b: Limits = Limits()) -> AsyncIterator[Pair]:
    ids = [Identity.generate(), Identity.generate()]
    servers = [Server(), Server()]
    queues = {i.peer_id: asyncio.Queue[tuple[str, str, dict[str, Any]]]() for i in ids}

    def relay(me: str) -> Any:
        async def send_signal(peer: str, kind: SignalKind, data: dict[str, Any]) -> None:
            if peer in queues:  # the rendezvous drops signals to non-members
                await queues[peer].put((me, str(kind), json.loads(json.dumps(data))))
        return send_signal

    a, b = (WebRtcTransport(i, [], s, lim, send_signal=relay(i.peer_id), connect_timeout=5.0)
            for i, s, lim in zip(ids, servers, [Limits(), limits_b], strict=True))

    async def pump(t: WebRtcTransport) -> None:
        while True:
            frm, kind, data = await queues[t.peer_id].get()
            await t.on_signal(frm, SignalKind(kind), data)

    pumps = [asyncio.create_task(pump(t)) for t in (a, b)]
    try:
        async with a, b:
            yield Pair("webrtc", a, b, ids[0], ids[1], *servers)
    finally:
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


@pytest.fixture(params=KINDS)
def make_pair(request: pytest.FixtureRequest) -> PairFactory:
    factory: PairFactory = zmq_pair if request.param == "zmq" else webrtc_pair
    return factory


def model_frames(sender: Identity, n_floats: int, request_id: str) -> tuple[Frames, bytes]:
    rng = np.random.default_rng(len(request_id))
    msg = ModelMessage(job="j", sender=sender.peer_id, epoch=1, samples=10,
                       request_id=request_id,
                       arrays=[NamedArray("w", rng.standard_normal(n_floats, dtype=np.float32))])
    return encode_model(msg, sender), msg.digest


def ping(request_id: str, *payloads: bytes) -> list[bytes]:
    return [encode_control(FrameType.PING, request_id=request_id), *payloads]


def knows_all(pair: Pair) -> None:
    for server in (pair.server_a, pair.server_b):
        server.known.update({i.peer_id: i.public_key for i in (pair.id_a, pair.id_b)})


async def still_works(pair: Pair) -> None:
    header, _ = await pair.a.request(pair.b_id, ping("after"), "after", timeout=10)
    assert header["type"] == FrameType.ACK.value and header["request_id"] == "after"


# ---- round trip --------------------------------------------------------------------------


async def test_round_trip_tells_the_handler_who_sent_it(make_pair: PairFactory) -> None:
    async with make_pair() as pair:
        knows_all(pair)
        frames, digest = model_frames(pair.id_a, 250_000, "r1")
        header, payloads = await pair.a.request(pair.b_id, frames, "r1", timeout=20)
        assert header["type"] == FrameType.ACK.value and header["request_id"] == "r1"
        assert header["digest"] == digest
        assert header["nbytes"] == sum(len(f) for f in frames[1:]) and payloads == []
        assert pair.server_b.origins == [pair.id_a.peer_id]
        assert pair.a.stats.messages_out == 1 and pair.b.stats.messages_in == 1
        assert pair.b.stats.bytes_in >= sum(len(f) for f in frames)
        assert not pair.a.stats.rejected and not pair.b.stats.rejected
        kind = pair.a.link_kind(pair.b_id)
        assert kind is (LinkKind.ZMQ if pair.kind == "zmq" else LinkKind.WEBRTC_DIRECT)
        assert pair.a.name == pair.kind


async def test_reply_payloads_come_back(make_pair: PairFactory) -> None:
    async with make_pair() as pair:
        pair.server_b.echo = True
        blob = secrets.token_bytes(200_000)
        header, payloads = await pair.a.request(pair.b_id, ping("e", blob, b"x"), "e",
                                                timeout=20)
        assert header["type"] == FrameType.PONG.value
        assert [bytes(p) for p in payloads] == [blob, b"x"]


# ---- refusals ----------------------------------------------------------------------------


def header_frame(**fields: Any) -> bytes:
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


REFUSALS = {
    # name: (frames for request id "q", reason counted, whether a nack comes back)
    "bad_version": ([header_frame(v=99, type="ping", request_id="q")], "bad_version", True),
    "unknown_type": ([header_frame(v=1, type="bogus", request_id="q")], "malformed", True),
    "not_msgpack": ([b"\xc1not msgpack"], "malformed", False),
    "header_too_large": ([encode_control(FrameType.PING, request_id="q", pad=b"x" * 5000)],
                         "header_too_large", False),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_a_refused_header_is_counted_and_nacked_when_it_names_its_request(
        make_pair: PairFactory, case: str) -> None:
    frames, reason, nacked = REFUSALS[case]
    async with make_pair(limits_b=Limits(max_header_bytes=4096)) as pair:
        await still_works(pair)  # the link is up: the timeout below is the reply's only
        started = time.monotonic()
        if nacked:
            header, _ = await pair.a.request(pair.b_id, frames, "q", timeout=10)
            assert header["type"] == FrameType.NACK.value and header["request_id"] == "q"
            assert header["reason"] == reason
            assert time.monotonic() - started < 5  # matched by request id, not a timeout
        else:  # nothing to answer to: the requester learns it from its timeout
            with pytest.raises(TransportError, match="no reply within 1.0 s"):
                await pair.a.request(pair.b_id, frames, "q", timeout=1.0)
        assert pair.b.stats.rejected == {reason: 1}
        assert pair.server_b.calls == 1  # still_works only
        await still_works(pair)


async def test_a_handler_refusal_becomes_a_nack_with_its_reason(make_pair: PairFactory) -> None:
    async with make_pair() as pair:  # server_b knows nobody: decode_model refuses the sender
        frames, _ = model_frames(pair.id_a, 1000, "u")
        header, _ = await pair.a.request(pair.b_id, frames, "u", timeout=10)
        assert header["type"] == FrameType.NACK.value and header["request_id"] == "u"
        assert header["reason"] == "unknown_sender"
        assert pair.b.stats.rejected == {"unknown_sender": 1}


# ---- limits ------------------------------------------------------------------------------


async def test_too_many_parts_is_refused_before_the_handler(make_pair: PairFactory) -> None:
    limits = Limits(max_arrays=4)
    async with make_pair(limits_b=limits) as pair:
        await still_works(pair)
        with pytest.raises(TransportError):
            await pair.a.request(pair.b_id, ping("p", *[b"x"] * 8), "p", timeout=2.0)
        assert pair.b.stats.rejected == {"too_many_parts": 1}
        assert pair.server_b.calls == 1
        await still_works(pair)


async def test_a_message_over_the_size_limit_never_reaches_the_handler(
        make_pair: PairFactory) -> None:
    limits = Limits(max_total_bytes=100_000, max_header_bytes=4096)
    async with make_pair(limits_b=limits) as pair:
        await still_works(pair)
        started = time.monotonic()
        with pytest.raises(TransportError):
            await pair.a.request(pair.b_id, ping("big", bytes(300_000)), "big", timeout=2.0)
        assert pair.server_b.calls == 1 and pair.b.stats.messages_in == 1
        if pair.kind == "webrtc":  # refused from its first chunk: the request fails at once
            assert pair.b.stats.rejected == {"too_large": 1}
            assert time.monotonic() - started < 1.5
        # (libzmq drops the connection of an oversized frame itself: nothing to count)
        await still_works(pair)


# ---- time and failure --------------------------------------------------------------------


async def test_a_handler_that_never_answers_times_out(make_pair: PairFactory) -> None:
    async with make_pair() as pair:
        await still_works(pair)
        pair.server_b.release = asyncio.Event()  # never set
        started = time.monotonic()
        with pytest.raises(TransportError, match="no reply within 1.0 s"):
            await pair.a.request(pair.b_id, ping("t"), "t", timeout=1.0)
        assert 0.9 < time.monotonic() - started < 2.5


async def test_an_unknown_peer_fails(make_pair: PairFactory) -> None:
    async with make_pair() as pair:
        started = time.monotonic()
        with pytest.raises(TransportError):
            await pair.a.request(Identity.generate().peer_id, ping("n"), "n", timeout=2.0)
        assert time.monotonic() - started < 3


async def test_a_peer_vanishing_mid_request_fails_it_and_is_counted(
        make_pair: PairFactory) -> None:
    async with make_pair() as pair:
        pair.server_b.release = asyncio.Event()  # the handler holds the request
        request = asyncio.create_task(
            pair.a.request(pair.b_id, ping("v", bytes(4_000_000)), "v", timeout=4.0))
        await asyncio.wait_for(pair.server_b.entered.wait(), 10)
        started = time.monotonic()
        await pair.b.close()
        with pytest.raises(TransportError):
            await request
        assert time.monotonic() - started < 4.0 + 1.0  # by the request's timeout at most
        assert pair.b.stats.rejected == {"incomplete": 1}


async def test_a_peer_vanishing_mid_transfer_fails_the_request(make_pair: PairFactory) -> None:
    async with make_pair() as pair:
        await still_works(pair)
        # Held, should the 30 MB arrive whole before the close (ZeroMQ on loopback can move
        # it within the 50 ms): the close then ends the request while it is being handled.
        pair.server_b.release = asyncio.Event()
        request = asyncio.create_task(
            pair.a.request(pair.b_id, ping("m", bytes(30_000_000)), "m", timeout=5.0))
        await asyncio.sleep(0.05)
        await pair.b.close()
        started = time.monotonic()
        with pytest.raises(TransportError):
            await request
        assert time.monotonic() - started < 5.0 + 1.0
        assert pair.b.stats.rejected.get("incomplete", 0) <= 1
        assert pair.server_b.calls <= 2  # whatever arrived whole was the only thing handled


# ---- concurrency, forgetting, closing ----------------------------------------------------


async def test_concurrent_requests_both_ways(make_pair: PairFactory) -> None:
    async with make_pair() as pair:
        knows_all(pair)

        async def one(src: Transport, me: Identity, dst: str, i: int) -> None:
            rid = f"{me.peer_id[:6]}-{i}"
            frames, digest = model_frames(me, 50_000 + 1000 * i, rid)
            header, _ = await src.request(dst, frames, rid, timeout=30)
            assert header["request_id"] == rid and header["digest"] == digest

        await asyncio.gather(*(one(pair.a, pair.id_a, pair.b_id, i) for i in range(4)),
                             *(one(pair.b, pair.id_b, pair.id_a.peer_id, i) for i in range(4)))
        assert pair.server_a.calls == pair.server_b.calls == 4
        assert not pair.a.stats.rejected and not pair.b.stats.rejected


async def test_forget_drops_the_link_and_a_new_request_makes_one(
        make_pair: PairFactory) -> None:
    async with make_pair() as pair:
        await still_works(pair)
        assert pair.a.link_kind(pair.b_id) is not None
        await pair.a.forget(pair.b_id)
        await pair.a.forget(pair.b_id)
        assert pair.a.link_kind(pair.b_id) is None
        await still_works(pair)


async def test_close_twice_and_no_request_after(make_pair: PairFactory) -> None:
    async with make_pair() as pair:
        await still_works(pair)
        await pair.a.close()
        await pair.a.close()
        with pytest.raises(TransportError, match="closed"):
            await pair.a.request(pair.b_id, ping("z"), "z", timeout=2)
        # __aexit__ closes both once more: safe
