"""One side of a benchmarks/nat.py measurement, run inside a NAT-lab namespace.

    python benchmarks/_natprobe.py ours-send --rendezvous IP:PORT --job J [--listen tcp://..]
    python benchmarks/_natprobe.py ours-recv --rendezvous IP:PORT --job J [--listen tcp://..]
    python benchmarks/_natprobe.py bare-send --rendezvous IP:PORT --job J
    python benchmarks/_natprobe.py bare-recv --rendezvous IP:PORT --job J

``ours-*``: two :class:`overlay.host.Host` peers; the sender waits until the receiver is a
member, then delivers the 4.8 MB MNIST-CNN-shaped model ``--rounds`` times with
``Host.send_model`` (each acknowledged after the receiver checked digest and signature).
``bare-*``: plain aiortc between the same namespaces, signaled through the rendezvous
(``RendezvousClient.send_signal``), one negotiated data channel, the same bytes in 65,536-byte
messages with the same pacing; the receiver answers one byte per complete round.

Each sender prints one JSON line: kind, connect_s, per-round seconds, bytes (or an error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from overlay.errors import TransportError  # noqa: E402
from overlay.host import Host, HostConfig  # noqa: E402
from overlay.identity import Identity  # noqa: E402
from overlay.rendezvous_client import RendezvousClient  # noqa: E402
from overlay.wire import NamedArray  # noqa: E402

log = logging.getLogger("natprobe")

SHAPES: list[tuple[str, tuple[int, ...]]] = [
    ("conv1.weight", (32, 1, 3, 3)), ("conv1.bias", (32,)),
    ("conv2.weight", (64, 32, 3, 3)), ("conv2.bias", (64,)),
    ("fc1.weight", (128, 9216)), ("fc1.bias", (128,)),
    ("fc2.weight", (10, 128)), ("fc2.bias", (10,)),
]
MESSAGE = 65536
"""Bare path: bytes per data channel message (ours: 28-byte chunk header + 65,508)."""
HIGH_WATER = 4 * 1024 * 1024
LOW_WATER = 1024 * 1024


def model_arrays() -> list[NamedArray]:
    rng = np.random.default_rng(0)
    return [NamedArray(name, rng.standard_normal(shape, dtype=np.float32))
            for name, shape in SHAPES]


def model_bytes() -> bytes:
    return b"".join(a.array.tobytes() for a in model_arrays())


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


async def wait_member(members: Any, timeout: float) -> str | None:
    """The first other member of the job to show up, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if members():
            return str(next(iter(members())))
        await asyncio.sleep(0.02)
    return None


# ---- ours: overlay.host.Host --------------------------------------------------------------


def _host(config: HostConfig) -> Host[Any]:
    """A host that keeps what it receives as the checked model itself."""
    return Host(Identity.generate(), config, {}, accept=lambda model: model)


async def ours_send(args: argparse.Namespace) -> None:
    config = HostConfig(rendezvous=args.rendezvous, job=args.job, listen=args.listen,
                        connect_timeout=args.connect_timeout, send_timeout=120.0)
    host = _host(config)
    await host.start()
    result: dict[str, Any] = {"role": "ours-send", "kind": None, "connect_s": None,
                              "times": [], "bytes": 0}
    try:
        peer = await wait_member(lambda: host.members, args.join_timeout)
        if peer is None:
            result["error"] = f"the receiver did not join within {args.join_timeout} s"
            return
        from overlay.models import OutgoingModel

        arrays = model_arrays()
        for i in range(args.rounds):
            encoded = await host.encode(OutgoingModel(  # encoded outside the timing
                job=args.job, sender=host.peer_id, epoch=i + 1, samples=1000, arrays=arrays))
            result["bytes"] = encoded.nbytes
            started = time.perf_counter()
            try:
                await host.send_model(peer, encoded)
            except TransportError as exc:
                result["error"] = f"round {i + 1}: {exc}"
                return
            elapsed = time.perf_counter() - started
            if i == 0 and (link := host.links.get(peer)) is not None:
                result["kind"] = str(link.kind)
                result["connect_s"] = link.connect_s
                # the first delivery set the link up: its transfer is what came after
                elapsed -= float(link.connect_s)
            result["times"].append(round(elapsed, 4))
    finally:
        emit(result)
        await host.close()


async def ours_recv(args: argparse.Namespace) -> None:
    config = HostConfig(rendezvous=args.rendezvous, job=args.job, listen=args.listen,
                        connect_timeout=args.connect_timeout)
    host = _host(config)
    await host.start()
    received = 0
    seen = False
    deadline = time.monotonic() + args.deadline
    try:
        # until the sender has come and gone (it leaves after its last acknowledgement)
        while time.monotonic() < deadline:
            while not host.inbox.empty():
                host.inbox.get_nowait()
                received += 1
            if host.members:
                seen = True
            elif seen:
                break
            await asyncio.sleep(0.05)
    finally:
        emit({"role": "ours-recv", "received": received})
        await host.close()


