"""ZeroMQ transport: one ROUTER that listens, one DEALER per remote peer.

Each remote peer gets its own DEALER connected to that peer's address only, so a model sent
to peer X reaches X. (The prototype connected a single DEALER to every peer; ZeroMQ then
round-robins each send to whichever peer comes next.)

Every exchange is a request and one reply: ``model`` -> ``ack``/``nack``,
``get_model`` -> ``model``/``nack``, ``probe`` -> ``probe_reply`` (the rendezvous' dial-back).

Everything is encrypted with CURVE (CurveZMQ, RFC 26), with keys bound to peer identities:
each peer's CURVE key pair is derived from its Ed25519 identity (overlay.identity). The ROUTER
is a CURVE server holding our derived secret; a DEALER to a peer is a CURVE client whose
server key is the one derived from the Ed25519 key we expect at that address, so a listener
that is not that peer cannot complete the handshake. The ROUTER accepts any CURVE client
(the rendezvous' dial-back and newcomers we do not know yet must get through): a ZAP handler
(RFC 27) records each client's CURVE public key as the connection's ``User-Id``, and the
handler is told which member, if any, holds that key (its ``origin``). A client that does
not speak CURVE never completes a handshake.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from overlay.dialback import answer_probe
from overlay.errors import TransportError, WireError
from overlay.identity import Identity, curve_public_key_from_ed25519
from overlay.transport.base import Frames, Handler, TransportStats
from overlay.wire import FrameType, Limits, decode_header, nack_for

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
"""Where libzmq asks a context's ZAP handler (RFC 27) to authenticate a handshake."""
ZAP_DOMAIN = b"peerlearn"
ZAP_VERSION = b"1.0"

PeerOf = Callable[[bytes], str | None]
"""peer_of(curve_public_key) -> the peer id of the member holding that key, or None."""


def _nobody(_curve_public_key: bytes) -> str | None:
    return None


