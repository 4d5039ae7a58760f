"""The rendezvous under many sessions: correctness at a few hundred peers, in-process.

The 2,000-peer figures come from ``benchmarks/_rendezvous_load.py`` (separate processes); here
a real server on port 0 and real WebSocket sessions check what must hold at any scale: every
session is welcomed, hears every other member exactly once (welcome or ``joined``), signals
between random pairs arrive, nobody is closed as too slow; a welcome larger than a normal
message and longer than 1,024 members reaches a real client; a full job refuses with a clear
error; queued membership frames about one peer are coalesced.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp
import pytest

from overlay.errors import ProtocolError, RendezvousError
from overlay.identity import Identity
from overlay.protocol import (
    MAX_MEMBERS,
    MAX_MESSAGE_BYTES,
    MAX_WELCOME_BYTES,
    ErrorCode,
    MsgType,
    decode,
    encode,
    encode_prepacked,
    pack,
    pack_array,
    signed_join,
)
from overlay.rendezvous_client import RendezvousClient
from rendezvous import run_rendezvous
from rendezvous.connection import Connection
from rendezvous.registry import Registry
from testkit.fixtures import running_client

SESSIONS = 300
SIGNALS = 300  # sent between random pairs, after everyone is in
WAIT = 60.0  # bound on the whole fill or delivery (two shared cores)
FAST: dict[str, Any] = {"ttl": 30.0, "heartbeat_interval": 5.0, "stun_port": None}


class _Session:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse, identity: Identity) -> None:
        self.ws = ws
        self.identity = identity
        self.seen: list[str] = []  # peer ids, from the welcome then from joined, in order
        self.signals: list[tuple[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.other: list[str] = []  # any other message type received


async def _join(http: aiohttp.ClientSession, url: str) -> _Session:
    identity = Identity.generate()
    ws = await http.ws_connect(url, max_msg_size=MAX_WELCOME_BYTES)
    _, challenge = decode((await ws.receive()).data)
    await ws.send_bytes(signed_join(identity, challenge["nonce"], "load"))
    msg_type, welcome = decode((await ws.receive()).data, max_bytes=MAX_WELCOME_BYTES,
                               max_items=MAX_MEMBERS)
    assert msg_type is MsgType.WELCOME, welcome
    session = _Session(ws, identity)
    session.seen = [m["peer_id"] for m in welcome["members"]]
    return session


async def _read(session: _Session) -> None:
    async for msg in session.ws:
        if msg.type is not aiohttp.WSMsgType.BINARY:
            continue
        msg_type, fields = decode(msg.data)
        if msg_type is MsgType.JOINED:
            session.seen.append(fields["member"]["peer_id"])
        elif msg_type is MsgType.SIGNAL:
            session.signals.append((fields["from"], fields["data"]))
        elif msg_type is MsgType.ERROR:
            session.errors.append(fields)
        else:
            session.other.append(msg_type.value)


async def test_hundreds_of_sessions_join_at_once_and_signal() -> None:
    # send_queue_limit far below the burst: each socket gets up to 299 joined frames at once,
    # which must not count as "too slow" (membership frames are coalesced, not limited).
    async with run_rendezvous(send_queue_limit=16, **FAST) as server, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async with asyncio.timeout(WAIT):
            sessions = await asyncio.gather(*(_join(http, server.url) for _ in range(SESSIONS)))
        readers = [asyncio.create_task(_read(s)) for s in sessions]
        try:
            ids = [s.identity.peer_id for s in sessions]
            assert len(server.registry.members("load")) == SESSIONS

            async def all_seen() -> None:
                while any(len(s.seen) < SESSIONS - 1 for s in sessions):
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(all_seen(), WAIT)
            for s in sessions:  # everyone else exactly once (welcome or joined), never itself
                assert sorted(s.seen) == sorted(set(ids) - {s.identity.peer_id})

            rng = random.Random(5)
            sent: dict[str, list[tuple[str, Any]]] = {pid: [] for pid in ids}
            for n in range(SIGNALS):
                a, b = rng.sample(range(SESSIONS), 2)
                data = {"n": n}
                await sessions[a].ws.send_bytes(
                    encode(MsgType.SIGNAL, to=ids[b], kind="candidate", data=data))
                sent[ids[b]].append((ids[a], data))

            async def all_signals() -> None:
                while sum(len(s.signals) for s in sessions) < SIGNALS:
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(all_signals(), WAIT)
            for s in sessions:
                assert sorted(s.signals, key=str) == sorted(sent[s.identity.peer_id], key=str)
                assert s.errors == [] and s.other == []
                assert not s.ws.closed
            assert len(server.registry.members("load")) == SESSIONS
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await asyncio.gather(*(s.ws.close() for s in sessions), return_exceptions=True)


async def test_a_welcome_beyond_one_message_and_1024_members_reaches_the_client() -> None:
    async with run_rendezvous(**FAST) as server:
        for n in range(1100):  # registrations without sockets: only the welcome carries them
            server.registry.join(public_key=Identity.generate().public_key, job="big",
                                 addrs=[f"tcp://10.0.{n // 250}.{n % 250}:6000"],
                                 meta={"num": n, "samples": 60, "fingerprint": "f" * 16},
                                 session=-1, now=time.monotonic())
        client = RendezvousClient(server.url, Identity.generate(), "big", [], {}, reconnect=False)
        welcome = await client.start()
        try:
            assert len(welcome["members"]) == 1100 and len(client.members) == 1100
        finally:
            await client.close()
        frame = encode(MsgType.WELCOME, members=welcome["members"])
        assert len(frame) > MAX_MESSAGE_BYTES  # the old limits would have refused it
        with pytest.raises(ProtocolError):
            decode(frame)


async def test_a_full_job_refuses_with_job_full() -> None:
    async with run_rendezvous(**FAST) as server:
        server.registry.max_members = 1
        async with running_client(server, job="j", reconnect=False):
            with pytest.raises(RendezvousError, match="job_full: job j already has 1 members"):
                async with running_client(server, job="j", reconnect=False):
                    pass
            async with running_client(server, job="k", reconnect=False):
                pass  # the bound is per job


def test_registry_bounds_members_and_member_size() -> None:
    reg = Registry(ttl=10.0, max_members=2)
    a, b, c = (Identity.generate() for _ in range(3))
    for i, who in enumerate((a, b)):
        reg.join(public_key=who.public_key, job="j", addrs=[], meta={}, session=i, now=0.0)
    with pytest.raises(ProtocolError) as full:
        reg.join(public_key=c.public_key, job="j", addrs=[], meta={}, session=3, now=0.0)
    assert full.value.code is ErrorCode.JOB_FULL and len(reg) == 2
    # a member re-joining a full job is not a new member
    reg.join(public_key=a.public_key, job="j", addrs=["tcp://h:1"], meta={}, session=4, now=1.0)
    big_meta = {f"k{i}": "x" * 200 for i in range(20)}
    with pytest.raises(ProtocolError) as large:
        reg.join(public_key=c.public_key, job="other", addrs=[], meta=big_meta, session=5, now=0.0)
    assert large.value.code is ErrorCode.TOO_LARGE and c.public_key not in {
        m.public_key for m in reg.members("other")}


class _BlockedSocket:
    """The neighbour of ``Connection``: a socket whose sends wait until released."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.release = asyncio.Event()
        self.closed_with: int | None = None

    async def send_bytes(self, frame: bytes) -> None:
        await self.release.wait()
        self.sent.append(frame)

    async def close(self, code: int, message: bytes) -> None:
        self.closed_with = code


