"""Configuration of the rendezvous service (one dataclass; the CLI only fills it in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from overlay.protocol import MAX_MESSAGE_BYTES


@dataclass
class RendezvousConfig:
    """Settings of one rendezvous server. Durations are in seconds."""

    host: str = "0.0.0.0"
    """Address the HTTP/WebSocket server binds to."""

    port: int = 5555
    """TCP port of the HTTP/WebSocket server; 0 picks a free one (see ``RendezvousServer.port``)."""

    ttl: float = 15.0
    """A registration expires this long after the peer's last message (heartbeat or other)."""

    heartbeat_interval: float = 5.0
    """How often peers are told to send ``heartbeat``; must be well below ``ttl``."""

    dialback_timeout: float = 3.0
    """Bound on one dial-back probe of an offered ZeroMQ address (connect + signed answer)."""

    join_timeout: float = 10.0
    """A new WebSocket must send ``join`` within this time or it is closed."""

    max_message_bytes: int = MAX_MESSAGE_BYTES
    """Largest accepted WebSocket message; bigger ones close the socket (code 1009)."""

    max_errors: int = 5
    """A joined session that sent this many bad messages is closed."""

    history_len: int = 100
    """How many ``report`` messages are kept per peer (older ones are dropped)."""

    send_queue_limit: int = 256
    """Messages queued for one slow socket before it is closed rather than buffered further."""

    close_timeout: float = 2.0
    """How long closing a WebSocket waits for the peer's close frame."""

    shutdown_timeout: float = 5.0
    """How long ``close()`` waits for open connections before cancelling their handlers."""

    server_name: str = "peerlearn-rendezvous"
    """Name sent in ``challenge.server``."""

    ice_servers: list[dict[str, Any]] = field(default_factory=list)
    """ICE servers handed to peers in ``welcome`` (STUN/TURN are not wired in yet)."""

    def __post_init__(self) -> None:
        if self.ttl <= 0 or self.heartbeat_interval <= 0:
            raise ValueError("ttl and heartbeat_interval must be positive")
        if self.heartbeat_interval >= self.ttl:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval}) must be below ttl ({self.ttl})"
            )
        if self.dialback_timeout <= 0 or self.join_timeout <= 0:
            raise ValueError("dialback_timeout and join_timeout must be positive")
        if self.max_message_bytes <= 0 or self.max_errors <= 0 or self.history_len <= 0:
            raise ValueError("max_message_bytes, max_errors and history_len must be positive")
