"""Encrypted ZeroMQ: CURVE keys derived from peer identities, who authenticates whom, what a
stranger can do, and that the bytes on the wire are not the plaintext.

All on loopback with real sockets: ZmqTransports, bare pyzmq sockets, a recording TCP relay,
and real Hosts behind an in-process rendezvous.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from zmq.utils import z85

from overlay.errors import TransportError
from overlay.host import Host
from overlay.identity import Identity, curve_public_key_from_ed25519
from overlay.models import OutgoingModel
from overlay.transport.base import Frames, LinkKind
from overlay.transport.zeromq import ZmqTransport
from overlay.wire import FrameType, ModelMessage, NamedArray, encode_control, encode_model
from rendezvous.server import run_rendezvous
from testkit.fixtures import running_host, until

pytestmark = pytest.mark.timeout(60)

LOOPBACK = "tcp://127.0.0.1:0"
P = 2**255 - 19
JOB = "curvetest"
CANARY = b"peerlearn-canary:" + bytes(range(0x41, 0x41 + 47))  # 64 recognizable bytes
assert len(CANARY) == 64


# ---- key derivation -------------------------------------------------------------------------


def test_curve_keys_derived_both_ways_agree_and_pyzmq_accepts_them() -> None:
    for _ in range(100):
        ident = Identity.generate()
        # from the public key alone (what every member can do) == X25519(derived secret),
        # computed independently by the cryptography library and by libzmq
        curve = curve_public_key_from_ed25519(ident.public_key)
        assert curve == ident.curve_public_key
        assert X25519PrivateKey.from_private_bytes(ident.curve_secret_key).public_key(
        ).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == curve
        assert zmq.curve_public(z85.encode(ident.curve_secret_key)) == z85.encode(curve)
        secret = ident.curve_secret_key
        assert secret[0] & 7 == 0 and secret[31] & 0x80 == 0 and secret[31] & 0x40  # clamped
    a, b = Identity.generate(), Identity.generate()
    assert a.curve_public_key != b.curve_public_key


def _edwards_key(y: int, sign: int = 0) -> bytes:
    return (y | sign << 255).to_bytes(32, "little")


@pytest.mark.parametrize(("key", "match"), [
    (bytes(31), "32 bytes"),
    (_edwards_key(P), "not canonical"),  # y = p encodes 0 non-canonically
    (_edwards_key(P + 1), "not canonical"),
    (_edwards_key(1), "small order"),  # the neutral element
    (_edwards_key(P - 1), "small order"),  # order 2 (u = 0)
    (_edwards_key(0), "small order"),  # order 4 (u = 1)
    (_edwards_key(0, 1), "small order"),
    (_edwards_key(2), "off the curve"),  # no x for y = 2
])
def test_unusable_ed25519_keys_are_refused(key: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        curve_public_key_from_ed25519(key)


def test_points_off_the_curve_are_refused_and_the_others_map_onto_curve25519() -> None:
    refused = mapped = 0
    for y in range(2, 400):  # libsodium also refuses points outside the prime-order subgroup
        try:
            u = int.from_bytes(curve_public_key_from_ed25519(_edwards_key(y)), "little")
        except ValueError as exc:
            assert "not a point" in str(exc)
            refused += 1
            continue
        mapped += 1
        # an Edwards point maps to a point of v^2 = u^3 + 486662 u^2 + u (not the twist)
        rhs = (u**3 + 486662 * u * u + u) % P
        assert pow(rhs, (P - 1) // 2, P) == 1
    assert refused and mapped


# ---- two transports -------------------------------------------------------------------------


class Echo:
    """Answers every request with a pong carrying back its payloads; records the origins."""

    def __init__(self) -> None:
        self.origins: list[str | None] = []
        self.payloads: list[bytes] = []

    async def __call__(self, header: dict[str, Any], payloads: list[memoryview],
                       origin: str | None) -> Frames:
        self.origins.append(origin)
        self.payloads.extend(bytes(p) for p in payloads)
        return [encode_control(FrameType.PONG, request_id=header.get("request_id")), *payloads]


class Table:
    """A directory (overlay.transport.base.Directory) the test fills in by hand."""

    def __init__(self, curve_keys: dict[bytes, str] | None = None) -> None:
        self.members: dict[str, tuple[bytes, str | None]] = {}
        self.curve_keys = dict(curve_keys or {})

    def add(self, peer_id: str, public_key: bytes, address: str | None) -> str:
        self.members[peer_id] = (public_key, address)
        return peer_id

    def address_of(self, peer_id: str) -> str | None:
        return self.members[peer_id][1] if peer_id in self.members else None

    def public_key_of(self, peer_id: str) -> bytes | None:
        return self.members[peer_id][0] if peer_id in self.members else None

    def peer_of_curve_key(self, curve_public_key: bytes) -> str | None:
        return self.curve_keys.get(curve_public_key)


@contextlib.asynccontextmanager
async def transport(handler: Echo | None = None, listen: str | None = LOOPBACK,
                    identity: Identity | None = None,
                    directory: Table | None = None) -> AsyncIterator[ZmqTransport]:
    t = ZmqTransport(identity or Identity.generate(), listen, handler or Echo(),
                     directory=directory or Table())
    await t.start()
    try:
        yield t
    finally:
        await t.close()


def ping(*payloads: bytes) -> tuple[list[bytes], str]:
    request_id = secrets.token_hex(8)
    return [encode_control(FrameType.PING, request_id=request_id), *payloads], request_id


def knows(sender: ZmqTransport, server: ZmqTransport, address: str | None = None,
          public_key: bytes | None = None) -> str:
    """Tell ``sender``'s directory where ``server`` is; returns the peer id to ask."""
    assert isinstance(sender.directory, Table)
    return sender.directory.add(server.identity.peer_id,
                                public_key or server.identity.public_key,
                                address or server.address)


