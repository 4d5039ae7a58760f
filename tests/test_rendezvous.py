"""The rendezvous: registry rules, then a real server on port 0 with real WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from overlay.dialback import answer_probe
from overlay.errors import RendezvousError
from overlay.events import Joined, Left
from overlay.identity import DOMAIN_RENDEZVOUS_AUTH, Identity
from overlay.protocol import MAX_MESSAGE_BYTES, MsgType, decode, encode
from overlay.rendezvous_client import RendezvousClient, normalize_url
from rendezvous import RendezvousConfig, RendezvousServer, run_rendezvous
from rendezvous.connection import TRANSITIONS, Connection, Stage
from rendezvous.registry import Registry
from testkit.fixtures import FAST_RENDEZVOUS, running_client, running_rendezvous

DIALBACK = 0.5  # dialback_timeout: shorter than in FAST_RENDEZVOUS
META = {"samples": 100}  # what a client announces unless a test says otherwise
WAIT = 3.0  # bound on any single awaited event


# -- helpers --------------------------------------------------------------------------------


async def next_event(c: RendezvousClient, timeout: float = WAIT) -> Joined | Left:
    return await asyncio.wait_for(c.events.get(), timeout)


@contextlib.asynccontextmanager
async def raw_ws(server: RendezvousServer) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(server.url) as ws:
            yield ws


async def recv(ws: aiohttp.ClientWebSocketResponse) -> tuple[MsgType, dict[str, Any]] | None:
    """The next message, or None if the server closed the socket."""
    msg = await ws.receive(timeout=WAIT)
    if msg.type is not aiohttp.WSMsgType.BINARY:
        return None
    return decode(msg.data)


def join_frame(identity: Identity, nonce: bytes, job: str = "mnist", **fields: Any) -> bytes:
    msg = {
        "public_key": identity.public_key,
        "signature": identity.sign(DOMAIN_RENDEZVOUS_AUTH + nonce + job.encode()),
        "job": job,
        "addrs": [],
        "meta": {},
        **fields,
    }
    return encode(MsgType.JOIN, **msg)


async def raw_join(ws: aiohttp.ClientWebSocketResponse, identity: Identity) -> dict[str, Any]:
    challenge = await recv(ws)
    assert challenge is not None and challenge[0] is MsgType.CHALLENGE
    await ws.send_bytes(join_frame(identity, challenge[1]["nonce"]))
    welcome = await recv(ws)
    assert welcome is not None and welcome[0] is MsgType.WELCOME
    return welcome[1]


async def get_json(server: RendezvousServer, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.port}{path}") as resp:
            return resp.status, await resp.json()


@contextlib.asynccontextmanager
async def probe_responder(identity: Identity) -> AsyncIterator[str]:
    """The peer's ROUTER (a CURVE server with the peer's key), reduced to answering probes."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, identity.curve_secret_key)
    port = sock.bind_to_random_port("tcp://127.0.0.1")

    async def serve() -> None:
        while True:
            ident, frame = await sock.recv_multipart()
            reply = answer_probe(identity, msgpack.unpackb(frame, raw=False))
            if reply is not None:
                await sock.send_multipart([ident, reply])

    task = asyncio.create_task(serve())
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close(linger=0)
        ctx.term()


# -- registry (no sockets) --------------------------------------------------------------------


