"""The connection manager: which transport reaches which peer, and the state of each link.

Towards a peer whose ZeroMQ address the rendezvous verified (the directory has one) we use
ZeroMQ; towards any other peer a WebRTC data channel (ICE finds a direct path through the
NATs or falls back to the TURN relay). The first exchange on a link is a ``ping``; its round
trip is the link's set-up time. A link that fails is retried after a back-off (first
``backoff_initial``, doubling up to ``backoff_max``, jittered by +-20 %); concurrent callers
share one attempt. Each link's state changes in :meth:`Connections._set_state` only::

    idle -> connecting -> up -> idle (lost: the next request sets it up again)
                       -> backoff -> connecting (no sooner than the back-off allows)

The transports are used through the :class:`overlay.transport.base.Transport` contract only.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from overlay.errors import TransportError
from overlay.events import LinkUp
from overlay.transport.base import Directory, Frames, LinkKind, Reply, Transport
from overlay.wire import FrameType, encode_control

log = logging.getLogger(__name__)

JITTER = 0.2
"""Back-off delays are drawn within +-20 % of the nominal one."""


class LinkState(enum.StrEnum):
    IDLE = "idle"
    """No link (never made, or lost): the next request sets one up."""
    CONNECTING = "connecting"
    """The first ``ping`` is on its way; concurrent requests wait for it."""
    UP = "up"
    """The ping was answered: requests go straight to the transport."""
    BACKOFF = "backoff"
    """Set-up failed: requests are refused until the back-off has passed."""


_TRANSITIONS: dict[LinkState, frozenset[LinkState]] = {
    LinkState.IDLE: frozenset({LinkState.CONNECTING}),
    LinkState.CONNECTING: frozenset({LinkState.UP, LinkState.BACKOFF, LinkState.IDLE}),
    LinkState.UP: frozenset({LinkState.IDLE}),
    LinkState.BACKOFF: frozenset({LinkState.CONNECTING}),
}
"""The allowed changes of a link's state (``connecting -> idle``: the attempt was cancelled)."""


@dataclass
class _Link:
    peer_id: str
    state: LinkState = LinkState.IDLE
    up: LinkUp | None = None
    delay: float = 0.0
    """Nominal back-off of the last failure (0: none since the last success)."""
    not_before: float = 0.0
    attempt: asyncio.Task[LinkUp] | None = None


