"""The WebSocket session of the rendezvous (``/ws``), see ``overlay.protocol``.

challenge -> join (signed nonce) -> ``rendezvous.admission`` (policy, dial-back of the offered
ZeroMQ addresses) -> welcome; then heartbeat / report / links / refresh_ice (answered with
fresh TURN credentials in ``ice_servers``) / leave from the peer, pushed
``joined`` / ``left`` to it, and ``signal`` relayed between members of one job. Membership
itself lives in ``rendezvous.registry``: this module moves bytes and publishes the registry's
events. The session's stage is its ``Connection``'s (``rendezvous.connection.Stage``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import time
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from overlay.errors import ProtocolError
from overlay.identity import DOMAIN_RENDEZVOUS_AUTH, verify_signature
from overlay.protocol import (
    MAX_SIGNAL_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    MsgType,
    check_addrs,
    check_job,
    check_links,
    check_meta,
    check_proof,
    check_signal,
    decode,
    encode,
    encode_prepacked,
    pack_array,
)
from rendezvous.admission import Admission, url_host
from rendezvous.config import RendezvousConfig
from rendezvous.connection import Connection
from rendezvous.ratelimit import KeyedRateLimiter, TokenBucket
from rendezvous.registry import Event, Member, Registry
from rendezvous.stun import StunServer
from rendezvous.turn import make_credentials

log = logging.getLogger(__name__)

NONCE_SIZE = 32
CLOSE_REPLACED = 4000  # another session joined with the same key
CLOSE_EXPIRED = 4001  # no message within the TTL
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
ICE_REFRESH_BURST = 3.0
"""``refresh_ice`` a session may send at once (a lost answer, a retry)."""
ICE_REFRESHES_PER_TTL = 8.0
"""Beyond the burst, a session may ask ``refresh_ice`` this many times per ``turn_ttl`` (at
most once a second); a peer renews once per 80 % of it."""
# Errors that say nothing bad about the sender: they do not count towards max_errors.
_BENIGN_ERRORS = (ErrorCode.UNKNOWN_PEER, ErrorCode.RATE_LIMITED)


class _UnknownPeer(ProtocolError):
    def __init__(self, to: str) -> None:
        super().__init__(ErrorCode.UNKNOWN_PEER, f"{to}: not a connected member of this job")
        self.fields = {"to": to}


class _Flooding(ProtocolError):
    """More messages than the session's rate: unlike other ``rate_limited``, counted as an
    error, so a session that keeps flooding is closed (``max_errors``)."""

    def __init__(self, rate: float) -> None:
        super().__init__(ErrorCode.RATE_LIMITED, f"more than {rate:g} messages per second")


def error_frame(exc: ProtocolError) -> bytes:
    """The ``error {code, message}`` frame for ``exc`` (plus its extra fields, if any)."""
    code = getattr(exc.code, "value", exc.code)
    message = str(exc).partition(": ")[2] or str(exc)
    extra: dict[str, Any] = getattr(exc, "fields", {})
    return encode(MsgType.ERROR, code=str(code), message=message, **extra)


def reached_host(request: web.Request) -> str:
    """The host the peer used to reach us (Host header), else our end of its connection."""
    try:
        host = (request.url.host or "").strip("[]")
    except ValueError:  # a Host header yarl cannot parse
        host = ""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    if HOSTNAME_RE.match(host):
        return host
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if sockname:
        return str(sockname[0]).split("%", 1)[0]
    return "127.0.0.1"


async def _receive(ws: web.WebSocketResponse, timeout: float | None = None) -> Any:
    """The next data frame (bytes, or str for a text frame), or None once the socket ends."""
    msg = await ws.receive(timeout=timeout)
    if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
        return msg.data
    if msg.type is WSMsgType.ERROR:
        log.info("websocket error: %s", ws.exception())
    return None


class SessionHandling:
    """The ``/ws`` handler and everything a session does, as methods of ``RendezvousServer``
    (``rendezvous.server``), which owns the state below. Subclasses may override
    ``_relay_signal`` (tests play a malicious rendezvous that way)."""

    config: RendezvousConfig
    registry: Registry
    stun: StunServer | None
    admission: Admission
    _sessions: dict[str, Connection]
    """peer_id -> the session owning it."""
    _connections: set[Connection]
    _failed_joins: KeyedRateLimiter
    """Refused joins per source IP: an IP that keeps failing is refused before any check."""
    _next_session: int
    _closed: bool

    # -- state changes: the registry decides, this publishes -------------------------------

    def _publish(self, events: list[Event]) -> None:
        for event in events:
            if event.kind == "joined":
                assert event.member is not None
                frame = encode_prepacked(MsgType.JOINED, {"member": event.member.packed})
            else:
                frame = encode(MsgType.LEFT, peer_id=event.peer_id, reason=event.reason)
            log.info("job %s: %s %s %s", event.job, event.peer_id, event.kind, event.reason or "")
            sessions = self._sessions
            for member in self.registry.members(event.job, exclude=event.peer_id):
                conn = sessions.get(member.peer_id)
                if conn is not None:
                    conn.send_membership(event.peer_id, frame)

    # -- one WebSocket ---------------------------------------------------------------------

    async def _handle_ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            # Up to twice our limit aiohttp hands the frame over and decode() answers
            # ``too_large`` with a message; beyond, aiohttp closes with 1009 (message too big).
            max_msg_size=2 * self.config.max_message_bytes,
            compress=False,
            timeout=self.config.close_timeout,
        )
        await ws.prepare(request)
        self._next_session += 1
        conn = Connection(
            ws,
            self._next_session,
            request.remote or "",
            self.config.send_queue_limit,
            self.config.public_host or reached_host(request),
        )
        self._connections.add(conn)
        try:
            await self._serve_session(conn)
        except Exception:
            log.exception("session %d crashed", conn.session)
        finally:
            self._connections.discard(conn)
            self._forget(conn)
            await conn.finish(self.config.close_timeout + 1.0)
        return ws

    def _forget(self, conn: Connection) -> None:
        """The socket is gone; the registration (if any) stays until it expires."""
        if conn.peer_id is None:
            return
        if self._sessions.get(conn.peer_id) is conn:
            del self._sessions[conn.peer_id]
        self.registry.disconnect(conn.peer_id, conn.session)

    async def _serve_session(self, conn: Connection) -> None:
        nonce = os.urandom(NONCE_SIZE)
        conn.send(
            encode(
                MsgType.CHALLENGE,
                nonce=nonce,
                server=self.config.server_name,
                version=PROTOCOL_VERSION,
            )
        )
        try:
            data = await _receive(conn.ws, timeout=self.config.join_timeout)
        except TimeoutError:
            log.info("session %d (%s): no join in time", conn.session, conn.remote)
            self._refuse(conn, ProtocolError(ErrorCode.BAD_STATE, "no join in time"))
            return
        if data is None or conn.closing:
            return
        if self._failed_joins.exhausted(conn.remote, time.monotonic()):
            log.info("session %d (%s): refused: too many refused joins", conn.session, conn.remote)
            self._refuse(conn, ProtocolError(
                ErrorCode.RATE_LIMITED, f"too many refused joins from {conn.remote}; try later"
            ))
            return
        try:
            msg_type, fields = decode(data, max_bytes=self.config.max_message_bytes)
            if msg_type is not MsgType.JOIN:
                raise ProtocolError(ErrorCode.BAD_STATE, f"{msg_type.value} before join")
            await self._admit(conn, fields, nonce)
        except ProtocolError as exc:
            log.info("session %d (%s): refused: %s", conn.session, conn.remote, exc)
            self._failed_joins.allow(conn.remote, time.monotonic())
            self._refuse(conn, exc)
            return
        await self._session_loop(conn)

    def _refuse(self, conn: Connection, exc: ProtocolError) -> None:
        conn.send(error_frame(exc))
        conn.close_soon(WSCloseCode.POLICY_VIOLATION, b"refused")

    async def _admit(self, conn: Connection, fields: dict[str, Any], nonce: bytes) -> None:
        conn.admitting()
        public_key, job = fields["public_key"], check_job(fields["job"])
        if not verify_signature(
            public_key, fields["signature"], DOMAIN_RENDEZVOUS_AUTH + nonce + job.encode()
        ):
            raise ProtocolError(ErrorCode.BAD_SIGNATURE, "join signature does not verify")
        proof = check_proof(fields.get("proof"))
        self.admission.check_policy(job, public_key, proof)
        addrs = list(dict.fromkeys(check_addrs(fields["addrs"])))
        meta = check_meta(fields["meta"])
        self.registry.check_room(public_key, job)  # before dialing anything back
        reachable = await self.admission.verify_addrs(addrs, public_key, conn.remote)
        if conn.closing or conn.ws.closed or self._closed:
            return  # gone while we were dialing back; nothing to register
        member, events = self.registry.join(
            public_key=public_key,
            job=job,
            addrs=reachable,
            meta=meta,
            session=conn.session,
            now=time.monotonic(),
            proof=proof,
        )
        conn.joined(member.peer_id)
        old = self._sessions.get(member.peer_id)
        self._sessions[member.peer_id] = conn
        if old is not None and old is not conn:
            old.close_soon(CLOSE_REPLACED, b"replaced by a new session")
        log.info(
            "session %d: %s joined %s from %s, reachable %s",
            conn.session, member.peer_id, job, conn.remote, reachable,
        )
        conn.send(self._welcome(member, conn))
        self._publish(events)

    def ice_servers_for(self, peer_id: str, host: str) -> list[dict[str, Any]]:
        """Our STUN (at ``host``, as the peer reaches us), TURN with fresh credentials, extras."""
        return self.ice_offer(peer_id, host)[0]

    def ice_offer(self, peer_id: str, host: str) -> tuple[list[dict[str, Any]], float | None]:
        """``ice_servers_for`` and the seconds until its TURN credentials expire (None: no
        TURN of ours, nothing expires): the fields ``ice_servers`` / ``ice_ttl``."""
        servers: list[dict[str, Any]] = []
        ice_ttl: float | None = None
        if self.stun is not None:
            servers.append({"urls": [f"stun:{url_host(host)}:{self.stun.port}"]})
        if self.config.turn_urls and self.config.turn_secret:
            now = time.time()
            creds = make_credentials(self.config.turn_secret, peer_id, self.config.turn_ttl, now)
            servers.append(creds.ice_server(self.config.turn_urls))
            ice_ttl = round(max(creds.expires - now, 0.0), 3)
        servers.extend(self.config.ice_servers)
        return servers, ice_ttl

    def _ice_fields(self, peer_id: str, host: str) -> dict[str, Any]:
        servers, ice_ttl = self.ice_offer(peer_id, host)
        return {"ice_servers": servers, **({} if ice_ttl is None else {"ice_ttl": ice_ttl})}

    def _ice_refresh_bucket(self) -> TokenBucket:
        """The per-session limit on ``refresh_ice`` (``ICE_REFRESHES_PER_TTL``)."""
        rate = 1.0 / max(self.config.turn_ttl / ICE_REFRESHES_PER_TTL, 1.0)
        return TokenBucket(rate, ICE_REFRESH_BURST)

    def _welcome(self, member: Member, conn: Connection) -> bytes:
        others = self.registry.members(member.job, exclude=member.peer_id)
        return encode_prepacked(
            MsgType.WELCOME,
            {"members": pack_array([m.packed for m in others])},
            peer_id=member.peer_id,
            observed_ip=conn.remote,
            reachable_addrs=list(member.addrs),
            ttl=self.config.ttl,
            heartbeat_interval=self.config.heartbeat_interval,
            **self._ice_fields(member.peer_id, conn.host),
        )

    # -- a joined session ------------------------------------------------------------------

    async def _session_loop(self, conn: Connection) -> None:
        errors = 0
        messages = TokenBucket(self.config.message_rate, self.config.message_burst)
        ice_refreshes = self._ice_refresh_bucket()
        while not conn.closing:
            data = await _receive(conn.ws)
            if data is None:
                return
            try:
                if not messages.take(time.monotonic()):
                    raise _Flooding(self.config.message_rate)
                if self._handle_message(conn, data, ice_refreshes):
                    return
            except ProtocolError as exc:
                if exc.code not in _BENIGN_ERRORS or isinstance(exc, _Flooding):
                    errors += 1
                log.info("session %d (%s): %s", conn.session, conn.peer_id, exc)
                conn.send(error_frame(exc))
                if errors >= self.config.max_errors:
                    conn.close_soon(WSCloseCode.POLICY_VIOLATION, b"too many errors")
                    return

    def _handle_message(
        self, conn: Connection, data: bytes | str, ice_refreshes: TokenBucket | None = None
    ) -> bool:
        """Apply one message of a joined session; True when the session is over.
        ``ice_refreshes``: the session's limit on ``refresh_ice`` (None: unlimited)."""
        assert conn.peer_id is not None
        msg_type, fields = decode(data, max_bytes=self.config.max_message_bytes)
        now = time.monotonic()
        if msg_type is MsgType.HEARTBEAT:
            owned = self.registry.touch(conn.peer_id, conn.session, now)
        elif msg_type is MsgType.REPORT:
            metrics = check_meta(fields["metrics"])
            owned = self.registry.report(conn.peer_id, conn.session, fields["epoch"], metrics, now)
        elif msg_type is MsgType.LINKS:
            links = check_links(fields["links"])
            owned = self.registry.update_links(conn.peer_id, conn.session, links, now)
        elif msg_type is MsgType.SIGNAL:
            owned = self.registry.touch(conn.peer_id, conn.session, now)
            if owned:
                self._relay_signal(conn, len(data), fields, now)
        elif msg_type is MsgType.REFRESH_ICE:
            owned = self.registry.touch(conn.peer_id, conn.session, now)
            if owned:
                if ice_refreshes is not None and not ice_refreshes.take(now):
                    raise ProtocolError(ErrorCode.RATE_LIMITED, "refresh_ice more often than "
                                        f"{ICE_REFRESHES_PER_TTL:g} times per turn_ttl")
                conn.send(encode(MsgType.ICE_SERVERS, **self._ice_fields(conn.peer_id, conn.host)))
                log.debug("session %d (%s): fresh ICE servers", conn.session, conn.peer_id)
        elif msg_type is MsgType.LEAVE:
            self._publish(self.registry.leave(conn.peer_id, conn.session))
            if self._sessions.get(conn.peer_id) is conn:
                del self._sessions[conn.peer_id]
            conn.close_soon()
            return True
        elif msg_type is MsgType.JOIN:
            raise ProtocolError(ErrorCode.BAD_STATE, "already joined")
        else:
            raise ProtocolError(ErrorCode.BAD_STATE, f"{msg_type.value} is not sent by peers")
        if not owned:  # expired or replaced while this socket stayed open
            self._refuse(conn, ProtocolError(ErrorCode.BAD_STATE, "registration is gone"))
            return True
        return False

    def _relay_signal(
        self, conn: Connection, size: int, fields: dict[str, Any], now: float
    ) -> None:
        """Forward a ``signal`` to a connected member of the sender's job, as ``from`` sender."""
        assert conn.peer_id is not None
        if size > MAX_SIGNAL_BYTES:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"signal of {size} bytes > {MAX_SIGNAL_BYTES}")
        to, kind, data = check_signal(fields, "to")
        if not conn.take_signal_token(now, self.config.signal_rate, self.config.signal_burst):
            raise ProtocolError(ErrorCode.RATE_LIMITED, f"more than {self.config.signal_rate} "
                                "signals per second")
        sender, target = self.registry.get(conn.peer_id), self.registry.get(to)
        target_conn = self._sessions.get(to)
        if (
            sender is None
            or target is None
            or to == conn.peer_id
            or target.job != sender.job
            or not target.connected
            or target_conn is None
            or target_conn.closing
            or target_conn.session != target.session
        ):
            raise _UnknownPeer(to)
        log.debug("job %s: signal %s %s -> %s", sender.job, kind.value, conn.peer_id, to)
        target_conn.send(encode(MsgType.SIGNAL, **{"from": conn.peer_id, "kind": kind.value,
                                                   "data": data}))