def test_registry_join_rejoin_leave_expire() -> None:
    reg = Registry(ttl=10.0, history_len=2)
    a, b = Identity.generate(), Identity.generate()
    _, events = reg.join(public_key=a.public_key, job="j", addrs=[], meta={}, session=1, now=0.0)
    assert [(e.kind, e.peer_id) for e in events] == [("joined", a.peer_id)]
    reg.join(public_key=b.public_key, job="j", addrs=["tcp://h:1"], meta={}, session=2, now=0.0)
    assert {m.peer_id for m in reg.members("j", exclude=a.peer_id)} == {b.peer_id}

    # Same key, same addresses: the new session takes over silently.
    _, events = reg.join(public_key=a.public_key, job="j", addrs=[], meta={}, session=3, now=1.0)
    assert events == []
    assert not reg.touch(a.peer_id, 1, 2.0)  # the old session no longer owns it
    assert reg.touch(a.peer_id, 3, 2.0)
    # Changed addresses: others hear left(replaced) then joined.
    _, events = reg.join(public_key=b.public_key, job="j", addrs=[], meta={}, session=4, now=2.0)
    assert [(e.kind, e.reason) for e in events] == [("left", "replaced"), ("joined", None)]

    for epoch in range(3):
        assert reg.report(a.peer_id, 3, epoch, {"acc": 0.5}, now=5.0)
    member = reg.get(a.peer_id)
    assert member is not None and [r["epoch"] for r in member.history] == [1, 2]

    assert reg.leave(b.peer_id, 1) == []  # not its session
    assert [e.reason for e in reg.leave(b.peer_id, 4)] == ["leave"]
    reg.disconnect(a.peer_id, 3)
    assert reg.expire(now=14.9) == []
    assert [(e.peer_id, e.reason) for e in reg.expire(now=15.1)] == [(a.peer_id, "expired")]
    assert len(reg) == 0 and reg.jobs() == {}


def test_config_rejects_heartbeat_above_ttl() -> None:
    with pytest.raises(ValueError):
        RendezvousConfig(ttl=1.0, heartbeat_interval=2.0)


@pytest.mark.parametrize("port", [-1, 65536, 99999])
def test_config_rejects_a_port_out_of_range(port: int) -> None:
    with pytest.raises(ValueError, match="not a TCP port"):
        RendezvousConfig(port=port)


def test_normalize_url() -> None:
    assert normalize_url("example.org:5555") == "ws://example.org:5555/ws"
    assert normalize_url("http://h:1") == "ws://h:1/ws"
    assert normalize_url("wss://h:1/ws") == "wss://h:1/ws"
    with pytest.raises(ValueError):
        normalize_url("ftp://h:1")


# -- sessions -----------------------------------------------------------------------------------


async def test_join_welcome_and_pushed_events() -> None:
    async with running_rendezvous(fast=True, dialback_timeout=DIALBACK) as server, \
            running_client(server, meta=META) as a:
        assert a.members == {} and a.observed_ip == "127.0.0.1"
        assert a.ice_servers == [{"urls": [f"stun:127.0.0.1:{server.stun_port}"]}]
        async with running_client(server, meta={"samples": 7}) as b:
            assert list(b.members) == [a.peer_id]
            assert b.members[a.peer_id].public_key == a.identity.public_key
            event = await next_event(a)
            assert isinstance(event, Joined)
            member = event.member
            assert member.peer_id == b.peer_id
            assert dict(member.meta) == {"samples": 7} and member.addrs == ()
            started = time.monotonic()
        # b left cleanly: a hears it at once, not after the TTL.
        assert await next_event(a) == Left(b.peer_id, "leave")
        assert time.monotonic() - started < 1.0
        assert a.members == {}
        # Other jobs are separate.
        async with running_client(server, job="cifar", meta=META) as c:
            assert c.members == {}
        assert a.events.empty()


async def test_dropped_socket_expires_after_ttl() -> None:
    async with running_rendezvous(fast=True, dialback_timeout=DIALBACK) as server, \
            running_client(server, meta=META) as a:
        b = RendezvousClient(server.url, Identity.generate(), "mnist", [], {}, reconnect=False)
        await b.start()
        assert isinstance(await next_event(a), Joined)
        started = time.monotonic()
        await b.close(leave=False)
        status, body = await get_json(server, "/peers?job=mnist")
        assert {p["peer_id"]: p["connected"] for p in body["peers"]}[b.peer_id] is False
        ttl = FAST_RENDEZVOUS["ttl"]
        assert await next_event(a, timeout=ttl + 2.0) == Left(b.peer_id, "expired")
        assert ttl - 0.2 < time.monotonic() - started < ttl + 1.5
        # a itself stayed alive through its heartbeats.
        status, body = await get_json(server, "/peers?job=mnist")
        assert [p["peer_id"] for p in body["peers"]] == [a.peer_id]