@dataclass
class _Link:
    address: str
    server_key: bytes
    """The CURVE key the listener at ``address`` must hold."""
    socket: zmq.asyncio.Socket
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ZmqTransport:
    """Listens on ``listen`` (``tcp://HOST:PORT``; port 0 picks one) unless it is None.

    ``peer_of`` maps the CURVE public key a request came from to the member holding it
    (the handler's ``origin``); without it every origin is None (unknown).
    """

    def __init__(
        self,
        identity: Identity,
        listen: str | None,
        handler: Handler,
        limits: Limits = Limits(),
        *,
        max_concurrent: int = 4,
        peer_of: PeerOf = _nobody,
    ) -> None:
        self.identity = identity
        self.listen = listen
        self.limits = limits
        self.address: str | None = None
        self.stats = TransportStats()
        self._handler = handler
        self._peer_of = peer_of
        self._ctx = zmq.asyncio.Context()
        self._router: zmq.asyncio.Socket | None = None
        self._zap: zmq.asyncio.Socket | None = None
        self._links: dict[tuple[str, bytes], _Link] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._serve_task: asyncio.Task[None] | None = None
        self._zap_task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(max_concurrent)
        self._closed = False

    @property
    def _max_frame(self) -> int:
        return self.limits.max_total_bytes + self.limits.max_header_bytes

    async def start(self) -> str | None:
        if self.listen is None:
            return None
        # The ZAP handler first: a handshake that finds none is let through unauthenticated.
        self._zap = self._ctx.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)
        self._zap_task = asyncio.create_task(self._authenticate(self._zap), name="zmq-zap")
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self._max_frame)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.CURVE_SERVER, 1)
        router.setsockopt(zmq.CURVE_SECRETKEY, self.identity.curve_secret_key)
        router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        try:
            router.bind(self.listen)
        except zmq.ZMQError as exc:
            router.close()
            await self.close()
            raise TransportError(f"cannot listen on {self.listen}: {exc}") from exc
        self._router = router
        self.address = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._serve_task = asyncio.create_task(self._serve(), name="zmq-serve")
        log.info("listening on %s", self.address)
        return self.address

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in [self._serve_task, self._zap_task, *self._tasks] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self._links.values():
            link.socket.close(linger=0)
        self._links.clear()
        for sock in (self._router, self._zap):
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()

    # ---- authentication (ZAP, RFC 27) ------------------------------------------------------

    async def _authenticate(self, zap: zmq.asyncio.Socket) -> None:
        """Accept every CURVE client; its public key (hex) becomes the connection's User-Id.

        A request is [version, request_id, domain, address, routing id, mechanism,
        credentials...]; for CURVE the one credential is the client's 32-byte public key.
        """
        while True:
            request = await zap.recv_multipart()
            request_id = request[1] if len(request) > 1 else b""
            if (len(request) == 7 and request[0] == ZAP_VERSION and request[5] == b"CURVE"
                    and len(request[6]) == 32):
                reply = [b"200", b"OK", request[6].hex().encode("ascii")]
            else:
                mechanism = request[5] if len(request) > 5 else b"?"
                log.info("refused a %r handshake: CURVE only", mechanism)
                reply = [b"400", b"CURVE only", b""]
            await zap.send_multipart([ZAP_VERSION, request_id, *reply, b""])

    def _origin(self, frame: zmq.Frame) -> str | None:
        """The member whose CURVE key the message's connection authenticated with, if any."""
        try:
            user_id = frame.get("User-Id")
            key = bytes.fromhex(user_id) if isinstance(user_id, str) else b""
        except (zmq.ZMQError, ValueError):
            return None
        if not key:
            return None
        return self._peer_of(key)

    # ---- receiving -------------------------------------------------------------------------

    async def _recv_bounded(self, sock: zmq.asyncio.Socket) -> list[zmq.Frame] | None:
        """One multipart message, or None if it broke the part-count limit (drained)."""
        parts: list[zmq.Frame] = [await sock.recv(copy=False)]
        over = False
        max_parts = self.limits.max_arrays + 3
        while parts[-1].more:
            frame = await sock.recv(copy=False)
            if over:
                parts[-1] = frame  # keep draining without keeping anything
                continue
            parts.append(frame)
            if len(parts) > max_parts:
                over = True
        if over:
            self.stats.reject("too_many_parts")
            log.warning("rejected a message: too_many_parts: more than %d parts", max_parts)
            return None
        return parts

    async def _serve(self) -> None:
        assert self._router is not None
        while True:
            parts = await self._recv_bounded(self._router)
            if parts is None or len(parts) < 2:
                continue
            await self._slots.acquire()
            task = asyncio.create_task(self._handle(parts))
            self._tasks.add(task)
            task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("handler failed", exc_info=task.exception())

    async def _handle(self, parts: list[zmq.Frame]) -> None:
        assert self._router is not None
        route, head, *rest = parts
        payloads = [p.buffer for p in rest]
        self.stats.messages_in += 1
        self.stats.bytes_in += sum(len(p) for p in payloads) + len(head)
        reply: Frames | None
        request_id: Any = None
        try:
            header = decode_header(head.buffer, self.limits)
            request_id = header.get("request_id")
            if header["type"] == FrameType.PROBE.value:
                probe_reply = answer_probe(self.identity, header)
                reply = [probe_reply] if probe_reply is not None else None
            else:
                reply = await self._handler(header, payloads, self._origin(head))
        except WireError as exc:
            self.stats.reject(exc.reason)
            log.warning("rejected a message: %s", exc)
            reply = [nack_for(exc, request_id, head.buffer, self.limits)]
        if reply is None:
            return
        try:
            await self._router.send_multipart([route.bytes, *reply], copy=False)
        except zmq.ZMQError as exc:  # the requester went away
            log.info("could not reply: %s", exc)

    # ---- sending ---------------------------------------------------------------------------

    def _link(self, address: str, server_key: bytes) -> _Link:
        link = self._links.get((address, server_key))
        if link is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a connection that isn't up
            sock.setsockopt(zmq.MAXMSGSIZE, self._max_frame)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.identity.curve_secret_key)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.identity.curve_public_key)
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            sock.connect(address)
            link = self._links[(address, server_key)] = _Link(address, server_key, sock)
        return link

    def _drop_link(self, link: _Link) -> None:
        """Close a link whose state is unknown (timeout): discards anything still queued."""
        key = (link.address, link.server_key)
        if self._links.get(key) is link:
            del self._links[key]
        link.socket.close(linger=0)

    async def request(
        self, address: str, public_key: bytes, frames: Frames, request_id: str,
        timeout: float,
    ) -> tuple[dict[str, Any], list[memoryview]]:
        """Send ``frames`` to the peer with Ed25519 ``public_key`` at ``address`` and wait for
        the reply carrying ``request_id``.

        ``timeout`` bounds the whole exchange (CURVE handshake, sending, the remote's work,
        the reply). Raises TransportError on timeout (a listener that does not hold the
        peer's key never completes the handshake: that is a timeout too) or a
        refused/garbled reply; a ``nack`` is returned as a header like any other reply.
        """
        if self._closed:
            raise TransportError("transport closed")
        try:
            server_key = curve_public_key_from_ed25519(public_key)
        except ValueError as exc:
            raise TransportError(f"{address}: unusable peer key ({exc})") from exc
        link = self._link(address, server_key)
        deadline = time.monotonic() + timeout
        async with link.lock:
            sent = False
            try:
                await asyncio.wait_for(link.socket.send_multipart(frames, copy=False), timeout)
                sent = True
                self.stats.messages_out += 1
                self.stats.bytes_out += sum(len(f) for f in frames)
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    parts = await asyncio.wait_for(self._recv_bounded(link.socket), remaining)
                    if not parts:
                        continue
                    header = decode_header(parts[0].buffer, self.limits)
                    if header.get("request_id") == request_id:
                        return header, [p.buffer for p in parts[1:]]
                    log.debug("dropping a stale reply from %s", address)
            except TimeoutError:
                self._drop_link(link)
                if not sent:  # IMMEDIATE: a send waits for a connection whose handshake is done
                    raise TransportError(
                        f"{address}: no CURVE handshake within {timeout:.1f} s (nobody "
                        "listening, or the listener does not hold the expected peer's key)"
                    ) from None
                raise TransportError(f"{address}: no reply within {timeout:.1f} s") from None
            except WireError as exc:
                self._drop_link(link)
                raise TransportError(f"{address}: bad reply ({exc})") from exc
            except zmq.ZMQError as exc:
                self._drop_link(link)
                raise TransportError(f"{address}: {exc}") from exc

    def forget(self, address: str) -> None:
        """Close the links to a peer that left."""
        for link in [link for link in self._links.values() if link.address == address]:
            if not link.lock.locked():
                self._drop_link(link)
