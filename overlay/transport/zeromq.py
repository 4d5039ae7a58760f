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

Large frames travel split (overlay.transport.zmq_split).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar

import zmq
import zmq.asyncio

from overlay.digest import SHA256, PrehashedPayloads, hash_available, submit_piece_hashes
from overlay.errors import TransportError, WireError
from overlay.identity import Identity, curve_public_key_from_ed25519
from overlay.transport.base import (
    Directory,
    Frames,
    Handler,
    LinkKind,
    Reply,
    Transport,
    TransportStats,
)
from overlay.transport.serving import TaskSet, max_frame, max_parts, serve_request
from overlay.transport.zmq_split import (
    JOIN_IN_THREAD_BYTES,
    SPLIT_BYTES,
    is_split,
    join_group,
    split_frames,
    split_groups,
)
from overlay.wire import FrameType, Limits, decode_header, nack_for

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
"""Where libzmq asks a context's ZAP handler (RFC 27) to authenticate a handshake."""
ZAP_DOMAIN = b"peerlearn"
ZAP_VERSION = b"1.0"

def _model_hash(frame: memoryview, limits: Limits) -> str | None:
    """The digest hash a model header names, if ``frame`` is one whose hash we can check."""
    try:
        header = decode_header(frame, limits)
    except WireError:
        return None  # refused again, with its nack, when it is served
    if header.get("type") != FrameType.MODEL.value:
        return None
    name = header.get("hash", SHA256)
    return name if hash_available(name) else None


@dataclass
class _Link:
    peer_id: str
    address: str
    server_key: bytes
    """The CURVE key the listener at ``address`` must hold."""
    socket: zmq.asyncio.Socket
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    forgotten: bool = False
    """The peer left while a request held the link: dropped once that request ends."""


