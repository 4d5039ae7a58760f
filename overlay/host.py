"""The host: a peer's presence in the overlay.

It owns the rendezvous session (membership view) and the transports, and offers the learner
three things: ``send_model`` to one peer, ``fetch_model`` from one peer, and an inbox of
verified models pushed to us. It knows nothing about torch.

Connection manager: towards a peer whose ZeroMQ address the rendezvous verified, we use
ZeroMQ; towards any other peer a WebRTC data channel (ICE finds a direct path through the
NATs or falls back to the TURN relay). The first exchange on a link is a ``ping``; its round
trip is the link's set-up time. A link that fails is retried with exponential back-off. Each
link's kind (zmq, webrtc-direct, webrtc-relay) and set-up time are logged and reported to the
rendezvous (``GET /peers`` shows them).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from overlay.errors import SignalError, TransportError, WireError
from overlay.identity import Identity, ed25519_candidates_from_curve, peer_id_from_public_key
from overlay.membership import JobPolicy
from overlay.rendezvous_client import RendezvousClient
from overlay.signaling import SignalGuard, seal
from overlay.transport.base import Frames
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

# validator(msg) raises WireError to refuse a model (wrong architecture, NaN, ...).
Validator = Callable[[ModelMessage], None]
# on_member_event(kind, peer_id, detail): "joined" (detail: member map), "left" (detail: reason)
# or "link" (detail: {"kind", "connect_s"}).
MemberListener = Callable[[str, str, Any], None]


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
    """Bound on delivering one model to one peer, link set-up and acknowledgement included."""
    fetch_timeout: float = 60.0
    """Bound on fetching one model from one peer (bootstrap)."""
    connect_timeout: float = 20.0
    """Bound on setting up a link (the first ``ping`` round trip, ICE included)."""
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


@dataclass
class _Backoff:
    delay: float
    not_before: float


class Host:
    def __init__(
        self,
        identity: Identity,
        config: HostConfig,
        meta: dict[str, Any] | None = None,
        validator: Validator | None = None,
        on_member_event: MemberListener | None = None,
    ) -> None:
        self.identity = identity
        self.config = config
        self.meta = dict(meta or {})
        self.inbox: asyncio.Queue[ModelMessage] = asyncio.Queue()
        self.changed = asyncio.Event()  # set whenever the inbox or the membership changes
        self.links: dict[str, dict[str, Any]] = {}  # peer id -> {"kind", "connect_s"}
        self._validator = validator
        self._on_member_event = on_member_event
        self._current: tuple[dict[str, Any], list[memoryview], ModelMessage] | None = None
        self.transport = ZmqTransport(identity, config.listen, self._on_message, config.limits,
                                      peer_of=self._member_with_curve_key)
        self.webrtc: WebRtcTransport | None = None
        self.rendezvous: RendezvousClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connecting: dict[str, asyncio.Task[None]] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._closed = False
        self._signal_guard = SignalGuard(identity.peer_id, config.job, self._public_key_of)
        """Opens the sealed signals addressed to us (overlay.signaling)."""

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def members(self) -> dict[str, dict[str, Any]]:
        return self.rendezvous.members if self.rendezvous is not None else {}

    async def start(self) -> dict[str, Any]:
        bound = await self.transport.start()
        addrs = [self.config.advertise or bound] if bound else []
        self.rendezvous = RendezvousClient(
            self.config.rendezvous, self.identity, self.config.job, addrs, self.meta,
            membership=self.config.membership,
        )
        try:
            welcome = await self.rendezvous.start()
        except BaseException:
            await self.transport.close()
            raise
        if addrs and not self.rendezvous.reachable_addrs:
            log.warning("the rendezvous could not dial back %s: peers will reach us over WebRTC",
                        addrs[0])
        self.webrtc = WebRtcTransport(
            self.identity, self.rendezvous.ice_servers, self._on_message, self.config.limits,
            send_signal=self._send_signal,
            ice_transport_policy=self.config.ice_transport_policy,
            connect_timeout=self.config.connect_timeout,
        )
        self._tasks = [
            asyncio.create_task(self._watch_membership(), name="membership"),
            asyncio.create_task(self._pump_signals(), name="signals"),
        ]
        return welcome

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [*self._tasks, *self._connecting.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.rendezvous is not None:
            await self.rendezvous.close(leave=True)
        if self.webrtc is not None:
            await self.webrtc.close()
        await self.transport.close()

    # ---- membership and signaling ----------------------------------------------------------

    async def _watch_membership(self) -> None:
        assert self.rendezvous is not None
        addresses = {pid: self.address_of(pid) for pid in self.members}
        while True:
            kind, peer_id, detail = self._unpack_event(await self.rendezvous.events.get())
            if kind == "joined":
                addresses[peer_id] = self.address_of(peer_id)
                log.info("peer joined: %s (%s)", peer_id, addresses[peer_id] or "behind NAT")
            else:
                log.info("peer left: %s (%s)", peer_id, detail)
                await self._forget(peer_id, addresses.pop(peer_id, None))
            self._notify(kind, peer_id, detail)
            self.changed.set()

    async def _forget(self, peer_id: str, address: str | None) -> None:
        self.links.pop(peer_id, None)
        self._backoff.pop(peer_id, None)
        if address is not None:
            self.transport.forget(address)
        if self.webrtc is not None:
            await self.webrtc.forget(peer_id)

    def _notify(self, kind: str, peer_id: str, detail: Any) -> None:
        if self._on_member_event is not None:
            self._on_member_event(kind, peer_id, detail)

    @staticmethod
    def _unpack_event(event: tuple[Any, ...]) -> tuple[str, str, Any]:
        if event[0] == "joined":
            return "joined", event[1]["peer_id"], event[1]
        return event[0], event[1], event[2]

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

    async def _send_signal(self, to: str, kind: str, body: dict[str, Any]) -> None:
        """What the WebRTC transport sends to ``to``, sealed (overlay.signaling), relayed."""
        assert self.rendezvous is not None
        await self.rendezvous.send_signal(to, kind, seal(self.identity, to, self.config.job,
                                                         kind, body))

    def address_of(self, peer_id: str) -> str | None:
        member = self.members.get(peer_id)
        addrs = member.get("addrs") if member else None
        return addrs[0] if addrs else None

    def _public_key_of(self, peer_id: str) -> bytes | None:
        member = self.members.get(peer_id)
        return member["public_key"] if member else None

    def _member_with_curve_key(self, curve_public_key: bytes) -> str | None:
        """The member whose identity gives this CURVE key (ZeroMQ's ``peer_of``), or None."""
        try:
            candidates = ed25519_candidates_from_curve(curve_public_key)
        except ValueError:
            return None
        for public_key in candidates:
            peer_id = peer_id_from_public_key(public_key)
            if self._public_key_of(peer_id) == public_key:
                return peer_id
        return None

    async def _zmq_request(
        self, peer_id: str, address: str, frames: Frames, request_id: str, timeout: float
    ) -> tuple[dict[str, Any], list[memoryview]]:
        """A ZeroMQ request to ``peer_id``: CURVE proves the listener holds its key."""
        public_key = self._public_key_of(peer_id)
        if public_key is None:
            raise TransportError(f"{peer_id} is not a member of our job")
        return await self.transport.request(address, public_key, frames, request_id, timeout)

    # ---- the connection manager ------------------------------------------------------------

    async def _exchange(
        self, peer_id: str, frames: Frames, request_id: str, timeout: float
    ) -> tuple[dict[str, Any], list[memoryview]]:
        """One request/reply with ``peer_id`` over the right transport, link set up first."""
        if peer_id not in self.members:
            raise TransportError(f"{peer_id} is not a member of our job")
        if peer_id not in self.links:
            await self._ensure_link(peer_id)
        address = self.address_of(peer_id)
        if address is not None:
            return await self._zmq_request(peer_id, address, frames, request_id, timeout)
        assert self.webrtc is not None
        return await self.webrtc.request(peer_id, frames, request_id, timeout)

    async def _ensure_link(self, peer_id: str) -> None:
        backoff = self._backoff.get(peer_id)
        now = time.monotonic()
        if backoff is not None and now < backoff.not_before:
            raise TransportError(f"{peer_id}: link failed, retrying in "
                                 f"{backoff.not_before - now:.1f} s")
        task = self._connecting.get(peer_id)
        if task is None:  # concurrent callers share one attempt
            task = self._connecting[peer_id] = asyncio.create_task(self._connect(peer_id))
            task.add_done_callback(lambda _t: self._connecting.pop(peer_id, None))
        await asyncio.shield(task)

    async def _connect(self, peer_id: str) -> None:
        started = time.monotonic()
        address = self.address_of(peer_id)
        request_id = secrets.token_hex(8)
        ping = [encode_control(FrameType.PING, request_id=request_id)]
        try:
            if address is not None:
                kind = "zmq"
                header, _ = await self._zmq_request(
                    peer_id, address, ping, request_id, self.config.connect_timeout)
            else:
                assert self.webrtc is not None
                header, _ = await self.webrtc.request(
                    peer_id, ping, request_id, self.config.connect_timeout)
                info = self.webrtc.link_info(peer_id) or {}
                kind = info.get("kind") or "webrtc-direct"
            if header.get("type") != FrameType.PONG.value:
                raise TransportError(f"{peer_id} answered ping with {header.get('type')!r}")
        except TransportError as exc:
            previous = self._backoff.get(peer_id)
            delay = (min(previous.delay * 2, self.config.backoff_max) if previous
                     else self.config.backoff_initial)
            delay *= random.uniform(0.8, 1.2)
            self._backoff[peer_id] = _Backoff(delay, time.monotonic() + delay)
            log.warning("link to %s failed (%s); retrying in %.1f s", peer_id, exc, delay)
            raise
        connect_s = time.monotonic() - started
        self._backoff.pop(peer_id, None)
        self.links[peer_id] = {"kind": kind, "connect_s": round(connect_s, 4)}
        log.info("link to %s: %s, set up in %.2f s", peer_id, kind, connect_s)
        self._notify("link", peer_id, self.links[peer_id])
        if self.rendezvous is not None:
            await self.rendezvous.report_links(self.links)

    def _link_lost(self, peer_id: str, exc: TransportError) -> None:
        """A request failed: the next one sets the link up again (through the back-off)."""
        if self.links.pop(peer_id, None) is not None:
            log.info("link to %s lost: %s", peer_id, exc)

    # ---- our model, as served to get_model requests ----------------------------------------

    def _parts(self, msg: ModelMessage) -> tuple[dict[str, Any], list[memoryview]]:
        """Encode in the message's codec; a model the codec cannot carry (say a value beyond
        fp16's range) goes raw instead."""
        try:
            return model_parts(msg, self.identity)
        except WireError as exc:
            if msg.codec == "raw":
                raise
            log.warning("epoch %d cannot travel as %s (%s): sending it raw", msg.epoch,
                        msg.codec, exc)
            msg.codec = "raw"
            return model_parts(msg, self.identity)

    def publish(self, msg: ModelMessage) -> None:
        """Make ``msg`` the model we hand to peers that ask (newcomers). Encoded once here."""
        header, payloads = self._parts(msg)
        self._current = (header, payloads, msg)

    def _current_frames(self, request_id: str) -> Frames | None:
        if self._current is None:
            return None
        header, payloads, _ = self._current
        return [pack_header(header, request_id=request_id), *payloads]

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
            msg = await asyncio.to_thread(self._check_model, header, payloads, origin)
            await self.inbox.put(msg)
            self.changed.set()
            log.info("received model epoch %d from %s (%d samples, %.1f MB)",
                     msg.epoch, msg.sender, msg.samples, msg.nbytes / 1e6)
            return [encode_control(FrameType.ACK, request_id=request_id, digest=msg.digest)]
        if kind == FrameType.GET_MODEL.value:
            if origin is None:  # the header's "sender" is not proof of anything
                raise WireError("unknown_sender", "get_model from a peer outside our job")
            frames = self._current_frames(str(request_id))
            if frames is None:
                return [encode_control(FrameType.NACK, request_id=request_id, reason="not_ready",
                                       message="no model yet")]
            return frames
        raise WireError("unexpected", f"{kind} is not a request")

    def _check_model(
        self, header: dict[str, Any], payloads: list[memoryview], origin: str
    ) -> ModelMessage:
        """Decode and check a model that ``origin`` (authenticated by the transport) sent."""
        if header.get("sender") != origin:  # a signed model relayed or replayed by another
            raise WireError("sender_mismatch",
                            f"a model signed as {header.get('sender')!r} came from {origin}")
        msg = decode_model(header, payloads, self._public_key_of, self.config.limits)
        if msg.job != self.config.job:
            raise WireError("wrong_job", f"model for job {msg.job!r}")
        if self._validator is not None:
            self._validator(msg)
        return msg

    # ---- outgoing ------------------------------------------------------------------------

    def encode(self, msg: ModelMessage) -> tuple[Frames, str]:
        """Encode ``msg`` once for sending to many peers; returns (frames, request_id)."""
        msg.request_id = secrets.token_hex(8)
        header, payloads = self._parts(msg)
        return [pack_header(header), *payloads], msg.request_id

    async def send_model(self, peer_id: str, frames: Frames, request_id: str) -> None:
        """Deliver encoded model ``frames`` to ``peer_id``; returns once it acknowledged."""
        started = time.monotonic()
        try:
            header, _ = await self._exchange(peer_id, frames, request_id,
                                             self.config.send_timeout)
        except TransportError as exc:
            self._link_lost(peer_id, exc)
            raise
        if header["type"] != FrameType.ACK.value:
            raise TransportError(f"{peer_id} refused our model: {header.get('reason')}"
                                 f" {header.get('message', '')}")
        log.debug("delivered to %s in %.2f s", peer_id, time.monotonic() - started)

    async def fetch_model(self, peer_id: str) -> ModelMessage:
        """Ask ``peer_id`` for its current model (newcomer bootstrap).

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
            try:
                header, payloads = await self._exchange(
                    peer_id, [request], request_id, max(deadline - time.monotonic(), 0.1))
            except TransportError as exc:
                self._link_lost(peer_id, exc)
                raise
            if (header.get("reason") != "unknown_sender"
                    or time.monotonic() + delay >= deadline):
                break
            log.info("%s does not know us yet; asking again in %.1f s", peer_id, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        if header["type"] != FrameType.MODEL.value:
            raise TransportError(f"{peer_id} had no model: {header.get('reason')}")
        try:
            return await asyncio.to_thread(self._check_model, header, payloads, peer_id)
        except WireError as exc:
            raise TransportError(f"{peer_id} sent a bad model: {exc}") from exc

    async def report(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.rendezvous is not None:
            await self.rendezvous.report(epoch, metrics)
