"""The host: a peer's presence in the overlay.

It owns the rendezvous session (membership view), the transports and the connection manager
(``overlay.connections``), and offers the learner: ``encode`` a model once, ``send_model`` it
to one peer, ``publish`` it for the peers that ask (newcomers), ``fetch_model`` from one peer,
and an ``inbox`` of models pushed to us. Every model received or fetched is decoded and
checked (digest, signature, limits) and handed to the learner's ``accept`` in a worker thread;
what ``accept`` returns is what the learner gets. Wire frames and request ids stay in here;
the host knows nothing about torch.

The transports' :class:`overlay.transport.base.Directory` (addresses and keys of the members)
is ``host.directory`` (overlay.directory); models in pieces go through overlay.piece_transfer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar, cast, overload

from overlay.connections import Connections, link_report
from overlay.directory import MemberDirectory
from overlay.errors import SignalError, TransportError, WireError
from overlay.events import Joined, LinkUp, MemberEvent
from overlay.identity import Identity
from overlay.membership import JobPolicy, Member
from overlay.models import EncodedModel, OutgoingModel, ReceivedModel
from overlay.piece_transfer import PieceReceiver, check_ack, send_pieces
from overlay.pieces import PIECE_BYTES, PIECE_BYTES_ZMQ, PieceStore
from overlay.protocol import SignalKind
from overlay.rendezvous_client import RendezvousClient
from overlay.signaling import SignalGuard, seal
from overlay.transport.base import Frames, LinkKind
from overlay.transport.webrtc import WebRtcTransport
from overlay.transport.zeromq import ZmqTransport
from overlay.wire import (
    FrameType,
    Limits,
    ModelMessage,
    decode_model,
    encode_control,
    model_parts,
    pack_header,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
MemberListener = Callable[[MemberEvent], None]
"""on_member_event(event): Joined, Left or LinkUp (overlay.events)."""


@dataclass
class HostConfig:
    """Where a peer is and how it talks."""

    rendezvous: str
    """Rendezvous address: ``HOST:PORT`` or ``ws://HOST:PORT/ws``."""
    job: str = "default"
    """Job (swarm) name; peers only see members of their own job."""
    listen: str | None = None
    """ZeroMQ listen address ``tcp://HOST:PORT`` (port 0 picks one); None: not reachable."""
    advertise: str | None = None
    """Address to announce if it differs from the bound one (e.g. behind port forwarding)."""
    send_timeout: float = 120.0
    """Bound on one request of a model delivery (a small model whole, or one piece of a large
    one), link set-up and acknowledgement included."""
    stall_timeout: float = 30.0
    """A model delivery in pieces (overlay.pieces) fails once no piece was acknowledged for
    this long; while pieces keep arriving it is never cut, however slow the link."""
    fetch_timeout: float = 60.0
    """Bound on fetching one model from one peer (bootstrap)."""
    connect_timeout: float = 20.0
    """Bound on setting up a link (the first ``ping`` round trip, ICE included)."""
    lanes: int = 3
    """Peer connections per WebRTC link; large models stripe over them (docs/wan.md: what
    that does to other traffic on the user's link). 1: one SCTP association, as aiortc."""
    ice_transport_policy: str = "all"
    """``all``: direct paths first, TURN as fallback; ``relay``: TURN only (tests)."""
    backoff_initial: float = 1.0
    """First wait before retrying a failed link; doubles up to ``backoff_max``."""
    backoff_max: float = 30.0
    limits: Limits = field(default_factory=Limits)
    """What we accept from others."""
    membership: JobPolicy | None = None
    """Closed job: the join secret / allowed peer ids (``overlay.membership``). We prove our
    membership with it, and members that fail it are ignored whatever the rendezvous says
    (never in ``members``: no links, their models and signals refused); counted in
    ``rendezvous.refused_members``."""


class HostState(enum.StrEnum):
    NEW = "new"
    STARTED = "started"
    CLOSED = "closed"


_TRANSITIONS: dict[HostState, frozenset[HostState]] = {
    HostState.NEW: frozenset({HostState.STARTED, HostState.CLOSED}),
    HostState.STARTED: frozenset({HostState.CLOSED}),
    HostState.CLOSED: frozenset(),
}


def _as_is(model: ReceivedModel) -> ReceivedModel:
    return model


