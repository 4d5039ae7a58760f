"""WebRtcTransport on loopback, in one process: two transports signal through an in-memory
queue (the relay is the rendezvous' job). ICE servers are always explicit and empty here.

What only WebRTC has: connecting from either side, pacing, throughput against bare aiortc,
chunk-level garbage and transfer timeouts, a transfer cut by the link's end. (What every
transport does is in tests/test_transport_contract.py; the sans-I/O framing and reassembly
in tests/test_chunks.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from overlay.errors import TransportError
from overlay.identity import Identity
from overlay.protocol import SignalKind
from overlay.transport.base import Frames, Handler
from overlay.transport.webrtc import (
    CHUNK_HEADER,
    CHUNK_SIZE,
    HIGH_WATER,
    LOW_WATER,
    MAX_MESSAGE,
    ChunkHeader,
    WebRtcTransport,
    iter_chunks,
)
from overlay.wire import (
    FrameType,
    Limits,
    ModelMessage,
    NamedArray,
    decode_model,
    encode_control,
    encode_model,
)

pytestmark = pytest.mark.timeout(60)


class Acker:
    """Acks every request with its request_id; optionally verifies it as a model first."""

    def __init__(self, verify: dict[str, bytes] | None = None) -> None:
        self.calls = 0
        self.headers: list[dict[str, Any]] = []
        self.origins: list[str | None] = []
        self.release: asyncio.Event | None = None  # set: the handler waits for it
        self.entered = asyncio.Event()
        self._verify = verify

    async def __call__(self, header: dict[str, Any], payloads: list[memoryview],
                       origin: str | None) -> Frames:
        self.calls += 1
        self.headers.append(header)
        self.origins.append(origin)
        self.entered.set()
        if self.release is not None:
            await self.release.wait()
        digest = b""
        if self._verify is not None:
            digest = decode_model(header, payloads, self._verify.get).digest
        return [encode_control(FrameType.ACK, request_id=header.get("request_id"),
                              digest=digest, nbytes=sum(len(p) for p in payloads))]


@contextlib.asynccontextmanager
async def webrtc_pair(
    handler_a: Handler, handler_b: Handler, **kwargs: Any
) -> AsyncIterator[tuple[WebRtcTransport, WebRtcTransport]]:
    """Two transports whose signals travel through queues (as JSON, like a relay would)."""
    queues: dict[str, asyncio.Queue[tuple[str, str, dict[str, Any]]]] = {}

    def sender(me: str) -> Any:
        async def send_signal(peer: str, kind: SignalKind, data: dict[str, Any]) -> None:
            await queues[peer].put((me, str(kind), json.loads(json.dumps(data))))
        return send_signal

    limits = [kwargs.pop("limits_a", Limits()), kwargs.pop("limits_b", Limits())]
    ids = [Identity.generate(), Identity.generate()]
    ta, tb = (
        WebRtcTransport(ident, [], h, lim, send_signal=sender(ident.peer_id), **kwargs)
        for ident, h, lim in zip(ids, [handler_a, handler_b], limits, strict=True)
    )

    async def pump(t: WebRtcTransport) -> None:
        while True:
            frm, kind, data = await queues[t.peer_id].get()
            await t.on_signal(frm, SignalKind(kind), data)

    for t in (ta, tb):
        queues[t.peer_id] = asyncio.Queue()
    pumps = [asyncio.create_task(pump(t)) for t in (ta, tb)]
    try:
        yield ta, tb
    finally:
        await asyncio.gather(ta.close(), tb.close())
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def model(ident: Identity, n_params: int, request_id: str) -> ModelMessage:
    rng = np.random.default_rng(0)
    big = n_params - 1000
    return ModelMessage(
        job="j", sender=ident.peer_id, epoch=1, samples=10, request_id=request_id,
        arrays=[NamedArray("w", rng.standard_normal(big, dtype=np.float32).reshape(-1, 1000)
                           if big % 1000 == 0 else rng.standard_normal(big, dtype=np.float32)),
                NamedArray("b", np.zeros(1000, dtype=np.float32))],
    )


def keys(*ts: WebRtcTransport) -> dict[str, bytes]:
    return {t.peer_id: t.identity.public_key for t in ts}


async def test_connect_direct_from_either_side() -> None:
    async with webrtc_pair(Acker(), Acker()) as (a, b):
        small, large = sorted([a, b], key=lambda t: t.peer_id)
        # the larger id asks for an offer ("hello"); concurrent callers share one attempt
        links = await asyncio.gather(large.connect(small.peer_id), large.connect(small.peer_id),
                                     small.connect(large.peer_id))
        assert links[0] is links[1]
        for t, other in ((small, large), (large, small)):
            info = t.link_info(other.peer_id)
            assert info is not None
            assert info["state"] == "open" and info["kind"] == "webrtc-direct"
            assert 0 < info["connect_s"] < 5
        assert a.link_info("nobody") is None
        assert await a.connect(b.peer_id) is await a.connect(b.peer_id)  # idempotent


async def bare_round_trip(payload: bytes) -> float:
    """Seconds to push ``payload`` in 64 KiB messages (same pacing) plus a one-byte ack."""
    pcs = [RTCPeerConnection(RTCConfiguration(iceServers=[])) for _ in range(2)]
    chans = [pc.createDataChannel("bare", negotiated=True, id=0) for pc in pcs]
    opened = [asyncio.Event(), asyncio.Event()]
    for ch, ev in zip(chans, opened, strict=True):
        ch.on("open", ev.set)
    received = 0
    acked = asyncio.Event()
    low = asyncio.Event()

    def on_b(msg: bytes) -> None:
        nonlocal received
        received += len(msg)
        if received == len(payload):
            chans[1].send(b"k")

    chans[1].on("message", on_b)
    chans[0].on("message", lambda _m: acked.set())
    chans[0].bufferedAmountLowThreshold = LOW_WATER
    chans[0].on("bufferedamountlow", low.set)
    try:
        await pcs[0].setLocalDescription(await pcs[0].createOffer())
        await pcs[1].setRemoteDescription(pcs[0].localDescription)
        await pcs[1].setLocalDescription(await pcs[1].createAnswer())
        await pcs[0].setRemoteDescription(pcs[1].localDescription)
        await asyncio.gather(*(e.wait() for e in opened))
        view = memoryview(payload)
        start = time.perf_counter()
        for pos in range(0, len(view), MAX_MESSAGE):
            while chans[0].bufferedAmount > HIGH_WATER:
                low.clear()
                await low.wait()
            chans[0].send(bytes(view[pos : pos + MAX_MESSAGE]))
        await acked.wait()
        return time.perf_counter() - start
    finally:
        await asyncio.gather(*(pc.close() for pc in pcs))


async def test_model_round_trip_and_throughput() -> None:
    async with webrtc_pair(Acker(), Acker()) as (a, b):
        b.handler = acker = Acker(verify=keys(a, b))
        await a.connect(b.peer_id)
        msg = model(a.identity, 1_200_000, "r")
        ours, bare = [], []
        for i in range(2):  # interleaved, best of two: the box is shared
            msg.request_id = f"r{i}"
            frames = encode_model(msg, a.identity)
            nbytes = sum(len(f) for f in frames)
            assert 4_700_000 < nbytes < 4_900_000
            start = time.perf_counter()
            header, payloads = await a.request(b.peer_id, frames, f"r{i}", timeout=30)
            ours.append(time.perf_counter() - start)
            assert header["type"] == "ack" and header["request_id"] == f"r{i}"
            assert header["digest"] == msg.digest
            assert header["nbytes"] == nbytes - len(frames[0]) and payloads == []
            bare.append(await bare_round_trip(secrets.token_bytes(nbytes)))
        assert acker.calls == 2
        assert acker.origins == [a.peer_id, a.peer_id]  # the handler is told who sent it
        mbs_ours, mbs_bare = nbytes / min(ours) / 1e6, nbytes / min(bare) / 1e6
        print(f"\n4.8 MB transfer: ours {mbs_ours:.1f} MB/s, bare aiortc {mbs_bare:.1f} MB/s "
              f"({mbs_ours / mbs_bare:.2f}x)")
        assert mbs_ours >= 0.75 * mbs_bare  # target 0.9x; some slack for a busy 2-core box


async def test_20mb_transfer_is_paced() -> None:
    async with webrtc_pair(Acker(), Acker()) as (a, b):
        link = await a.connect(b.peer_id)
        frames = encode_model(model(a.identity, 5_000_000, "big"), a.identity)
        peak = 0
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, link.channel.bufferedAmount)
                await asyncio.sleep(0.002)

        sampler = asyncio.create_task(sample())
        try:
            header, _ = await a.request(b.peer_id, frames, "big", timeout=40)
        finally:
            stop.set()
            await sampler
        assert header["request_id"] == "big"
        assert header["nbytes"] == sum(len(f) for f in frames[1:])
        assert HIGH_WATER // 2 < peak <= HIGH_WATER + MAX_MESSAGE
        assert a.stats.messages_out == 1 and b.stats.messages_in == 1


def raw_chunk(tid: int, index: int, count: int, nframes: int, total: int, data: bytes = b"",
              flags: int = 0) -> bytes:
    return ChunkHeader(1, flags, tid, index, count, nframes, total).pack() + data


async def eventually(cond: Any, timeout: float = 5.0) -> float:
    """Wait until ``cond()`` is true (the effect of chunks still in flight); seconds taken."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def test_chunk_garbage_is_refused_and_the_link_survives() -> None:
    # min_rate 8 MB/s: an 800 kB transfer may take 4 x 0.6 + 0.1 = 2.5 s in all
    async with webrtc_pair(Acker(), Acker(), chunk_idle_timeout=0.6,
                           min_rate=8e6, max_transfers=4) as (a, b):
        hb = Acker()
        b.handler = hb
        link = await a.connect(b.peer_id)
        send = link.channel.send
        rejected = b.stats.rejected

        send(b"xx")  # shorter than a header
        send(b"\x09" + bytes(CHUNK_HEADER.size - 1))  # unknown version
        send(raw_chunk(link._alloc_tid(), 3, 5, 1, 5 * CHUNK_SIZE))  # starts mid-transfer
        send(raw_chunk(link._alloc_tid(), 0, 2**24, 1, 2**40))  # claims a terabyte
        send(raw_chunk(link._alloc_tid(), 0, 1, 10**6, 8 * 10**6))  # a million frames
        send(raw_chunk(link._alloc_tid(), 0, 7, 1, 100))  # count does not fit the size
        await eventually(lambda: sum(rejected.values()) == 6)
        assert rejected == {"bad_chunk": 4, "too_large": 1, "too_many_parts": 1}

        # a transfer that stops midway: abandoned after the idle timeout, nothing delivered
        frames = encode_model(model(a.identity, 200_000, "x"), a.identity)
        chunks = list(iter_chunks(link._alloc_tid(), frames))
        for c in chunks[:3]:
            send(c)
        await eventually(lambda: link_b(b, a)._incoming)
        assert 0.3 < await eventually(lambda: "chunk_timeout" in rejected) < 3
        assert not link_b(b, a)._incoming
        send(chunks[3])  # a straggler of the abandoned transfer is dropped quietly

        # a transfer that trickles in too slowly (never stalling): abandoned once it falls
        # below min_rate on average
        chunks = list(iter_chunks(link._alloc_tid(), frames))
        assert len(chunks) > 12
        for c in chunks[:12]:
            send(c)
            await asyncio.sleep(0.3)
        assert rejected.get("too_slow") == 1 and rejected["chunk_timeout"] == 1

        # too many concurrent incoming requests (4 per link)
        for _ in range(5):
            send(next(iter_chunks(link._alloc_tid(), frames)))
        await eventually(lambda: "too_many_transfers" in rejected)
        await eventually(lambda: not link_b(b, a)._incoming)
        assert rejected["too_many_transfers"] == 1 and rejected["chunk_timeout"] == 5
        assert hb.calls == 0 and b.stats.messages_in == 0

        # the link still works (a small model: this test's transfer timeout is 1.2 s)
        small = encode_model(model(a.identity, 5000, "x"), a.identity)
        header, _ = await a.request(b.peer_id, small, "x", timeout=10)
        assert header["request_id"] == "x" and hb.calls == 1
        assert link_b(b, a)._requests_active == 0


