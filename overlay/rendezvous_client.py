"""The peer's side of the rendezvous session (WebSocket, see ``overlay.protocol``).

``start()`` authenticates and joins, and returns the welcome. Then a reader task keeps
``members`` (typed :class:`overlay.membership.Member`) up to date from pushed ``joined`` /
``left`` messages (and puts them on ``events`` as :class:`overlay.events.Joined` /
:class:`overlay.events.Left`), and a heartbeat task keeps the registration alive. If the socket
drops, the client reconnects with exponential back-off, joins again and reconciles: members
missing from the new welcome give ``Left(peer_id, "lost")``, new ones ``Joined(member)``.

ICE servers: ``ice_servers`` are the welcome's (with the TURN credentials the rendezvous made
for us), renewed with ``refresh_ice`` before they expire (``ice``: overlay.ice_credentials).

Its state (:class:`ClientState`) changes in ``_set_state`` only: ``new -> connecting ->
connected -> reconnecting -> connected ... -> closed``.

Signaling: ``send_signal(to, kind, data)`` relays a message through the rendezvous to another
member of the job; received ones go to ``signals`` as ``(from, SignalKind, data)``, where
``from`` is the sender as the rendezvous authenticated it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from overlay.errors import ProtocolError, RendezvousError, RendezvousRefused
from overlay.events import Joined, Left
from overlay.ice_credentials import ICE_REFRESH_TIMEOUT, IceCredentials
from overlay.ice_credentials import ice_expiry as ice_expiry  # re-exported
from overlay.identity import Identity
from overlay.membership import JobPolicy, Member, refusal_message
from overlay.protocol import (
    FATAL_ERRORS,
    MAX_MEMBERS,
    MAX_SIGNAL_BYTES,
    MAX_WELCOME_BYTES,
    ErrorCode,
    LeftReason,
    MsgType,
    SignalKind,
    check_links,
    check_meta,
    check_signal,
    decode,
    encode,
    signed_join,
)

log = logging.getLogger(__name__)

WS_PING_INTERVAL = 10.0
"""WebSocket ping period; no pong within half of it drops the session (then reconnect)."""

ClientEvent = Joined | Left
Signal = tuple[str, SignalKind, Any]  # (from peer_id, kind, data: bytes | dict)
SIGNAL_QUEUE_MAX = 1024
"""Received signals kept for a slow reader; more are dropped (and logged)."""
MAX_REFUSED_LOGGED = 4096
"""Members refused by our job policy that we remember having logged (each is logged once)."""
def normalize_url(url: str) -> str:
    """``host:port`` / ``http://host:port`` / ``ws://host:port`` -> ``ws://host:port/ws``."""
    if "://" not in url:
        url = f"ws://{url}"
    scheme, rest = url.split("://", 1)
    scheme = {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme.lower())
    if scheme not in ("ws", "wss") or not rest:
        raise ValueError(f"not a rendezvous URL: {url!r}")
    if "/" not in rest:
        rest += "/ws"
    return f"{scheme}://{rest}"


