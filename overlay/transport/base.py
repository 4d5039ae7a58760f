"""The transport contract: what every transport (ZeroMQ, WebRTC) implements and shares.

A transport moves request/reply exchanges of *frames* (the wire format's header frame, then
its payload frames) to and from remote peers, addressed by peer id. The host never needs to
know which transport it holds: ``overlay.connections`` picks one per remote peer.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self

from overlay.identity import curve_public_key_from_ed25519
from overlay.wire import Limits

Frames = Sequence[bytes | memoryview]
"""One message: the wire format's header frame, then its payload frames."""
Reply = tuple[dict[str, Any], list[memoryview]]
"""A reply: its decoded header, then its payload frames (views into the received buffers)."""
Handler = Callable[[dict[str, Any], list[memoryview], str | None], Awaitable[Frames | None]]
"""handler(header, payloads, origin) -> reply frames, or None for no reply.

``origin`` is the peer id the transport authenticated the sender as: for ZeroMQ the member
whose CURVE key the connection's handshake proved, for WebRTC the link's peer (DTLS, with the
fingerprint in signed signaling); None for a sender that is not a member we know.
"""


def max_parts(limits: Limits) -> int:
    """Frames one message may have: header, payloads (one per array) and some slack."""
    return limits.max_arrays + 3


def max_frame(limits: Limits) -> int:
    """The largest single frame a receiver with ``limits`` accepts."""
    return limits.max_total_bytes + limits.max_header_bytes


class LinkKind(enum.StrEnum):
    """How a link to a remote peer was made (logged, reported, shown by ``GET /peers``)."""

    ZMQ = "zmq"
    """ZeroMQ (CURVE) to a peer whose address the rendezvous dialed back."""
    WEBRTC_DIRECT = "webrtc-direct"
    """A WebRTC data channel over a direct path (host, server- or peer-reflexive pair)."""
    WEBRTC_RELAY = "webrtc-relay"
    """A WebRTC data channel relayed by TURN."""


class Directory(Protocol):
    """What a transport may ask the host about the members of the job."""

    def address_of(self, peer_id: str) -> str | None:
        """The verified ZeroMQ address of ``peer_id`` (None: not reachable, or no member)."""

    def public_key_of(self, peer_id: str) -> bytes | None:
        """The Ed25519 public key of member ``peer_id`` (None: no member)."""

    def peer_of_curve_key(self, curve_public_key: bytes) -> str | None:
        """The member whose identity gives this CURVE public key, or None."""


@dataclass
class TransportStats:
    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    """Refused incoming messages, by reason code."""

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class Transport(abc.ABC):
    """Request/reply with remote peers, addressed by peer id.

    Use as ``async with transport:`` (or ``start()`` / ``close()``); ``close()`` cancels and
    awaits every task the transport owns and is safe to call twice.
    """

    name: ClassVar[str]
    """Short name used in logs and refusal counters: ``zmq`` or ``webrtc``."""
    stats: TransportStats

    async def start(self) -> None:  # noqa: B027 (optional: not every transport listens)
        """Start listening / serving (default: nothing to start)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop everything; safe to call twice."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def request(
        self, peer_id: str, frames: Frames, request_id: str, *, timeout: float
    ) -> Reply:
        """Send ``frames`` to ``peer_id`` and wait for the reply carrying ``request_id``.

        ``timeout`` bounds the whole exchange (link set-up, sending, the remote's work, the
        reply). Raises ``TransportError`` on timeout, refusal or a link that ends; a ``nack``
        is returned as a reply like any other.
        """

    @abc.abstractmethod
    async def forget(self, peer_id: str) -> None:
        """Close and drop whatever the transport holds for ``peer_id`` (a peer that left)."""

    @abc.abstractmethod
    def link_kind(self, peer_id: str) -> LinkKind | None:
        """The kind of the open link to ``peer_id``; None while there is none."""


class StaticDirectory:
    """A :class:`Directory` held in a table: for tests, benchmarks and tools that know their
    peers beforehand (the host answers from its membership instead)."""

    def __init__(self) -> None:
        self._members: dict[str, tuple[bytes, str | None]] = {}
        self._by_curve_key: dict[bytes, str] = {}

    def add(self, peer_id: str, public_key: bytes, address: str | None = None) -> None:
        """Record member ``peer_id`` with its Ed25519 key and its ZeroMQ address, if any."""
        self._members[peer_id] = (public_key, address)
        self._by_curve_key[curve_public_key_from_ed25519(public_key)] = peer_id

    def address_of(self, peer_id: str) -> str | None:
        member = self._members.get(peer_id)
        return member[1] if member is not None else None

    def public_key_of(self, peer_id: str) -> bytes | None:
        member = self._members.get(peer_id)
        return member[0] if member is not None else None

    def peer_of_curve_key(self, curve_public_key: bytes) -> str | None:
        return self._by_curve_key.get(curve_public_key)