class ZmqTransport(Transport):
    """Listens on ``listen`` (``tcp://HOST:PORT``; port 0 picks one) unless it is None.

    ``directory`` gives each peer's verified address and Ed25519 key (``request`` dials that
    address and expects the CURVE key derived from that key), and maps the CURVE public key
    a request came from to the member holding it (the handler's ``origin``).
    ``max_concurrent`` bounds the requests being handled at once.
    """

    name: ClassVar[str] = "zmq"

    def __init__(
        self,
        identity: Identity,
        listen: str | None,
        handler: Handler,
        limits: Limits = Limits(),
        *,
        directory: Directory,
        max_concurrent: int = 4,
    ) -> None:
        self.identity = identity
        self.listen = listen
        self.limits = limits
        self.directory = directory
        self.address: str | None = None
        """The bound address once started (None when not listening)."""
        self.stats = TransportStats()
        self._handler = handler
        self._ctx = zmq.asyncio.Context()
        self._router: zmq.asyncio.Socket | None = None
        self._zap: zmq.asyncio.Socket | None = None
        self._links: dict[str, _Link] = {}
        self._retired: list[_Link] = []  # dropped while a request held them
        self._tasks = TaskSet("zmq")
        self._serve_task: asyncio.Task[None] | None = None
        self._zap_task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(max_concurrent)
        self._closed = False

    async def start(self) -> None:
        if self.listen is None or self._closed:
            return
        # The ZAP handler first: a handshake that finds none is let through unauthenticated.
        self._zap = self._ctx.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)
        self._zap_task = self._tasks.spawn(self._authenticate(self._zap), "zmq-zap")
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, max_frame(self.limits))
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
        self._serve_task = self._tasks.spawn(self._serve(), "zmq-serve")
        log.info("listening on %s", self.address)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._tasks.close()
        for link in [*self._links.values(), *self._retired]:
            link.socket.close(linger=0)
        self._links.clear()
        self._retired.clear()
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
        return self.directory.peer_of_curve_key(key)

    # ---- receiving -------------------------------------------------------------------------

    async def _recv_bounded(self, sock: zmq.asyncio.Socket, skip: int) -> list[zmq.Frame] | None:
        """One multipart message, or None if it broke the part-count limit (drained).

        ``skip`` parts (the ROUTER's routing id) come before the message's own. A split
        message may have as many more parts as its largest size takes sub-frames.
        """
        parts: list[zmq.Frame] = [await sock.recv(copy=False)]
        over = False
        most = skip + max_parts(self.limits)
        split_most = most + max_frame(self.limits) // SPLIT_BYTES + 1
        while parts[-1].more:
            frame = await sock.recv(copy=False)
            if over:
                parts[-1] = frame  # keep draining without keeping anything
                continue
            parts.append(frame)
            if len(parts) > most and (len(parts) > split_most
                                      or not is_split(parts[skip].buffer)):
                over = True
        if over:
            self.stats.reject("too_many_parts")
            log.warning("rejected a message: too_many_parts: more than %d parts", most)
            return None
        return parts

    async def _serve(self) -> None:
        assert self._router is not None
        while True:
            parts = await self._recv_bounded(self._router, skip=1)
            if parts is None or len(parts) < 2:
                continue
            await self._slots.acquire()
            task = self._tasks.spawn(self._handle(parts), "zmq-handle")
            task.add_done_callback(lambda _task: self._slots.release())

    async def _handle(self, parts: list[zmq.Frame]) -> None:
        assert self._router is not None
        route, head, *rest = parts
        origin = self._origin(head)
        self.stats.messages_in += 1
        self.stats.bytes_in += sum(len(p) for p in rest) + len(head)
        try:
            message = await self._unsplit(head.buffer, [p.buffer for p in rest])
        except WireError as exc:
            self.stats.reject(exc.reason)
            log.warning("rejected a message: %s", exc)
            reply: Frames | None = [nack_for(exc, None, head.buffer, self.limits)]
        else:
            if message is None:
                return
            reply = await serve_request(message[0], message[1], origin,
                                        handler=self._handler, limits=self.limits,
                                        stats=self.stats, probe_identity=self.identity)
        if reply is None:
            return
        try:
            await self._router.send_multipart([route.bytes, *split_frames(reply)], copy=False)
        except zmq.ZMQError as exc:  # the requester went away
            log.info("could not reply: %s", exc)

    async def _unsplit(self, head: memoryview, rest: list[memoryview]
                       ) -> tuple[memoryview, list[memoryview]] | None:
        """A message's header frame and payloads, joined if it came split; None (counted) if
        it has too many parts. The payloads of a split model come with the piece hashes of
        its digest, computed from the sub-frames while they are joined."""
        if not is_split(head):
            if len(rest) + 1 > max_parts(self.limits):
                self.stats.reject("too_many_parts")
                log.warning("rejected a message: too_many_parts")
                return None
            return head, rest
        groups = split_groups(head, rest, self.limits)
        header = join_group(groups[0])
        if is_split(header):
            raise WireError("malformed", "a split message inside a split message")
        hash_name = _model_hash(header, self.limits)
        hashing = [asyncio.wrap_future(submit_piece_hashes(hash_name, g))
                   if hash_name is not None and len(g) > 1 else None for g in groups[1:]]
        try:
            if sum(len(p) for p in rest) >= JOIN_IN_THREAD_BYTES:
                payloads = await asyncio.to_thread(lambda: [join_group(g) for g in groups[1:]])
            else:
                payloads = [join_group(g) for g in groups[1:]]
            hashes = [None if h is None else await h for h in hashing]
        finally:
            for h in hashing:
                if h is not None and not h.done():
                    h.cancel()
        if hash_name is None:
            return header, payloads
        return header, PrehashedPayloads(payloads, hash_name, hashes)

    # ---- sending ---------------------------------------------------------------------------

    def _link(self, peer_id: str) -> _Link:
        """The DEALER to ``peer_id`` at the address the directory has for it now."""
        address = self.directory.address_of(peer_id)
        public_key = self.directory.public_key_of(peer_id)
        if address is None or public_key is None:
            raise TransportError(f"{peer_id}: no verified ZeroMQ address")
        try:
            server_key = curve_public_key_from_ed25519(public_key)
        except ValueError as exc:
            raise TransportError(f"{address}: unusable peer key ({exc})") from exc
        link = self._links.get(peer_id)
        if link is not None and (link.address, link.server_key) != (address, server_key):
            self._retire(link)  # the peer moved, or its key changed
            link = None
        if link is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a connection that isn't up
            sock.setsockopt(zmq.MAXMSGSIZE, max_frame(self.limits))
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.identity.curve_secret_key)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.identity.curve_public_key)
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            sock.connect(address)
            link = self._links[peer_id] = _Link(peer_id, address, server_key, sock)
        return link

    def _drop_link(self, link: _Link) -> None:
        """Close a link whose state is unknown (timeout): discards anything still queued."""
        if self._links.get(link.peer_id) is link:
            del self._links[link.peer_id]
        link.socket.close(linger=0)

    def link_kind(self, peer_id: str) -> LinkKind | None:
        return LinkKind.ZMQ if peer_id in self._links else None

    async def request(
        self, peer_id: str, frames: Frames, request_id: str, *, timeout: float
    ) -> Reply:
        """Send ``frames`` to ``peer_id`` at its verified address and wait for the reply
        carrying ``request_id``.

        ``timeout`` bounds the whole exchange (CURVE handshake, sending, the remote's work,
        the reply). Raises TransportError when the directory has no address or key for the
        peer, on timeout (a listener that does not hold the peer's key never completes the
        handshake: that is a timeout too) or a refused/garbled reply; a ``nack`` is returned
        as a header like any other reply.
        """
        if self._closed:
            raise TransportError("transport closed")
        link = self._link(peer_id)
        try:
            async with link.lock:
                return await self._exchange(link, frames, request_id, timeout)
        finally:
            if link.forgotten:
                self._drop_link(link)
                self._retired = [r for r in self._retired if r is not link]

    async def _exchange(self, link: _Link, frames: Frames, request_id: str,
                        timeout: float) -> Reply:
        address = link.address
        deadline = time.monotonic() + timeout
        sent = False
        try:
            wire_frames = split_frames(frames, request_id)
            await asyncio.wait_for(link.socket.send_multipart(wire_frames, copy=False), timeout)
            sent = True
            self.stats.messages_out += 1
            self.stats.bytes_out += sum(len(f) for f in frames)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                parts = await asyncio.wait_for(self._recv_bounded(link.socket, skip=0),
                                               remaining)
                if not parts:
                    continue
                head, rest = parts[0].buffer, [p.buffer for p in parts[1:]]
                got = (await asyncio.wait_for(self._unsplit(head, rest), remaining)
                       if is_split(head) else await self._unsplit(head, rest))
                if not got:
                    continue
                header = decode_header(got[0], self.limits)
                if header.get("request_id") == request_id:
                    return header, got[1]
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

    async def forget(self, peer_id: str) -> None:
        """Close the link to a peer that left (once a request that holds it ends)."""
        link = self._links.get(peer_id)
        if link is not None:
            self._retire(link)

    def _retire(self, link: _Link) -> None:
        """Drop ``link`` now, or when the request that holds it ends."""
        if self._links.get(link.peer_id) is link:
            del self._links[link.peer_id]
        if link.lock.locked():
            link.forgotten = True
            self._retired.append(link)
        else:
            link.socket.close(linger=0)
