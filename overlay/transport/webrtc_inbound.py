"""The receiving side of a WebRTC link: chunks into transfers, deadlines, refusals, serving.

A first chunk is checked against the limits before anything is allocated
(overlay.transport.chunks); a transfer is given up when it stalls (``chunk_idle_timeout``) or
crawls below ``min_rate``, or when its link ends (counted and logged as ``incomplete``); every
refusal is counted by reason, logged and reported to the sender (``REJECT``). A complete
request is served (overlay.transport.serving) and its reply sent back on the lane it came
on; a complete reply resolves the request waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from overlay.errors import TransportError, WireError
from overlay.transport.chunks import (
    CHUNK_HEADER,
    Assembly,
    ChunkError,
    ChunkFlag,
    ChunkHeader,
    check_first_chunk,
    control_chunk,
    control_reason,
)
from overlay.transport.serving import INCOMPLETE, serve_request
from overlay.wire import decode_header

if TYPE_CHECKING:
    from overlay.transport.webrtc_lane import Lane
    from overlay.transport.webrtc_link import WebRtcLink

log = logging.getLogger("overlay.transport.webrtc_link")  # one logger for the link's story


class Inbound:
    """What one link receives. Owned by its :class:`WebRtcLink`."""

    def __init__(self, link: WebRtcLink) -> None:
        self.link = link
        self.transport = link._transport
        self.incoming: dict[int, Assembly] = {}
        self.timers: dict[int, asyncio.TimerHandle] = {}
        self.max_started = -1
        self.requests_active = 0

    def drop_all(self) -> None:
        """The link ended: every transfer still being received is dropped, counted, logged."""
        for inc in list(self.incoming.values()):
            log.info("link %s: rejected transfer %d: %s: the link ended after %d/%d chunks",
                     self.link.peer_id, inc.transfer_id, INCOMPLETE, inc.next_index, inc.count)
            self.forget(inc)
            self.transport.stats.reject(INCOMPLETE)  # the link ended mid-transfer

    def reject(self, tid: int | None, reason: str, message: str,
                lane: Lane | None = None) -> None:
        """Count and log a refused chunk or transfer; free the transfer and tell the sender."""
        self.transport.stats.reject(reason)
        if not message.startswith(f"{reason}: "):  # the log line names the counted reason
            message = f"{reason}: {message}"
        log.warning("link %s: rejected %s: %s", self.link.peer_id,
                    f"transfer {tid}" if tid is not None else "a chunk", message)
        if tid is None:
            return
        inc = self.incoming.get(tid)
        if inc is not None:
            self.forget(inc)
        self.control(lane, control_chunk(ChunkFlag.REJECT, tid, reason))

    def on_refusal(self, tid: int, message: bytes) -> None:
        """The remote refused our transfer ``tid``: fail its request at once."""
        reason = control_reason(message)
        request_id = self.link._outgoing.get(tid)
        log.info("link %s: our transfer %d was refused: %s", self.link.peer_id, tid, reason)
        if tid in self.link._sending:
            self.link._refused[tid] = reason
        fut = self.link._pending.get(request_id) if request_id is not None else None
        if fut is not None and not fut.done():
            fut.set_exception(TransportError(f"{self.link.peer_id}: refused ({reason})"))

    def control(self, lane: Lane | None, message: bytes) -> None:
        """Send a control chunk back on ``lane`` (or any open lane) if we can."""
        target = lane if lane is not None and lane.is_open else next(
            (x for x in self.link.lanes if x.is_open), None)
        if target is not None and self.link.is_open:
            target.send(message)

    def forget(self, inc: Assembly) -> None:
        """Drop a transfer that is being reassembled and free its memory."""
        if self.incoming.pop(inc.transfer_id, None) is not None and not inc.reply:
            self.requests_active -= 1
        timer = self.timers.pop(inc.transfer_id, None)
        if timer is not None:
            timer.cancel()
        inc.free()

    def on_chunk(self, message: bytes, lane: Lane | None) -> None:
        head = ChunkHeader.unpack(message)
        tid = head.transfer_id
        if head.flags == ChunkFlag.PING:
            return
        if head.flags == ChunkFlag.REJECT:
            self.on_refusal(tid, message)
            return
        inc = self.incoming.get(tid)
        if head.flags == ChunkFlag.ABORT:
            if inc is not None:
                self.transport.stats.reject("aborted")
                log.info("link %s: transfer %d aborted by the sender", self.link.peer_id, tid)
                self.forget(inc)
            return
        if inc is None:
            if head.index != 0 and tid <= self.max_started:
                log.debug("link %s: dropping a chunk of ended transfer %d", self.link.peer_id, tid)
                return
            inc = self._begin(head, lane)
            if inc is None:
                return
        try:
            done = inc.add(head, memoryview(message)[CHUNK_HEADER.size :], time.monotonic())
        except ChunkError as exc:
            self.reject(tid, exc.reason, str(exc), lane)
            return
        if done:
            self._complete(inc, lane)

    def _begin(self, head: ChunkHeader, lane: Lane | None) -> Assembly | None:
        """The assembly of a new transfer, or None if its first chunk is refused (counted,
        logged and reported to the sender); ChunkError for a transfer that starts midway."""
        tid = head.transfer_id
        if head.index != 0:
            raise ChunkError("bad_chunk", f"transfer {tid} starts at chunk {head.index}")
        self.max_started = max(self.max_started, tid)
        try:
            check_first_chunk(head, self.transport.limits)
            if head.is_reply and sum(i.reply for i in self.incoming.values()) >= len(
                    self.link._pending):
                raise ChunkError("unexpected_reply", "more replies than requests in flight")
            if not head.is_reply and self.requests_active >= self.transport.max_transfers:
                raise ChunkError("too_many_transfers",
                                 f"{self.requests_active} requests in progress")
        except ChunkError as exc:
            self.reject(tid, exc.reason, str(exc), lane)  # not registered yet
            return None
        inc = Assembly.allocate(head, time.monotonic())
        self.incoming[tid] = inc
        if not inc.reply:
            self.requests_active += 1
        self._arm(inc)
        return inc

    def _arm(self, inc: Assembly) -> None:
        t = self.transport
        deadline = inc.deadline(t.chunk_idle_timeout, t.min_rate)
        self.timers[inc.transfer_id] = self.link._loop.call_at(
            self.link._loop.time() + max(0.0, deadline - time.monotonic()), self._expire, inc
        )

    def _expire(self, inc: Assembly) -> None:
        if self.incoming.get(inc.transfer_id) is not inc:
            return
        t = self.transport
        problem = inc.overdue(time.monotonic(), t.chunk_idle_timeout, t.min_rate)
        if problem is None:
            self._arm(inc)
        else:
            self.reject(inc.transfer_id, problem.reason, str(problem))

    def _complete(self, inc: Assembly, lane: Lane | None) -> None:
        timer = self.timers.pop(inc.transfer_id, None)
        if timer is not None:
            timer.cancel()
        try:
            frames = inc.frames()
        except ChunkError as exc:
            self.reject(inc.transfer_id, exc.reason, str(exc), lane)
            return
        # A request keeps its slot (_requests_active) until it has been handled.
        self.incoming.pop(inc.transfer_id, None)
        stats = self.transport.stats
        stats.messages_in += 1
        stats.bytes_in += inc.total_len
        if inc.reply:
            self._deliver_reply(frames)
        else:
            self.transport.tasks.spawn(self._serve(frames, lane),
                                        f"webrtc-serve-{self.link.peer_id}")

    def _deliver_reply(self, frames: list[memoryview]) -> None:
        try:
            header = decode_header(frames[0], self.transport.limits)
        except WireError as exc:
            self.transport.stats.reject(exc.reason)
            log.warning("link %s: rejected a reply: %s", self.link.peer_id, exc)
            return
        request_id = header.get("request_id")
        fut = self.link._pending.get(request_id) if isinstance(request_id, str) else None
        if fut is None or fut.done():
            log.debug("link %s: dropping a stale reply", self.link.peer_id)
            return
        fut.set_result((header, frames[1:]))

    async def _serve(self, frames: list[memoryview], lane: Lane | None) -> None:
        t = self.transport
        try:
            reply = await serve_request(frames[0], frames[1:], self.link.peer_id, handler=t.handler,
                                        limits=t.limits, stats=t.stats,
                                        log_prefix=f"link {self.link.peer_id}: ")
        finally:
            self.requests_active -= 1
        if reply is None:
            return
        try:
            await self.link.send_message(reply, reply=True, lane=lane)
        except TransportError as exc:
            log.info("link %s: could not reply: %s", self.link.peer_id, exc)

    def progress(self) -> float | None:
        """When a chunk of an incoming request last arrived (monotonic), None if none is
        being received."""
        times = [inc.last for inc in self.incoming.values() if not inc.reply]
        return max(times) if times else None
