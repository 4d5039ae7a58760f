"""TURN credentials are renewed before they expire (``refresh_ice`` -> ``ice_servers``).

The protocol against an in-process rendezvous (answer, rate limit, a renewal that fails), and
end to end against a real coturn (Debian's ``turnserver`` on 127.0.0.1, ``use-auth-secret``):
with ``turn_ttl`` = 4 s, peers that have run for more than two lifetimes still open a
relay-only WebRTC link, while coturn refuses the credentials they were first given (without
renewal, that link does not open: checked by hand with ``ICE_RENEW_AT`` = 1000). About 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioice.stun import TransactionFailed
from aioice.turn import create_turn_endpoint
from test_rendezvous import join_frame, raw_ws, recv

import overlay.rendezvous_client as rendezvous_client
from overlay.identity import Identity
from overlay.protocol import ErrorCode, MsgType, decode, encode
from rendezvous import RendezvousServer
from rendezvous.turn import verify_credentials
from testkit.fixtures import running_client, running_host, running_rendezvous, until

SECRET = "renewal-secret"  # noqa: S105 (a throwaway secret for a coturn that lives seconds)
TTL = 4.0


def _turn(server: dict[str, Any]) -> bool:
    return any(u.startswith("turn:") for u in server["urls"])


def turn_entry(ice_servers: list[dict[str, Any]]) -> dict[str, Any]:
    (entry,) = [s for s in ice_servers if _turn(s)]
    return entry


def stamp(entry: dict[str, Any]) -> int:
    return int(entry["username"].split(":", 1)[0])


@contextlib.asynccontextmanager
async def joined(server: RendezvousServer) -> AsyncIterator[
        tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]]:
    """A raw joined session and its welcome."""
    async with raw_ws(server) as ws:
        challenge = await recv(ws)
        assert challenge is not None
        await ws.send_bytes(join_frame(Identity.generate(), challenge[1]["nonce"]))
        welcome = await recv(ws)
        assert welcome is not None and welcome[0] is MsgType.WELCOME, welcome
        yield ws, welcome[1]


# -- protocol (no coturn) ---------------------------------------------------------------------


def test_ice_expiry_reads_rest_usernames() -> None:
    servers = [{"urls": ["stun:h:3478"]},
               {"urls": ["turn:h:3478"], "username": "1700000100:peer", "credential": "x"},
               {"urls": ["turn:g:3478"], "username": "1700000050:peer", "credential": "y"},
               {"urls": ["turn:s:3478"], "username": "static-user", "credential": "z"}]
    assert rendezvous_client.ice_expiry(servers) == 1700000050.0
    assert rendezvous_client.ice_expiry(servers[:1] + servers[3:]) is None


def test_refresh_messages_decode() -> None:
    assert decode(encode(MsgType.REFRESH_ICE)) == (MsgType.REFRESH_ICE, {})
    msg_type, fields = decode(encode(MsgType.ICE_SERVERS, ice_servers=[], ice_ttl=3.5))
    assert msg_type is MsgType.ICE_SERVERS and fields == {"ice_servers": [], "ice_ttl": 3.5}
    with pytest.raises(Exception, match="ice_ttl"):
        decode(encode(MsgType.ICE_SERVERS, ice_servers=[], ice_ttl="soon"))


async def test_refresh_ice_answers_fresh_credentials_within_a_rate() -> None:
    async with running_rendezvous(fast=True, turn_urls=["turn:turn.test:3478"],
                                  turn_secret=SECRET, turn_ttl=60.0) as server, \
            joined(server) as (ws, welcome):
        assert 59.0 <= welcome["ice_ttl"] <= 60.0
        first = turn_entry(welcome["ice_servers"])
        await asyncio.sleep(1.1)  # the stamp has whole seconds
        await ws.send_bytes(encode(MsgType.REFRESH_ICE))
        reply = await recv(ws)
        assert reply is not None and reply[0] is MsgType.ICE_SERVERS, reply
        fresh = turn_entry(reply[1]["ice_servers"])
        assert stamp(fresh) > stamp(first) and 59.0 <= reply[1]["ice_ttl"] <= 60.0
        assert verify_credentials(SECRET, fresh["username"], fresh["credential"])
        # the burst (3) is spent after two more; beyond: rate_limited, which does not count
        # towards max_errors (5): the session stays open and keeps working
        for _ in range(2):
            await ws.send_bytes(encode(MsgType.REFRESH_ICE))
            reply = await recv(ws)
            assert reply is not None and reply[0] is MsgType.ICE_SERVERS
        for _ in range(server.config.max_errors + 1):
            await ws.send_bytes(encode(MsgType.REFRESH_ICE))
            reply = await recv(ws)
            assert reply is not None and reply[0] is MsgType.ERROR, reply
            assert reply[1]["code"] == ErrorCode.RATE_LIMITED
        await ws.send_bytes(encode(MsgType.HEARTBEAT))
        assert not ws.closed


async def test_no_turn_means_no_ice_ttl() -> None:
    async with running_rendezvous(fast=True) as server, joined(server) as (ws, welcome):
        assert "ice_ttl" not in welcome
        await ws.send_bytes(encode(MsgType.REFRESH_ICE))
        reply = await recv(ws)
        assert reply is not None and reply[0] is MsgType.ICE_SERVERS
        assert "ice_ttl" not in reply[1] and reply[1]["ice_servers"] == welcome["ice_servers"]


async def test_client_renews_before_expiry() -> None:
    async with running_rendezvous(fast=True, turn_urls=["turn:turn.test:3478"],
                                  turn_secret=SECRET, turn_ttl=3.0) as server, \
            running_client(server) as client:
        first = turn_entry(client.ice_servers)
        assert client.ice_expires_at is not None
        assert abs(client.ice_expires_at - (time.time() + 3.0)) < 1.5
        await until(lambda: client.ice_renewals >= 2, timeout=8.0)
        assert stamp(turn_entry(client.ice_servers)) > stamp(first)
        assert client.ice_expires_at > time.time()


class _Deaf(RendezvousServer):
    """A rendezvous that never answers ``refresh_ice``."""

    def _handle_message(self, conn: Any, data: bytes | str, ice_refreshes: Any = None) -> bool:
        if decode(data)[0] is MsgType.REFRESH_ICE:
            return False
        return super()._handle_message(conn, data, ice_refreshes)


async def test_a_failed_renewal_keeps_the_servers_and_retries(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(rendezvous_client, "ICE_REFRESH_TIMEOUT", 0.3)
    sent: list[float] = []
    real_refresh = rendezvous_client.RendezvousClient._refresh_ice

    async def counting(self: rendezvous_client.RendezvousClient) -> bool:
        sent.append(time.monotonic())
        return await real_refresh(self)

    monkeypatch.setattr(rendezvous_client.RendezvousClient, "_refresh_ice", counting)
    from rendezvous.config import RendezvousConfig
    from testkit.fixtures import FAST_RENDEZVOUS
    config = RendezvousConfig(host="127.0.0.1", port=0, stun_port=0,
                              turn_urls=["turn:turn.test:3478"], turn_secret=SECRET,
                              turn_ttl=2.0, **FAST_RENDEZVOUS)
    server = _Deaf(config)
    await server.start()
    try:
        async with running_client(server, backoff_initial=0.2, backoff_max=0.4) as client:
            before = list(client.ice_servers)
            await until(lambda: len(sent) >= 3, timeout=10.0)
            assert client.ice_servers == before and client.ice_renewals == 0
            assert "renewing the TURN credentials failed" in caplog.text
    finally:
        await server.close()


async def test_a_reconnect_brings_fresh_credentials() -> None:
    turn: dict[str, Any] = {"turn_urls": ["turn:turn.test:3478"], "turn_secret": SECRET,
                            "turn_ttl": 600.0}
    async with running_rendezvous(fast=True, **turn) as first:
        port = first.port
        client = rendezvous_client.RendezvousClient(first.url, Identity.generate(), "mnist", [],
                                                    {}, backoff_initial=0.1)
        await client.start()
        before, expires_before = turn_entry(client.ice_servers), client.ice_expires_at
    try:
        await asyncio.sleep(1.1)  # the stamp has whole seconds
        async with running_rendezvous(fast=True, port=port, **turn):
            await until(lambda: client.connected, timeout=5.0)
            assert client.ice_servers and stamp(turn_entry(client.ice_servers)) > stamp(before)
            assert expires_before is not None and client.ice_expires_at is not None
            assert client.ice_expires_at > expires_before and client.ice_renewals == 0
    finally:
        await client.close()


# -- end to end with coturn --------------------------------------------------------------------


def _udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stun_answers(port: int) -> bool:
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.sendto(request, ("127.0.0.1", port))
        try:
            return sock.recv(2048)[8:20] == request[8:20]
        except OSError:
            return False


@contextlib.contextmanager
def coturn(rundir: Path, secret: str) -> Iterator[int]:
    """Debian's turnserver on 127.0.0.1 (``use-auth-secret``, loopback peers allowed, since
    both peers are here); yields its port once it answers STUN."""
    if shutil.which("turnserver") is None:
        pytest.skip("needs `turnserver` (apt-get install coturn)")
    port = _udp_port()
    relay_base = 50000 + port % 10000
    conf = rundir / "turnserver.conf"
    conf.write_text("\n".join([
        "listening-ip=127.0.0.1", "relay-ip=127.0.0.1", f"listening-port={port}",
        f"min-port={relay_base}", f"max-port={relay_base + 200}", "realm=peerlearn",
        "use-auth-secret", f"static-auth-secret={secret}", "fingerprint", "no-tls", "no-dtls",
        "no-cli", "allow-loopback-peers", "log-file=stdout",
        f"pidfile={rundir / 'turnserver.pid'}", f"userdb={rundir / 'turndb'}",
    ]) + "\n")
    log_path = rundir / "turnserver.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(["turnserver", "-c", str(conf)], stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10.0
        while not _stun_answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("turnserver did not start:\n" + log_path.read_text()[-3000:])
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def allocate(port: int, entry: dict[str, Any]) -> tuple[str, int]:
    """One TURN allocation at coturn with ``entry``'s credentials (its relayed address)."""
    transport, _ = await asyncio.wait_for(create_turn_endpoint(
        asyncio.DatagramProtocol, ("127.0.0.1", port), entry["username"], entry["credential"]
    ), 5.0)
    try:
        relayed: tuple[str, int] = transport.get_extra_info("sockname")
        return relayed
    finally:
        transport.close()


