"""Model delivery over our ZeroMQ path vs. a pickle-over-ZeroMQ sender like the prototype's.

Both run between two processes on loopback, in the same run, for the 4.8 MB MNIST CNN and a
100 MB state dict. One delivery = from a torch state dict in the sender to torch tensors in
the receiver, acknowledged back to the sender. Ours: named arrays, zero-copy frames, digest
and signature checked, names/shapes/dtypes checked against the receiver's model, all of it
CURVE-encrypted on the wire (as every ZeroMQ link is). Baseline (plaintext):
``send_pyobj(state_dict)`` / ``recv_pyobj()`` (pickle; only acceptable here because both ends
are this benchmark). What CURVE itself costs: the same bytes as bare frames between a bare
DEALER and ROUTER, plaintext and CURVE (``bare_plain`` / ``bare_curve``).

    python benchmarks/transfer.py [--repeats 5]

Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable

import torch
import zmq

from learner.convert import arrays_to_state, state_to_arrays
from learner.model import build_model
from overlay.identity import Identity
from overlay.transport.base import StaticDirectory
from overlay.transport.zeromq import ZmqTransport
from overlay.wire import FrameType, Limits, ModelMessage, decode_model, encode_control, encode_model

LIMITS = Limits(max_total_bytes=1 << 30)


def make_state(kind: str) -> dict[str, torch.Tensor]:
    if kind == "cnn":
        return build_model(0).state_dict()
    # 100 MB: 25 tensors of 1M float32, shaped like big linear layers.
    gen = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(1000, 1000, generator=gen) for i in range(25)}


# ---- receivers (child processes) -------------------------------------------------------------


def ours_receiver(kind: str, sender_key: bytes, ready: mp.Queue) -> None:
    reference = make_state(kind)
    identity = Identity.generate()

    async def main() -> None:
        async def handle(header, payloads, origin):  # type: ignore[no-untyped-def]
            msg = decode_model(header, payloads, lambda _s: sender_key, LIMITS)
            state = arrays_to_state(msg.arrays, reference, share_readonly=True)
            assert len(state) == len(reference)
            return [encode_control(FrameType.ACK, request_id=msg.request_id, digest=msg.digest)]

        transport = ZmqTransport(identity, "tcp://127.0.0.1:0", handle, LIMITS,
                                 directory=StaticDirectory())
        await transport.start()
        ready.put((transport.address, identity.public_key))
        await asyncio.Event().wait()

    asyncio.run(main())


def bare_receiver(curve_secret: bytes | None, ready: mp.Queue) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    if curve_secret is not None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve_secret)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    ready.put(f"tcp://127.0.0.1:{port}")
    while True:
        ident, *_frames = sock.recv_multipart(copy=False)
        sock.send_multipart([ident, b"ok"])


def pickle_receiver(ready: mp.Queue) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    ready.put(f"tcp://127.0.0.1:{port}")
    while True:
        ident, payload = sock.recv_multipart()
        import pickle

        state = pickle.loads(payload)  # the baseline's way; never do this with network input
        assert isinstance(state, dict)
        sock.send_multipart([ident, b"ok"])


# ---- senders -------------------------------------------------------------------------------


def time_ours(kind: str, repeats: int) -> list[float]:
    identity = Identity.generate()
    state = make_state(kind)
    ready: mp.Queue = mp.Queue()
    proc = mp.Process(target=ours_receiver, args=(kind, identity.public_key, ready), daemon=True)
    proc.start()
    address, receiver_key = ready.get(timeout=60)

    async def main() -> list[float]:
        async def no_requests(header, payloads, origin):  # type: ignore[no-untyped-def]
            return None

        directory = StaticDirectory()  # the one peer we send to, where it listens
        directory.add("receiver", receiver_key, address)
        transport = ZmqTransport(identity, None, no_requests, LIMITS, directory=directory)
        times = []
        for i in range(repeats + 1):
            started = time.perf_counter()
            msg = ModelMessage(job="bench", sender=identity.peer_id, epoch=i, samples=1,
                               arrays=state_to_arrays(state), request_id=f"r{i}")
            frames = encode_model(msg, identity)
            header, _ = await transport.request("receiver", frames, f"r{i}", timeout=120)
            assert header["type"] == "ack", header
            if i:  # the first one warms up the connection
                times.append(time.perf_counter() - started)
        await transport.close()
        return times

    try:
        return asyncio.run(main())
    finally:
        proc.terminate()


def time_pickle(kind: str, repeats: int) -> list[float]:
    state = make_state(kind)
    ready: mp.Queue = mp.Queue()
    proc = mp.Process(target=pickle_receiver, args=(ready,), daemon=True)
    proc.start()
    address = ready.get(timeout=60)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    return _round_trips(ctx, sock, proc, lambda: sock.send_pyobj(state), repeats)


def _round_trips(ctx: zmq.Context, sock: zmq.Socket, proc: mp.Process,
                 send: Callable[[], object], repeats: int) -> list[float]:
    """Seconds per ``send()`` + the receiver's "ok", ``repeats`` times after one warm-up; then
    closes the socket and stops the receiver."""
    times = []
    try:
        for i in range(repeats + 1):
            started = time.perf_counter()
            send()
            assert sock.recv() == b"ok"
            if i:
                times.append(time.perf_counter() - started)
    finally:
        sock.close(linger=0)
        ctx.term()
        proc.terminate()
    return times


def time_bare(kind: str, repeats: int, curve: bool) -> list[float]:
    frames = [t.numpy() for t in make_state(kind).values()]
    server = Identity.generate()
    ready: mp.Queue = mp.Queue()
    secret = server.curve_secret_key if curve else None
    proc = mp.Process(target=bare_receiver, args=(secret, ready), daemon=True)
    proc.start()
    address = ready.get(timeout=60)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    if curve:
        client_public, client_secret = zmq.curve_keypair()
        sock.setsockopt(zmq.CURVE_PUBLICKEY, client_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, client_secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, server.curve_public_key)
    sock.connect(address)
    return _round_trips(ctx, sock, proc, lambda: sock.send_multipart(frames, copy=False),
                        repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures: dict[str, float] = {}
    for kind in ("cnn", "100mb"):
        size_mb = sum(t.numel() * t.element_size() for t in make_state(kind).values()) / 1e6
        ours = statistics.median(time_ours(kind, args.repeats))
        base = statistics.median(time_pickle(kind, args.repeats))
        plain = statistics.median(time_bare(kind, args.repeats, curve=False))
        curve = statistics.median(time_bare(kind, args.repeats, curve=True))
        figures.update({
            f"{kind}_mb": round(size_mb, 2),
            f"{kind}_ours_s": round(ours, 4), f"{kind}_pickle_s": round(base, 4),
            f"{kind}_ours_mb_s": round(size_mb / ours, 1),
            f"{kind}_pickle_mb_s": round(size_mb / base, 1),
            f"{kind}_ratio": round(base / ours, 2),
            f"{kind}_bare_plain_mb_s": round(size_mb / plain, 1),
            f"{kind}_bare_curve_mb_s": round(size_mb / curve, 1),
        })
        print(f"{kind:>6} ({size_mb:6.1f} MB): ours {size_mb / ours:7.1f} MB/s "
              f"({ours * 1000:7.1f} ms), pickle {size_mb / base:7.1f} MB/s "
              f"({base * 1000:7.1f} ms), ratio {base / ours:.2f}x; bare frames: plain "
              f"{size_mb / plain:7.1f} MB/s, CURVE {size_mb / curve:7.1f} MB/s", flush=True)
    figures["target_ratio_100mb"] = 2.0
    figures["meets_target"] = figures["100mb_ratio"] >= 2.0
    print(json.dumps(figures))


if __name__ == "__main__":
    mp.set_start_method("spawn")
    main()