async def test_request_over_curve_tells_the_handler_who_sent_it() -> None:
    client, stranger = Identity.generate(), Identity.generate()
    echo = Echo()
    known = Table({client.curve_public_key: "the-client"})
    async with transport(echo, directory=known) as server, \
            transport(listen=None, identity=client) as a, \
            transport(listen=None, identity=stranger) as s:
        assert server.address is not None
        for sender in (a, s):
            frames, request_id = ping(b"hello")
            header, payloads = await sender.request(knows(sender, server), frames, request_id,
                                                    timeout=5.0)
            assert header["type"] == FrameType.PONG.value and header["request_id"] == request_id
            assert [bytes(p) for p in payloads] == [b"hello"]
        assert echo.origins == ["the-client", None]


async def test_a_plain_client_gets_nothing_and_the_server_goes_on() -> None:
    echo = Echo()
    ctx = zmq.asyncio.Context()
    try:
        async with transport(echo) as server, transport(listen=None) as a:
            assert server.address is not None
            plain = ctx.socket(zmq.DEALER)
            plain.setsockopt(zmq.LINGER, 0)
            plain.connect(server.address)
            frames, _ = ping(b"plain")
            await plain.send_multipart(frames)  # queued: the handshake never completes
            assert await plain.poll(500) == 0
            assert echo.payloads == [] and server.stats.messages_in == 0

            frames, request_id = ping(b"curve")
            header, _ = await a.request(knows(a, server), frames, request_id, timeout=5.0)
            assert header["type"] == FrameType.PONG.value
            assert echo.payloads == [b"curve"]
    finally:
        ctx.destroy(linger=0)


async def test_a_listener_with_another_key_fails_the_handshake() -> None:
    """We expect peer X at this address; whoever listens there is not X: nothing is sent."""
    echo = Echo()
    expected = Identity.generate()
    async with transport(echo) as impostor, transport(listen=None) as a:
        assert impostor.address is not None and isinstance(a.directory, Table)
        x = a.directory.add(expected.peer_id, expected.public_key, impostor.address)
        frames, request_id = ping(b"for X only")
        started = time.monotonic()
        with pytest.raises(TransportError, match="handshake"):
            await a.request(x, frames, request_id, timeout=0.5)
        assert time.monotonic() - started < 0.5 + 1.0
        assert echo.payloads == [] and impostor.stats.messages_in == 0
        # the listener is unaffected: its own key gets through
        frames, request_id = ping(b"for the listener")
        header, _ = await a.request(knows(a, impostor), frames, request_id, timeout=5.0)
        assert header["type"] == FrameType.PONG.value
        assert echo.payloads == [b"for the listener"]


async def test_an_unusable_peer_key_is_a_transport_error() -> None:
    async with transport(listen=None) as a:
        assert isinstance(a.directory, Table)
        peer = a.directory.add("broken", bytes(32), "tcp://127.0.0.1:1")
        frames, request_id = ping()
        with pytest.raises(TransportError, match="unusable peer key"):
            await a.request(peer, frames, request_id, timeout=1.0)


# ---- the bytes on the wire ------------------------------------------------------------------


