"""What every transport shares: the frame and handler types and the counters."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Frames = Sequence[bytes | memoryview]
"""One message: the wire format's header frame, then its payload frames."""
Handler = Callable[[dict[str, Any], list[memoryview], str | None], Awaitable[Frames | None]]
"""handler(header, payloads, origin) -> reply frames, or None for no reply.

``origin`` is the peer id the transport authenticated the sender as: for ZeroMQ the member
whose CURVE key the connection's handshake proved, for WebRTC the link's peer (DTLS, with the
fingerprint in signed signaling); None for a sender that is not a member we know.
"""


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
