"""ZeroMQ transport: one ROUTER that listens, one DEALER per remote peer.

Each remote peer gets its own DEALER connected to that peer's address only, so a model sent
to peer X reaches X. (The prototype connected a single DEALER to every peer; ZeroMQ then
round-robins each send to whichever peer comes next.)

Every exchange is a request and one reply: ``model`` -> ``ack``/``nack``,
``get_model`` -> ``model``/``nack``, ``probe`` -> ``probe_reply`` (the rendezvous' dial-back).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from overlay.dialback import answer_probe
from overlay.errors import TransportError, WireError
from overlay.identity import Identity
from overlay.transport.base import Frames, Handler, TransportStats
from overlay.wire import FrameType, Limits, decode_header, encode_control

log = logging.getLogger(__name__)

@dataclass
class _Link:
    address: str
    socket: zmq.asyncio.Socket
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ZmqTransport:
    """Listens on ``listen`` (``tcp://HOST:PORT``; port 0 picks one) unless it is None."""

    def __init__(
        self,
        identity: Identity,
        listen: str | None,
        handler: Handler,
        limits: Limits = Limits(),
        *,
        max_concurrent: int = 4,
    ) -> None:
        self.identity = identity
        self.listen = listen
        self.limits = limits
        self.address: str | None = None
        self.stats = TransportStats()
        self._handler = handler
        self._ctx = zmq.asyncio.Context()
        self._router: zmq.asyncio.Socket | None = None
        self._links: dict[str, _Link] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._serve_task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(max_concurrent)
        self._closed = False

    @property
    def _max_frame(self) -> int:
        return self.limits.max_total_bytes + self.limits.max_header_bytes

    async def start(self) -> str | None:
        if self.listen is None:
            return None
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self._max_frame)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            router.bind(self.listen)
        except zmq.ZMQError as exc:
            router.close()
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
        tasks = [t for t in [self._serve_task, *self._tasks] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self._links.values():
            link.socket.close(linger=0)
        self._links.clear()
        if self._router is not None:
            self._router.close(linger=0)
        self._ctx.term()

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
            log.warning("rejected a message: more than %d parts", max_parts)
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
                reply = await self._handler(header, payloads)
        except WireError as exc:
            self.stats.reject(exc.reason)
            log.warning("rejected a message: %s", exc)
            # The requester matches replies by request_id: without it a nack is dropped as
            # stale and the requester waits for its whole timeout.
            ids = {"request_id": request_id} if isinstance(request_id, str) else {}
            reply = [encode_control(FrameType.NACK, reason=exc.reason, message=str(exc)[:200],
                                    **ids)]
        if reply is None:
            return
        try:
            await self._router.send_multipart([route.bytes, *reply], copy=False)
        except zmq.ZMQError as exc:  # the requester went away
            log.info("could not reply: %s", exc)

    # ---- sending ---------------------------------------------------------------------------

    def _link(self, address: str) -> _Link:
        link = self._links.get(address)
        if link is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a connection that isn't up
            sock.setsockopt(zmq.MAXMSGSIZE, self._max_frame)
            sock.connect(address)
            link = self._links[address] = _Link(address, sock)
        return link

    def _drop_link(self, link: _Link) -> None:
        """Close a link whose state is unknown (timeout): discards anything still queued."""
        if self._links.get(link.address) is link:
            del self._links[link.address]
        link.socket.close(linger=0)

    async def request(
        self, address: str, frames: Frames, request_id: str, timeout: float
    ) -> tuple[dict[str, Any], list[memoryview]]:
        """Send ``frames`` to ``address`` and wait for the reply carrying ``request_id``.

        ``timeout`` bounds the whole exchange (sending, the remote's work, the reply).
        Raises TransportError on timeout or a refused/garbled reply; a ``nack`` is returned
        as a header like any other reply.
        """
        if self._closed:
            raise TransportError("transport closed")
        link = self._link(address)
        deadline = time.monotonic() + timeout
        async with link.lock:
            try:
                await asyncio.wait_for(link.socket.send_multipart(frames, copy=False), timeout)
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
                raise TransportError(f"{address}: no reply within {timeout:.1f} s") from None
            except WireError as exc:
                self._drop_link(link)
                raise TransportError(f"{address}: bad reply ({exc})") from exc
            except zmq.ZMQError as exc:
                self._drop_link(link)
                raise TransportError(f"{address}: {exc}") from exc

    def forget(self, address: str) -> None:
        """Close the link to a peer that left."""
        link = self._links.get(address)
        if link is not None and not link.lock.locked():
            self._drop_link(link)
