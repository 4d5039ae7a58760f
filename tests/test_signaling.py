"""Signaling relay over the rendezvous WebSocket, and the ICE servers handed out in welcome."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from test_rendezvous import DIALBACK, META, join_frame, next_event, raw_ws, recv

from overlay.errors import RendezvousError
from overlay.events import Joined
from overlay.identity import Identity
from overlay.protocol import MAX_SIGNAL_BYTES, MsgType, SignalKind, encode
from overlay.rendezvous_client import RendezvousClient
from peerlearn.cli import TURN_SECRET_ENV, build_parser
from rendezvous import RendezvousConfig, RendezvousServer
from rendezvous.turn import make_credentials, turn_password, verify_credentials
from testkit.fixtures import running_client, running_rendezvous

WAIT = 3.0
SECRET = "north-pole"
TURN = {"turn_urls": ["turn:turn.test:3478", "turn:turn.test:3478?transport=tcp"],
        "turn_secret": SECRET}


async def next_signal(c: RendezvousClient, timeout: float = WAIT
                      ) -> tuple[str, SignalKind, Any]:
    return await asyncio.wait_for(c.signals.get(), timeout)


async def recv_error(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    reply = await recv(ws)
    assert reply is not None and reply[0] is MsgType.ERROR, reply
    return reply[1]


@contextlib.asynccontextmanager
async def joined_ws(
    server: RendezvousServer, identity: Identity, job: str = "mnist"
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with raw_ws(server) as ws:
        challenge = await recv(ws)
        assert challenge is not None
        await ws.send_bytes(join_frame(identity, challenge[1]["nonce"], job=job))
        welcome = await recv(ws)
        assert welcome is not None and welcome[0] is MsgType.WELCOME
        yield ws


# -- relay ------------------------------------------------------------------------------------


async def test_offer_answer_candidates_between_two_peers() -> None:
    async with (
        running_rendezvous(fast=True, dialback_timeout=DIALBACK) as server,
        running_client(server, meta=META) as a,
        running_client(server, meta=META) as b,
    ):
        sdp = {"type": "offer", "sdp": "v=0\r\n" + "a=x\r\n" * 200}
        await a.send_signal(b.peer_id, "offer", sdp)
        assert await next_signal(b) == (a.peer_id, "offer", sdp)
        await b.send_signal(a.peer_id, "answer", {"type": "answer", "sdp": "v=0\r\n"})
        assert await next_signal(a) == (b.peer_id, "answer", {"type": "answer", "sdp": "v=0\r\n"})
        candidates = [{"candidate": f"candidate:{i} 1 udp 1 10.0.0.{i} 5000 typ host",
                       "sdpMid": "0", "sdpMLineIndex": 0} for i in range(20)]
        for cand in candidates:
            await a.send_signal(b.peer_id, "candidate", cand)
        await a.send_signal(b.peer_id, "bye", b"\x00\x01")
        got = [await next_signal(b) for _ in range(21)]
        assert got == [(a.peer_id, "candidate", c) for c in candidates] + [
            (a.peer_id, "bye", b"\x00\x01")]
        # Signals never show up as membership events.
        assert isinstance(await next_event(a), Joined) and a.events.empty()


async def test_from_is_set_by_the_server_not_the_sender() -> None:
    liar = Identity.generate()
    async with (
        running_rendezvous(fast=True, dialback_timeout=DIALBACK) as server,
        running_client(server, meta=META) as victim,
        running_client(server, meta=META) as target,
        joined_ws(server, liar) as ws,
    ):
        fake = {"from": victim.peer_id, "to": target.peer_id, "kind": "offer", "data": b"x"}
        await ws.send_bytes(encode(MsgType.SIGNAL, **fake))
        assert await next_signal(target) == (liar.peer_id, "offer", b"x")


async def test_other_jobs_unknown_and_disconnected_targets_get_unknown_peer() -> None:
    async with (
        running_rendezvous(fast=True, dialback_timeout=DIALBACK, max_errors=2) as server,
        running_client(server, meta=META) as a,
    ):
        outsider = Identity.generate()
        gone = RendezvousClient(server.url, Identity.generate(), "mnist", [], {}, reconnect=False)
        await gone.start()
        await gone.close(leave=False)  # still registered until the TTL, but not connected
        assert server.registry.get(gone.peer_id) is not None
        async with joined_ws(server, outsider, job="cifar") as ws:
            for to in (a.peer_id, "nosuchpeer", gone.peer_id, outsider.peer_id):
                await ws.send_bytes(encode(MsgType.SIGNAL, to=to, kind="offer", data=b"hi"))
                error = await recv_error(ws)
                assert error["code"] == "unknown_peer"
                assert error["to"] == to and to in error["message"]
            # Benign errors do not count towards max_errors: the session still relays.
            async with running_client(server, job="cifar", meta=META) as c:
                await ws.send_bytes(encode(MsgType.SIGNAL, to=c.peer_id, kind="bye", data={}))
                assert await next_signal(c) == (outsider.peer_id, "bye", {})
        assert a.signals.empty()


BAD_SIGNALS: list[tuple[str, dict[str, Any], str]] = [
    ("no to", {"kind": "offer", "data": b""}, "malformed"),
    ("to not a str", {"to": 7, "kind": "offer", "data": b""}, "malformed"),
    ("empty to", {"to": "", "kind": "offer", "data": b""}, "malformed"),
    ("unknown kind", {"to": "x", "kind": "gossip", "data": b""}, "malformed"),
    ("kind not a str", {"to": "x", "kind": 1, "data": b""}, "malformed"),
    ("no data", {"to": "x", "kind": "offer"}, "malformed"),
    ("data an int", {"to": "x", "kind": "offer", "data": 5}, "malformed"),
    ("too large", {"to": "x", "kind": "offer", "data": b"\x00" * MAX_SIGNAL_BYTES}, "too_large"),
]


@pytest.mark.parametrize("name,fields,code", BAD_SIGNALS, ids=[b[0] for b in BAD_SIGNALS])
async def test_malformed_signals_get_errors(name: str, fields: dict[str, Any], code: str) -> None:
    async with (
        running_rendezvous(fast=True, dialback_timeout=DIALBACK) as server,
        running_client(server, meta=META) as b,
    ):
        me = Identity.generate()
        async with joined_ws(server, me) as ws:
            await ws.send_bytes(encode(MsgType.SIGNAL, **fields))
            assert (await recv_error(ws))["code"] == code
            await ws.send_bytes(encode(MsgType.SIGNAL, to=b.peer_id, kind="offer", data=b"ok"))
            assert await next_signal(b) == (me.peer_id, "offer", b"ok")
        assert b.signals.empty()


async def test_signal_rate_limit() -> None:
    async with (
        running_rendezvous(fast=True, dialback_timeout=DIALBACK, signal_rate=1.0,
                           signal_burst=3) as server,
        running_client(server, meta=META) as b,
    ):
        async with joined_ws(server, Identity.generate()) as ws:
            for _ in range(5):
                await ws.send_bytes(encode(MsgType.SIGNAL, to=b.peer_id, kind="candidate",
                                           data=b""))
            assert [(await recv_error(ws))["code"] for _ in range(2)] == ["rate_limited"] * 2
        assert [(await next_signal(b))[1] for _ in range(3)] == ["candidate"] * 3


async def test_client_send_signal_checks() -> None:
    async with running_rendezvous(fast=True, dialback_timeout=DIALBACK) as server:
        c = RendezvousClient(server.url, Identity.generate(), "mnist", [], {})
        with pytest.raises(RendezvousError):
            await c.send_signal("x", "offer", b"")  # never started
        await c.start()
        with pytest.raises(ValueError):
            await c.send_signal("x", "gossip", b"")
        with pytest.raises(ValueError):
            await c.send_signal("x", "offer", b"\x00" * MAX_SIGNAL_BYTES)
        await c.close()
        with pytest.raises(RendezvousError, match="not connected"):
            await c.send_signal("x", "offer", b"")


# -- ICE servers in welcome ---------------------------------------------------------------------


async def test_welcome_hands_out_our_stun_and_turn_with_credentials() -> None:
    async with (
        running_rendezvous(fast=True, dialback_timeout=DIALBACK, **TURN) as server,
        running_client(server, meta=META) as a,
    ):
        stun, turn = a.ice_servers
        assert stun == {"urls": [f"stun:127.0.0.1:{server.stun_port}"]}
        assert turn["urls"] == TURN["turn_urls"]
        expiry, _, user = turn["username"].partition(":")
        assert user == a.peer_id
        assert 3590 < int(expiry) - time.time() <= 3600
        assert verify_credentials(SECRET, turn["username"], turn["credential"])
        # Nothing over HTTP shows the secret or the credentials.
        async with aiohttp.ClientSession() as session:
            for path in ("/", "/healthz", "/peers?job=mnist"):
                async with session.get(f"http://127.0.0.1:{server.port}{path}") as resp:
                    text = await resp.text()
                    assert resp.status == 200
                    assert path == "/healthz" or a.peer_id in text
                    assert SECRET not in text and turn["credential"] not in text
        assert SECRET not in repr(server.config)


async def test_public_host_and_disabled_stun() -> None:
    async with (
        running_rendezvous(fast=True, dialback_timeout=DIALBACK,
                           public_host="rdv.example.org") as server,
        running_client(server, meta=META) as a,
    ):
        assert a.ice_servers == [{"urls": [f"stun:rdv.example.org:{server.stun_port}"]}]
    async with (
        running_rendezvous(fast=True, dialback_timeout=DIALBACK, stun_port=None) as server,
        running_client(server, meta=META) as a,
    ):
        assert a.ice_servers == []  # never a third-party server


async def test_stun_url_uses_the_host_the_peer_dialed_ipv6() -> None:
    try:
        server_ctx = running_rendezvous(fast=True, dialback_timeout=DIALBACK, host="::1")
        server = await server_ctx.__aenter__()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        async with running_client(f"ws://[::1]:{server.port}/ws", backoff_initial=0.5) as c:
            assert c.ice_servers == [{"urls": [f"stun:[::1]:{server.stun_port}"]}]
    finally:
        await server_ctx.__aexit__(None, None, None)


# -- TURN REST credentials ----------------------------------------------------------------------


def test_turn_credentials_match_a_hand_computation() -> None:
    creds = make_credentials("north-pole", "abcdef", ttl=3600, now=1000.5)
    assert creds.username == "4600:abcdef" and creds.expires == 4600
    # printf '4600:abcdef' | openssl dgst -sha1 -hmac north-pole -binary | base64
    assert creds.credential == "XMsW2Bt1q0Rg6A70kfrLj+QCQyM="
    assert turn_password("north-pole", "4600:abcdef") == creds.credential


def test_turn_verification_like_coturn() -> None:
    creds = make_credentials(SECRET, "peer", ttl=60, now=1000)
    assert verify_credentials(SECRET, creds.username, creds.credential, now=1059)
    assert not verify_credentials(SECRET, creds.username, creds.credential, now=1061)  # expired
    assert not verify_credentials(SECRET, "9999:peer", creds.credential, now=1000)  # modified
    assert not verify_credentials(SECRET, "1060:other", creds.credential, now=1000)
    assert not verify_credentials("other", creds.username, creds.credential, now=1000)
    assert not verify_credentials(SECRET, "peer", creds.credential, now=1000)
    with pytest.raises(ValueError):
        make_credentials(SECRET, "a:b", ttl=60)


def test_turn_config_is_checked() -> None:
    with pytest.raises(ValueError, match="turn_secret"):
        RendezvousConfig(turn_urls=["turn:h:3478"])
    with pytest.raises(ValueError, match="turn:"):
        RendezvousConfig(turn_urls=["stun:h:3478"], turn_secret="s")
    with pytest.raises(ValueError):
        RendezvousConfig(stun_port=70000)
    assert RendezvousConfig(stun_port=-1).stun_port is None


def test_cli_takes_the_turn_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TURN_SECRET_ENV, "from-env")
    args = build_parser().parse_args([
        "rendezvous", "--stun-port", "0", "--public-host", "rdv.example.org",
        "--turn-url", "turn:a:3478", "--turn-url", "turns:a:5349",
    ])
    assert args.turn_secret == "from-env" and args.stun_port == 0
    assert args.turn_urls == ["turn:a:3478", "turns:a:5349"]
    assert args.public_host == "rdv.example.org"
    monkeypatch.delenv(TURN_SECRET_ENV)
    assert build_parser().parse_args(["rendezvous"]).turn_secret is None
