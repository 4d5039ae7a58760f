"""One WebSocket of the rendezvous: the stage of its session and its outgoing frames.

Every outgoing frame goes through the connection's outbox, written by one task, so the
session code never awaits a slow socket. Back-pressure: a socket that does not read is closed
("too slow") once ``limit`` ordinary frames wait, while membership frames (``joined`` /
``left``) about one peer replace each other in place (bounded by the job's size).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import OrderedDict
from collections.abc import Mapping

from aiohttp import WSCloseCode, web

from overlay.protocol import MAX_MEMBERS
from rendezvous.ratelimit import TokenBucket

log = logging.getLogger(__name__)


class Stage(enum.Enum):
    """Where a WebSocket session stands (``Connection.stage``)."""

    CHALLENGED = "challenged"
    """The challenge is sent; a ``join`` must come within ``join_timeout``."""
    ADMITTING = "admitting"
    """A ``join`` came: signature, job policy, room and dial-back are being checked."""
    JOINED = "joined"
    """Registered as ``peer_id``: heartbeats, reports, links and signals."""
    CLOSING = "closing"
    """Queued frames go out, then the close frame; nothing more is queued."""
    CLOSED = "closed"
    """The writer is done (closed, or the socket failed)."""


_ENDING = frozenset({Stage.CLOSING, Stage.CLOSED})  # a close, or the socket failing
TRANSITIONS: Mapping[Stage, frozenset[Stage]] = {
    Stage.CHALLENGED: _ENDING | {Stage.ADMITTING},
    Stage.ADMITTING: _ENDING | {Stage.JOINED},
    Stage.JOINED: _ENDING,
    Stage.CLOSING: frozenset({Stage.CLOSED}),
    Stage.CLOSED: frozenset(),
}
"""The stage changes a session may make (anything else is a bug: ``RuntimeError``)."""


class Connection:
    """One WebSocket: its session's stage, who it is (``peer_id`` once joined) and its outbox.

    The outbox keeps order, with one exception: a ``joined`` / ``left`` about a peer replaces
    the one about the same peer still waiting (in its place), so the membership backlog of a
    socket is bounded by the job's size, and a burst of joins does not make a healthy but
    momentarily behind peer "too slow". Only the other frames count towards ``limit``.
    """

    def __init__(
        self, ws: web.WebSocketResponse, session: int, remote: str, limit: int, host: str = ""
    ) -> None:
        self.ws = ws
        self.session = session
        self.remote = remote
        """The IP the WebSocket came from (the peer's observed IP)."""
        self.host = host
        """The rendezvous host as this peer reaches it (goes in the ``stun:`` URL)."""
        self.peer_id: str | None = None
        self._stage = Stage.CHALLENGED
        self._signals: TokenBucket | None = None
        self._limit = limit
        # key: a peer id (membership frames, coalesced) or a sequence number (all others)
        self._outbox: OrderedDict[str | int, bytes] = OrderedDict()
        self._frames = 0  # frames in the outbox keyed by sequence number
        self._seq = 0
        self._ready = asyncio.Event()
        self._close_code: int = WSCloseCode.OK
        self._close_message = b""
        self._writer = asyncio.create_task(self._write_loop(), name=f"rendezvous-ws-{session}")

    # -- the session's stage ---------------------------------------------------------------

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def closing(self) -> bool:
        """True once nothing more is sent (closing or closed)."""
        return self._stage in (Stage.CLOSING, Stage.CLOSED)

    def _set_state(self, new: Stage) -> None:
        """The one place the stage changes; ``TRANSITIONS`` says which changes are allowed."""
        old = self._stage
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"session {self.session}: {old.value} -> {new.value} not allowed")
        log.debug("session %d (%s): %s -> %s", self.session, self.peer_id or self.remote,
                  old.value, new.value)
        self._stage = new

    def admitting(self) -> None:
        """A ``join`` arrived and is being checked."""
        self._set_state(Stage.ADMITTING)

    def joined(self, peer_id: str) -> None:
        """The join is registered: this socket now speaks for ``peer_id``."""
        self.peer_id = peer_id
        self._set_state(Stage.JOINED)

    # -- outgoing frames -------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        if self.closing:
            return
        if self._frames >= self._limit:
            self._too_slow()
            return
        self._seq += 1
        self._outbox[self._seq] = frame
        self._frames += 1
        self._ready.set()

    def send_membership(self, peer_id: str, frame: bytes) -> None:
        """Queue a ``joined`` / ``left`` about ``peer_id``, replacing one not yet sent."""
        if self.closing:
            return
        if peer_id not in self._outbox and len(self._outbox) - self._frames >= 2 * MAX_MEMBERS:
            self._too_slow()  # more distinct peers than a job holds: this socket is stuck
            return
        self._outbox[peer_id] = frame
        self._ready.set()

    def _too_slow(self) -> None:
        log.warning("session %d (%s): too slow, closing", self.session, self.peer_id)
        self.close_soon(WSCloseCode.TRY_AGAIN_LATER, b"too slow")

    def take_signal_token(self, now: float, rate: float, burst: float) -> bool:
        """Token bucket for relayed signals (``rate`` per second, ``burst`` at once)."""
        if self._signals is None:
            self._signals = TokenBucket(rate, burst)
        return self._signals.take(now)

    def close_soon(self, code: int = WSCloseCode.OK, message: bytes = b"") -> None:
        """Send what is queued, then close the socket."""
        if self.closing:
            return
        self._set_state(Stage.CLOSING)
        self._close_code, self._close_message = code, message
        self._ready.set()

    async def finish(self, timeout: float) -> None:
        """Close (after the queued frames) and wait for the writer; cancel it after ``timeout``."""
        self.close_soon()
        done, _ = await asyncio.wait({self._writer}, timeout=timeout)
        if not done:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    async def _write_loop(self) -> None:
        try:
            while True:
                while self._outbox:
                    key, frame = self._outbox.popitem(last=False)
                    if isinstance(key, int):
                        self._frames -= 1
                    await self.ws.send_bytes(frame)
                if self._stage is Stage.CLOSING:
                    break
                self._ready.clear()
                await self._ready.wait()
        except (ConnectionError, RuntimeError) as exc:
            log.debug("session %d: send failed (%s)", self.session, exc)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=self._close_code, message=self._close_message)
        self._set_state(Stage.CLOSED)