class Connections:
    """Links to the other members, over ``zmq`` or ``webrtc`` (see the module docstring).

    ``on_link_up(link)`` is awaited once per link set up (the host tells the learner and the
    rendezvous).
    """

    def __init__(
        self,
        directory: Directory,
        zmq: Transport,
        webrtc: Transport,
        *,
        connect_timeout: float,
        backoff_initial: float,
        backoff_max: float,
        on_link_up: Callable[[LinkUp], Awaitable[None]] | None = None,
    ) -> None:
        self.directory = directory
        self.zmq = zmq
        self.webrtc = webrtc
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._on_link_up = on_link_up
        self._links: dict[str, _Link] = {}
        self._closed = False

    @property
    def links(self) -> dict[str, LinkUp]:
        """The open links, by peer id."""
        return {pid: link.up for pid, link in self._links.items()
                if link.state is LinkState.UP and link.up is not None}

    def transport_for(self, peer_id: str) -> Transport:
        """ZeroMQ for a peer with a verified address, WebRTC for the others."""
        return self.zmq if self.directory.address_of(peer_id) is not None else self.webrtc

    def _set_state(self, link: _Link, new: LinkState, why: str = "") -> None:
        old = link.state
        if new not in _TRANSITIONS[old]:
            raise RuntimeError(f"link to {link.peer_id}: {old} -> {new} is not allowed")
        link.state = new
        log.debug("link to %s: %s -> %s%s", link.peer_id, old, new, f" ({why})" if why else "")

    # ---- requests --------------------------------------------------------------------------

    async def request(
        self, peer_id: str, frames: Frames, request_id: str, *, timeout: float
    ) -> Reply:
        """One request/reply with ``peer_id`` over its transport, the link set up first.

        Raises TransportError (the link then counts as lost)."""
        if self.directory.public_key_of(peer_id) is None:
            raise TransportError(f"{peer_id} is not a member of our job")
        link = self._links.get(peer_id)
        if link is None or link.state is not LinkState.UP:
            await self.ensure(peer_id)
        try:
            return await self.transport_for(peer_id).request(peer_id, frames, request_id,
                                                             timeout=timeout)
        except TransportError as exc:
            self.lost(peer_id, exc)
            raise

    async def ensure(self, peer_id: str) -> LinkUp:
        """The link to ``peer_id``, set up (one ping) if it is not; raises TransportError."""
        if self._closed:
            raise TransportError("host closed")
        link = self._links.setdefault(peer_id, _Link(peer_id))
        if link.state is LinkState.UP and link.up is not None:
            return link.up
        if link.state is LinkState.BACKOFF:
            now = time.monotonic()
            if now < link.not_before:
                raise TransportError(f"{peer_id}: link failed, retrying in "
                                     f"{link.not_before - now:.1f} s")
        if link.attempt is None:  # concurrent callers share one attempt
            self._set_state(link, LinkState.CONNECTING)
            link.attempt = asyncio.create_task(self._connect(link), name=f"link-{peer_id[:8]}")
        return await asyncio.shield(link.attempt)

    async def _connect(self, link: _Link) -> LinkUp:
        peer_id = link.peer_id
        transport = self.transport_for(peer_id)
        started = time.monotonic()
        request_id = secrets.token_hex(8)
        ping = [encode_control(FrameType.PING, request_id=request_id)]
        try:
            header, _ = await transport.request(peer_id, ping, request_id,
                                                timeout=self.connect_timeout)
            if header.get("type") != FrameType.PONG.value:
                raise TransportError(f"{peer_id} answered ping with {header.get('type')!r}")
        except TransportError as exc:
            link.attempt = None
            if self._links.get(peer_id) is link:
                self._back_off(link, exc)
            raise
        except BaseException:
            link.attempt = None
            if link.state is LinkState.CONNECTING:
                self._set_state(link, LinkState.IDLE, "attempt cancelled")
            raise
        connect_s = time.monotonic() - started
        default = LinkKind.ZMQ if transport is self.zmq else LinkKind.WEBRTC_DIRECT
        up = LinkUp(peer_id, transport.link_kind(peer_id) or default, round(connect_s, 4))
        link.attempt = None
        link.delay = 0.0
        link.up = up
        self._set_state(link, LinkState.UP)
        log.info("link to %s: %s, set up in %.2f s", peer_id, up.kind, connect_s)
        if self._on_link_up is not None and self._links.get(peer_id) is link:
            await self._on_link_up(up)
        return up

    def _back_off(self, link: _Link, exc: TransportError) -> None:
        link.delay = (min(link.delay * 2, self.backoff_max) if link.delay
                      else self.backoff_initial)
        delay = link.delay * random.uniform(1 - JITTER, 1 + JITTER)
        link.not_before = time.monotonic() + delay
        self._set_state(link, LinkState.BACKOFF, str(exc))
        log.warning("link to %s failed (%s); retrying in %.1f s", link.peer_id, exc, delay)

    def lost(self, peer_id: str, exc: TransportError) -> None:
        """A request failed: the next one sets the link up again (through the back-off)."""
        link = self._links.get(peer_id)
        if link is not None and link.state is LinkState.UP:
            link.up = None
            self._set_state(link, LinkState.IDLE, str(exc))
            log.info("link to %s lost: %s", peer_id, exc)

    async def forget(self, peer_id: str) -> None:
        """``peer_id`` left: drop its link and back-off, and whatever the transports hold."""
        link = self._links.pop(peer_id, None)
        if link is not None and link.attempt is not None:
            link.attempt.cancel()
        for transport in (self.zmq, self.webrtc):
            await transport.forget(peer_id)

    async def close(self) -> None:
        """Cancel the attempts under way (the transports are the host's to close)."""
        self._closed = True
        attempts = [link.attempt for link in self._links.values() if link.attempt is not None]
        for task in attempts:
            task.cancel()
        await asyncio.gather(*attempts, return_exceptions=True)


def link_report(links: Mapping[str, LinkUp]) -> dict[str, dict[str, str | float]]:
    """The ``links`` message's map (``{peer_id: {kind, connect_s}}``) for the rendezvous."""
    return {pid: {"kind": link.kind.value, "connect_s": link.connect_s}
            for pid, link in links.items()}
