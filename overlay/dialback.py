"""Dial-back: prove that a peer's ZeroMQ address reaches that peer (AutoNAT-style).

The prover (the rendezvous) connects a DEALER to the offered address and sends one frame

    probe        {v: 1, type: "probe", nonce: 32 random bytes, addr}

and the peer's ROUTER answers with one frame

    probe_reply  {v: 1, type: "probe_reply", peer_id, public_key, signature}
                 signature = sign(DOMAIN_DIALBACK + nonce + addr)

The address counts as reachable only if the answer is signed by the key that offered it.

The probe travels over CURVE: the prover is a client with a throw-away key pair, and its
server key is the CURVE key derived from the Ed25519 key the peer joined with (see
overlay.identity), so a listener that is not that peer cannot even complete the handshake.
The signed answer stays as a second, independent check.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from overlay.identity import (
    DOMAIN_DIALBACK,
    Identity,
    curve_public_key_from_ed25519,
    verify_signature,
)

log = logging.getLogger(__name__)

PROBE_VERSION = 1
NONCE_SIZE = 32
MAX_ADDR_LEN = 256
MAX_REPLY_BYTES = 4096

_context: zmq.asyncio.Context | None = None


def _shared_context() -> zmq.asyncio.Context:
    global _context
    if _context is None or _context.closed:
        _context = zmq.asyncio.Context()
    return _context


def _probe_message(nonce: bytes, address: str) -> dict[str, Any]:
    return {"v": PROBE_VERSION, "type": "probe", "nonce": nonce, "addr": address}


async def dial_back(
    address: str,
    public_key: bytes,
    timeout: float,
    *,
    context: zmq.asyncio.Context | None = None,
) -> bool:
    """True if ``address`` answered a fresh probe with a valid signature by ``public_key``.

    Never raises for network trouble, garbage or an unusable key: those are logged and give
    False. ``timeout`` bounds the whole probe (connect, CURVE handshake, send, answer).
    """
    try:
        server_key = curve_public_key_from_ed25519(public_key)
    except ValueError as exc:
        log.info("dial-back %s: %s", address, exc)
        return False
    nonce = os.urandom(NONCE_SIZE)
    client_public, client_secret = zmq.curve_keypair()  # ephemeral: we have no identity
    sock = (context or _shared_context()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
    sock.setsockopt(zmq.CURVE_SECRETKEY, client_secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, client_public)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
    try:
        sock.connect(address)
        async with asyncio.timeout(timeout):
            await sock.send(msgpack.packb(_probe_message(nonce, address), use_bin_type=True))
            frames = await sock.recv_multipart()
    except TimeoutError:
        log.info("dial-back %s: no answer within %.1fs (no CURVE handshake with the joining "
                 "key, or no reply)", address, timeout)
        return False
    except zmq.ZMQError as exc:
        log.info("dial-back %s: %s", address, exc)
        return False
    finally:
        sock.close(linger=0)
    reason = check_probe_reply(frames, nonce, address, public_key)
    if reason is not None:
        log.info("dial-back %s: rejected (%s)", address, reason)
        return False
    log.debug("dial-back %s: verified", address)
    return True


def check_probe_reply(
    frames: list[bytes], nonce: bytes, address: str, public_key: bytes
) -> str | None:
    """None if ``frames`` is a valid answer to our probe, else the reason it is not."""
    if len(frames) != 1:
        return f"{len(frames)} frames, want 1"
    if len(frames[0]) > MAX_REPLY_BYTES:
        return f"reply of {len(frames[0])} bytes"
    try:
        reply = msgpack.unpackb(frames[0], raw=False)
    except Exception as exc:  # msgpack raises many types; all mean "garbage"
        return f"not msgpack ({type(exc).__name__})"
    if not isinstance(reply, dict):
        return "not a map"
    if reply.get("v") != PROBE_VERSION or reply.get("type") != "probe_reply":
        return "not a probe_reply v1"
    key, signature = reply.get("public_key"), reply.get("signature")
    if not isinstance(key, bytes) or not isinstance(signature, bytes):
        return "public_key/signature missing"
    if key != public_key:
        return "answered by another key"
    if not verify_signature(key, signature, DOMAIN_DIALBACK + nonce + address.encode()):
        return "bad signature"
    return None


def answer_probe(identity: Identity, header: dict[str, Any]) -> bytes | None:
    """Peer side: the packed ``probe_reply`` frame for a decoded probe, or None if invalid."""
    nonce, addr = header.get("nonce"), header.get("addr")
    if header.get("v") != PROBE_VERSION or header.get("type") != "probe":
        return None
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
        return None
    if not isinstance(addr, str) or not addr or len(addr) > MAX_ADDR_LEN:
        return None
    reply = {
        "v": PROBE_VERSION,
        "type": "probe_reply",
        "peer_id": identity.peer_id,
        "public_key": identity.public_key,
        "signature": identity.sign(DOMAIN_DIALBACK + nonce + addr.encode()),
    }
    packed: bytes = msgpack.packb(reply, use_bin_type=True)
    return packed


__all__ = ["answer_probe", "check_probe_reply", "dial_back"]
