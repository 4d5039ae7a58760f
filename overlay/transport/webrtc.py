"""WebRTC transport: one RTCPeerConnection and one data channel per remote peer (aiortc).

Same request/reply contract as every transport (overlay.transport.base): a message is the
frames of the wire format (``[header, payload, ...]``), a reply is matched by the
``request_id`` in its header, and incoming requests go to ``handler(header, payloads, origin)``
(``origin``: the link's peer id) whose reply frames travel back over the same channel.

Signaling is abstract: the owner passes ``send_signal(peer_id, kind, data)`` and feeds what
arrives into :meth:`WebRtcTransport.on_signal`. Kinds (overlay.protocol.SignalKind):

- ``hello`` ``{}`` -- the peer with the larger id asks the smaller one for an offer;
- ``offer`` / ``answer`` ``{"sdp": str, "type": str}`` -- aiortc does not trickle, the ICE
  candidates are inside the SDP. An offer also says its ICE ``stage`` (overlay.transport.ice).

The peer with the lexicographically smaller id always offers (no glare). An ``offer`` or a
``hello`` that arrives for a link that is already open means the remote lost its side (it
restarted): the old link is closed and a new one made.

A link is made of one or more *lanes*, each an RTCPeerConnection with one data channel; every
offer and answer names its peer connection (``pc``, numbered by the offerer). An ``offer``
with ``pc`` 0 always starts a link; a higher number adds a peer connection to the link.

The layers, one module each: framing and reassembly (overlay.transport.chunks, sans-I/O),
ICE configuration and staging (overlay.transport.ice), one peer connection
(overlay.transport.webrtc_lane), the link with its set-up race, lanes, heartbeat and state
machine (overlay.transport.webrtc_link), and this transport, which holds the links by peer id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from aiortc import RTCConfiguration

from overlay.errors import TransportError
from overlay.identity import Identity
from overlay.protocol import SignalKind
from overlay.transport.base import Frames, Handler, LinkKind, Reply, Transport, TransportStats
from overlay.transport.chunks import (
    CHUNK_HEADER,
    CHUNK_SIZE,
    MAX_MESSAGE,
    MIN_RATE,
    ChunkError,
    ChunkHeader,
    control_chunk,
    iter_chunks,
)
from overlay.transport.ice import (
    IceServers,
    IceStage,
    first_stage,
    has_turn,
    ice_configuration,
    selected_kind,
)
from overlay.transport.serving import TaskSet
from overlay.transport.webrtc_link import HIGH_WATER, LOW_WATER, LinkState, WebRtcLink
from overlay.wire import Limits

log = logging.getLogger(__name__)

SendSignal = Callable[[str, SignalKind, dict[str, Any]], Awaitable[None]]
"""send_signal(peer_id, kind, data): deliver a signaling message (through the rendezvous)."""

CONNECT_TIMEOUT = 15.0
"""Seconds from the start of an attempt until the data channel is open."""
RELAY_HEAD_START = 0.8
"""How long the ``direct`` attempt (no TURN candidates) runs alone before a relayed attempt
races it; hole punching through port-restricted NATs took about 0.6 s in the lab at 20 ms RTT,
a TURN allocation and its checks about 0.8 s more."""
LANES = 3
"""Peer connections per link (overlay.transport.webrtc_link): transfers stripe over them."""
HEARTBEAT_INTERVAL = 1.0
"""Seconds between heartbeats on each lane."""
DEAD_AFTER = 3.5
"""A lane that shows no sign of the remote for this long fails its link (checked every half
interval: a peer that vanished is noticed 2.5-4 s after its last heartbeat)."""
CHUNK_IDLE_TIMEOUT = 15.0
"""Seconds a receiver waits for the next chunk of an incoming transfer."""
MAX_TRANSFERS = 16
"""Incoming requests per link being received or handled; also outstanding requests per link."""


class WebRtcTransport(Transport):
    """Request/reply over WebRTC data channels, one link per remote peer.

    ``send_signal(peer_id, kind, data)`` delivers a signaling message to a peer (through the
    rendezvous); incoming ones are fed to :meth:`on_signal`. ``ice_servers`` is always explicit
    (an empty list: host candidates only), a list or a zero-argument callable that returns the
    current list (asked for every new peer connection, so renewed TURN credentials are used);
    ``ice_transport_policy="relay"`` forces TURN.
    """

    name: ClassVar[str] = "webrtc"

    def __init__(
        self,
        identity: Identity,
        ice_servers: IceServers | Callable[[], IceServers],
        handler: Handler,
        limits: Limits = Limits(),
        *,
        send_signal: SendSignal,
        ice_transport_policy: str = "all",
        connect_timeout: float = CONNECT_TIMEOUT,
        relay_head_start: float = RELAY_HEAD_START,
        lanes: int = LANES,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        dead_after: float = DEAD_AFTER,
        chunk_idle_timeout: float = CHUNK_IDLE_TIMEOUT,
        min_rate: float = MIN_RATE,
        max_transfers: int = MAX_TRANSFERS,
    ) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, not {lanes}")
        if dead_after <= heartbeat_interval:
            raise ValueError("dead_after must be longer than heartbeat_interval")
        self.identity = identity
        self.peer_id = identity.peer_id
        self.limits = limits
        self._ice_servers = ice_servers
        self.ice_transport_policy = ice_transport_policy
        self.relay_head_start = min(relay_head_start, connect_timeout / 3)
        self.connect_timeout = connect_timeout
        self.lanes = lanes
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self.chunk_idle_timeout = chunk_idle_timeout
        self.min_rate = min_rate
        self.relayed_before: set[str] = set()
        """Peers whose last link needed the relay: the next one races it from the start."""
        self.max_transfers = max_transfers
        self.stats = TransportStats()
        self.handler = handler
        self.send_signal = send_signal
        self.tasks = TaskSet("webrtc")
        """Handlers and connection attempts (cancelled by close()), pc.close() (awaited)."""
        self._links: dict[str, WebRtcLink] = {}
        self._closed = False

    @property
    def ice_servers(self) -> IceServers:
        """The STUN/TURN servers now: a callable given to the constructor is asked each time
        (TURN credentials are renewed by the rendezvous client before they expire)."""
        servers = self._ice_servers() if callable(self._ice_servers) else self._ice_servers
        return list(servers)

    @property
    def first_stage(self) -> IceStage:
        return first_stage(self.ice_servers, self.ice_transport_policy)

    def configuration_for(self, stage: IceStage) -> RTCConfiguration:
        """``direct``: STUN only; ``any``: every configured server (TURN included)."""
        return ice_configuration(self.ice_servers, self.ice_transport_policy, stage)

    def _new_link(self, peer_id: str, *, reason: str) -> WebRtcLink:
        old = self._links.get(peer_id)
        if old is not None:
            old._set_state(LinkState.CLOSED, f"replaced: {reason}")
        link = WebRtcLink(self, peer_id, offerer=self.peer_id < peer_id)
        self._links[peer_id] = link
        return link

    # ---- signaling -------------------------------------------------------------------------

    async def on_signal(self, from_peer: str, kind: SignalKind, data: dict[str, Any]) -> None:
        """A signaling message from ``from_peer`` (as relayed by the rendezvous)."""
        if self._closed or from_peer == self.peer_id:
            return
        we_offer = self.peer_id < from_peer
        link = self._links.get(from_peer)
        if kind == SignalKind.HELLO and we_offer:
            if link is None or link.is_done or link.is_open:
                self._new_link(from_peer, reason="peer asked for a new offer").start()
            return
        if kind == SignalKind.OFFER and not we_offer and _is_sdp(data, "offer"):
            number = data.get("pc", 0)
            if link is not None and link.fresh and number == 0:
                link.give_offer(data)  # the offer our hello asked for
            elif link is None or link.is_done or number == 0:
                link = self._new_link(from_peer, reason="peer sent a new offer")
                link.give_offer(data)
                link.start()
            elif not link.give_offer(data):
                log.info("ignoring a repeated offer (pc %r) from %s", number, from_peer)
            return
        if kind == SignalKind.ANSWER and we_offer and _is_sdp(data, "answer"):
            if link is None or not link.give_answer(data):
                log.info("ignoring a stale answer from %s", from_peer)
            return
        log.warning("ignoring signal %r from %s", str(kind)[:20], from_peer)

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

    def link_kind(self, peer_id: str) -> LinkKind | None:
        link = self._links.get(peer_id)
        return link.kind if link is not None and link.is_open else None

    async def forget(self, peer_id: str) -> None:
        """Close the link to a peer that left."""
        link = self._links.pop(peer_id, None)
        if link is not None:
            await link.aclose("peer left")

    async def request(
        self, peer_id: str, frames: Frames, request_id: str, *, timeout: float
    ) -> Reply:
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
        await self.tasks.cancel_all()
        links = list(self._links.values())
        self._links.clear()
        await asyncio.gather(*(link.aclose("transport closed") for link in links),
                             return_exceptions=True)
        await self.tasks.close()  # pc.close() of links that ended or were replaced earlier


def _is_sdp(data: Any, kind: str) -> bool:
    return (isinstance(data, dict) and data.get("type") == kind
            and isinstance(data.get("sdp"), str))


__all__ = [
    "CHUNK_HEADER", "CHUNK_SIZE", "CHUNK_IDLE_TIMEOUT", "CONNECT_TIMEOUT", "DEAD_AFTER",
    "HEARTBEAT_INTERVAL", "HIGH_WATER", "LANES", "LOW_WATER", "MAX_MESSAGE", "MAX_TRANSFERS",
    "MIN_RATE", "RELAY_HEAD_START", "ChunkError",
    "ChunkHeader", "IceStage", "LinkState", "SendSignal", "WebRtcLink", "WebRtcTransport",
    "control_chunk", "has_turn", "ice_configuration", "iter_chunks", "selected_kind",
]
