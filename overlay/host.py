"""The host: a peer's presence in the overlay.

It owns the rendezvous session (membership view) and the transports, and offers the learner
three things: ``send_model`` to one peer, ``fetch_model`` from one peer, and an inbox of
verified models pushed to us. It knows nothing about torch.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from overlay.errors import TransportError, WireError
from overlay.identity import Identity
from overlay.rendezvous_client import RendezvousClient
from overlay.transport.zeromq import Frames, ZmqTransport
from overlay.wire import (
    FrameType,
    Limits,
    ModelMessage,
    decode_model,
    encode_control,
    encode_model,
    model_parts,
    pack_header,
)

log = logging.getLogger(__name__)

# validator(msg) raises WireError to refuse a model (wrong architecture, NaN, ...).
Validator = Callable[[ModelMessage], None]
# on_member_event(kind, peer_id, detail): kind is "joined" (detail: member map) or "left"
# (detail: reason).
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
    send_timeout: float = 60.0
    """Bound on delivering one model to one peer, acknowledgement included."""
    fetch_timeout: float = 30.0
    """Bound on fetching one model from one peer (bootstrap)."""
    limits: Limits = Limits()
    """What we accept from others."""


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
        self._validator = validator
        self._on_member_event = on_member_event
        self._current: tuple[dict[str, Any], list[memoryview], ModelMessage] | None = None
        self.transport = ZmqTransport(identity, config.listen, self._on_message, config.limits)
        self.rendezvous: RendezvousClient | None = None
        self._events_task: asyncio.Task[None] | None = None
        self._closed = False

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
            self.config.rendezvous, self.identity, self.config.job, addrs, self.meta
        )
        try:
            welcome = await self.rendezvous.start()
        except BaseException:
            await self.transport.close()
            raise
        if addrs and not self.rendezvous.reachable_addrs:
            log.warning("the rendezvous could not dial back %s: peers will not reach us there",
                        addrs[0])
        self._events_task = asyncio.create_task(self._watch_membership(), name="membership")
        return welcome

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._events_task is not None:
            self._events_task.cancel()
            await asyncio.gather(self._events_task, return_exceptions=True)
        if self.rendezvous is not None:
            await self.rendezvous.close(leave=True)
        await self.transport.close()

    async def _watch_membership(self) -> None:
        assert self.rendezvous is not None
        addresses = {pid: self.address_of(pid) for pid in self.members}
        while True:
            kind, peer_id, detail = self._unpack_event(await self.rendezvous.events.get())
            if kind == "joined":
                addresses[peer_id] = self.address_of(peer_id)
                log.info("peer joined: %s (%s)", peer_id, addresses[peer_id] or "not reachable")
            else:
                log.info("peer left: %s (%s)", peer_id, detail)
                address = addresses.pop(peer_id, None)
                if address is not None:
                    self.transport.forget(address)
            if self._on_member_event is not None:
                self._on_member_event(kind, peer_id, detail)
            self.changed.set()

    @staticmethod
    def _unpack_event(event: tuple[Any, ...]) -> tuple[str, str, Any]:
        if event[0] == "joined":
            return "joined", event[1]["peer_id"], event[1]
        return event[0], event[1], event[2]

    def address_of(self, peer_id: str) -> str | None:
        member = self.members.get(peer_id)
        addrs = member.get("addrs") if member else None
        return addrs[0] if addrs else None

    def _public_key_of(self, peer_id: str) -> bytes | None:
        member = self.members.get(peer_id)
        return member["public_key"] if member else None

    # ---- our model, as served to get_model requests ----------------------------------------

    def publish(self, msg: ModelMessage) -> None:
        """Make ``msg`` the model we hand to peers that ask (newcomers). Encoded once here."""
        header, payloads = model_parts(msg, self.identity)
        self._current = (header, payloads, msg)

    def _current_frames(self, request_id: str) -> Frames | None:
        if self._current is None:
            return None
        header, payloads, _ = self._current
        return [pack_header(header, request_id=request_id), *payloads]

    # ---- incoming ------------------------------------------------------------------------

    async def _on_message(self, header: dict[str, Any], payloads: list[memoryview]) -> Frames:
        kind = header["type"]
        request_id = header.get("request_id")
        if kind == FrameType.MODEL.value:
            msg = await asyncio.to_thread(self._check_model, header, payloads)
            await self.inbox.put(msg)
            self.changed.set()
            log.info("received model epoch %d from %s (%d samples, %.1f MB)",
                     msg.epoch, msg.sender, msg.samples, msg.nbytes / 1e6)
            return [encode_control(FrameType.ACK, request_id=request_id, digest=msg.digest)]
        if kind == FrameType.GET_MODEL.value:
            if header.get("job") != self.config.job or self._public_key_of(
                str(header.get("sender"))
            ) is None:
                raise WireError("unknown_sender", "get_model from a peer outside our job")
            frames = self._current_frames(str(request_id))
            if frames is None:
                return [encode_control(FrameType.NACK, request_id=request_id, reason="not_ready",
                                       message="no model yet")]
            return frames
        raise WireError("unexpected", f"{kind} is not a request")

    def _check_model(self, header: dict[str, Any], payloads: list[memoryview]) -> ModelMessage:
        msg = decode_model(header, payloads, self._public_key_of, self.config.limits)
        if msg.job != self.config.job:
            raise WireError("wrong_job", f"model for job {msg.job!r}")
        if self._validator is not None:
            self._validator(msg)
        return msg

    # ---- outgoing ------------------------------------------------------------------------

    async def send_model(self, peer_id: str, frames: Frames, request_id: str) -> None:
        """Deliver encoded model ``frames`` to ``peer_id``; returns once it acknowledged."""
        address = self.address_of(peer_id)
        if address is None:
            raise TransportError(f"{peer_id}: no reachable address")
        started = time.monotonic()
        header, _ = await self.transport.request(
            address, frames, request_id, self.config.send_timeout
        )
        if header["type"] != FrameType.ACK.value:
            raise TransportError(f"{peer_id} refused our model: {header.get('reason')}"
                                 f" {header.get('message', '')}")
        log.debug("delivered to %s in %.2f s", peer_id, time.monotonic() - started)

    def encode(self, msg: ModelMessage) -> tuple[Frames, str]:
        """Encode ``msg`` once for sending to many peers; returns (frames, request_id)."""
        msg.request_id = secrets.token_hex(8)
        return encode_model(msg, self.identity), msg.request_id

    async def fetch_model(self, peer_id: str) -> ModelMessage:
        """Ask ``peer_id`` for its current model (newcomer bootstrap)."""
        address = self.address_of(peer_id)
        if address is None:
            raise TransportError(f"{peer_id}: no reachable address")
        request_id = secrets.token_hex(8)
        request = encode_control(FrameType.GET_MODEL, request_id=request_id,
                                 job=self.config.job, sender=self.peer_id)
        header, payloads = await self.transport.request(
            address, [request], request_id, self.config.fetch_timeout
        )
        if header["type"] != FrameType.MODEL.value:
            raise TransportError(f"{peer_id} had no model: {header.get('reason')}")
        try:
            return await asyncio.to_thread(self._check_model, header, payloads)
        except WireError as exc:
            raise TransportError(f"{peer_id} sent a bad model: {exc}") from exc

    async def report(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.rendezvous is not None:
            await self.rendezvous.report(epoch, metrics)