class ClientState(enum.StrEnum):
    """Where the client's session stands."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    DISCONNECTED = "disconnected"  # the session dropped and we do not reconnect
    CLOSED = "closed"


_TRANSITIONS: dict[ClientState, frozenset[ClientState]] = {
    ClientState.NEW: frozenset({ClientState.CONNECTING, ClientState.CLOSED}),
    ClientState.CONNECTING: frozenset({ClientState.CONNECTED, ClientState.CLOSED}),
    ClientState.CONNECTED: frozenset({ClientState.RECONNECTING, ClientState.DISCONNECTED,
                                      ClientState.CLOSED}),
    ClientState.RECONNECTING: frozenset({ClientState.CONNECTED, ClientState.DISCONNECTED,
                                         ClientState.CLOSED}),
    ClientState.DISCONNECTED: frozenset({ClientState.CLOSED}),
    ClientState.CLOSED: frozenset(),
}
"""The allowed state changes (anything else is a bug: ``_set_state`` raises)."""


class RendezvousClient:
    """One peer's registration in one job at one rendezvous."""

    def __init__(
        self,
        url: str,
        identity: Identity,
        job: str,
        addrs: Sequence[str],
        meta: Mapping[str, Any],
        *,
        reconnect: bool = True,
        connect_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        membership: JobPolicy | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self.identity = identity
        self.job = job
        self.addrs = list(addrs)
        self.meta = dict(meta)
        self.reconnect = reconnect
        self.connect_timeout = connect_timeout
        """Bound on connect + challenge + join + welcome (dial-back happens in there)."""
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.membership = membership
        """Our own copy of the job's policy: we send its proof in ``join``, and members that
        fail it never enter ``members`` (whatever the rendezvous says)."""
        self.refused_members: collections.Counter[str] = collections.Counter()
        """Member announcements ignored because they fail ``membership``, by ``Refusal``."""
        self._refused_logged: set[str] = set()
        self.refused: RendezvousRefused | None = None
        """Set when the rendezvous refused a re-join for good (then we stop reconnecting)."""

        self.peer_id: str = identity.peer_id
        self.members: dict[str, Member] = {}
        self.reachable_addrs: list[str] = []
        self.ice = IceCredentials(backoff_initial, backoff_max)
        """The ICE servers to use now and their renewal (overlay.ice_credentials)."""
        self.observed_ip: str | None = None
        self.heartbeat_interval: float = 5.0
        self.events: asyncio.Queue[ClientEvent] = asyncio.Queue()
        self.signals: asyncio.Queue[Signal] = asyncio.Queue(maxsize=SIGNAL_QUEUE_MAX)
        """Relayed signals: (from, kind, data); ``from`` is set by the rendezvous."""

        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.state = ClientState.NEW

    def _set_state(self, new: ClientState, why: str = "") -> None:
        old = self.state
        if new is old or old is ClientState.CLOSED:  # closed is final (a late reconnect)
            return
        if new not in _TRANSITIONS[old]:
            raise RuntimeError(f"rendezvous client: {old} -> {new} is not allowed")
        self.state = new
        log.debug("rendezvous client %s: %s -> %s%s", self.peer_id[:8], old, new,
                  f" ({why})" if why else "")

    @property
    def _closed(self) -> bool:
        return self.state is ClientState.CLOSED

    # -- public ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    async def start(self) -> dict[str, Any]:
        """Connect, authenticate and join; return the welcome. Raises RendezvousError."""
        if self.state is not ClientState.NEW:
            raise RuntimeError("a RendezvousClient is started once")
        self._set_state(ClientState.CONNECTING)
        self._session = aiohttp.ClientSession()
        try:
            welcome = await self._connect(initial=True)
        except BaseException as exc:
            await self._session.close()
            self._set_state(ClientState.CLOSED, f"start failed: {exc}")
            raise
        self._tasks = [
            asyncio.create_task(self._run(), name=f"rendezvous-client-{self.peer_id[:8]}"),
            asyncio.create_task(self._heartbeat_loop(), name="rendezvous-heartbeat"),
            asyncio.create_task(self.ice.renew_loop(lambda: self._refresh_ice()),
                                name="rendezvous-ice-renewal"),
        ]
        return welcome

    async def wait_connected(self) -> None:
        """Return once a session is established (at once if it is now)."""
        await self._connected.wait()

    async def report(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Send a progress report; best effort (logged, never raised) when disconnected."""
        try:
            metrics = check_meta(metrics)
        except ProtocolError as exc:
            log.warning("report of epoch %d not sent: %s", epoch, exc)
            return
        if not await self._send(encode(MsgType.REPORT, epoch=int(epoch), metrics=metrics)):
            log.info("report of epoch %d dropped: not connected to the rendezvous", epoch)

    async def report_links(self, links: Mapping[str, Mapping[str, Any]]) -> None:
        """Tell the rendezvous how we reach each peer (shown by GET /peers); best effort."""
        try:
            checked = check_links({peer: dict(link) for peer, link in links.items()})
        except ProtocolError as exc:
            log.warning("links not sent: %s", exc)
            return
        if not await self._send(encode(MsgType.LINKS, links=checked)):
            log.info("links dropped: not connected to the rendezvous")

    async def send_signal(self, to: str, kind: SignalKind | str,
                          data: bytes | dict[str, Any]) -> None:
        """Relay ``data`` to member ``to`` of the job. Raises RendezvousError when not connected,
        ValueError for a bad kind or a message over ``MAX_SIGNAL_BYTES``.

        Delivery is not confirmed: an unknown or gone target comes back later as an
        ``unknown_peer`` error from the rendezvous, which is logged.
        """
        kind = SignalKind(kind).value
        if not isinstance(data, bytes | dict):
            raise ValueError(f"signal data must be bytes or a map, not {type(data).__name__}")
        frame = encode(MsgType.SIGNAL, to=to, kind=kind, data=data)
        if len(frame) > MAX_SIGNAL_BYTES:
            raise ValueError(f"signal of {len(frame)} bytes > {MAX_SIGNAL_BYTES}")
        if not await self._send(frame):
            raise RendezvousError(f"not connected to {self.url}; signal to {to} not sent")

    async def close(self, leave: bool = True) -> None:
        """Leave (if asked and connected), stop the tasks, close the socket; idempotent."""
        if self._closed:
            return
        connected = self.connected
        self._set_state(ClientState.CLOSED)
        if leave and connected:
            await self._send(encode(MsgType.LEAVE))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        ws, self._ws = self._ws, None
        self._connected.clear()
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2.0)
        if self._session is not None:
            await self._session.close()

    # -- session ---------------------------------------------------------------------------

    async def _connect(self, *, initial: bool) -> dict[str, Any]:
        assert self._session is not None
        ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                ws = await self._session.ws_connect(
                    self.url,
                    max_msg_size=MAX_WELCOME_BYTES,  # the welcome lists the whole job
                    compress=0,
                    autoping=True,
                    heartbeat=WS_PING_INTERVAL,  # notice a dead server without waiting on TCP
                )
                challenge = await self._expect(ws, MsgType.CHALLENGE)
                proof = None if self.membership is None else self.membership.proof(
                    self.job, self.identity.public_key
                )
                join = signed_join(self.identity, challenge["nonce"], self.job,
                                   addrs=self.addrs, meta=self.meta, proof=proof)
                await ws.send_bytes(join)
                welcome = await self._expect(ws, MsgType.WELCOME)
        except BaseException as exc:
            if ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 2.0)
            if isinstance(exc, TimeoutError):
                raise RendezvousError(
                    f"{self.url}: no welcome within {self.connect_timeout}s"
                ) from None
            if isinstance(exc, aiohttp.ClientError | OSError):
                raise RendezvousError(f"cannot reach {self.url}: {exc}") from exc
            raise
        if self._closed:  # closed while we were joining
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2.0)
            raise RendezvousError("client closed")
        self._ws = ws
        self._set_state(ClientState.CONNECTED)
        self._apply_welcome(welcome, initial=initial)
        self._connected.set()
        log.info(
            "joined %s at %s as %s (observed ip %s, reachable %s, %d members)",
            self.job, self.url, self.peer_id, self.observed_ip, self.reachable_addrs,
            len(self.members),
        )
        return welcome

    @staticmethod
    async def _expect(ws: aiohttp.ClientWebSocketResponse, want: MsgType) -> dict[str, Any]:
        msg = await ws.receive()
        if msg.type is not aiohttp.WSMsgType.BINARY:
            raise RendezvousError(f"connection closed while waiting for {want.value}")
        try:
            msg_type, fields = (  # only the welcome may list a whole job
                decode(msg.data, max_bytes=MAX_WELCOME_BYTES, max_items=MAX_MEMBERS)
                if want is MsgType.WELCOME else decode(msg.data))
        except ProtocolError as exc:
            raise RendezvousError(f"bad message from the rendezvous: {exc}") from None
        if msg_type is MsgType.ERROR:
            if fields["code"] in FATAL_ERRORS:
                raise RendezvousRefused(fields["code"], fields["message"])
            raise RendezvousError(f"{fields['code']}: {fields['message']}")
        if msg_type is not want:
            raise RendezvousError(f"expected {want.value}, got {msg_type.value}")
        return fields

    def _apply_welcome(self, welcome: dict[str, Any], *, initial: bool) -> None:
        self.peer_id = welcome["peer_id"]
        self.observed_ip = welcome["observed_ip"]
        self.reachable_addrs = [a for a in welcome["reachable_addrs"] if isinstance(a, str)]
        self.ice.apply(welcome["ice_servers"], welcome.get("ice_ttl"), source="welcome")
        self.heartbeat_interval = max(float(welcome["heartbeat_interval"]), 0.05)
        members = (Member.from_wire(m) for m in welcome["members"])
        new = {
            m.peer_id: m
            for m in members
            if m is not None and m.peer_id != self.peer_id and self._admitted(m)
        }
        old, self.members = self.members, new
        if initial:
            return
        for peer_id in old.keys() - new.keys():
            self.events.put_nowait(Left(peer_id, LeftReason.LOST))
        for peer_id, member in new.items():
            if peer_id not in old:
                self.events.put_nowait(Joined(member))
            elif old[peer_id].addrs != member.addrs:
                self.events.put_nowait(Left(peer_id, LeftReason.REPLACED))
                self.events.put_nowait(Joined(member))

    def _on_message(self, data: bytes) -> None:
        try:
            msg_type, fields = decode(data)
        except ProtocolError as exc:
            log.warning("ignoring a bad message from the rendezvous: %s", exc)
            return
        if msg_type is MsgType.JOINED:
            member = Member.from_wire(fields["member"])
            if member is None or member.peer_id == self.peer_id or not self._admitted(member):
                return
            if member.peer_id in self.members:
                # the rendezvous coalesced a left + joined of this peer (we were behind): it
                # left and came back, so say so, as a reconnect's reconciliation does
                self.events.put_nowait(Left(member.peer_id, LeftReason.REPLACED))
            self.members[member.peer_id] = member
            self.events.put_nowait(Joined(member))
        elif msg_type is MsgType.LEFT:
            if self.members.pop(fields["peer_id"], None) is not None:
                self.events.put_nowait(Left(fields["peer_id"], str(fields["reason"])))
        elif msg_type is MsgType.SIGNAL:
            self._on_signal(fields)
        elif msg_type is MsgType.ICE_SERVERS:
            if self.ice.apply(fields["ice_servers"], fields.get("ice_ttl"), source="refresh"):
                self.ice.renewals += 1
        elif msg_type is MsgType.ERROR:
            if fields["code"] == ErrorCode.UNKNOWN_PEER:  # a race with "left", not our bug
                log.info("signal not delivered: %s", fields["message"])
            else:
                log.warning("rendezvous error: %s: %s", fields["code"], fields["message"])
        else:
            log.debug("ignoring %s from the rendezvous", msg_type.value)

    def _admitted(self, member: Member) -> bool:
        """Our own check of the job's policy on a member the rendezvous announced."""
        if self.membership is None:
            return True
        refusal = self.membership.check(self.job, member.public_key, member.proof)
        if refusal is None:
            return True
        self.refused_members[refusal.value] += 1
        peer_id = member.peer_id
        if peer_id not in self._refused_logged:  # once per peer (a bounded memory of them)
            if len(self._refused_logged) >= MAX_REFUSED_LOGGED:
                self._refused_logged.clear()
            self._refused_logged.add(peer_id)
            log.warning("ignoring member %s that the rendezvous announced: %s", peer_id,
                        refusal_message(refusal, self.job, peer_id))
        return False

    def _on_signal(self, fields: dict[str, Any]) -> None:
        try:
            sender, kind, data = check_signal(fields, "from")
        except ProtocolError as exc:
            log.warning("ignoring a bad signal from the rendezvous: %s", exc)
            return
        try:
            self.signals.put_nowait((sender, kind, data))
        except asyncio.QueueFull:
            log.warning("signal queue full: dropped %s from %s", kind.value, sender)

    # -- background tasks ------------------------------------------------------------------

    async def _run(self) -> None:
        """Read the current session; when it drops, reconnect (if allowed) and go on."""
        while True:
            ws = self._ws
            if ws is not None:
                async for msg in ws:
                    if msg.type is aiohttp.WSMsgType.BINARY:
                        self._on_message(msg.data)
                if self._ws is ws:
                    self._ws = None
                    self._connected.clear()
                log.warning("lost the rendezvous session (%s%s)", ws.close_code,
                            ": we sent a message too large for it" if ws.close_code == 1009
                            else "")
            if self._closed:
                return
            if not self.reconnect or self.refused is not None:
                self._set_state(ClientState.DISCONNECTED, "not reconnecting")
                return
            self._set_state(ClientState.RECONNECTING)
            await self._reconnect()

    async def _reconnect(self) -> None:
        delay = self.backoff_initial
        while not self._closed:
            await asyncio.sleep(min(self.backoff_max, delay * random.uniform(1.0, 1.5)))
            try:
                await self._connect(initial=False)
                return
            except RendezvousRefused as exc:
                log.error("the rendezvous refused us (%s); not reconnecting", exc)
                self.refused = exc
                self._set_state(ClientState.DISCONNECTED, "refused")
                return
            except RendezvousError as exc:
                log.info("reconnect to %s failed: %s", self.url, exc)
            delay = min(delay * 2, self.backoff_max)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            await self._send(encode(MsgType.HEARTBEAT))

    @property
    def ice_servers(self) -> list[dict[str, Any]]:
        """The ICE servers to use now (asked for every new WebRTC peer connection)."""
        return self.ice.servers

    @property
    def ice_expires_at(self) -> float | None:
        return self.ice.expires_at

    @property
    def ice_renewals(self) -> int:
        return self.ice.renewals

    async def _refresh_ice(self) -> bool:
        """One ``refresh_ice`` round trip; True once fresh servers came."""
        self.ice.changed.clear()
        if not await self._send(encode(MsgType.REFRESH_ICE)):
            return False
        if await self.ice.changed_within(ICE_REFRESH_TIMEOUT):
            log.info("TURN credentials renewed (expire in %.0f s)",
                     (self.ice.expires_at or time.time()) - time.time())
            return True
        return False

    async def _send(self, frame: bytes) -> bool:
        ws = self._ws
        if ws is None or ws.closed:
            return False
        try:
            await ws.send_bytes(frame)
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            log.debug("send to the rendezvous failed: %s", exc)
            return False
        return True