async def test_same_key_replaces_the_old_session_silently() -> None:
    async with running_rendezvous(fast=True, dialback_timeout=DIALBACK) as server, \
            running_client(server, meta=META) as a:
        key = Identity.generate()
        async with running_client(server, key, reconnect=False, meta=META) as first:
            assert isinstance(await next_event(a), Joined)
            async with running_client(server, key, meta=META) as second:
                await asyncio.wait_for(_until_closed(first), WAIT)
                assert second.members.keys() == {a.peer_id}
                assert a.events.empty()


async def _until_closed(c: RendezvousClient) -> None:
    while c.connected:
        await asyncio.sleep(0.02)


async def test_bad_signature_is_refused() -> None:
    async with running_rendezvous(fast=True, dialback_timeout=DIALBACK) as server, \
            raw_ws(server) as ws:
        challenge = await recv(ws)
        assert challenge is not None
        await ws.send_bytes(join_frame(Identity.generate(), b"\x00" * 32))
        reply = await recv(ws)
        assert reply is not None and reply[0] is MsgType.ERROR
        assert reply[1]["code"] == "bad_signature" and "signature" in reply[1]["message"]
        assert await recv(ws) is None
        assert len(server.registry) == 0


async def test_client_raises_the_servers_message() -> None:
    async with running_rendezvous(fast=True, dialback_timeout=DIALBACK) as server:
        c = RendezvousClient(server.url, Identity.generate(), "bad job!", [], {})
        with pytest.raises(RendezvousError, match="bad_job"):
            await c.start()
        await c.close()


PRE_JOIN_GARBAGE: list[tuple[str, Any, str | None]] = [
    ("text frame", "hello", "malformed"),
    ("not msgpack", b"\xc1\xc1\xc1", "malformed"),
    ("not a map", msgpack.packb([1, 2, 3]), "malformed"),
    ("unknown type", msgpack.packb({"type": "gimme"}), "malformed"),
    ("wrong types", msgpack.packb({"type": "join", "public_key": "x", "signature": b"",
                                   "job": "j", "addrs": [], "meta": {}}), "malformed"),
    ("heartbeat first", encode(MsgType.HEARTBEAT), "bad_state"),
    ("oversized", b"\x00" * (MAX_MESSAGE_BYTES + 1), "too_large"),
    ("twice oversized", b"\x00" * (2 * MAX_MESSAGE_BYTES + 1), None),  # aiohttp closes, 1009
]


@pytest.mark.parametrize("name,frame,code", PRE_JOIN_GARBAGE, ids=[g[0] for g in PRE_JOIN_GARBAGE])
async def test_garbage_before_join_is_refused_and_closed(name: str, frame: Any, code: str) -> None:
    async with running_rendezvous(fast=True, dialback_timeout=DIALBACK) as server:
        async with raw_ws(server) as ws:
            assert await recv(ws) is not None  # challenge
            if isinstance(frame, str):
                await ws.send_str(frame)
            else:
                await ws.send_bytes(frame)
            reply = await recv(ws)
            if code is not None:
                assert reply is not None and reply[0] is MsgType.ERROR
                assert reply[1]["code"] == code
                reply = await recv(ws)
            assert reply is None  # closed
        # ... and the server still serves others.
        async with running_client(server, meta=META) as c:
            assert c.connected
        status, body = await get_json(server, "/healthz")
        assert status == 200 and body["status"] == "ok"


async def test_garbage_after_join_gets_errors_then_close() -> None:
    async with running_rendezvous(fast=True, dialback_timeout=DIALBACK, max_errors=4) as server, \
            raw_ws(server) as ws:
        await raw_join(ws, Identity.generate())
        bad = [
            b"\xc1",
            encode(MsgType.JOIN, public_key=b"", signature=b"", job="j", addrs=[], meta={}),
            encode(MsgType.REPORT, epoch=1, metrics={"nested": {"no": 1}}),
        ]
        for frame in bad:
            await ws.send_bytes(frame)
            reply = await recv(ws)
            assert reply is not None and reply[0] is MsgType.ERROR
        await ws.send_bytes(encode(MsgType.HEARTBEAT))  # still a working session
        await ws.send_bytes(encode(MsgType.WELCOME))
        reply = await recv(ws)
        assert reply is not None and reply[0] is MsgType.ERROR  # the 4th error ...
        assert await recv(ws) is None  # ... closes
        status, body = await get_json(server, "/healthz")
        assert status == 200 and body["peers"] == 1  # soft state: kept until the TTL


