"""The rendezvous server: aiohttp HTTP endpoints plus the WebSocket session at ``/ws``.

Session (see ``overlay.protocol``): challenge -> join (signed nonce) -> dial-back of the offered
ZeroMQ addresses -> welcome; then heartbeat / report / leave from the peer and pushed
joined / left events to it, and ``signal`` relayed between members of one job. Membership
itself lives in ``rendezvous.registry``; this module only moves bytes and applies the registry's
events. The same process answers STUN on UDP (``rendezvous.stun``) and hands out TURN
credentials (``rendezvous.turn``) in ``welcome.ice_servers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import html
import ipaddress
import logging
import os
import re
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from importlib import metadata
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from overlay.dialback import dial_back
from overlay.errors import ProtocolError
from overlay.identity import DOMAIN_RENDEZVOUS_AUTH, peer_id_from_public_key, verify_signature
from overlay.membership import refusal_message
from overlay.protocol import (
    JOB_RE,
    MAX_MEMBERS,
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
from rendezvous.config import RendezvousConfig
from rendezvous.ratelimit import KeyedRateLimiter, TokenBucket
from rendezvous.registry import Event, Member, Registry
from rendezvous.stun import StunServer
from rendezvous.turn import turn_ice_server

log = logging.getLogger(__name__)

NONCE_SIZE = 32
MAX_LOOKUPS = 8  # host-name look-ups for dial-back at once (executor threads)
CLOSE_REPLACED = 4000  # another session joined with the same key
CLOSE_EXPIRED = 4001  # no message within the TTL
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
# Errors that say nothing bad about the sender: they do not count towards max_errors.
_BENIGN_ERRORS = (ErrorCode.UNKNOWN_PEER, ErrorCode.RATE_LIMITED)


def _package_version() -> str:
    try:
        return metadata.version("peerlearn")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class _UnknownPeer(ProtocolError):
    def __init__(self, to: str) -> None:
        super().__init__(ErrorCode.UNKNOWN_PEER, f"{to}: not a connected member of this job")
        self.fields = {"to": to}


class _Flooding(ProtocolError):
    """More messages than the session's rate: unlike other ``rate_limited``, counted as an
    error, so a session that keeps flooding is closed (``max_errors``)."""

    def __init__(self, rate: float) -> None:
        super().__init__(ErrorCode.RATE_LIMITED, f"more than {rate:g} messages per second")


def _as_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP (brackets and a zone id removed, IPv4-mapped IPv6 as IPv4), or None
    if it is not an IP literal."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _error_frame(exc: ProtocolError) -> bytes:
    code = getattr(exc.code, "value", exc.code)
    message = str(exc).partition(": ")[2] or str(exc)
    extra: dict[str, Any] = getattr(exc, "fields", {})
    return encode(MsgType.ERROR, code=str(code), message=message, **extra)


def _url_host(host: str) -> str:
    """``host`` as it goes in a URL: IPv6 literals in brackets."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _reached_host(request: web.Request) -> str:
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