async def test_relay_links_open_after_the_first_credentials_expired(tmp_path: Path) -> None:
    with coturn(tmp_path, SECRET) as port:
        started = time.monotonic()
        async with running_rendezvous(fast=True, turn_urls=[f"turn:127.0.0.1:{port}"],
                                      turn_secret=SECRET, turn_ttl=TTL) as server, \
                running_host(server, listen=None, ice_transport_policy="relay") as a, \
                running_host(server, listen=None, ice_transport_policy="relay") as b:
            assert a.rendezvous is not None and b.rendezvous is not None
            clients = (a.rendezvous, b.rendezvous)
            first = [turn_entry(c.ice_servers) for c in clients]
            assert await allocate(port, first[0])  # coturn takes them while they are fresh
            # run for more than two lifetimes
            await asyncio.sleep(max(stamp(e) for e in first) - time.time() + TTL + 1.5)
            assert time.monotonic() - started > 2 * TTL
            for client, entry in zip(clients, first, strict=True):
                assert client.ice_renewals >= 2, client.ice_renewals
                assert stamp(turn_entry(client.ice_servers)) >= stamp(entry) + TTL
                assert client.ice_expires_at is not None and client.ice_expires_at > time.time()
            # the first credentials have expired: coturn refuses them
            with pytest.raises(TransactionFailed, match="401"):
                await allocate(port, first[0])
            # ... and takes the renewed ones: a relay-only link opens
            assert await allocate(port, turn_entry(a.rendezvous.ice_servers))
            link = await asyncio.wait_for(a.connections.ensure(b.peer_id), 20.0)
            assert link.kind == "webrtc-relay", link
