"""Configuration of the rendezvous service (one dataclass; the CLI only fills it in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from overlay.membership import JobPolicy
from overlay.protocol import JOB_RE, MAX_MESSAGE_BYTES


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

    stun_port: int | None = 3478
    """UDP port of the built-in STUN binding server; 0 picks a free one (see
    ``RendezvousServer.stun_port``); None or -1 disables it (and its ``welcome`` entry)."""

    stun_host: str | None = None
    """Address the STUN server binds to; None: the same as ``host``."""

    stun_rate_limit: float = 50.0
    """STUN requests per second allowed per source IP (burst 50); 0 disables the limit."""

    public_host: str | None = None
    """Host name or IP put in the ``stun:`` URL handed to peers. None: the host the peer used to
    reach this server (its Host header), else the local address of its connection. Never a
    third-party server."""

    turn_urls: list[str] = field(default_factory=list)
    """coturn URLs (``turn:HOST:PORT``, ``turns:...``, ``?transport=tcp``) handed to peers with
    fresh credentials; empty: no TURN. Needs ``turn_secret``."""

    turn_secret: str | None = field(default=None, repr=False)
    """coturn's ``static-auth-secret`` (``use-auth-secret``); never logged nor served."""

    turn_ttl: float = 3600.0
    """Lifetime of the TURN credentials in a ``welcome`` (a reconnect gets new ones)."""

    signal_rate: float = 100.0
    """Relayed ``signal`` messages per second allowed per session; 0 disables the limit."""

    signal_burst: float = 400.0
    """How many signals a session may send at once (ICE trickles many candidates quickly)."""

    ice_servers: list[dict[str, Any]] = field(default_factory=list)
    """Extra ICE servers appended to our own STUN/TURN in ``welcome`` (default: none)."""

    jobs: dict[str, JobPolicy] = field(default_factory=dict)
    """Per-job admission policy (join secret and/or allowed peer ids, ``overlay.membership``);
    a job not named here is open, unless ``closed``. Secrets never appear in ``repr``."""

    closed: bool = False
    """Refuse every job that has no entry in ``jobs`` (a private rendezvous)."""

    expose_addresses: bool = False
    """Show the peers' ZeroMQ addresses on ``GET /peers`` and the dashboard (default: only
    whether a peer is reachable). Observed IPs and join proofs are never shown."""

    dialback_any_host: bool = False
    """Dial back offered addresses on any host. Default: only addresses on the IP the peer's
    WebSocket came from, so the rendezvous cannot be aimed at third parties; set this behind a
    reverse proxy, where that IP is the proxy's."""

    message_rate: float = 200.0
    """Messages per second allowed per session, of any type (signals included); 0: no limit.
    Beyond it messages are answered ``rate_limited`` and count towards ``max_errors``."""

    message_burst: float = 600.0
    """How many messages a session may send at once (link set-up sends bursts of signals)."""

    failed_join_rate: float = 0.5
    """Refused joins per second allowed per source IP; beyond it (once ``failed_join_burst``
    is spent) that IP's joins are refused as ``rate_limited`` before any check. 0: no limit."""

    failed_join_burst: float = 20.0
    """How many refused joins a source IP may have in a row before ``failed_join_rate`` applies."""

    def policy_for(self, job: str) -> JobPolicy | None:
        """The job's policy; None if it has none (open; refused altogether when ``closed``)."""
        return self.jobs.get(job)

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
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is not a TCP port (0 picks a free one)")
        if self.stun_port == -1:
            self.stun_port = None
        if self.stun_port is not None and not 0 <= self.stun_port < 65536:
            raise ValueError(f"stun_port {self.stun_port} is not a UDP port (or -1 to disable)")
        for url in self.turn_urls:
            if not url.startswith(("turn:", "turns:")):
                raise ValueError(f"TURN URL {url!r} must start with turn: or turns:")
        if self.turn_urls and not self.turn_secret:
            raise ValueError("TURN URLs need a turn_secret (coturn use-auth-secret)")
        if self.turn_secret and not self.turn_urls:
            raise ValueError("a TURN secret without TURN URLs")
        if self.turn_ttl <= 0:
            raise ValueError("turn_ttl must be positive")
        for job in self.jobs:
            if not JOB_RE.match(job):
                raise ValueError(f"job name {job[:80]!r} must match {JOB_RE.pattern}")
        if self.message_rate < 0 or self.message_burst < 1 or self.failed_join_rate < 0 or (
            self.failed_join_burst < 1
        ):
            raise ValueError("message/failed-join rates must be >= 0 and bursts >= 1")