def link_b(b: WebRtcTransport, a: WebRtcTransport) -> Any:
    return b._links[a.peer_id]


async def test_a_vanished_peer_fails_by_the_connect_timeout() -> None:
    async with webrtc_pair(Acker(), Acker(), connect_timeout=2.0) as (a, b):
        await a.connect(b.peer_id)
        await b.close()
        await eventually(lambda: (a.link_info(b.peer_id) or {}).get("state") == "closed")
        assert a.link_kind(b.peer_id) is None
        # b is gone: a new attempt fails by the connect timeout, not aiortc's 30 s
        t0 = time.monotonic()
        with pytest.raises(TransportError):
            await a.request(b.peer_id, [encode_control(FrameType.GET_MODEL)], "h2", timeout=30)
        assert time.monotonic() - t0 < 3


async def test_close_leaves_no_task_and_no_link() -> None:
    async with webrtc_pair(Acker(), Acker()) as (a, b):
        await a.connect(b.peer_id)
        await a.close()
        with pytest.raises(TransportError):
            await a.connect(b.peer_id)
        assert len(a.tasks) == 0 and not a._links


async def test_a_transfer_cut_by_the_links_end_counts_as_incomplete() -> None:
    """A peer SIGKILLed mid-transfer: what arrived so far is dropped, counted, never handed up."""
    async with webrtc_pair(Acker(), Acker()) as (a, b):
        hb = Acker()
        b.handler = hb
        link = await a.connect(b.peer_id)
        frames = encode_model(model(a.identity, 200_000, "x"), a.identity)
        for c in list(iter_chunks(link._alloc_tid(), frames))[:3]:
            link.channel.send(c)
        await eventually(lambda: link_b(b, a)._incoming)
        await link_b(b, a).aclose("the remote vanished")
        assert b.stats.rejected == {"incomplete": 1}
        assert hb.calls == 0 and b.stats.messages_in == 0