class Host(Generic[T]):
    """One peer in one job. ``accept(model)`` runs in a worker thread for every model
    received or fetched: it raises ``WireError(reason, message)`` to refuse the model
    (counted, nacked, logged) and returns the learner's own object otherwise."""

    @overload
    def __init__(self: Host[ReceivedModel], identity: Identity, config: HostConfig,
                 meta: Mapping[str, Any] | None = None, accept: None = None,
                 on_member_event: MemberListener | None = None) -> None: ...

    @overload
    def __init__(self, identity: Identity, config: HostConfig, meta: Mapping[str, Any] | None,
                 accept: Callable[[ReceivedModel], T],
                 on_member_event: MemberListener | None = None) -> None: ...

    def __init__(
        self,
        identity: Identity,
        config: HostConfig,
        meta: Mapping[str, Any] | None = None,
        accept: Callable[[ReceivedModel], T] | None = None,
        on_member_event: MemberListener | None = None,
    ) -> None:
        self.identity = identity
        self.config = config
        self.meta = dict(meta or {})
        self.inbox: asyncio.Queue[T] = asyncio.Queue()
        self.changed = asyncio.Event()  # set whenever the inbox or the membership changes
        self._accept = accept if accept is not None else cast(Callable[[ReceivedModel], T],
                                                               _as_is)
        self._on_member_event = on_member_event
        self._current: EncodedModel | None = None
        self.directory = MemberDirectory(lambda: self.members)
        """The transports' directory: addresses and keys of our members."""
        self.transport = ZmqTransport(identity, config.listen, self._on_message, config.limits,
                                      directory=self.directory)
        self.webrtc: WebRtcTransport | None = None
        self.rendezvous: RendezvousClient | None = None
        self.connections: Connections | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.state = HostState.NEW
        self._signal_guard = SignalGuard(identity.peer_id, config.job, self.directory.public_key_of)
        """Opens the sealed signals addressed to us (overlay.signaling)."""
        self.pieces = PieceStore(config.limits)
        """Models being received in pieces, by sender (overlay.pieces)."""
        self._pieces_in = PieceReceiver(self.pieces, config.limits)

    def _set_state(self, new: HostState) -> None:
        old = self.state
        if new not in _TRANSITIONS[old]:
            raise RuntimeError(f"host {self.peer_id}: {old} -> {new} is not allowed")
        self.state = new
        log.debug("host %s: %s -> %s", self.peer_id[:8], old, new)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def members(self) -> Mapping[str, Member]:
        """The admitted members of our job (ourselves excluded)."""
        return self.rendezvous.members if self.rendezvous is not None else {}

    @property
    def links(self) -> Mapping[str, LinkUp]:
        """The open links, by peer id."""
        return self.connections.links if self.connections is not None else {}

    async def __aenter__(self) -> Host[T]:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def start(self) -> None:
        if self.state is not HostState.NEW:
            raise RuntimeError("a Host is started once")
        await self.transport.start()
        bound = self.transport.address
        addrs = [self.config.advertise or bound] if bound else []
        self.rendezvous = RendezvousClient(
            self.config.rendezvous, self.identity, self.config.job, addrs, self.meta,
            membership=self.config.membership,
        )
        try:
            await self.rendezvous.start()
        except BaseException:
            self._set_state(HostState.CLOSED)
            await self.transport.close()
            raise
        if addrs and not self.rendezvous.reachable_addrs:
            log.warning("the rendezvous could not dial back %s: peers will reach us over WebRTC",
                        addrs[0])
        rendezvous = self.rendezvous
        self.webrtc = WebRtcTransport(
            self.identity, lambda: rendezvous.ice_servers, self._on_message, self.config.limits,
            send_signal=self._send_signal,
            ice_transport_policy=self.config.ice_transport_policy,
            connect_timeout=self.config.connect_timeout, lanes=self.config.lanes,
        )
        self.connections = Connections(
            self.directory, self.transport, self.webrtc,
            connect_timeout=self.config.connect_timeout,
            backoff_initial=self.config.backoff_initial, backoff_max=self.config.backoff_max,
            on_link_up=self._link_up,
        )
        self._tasks = [
            asyncio.create_task(self._watch_membership(), name="membership"),
            asyncio.create_task(self._pump_signals(), name="signals"),
        ]
        self._set_state(HostState.STARTED)

    async def close(self) -> None:
        """Leave the job, stop the tasks and close the transports; safe to call twice."""
        if self.state is HostState.CLOSED:
            return
        self._set_state(HostState.CLOSED)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.connections is not None:
            await self.connections.close()
        if self.rendezvous is not None:
            await self.rendezvous.close(leave=True)
        if self.webrtc is not None:
            await self.webrtc.close()
        await self.transport.close()

    # ---- membership and signaling ----------------------------------------------------------

    async def _watch_membership(self) -> None:
        assert self.rendezvous is not None and self.connections is not None
        while True:
            event = await self.rendezvous.events.get()
            if isinstance(event, Joined):
                log.info("peer joined: %s (%s)", event.peer_id,
                         event.member.address or "behind NAT")
                self.directory.remember(event.member)
            else:
                log.info("peer left: %s (%s)", event.peer_id, event.reason)
                self.directory.forget(event.peer_id)
                await self.connections.forget(event.peer_id)
            self._notify(event)
            self.changed.set()

    def _notify(self, event: MemberEvent) -> None:
        if self._on_member_event is not None:
            self._on_member_event(event)

    async def _link_up(self, link: LinkUp) -> None:
        self._notify(link)
        if self.rendezvous is not None:
            await self.rendezvous.report_links(link_report(self.links))

    async def _pump_signals(self) -> None:
        assert self.rendezvous is not None and self.webrtc is not None
        while True:
            sender, kind, data = await self.rendezvous.signals.get()
            try:
                body = self._signal_guard.open(sender, kind, data)
            except SignalError as exc:
                self.webrtc.stats.reject(f"signal_{exc.reason}")
                log.warning("refused a %s signal relayed as from %s: %s", kind, sender, exc)
                continue
            try:
                await self.webrtc.on_signal(sender, kind, body)
            except Exception:  # one bad signal must not stop the pump
                log.exception("signal %s from %s failed", kind, sender)

    async def _send_signal(self, to: str, kind: SignalKind, body: dict[str, Any]) -> None:
        """What the WebRTC transport sends to ``to``, sealed (overlay.signaling), relayed."""
        assert self.rendezvous is not None
        await self.rendezvous.send_signal(to, kind, seal(self.identity, to, self.config.job,
                                                         kind, body))

    # ---- incoming ------------------------------------------------------------------------

    async def _on_message(self, header: dict[str, Any], payloads: list[memoryview],
                          origin: str | None) -> Frames:
        """A request from ``origin`` (the member the transport authenticated, None: unknown).

        ``ping`` is answered for anyone (link set-up, the rendezvous' newcomers); ``model``
        must come from the member that signed it; ``get_model`` is served to members only.
        """
        kind = header["type"]
        request_id = header.get("request_id")
        if origin not in self.members:  # e.g. a WebRTC link to a peer that has just left
            origin = None
        if kind == FrameType.PING.value:
            return [encode_control(FrameType.PONG, request_id=request_id)]
        if kind == FrameType.MODEL.value:
            if origin is None:
                raise WireError("unknown_sender", "model from a peer outside our job")
            digest = await self._take_model(header, payloads, origin)
            return [encode_control(FrameType.ACK, request_id=request_id, digest=digest)]
        if kind == FrameType.PIECE.value:
            if origin is None:
                raise WireError("unknown_sender", "piece from a peer outside our job")
            return [await self._take_piece(header, payloads, origin)]
        if kind == FrameType.GET_MODEL.value:
            if origin is None:  # the header's "sender" is not proof of anything
                raise WireError("unknown_sender", "get_model from a peer outside our job")
            current = self._current
            if current is None:
                return [encode_control(FrameType.NACK, request_id=request_id, reason="not_ready",
                                       message="no model yet")]
            return [pack_header(current.header, request_id=str(request_id)), *current.payloads]
        raise WireError("unexpected", f"{kind} is not a request")

    async def _take_model(self, header: dict[str, Any], payloads: list[memoryview],
                          origin: str) -> bytes:
        """Check and accept a whole model from ``origin``, put it in the inbox; its digest."""
        received, accepted = await asyncio.to_thread(self._receive, header, payloads, origin)
        await self.inbox.put(accepted)
        self.changed.set()
        log.info("received model epoch %d from %s (%d samples, %.1f MB)",
                 received.epoch, received.sender, received.samples, received.nbytes / 1e6)
        return received.digest

    async def _take_piece(self, header: dict[str, Any], payloads: list[memoryview],
                          origin: str) -> bytes:
        return await self._pieces_in.take(header, payloads, origin, self._take_model)

    def receiving_from(self, peer_id: str) -> float | None:
        """When a piece of a model from ``peer_id`` last arrived (monotonic) while that model
        is still incomplete; None if nothing from it is in progress."""
        return self.pieces.last_progress(peer_id)

    def _receive(self, header: dict[str, Any], payloads: list[memoryview],
                 origin: str) -> tuple[ReceivedModel, T]:
        """Decode and check a model that ``origin`` (authenticated by the transport) sent, and
        hand it to ``accept`` (worker thread)."""
        if header.get("sender") != origin:  # a signed model relayed or replayed by another
            raise WireError("sender_mismatch",
                            f"a model signed as {header.get('sender')!r} came from {origin}")
        msg = decode_model(header, payloads, self.directory.public_key_of, self.config.limits)
        if msg.job != self.config.job:
            raise WireError("wrong_job", f"model for job {msg.job!r}")
        received = ReceivedModel(sender=msg.sender, job=msg.job, epoch=msg.epoch,
                                 samples=msg.samples, codec=msg.codec, digest=msg.digest,
                                 arrays=tuple(msg.arrays))
        return received, self._accept(received)

    # ---- outgoing ------------------------------------------------------------------------

    def _encode(self, model: OutgoingModel) -> EncodedModel:
        """Encode, hash and sign (worker thread). A model the codec cannot carry (say a value
        beyond fp16's range) goes raw instead."""
        msg = ModelMessage(job=model.job, sender=model.sender, epoch=model.epoch,
                           samples=model.samples, arrays=list(model.arrays), codec=model.codec)
        try:
            header, payloads = model_parts(msg, self.identity)
        except WireError as exc:
            if msg.codec == "raw":
                raise
            log.warning("epoch %d cannot travel as %s (%s): sending it raw", msg.epoch,
                        msg.codec, exc)
            msg.codec = "raw"
            header, payloads = model_parts(msg, self.identity)
        nbytes = len(pack_header(header)) + sum(p.nbytes for p in payloads)
        return EncodedModel(epoch=msg.epoch, codec=msg.codec, digest=msg.digest, nbytes=nbytes,
                            header=header, payloads=tuple(payloads))

    async def encode(self, model: OutgoingModel) -> EncodedModel:
        """Encode ``model`` once (in a worker thread) for sending to many peers and serving.

        The encoded model keeps views of raw arrays: hand over arrays that no longer change.
        """
        return await asyncio.to_thread(self._encode, model)

    def publish(self, model: EncodedModel) -> None:
        """Make ``model`` the one we hand to peers that ask (newcomers); no work here."""
        self._current = model

    async def _request(self, peer_id: str, frames: Frames, request_id: str,
                       timeout: float) -> tuple[dict[str, Any], list[memoryview]]:
        if self.connections is None:
            raise TransportError("host not started")
        return await self.connections.request(peer_id, frames, request_id, timeout=timeout)

    def _piece_bytes(self, peer_id: str) -> int:
        link = self.links.get(peer_id)
        return PIECE_BYTES_ZMQ if link is not None and link.kind is LinkKind.ZMQ else PIECE_BYTES

    async def send_model(self, peer_id: str, model: EncodedModel) -> None:
        """Deliver ``model`` to ``peer_id``; returns once it acknowledged. Raises
        TransportError (also for a refusal).

        A model larger than one piece goes in pieces (overlay.pieces): once a piece was
        acknowledged, a piece whose request fails is sent again when the link is back,
        acknowledged ones never, and the delivery fails only when no piece was acknowledged for
        ``stall_timeout``; a delivery whose first pieces fail fails at once, like a small one.
        """
        started = time.monotonic()
        if model.nbytes > self._piece_bytes(peer_id):
            await send_pieces(self._request, peer_id, model, self._piece_bytes(peer_id),
                              job=self.config.job, sender=self.peer_id,
                              send_timeout=self.config.send_timeout,
                              stall_timeout=self.config.stall_timeout)
        else:
            request_id = secrets.token_hex(8)
            frames: Frames = [pack_header(model.header, request_id=request_id),
                              *model.payloads]
            header, _ = await self._request(peer_id, frames, request_id,
                                            self.config.send_timeout)
            check_ack(peer_id, header)
        log.debug("delivered to %s in %.2f s", peer_id, time.monotonic() - started)

    async def fetch_model(self, peer_id: str) -> T:
        """Ask ``peer_id`` for its current model (newcomer bootstrap); what ``accept`` made
        of it. Raises TransportError.

        A donor that has not yet been told we joined refuses us as ``unknown_sender`` (its
        ``joined`` event may still be on the way): asked again a moment later, within
        ``fetch_timeout`` in all.
        """
        deadline = time.monotonic() + self.config.fetch_timeout
        delay = 0.2
        while True:
            request_id = secrets.token_hex(8)
            request = encode_control(FrameType.GET_MODEL, request_id=request_id,
                                     job=self.config.job, sender=self.peer_id)
            header, payloads = await self._request(
                peer_id, [request], request_id, max(deadline - time.monotonic(), 0.1))
            if (header.get("reason") != "unknown_sender"
                    or time.monotonic() + delay >= deadline):
                break
            log.info("%s does not know us yet; asking again in %.1f s", peer_id, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        if header["type"] != FrameType.MODEL.value:
            raise TransportError(f"{peer_id} had no model: {header.get('reason')}")
        try:
            _, accepted = await asyncio.to_thread(self._receive, header, payloads, peer_id)
        except WireError as exc:
            raise TransportError(f"{peer_id} sent a bad model: {exc}") from exc
        return accepted

    async def report(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        if self.rendezvous is not None:
            await self.rendezvous.report(epoch, dict(metrics))

    def rejected(self) -> dict[str, dict[str, int]]:
        """Incoming messages refused so far, by transport name and reason code (``bad_digest``,
        ``chunk_timeout``, ...): nothing counted here reached the inbox."""
        counts = {self.transport.name: dict(self.transport.stats.rejected)}
        if self.webrtc is not None:
            counts[self.webrtc.name] = dict(self.webrtc.stats.rejected)
        return counts

