"""The host: a peer's presence in the overlay.

It owns the rendezvous session (membership view), the transports and the connection manager
(``overlay.connections``), and offers the learner: ``encode`` a model once, ``send_model`` it
to one peer, ``publish`` it for the peers that ask (newcomers), ``fetch_model`` from one peer,
and an ``inbox`` of models pushed to us. Every model received or fetched is decoded and
checked (digest, signature, limits) and handed to the learner's ``accept`` in a worker thread;
what ``accept`` returns is what the learner gets. Wire frames and request ids stay in here;
the host knows nothing about torch.

The host is the transports' :class:`overlay.transport.base.Directory`: a member's verified
address, its Ed25519 key, and the member a CURVE key belongs to (a forward map, kept for the
members we know: no key conversion runs backwards).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar, cast, overload

from overlay.connections import Connections, link_report
from overlay.errors import SignalError, TransportError, WireError
from overlay.events import Joined, LinkUp, MemberEvent
from overlay.identity import Identity, curve_public_key_from_ed25519
from overlay.membership import JobPolicy, Member
from overlay.models import EncodedModel, OutgoingModel, ReceivedModel
from overlay.pieces import (
    PIECE_BYTES,
    PIECE_BYTES_ZMQ,
    WINDOW,
    PieceStore,
    piece_bytes_of,
    piece_plan,
)
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
    decode_header,
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
        self.transport = ZmqTransport(identity, config.listen, self._on_message, config.limits,
                                      directory=self)
        self.webrtc: WebRtcTransport | None = None
        self.rendezvous: RendezvousClient | None = None
        self.connections: Connections | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._peer_of_curve: dict[bytes, str] = {}
        self._curve_of: dict[str, bytes] = {}
        self.state = HostState.NEW
        self._signal_guard = SignalGuard(identity.peer_id, config.job, self.public_key_of)
        """Opens the sealed signals addressed to us (overlay.signaling)."""
        self.pieces = PieceStore(config.limits)
        """Models being received in pieces, by sender (overlay.pieces)."""
        self._completed: dict[tuple[str, bytes], bytes] = {}
        """The answer to the piece that completed a model, by (sender, digest): resent to a
        sender that did not get it (its link broke) instead of opening the model again."""

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
            self, self.transport, self.webrtc,
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
                self._remember_curve_key(event.member)
            else:
                log.info("peer left: %s (%s)", event.peer_id, event.reason)
                curve = self._curve_of.pop(event.peer_id, None)
                if curve is not None:
                    self._peer_of_curve.pop(curve, None)
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

    # ---- the directory (overlay.transport.base.Directory) ----------------------------------

    def address_of(self, peer_id: str) -> str | None:
        member = self.members.get(peer_id)
        return member.address if member is not None else None

    def public_key_of(self, peer_id: str) -> bytes | None:
        member = self.members.get(peer_id)
        return member.public_key if member is not None else None

    def peer_of_curve_key(self, curve_public_key: bytes) -> str | None:
        """The member whose identity gives this CURVE key, or None. A forward map, filled on
        ``joined`` and emptied on ``left``; on a miss, members whose event is still on its
        way (or who came in the welcome) are converted and added first."""
        peer_id = self._peer_of_curve.get(curve_public_key)
        if peer_id is None:
            for pid, known in list(self.members.items()):
                if pid not in self._curve_of:
                    self._remember_curve_key(known)
            peer_id = self._peer_of_curve.get(curve_public_key)
        member = self.members.get(peer_id) if peer_id is not None else None
        if member is None or self._curve_of.get(member.peer_id) != curve_public_key:
            return None
        return member.peer_id

    def _remember_curve_key(self, member: Member) -> None:
        try:
            curve = curve_public_key_from_ed25519(member.public_key)
        except ValueError:  # the rendezvous checked the key; libsodium refuses it anyway
            return
        old = self._curve_of.get(member.peer_id)
        if old is not None and old != curve:
            self._peer_of_curve.pop(old, None)
        self._curve_of[member.peer_id] = curve
        self._peer_of_curve[curve] = member.peer_id

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
        """One piece of a model (overlay.pieces): ``ack {have}``, or the model's own answer
        once the piece completed it."""
        request_id = header.get("request_id")
        if len(payloads) != 1:
            raise WireError("bad_piece", f"a piece carries one payload, not {len(payloads)}")
        digest = header.get("model")
        done = self._completed.get((origin, digest)) if isinstance(digest, bytes) else None
        if done is not None:
            return done
        partial = self.pieces.add(origin, header, payloads[0])
        if not partial.complete:
            return encode_control(FrameType.ACK, request_id=request_id, have=partial.have)
        frames = partial.frames()
        model_header = decode_header(frames[0], self.config.limits)
        if model_header.get("type") != FrameType.MODEL.value:
            raise WireError("bad_piece", "the pieces do not make a model")
        if model_header.get("digest") != partial.digest:
            raise WireError("bad_piece", "the model's digest is not the one its pieces named")
        try:
            digest = await self._take_model(model_header, frames[1:], origin)
        except WireError as exc:
            answer = encode_control(FrameType.NACK, request_id=request_id, reason=exc.reason,
                                    message=str(exc)[:200])
            self._remember_answer(origin, partial.digest, answer)
            raise
        answer = encode_control(FrameType.ACK, request_id=request_id, digest=digest,
                                have=partial.total)
        self._remember_answer(origin, partial.digest, answer)
        return answer

    def _remember_answer(self, origin: str, digest: bytes, answer: bytes) -> None:
        self._completed[(origin, digest)] = answer
        while len(self._completed) > 64:
            del self._completed[next(iter(self._completed))]

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
        msg = decode_model(header, payloads, self.public_key_of, self.config.limits)
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
            await self._send_pieces(peer_id, model)
        else:
            request_id = secrets.token_hex(8)
            frames: Frames = [pack_header(model.header, request_id=request_id),
                              *model.payloads]
            header, _ = await self._request(peer_id, frames, request_id,
                                            self.config.send_timeout)
            _check_ack(peer_id, header)
        log.debug("delivered to %s in %.2f s", peer_id, time.monotonic() - started)

    async def _send_pieces(self, peer_id: str, model: EncodedModel) -> None:
        frames = [memoryview(pack_header(model.header)), *model.payloads]
        lengths = [f.nbytes for f in frames]
        todo = collections.deque(piece_plan(sum(lengths), self._piece_bytes(peer_id)))
        base = {"job": self.config.job, "sender": self.peer_id, "model": model.digest,
                "frames": lengths}
        progress = [time.monotonic(), 0]  # last acknowledged, bytes acknowledged
        finished = asyncio.Event()
        retries = 0

        async def worker() -> None:
            nonlocal retries
            while todo and not finished.is_set():
                offset, length = todo.popleft()
                request_id = secrets.token_hex(8)
                head = encode_control(FrameType.PIECE, request_id=request_id, offset=offset,
                                      **base)
                try:
                    header, _ = await self._request(
                        peer_id, [head, piece_bytes_of(frames, offset, length)], request_id,
                        self.config.send_timeout)
                except TransportError as exc:
                    if not progress[1]:  # nothing acknowledged yet: nothing to resume
                        raise
                    todo.appendleft((offset, length))  # again, once the link is back
                    retries += 1
                    log.info("piece at %d to %s failed (%s); sending it again", offset,
                             peer_id, exc)
                    await asyncio.sleep(min(0.2 * retries, 2.0))
                    continue
                _check_ack(peer_id, header)
                progress[0] = time.monotonic()
                progress[1] += length
                if "digest" in header:
                    finished.set()

        workers = [asyncio.create_task(worker(), name=f"piece-{peer_id[:8]}")
                   for _ in range(WINDOW)]
        done_waiter = asyncio.create_task(finished.wait())
        try:
            while not finished.is_set():
                alive = [w for w in workers if not w.done()]
                for w in workers:
                    if w.done() and not w.cancelled() and w.exception() is not None:
                        raise w.exception()  # type: ignore[misc]
                if not alive:
                    raise TransportError(f"{peer_id}: every piece was sent but the model "
                                         "was not confirmed")
                wait = progress[0] + self.config.stall_timeout - time.monotonic()
                if wait <= 0:
                    raise TransportError(
                        f"{peer_id}: delivery stalled, no piece acknowledged for "
                        f"{self.config.stall_timeout:.0f} s ({progress[1]}/{sum(lengths)} "
                        "bytes)")
                await asyncio.wait([*alive, done_waiter], timeout=min(wait, 1.0),
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            tasks: list[asyncio.Task[Any]] = [*workers, done_waiter]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*workers, done_waiter, return_exceptions=True)
        if retries:
            log.info("delivered to %s after %d piece retries (resumed, not restarted)",
                     peer_id, retries)

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


def _check_ack(peer_id: str, header: dict[str, Any]) -> None:
    if header["type"] != FrameType.ACK.value:
        raise TransportError(f"{peer_id} refused our model: {header.get('reason')}"
                             f" {header.get('message', '')}")