async def test_join_must_come_in_time() -> None:
    async with running_rendezvous(fast=True, dialback_timeout=DIALBACK,
                                  join_timeout=0.3) as server, \
            raw_ws(server) as ws:
        assert await recv(ws) is not None  # challenge
        reply = await recv(ws)
        assert reply is not None and reply[1]["code"] == "bad_state"
        assert await recv(ws) is None


# -- HTTP -------------------------------------------------------------------------------------


async def test_http_healthz_peers_and_dashboard() -> None:
    async with running_rendezvous(fast=True, dialback_timeout=DIALBACK) as server:
        status, body = await get_json(server, "/healthz")
        assert status == 200
        assert body["status"] == "ok" and body["jobs"] == 0 and body["peers"] == 0
        assert body["uptime_s"] >= 0 and "version" in body
        for query in ("", "?job=", "?job=no%20spaces"):
            status, body = await get_json(server, f"/peers{query}")
            assert status == 400 and "error" in body
        assert await get_json(server, "/peers?job=nobody") == (200, {"job": "nobody", "peers": []})

        async with running_client(server, meta={"gpu": False}) as a:
            await a.report(1, {"acc": 0.5, "loss": 1.25})
            await a.report(2, {"acc": 0.75, "loss": 0.5})
            await a.report(3, {"bad": [1]})  # refused locally, never raises
            for _ in range(50):  # reports are fire-and-forget: wait until the server has them
                status, body = await get_json(server, "/peers?job=mnist")
                if body["peers"] and body["peers"][0]["epoch"] == 2:
                    break
                await asyncio.sleep(0.02)
            (peer,) = body["peers"]
            assert peer["peer_id"] == a.peer_id and peer["meta"] == {"gpu": False}
            assert peer["reachable"] is False and peer["connected"]
            assert "addrs" not in peer  # redacted unless expose_addresses
            assert peer["metrics"] == {"acc": 0.75, "loss": 0.5}
            assert [h["epoch"] for h in peer["history"]] == [1, 2]
            assert 0 <= peer["last_seen_s_ago"] < 2
            status, body = await get_json(server, "/healthz")
            assert (body["jobs"], body["peers"]) == (1, 1)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{server.port}/") as resp:
                    assert resp.status == 200 and a.peer_id in await resp.text()
        await a.report(4, {"acc": 1.0})  # closed: dropped quietly


# -- dial-back ----------------------------------------------------------------------------------


async def test_only_addresses_that_answer_with_the_right_key_are_kept() -> None:
    me, someone_else = Identity.generate(), Identity.generate()
    async with (
        running_rendezvous(fast=True, dialback_timeout=DIALBACK, expose_addresses=True) as server,
        probe_responder(me) as mine,
        probe_responder(someone_else) as theirs,
        running_client(server, meta=META) as watcher,
    ):
        dead = "tcp://127.0.0.1:9"  # discard port: nobody listens
        started = time.monotonic()
        async with running_client(server, me, addrs=[theirs, mine, dead], meta=META) as c:
            assert time.monotonic() - started < DIALBACK + 1.0  # in parallel
            assert c.reachable_addrs == [mine]
            event = await next_event(watcher)
            assert isinstance(event, Joined) and event.member.addrs == (mine,)
            _, body = await get_json(server, "/peers?job=mnist")
            reach = {p["peer_id"]: (p["reachable"], p["addrs"]) for p in body["peers"]}
            assert reach == {c.peer_id: (True, [mine]), watcher.peer_id: (False, [])}


# -- reconnection -------------------------------------------------------------------------------