async def test_queued_membership_frames_are_coalesced_in_place() -> None:
    ws = _BlockedSocket()
    conn = Connection(ws, 1, "127.0.0.1", limit=2)  # type: ignore[arg-type]
    conn.send(b"first")  # taken by the writer, which then blocks in send_bytes
    await asyncio.sleep(0)
    conn.send_membership("X", b"joined X")
    conn.send(b"signal")
    for n in range(1000):  # far more than limit: membership frames are not counted
        conn.send_membership(f"p{n}", b"joined p")
    conn.send_membership("X", b"left X")  # replaces "joined X", keeps its place
    conn.send(b"error")
    assert not conn.closing
    conn.send(b"one too many")  # 2 ordinary frames are waiting: the limit closes it
    assert conn.closing
    ws.release.set()
    await conn.finish(5.0)
    assert ws.sent[:3] == [b"first", b"left X", b"signal"]
    assert ws.sent[3:] == [b"joined p"] * 1000 + [b"error"]
    assert ws.closed_with is not None


def test_prepacked_encoding_is_the_same_bytes() -> None:
    members = [{"peer_id": f"p{n}", "addrs": [], "meta": {"n": n}, "public_key": b"k"}
               for n in range(3)]
    assert encode_prepacked(MsgType.WELCOME, {"members": pack_array([pack(m) for m in members])},
                            peer_id="me", ttl=1.5) == encode(
        MsgType.WELCOME, peer_id="me", ttl=1.5, members=members)
    assert encode_prepacked(MsgType.JOINED, {"member": pack(members[0])}) == encode(
        MsgType.JOINED, member=members[0])