# ---- bare aiortc ----------------------------------------------------------------------------


def _bare_pc(ice_servers: list[dict[str, Any]]) -> Any:
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

    servers = [RTCIceServer(urls=s["urls"], username=s.get("username"),
                            credential=s.get("credential")) for s in ice_servers]
    pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
    channel = pc.createDataChannel("bare", negotiated=True, id=0, ordered=True)
    channel.bufferedAmountLowThreshold = LOW_WATER
    return pc, channel


def _bare_kind(pc: Any) -> str:
    from overlay.transport.webrtc import selected_kind  # reads the nominated ICE pair only

    return selected_kind(pc)


async def _client(args: argparse.Namespace) -> RendezvousClient:
    client = RendezvousClient(args.rendezvous, Identity.generate(), args.job, [], {})
    await client.start()
    return client


async def _signal(client: RendezvousClient, kind: str, timeout: float) -> tuple[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            sender, got, data = await client.signals.get()
            if got == kind:
                return sender, data


async def bare_send(args: argparse.Namespace) -> None:
    from aiortc import RTCSessionDescription

    client = await _client(args)
    result: dict[str, Any] = {"role": "bare-send", "kind": None, "connect_s": None,
                              "times": [], "bytes": 0}
    pc = None
    try:
        peer = await wait_member(lambda: client.members, args.join_timeout)
        if peer is None:
            result["error"] = f"the receiver did not join within {args.join_timeout} s"
            return
        payload = model_bytes()
        result["bytes"] = len(payload)
        started = time.monotonic()
        pc, channel = _bare_pc(client.ice_servers)
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        low = asyncio.Event()
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        def on_open() -> None:
            if not opened.done():
                opened.set_result(None)

        channel.on("open", on_open)
        channel.on("bufferedamountlow", low.set)
        channel.on("message", lambda m: replies.put_nowait(m))
        try:
            async with asyncio.timeout(args.connect_timeout):
                await pc.setLocalDescription(await pc.createOffer())
                desc = pc.localDescription
                await client.send_signal(peer, "offer", {"sdp": desc.sdp, "type": desc.type})
                _, answer = await _signal(client, "answer", args.connect_timeout)
                await pc.setRemoteDescription(
                    RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
                await opened
        except TimeoutError:
            result["error"] = f"not open within {args.connect_timeout} s"
            return
        result["connect_s"] = round(time.monotonic() - started, 4)
        result["kind"] = _bare_kind(pc)
        view = memoryview(payload)
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for off in range(0, len(payload), MESSAGE):
                while channel.bufferedAmount > HIGH_WATER:
                    low.clear()
                    await low.wait()
                channel.send(bytes(view[off:off + MESSAGE]))
            async with asyncio.timeout(120):
                await replies.get()
            result["times"].append(round(time.perf_counter() - t0, 4))
    finally:
        emit(result)
        if pc is not None:
            await pc.close()
        await client.close()


async def bare_recv(args: argparse.Namespace) -> None:
    from aiortc import RTCSessionDescription

    client = await _client(args)
    total = len(model_bytes())
    pc = None
    rounds = 0
    try:
        sender, offer = await _signal(client, "offer", args.deadline)
        pc, channel = _bare_pc(client.ice_servers)
        done = asyncio.Event()
        count = 0

        def on_message(message: bytes) -> None:
            nonlocal count, rounds
            count += len(message)
            if count >= total:
                count -= total
                rounds += 1
                channel.send(b"\x01")
                if rounds >= args.rounds:
                    done.set()

        channel.on("message", on_message)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type=offer["type"]))
        await pc.setLocalDescription(await pc.createAnswer())
        desc = pc.localDescription
        await client.send_signal(sender, "answer",
                                 {"sdp": desc.sdp, "type": desc.type})
        async with asyncio.timeout(args.deadline):
            await done.wait()
        await asyncio.sleep(0.5)  # let the last reply leave before the association aborts
    except TimeoutError:
        pass
    finally:
        emit({"role": "bare-recv", "received": rounds})
        if pc is not None:
            await pc.close()
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["ours-send", "ours-recv", "bare-send", "bare-recv"])
    parser.add_argument("--rendezvous", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--listen", default=None, help="tcp://IP:PORT (public peers)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--join-timeout", type=float, default=30.0)
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="receivers: give up after this many seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {args.mode} %(levelname).1s %(name)s: %(message)s")
    runner = {"ours-send": ours_send, "ours-recv": ours_recv,
              "bare-send": bare_send, "bare-recv": bare_recv}[args.mode]
    asyncio.run(runner(args))


if __name__ == "__main__":
    main()