async def test_client_rejoins_a_restarted_server_and_reconciles() -> None:
    async with running_rendezvous(fast=True, dialback_timeout=DIALBACK) as first:
        port = first.port
        a = RendezvousClient(first.url, Identity.generate(), "mnist", [], {}, backoff_initial=0.1)
        await a.start()
        b = RendezvousClient(first.url, Identity.generate(), "mnist", [], {}, reconnect=False)
        await b.start()
        assert isinstance(await next_event(a), Joined)
    await b.close()  # the server is gone; b does not come back
    try:
        async with running_rendezvous(fast=True, dialback_timeout=DIALBACK, port=port) as second:
            # a re-joins by itself; b is not in the new welcome, so a hears it is lost.
            assert await next_event(a, timeout=5.0) == Left(b.peer_id, "lost")
            assert a.connected and a.members == {}
            _, body = await get_json(second, "/peers?job=mnist")
            assert [p["peer_id"] for p in body["peers"]] == [a.peer_id]
            async with running_client(second, meta=META) as c:
                event = await next_event(a)
                assert isinstance(event, Joined) and event.member.peer_id == c.peer_id
    finally:
        await a.close()
        await a.close()  # idempotent


async def test_server_close_is_idempotent_and_frees_the_port() -> None:
    timers: dict[str, Any] = {**FAST_RENDEZVOUS, "dialback_timeout": DIALBACK}
    server = RendezvousServer(RendezvousConfig(host="127.0.0.1", port=0, stun_port=0, **timers))
    await server.start()
    port = server.port
    async with raw_ws(server) as ws:
        await raw_join(ws, Identity.generate())
        await server.close()
        await server.close()
        assert await recv(ws) is None
    async with run_rendezvous(port=port) as again:
        assert again.port == port


# -- as a process: ports read back, not guessed -----------------------------------------------


async def test_process_on_port_zero_writes_its_ports_to_the_ready_file(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rendezvous", "--host", "127.0.0.1", "--port", "0",
        "--stun-port", "0", "--ready-file", str(ready),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(20):
            while not ready.exists():
                assert proc.returncode is None
                await asyncio.sleep(0.05)
        ports = json.loads(ready.read_text())
        assert set(ports) == {"port", "stun_port"} and ports["port"] > 0 and ports["stun_port"] > 0
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{ports['port']}/healthz") as resp:
                assert (await resp.json())["stun"]["port"] == ports["stun_port"]
    finally:
        proc.terminate()
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    assert f"rendezvous listening on http://127.0.0.1:{ports['port']}" in out.decode()
    assert not ready.exists()  # removed at shutdown: a restart cannot read stale ports


async def test_run_rendezvous_yields_a_started_server_on_free_ports() -> None:
    async with run_rendezvous() as a, run_rendezvous() as b:
        assert a.port != b.port and a.stun_port != b.stun_port
        assert a.url == f"ws://127.0.0.1:{a.port}/ws"
    async with run_rendezvous(RendezvousConfig(host="127.0.0.1", port=0, stun_port=None)) as c:
        assert c.stun_port is None and c.port > 0


# -- a session's stages ------------------------------------------------------------------------


class _Socket:
    closed = False

    async def send_bytes(self, frame: bytes) -> None:
        pass

    async def close(self, code: int, message: bytes) -> None:
        self.closed = True


async def test_session_stages_change_in_one_place(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="rendezvous.connection")
    conn = Connection(_Socket(), 7, "127.0.0.1", limit=4)  # type: ignore[arg-type]
    stages = [conn.stage]
    conn.admitting()
    with pytest.raises(RuntimeError, match="admitting -> admitting not allowed"):
        conn.admitting()
    conn.joined("peer-a")
    stages.append(conn.stage)
    assert conn.peer_id == "peer-a" and not conn.closing
    conn.close_soon()
    stages.append(conn.stage)
    assert conn.closing
    conn.close_soon()  # a second close changes nothing
    await conn.finish(1.0)
    stages.append(conn.stage)
    assert stages == [Stage.CHALLENGED, Stage.JOINED, Stage.CLOSING, Stage.CLOSED]
    changes = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert changes == [f"session 7 ({who}): {old} -> {new}" for who, old, new in [
        ("127.0.0.1", "challenged", "admitting"), ("peer-a", "admitting", "joined"),
        ("peer-a", "joined", "closing"), ("peer-a", "closing", "closed")]]
    assert all(TRANSITIONS[stage] <= set(Stage) for stage in Stage)
    assert TRANSITIONS[Stage.CLOSED] == frozenset()
