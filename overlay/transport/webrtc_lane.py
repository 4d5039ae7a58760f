"""One lane of a WebRTC link: an RTCPeerConnection and its one data channel (aiortc).

A link to a peer (overlay.transport.webrtc_link) is made of one or more lanes. Each lane is
an independent SCTP association with its own congestion window, so a link stripes its
transfers over them (a whole transfer per lane: chunks stay in order on their channel). The
offerer numbers its peer connections (``pc`` in every offer and answer); the answerer makes
one per number it is offered and *adopts* it once the first chunk arrives on it, so it never
sends on an attempt the offerer gave up (the race of a direct and a relayed attempt).

A lane knows when it last heard from the remote (any SCTP chunk: data, SACK, heartbeat) and
when its send buffer last drained (``bufferedAmount`` only shrinks when the remote
acknowledges data, aiortc's SCTP keeps what is not acknowledged in its own queue): the
link's heartbeat reads both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription

from overlay.errors import TransportError
from overlay.transport.base import LinkKind
from overlay.transport.ice import IceStage, selected_kind

log = logging.getLogger(__name__)

HIGH_WATER = 4 * 1024 * 1024
"""The sender waits while a lane's channel buffers more than this many bytes..."""
LOW_WATER = 1024 * 1024
"""...until it has drained to this (``bufferedAmountLowThreshold``)."""


class Lane:
    """One peer connection of a link. Events go to the callbacks; nothing here fails a link."""

    def __init__(self, number: int, stage: IceStage, configuration: Any, *,
                 on_message: Callable[[Lane, bytes | str], None],
                 on_ended: Callable[[Lane, str, bool], None]) -> None:
        self.number = number
        self.stage = stage
        self.kind: LinkKind | None = None
        self.adopted = False
        """The link sends on this lane (offerer: chosen; answerer: a chunk arrived on it)."""
        self.ended: str | None = None
        self.assigned = 0
        """Bytes of transfers given to this lane and not yet handed to its channel."""
        now = time.monotonic()
        self.last_rx = now
        self.last_drain = now
        self._buffered_seen = 0
        self._on_ended = on_ended
        self._loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = self._loop.create_future()
        self.answer: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._low = asyncio.Event()
        self.pc = RTCPeerConnection(configuration)
        self.pc.on("connectionstatechange", self._on_connection_state)
        channel = self.pc.createDataChannel("peerlearn", negotiated=True, id=0, ordered=True)
        self.channel: RTCDataChannel = channel
        channel.bufferedAmountLowThreshold = LOW_WATER
        channel.on("open", self._on_open)
        channel.on("close", lambda: self._end("channel closed"))
        channel.on("message", lambda m: on_message(self, m))
        channel.on("bufferedamountlow", self._low.set)
        self._hear_sctp()

    def _hear_sctp(self) -> None:
        """Count every SCTP chunk from the remote (a SACK, a retransmission, a heartbeat) as
        a sign of life, not only whole messages: on a lossy path an ordered channel holds
        messages back behind a lost packet for seconds (retransmission timeouts back off from
        1 s), while the remote's SACKs keep arriving. aiortc has no hook for this: its
        transport's ``_receive_chunk`` is wrapped, and without it only messages count."""
        sctp = getattr(self.pc, "sctp", None)
        receive = getattr(sctp, "_receive_chunk", None)
        if sctp is None or receive is None:
            log.debug("aiortc without RTCSctpTransport._receive_chunk: messages only")
            return

        async def receive_chunk(chunk: Any) -> None:
            self.last_rx = time.monotonic()
            await receive(chunk)

        sctp._receive_chunk = receive_chunk

    def __repr__(self) -> str:
        return f"<lane {self.number} {self.stage} {self.kind or ''}>"

    # ---- events ----------------------------------------------------------------------------
    def _on_open(self) -> None:
        if not self.opened.done():
            self.opened.set_result(None)

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "failed":
            self._end("ICE/DTLS failed", failed=True)
        elif state == "closed":
            self._end("peer connection closed")

    def _end(self, reason: str, *, failed: bool = False) -> None:
        if self.ended is not None:
            return
        self.ended = reason
        error = TransportError(f"lane {self.number}: {reason}")
        for fut in (self.opened, self.answer):
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: the waiter, if any, sees it too
        self._low.set()
        self._on_ended(self, reason, failed)

    # ---- setting up ------------------------------------------------------------------------
    def description(self) -> dict[str, Any]:
        desc = self.pc.localDescription
        return {"sdp": desc.sdp, "type": desc.type, "stage": str(self.stage), "pc": self.number}

    async def make_offer(self) -> dict[str, Any]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.description()

    def give_answer(self, data: dict[str, Any]) -> bool:
        if self.answer.done() or self.pc.signalingState != "have-local-offer":
            return False
        self.answer.set_result(data)
        return True

    async def take_answer(self) -> None:
        """Wait for the answer to our offer, apply it and wait for the channel to open."""
        answer = await self.answer
        await self.pc.setRemoteDescription(
            RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        await asyncio.shield(self.opened)
        self.kind = selected_kind(self.pc)

    async def make_answer(self, offer: dict[str, Any]) -> dict[str, Any]:
        await self.pc.setRemoteDescription(
            RTCSessionDescription(sdp=offer["sdp"], type=offer["type"]))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.description()

    def note_open(self) -> None:
        """The answerer's side: the channel opened (ICE and DTLS done)."""
        self.kind = selected_kind(self.pc)

    # ---- traffic ---------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self.ended is None and self.channel.readyState == "open"

    @property
    def load(self) -> int:
        """Bytes waiting to leave through this lane (what a new transfer would queue behind)."""
        return self.assigned + self.channel.bufferedAmount

    def send(self, message: bytes) -> None:
        if not self.is_open:
            raise TransportError(f"lane {self.number}: {self.ended or 'not open'}")
        self.channel.send(message)

    async def drain(self) -> None:
        while self.channel.bufferedAmount > HIGH_WATER:
            if not self.is_open:
                raise TransportError(f"lane {self.number}: {self.ended or 'not open'}")
            self._low.clear()
            await self._low.wait()

    def heard(self, now: float) -> None:
        self.last_rx = now

    def silence(self, now: float) -> float:
        """Seconds since the remote last showed it is alive on this lane: a message arrived,
        or our send buffer shrank (the remote acknowledged data). An empty buffer with nothing
        to send is no proof: only the remote's heartbeats count then."""
        buffered = self.channel.bufferedAmount
        if buffered < self._buffered_seen:
            self.last_drain = now
        self._buffered_seen = buffered
        return now - max(self.last_rx, self.last_drain)

    async def close(self) -> None:
        self.pc.remove_all_listeners()
        self.channel.remove_all_listeners()
        if self.ended is None:
            self.ended = "closed"
        await self.pc.close()
