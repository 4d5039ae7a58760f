"""The rendezvous server: its life (start, close, the reaper) and how a process runs it.

One aiohttp application serves the WebSocket session at ``/ws`` (``rendezvous.session``, one
``rendezvous.connection.Connection`` per socket, joins checked by ``rendezvous.admission``)
and the HTTP endpoints (``rendezvous.http``); membership lives in ``rendezvous.registry``. The
same process answers STUN on UDP (``rendezvous.stun``) and hands out TURN credentials
(``rendezvous.turn``) in ``welcome.ice_servers``.

In-process: ``async with run_rendezvous(config) as server`` (``server.port``,
``server.stun_port``, ``server.url``). As a process: ``serve(config, ready_file=...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, web

from rendezvous.admission import Admission
from rendezvous.config import RendezvousConfig
from rendezvous.connection import Connection
from rendezvous.http import HttpEndpoints
from rendezvous.ratelimit import KeyedRateLimiter
from rendezvous.registry import Registry
from rendezvous.session import CLOSE_EXPIRED, SessionHandling
from rendezvous.stun import StunServer

log = logging.getLogger(__name__)


def _package_version() -> str:
    try:
        return metadata.version("peerlearn")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class RendezvousServer(SessionHandling, HttpEndpoints):
    """The rendezvous service. ``start()`` binds, ``close()`` stops everything (idempotent)."""

    def __init__(self, config: RendezvousConfig | None = None) -> None:
        self.config = config or RendezvousConfig()
        self.registry = Registry(self.config.ttl, self.config.history_len)
        self.admission = Admission(self.config)
        self._sessions: dict[str, Connection] = {}  # peer_id -> the session owning it
        self._connections: set[Connection] = set()
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._port: int | None = None
        self.stun: StunServer | None = None
        """The STUN server (None when disabled); its ``counters`` count datagrams by outcome."""
        self._started = time.monotonic()
        self._next_session = 0
        self._closed = False
        self._version = _package_version()
        self._failed_joins = KeyedRateLimiter(
            self.config.failed_join_rate, self.config.failed_join_burst
        )

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
        self._add_http_routes(app)
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

    async def _dialback_target(self, addr: str, remote: str) -> str | None:
        """``Admission.dialback_target`` (kept for callers of the old name)."""
        return await self.admission.dialback_target(addr, remote)

    # -- expiry ----------------------------------------------------------------------------

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


@contextlib.asynccontextmanager
async def run_rendezvous(
    config: RendezvousConfig | None = None, **overrides: Any
) -> AsyncIterator[RendezvousServer]:
    """A started server (default: 127.0.0.1, TCP and STUN on port 0), closed on exit.

    For tests and embedding: the bound ports are ``server.port`` / ``server.stun_port``.
    """
    base = config or RendezvousConfig(host="127.0.0.1", port=0, stun_port=0)
    server = RendezvousServer(dataclasses.replace(base, **overrides))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def write_ready_file(path: Path, server: RendezvousServer) -> None:
    """``{"port": P, "stun_port": S}`` (S null without STUN) into ``path``, atomically: a
    reader sees no file or the whole of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"port": server.port, "stun_port": server.stun_port}))
    os.replace(tmp, path)


def _log_settings(config: RendezvousConfig, server: RendezvousServer) -> None:
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


async def serve_until_signal(config: RendezvousConfig, ready_file: Path | None = None) -> None:
    """Serve until SIGINT or SIGTERM; once serving, write ``ready_file`` (removed at the end)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with run_rendezvous(config) as server:
        _log_settings(config, server)
        if ready_file is not None:
            write_ready_file(ready_file, server)
        try:
            await stop.wait()
        finally:
            if ready_file is not None:
                ready_file.unlink(missing_ok=True)
        log.info("rendezvous shutting down")


def serve(config: RendezvousConfig, ready_file: Path | None = None) -> None:
    """Run the rendezvous until SIGINT or SIGTERM (see ``serve_until_signal``)."""
    asyncio.run(serve_until_signal(config, ready_file))
