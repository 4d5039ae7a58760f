"""One WebRTC link: an RTCPeerConnection and its data channel to one remote peer (aiortc).

Its life is a state machine (:class:`LinkState`, allowed transitions in :data:`TRANSITIONS`,
changed only by :meth:`WebRtcLink._set_state`). The smaller peer id offers, staging ICE
(overlay.transport.ice) within the connect timeout. Over the open channel a message is a
transfer of chunks (overlay.transport.chunks): the receiver checks a first chunk before it
keeps anything, bounds each transfer in time (``transfer_timeout``, ``chunk_idle_timeout``)
and reports a refused one to its sender (``REJECT``), whose request then fails at once. The
sender paces itself by ``bufferedAmount`` (:data:`HIGH_WATER` / :data:`LOW_WATER`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import TYPE_CHECKING, Any

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription

from overlay.errors import TransportError, WireError
from overlay.protocol import SignalKind
from overlay.transport.base import Frames, LinkKind, Reply
from overlay.transport.chunks import (
    CHUNK_HEADER,
    Assembly,
    ChunkError,
    ChunkFlag,
    ChunkHeader,
    check_first_chunk,
    control_chunk,
    control_reason,
    iter_chunks,
)
from overlay.transport.ice import IceStage, selected_kind
from overlay.transport.serving import INCOMPLETE, serve_request
from overlay.wire import decode_header

if TYPE_CHECKING:
    from overlay.transport.webrtc import WebRtcTransport

log = logging.getLogger(__name__)

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


TRANSITIONS: dict[LinkState, frozenset[LinkState]] = {
    LinkState.NEW: frozenset({LinkState.CONNECTING, LinkState.CLOSED, LinkState.FAILED}),
    LinkState.CONNECTING: frozenset({LinkState.OPEN, LinkState.CLOSED, LinkState.FAILED}),
    LinkState.OPEN: frozenset({LinkState.CLOSED, LinkState.FAILED}),
    LinkState.CLOSED: frozenset(),
    LinkState.FAILED: frozenset(),
}
TERMINAL = frozenset({LinkState.CLOSED, LinkState.FAILED})


class WebRtcLink:
    """The connection to one remote peer. Made and owned by :class:`WebRtcTransport`."""

    def __init__(self, transport: WebRtcTransport, peer_id: str, *, offerer: bool) -> None:
        self.peer_id = peer_id
        self.offerer = offerer
        self.stage = transport.first_stage if offerer else IceStage.ANY  # answerer: the offer's
        self.state = LinkState.NEW
        self.kind: LinkKind | None = None
        self.connect_s: float | None = None
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._started = time.monotonic()
        self._opened: asyncio.Future[None] = self._loop.create_future()
        self._offer: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._answer: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._low = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[Any] | None = None
        # sending
        self._next_tid = 0
        self._slots = asyncio.Semaphore(transport.max_transfers)
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._outgoing: dict[int, str] = {}  # our transfer id -> request_id, until replied
        self._sending: set[int] = set()  # our transfer ids being sent
        self._refused: dict[int, str] = {}  # of those, the ones the remote refused, and why
        # receiving
        self._incoming: dict[int, Assembly] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._max_started = -1
        self._requests_active = 0
        self._new_pc(self.stage)

    def _new_pc(self, stage: IceStage) -> None:
        self.stage = stage
        self.pc: RTCPeerConnection = RTCPeerConnection(self._transport.configuration_for(stage))
        self.pc.on("connectionstatechange", self._on_connection_state)
        channel = self.pc.createDataChannel("peerlearn", negotiated=True, id=0, ordered=True)
        self.channel: RTCDataChannel = channel
        channel.bufferedAmountLowThreshold = LOW_WATER
        channel.on("open", self._on_open)
        channel.on("close", lambda: self._set_state(LinkState.CLOSED, "channel closed"))
        channel.on("message", self._on_message)
        channel.on("bufferedamountlow", self._low.set)

    def _replace_pc(self, stage: IceStage) -> RTCPeerConnection:
        """A fresh peer connection and channel for ``stage``; returns the old connection."""
        old = self.pc
        old.remove_all_listeners()
        self.channel.remove_all_listeners()
        self._new_pc(stage)
        return old

    # ---- state -----------------------------------------------------------------------------
    def _set_state(self, new: LinkState, reason: str) -> None:
        """The only place where the link changes state."""
        old = self.state
        if new is old or new not in TRANSITIONS[old]:
            return
        self.state = new
        level = logging.INFO if new is not LinkState.FAILED else logging.WARNING
        log.log(level, "link %s: %s -> %s (%s)", self.peer_id, old, new, reason)
        if new not in TERMINAL:
            return
        error = TransportError(f"{self.peer_id}: link {new} ({reason})")
        setup: list[asyncio.Future[Any]] = [self._opened, self._offer, self._answer]
        for fut in [*self._pending.values(), *setup]:
            if not fut.done():
                fut.set_exception(error)
        for fut in setup:
            if not fut.cancelled():  # the runner's timeout cancels the one it awaited
                fut.exception()  # retrieved: nobody need be waiting for these any more
        for inc in list(self._incoming.values()):
            self._forget(inc)
            self._transport.stats.reject(INCOMPLETE)  # the link ended mid-transfer
        self._low.set()
        if self._runner is not None and self._runner is not asyncio.current_task():
            self._runner.cancel()
        self._closer = self._transport.tasks.spawn_closer(
            self.pc.close(), f"webrtc-close-{self.peer_id}"
        )

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
        return self.state in TERMINAL

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "connect_s": self.connect_s, "state": str(self.state)}

    # ---- connecting ------------------------------------------------------------------------
    def start(self) -> None:
        self._set_state(LinkState.CONNECTING, "offering" if self.offerer else "answering")
        self._runner = self._transport.tasks.spawn(self._run(), f"webrtc-connect-{self.peer_id}")

    def give_offer(self, data: dict[str, Any]) -> bool:
        if self._offer.done():
            return False
        try:
            stage = IceStage(data.get("stage", IceStage.ANY))
        except ValueError:
            stage = self.stage
        if stage is not self.stage and self.pc.localDescription is None:
            # nothing gathered yet: just use the offer's configuration
            old = self._replace_pc(stage)
            self._transport.tasks.spawn_closer(old.close(), f"webrtc-unused-{self.peer_id}")
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

    async def _signal(self, kind: SignalKind, data: dict[str, Any]) -> None:
        await self._transport.send_signal(self.peer_id, kind, data)

    def _description(self) -> dict[str, Any]:
        desc = self.pc.localDescription
        return {"sdp": desc.sdp, "type": desc.type, "stage": str(self.stage)}

    async def _offer_and_open(self) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        await self._signal(SignalKind.OFFER, self._description())
        answer = await self._answer
        await self.pc.setRemoteDescription(
            RTCSessionDescription(sdp=answer["sdp"], type=answer["type"])
        )
        await asyncio.shield(self._opened)

    async def _answer_and_open(self) -> None:
        if not self._offer.done():
            await self._signal(SignalKind.HELLO, {})
        offer = await self._offer
        await self.pc.setRemoteDescription(
            RTCSessionDescription(sdp=offer["sdp"], type=offer["type"])
        )
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        await self._signal(SignalKind.ANSWER, self._description())

    async def _run(self) -> None:
        t = self._transport
        try:
            async with asyncio.timeout(t.connect_timeout):
                if self.offerer and self.stage is IceStage.DIRECT:
                    try:
                        async with asyncio.timeout(t.direct_timeout):
                            await self._offer_and_open()
                    except TimeoutError:
                        log.info("link %s: no direct path within %.1f s, trying the relay too",
                                 self.peer_id, t.direct_timeout)
                        await self._replace_pc(IceStage.ANY).close()  # start over
                        self._answer = self._loop.create_future()
                if self.offerer and not self._opened.done():
                    await self._offer_and_open()
                elif not self.offerer:
                    await self._answer_and_open()
                await self._opened
        except TimeoutError:
            self._set_state(LinkState.FAILED, f"not open within {t.connect_timeout:.1f} s")
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
            for message in iter_chunks(tid, frames, ChunkFlag.REPLY if reply else 0):
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
                self.channel.send(control_chunk(ChunkFlag.ABORT, tid))

    async def request(self, frames: Frames, request_id: str) -> Reply:
        """Send a request and wait for the reply carrying ``request_id`` (no timeout here)."""
        if request_id in self._pending:
            raise TransportError(f"request {request_id!r} is already in flight")
        async with self._slots:
            fut: asyncio.Future[Reply] = self._loop.create_future()
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
        try:
            if not isinstance(message, bytes):
                raise ChunkError("bad_chunk", "text message on the data channel")
            self._on_chunk(message)
        except ChunkError as exc:
            self._reject(None, exc.reason, str(exc))

    def _reject(self, tid: int | None, reason: str, message: str) -> None:
        """Count and log a refused chunk or transfer; free the transfer and tell the sender."""
        self._transport.stats.reject(reason)
        if not message.startswith(f"{reason}: "):  # the log line names the counted reason
            message = f"{reason}: {message}"
        log.warning("link %s: rejected %s: %s", self.peer_id,
                    f"transfer {tid}" if tid is not None else "a chunk", message)
        if tid is None:
            return
        inc = self._incoming.get(tid)
        if inc is not None:
            self._forget(inc)
        if self.is_open:
            self.channel.send(control_chunk(ChunkFlag.REJECT, tid, reason))

    def _forget(self, inc: Assembly) -> None:
        """Drop a transfer that is being reassembled and free its memory."""
        if self._incoming.pop(inc.transfer_id, None) is not None and not inc.reply:
            self._requests_active -= 1
        timer = self._timers.pop(inc.transfer_id, None)
        if timer is not None:
            timer.cancel()
        inc.free()

    def _on_refusal(self, tid: int, message: bytes) -> None:
        """The remote refused our transfer ``tid``: fail its request at once."""
        reason = control_reason(message)
        request_id = self._outgoing.get(tid)
        log.info("link %s: our transfer %d was refused: %s", self.peer_id, tid, reason)
        if tid in self._sending:
            self._refused[tid] = reason
        fut = self._pending.get(request_id) if request_id is not None else None
        if fut is not None and not fut.done():
            fut.set_exception(TransportError(f"{self.peer_id}: refused ({reason})"))

    def _on_chunk(self, message: bytes) -> None:
        head = ChunkHeader.unpack(message)
        tid = head.transfer_id
        if head.flags == ChunkFlag.REJECT:
            self._on_refusal(tid, message)
            return
        inc = self._incoming.get(tid)
        if head.flags == ChunkFlag.ABORT:
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
            if inc is None:
                return
        try:
            done = inc.add(head, memoryview(message)[CHUNK_HEADER.size :], time.monotonic())
        except ChunkError as exc:
            self._reject(tid, exc.reason, str(exc))
            return
        if done:
            self._complete(inc)

    def _begin(self, head: ChunkHeader) -> Assembly | None:
        """The assembly of a new transfer, or None if its first chunk is refused (counted,
        logged and reported to the sender); ChunkError for a transfer that starts midway."""
        tid = head.transfer_id
        if head.index != 0:
            raise ChunkError("bad_chunk", f"transfer {tid} starts at chunk {head.index}")
        self._max_started = max(self._max_started, tid)
        try:
            check_first_chunk(head, self._transport.limits)
            if head.is_reply and sum(i.reply for i in self._incoming.values()) >= len(
                    self._pending):
                raise ChunkError("unexpected_reply", "more replies than requests in flight")
            if not head.is_reply and self._requests_active >= self._transport.max_transfers:
                raise ChunkError("too_many_transfers",
                                 f"{self._requests_active} requests in progress")
        except ChunkError as exc:
            self._reject(tid, exc.reason, str(exc))  # not registered yet: counts and notifies
            return None
        inc = Assembly.allocate(head, time.monotonic())
        self._incoming[tid] = inc
        if not inc.reply:
            self._requests_active += 1
        self._arm(inc)
        return inc

    def _arm(self, inc: Assembly) -> None:
        t = self._transport
        deadline = inc.deadline(t.transfer_timeout, t.chunk_idle_timeout)
        self._timers[inc.transfer_id] = self._loop.call_at(
            self._loop.time() + max(0.0, deadline - time.monotonic()), self._expire, inc
        )

    def _expire(self, inc: Assembly) -> None:
        if self._incoming.get(inc.transfer_id) is not inc:
            return
        t = self._transport
        problem = inc.overdue(time.monotonic(), t.transfer_timeout, t.chunk_idle_timeout)
        if problem is None:
            self._arm(inc)
        else:
            self._reject(inc.transfer_id, problem.reason, str(problem))

    def _complete(self, inc: Assembly) -> None:
        timer = self._timers.pop(inc.transfer_id, None)
        if timer is not None:
            timer.cancel()
        try:
            frames = inc.frames()
        except ChunkError as exc:
            self._reject(inc.transfer_id, exc.reason, str(exc))
            return
        # A request keeps its slot (_requests_active) until it has been handled.
        self._incoming.pop(inc.transfer_id, None)
        stats = self._transport.stats
        stats.messages_in += 1
        stats.bytes_in += inc.total_len
        if inc.reply:
            self._deliver_reply(frames)
        else:
            self._transport.tasks.spawn(self._serve(frames), f"webrtc-serve-{self.peer_id}")

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
        t = self._transport
        try:
            reply = await serve_request(frames[0], frames[1:], self.peer_id, handler=t.handler,
                                        limits=t.limits, stats=t.stats,
                                        log_prefix=f"link {self.peer_id}: ")
        finally:
            self._requests_active -= 1
        if reply is None:
            return
        try:
            await self.send_message(reply, reply=True)
        except TransportError as exc:
            log.info("link %s: could not reply: %s", self.peer_id, exc)