class _Connection:
    """One WebSocket. Every outgoing frame goes through the outbox, written by one task.

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
        self.host = host
        """The rendezvous host as this peer reaches it (goes in the ``stun:`` URL)."""
        self.peer_id: str | None = None
        self._signals: TokenBucket | None = None
        self._limit = limit
        # key: a peer id (membership frames, coalesced) or a sequence number (all others)
        self._outbox: OrderedDict[str | int, bytes] = OrderedDict()
        self._frames = 0  # frames in the outbox keyed by sequence number
        self._seq = 0
        self._ready = asyncio.Event()
        self._closing = False
        self._close_code: int = WSCloseCode.OK
        self._close_message = b""
        self._writer = asyncio.create_task(self._write_loop(), name=f"rendezvous-ws-{session}")

    @property
    def closing(self) -> bool:
        return self._closing

    def send(self, frame: bytes) -> None:
        if self._closing:
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
        if self._closing:
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
        if self._closing:
            return
        self._closing = True
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
                if self._closing:
                    break
                self._ready.clear()
                await self._ready.wait()
        except (ConnectionError, RuntimeError) as exc:
            log.debug("session %d: send failed (%s)", self.session, exc)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=self._close_code, message=self._close_message)


class RendezvousServer:
    """The rendezvous service. ``start()`` binds, ``close()`` stops everything (idempotent)."""

    def __init__(self, config: RendezvousConfig | None = None) -> None:
        self.config = config or RendezvousConfig()
        self.registry = Registry(self.config.ttl, self.config.history_len)
        self._sessions: dict[str, _Connection] = {}  # peer_id -> the session owning it
        self._connections: set[_Connection] = set()
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._port: int | None = None
        self.stun: StunServer | None = None
        """The STUN server (None when disabled); its ``counters`` count datagrams by outcome."""
        self._started = time.monotonic()
        self._next_session = 0
        self._closed = False
        self._version = _package_version()
        self._lookups = asyncio.Semaphore(MAX_LOOKUPS)
        """Host-name look-ups for dial-back in flight (each holds an executor thread until it
        ends, even after we stopped waiting for it)."""
        self._failed_joins = KeyedRateLimiter(
            self.config.failed_join_rate, self.config.failed_join_burst
        )
        """Refused joins per source IP: an IP that keeps failing is refused before any check."""

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``port=0``)."""
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def stun_port(self) -> int | None:
        """The bound UDP port of the STUN server (useful with ``stun_port=0``); None if disabled."""
        if self._runner is None:
            raise RuntimeError("server not started")
        return None if self.stun is None else self.stun.port

    @property
    def url(self) -> str:
        """WebSocket URL for clients on this machine."""
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "", "::") else self.config.host
        return f"ws://{host}:{self.port}/ws"

    async def start(self) -> None:
        if self._runner is not None or self._closed:
            raise RuntimeError("a RendezvousServer is started once")
        if self.config.stun_port is not None:
            stun = StunServer(
                self.config.stun_host or self.config.host,
                self.config.stun_port,
                software=self.config.server_name,
                rate_limit=self.config.stun_rate_limit,
            )
            await stun.start()
            self.stun = stun
        app = web.Application()
        app.router.add_get("/", self._handle_dashboard)
        app.router.add_get("/healthz", self._handle_healthz)
        app.router.add_get("/peers", self._handle_peers)
        app.router.add_get("/ws", self._handle_ws)
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=self.config.shutdown_timeout
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.config.host, self.config.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            if self.stun is not None:
                self.stun.close()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]
        self._started = time.monotonic()
        self._reaper = asyncio.create_task(self._reap_loop(), name="rendezvous-reaper")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for conn in list(self._connections):
            conn.close_soon(WSCloseCode.GOING_AWAY, b"server shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
        if self.stun is not None:
            self.stun.close()

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

    async def _reap_loop(self) -> None:
        interval = max(self.config.ttl / 4, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                self._reap(time.monotonic())
            except Exception:  # the reaper must survive anything
                log.exception("reaper failed")

    def _reap(self, now: float) -> None:
        events = self.registry.expire(now)
        for event in events:
            conn = self._sessions.pop(event.peer_id, None)
            if conn is not None:  # socket still open but silent
                conn.close_soon(CLOSE_EXPIRED, b"registration expired")
        self._publish(events)

    # -- WebSocket session -----------------------------------------------------------------

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
        conn = _Connection(
            ws,
            self._next_session,
            request.remote or "",
            self.config.send_queue_limit,
            self.config.public_host or _reached_host(request),
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

    def _forget(self, conn: _Connection) -> None:
        """The socket is gone; the registration (if any) stays until it expires."""
        if conn.peer_id is None:
            return
        if self._sessions.get(conn.peer_id) is conn:
            del self._sessions[conn.peer_id]
        self.registry.disconnect(conn.peer_id, conn.session)

    async def _receive(self, ws: web.WebSocketResponse, timeout: float | None = None) -> Any:
        """The next data frame (bytes, or str for a text frame), or None once the socket ends."""
        msg = await ws.receive(timeout=timeout)
        if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
            return msg.data
        if msg.type is WSMsgType.ERROR:
            log.info("websocket error: %s", ws.exception())
        return None

    async def _serve_session(self, conn: _Connection) -> None:
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
            data = await self._receive(conn.ws, timeout=self.config.join_timeout)
        except TimeoutError:
            log.info("session %d (%s): no join in time", conn.session, conn.remote)
            self._refuse(conn, ProtocolError(ErrorCode.BAD_STATE, "no join in time"))
            return
        if data is None:
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

    def _refuse(self, conn: _Connection, exc: ProtocolError) -> None:
        conn.send(_error_frame(exc))
        conn.close_soon(WSCloseCode.POLICY_VIOLATION, b"refused")

    async def _admit(self, conn: _Connection, fields: dict[str, Any], nonce: bytes) -> None:
        public_key, job = fields["public_key"], check_job(fields["job"])
        if not verify_signature(
            public_key, fields["signature"], DOMAIN_RENDEZVOUS_AUTH + nonce + job.encode()
        ):
            raise ProtocolError(ErrorCode.BAD_SIGNATURE, "join signature does not verify")
        proof = check_proof(fields.get("proof"))
        self._check_policy(job, public_key, proof)
        addrs = list(dict.fromkeys(check_addrs(fields["addrs"])))
        meta = check_meta(fields["meta"])
        self.registry.check_room(public_key, job)  # before dialing anything back
        reachable = await self._verify_addrs(addrs, public_key, conn.remote)
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
        conn.peer_id = member.peer_id
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

    def _check_policy(self, job: str, public_key: bytes, proof: bytes | None) -> None:
        """Raise ``not_invited`` unless the job's policy admits this (authenticated) key."""
        policy = self.config.policy_for(job)
        if policy is None:
            if self.config.closed:
                raise ProtocolError(
                    ErrorCode.NOT_INVITED, f"job {job} is not served by this rendezvous"
                )
            return
        refusal = policy.check(job, public_key, proof)
        if refusal is not None:
            peer_id = peer_id_from_public_key(public_key)
            raise ProtocolError(ErrorCode.NOT_INVITED, refusal_message(refusal, job, peer_id))

    async def _verify_addrs(self, addrs: list[str], public_key: bytes, remote: str) -> list[str]:
        """The offered addresses that answered a dial-back with a valid signature. Only
        addresses on ``remote`` (the IP the WebSocket came from) are dialed, unless
        ``dialback_any_host``: the rendezvous is not a port scanner for hire."""
        timeout = self.config.dialback_timeout
        targets = await asyncio.gather(*(self._dialback_target(a, remote) for a in addrs))
        results = await asyncio.gather(*(
            dial_back(t, public_key, timeout) for t in targets if t is not None
        ))
        dialed = iter(results)
        return [a for a, t in zip(addrs, targets, strict=True) if t is not None and next(dialed)]

    async def _dialback_target(self, addr: str, remote: str) -> str | None:
        """What to dial to check ``addr`` (it, or its host name resolved to ``remote``), or
        None when ``addr`` is not on the peer's own IP."""
        if self.config.dialback_any_host:
            return addr
        host, _, port = addr.removeprefix("tcp://").rpartition(":")
        observed = _as_ip(remote)
        if observed is None:
            log.info("not dialing back %s: no IP for the peer's connection (%r)", addr, remote)
            return None
        offered = _as_ip(host)
        if offered is not None:
            if offered == observed:
                return addr
            log.info("not dialing back %s: not on %s, where the peer connects from", addr, remote)
            return None
        try:
            async with asyncio.timeout(self.config.dialback_timeout):
                await self._lookups.acquire()
                lookup = asyncio.get_running_loop().run_in_executor(
                    None, functools.partial(socket.getaddrinfo, host, int(port),
                                            type=socket.SOCK_STREAM))
                lookup.add_done_callback(lambda _f: self._lookups.release())
                infos = await asyncio.shield(lookup)
        except (OSError, TimeoutError, UnicodeError) as exc:
            log.info("not dialing back %s: cannot resolve %s (%s)", addr, host, exc)
            return None
        if any(_as_ip(str(info[4][0])) == observed for info in infos):
            return f"tcp://{_url_host(str(observed))}:{port}"
        log.info("not dialing back %s: %s does not resolve to %s, where the peer connects "
                 "from", addr, host, remote)
        return None

    def ice_servers_for(self, peer_id: str, host: str) -> list[dict[str, Any]]:
        """Our STUN (at ``host``, as the peer reaches us), TURN with fresh credentials, extras."""
        servers: list[dict[str, Any]] = []
        if self.stun is not None:
            servers.append({"urls": [f"stun:{_url_host(host)}:{self.stun.port}"]})
        if self.config.turn_urls and self.config.turn_secret:
            servers.append(turn_ice_server(
                self.config.turn_urls, self.config.turn_secret, peer_id, self.config.turn_ttl
            ))
        servers.extend(self.config.ice_servers)
        return servers

    def _welcome(self, member: Member, conn: _Connection) -> bytes:
        others = self.registry.members(member.job, exclude=member.peer_id)
        return encode_prepacked(
            MsgType.WELCOME,
            {"members": pack_array([m.packed for m in others])},
            peer_id=member.peer_id,
            observed_ip=conn.remote,
            reachable_addrs=list(member.addrs),
            ttl=self.config.ttl,
            heartbeat_interval=self.config.heartbeat_interval,
            ice_servers=self.ice_servers_for(member.peer_id, conn.host),
        )

    async def _session_loop(self, conn: _Connection) -> None:
        errors = 0
        messages = TokenBucket(self.config.message_rate, self.config.message_burst)
        while not conn.closing:
            data = await self._receive(conn.ws)
            if data is None:
                return
            try:
                if not messages.take(time.monotonic()):
                    raise _Flooding(self.config.message_rate)
                if self._handle_message(conn, data):
                    return
            except ProtocolError as exc:
                if exc.code not in _BENIGN_ERRORS or isinstance(exc, _Flooding):
                    errors += 1
                log.info("session %d (%s): %s", conn.session, conn.peer_id, exc)
                conn.send(_error_frame(exc))
                if errors >= self.config.max_errors:
                    conn.close_soon(WSCloseCode.POLICY_VIOLATION, b"too many errors")
                    return

    def _handle_message(self, conn: _Connection, data: bytes | str) -> bool:
        """Apply one message of a joined session; True when the session is over."""
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
        self, conn: _Connection, size: int, fields: dict[str, Any], now: float
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

    # -- HTTP ------------------------------------------------------------------------------

    async def _handle_healthz(self, request: web.Request) -> web.Response:
        return web.json_response({
            "status": "ok",
            "version": self._version,
            "protocol": PROTOCOL_VERSION,
            "jobs": len(self.registry.jobs()),
            "peers": len(self.registry),
            "uptime_s": round(time.monotonic() - self._started, 3),
            "stun": None if self.stun is None else {
                "port": self.stun.port, "counters": dict(self.stun.counters),
            },
        })

    async def _handle_peers(self, request: web.Request) -> web.Response:
        job = request.query.get("job", "")
        if not JOB_RE.match(job):
            return web.json_response(
                {"error": f"query parameter job must match {JOB_RE.pattern}"}, status=400
            )
        now = time.monotonic()
        expose = self.config.expose_addresses
        peers = [self._peer_json(m, now, expose) for m in self.registry.members(job)]
        return web.json_response({"job": job, "peers": peers})

    @staticmethod
    def _peer_json(member: Member, now: float, expose_addresses: bool) -> dict[str, Any]:
        """What ``GET /peers`` shows of a member: never its proof nor its observed IP, and its
        addresses only with ``expose_addresses``."""
        latest = member.latest_report
        return {
            "peer_id": member.peer_id,
            **({"addrs": list(member.addrs)} if expose_addresses else {}),
            "reachable": bool(member.addrs),
            "meta": member.meta,
            "joined_at": member.joined_at,
            "last_seen_s_ago": round(now - member.last_seen, 3),
            "connected": member.connected,
            "epoch": latest["epoch"] if latest else None,
            "metrics": latest["metrics"] if latest else None,
            "history": list(member.history),
            "links": dict(member.links),
        }

    async def _handle_dashboard(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        rows = []
        for job in self.registry.jobs():
            for m in self.registry.members(job):
                latest = m.latest_report
                cells = (
                    job,
                    m.peer_id,
                    (", ".join(m.addrs) if self.config.expose_addresses else "reachable")
                    if m.addrs else "(not reachable)",
                    "yes" if m.connected else "no",
                    f"{now - m.last_seen:.1f}s ago",
                    "" if latest is None else f"epoch {latest['epoch']}: {latest['metrics']}",
                )
                rows.append(
                    "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
                )
        body = (
            "<!doctype html><meta charset=utf-8><title>peerlearn rendezvous</title>"
            "<meta http-equiv=refresh content=5><h1>peerlearn rendezvous</h1>"
            f"<p>{len(self.registry.jobs())} jobs, {len(self.registry)} peers</p>"
            "<table border=1 cellpadding=4><tr><th>job</th><th>peer</th><th>ZeroMQ</th>"
            "<th>connected</th><th>last seen</th><th>latest report</th></tr>"
            + "".join(rows)
            + "</table>"
        )
        return web.Response(text=body, content_type="text/html")


@contextlib.asynccontextmanager
async def run_rendezvous(
    config: RendezvousConfig | None = None, **overrides: Any
) -> AsyncIterator[RendezvousServer]:
    """A started server (default: 127.0.0.1, TCP and STUN on port 0), closed on exit.

    For tests and embedding.
    """
    base = config or RendezvousConfig(host="127.0.0.1", port=0, stun_port=0)
    server = RendezvousServer(dataclasses.replace(base, **overrides))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def _serve_until_signal(config: RendezvousConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with run_rendezvous(config) as server:
        log.info("rendezvous listening on http://%s:%d", config.host, server.port)
        if server.stun is not None:
            log.info("STUN on udp %s:%d", server.stun.host, server.stun.port)
        if config.turn_urls:
            log.info("TURN credentials for %s (ttl %gs)", ", ".join(config.turn_urls),
                     config.turn_ttl)
        for job, policy in config.jobs.items():  # what is checked, never the secret itself
            log.info("job %s is closed: %s", job, ", ".join(filter(None, (
                "join secret" if policy.secret is not None else "",
                "" if policy.allowed_peers is None else f"{len(policy.allowed_peers)} peer ids",
            ))) or "open")
        if config.closed:
            log.info("closed rendezvous: jobs other than %s are refused",
                     ", ".join(config.jobs) or "(none)")
        await stop.wait()
        log.info("rendezvous shutting down")


def serve(config: RendezvousConfig) -> None:
    """Run the rendezvous until SIGINT or SIGTERM."""
    asyncio.run(_serve_until_signal(config))