# ---- a peer that vanishes for real (SIGKILL) ------------------------------------------------


async def _killable_peer(server: Any, job: str) -> tuple[asyncio.subprocess.Process, str]:
    import json
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "testkit.hostproc", "--rendezvous",
        f"ws://127.0.0.1:{server.port}/ws", "--job", job,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    return proc, json.loads(line)["peer_id"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bulk", [False, True], ids=["idle", "while-we-send-bulk"])
async def test_heartbeat_notices_a_sigkilled_peer_within_5_s(bulk: bool) -> None:
    """aiortc alone notices a vanished peer after ~30 s; our heartbeat within 5 s, also while
    our own bulk fills the send buffer (queued data is no sign of life, acknowledged is)."""
    import signal

    import numpy as np

    from overlay.models import OutgoingModel
    from overlay.wire import NamedArray
    from rendezvous.server import run_rendezvous
    from testkit.fixtures import running_host, until

    async with run_rendezvous() as server, \
            running_host(server, job="hb", listen=None, stall_timeout=60.0) as a:
        proc, peer = await _killable_peer(server, "hb")
        try:
            await until(lambda: peer in a.members, 20)
            assert a.webrtc is not None
            small = OutgoingModel(job="hb", sender=a.peer_id, epoch=1, samples=1,
                                  arrays=[NamedArray("w", np.ones(1000, np.float32))])
            await a.send_model(peer, await a.encode(small))  # the link is up
            assert (a.webrtc.link_info(peer) or {}).get("state") == "open"
            sending = None
            if bulk:
                big = OutgoingModel(job="hb", sender=a.peer_id, epoch=2, samples=1, arrays=[
                    NamedArray("w", np.ones(100_000_000 // 4, np.float32))])
                sending = asyncio.create_task(a.send_model(peer, await a.encode(big)))
                await until(lambda: a.webrtc is not None and a.webrtc.stats.bytes_out > 5e6, 20)
            await asyncio.sleep(1.5)  # a heartbeat or two go by
            proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await until(lambda: (a.webrtc.link_info(peer) or {}).get("state")  # type: ignore[union-attr]
                        in ("failed", "closed"), 10, interval=0.05)
            noticed = time.monotonic() - killed
            assert noticed < 5.0, noticed
            if sending is not None:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
