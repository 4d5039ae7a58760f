"""WebRTC transport: one RTCPeerConnection and one data channel per remote peer (aiortc).

Same request/reply contract as :class:`overlay.transport.zeromq.ZmqTransport`: a message is
the frames of the wire format (``[header, payload, ...]``), a reply is matched by the
``request_id`` in its header, and incoming requests go to ``handler(header, payloads, origin)``
(``origin``: the link's peer id) whose reply frames travel back over the same channel.

Signaling is abstract: the owner passes ``send_signal(peer_id, kind, data)`` and feeds what
arrives into :meth:`WebRtcTransport.on_signal`. Kinds:

- ``hello`` ``{}`` -- the peer with the larger id asks the smaller one for an offer;
- ``offer`` / ``answer`` ``{"sdp": str, "type": str}`` -- aiortc does not trickle, the ICE
  candidates are inside the SDP. An offer also says its ``stage``: ``direct`` (both sides
  gather host and server-reflexive candidates only) or ``any`` (TURN relay candidates too).

Direct first, relay as fallback: when a TURN server is configured, the offerer first tries a
``direct`` stage for :data:`DIRECT_TIMEOUT` seconds and only then re-offers with ``any``.
(aioice nominates the first pair whose check succeeds; between two port-restricted NATs the
punched pair and the pair through TURN succeed at about the same time, so with TURN candidates
present from the start a punchable pair could end up relayed.)

The peer with the lexicographically smaller id always offers (no glare). An ``offer`` or a
``hello`` that arrives for a link that is already open means the remote lost its side (it
restarted): the old link is closed and a new one made.

Framing over the data channel. A message is a *transfer*; its byte stream is a table of frame
lengths (``frame_count`` x u64, big-endian) followed by the frames, cut into chunks of at most
:data:`MAX_MESSAGE` bytes (aiortc refuses messages above the peer's maximum, 65536 by
default). Each chunk is :data:`CHUNK_HEADER` + data::

    version u8 | flags u8 | reserved u16 | transfer_id u32 | index u32 | count u32
    | frame_count u32 | total_len u64                                       (28 bytes)

``transfer_id`` counts up per sender and link; ``count`` = ceil(total_len / CHUNK_SIZE);
every chunk but the last carries exactly :data:`CHUNK_SIZE` bytes and all chunks of a transfer
repeat the same ``count``/``frame_count``/``total_len``. Flags: ``REPLY`` (the transfer answers
one of our requests), ``ABORT`` (the sender gave a transfer up), ``REJECT`` (the receiver
refused one of *our* transfers; data = reason). The channel is ordered and reliable, so chunks
arrive in order and any deviation is a protocol error. The receiver checks the first chunk
before it keeps anything (size against ``limits``, frame count, concurrent transfers), grows
the buffer as chunks arrive, bounds each transfer in time (:data:`TRANSFER_TIMEOUT`, and
:data:`CHUNK_IDLE_TIMEOUT` between chunks), and hands nothing up until the last byte is in.
A refused or expired transfer is freed, logged with its reason, counted in
``stats.rejected`` and reported to the sender with ``REJECT``, so its request fails at once.

The sender paces itself by ``bufferedAmount``: above :data:`HIGH_WATER` it waits for the
channel's ``bufferedamountlow`` event (threshold :data:`LOW_WATER`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from overlay.errors import TransportError, WireError
from overlay.identity import Identity
from overlay.transport.base import Frames, Handler, TransportStats
from overlay.wire import Limits, decode_header, nack_for

log = logging.getLogger(__name__)

SendSignal = Callable[[str, str, dict[str, Any]], Awaitable[None]]

MAX_MESSAGE = 64 * 1024
"""Largest data channel message we send (aiortc's default remote maximum)."""
CHUNK_HEADER = struct.Struct("!BBHIIIIQ")
CHUNK_VERSION = 1
CHUNK_SIZE = MAX_MESSAGE - CHUNK_HEADER.size
"""Transfer bytes per chunk."""
FLAG_REPLY = 0x01
FLAG_ABORT = 0x02
FLAG_REJECT = 0x04
_DATA_FLAGS = (0, FLAG_REPLY)
_CONTROL_FLAGS = (FLAG_ABORT, FLAG_REJECT)
_FRAME_LEN = 8  # u64 per frame in the table that opens a transfer

CONNECT_TIMEOUT = 15.0
DIRECT_TIMEOUT = 4.0
"""How long the ``direct`` stage (no TURN candidates) may take before the relay is tried;
hole punching through port-restricted NATs took about 0.6 s in the lab."""
"""Seconds from the start of an attempt until the data channel is open."""
TRANSFER_TIMEOUT = 120.0
"""Seconds a receiver keeps one incoming transfer, first chunk to last."""
CHUNK_IDLE_TIMEOUT = 15.0
"""Seconds a receiver waits for the next chunk of an incoming transfer."""
MAX_TRANSFERS = 4
"""Incoming requests per link being received or handled; also outstanding requests per link."""
HIGH_WATER = 4 * 1024 * 1024
"""The sender waits while the channel buffers more than this many bytes..."""
LOW_WATER = 1024 * 1024
"""...until it has drained to this (``bufferedAmountLowThreshold``)."""


class LinkState(enum.StrEnum):
    NEW = "new"
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSED = "closed"
    FAILED = "failed"


_TRANSITIONS: dict[LinkState, frozenset[LinkState]] = {
    LinkState.NEW: frozenset({LinkState.CONNECTING, LinkState.CLOSED, LinkState.FAILED}),
    LinkState.CONNECTING: frozenset({LinkState.OPEN, LinkState.CLOSED, LinkState.FAILED}),
    LinkState.OPEN: frozenset({LinkState.CLOSED, LinkState.FAILED}),
    LinkState.CLOSED: frozenset(),
    LinkState.FAILED: frozenset(),
}
_TERMINAL = frozenset({LinkState.CLOSED, LinkState.FAILED})


class ChunkError(Exception):
    """A chunk broke the framing; ``reason`` is the stats.rejected code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class ChunkHeader:
    version: int
    flags: int
    transfer_id: int
    index: int
    count: int
    frame_count: int
    total_len: int

    def pack(self) -> bytes:
        return CHUNK_HEADER.pack(
            self.version, self.flags, 0, self.transfer_id, self.index, self.count,
            self.frame_count, self.total_len,
        )

    @classmethod
    def unpack(cls, message: bytes) -> ChunkHeader:
        if len(message) < CHUNK_HEADER.size:
            raise ChunkError("bad_chunk", f"{len(message)} bytes, shorter than a chunk header")
        version, flags, reserved, tid, index, count, nframes, total = CHUNK_HEADER.unpack_from(
            message
        )
        if version != CHUNK_VERSION or reserved != 0:
            raise ChunkError("bad_chunk", f"version {version}, reserved {reserved}")
        if flags not in _DATA_FLAGS and flags not in _CONTROL_FLAGS:
            raise ChunkError("bad_chunk", f"flags {flags:#x}")
        return cls(version, flags, tid, index, count, nframes, total)


def chunk_count(total_len: int) -> int:
    return max(1, math.ceil(total_len / CHUNK_SIZE))


def iter_chunks(transfer_id: int, frames: Frames, flags: int = 0) -> Iterator[bytes]:
    """The data channel messages that carry ``frames`` as transfer ``transfer_id``."""
    views = [memoryview(f).cast("B") for f in frames]
    table = struct.pack(f"!{len(views)}Q", *(len(v) for v in views))
    total = len(table) + sum(len(v) for v in views)
    count = chunk_count(total)
    index = 0
    pieces: list[bytes | memoryview] = []
    size = 0
    for view in [memoryview(table), *views]:
        pos = 0
        while pos < len(view):
            take = min(CHUNK_SIZE - size, len(view) - pos)
            pieces.append(view[pos : pos + take])
            size += take
            pos += take
            if size == CHUNK_SIZE:
                head = ChunkHeader(CHUNK_VERSION, flags, transfer_id, index, count,
                                   len(views), total)
                yield b"".join([head.pack(), *pieces])
                index += 1
                pieces, size = [], 0
    if size:
        head = ChunkHeader(CHUNK_VERSION, flags, transfer_id, index, count, len(views), total)
        yield b"".join([head.pack(), *pieces])


def control_chunk(flags: int, transfer_id: int, reason: str = "") -> bytes:
    data = reason.encode("ascii", "replace")[:200]
    return ChunkHeader(CHUNK_VERSION, flags, transfer_id, 0, 0, 0, len(data)).pack() + data


def _urls(server: dict[str, Any]) -> list[str]:
    urls = server["urls"]
    return [urls] if isinstance(urls, str) else list(urls)


def has_turn(ice_servers: list[dict[str, Any]]) -> bool:
    return any(u.startswith(("turn:", "turns:")) for s in ice_servers for u in _urls(s))


def ice_configuration(
    ice_servers: list[dict[str, Any]], ice_transport_policy: str = "all", *,
    direct_only: bool = False,
) -> RTCConfiguration:
    """An explicit RTCConfiguration (an empty list means no STUN/TURN at all, never a default).

    ``ice_servers`` items look like ``{"urls": [...], "username": ..., "credential": ...}``;
    ``direct_only`` leaves the TURN servers out.
    """
    if direct_only:
        ice_servers = [
            {**s, "urls": [u for u in _urls(s) if u.startswith(("stun:", "stuns:"))]}
            for s in ice_servers
        ]
        ice_servers = [s for s in ice_servers if s["urls"]]
    servers = [
        RTCIceServer(
            urls=list(s["urls"]) if not isinstance(s["urls"], str) else s["urls"],
            username=s.get("username"),
            credential=s.get("credential"),
        )
        for s in ice_servers
    ]
    return RTCConfiguration(
        iceServers=servers, iceTransportPolicy=RTCIceTransportPolicy(ice_transport_policy)
    )


def selected_kind(pc: RTCPeerConnection) -> str:
    """``webrtc-relay`` if the nominated ICE pair uses a TURN candidate on either side."""
    try:
        connection = pc.sctp.transport.transport._connection  # type: ignore[union-attr]
        pairs = list(connection._nominated.values())
    except AttributeError:
        pairs = []
    if not pairs:
        log.warning("no nominated ICE pair found; reporting the link as direct")
        return "webrtc-direct"
    relayed = any(
        "relay" in (p.local_candidate.type, p.remote_candidate.type) for p in pairs
    )
    return "webrtc-relay" if relayed else "webrtc-direct"


@dataclass
class _Incoming:
    transfer_id: int
    reply: bool
    count: int
    frame_count: int
    total_len: int
    started: float
    last: float
    buf: bytearray
    next_index: int = 0
    timer: asyncio.TimerHandle | None = None


class WebRtcLink:
    """The connection to one remote peer. Made and owned by :class:`WebRtcTransport`."""

    def __init__(self, transport: WebRtcTransport, peer_id: str, *, offerer: bool) -> None:
        self.peer_id = peer_id
        self.offerer = offerer
        self.stage = transport.first_stage if offerer else "any"  # the answerer follows the offer
        self.state = LinkState.NEW
        self.kind: str | None = None
        self.connect_s: float | None = None
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._started = time.monotonic()
        self.pc: RTCPeerConnection = RTCPeerConnection(transport.configuration_for(self.stage))
        self._opened: asyncio.Future[None] = self._loop.create_future()
        self._offer: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._answer: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._low = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        # sending
        self._next_tid = 0
        self._slots = asyncio.Semaphore(MAX_TRANSFERS)
        self._pending: dict[str, asyncio.Future[tuple[dict[str, Any], list[memoryview]]]] = {}
        self._outgoing: dict[int, str] = {}  # our transfer id -> request_id, until replied
        self._sending: set[int] = set()  # our transfer ids being sent
        self._refused: dict[int, str] = {}  # of those, the ones the remote refused, and why
        # receiving
        self._incoming: dict[int, _Incoming] = {}
        self._max_started = -1
        self._requests_active = 0

        self.channel: RTCDataChannel = self._make_channel()
        self.pc.on("connectionstatechange", self._on_connection_state)

    def _make_channel(self) -> RTCDataChannel:
        channel = self.pc.createDataChannel("peerlearn", negotiated=True, id=0, ordered=True)
        channel.bufferedAmountLowThreshold = LOW_WATER
        channel.on("open", self._on_open)
        channel.on("close", lambda: self._set_state(LinkState.CLOSED, "channel closed"))
        channel.on("message", self._on_message)
        channel.on("bufferedamountlow", self._low.set)
        return channel

    async def _restage(self, stage: str) -> None:
        """Start over with a fresh peer connection for ``stage`` (before the link opened)."""
        old = self.pc
        old.remove_all_listeners()
        self.channel.remove_all_listeners()
        await old.close()
        self.stage = stage
        self.pc = RTCPeerConnection(self._transport.configuration_for(stage))
        self.channel = self._make_channel()
        self.pc.on("connectionstatechange", self._on_connection_state)
        self._answer = self._loop.create_future()

    # ---- state -----------------------------------------------------------------------------

    def _set_state(self, new: LinkState, reason: str) -> None:
        """The only place where the link changes state."""
        old = self.state
        if new is old or new not in _TRANSITIONS[old]:
            return
        self.state = new
        level = logging.INFO if new is not LinkState.FAILED else logging.WARNING
        log.log(level, "link %s: %s -> %s (%s)", self.peer_id, old, new, reason)
        if new not in _TERMINAL:
            return
        error = TransportError(f"{self.peer_id}: link {new} ({reason})")
        setup: list[asyncio.Future[Any]] = [self._opened, self._offer, self._answer]
        for fut in [*self._pending.values(), *setup]:
            if not fut.done():
                fut.set_exception(error)
        for fut in setup:
            if not fut.cancelled():  # the runner's timeout cancels the one it awaited
                fut.exception()  # retrieved: nobody need be waiting for these any more
        for inc in self._incoming.values():
            self._forget_timer(inc)
            self._transport.stats.reject("incomplete")  # the link ended mid-transfer
        self._incoming.clear()  # anything half-received is dropped, never handed up
        self._low.set()
        if self._runner is not None and self._runner is not asyncio.current_task():
            self._runner.cancel()
        self._closer = self._transport._closing(self.pc.close(), f"webrtc-close-{self.peer_id}")

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "failed":
            self._set_state(LinkState.FAILED, "ICE/DTLS failed")
        elif state == "closed":
            self._set_state(LinkState.CLOSED, "peer connection closed")

    def _on_open(self) -> None:
        if not self._opened.done():
            self._opened.set_result(None)

    @property
    def is_open(self) -> bool:
        return self.state is LinkState.OPEN

    @property
    def is_done(self) -> bool:
        return self.state in _TERMINAL

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "connect_s": self.connect_s, "state": str(self.state)}

    # ---- connecting ------------------------------------------------------------------------

    def start(self) -> None:
        self._set_state(LinkState.CONNECTING, "offering" if self.offerer else "answering")
        self._runner = self._loop.create_task(self._run(), name=f"webrtc-connect-{self.peer_id}")

    def give_offer(self, data: dict[str, Any]) -> bool:
        if self._offer.done():
            return False
        stage = data.get("stage", "any")
        if (stage in ("direct", "any") and stage != self.stage
                and self.pc.localDescription is None):
            self.stage = stage  # nothing gathered yet: just use the offer's configuration
            self.pc.remove_all_listeners()
            self.channel.remove_all_listeners()
            self._transport._closing(self.pc.close(), f"webrtc-unused-{self.peer_id}")
            self.pc = RTCPeerConnection(self._transport.configuration_for(stage))
            self.channel = self._make_channel()
            self.pc.on("connectionstatechange", self._on_connection_state)
        self._offer.set_result(data)
        return True

    def give_answer(self, data: dict[str, Any]) -> bool:
        if self._answer.done() or self.pc.signalingState != "have-local-offer":
            return False
        self._answer.set_result(data)
        return True

    @property
    def has_offer(self) -> bool:
        return self._offer.done()

    async def _signal(self, kind: str, data: dict[str, Any]) -> None:
        await self._transport._send_signal(self.peer_id, kind, data)

    def _description(self) -> dict[str, Any]:
        desc = self.pc.localDescription
        return {"sdp": desc.sdp, "type": desc.type, "stage": self.stage}

    async def _offer_and_open(self) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        await self._signal("offer", self._description())
        answer = await self._answer
        await self.pc.setRemoteDescription(
            RTCSessionDescription(sdp=answer["sdp"], type=answer["type"])
        )
        await asyncio.shield(self._opened)

    async def _run(self) -> None:
        try:
            async with asyncio.timeout(self._transport.connect_timeout):
                if self.offerer and self.stage == "direct":
                    try:
                        async with asyncio.timeout(self._transport.direct_timeout):
                            await self._offer_and_open()
                    except TimeoutError:
                        log.info("link %s: no direct path within %.1f s, trying the relay too",
                                 self.peer_id, self._transport.direct_timeout)
                        await self._restage("any")
                if self.offerer and not self._opened.done():
                    await self._offer_and_open()
                elif not self.offerer:
                    if not self._offer.done():
                        await self._signal("hello", {})
                    offer = await self._offer
                    await self.pc.setRemoteDescription(
                        RTCSessionDescription(sdp=offer["sdp"], type=offer["type"])
                    )
                    await self.pc.setLocalDescription(await self.pc.createAnswer())
                    await self._signal("answer", self._description())
                await self._opened
        except TimeoutError:
            self._set_state(
                LinkState.FAILED, f"not open within {self._transport.connect_timeout:.1f} s"
            )
            return
        except TransportError:
            return  # the link ended meanwhile; _set_state said why
        except Exception as exc:  # a bad SDP, a failing send_signal...
            self._set_state(LinkState.FAILED, f"{type(exc).__name__}: {exc}")
            return
        self.connect_s = time.monotonic() - self._started
        self.kind = selected_kind(self.pc)
        self._set_state(LinkState.OPEN, f"{self.kind} in {self.connect_s:.2f} s")

    async def wait_open(self) -> None:
        await asyncio.shield(self._opened)
        # _opened resolves on the channel's open event; _run sets OPEN right after
        while self.state is LinkState.CONNECTING and self._runner is not None:
            await asyncio.shield(self._runner)
        if self.state is not LinkState.OPEN:
            raise TransportError(f"{self.peer_id}: link {self.state}")

    async def aclose(self, reason: str = "closed") -> None:
        self._set_state(LinkState.CLOSED, reason)
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._closer is not None:
            await asyncio.gather(self._closer, return_exceptions=True)

    # ---- sending ---------------------------------------------------------------------------

    def _send_raw(self, message: bytes) -> None:
        if self.state is not LinkState.OPEN or self.channel.readyState != "open":
            raise TransportError(f"{self.peer_id}: link {self.state}")
        self.channel.send(message)

    async def _drain(self) -> None:
        while self.channel.bufferedAmount > HIGH_WATER:
            if self.state is not LinkState.OPEN:
                raise TransportError(f"{self.peer_id}: link {self.state}")
            self._low.clear()
            await self._low.wait()

    def _alloc_tid(self) -> int:
        tid = self._next_tid
        self._next_tid = (self._next_tid + 1) & 0xFFFFFFFF
        return tid

    async def send_message(self, frames: Frames, *, reply: bool, tid: int | None = None) -> None:
        """Send one transfer, paced. Raises TransportError."""
        if tid is None:
            tid = self._alloc_tid()
        sent = 0
        done = False
        self._sending.add(tid)
        try:
            for message in iter_chunks(tid, frames, FLAG_REPLY if reply else 0):
                if tid in self._refused:
                    raise TransportError(f"{self.peer_id}: refused ({self._refused[tid]})")
                await self._drain()
                self._send_raw(message)
                sent += len(message)
            done = True
        finally:
            self._sending.discard(tid)
            self._refused.pop(tid, None)
            stats = self._transport.stats
            stats.bytes_out += sent
            if done:
                stats.messages_out += 1
            elif sent and self.is_open:
                self.channel.send(control_chunk(FLAG_ABORT, tid))

    async def request(
        self, frames: Frames, request_id: str
    ) -> tuple[dict[str, Any], list[memoryview]]:
        """Send a request and wait for the reply carrying ``request_id`` (no timeout here)."""
        if request_id in self._pending:
            raise TransportError(f"request {request_id!r} is already in flight")
        async with self._slots:
            fut: asyncio.Future[tuple[dict[str, Any], list[memoryview]]]
            fut = self._loop.create_future()
            self._pending[request_id] = fut
            tid = self._alloc_tid()
            self._outgoing[tid] = request_id
            try:
                await self.send_message(frames, reply=False, tid=tid)
                return await fut
            finally:
                self._outgoing.pop(tid, None)
                self._pending.pop(request_id, None)
                if fut.done() and not fut.cancelled():
                    fut.exception()  # the link ended while we were still sending

    # ---- receiving -------------------------------------------------------------------------

    def _on_message(self, message: bytes | str) -> None:
        if self.is_done:
            return
        if not isinstance(message, bytes):
            self._reject(None, "bad_chunk", "text message on the data channel")
            return
        try:
            self._on_chunk(message)
        except ChunkError as exc:
            self._reject(None, exc.reason, str(exc))
        except _Refused:
            pass  # counted, logged and reported by _begin

    def _reject(self, inc: _Incoming | None, reason: str, message: str) -> None:
        """Count and log a refused chunk or transfer; free the transfer and tell the sender."""
        self._transport.stats.reject(reason)
        if not message.startswith(f"{reason}: "):  # the log line names the counted reason
            message = f"{reason}: {message}"
        log.warning("link %s: rejected %s: %s", self.peer_id,
                    f"transfer {inc.transfer_id}" if inc else "a chunk", message)
        if inc is None:
            return
        self._forget(inc)
        if self.is_open:
            self.channel.send(control_chunk(FLAG_REJECT, inc.transfer_id, reason))

    def _forget(self, inc: _Incoming) -> None:
        """Drop a transfer that is being reassembled and free its memory."""
        if self._incoming.pop(inc.transfer_id, None) is not None and not inc.reply:
            self._requests_active -= 1
        self._forget_timer(inc)
        inc.buf = bytearray()

    def _on_chunk(self, message: bytes) -> None:
        head = ChunkHeader.unpack(message)
        tid = head.transfer_id
        if head.flags == FLAG_REJECT:
            reason = message[CHUNK_HEADER.size :].decode("ascii", "replace")
            request_id = self._outgoing.get(tid)
            log.info("link %s: our transfer %d was refused: %s", self.peer_id, tid, reason)
            if tid in self._sending:
                self._refused[tid] = reason
            fut = self._pending.get(request_id) if request_id is not None else None
            if fut is not None and not fut.done():
                fut.set_exception(TransportError(f"{self.peer_id}: refused ({reason})"))
            return
        inc = self._incoming.get(tid)
        if head.flags == FLAG_ABORT:
            if inc is not None:
                self._transport.stats.reject("aborted")
                log.info("link %s: transfer %d aborted by the sender", self.peer_id, tid)
                self._forget(inc)
            return
        if inc is None:
            if head.index != 0 and tid <= self._max_started:
                log.debug("link %s: dropping a chunk of ended transfer %d", self.peer_id, tid)
                return
            inc = self._begin(head)
        now = time.monotonic()
        if (head.index != inc.next_index or head.count != inc.count
                or head.frame_count != inc.frame_count or head.total_len != inc.total_len):
            self._reject(inc, "bad_chunk", f"chunk {head.index}/{head.count} out of sequence")
            return
        data = memoryview(message)[CHUNK_HEADER.size :]
        expected = min(CHUNK_SIZE, inc.total_len - head.index * CHUNK_SIZE)
        if len(data) != expected:
            self._reject(inc, "bad_chunk",
                         f"chunk {head.index}: {len(data)} bytes, want {expected}")
            return
        inc.buf += data
        inc.next_index += 1
        inc.last = now
        if inc.next_index == inc.count:
            self._forget_timer(inc)
            self._complete(inc)

    def _begin(self, head: ChunkHeader) -> _Incoming:
        """Check the first chunk of a new transfer; raises ChunkError if it is refused."""
        tid = head.transfer_id
        limits = self._transport.limits
        max_frames = limits.max_arrays + 3
        if head.index != 0:
            raise ChunkError("bad_chunk", f"transfer {tid} starts at chunk {head.index}")
        self._max_started = max(self._max_started, tid)
        reply = head.flags == FLAG_REPLY
        inc = _Incoming(tid, reply, head.count, head.frame_count, head.total_len,
                        time.monotonic(), time.monotonic(), bytearray())
        max_total = limits.max_total_bytes + limits.max_header_bytes + _FRAME_LEN * max_frames
        problem: tuple[str, str] | None = None
        if not 1 <= head.frame_count <= max_frames:
            problem = ("too_many_parts", f"{head.frame_count} frames (1..{max_frames})")
        elif head.total_len > max_total:
            problem = ("too_large", f"{head.total_len} bytes > {max_total}")
        elif (head.total_len < _FRAME_LEN * head.frame_count
              or head.count != chunk_count(head.total_len)):
            problem = ("bad_chunk", f"{head.count} chunks for {head.total_len} bytes")
        elif reply and sum(i.reply for i in self._incoming.values()) >= len(self._pending):
            problem = ("unexpected_reply", "more replies than requests in flight")
        elif not reply and self._requests_active >= self._transport.max_transfers:
            problem = ("too_many_transfers", f"{self._requests_active} requests in progress")
        if problem is not None:
            self._reject(inc, *problem)  # not registered yet: only counts and notifies
            raise _Refused
        self._incoming[tid] = inc
        if not reply:
            self._requests_active += 1
        self._arm(inc)
        return inc

    def _arm(self, inc: _Incoming) -> None:
        t = self._transport
        deadline = min(inc.started + t.transfer_timeout, inc.last + t.chunk_idle_timeout)
        inc.timer = self._loop.call_at(
            self._loop.time() + max(0.0, deadline - time.monotonic()), self._expire, inc
        )

    def _forget_timer(self, inc: _Incoming) -> None:
        if inc.timer is not None:
            inc.timer.cancel()
            inc.timer = None

    def _expire(self, inc: _Incoming) -> None:
        if self._incoming.get(inc.transfer_id) is not inc:
            return
        t = self._transport
        now = time.monotonic()
        if now - inc.started >= t.transfer_timeout:
            self._reject(inc, "transfer_timeout",
                         f"not complete within {t.transfer_timeout:.1f} s")
        elif now - inc.last >= t.chunk_idle_timeout:
            self._reject(inc, "chunk_timeout",
                         f"no chunk for {t.chunk_idle_timeout:.1f} s "
                         f"({inc.next_index}/{inc.count} received)")
        else:
            self._arm(inc)

    def _complete(self, inc: _Incoming) -> None:
        buf = inc.buf
        n = inc.frame_count
        lengths = struct.unpack_from(f"!{n}Q", buf, 0)
        if _FRAME_LEN * n + sum(lengths) != len(buf):
            self._reject(inc, "bad_frames", "frame lengths do not add up to the transfer")
            return
        # A request keeps its slot (_requests_active) until it has been handled.
        self._incoming.pop(inc.transfer_id, None)
        view = memoryview(buf)
        frames: list[memoryview] = []
        pos = _FRAME_LEN * n
        for length in lengths:
            frames.append(view[pos : pos + length])
            pos += length
        stats = self._transport.stats
        stats.messages_in += 1
        stats.bytes_in += len(buf)
        if inc.reply:
            self._deliver_reply(frames)
        else:
            self._transport._spawn(self._serve(frames), f"webrtc-serve-{self.peer_id}")

    def _deliver_reply(self, frames: list[memoryview]) -> None:
        try:
            header = decode_header(frames[0], self._transport.limits)
        except WireError as exc:
            self._transport.stats.reject(exc.reason)
            log.warning("link %s: rejected a reply: %s", self.peer_id, exc)
            return
        request_id = header.get("request_id")
        fut = self._pending.get(request_id) if isinstance(request_id, str) else None
        if fut is None or fut.done():
            log.debug("link %s: dropping a stale reply", self.peer_id)
            return
        fut.set_result((header, frames[1:]))

    async def _serve(self, frames: list[memoryview]) -> None:
        request_id: Any = None
        reply: Frames | None
        try:
            try:
                header = decode_header(frames[0], self._transport.limits)
                request_id = header.get("request_id")
                reply = await self._transport._handler(header, frames[1:], self.peer_id)
            except WireError as exc:
                self._transport.stats.reject(exc.reason)
                log.warning("link %s: rejected a message: %s", self.peer_id, exc)
                reply = [nack_for(exc, request_id, frames[0], self._transport.limits)]
        finally:
            self._requests_active -= 1
        if reply is None:
            return
        try:
            await self.send_message(reply, reply=True)
        except TransportError as exc:
            log.info("link %s: could not reply: %s", self.peer_id, exc)


class _Refused(Exception):
    """Internal: the first chunk of a transfer was refused (already counted and logged)."""


class WebRtcTransport:
    """Request/reply over WebRTC data channels, one link per remote peer.

    ``send_signal(peer_id, kind, data)`` delivers a signaling message to a peer (through the
    rendezvous); incoming ones are fed to :meth:`on_signal`. ``ice_servers`` is always explicit
    (an empty list: host candidates only); ``ice_transport_policy="relay"`` forces TURN.
    """

    def __init__(
        self,
        identity: Identity,
        ice_servers: list[dict[str, Any]],
        handler: Handler,
        limits: Limits = Limits(),
        *,
        send_signal: SendSignal,
        ice_transport_policy: str = "all",
        connect_timeout: float = CONNECT_TIMEOUT,
        direct_timeout: float = DIRECT_TIMEOUT,
        transfer_timeout: float = TRANSFER_TIMEOUT,
        chunk_idle_timeout: float = CHUNK_IDLE_TIMEOUT,
        max_transfers: int = MAX_TRANSFERS,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.limits = limits
        self.ice_servers = list(ice_servers)
        self.ice_transport_policy = ice_transport_policy
        self.configuration = ice_configuration(ice_servers, ice_transport_policy)
        self.first_stage = (
            "direct" if ice_transport_policy == "all" and has_turn(ice_servers) else "any"
        )
        self.direct_timeout = min(direct_timeout, connect_timeout / 3)
        self.connect_timeout = connect_timeout
        self.transfer_timeout = transfer_timeout
        self.chunk_idle_timeout = chunk_idle_timeout
        self.max_transfers = max_transfers
        self.stats = TransportStats()
        self._handler = handler
        self._send_signal = send_signal
        self._links: dict[str, WebRtcLink] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # handlers: cancelled by close()
        self._closers: set[asyncio.Task[None]] = set()  # pc.close(): awaited by close()
        self._closed = False

    def configuration_for(self, stage: str) -> RTCConfiguration:
        """``direct``: STUN only; ``any``: every configured server (TURN included)."""
        return ice_configuration(self.ice_servers, self.ice_transport_policy,
                                 direct_only=stage == "direct")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _closing(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._closers.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._closers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def _new_link(self, peer_id: str, *, reason: str) -> WebRtcLink:
        old = self._links.get(peer_id)
        if old is not None:
            old._set_state(LinkState.CLOSED, f"replaced: {reason}")
        link = WebRtcLink(self, peer_id, offerer=self.peer_id < peer_id)
        self._links[peer_id] = link
        return link

    # ---- signaling -------------------------------------------------------------------------

    async def on_signal(self, from_peer: str, kind: str, data: dict[str, Any]) -> None:
        """A signaling message from ``from_peer`` (as relayed by the rendezvous)."""
        if self._closed or from_peer == self.peer_id:
            return
        we_offer = self.peer_id < from_peer
        link = self._links.get(from_peer)
        if kind == "hello" and we_offer:
            if link is None or link.is_done or link.is_open:
                self._new_link(from_peer, reason="peer asked for a new offer").start()
            return
        if kind == "offer" and not we_offer and _is_sdp(data, "offer"):
            if link is None or link.is_done or link.is_open or link.has_offer:
                link = self._new_link(from_peer, reason="peer sent a new offer")
                link.give_offer(data)
                link.start()
            else:
                link.give_offer(data)
            return
        if kind == "answer" and we_offer and _is_sdp(data, "answer"):
            if link is None or not link.give_answer(data):
                log.info("ignoring a stale answer from %s", from_peer)
            return
        log.warning("ignoring signal %r from %s", kind[:20], from_peer)

    # ---- links -----------------------------------------------------------------------------

    async def connect(self, peer_id: str) -> WebRtcLink:
        """The open link to ``peer_id``, making it if needed; raises TransportError.

        Concurrent callers share one attempt; the attempt is bounded by ``connect_timeout``.
        """
        if self._closed:
            raise TransportError("transport closed")
        if peer_id == self.peer_id:
            raise TransportError("cannot connect to ourselves")
        for _ in range(2):  # a second time if the remote replaced the link meanwhile
            link = self._links.get(peer_id)
            if link is None or link.is_done:
                link = self._new_link(peer_id, reason="connect")
                link.start()
            try:
                await link.wait_open()
                return link
            except TransportError:
                current = self._links.get(peer_id)
                if current is link or current is None or current.is_done:
                    raise
        raise TransportError(f"{peer_id}: link replaced twice while connecting")

    def link_info(self, peer_id: str) -> dict[str, Any] | None:
        """``{"kind", "connect_s", "state"}`` of the link to ``peer_id``; None if there is none."""
        link = self._links.get(peer_id)
        return link.info() if link is not None else None

    async def forget(self, peer_id: str) -> None:
        """Close the link to a peer that left."""
        link = self._links.pop(peer_id, None)
        if link is not None:
            await link.aclose("peer left")

    async def request(
        self, peer_id: str, frames: Frames, request_id: str, timeout: float
    ) -> tuple[dict[str, Any], list[memoryview]]:
        """Send ``frames`` to ``peer_id`` and wait for the reply carrying ``request_id``.

        ``timeout`` bounds the whole exchange (connecting, sending, the remote's work, the
        reply). Raises TransportError on timeout, refusal or a link that ends; a ``nack`` is
        returned as a header like any other reply.
        """
        if self._closed:
            raise TransportError("transport closed")
        try:
            async with asyncio.timeout(timeout):
                link = await self.connect(peer_id)
                return await link.request(frames, request_id)
        except TimeoutError:
            raise TransportError(f"{peer_id}: no reply within {timeout:.1f} s") from None

    async def close(self) -> None:
        """Close every link and cancel every task; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        links = list(self._links.values())
        self._links.clear()
        await asyncio.gather(*(link.aclose("transport closed") for link in links),
                             return_exceptions=True)
        # pc.close() of links that ended or were replaced earlier
        while self._closers:
            await asyncio.gather(*list(self._closers), return_exceptions=True)


def _is_sdp(data: Any, kind: str) -> bool:
    return (isinstance(data, dict) and data.get("type") == kind
            and isinstance(data.get("sdp"), str))