class Relay:
    """A TCP relay to ``upstream`` that records every byte in both directions."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.recorded = bytearray()
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                self.recorded += data
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def _connected(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for pump in (self._pump(reader, up_writer), self._pump(up_reader, writer)):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield f"tcp://127.0.0.1:{self.port}"
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


async def test_the_wire_carries_no_plaintext() -> None:
    echo = Echo()
    async with transport(echo) as server, transport(listen=None) as a:
        assert server.address is not None
        relay = Relay(_port(server.address))
        async with relay.running() as via:
            frames, request_id = ping(CANARY * 4)
            header, payloads = await a.request(knows(a, server, address=via), frames,
                                               request_id, timeout=5.0)
        assert header["type"] == FrameType.PONG.value
        assert [bytes(p) for p in payloads] == [CANARY * 4]  # it went there and back
        assert len(relay.recorded) > 2 * len(CANARY) * 4
        assert CANARY not in relay.recorded
        assert b"ping" not in relay.recorded and b"request_id" not in relay.recorded


async def test_the_relay_sees_plaintext_between_plain_sockets() -> None:
    """Control for the test above: the same relay does see what plain ZeroMQ sends."""
    ctx = zmq.asyncio.Context()
    try:
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        relay = Relay(port)
        async with relay.running() as via:
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(via)
            await dealer.send_multipart([b"head", CANARY * 4])
            _route, _head, body = await asyncio.wait_for(router.recv_multipart(), 5.0)
            assert body == CANARY * 4
        assert CANARY in relay.recorded
    finally:
        ctx.destroy(linger=0)


# ---- hosts: strangers and members -----------------------------------------------------------


def _model(h: Host[Any], epoch: int) -> OutgoingModel:
    arrays = [NamedArray("w", np.full((16, 16), float(epoch), dtype=np.float32))]
    return OutgoingModel(job=JOB, sender=h.peer_id, epoch=epoch, samples=10, arrays=arrays)


def _frames(h: Host[Any], epoch: int) -> tuple[Frames, str]:
    """A model signed by ``h`` as it travels (frames and request id), for a hand-made request."""
    request_id = secrets.token_hex(8)
    model = _model(h, epoch)
    msg = ModelMessage(job=model.job, sender=model.sender, epoch=epoch, samples=model.samples,
                       arrays=list(model.arrays), request_id=request_id)
    return encode_model(msg, h.identity), request_id


async def test_strangers_get_a_pong_only_and_models_must_come_from_their_signer() -> None:
    async with run_rendezvous() as server, running_host(server, job=JOB, listen=LOOPBACK) as a, \
            running_host(server, job=JOB, listen=None) as b, \
            running_host(server, job=JOB, listen=None) as c, \
            transport(listen=None) as stranger:
        await until(lambda: {b.peer_id, c.peer_id} <= set(a.members)
                    and a.peer_id in b.members and a.peer_id in c.members,
                    timeout=10.0, interval=0.05)
        assert a.transport.address is not None
        knows(stranger, a.transport)
        a.publish(await a.encode(_model(a, 3)))

        async def ask(t: ZmqTransport, frames: Frames, request_id: str) -> dict[str, Any]:
            header, _ = await t.request(a.peer_id, frames, request_id, timeout=5.0)
            return header

        # a stranger: ping answered ...
        frames, request_id = ping()
        assert (await ask(stranger, frames, request_id))["type"] == FrameType.PONG.value
        # ... get_model refused, even claiming to be a member in the header
        request_id = secrets.token_hex(8)
        get = encode_control(FrameType.GET_MODEL, request_id=request_id, job=JOB,
                             sender=b.peer_id)
        header = await ask(stranger, [get], request_id)
        assert header["type"] == FrameType.NACK.value and header["reason"] == "unknown_sender"
        # ... and a model, even one a member signed, refused
        frames, request_id = _frames(c, 1)
        header = await ask(stranger, frames, request_id)
        assert header["type"] == FrameType.NACK.value and header["reason"] == "unknown_sender"

        # member b relays c's signed model: refused, it is not from its signer
        header = await ask(b.transport, frames, request_id)
        assert header["type"] == FrameType.NACK.value
        assert header["reason"] == "sender_mismatch"
        assert a.inbox.empty()
        assert a.transport.stats.rejected == {"unknown_sender": 2, "sender_mismatch": 1}

        # the same model from c itself is accepted; a member may fetch
        await c.send_model(a.peer_id, await c.encode(_model(c, 1)))
        got = await asyncio.wait_for(a.inbox.get(), 10)
        assert got.sender == c.peer_id and got.epoch == 1
        fetched = await b.fetch_model(a.peer_id)
        assert fetched.sender == a.peer_id and fetched.epoch == 3
        assert b.links[a.peer_id].kind is LinkKind.ZMQ
