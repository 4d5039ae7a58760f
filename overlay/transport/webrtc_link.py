"""One WebRTC link: the lanes (peer connections, overlay.transport.webrtc_lane) to one peer.

Its life is a state machine (:class:`LinkState`, allowed transitions in :data:`TRANSITIONS`,
changed only by :meth:`WebRtcLink._set_state`). The smaller peer id offers:

- **Set-up races the relay against the direct path.** With a TURN server configured, the
  offerer first offers a ``direct`` attempt (STUN candidates only); if it is not open after
  ``relay_head_start`` seconds, an ``any`` attempt (TURN too) starts beside it and the first
  one open wins (the other is closed). A peer that needed the relay last time gets both at
  once. aioice nominates the first pair that works, so with TURN candidates in the first
  offer a punchable pair could end up relayed; the head start keeps it direct.
- **Lanes.** Once open, the offerer adds ``lanes - 1`` more peer connections of the same
  kind. Each transfer goes whole on the least loaded lane (its chunks stay in order), so
  concurrent transfers (the pieces of a model, overlay.pieces) stripe over independent SCTP
  windows: on links with delay or loss one aiortc association fills a fraction of the link.
- **Heartbeat.** Every ``heartbeat_interval`` each lane sends a ``PING`` chunk unless data is
  queued on it; a lane silent for ``dead_after`` seconds (no SCTP chunk from the remote and
  our send buffer not drained) fails the link: a vanished peer is noticed in seconds, not
  aiortc's ~30 s.

A message is a transfer of chunks (overlay.transport.chunks), paced by ``bufferedAmount`` per
lane; receiving, deadlines and refusals are overlay.transport.webrtc_inbound's.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import TYPE_CHECKING, Any

from aiortc import RTCDataChannel

from overlay.errors import TransportError
from overlay.protocol import SignalKind
from overlay.transport.base import Frames, LinkKind, Reply
from overlay.transport.chunks import (
    CHUNK_HEADER,
    Assembly,
    ChunkError,
    ChunkFlag,
    control_chunk,
    iter_chunks,
)
from overlay.transport.ice import IceStage
from overlay.transport.webrtc_inbound import Inbound
from overlay.transport.webrtc_lane import HIGH_WATER, LOW_WATER, Lane

if TYPE_CHECKING:
    from overlay.transport.webrtc import WebRtcTransport

log = logging.getLogger(__name__)

__all__ = ["HIGH_WATER", "LOW_WATER", "LinkState", "TERMINAL", "TRANSITIONS", "WebRtcLink"]

PING = control_chunk(ChunkFlag.PING, 0)


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
        self.state = LinkState.NEW
        self.kind: LinkKind | None = None
        self.connect_s: float | None = None
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._started = time.monotonic()
        self._opened: asyncio.Future[None] = self._loop.create_future()
        self._runner: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[Any] | None = None
        self._heart: asyncio.Task[None] | None = None
        self._pcs: dict[int, Lane] = {}  # every peer connection of this link, by number
        self.lanes: list[Lane] = []  # the adopted ones: what we send on
        self._next_pc = 0
        self._offers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()  # answerer: to answer
        # sending
        self._next_tid = 0
        self._slots = asyncio.Semaphore(transport.max_transfers)
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._outgoing: dict[int, str] = {}  # our transfer id -> request_id, until replied
        self._sending: set[int] = set()  # our transfer ids being sent
        self._refused: dict[int, str] = {}  # of those, the ones the remote refused, and why
        self._inbound = Inbound(self)  # receiving (overlay.transport.webrtc_inbound)

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
        waiting: list[asyncio.Future[Any]] = [*self._pending.values(), self._opened]
        for fut in waiting:
            if not fut.done():
                fut.set_exception(error)
        if not self._opened.cancelled():
            self._opened.exception()  # retrieved: nobody need be waiting for it any more
        self._inbound.drop_all()
        self._offers.put_nowait({})  # ends _answer_offers
        current = asyncio.current_task()
        for task in (self._runner, self._heart):
            if task is not None and task is not current:
                task.cancel()
        pcs = list(self._pcs.values())
        self._closer = self._transport.tasks.spawn_closer(
            _close_all(pcs), f"webrtc-close-{self.peer_id}")

    @property
    def is_open(self) -> bool:
        return self.state is LinkState.OPEN

    @property
    def is_done(self) -> bool:
        return self.state in TERMINAL

    @property
    def channel(self) -> RTCDataChannel:
        """The first lane's data channel (tests and tools that write raw chunks)."""
        lane = self.lanes[0] if self.lanes else next(iter(self._pcs.values()), None)
        if lane is None:
            raise TransportError(f"{self.peer_id}: no peer connection")
        return lane.channel

    @property
    def _incoming(self) -> dict[int, Assembly]:
        return self._inbound.incoming

    @property
    def _requests_active(self) -> int:
        return self._inbound.requests_active

    def incoming_progress(self) -> float | None:
        return self._inbound.progress()

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "connect_s": self.connect_s, "state": str(self.state),
                "lanes": len(self.lanes)}

    # ---- lanes -----------------------------------------------------------------------------
    def _new_pc(self, stage: IceStage, number: int | None = None) -> Lane:
        if number is None:
            number = self._next_pc
        self._next_pc = max(self._next_pc, number + 1)
        lane = Lane(number, stage, self._transport.configuration_for(stage),
                    on_message=self._on_lane_message, on_ended=self._on_lane_ended)
        self._pcs[number] = lane
        return lane

    def _drop_pc(self, lane: Lane, why: str) -> None:
        """Close a peer connection that is not (or no longer) one of our lanes."""
        if self._pcs.get(lane.number) is lane:
            del self._pcs[lane.number]
        log.debug("link %s: closing pc %d (%s)", self.peer_id, lane.number, why)
        self._transport.tasks.spawn_closer(lane.close(), f"webrtc-pc-{self.peer_id}")

    def _adopt(self, lane: Lane) -> None:
        if lane.adopted or lane.ended is not None:
            return
        lane.adopted = True
        self.lanes.append(lane)
        if self.kind is None:
            self.kind = lane.kind
        if self.offerer:
            lane.send(PING)  # tells the answerer which peer connection we chose

    def _on_lane_ended(self, lane: Lane, reason: str, failed: bool) -> None:
        if lane.adopted:  # one lane ends: the whole link does (the remote left or restarted)
            self._set_state(LinkState.FAILED if failed else LinkState.CLOSED,
                            f"lane {lane.number}: {reason}")
        elif self._pcs.get(lane.number) is lane:
            self._drop_pc(lane, reason)

    # ---- connecting ------------------------------------------------------------------------
    def start(self) -> None:
        self._set_state(LinkState.CONNECTING, "offering" if self.offerer else "answering")
        run = self._offer_side() if self.offerer else self._answer_side()
        self._runner = self._transport.tasks.spawn(self._run(run),
                                                   f"webrtc-connect-{self.peer_id}")

    def give_offer(self, data: dict[str, Any]) -> bool:
        """An offer for peer connection ``data["pc"]``; False if we already had that one."""
        number = data.get("pc", 0)
        if not isinstance(number, int) or number in self._pcs or number < 0:
            return False
        self._next_pc = max(self._next_pc, number + 1)
        self._offers.put_nowait(data)
        return True

    @property
    def fresh(self) -> bool:
        """Answerer side, connecting, and no offer seen yet (we only said hello)."""
        return (not self.offerer and self.state is not LinkState.OPEN and not self._pcs
                and self._offers.empty() and self._next_pc == 0)

    def give_answer(self, data: dict[str, Any]) -> bool:
        lane = self._pcs.get(data.get("pc", 0))
        return lane is not None and lane.give_answer(data)

    async def _signal(self, kind: SignalKind, data: dict[str, Any]) -> None:
        await self._transport.send_signal(self.peer_id, kind, data)

    async def _attempt(self, stage: IceStage) -> Lane:
        """Offer one peer connection and wait until it is open."""
        lane = self._new_pc(stage)
        try:
            await self._signal(SignalKind.OFFER, await lane.make_offer())
            await lane.take_answer()
        except BaseException:
            if not lane.adopted:
                self._drop_pc(lane, "attempt failed")
            raise
        return lane

    async def _offer_side(self) -> None:
        t = self._transport
        if t.first_stage is not IceStage.DIRECT:
            winner = await self._attempt(IceStage.ANY)
        else:
            winner = await self._race(0.0 if self.peer_id in t.relayed_before
                                      else t.relay_head_start)
        self._adopt(winner)
        if winner.kind is LinkKind.WEBRTC_RELAY:
            t.relayed_before.add(self.peer_id)
        else:
            t.relayed_before.discard(self.peer_id)

    async def _race(self, head_start: float) -> Lane:
        """The direct attempt, and after ``head_start`` s the relayed one beside it: the first
        open wins (the direct one if both are), the other is closed."""
        attempts = [asyncio.ensure_future(self._attempt(IceStage.DIRECT))]
        winner: Lane | None = None
        try:
            done, _ = await asyncio.wait(attempts, timeout=head_start)
            if not done or attempts[0].exception() is not None:
                log.info("link %s: no direct path within %.1f s, racing the relay",
                         self.peer_id, head_start)
                attempts.append(asyncio.ensure_future(self._attempt(IceStage.ANY)))
            pending = set(attempts)
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                winner = next((f.result() for f in attempts
                               if f in done and f.exception() is None), None)
            if winner is None:
                raise attempts[-1].exception() or TransportError("no attempt opened")
            return winner
        finally:
            for fut in attempts:
                if not fut.done():
                    fut.cancel()
            await asyncio.gather(*attempts, return_exceptions=True)
            for fut in attempts:
                if not fut.cancelled() and fut.exception() is None and fut.result() is not winner:
                    self._drop_pc(fut.result(), "lost the race")

    async def _answer_side(self) -> None:
        if self._offers.empty():
            await self._signal(SignalKind.HELLO, {})
        self._transport.tasks.spawn(self._answer_offers(), f"webrtc-answer-{self.peer_id}")
        await asyncio.shield(self._opened)

    async def _answer_offers(self) -> None:
        """Answer every peer connection the offerer proposes, for the life of the link."""
        while not self.is_done:
            offer = await self._offers.get()
            if not offer:  # the link ended
                return
            try:
                stage = IceStage(offer.get("stage", IceStage.ANY))
            except ValueError:
                stage = IceStage.ANY
            lane = self._new_pc(stage, offer.get("pc", 0))
            try:
                await self._signal(SignalKind.ANSWER, await lane.make_answer(offer))
            except TransportError:
                return
            except Exception as exc:  # a bad SDP
                log.warning("link %s: could not answer pc %d: %s", self.peer_id, lane.number,
                            exc)
                self._drop_pc(lane, "bad offer")
                if not self.lanes:
                    self._set_state(LinkState.FAILED, f"{type(exc).__name__}: {exc}")
                    return
                continue
            self._transport.tasks.spawn(self._watch_answered(lane),
                                        f"webrtc-pc-{self.peer_id}")

    async def _watch_answered(self, lane: Lane) -> None:
        try:
            async with asyncio.timeout(self._transport.connect_timeout):
                await asyncio.shield(lane.opened)
        except (TimeoutError, TransportError):
            if not lane.adopted:
                self._drop_pc(lane, "did not open")
            return
        lane.note_open()

    async def _run(self, side: Any) -> None:
        t = self._transport
        try:
            async with asyncio.timeout(t.connect_timeout):
                await side
        except TimeoutError:
            self._set_state(LinkState.FAILED, f"not open within {t.connect_timeout:.1f} s")
            return
        except TransportError:
            if not self.is_done:
                self._set_state(LinkState.FAILED, "no peer connection opened")
            return  # otherwise the link ended meanwhile; _set_state said why
        except Exception as exc:  # a bad SDP, a failing send_signal...
            self._set_state(LinkState.FAILED, f"{type(exc).__name__}: {exc}")
            return
        self._opened_now()
        if self.offerer and t.lanes > 1:
            await self._grow(t.lanes - 1)

    def _opened_now(self) -> None:
        if self.state is not LinkState.CONNECTING:
            return
        self.connect_s = time.monotonic() - self._started
        if not self._opened.done():
            self._opened.set_result(None)
        self._set_state(LinkState.OPEN, f"{self.kind} in {self.connect_s:.2f} s")
        self._heart = self._transport.tasks.spawn(self._heartbeat(),
                                                  f"webrtc-heartbeat-{self.peer_id}")

    async def _grow(self, extra: int) -> None:
        """More lanes of the first one's kind; a lane that does not open is given up."""
        stage = IceStage.ANY if self.kind is LinkKind.WEBRTC_RELAY else IceStage.DIRECT
        if self._transport.first_stage is IceStage.ANY:
            stage = IceStage.ANY
        t0 = time.monotonic()
        results = await asyncio.gather(*(self._attempt_within(stage) for _ in range(extra)),
                                       return_exceptions=True)
        for lane in results:
            if isinstance(lane, Lane) and self.is_open:
                self._adopt(lane)
        log.info("link %s: %d lanes (%.2f s for %d more)", self.peer_id, len(self.lanes),
                 time.monotonic() - t0, extra)

    async def _attempt_within(self, stage: IceStage) -> Lane:
        async with asyncio.timeout(self._transport.connect_timeout):
            return await self._attempt(stage)

    async def wait_open(self) -> None:
        await asyncio.shield(self._opened)
        if self.state is not LinkState.OPEN:
            raise TransportError(f"{self.peer_id}: link {self.state}")

    async def aclose(self, reason: str = "closed") -> None:
        self._set_state(LinkState.CLOSED, reason)
        tasks = [t for t in (self._runner, self._heart, self._closer) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- heartbeat -------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Ping every ``heartbeat_interval``, check for silence twice as often."""
        t = self._transport
        pinged = 0.0
        while self.is_open:
            await asyncio.sleep(t.heartbeat_interval / 2)
            now = time.monotonic()
            for lane in list(self.lanes):
                silent = lane.silence(now)
                if silent >= t.dead_after:
                    self._set_state(LinkState.FAILED,
                                    f"no heartbeat on lane {lane.number} for {silent:.1f} s")
                    return
            if now - pinged >= t.heartbeat_interval * 0.9:
                pinged = now
                for lane in self.lanes:
                    if lane.is_open and lane.load < LOW_WATER:
                        lane.send(PING)

    # ---- sending ---------------------------------------------------------------------------
    def _pick_lane(self) -> Lane:
        lanes = [lane for lane in self.lanes if lane.is_open]
        if self.state is not LinkState.OPEN or not lanes:
            raise TransportError(f"{self.peer_id}: link {self.state}")
        return min(lanes, key=lambda lane: lane.load)

    async def _drain(self) -> None:
        await self._pick_lane().drain()

    def _alloc_tid(self) -> int:
        tid = self._next_tid
        self._next_tid = (self._next_tid + 1) & 0xFFFFFFFF
        return tid

    async def send_message(self, frames: Frames, *, reply: bool, tid: int | None = None,
                           lane: Lane | None = None) -> None:
        """Send one transfer on ``lane`` (default: the least loaded), paced. Raises
        TransportError."""
        if tid is None:
            tid = self._alloc_tid()
        if lane is None or not lane.is_open:
            lane = self._pick_lane()
        total = sum(memoryview(f).nbytes for f in frames)
        lane.assigned += total
        queued = 0
        sent = 0
        done = False
        self._sending.add(tid)
        try:
            for message in iter_chunks(tid, frames, ChunkFlag.REPLY if reply else 0):
                if tid in self._refused:
                    raise TransportError(f"{self.peer_id}: refused ({self._refused[tid]})")
                if self.state is not LinkState.OPEN:
                    raise TransportError(f"{self.peer_id}: link {self.state}")
                await lane.drain()
                lane.send(message)
                sent += len(message)
                step = min(len(message) - CHUNK_HEADER.size, total - queued)
                queued += step
                lane.assigned -= step
            done = True
        finally:
            lane.assigned -= total - queued
            self._sending.discard(tid)
            self._refused.pop(tid, None)
            stats = self._transport.stats
            stats.bytes_out += sent
            if done:
                stats.messages_out += 1
            elif sent and lane.is_open:
                lane.send(control_chunk(ChunkFlag.ABORT, tid))

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
    def _on_lane_message(self, lane: Lane, message: bytes | str) -> None:
        if lane.ended is not None:
            return
        lane.heard(time.monotonic())
        if not lane.adopted and not self.offerer and not self.is_done:
            lane.note_open()
            self._adopt(lane)  # the offerer chose this peer connection
            self._opened_now()
        self._on_message(message, lane)

    def _on_message(self, message: bytes | str, lane: Lane | None = None) -> None:
        if self.is_done:
            return
        try:
            if not isinstance(message, bytes):
                raise ChunkError("bad_chunk", "text message on the data channel")
            self._inbound.on_chunk(message, lane)
        except ChunkError as exc:
            self._inbound.reject(None, exc.reason, str(exc), lane)


async def _close_all(lanes: list[Lane]) -> None:
    await asyncio.gather(*(lane.close() for lane in lanes), return_exceptions=True)
