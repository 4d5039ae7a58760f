"""Dial-back over real ZeroMQ sockets on loopback: a minimal ROUTER responder plays the peer.

The probe travels over CURVE with the server key derived from the joining peer's identity, so
the responder must hold that identity's CURVE secret to be heard at all."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from overlay.dialback import answer_probe, check_probe_reply, dial_back
from overlay.identity import DOMAIN_DIALBACK, Identity
from testkit.fixtures import reserved_port

Answer = Callable[[dict[str, Any]], bytes | None]


@contextlib.asynccontextmanager
async def probe_responder(answer: Answer, curve: Identity | None) -> AsyncIterator[str]:
    """A ROUTER on a random loopback port that answers each probe with ``answer(header)``;
    a CURVE server with ``curve``'s key (None: plain, no encryption)."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve.curve_secret_key)
    port = sock.bind_to_random_port("tcp://127.0.0.1")

    async def serve() -> None:
        while True:
            ident, frame = await sock.recv_multipart()
            reply = answer(msgpack.unpackb(frame, raw=False))
            if reply is not None:
                await sock.send_multipart([ident, reply])

    task = asyncio.create_task(serve())
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close(linger=0)
        ctx.term()


async def test_reachable_when_the_right_key_answers() -> None:
    peer = Identity.generate()
    async with probe_responder(lambda h: answer_probe(peer, h), peer) as addr:
        assert await dial_back(addr, peer.public_key, timeout=2.0)


async def test_another_key_is_refused() -> None:
    """An impostor with its own CURVE key: the handshake never completes."""
    peer, impostor = Identity.generate(), Identity.generate()
    answered = []

    def answer(header: dict[str, Any]) -> bytes | None:
        answered.append(header)
        return answer_probe(impostor, header)

    async with probe_responder(answer, impostor) as addr:
        assert not await dial_back(addr, peer.public_key, timeout=1.0)
    assert answered == []  # it never even saw the probe


async def test_plain_listener_is_refused() -> None:
    """A listener without CURVE: no handshake, even if it could sign (it cannot here)."""
    peer = Identity.generate()
    async with probe_responder(lambda h: answer_probe(peer, h), None) as addr:
        assert not await dial_back(addr, peer.public_key, timeout=1.0)


async def test_another_signature_behind_the_right_curve_key_is_refused() -> None:
    """Defence in depth: the signed answer is still checked after the handshake."""
    peer, impostor = Identity.generate(), Identity.generate()
    async with probe_responder(lambda h: answer_probe(impostor, h), peer) as addr:
        assert not await dial_back(addr, peer.public_key, timeout=2.0)


async def test_unusable_key_is_refused_without_dialing() -> None:
    assert not await dial_back("tcp://127.0.0.1:1", bytes(31), timeout=1.0)
    assert not await dial_back("tcp://127.0.0.1:1", b"\xff" * 32, timeout=1.0)  # y >= p


async def test_replayed_signature_is_refused() -> None:
    peer = Identity.generate()

    def stale(header: dict[str, Any]) -> bytes | None:
        return answer_probe(peer, {**header, "nonce": bytes(32)})

    async with probe_responder(stale, peer) as addr:
        assert not await dial_back(addr, peer.public_key, timeout=2.0)


@pytest.mark.parametrize(
    "reply",
    [b"\xc1garbage", msgpack.packb([1, 2]), msgpack.packb({"v": 1, "type": "probe"}), b"x" * 8000],
)
async def test_garbage_reply_is_refused(reply: bytes) -> None:
    peer = Identity.generate()
    async with probe_responder(lambda h: reply, peer) as addr:
        assert not await dial_back(addr, peer.public_key, timeout=1.0)


async def test_nobody_listening_times_out() -> None:
    peer = Identity.generate()
    with reserved_port() as port:
        started = time.monotonic()
        assert not await dial_back(f"tcp://127.0.0.1:{port}", peer.public_key, timeout=0.5)
        assert time.monotonic() - started < 2.0


async def test_silent_responder_times_out() -> None:
    peer = Identity.generate()
    async with probe_responder(lambda h: None, peer) as addr:
        started = time.monotonic()
        assert not await dial_back(addr, peer.public_key, timeout=0.5)
        assert 0.4 < time.monotonic() - started < 2.0


def test_answer_probe_signs_nonce_and_address() -> None:
    peer = Identity.generate()
    nonce = bytes(range(32))
    frame = answer_probe(peer, {"v": 1, "type": "probe", "nonce": nonce, "addr": "tcp://a:1"})
    assert frame is not None
    reply = msgpack.unpackb(frame, raw=False)
    assert reply["peer_id"] == peer.peer_id and reply["public_key"] == peer.public_key
    assert check_probe_reply([frame], nonce, "tcp://a:1", peer.public_key) is None
    assert check_probe_reply([frame], nonce, "tcp://b:1", peer.public_key) == "bad signature"
    assert reply["signature"] == peer.sign(DOMAIN_DIALBACK + nonce + b"tcp://a:1")


@pytest.mark.parametrize(
    "header",
    [
        {"v": 1, "type": "probe", "nonce": b"short", "addr": "tcp://a:1"},
        {"v": 1, "type": "probe", "nonce": "x" * 32, "addr": "tcp://a:1"},
        {"v": 1, "type": "probe", "nonce": bytes(32), "addr": "x" * 300},
        {"v": 1, "type": "probe", "nonce": bytes(32), "addr": 5},
        {"v": 2, "type": "probe", "nonce": bytes(32), "addr": "tcp://a:1"},
        {"v": 1, "type": "other", "nonce": bytes(32), "addr": "tcp://a:1"},
        {},
    ],
)
def test_answer_probe_rejects_bad_headers(header: dict[str, Any]) -> None:
    assert answer_probe(Identity.generate(), header) is None
