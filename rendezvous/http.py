"""The rendezvous' HTTP side: ``GET /healthz``, ``GET /peers?job=J`` and the ``/`` dashboard.

Neither shows a peer's addresses (only whether it is ``reachable``) unless the rendezvous runs
with ``expose_addresses``; observed IPs, join proofs and secrets are never shown.
"""

from __future__ import annotations

import html
import time
from typing import Any

from aiohttp import web

from overlay.protocol import JOB_RE, PROTOCOL_VERSION
from rendezvous.config import RendezvousConfig
from rendezvous.registry import Member, Registry
from rendezvous.stun import StunServer


def peer_json(member: Member, now: float, expose_addresses: bool) -> dict[str, Any]:
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


class HttpEndpoints:
    """The HTTP handlers, as methods of ``RendezvousServer`` (``rendezvous.server``), which
    owns the state below."""

    config: RendezvousConfig
    registry: Registry
    stun: StunServer | None
    _version: str
    _started: float

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
                "answered_by_kind": dict(self.stun.answered_by_kind),
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
        peers = [peer_json(m, now, expose) for m in self.registry.members(job)]
        return web.json_response({"job": job, "peers": peers})

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

    def _add_http_routes(self, app: web.Application) -> None:
        """``/``, ``/healthz`` and ``/peers`` on ``app``."""
        app.router.add_get("/", self._handle_dashboard)
        app.router.add_get("/healthz", self._handle_healthz)
        app.router.add_get("/peers", self._handle_peers)
