"""Hostile input for the fuzz tests and the resilience benchmark: frames an attacker might send
to each entry point of a peer or of the rendezvous, and small blasters that send them.

Not used by peers or the rendezvous themselves. Everything here is deterministic for a given
``seed``, so a failure can be replayed.

- :func:`zmq_messages` / :func:`blast_zmq`: multipart messages for a peer's ZeroMQ ROUTER
  (random parts, too many parts, large frames, an oversized header, truncated models, a wrong
  digest, shape bombs, forbidden dtypes, NaN weights correctly signed, pickles, bit flips).
- :func:`webrtc_chunks` / :func:`blast_webrtc`: raw data channel messages for an open
  :class:`overlay.transport.webrtc.WebRtcLink` (garbage, truncated, out-of-order and
  oversized chunks, text messages, and whole hostile transfers cut into proper chunks).
- :func:`stun_datagrams` / :func:`blast_stun`: UDP datagrams for the rendezvous' STUN port.
- :func:`ws_frames` / :func:`blast_rendezvous`: WebSocket frames for the rendezvous session
  (random and text frames, oversized frames, malformed and badly signed joins, join floods).

Each blaster returns what it sent, by :class:`Kind`; the receivers count what they refused by
reason (``TransportStats.rejected``, ``StunServer.counters``, their logs).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import pickle
import random
import struct
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from overlay.identity import Identity
from overlay.protocol import MsgType
from overlay.protocol import encode as encode_rendezvous
from overlay.wire import (
    WIRE_VERSION,
    FrameType,
    ModelMessage,
    NamedArray,
    encode_control,
    model_parts,
    pack_header,
)

log = logging.getLogger(__name__)

Spec = tuple[str, str, tuple[int, ...]]
"""(name, dtype, shape) of one array of the model the target trains."""
SMALL_MODEL: list[Spec] = [("w", "float32", (16, 16)), ("b", "float32", (16,))]
"""The model to imitate when the caller does not know the target's."""


class Kind(enum.StrEnum):
    """What a hostile message is."""

    RANDOM = "random"  # random bytes, in one to four parts
    NOT_MSGPACK = "not_msgpack"  # a header that is no msgpack at all
    PICKLE = "pickle"  # a pickle whose loading would run code, as header and as payload
    BAD_VERSION = "bad_version"
    UNKNOWN_TYPE = "unknown_type"
    MANY_PARTS = "many_parts"  # more parts than any model has
    LARGE_FRAME = "large_frame"  # a big payload behind a header that does not fit it
    HEADER_TOO_LARGE = "header_too_large"
    TRUNCATED_MODEL = "truncated_model"  # a signed model missing payload bytes or frames
    BAD_DIGEST = "bad_digest"  # a signed model with one payload byte flipped
    SHAPE_BOMB = "shape_bomb"  # dimensions whose product is astronomic, negative, overflowing
    BAD_DTYPE = "bad_dtype"  # object, unicode, structured, complex, big-endian dtypes
    NAN_WEIGHTS = "nan_weights"  # NaN/Inf weights of the right architecture, correctly signed
    WRONG_ARCHITECTURE = "wrong_architecture"  # correctly signed, other names and shapes
    MUTATED = "mutated"  # bit flips, truncation or extension of a valid model header
    NOT_A_REQUEST = "not_a_request"  # an ack or a pong sent as a request
    # WebRTC data channel
    BAD_CHUNK = "bad_chunk"  # garbage, a short or unknown-version chunk header
    OUT_OF_ORDER = "out_of_order"  # chunks of a transfer skipped or repeated
    OVERSIZED_TOTAL = "oversized_total"  # a first chunk announcing more than the limits
    TEXT = "text"  # a text message where only binary ones belong
    TRANSFER = "transfer"  # a whole hostile ZeroMQ-kind message, properly chunked
    # STUN
    SHORT = "short"
    NO_COOKIE = "no_cookie"  # no magic cookie: an RFC 3489 request, answered with MAPPED-ADDRESS
    BAD_LENGTH = "bad_length"
    TRUNCATED_ATTRIBUTE = "truncated_attribute"
    BAD_FINGERPRINT = "bad_fingerprint"
    OVERSIZED = "oversized"
    FAR_OVERSIZED = "far_oversized"
    VALID = "valid"  # a well-formed request, mixed in: it must still be answered
    # rendezvous WebSocket
    BAD_JOIN = "bad_join"  # a join with wrong types, a bad signature, a bad job
    JOIN_FLOOD = "join_flood"  # a join with a valid signature, then messages as fast as we can


class _PickleTrap:
    """Unpickling this creates ``path`` (so a test can tell that nothing unpickled it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def pickle_bomb(marker: str | os.PathLike[str] | None = None) -> bytes:
    """A pickle that creates ``marker`` when loaded (default: a file in the temp dir named
    after this process, see :func:`default_marker`)."""
    return pickle.dumps(_PickleTrap(Path(marker or default_marker())))


def default_marker() -> Path:
    return Path(tempfile.gettempdir()) / f"peerlearn-pickle-trap-{os.getpid()}"


def _arrays(template: Sequence[Spec], rng: np.random.Generator) -> list[NamedArray]:
    out = []
    for name, dtype, shape in template:
        values = rng.standard_normal(shape).astype(dtype) if np.dtype(dtype).kind == "f" \
            else np.zeros(shape, dtype=dtype)
        out.append(NamedArray(name, values))
    return out


@dataclass
class _Builder:
    """Makes the frames of each kind; holds the random state and one signed model."""

    identity: Identity
    job: str
    template: Sequence[Spec]
    seed: int
    large_bytes: int
    marker: Path
    rng: random.Random = field(init=False)
    np_rng: np.random.Generator = field(init=False)
    model_header: dict[str, Any] = field(init=False)
    model_payloads: list[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.np_rng = np.random.default_rng(self.seed)
        # The wire-level kinds use a small model (the digest is checked before the
        # architecture); only NaN weights imitate the target's model, to reach its validator.
        header, payloads = self._signed(_arrays(SMALL_MODEL, self.np_rng))
        self.model_header, self.model_payloads = header, payloads

    def _signed(self, arrays: list[NamedArray], **kw: Any) -> tuple[dict[str, Any], list[bytes]]:
        msg = ModelMessage(job=self.job, sender=self.identity.peer_id, epoch=kw.pop("epoch", 1),
                           samples=kw.pop("samples", 100), arrays=arrays,
                           request_id=f"hostile-{self.rng.getrandbits(32):08x}", **kw)
        header, payloads = model_parts(msg, self.identity)
        return header, [bytes(p) for p in payloads]

    def _rid(self) -> str:
        return f"hostile-{self.rng.getrandbits(32):08x}"

    def _model(self) -> list[bytes]:
        return [pack_header(self.model_header, request_id=self._rid()), *self.model_payloads]

    def _header(self, **fields: Any) -> bytes:
        base = {k: v for k, v in self.model_header.items() if k not in fields}
        packed: bytes = msgpack.packb({**base, "request_id": self._rid(), **fields},
                                      use_bin_type=True)
        return packed

    def _bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def frames(self, kind: Kind) -> list[bytes]:
        r = self.rng
        spec0 = self.model_header["arrays"][0]
        if kind is Kind.RANDOM:
            return [self._bytes(r.choice([0, 1, 7, 64, 1000])) for _ in range(r.randint(1, 4))]
        if kind is Kind.NOT_MSGPACK:
            return [b"\xc1" + self._bytes(r.randint(0, 40))]  # 0xc1 is never used by msgpack
        if kind is Kind.PICKLE:
            bomb = pickle.dumps(_PickleTrap(self.marker), protocol=r.randint(0, 5))
            if r.random() < 0.5:
                return [bomb]
            return [self._header(arrays=[[spec0[0], "O", [1], "raw"]]), bomb]
        if kind is Kind.BAD_VERSION:
            return [self._header(v=r.choice([0, 2, -1, "1", None])), *self.model_payloads]
        if kind is Kind.UNKNOWN_TYPE:
            return [msgpack.packb({"v": WIRE_VERSION, "type": r.choice(["exec", "", 7, None]),
                                   "request_id": self._rid()}, use_bin_type=True)]
        if kind is Kind.MANY_PARTS:
            return [self._header(), *([b"x"] * r.randint(4100, 4200))]
        if kind is Kind.LARGE_FRAME:
            return [self._header(), self._bytes(self.large_bytes)]
        if kind is Kind.HEADER_TOO_LARGE:
            return [self._header(padding=b"\0" * (1024 * 1024 + r.randint(1, 1000)))]
        if kind is Kind.TRUNCATED_MODEL:
            frames = self._model()
            if r.random() < 0.5 or len(frames) < 3:
                frames[-1] = frames[-1][: r.randint(0, max(0, len(frames[-1]) - 1))]
                return frames
            return frames[: r.randint(1, len(frames) - 1)]
        if kind is Kind.BAD_DIGEST:
            frames = self._model()
            payload = bytearray(frames[1])
            if payload:
                payload[r.randrange(len(payload))] ^= 1 << r.randrange(8)
            else:
                payload = bytearray(b"\0")
            frames[1] = bytes(payload)
            return frames
        if kind is Kind.SHAPE_BOMB:
            shape = r.choice([[2**40, 2**40], [2**63, 2**63, 2**63], [-1, 16], [0, 2**62, 2**62],
                              [2**64 - 1], [1] * 9, [16.0, 16], [True, 16]])
            return [self._header(arrays=[[spec0[0], spec0[1], shape, spec0[3]]]), b""]
        if kind is Kind.BAD_DTYPE:
            dtype = r.choice(["O", "object", "<U8", "|S4", "V8", "complex64", ">f4", "<f4",
                              "[('a', '<f4')]", "float128", "bfloat16", 7, None])
            shape = spec0[2]
            return [self._header(arrays=[[spec0[0], dtype, shape, "raw"]]),
                    pickle.dumps(_PickleTrap(self.marker))]
        if kind is Kind.NAN_WEIGHTS:
            arrays = _arrays(self.template, self.np_rng)
            for item in arrays:
                if item.array.dtype.kind == "f" and item.array.size:
                    flat = item.array.reshape(-1)
                    flat[r.randrange(flat.size)] = r.choice([np.nan, np.inf, -np.inf])
                    break
            header, payloads = self._signed(arrays)
            return [pack_header(header), *payloads]
        if kind is Kind.WRONG_ARCHITECTURE:
            header, payloads = self._signed([NamedArray("evil", np.zeros(r.randint(1, 64),
                                                                          dtype=np.float32))])
            return [pack_header(header), *payloads]
        if kind is Kind.MUTATED:
            head = bytearray(pack_header(self.model_header, request_id=self._rid()))
            what = r.random()
            if what < 0.6:
                for _ in range(r.randint(1, 8)):
                    head[r.randrange(len(head))] ^= 1 << r.randrange(8)
            elif what < 0.8:
                del head[r.randint(0, len(head) - 1):]
            else:
                head += self._bytes(r.randint(1, 64))
            return [bytes(head), *self.model_payloads]
        if kind is Kind.NOT_A_REQUEST:
            return [encode_control(r.choice([FrameType.ACK, FrameType.PONG, FrameType.NACK,
                                             FrameType.PROBE_REPLY]), request_id=self._rid())]
        raise ValueError(f"{kind} is not a ZeroMQ message kind")


ZMQ_KINDS: tuple[Kind, ...] = (
    Kind.RANDOM, Kind.NOT_MSGPACK, Kind.PICKLE, Kind.BAD_VERSION, Kind.UNKNOWN_TYPE,
    Kind.MANY_PARTS, Kind.LARGE_FRAME, Kind.HEADER_TOO_LARGE, Kind.TRUNCATED_MODEL,
    Kind.BAD_DIGEST, Kind.SHAPE_BOMB, Kind.BAD_DTYPE, Kind.NAN_WEIGHTS,
    Kind.WRONG_ARCHITECTURE, Kind.MUTATED, Kind.NOT_A_REQUEST,
)
_EXPENSIVE = {Kind.MANY_PARTS: 0.01, Kind.LARGE_FRAME: 0.01, Kind.HEADER_TOO_LARGE: 0.01,
              Kind.NAN_WEIGHTS: 0.02, Kind.WRONG_ARCHITECTURE: 0.03}
"""Relative frequency of the kinds that cost the sender (and the receiver) the most; the
others share the rest evenly."""


def _weights(kinds: Sequence[Kind]) -> list[float]:
    cheap = [k for k in kinds if k not in _EXPENSIVE]
    rest = max(0.0, 1.0 - sum(_EXPENSIVE.get(k, 0.0) for k in kinds))
    return [_EXPENSIVE.get(k, rest / max(1, len(cheap))) for k in kinds]


def zmq_messages(
    identity: Identity,
    count: int,
    *,
    job: str = "hostile",
    template: Sequence[Spec] = SMALL_MODEL,
    kinds: Sequence[Kind] = ZMQ_KINDS,
    seed: int = 0,
    large_bytes: int = 4 << 20,
    marker: str | os.PathLike[str] | None = None,
) -> Iterator[tuple[Kind, list[bytes]]]:
    """``count`` hostile messages (kind, frames); every kind at least once if count allows.

    ``identity`` signs the models (as a member of ``job`` it gets past the sender check and
    reaches the digest and the validator); ``template`` is the target's model, so NaN weights
    have the right names and shapes (the other kinds use a small model: they are refused
    before the architecture is looked at); pickles would create ``marker`` if anyone loaded
    them.
    """
    builder = _Builder(identity, job, template, seed, large_bytes,
                       Path(marker or default_marker()))
    order = list(kinds)[:count]
    weights = _weights(kinds)
    while len(order) < count:
        order.append(builder.rng.choices(list(kinds), weights)[0])
    for kind in order:
        yield kind, builder.frames(kind)


@dataclass
class BlastResult:
    """What a blaster sent and what came back."""

    sent: collections.Counter[str] = field(default_factory=collections.Counter)
    """Messages sent, by :class:`Kind`."""
    replies: collections.Counter[str] = field(default_factory=collections.Counter)
    """Replies, by type; a ``nack`` by its reason (``nack:bad_digest``)."""
    seconds: float = 0.0


async def blast_zmq(
    address: str,
    server_public_key: bytes | None,
    count: int,
    *,
    identity: Identity | None = None,
    job: str = "hostile",
    template: Sequence[Spec] = SMALL_MODEL,
    kinds: Sequence[Kind] = ZMQ_KINDS,
    seed: int = 0,
    large_bytes: int = 4 << 20,
    marker: str | os.PathLike[str] | None = None,
    quiet: float = 1.0,
) -> BlastResult:
    """Send ``count`` hostile messages to the ZeroMQ listener at ``address`` and collect
    the replies until none came for ``quiet`` seconds.

    ``server_public_key``: the target's Ed25519 public key; given, the connection uses CURVE
    with the target's derived key, else plaintext. ``identity`` signs the models and its
    CURVE key pair authenticates the connection (as that member would); without it a fresh
    key signs and a fresh CURVE pair connects (a stranger).
    """
    import zmq
    import zmq.asyncio

    stranger = identity is None
    identity = identity or Identity.generate()
    result = BlastResult()
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if server_public_key is not None:
        from overlay.identity import curve_public_key_from_ed25519

        if stranger:  # any CURVE key pair: the handshake succeeds, the key is nobody's
            public, secret = zmq.curve_keypair()
        else:  # the member's own key pair: messages reach the digest check and the validator
            public, secret = identity.curve_public_key, identity.curve_secret_key
        sock.curve_serverkey = curve_public_key_from_ed25519(server_public_key)  # raw 32 bytes
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    sock.connect(address)
    last_reply = time.monotonic()

    async def read() -> None:
        nonlocal last_reply
        while True:
            parts = await sock.recv_multipart()
            last_reply = time.monotonic()
            try:
                reply = msgpack.unpackb(parts[0], raw=False)
                kind = str(reply.get("type"))
                if kind == FrameType.NACK.value:
                    kind = f"nack:{reply.get('reason')}"
            except Exception:  # noqa: BLE001 -- a garbled reply is counted as such
                kind = "garbled"
            result.replies[kind] += 1

    started = time.monotonic()
    reader = asyncio.create_task(read(), name="hostile-zmq-reader")
    try:
        for kind, frames in zmq_messages(identity, count, job=job, template=template,
                                         kinds=kinds, seed=seed, large_bytes=large_bytes,
                                         marker=marker):
            await sock.send_multipart(frames, copy=len(frames) > 64)
            result.sent[kind] += 1
        last_reply = max(last_reply, time.monotonic())
        while time.monotonic() - last_reply < quiet:
            await asyncio.sleep(0.1)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        sock.close(linger=0)
        ctx.term()
    result.seconds = time.monotonic() - started
    log.info("sent %d hostile messages to %s in %.1f s: %s", count, address, result.seconds,
             dict(result.sent))
    return result


# ---- WebRTC data channel ----------------------------------------------------------------------

WEBRTC_KINDS: tuple[Kind, ...] = (Kind.BAD_CHUNK, Kind.OUT_OF_ORDER, Kind.OVERSIZED_TOTAL,
                                  Kind.TEXT, Kind.TRANSFER)


def webrtc_chunks(
    identity: Identity,
    count: int,
    next_tid: Any,
    *,
    job: str = "hostile",
    template: Sequence[Spec] = SMALL_MODEL,
    seed: int = 0,
    marker: str | os.PathLike[str] | None = None,
) -> Iterator[tuple[Kind, list[bytes | str]]]:
    """``count`` hostile data channel sequences (kind, messages). ``next_tid()`` gives the
    transfer ids to use (the link's own counter, so honest transfers do not collide)."""
    from overlay.transport.webrtc import CHUNK_HEADER, CHUNK_SIZE, ChunkHeader, iter_chunks

    builder = _Builder(identity, job, template, seed, 4 << 20,
                       Path(marker or default_marker()))
    r = builder.rng
    cheap = [k for k in ZMQ_KINDS if k not in (Kind.LARGE_FRAME, Kind.MANY_PARTS,
                                                Kind.HEADER_TOO_LARGE)]
    order = list(WEBRTC_KINDS)[:count]
    while len(order) < count:
        order.append(r.choice(WEBRTC_KINDS))
    for kind in order:
        messages: list[bytes | str]
        if kind is Kind.BAD_CHUNK:
            messages = [r.choice([
                r.randbytes(r.randint(0, CHUNK_HEADER.size - 1)),
                bytes([r.choice([0, 2, 255])]) + r.randbytes(CHUNK_HEADER.size - 1),
                ChunkHeader(1, r.choice([0x08, 0x03, 0x80]), next_tid(), 0, 1, 1, 8).pack(),
                r.randbytes(r.randint(CHUNK_HEADER.size, 2000)),
            ])]
        elif kind is Kind.OUT_OF_ORDER:
            chunks = list(iter_chunks(next_tid(), [*builder._model(), r.randbytes(3 * CHUNK_SIZE)]))
            if r.random() < 0.5:
                del chunks[r.randint(1, len(chunks) - 2)]  # a gap
            else:
                chunks.insert(1, chunks[1])  # a repeat
            messages = list(chunks)
        elif kind is Kind.OVERSIZED_TOTAL:
            total = r.choice([2**40, 2**63, 600 * 1024 * 1024])
            count_ = max(1, -(-total // CHUNK_SIZE)) & 0xFFFFFFFF
            messages = [ChunkHeader(1, 0, next_tid(), 0, count_, 1, total).pack()
                        + r.randbytes(CHUNK_SIZE)]
        elif kind is Kind.TEXT:
            messages = ["x" * r.randint(0, 100)]
        else:  # a whole hostile message, properly chunked: reaches decode_header and beyond
            frames = builder.frames(r.choice(cheap))
            messages = list(iter_chunks(next_tid(), frames))
        yield kind, messages


async def blast_webrtc(
    link: Any,
    count: int,
    *,
    identity: Identity | None = None,
    job: str = "hostile",
    template: Sequence[Spec] = SMALL_MODEL,
    seed: int = 0,
    marker: str | os.PathLike[str] | None = None,
) -> BlastResult:
    """Write ``count`` hostile sequences on an open :class:`WebRtcLink`'s data channel with
    its low-level send, paced by ``bufferedAmount`` like the link's own sender."""
    identity = identity or Identity.generate()
    result = BlastResult()
    started = time.monotonic()
    for kind, messages in webrtc_chunks(identity, count, link._alloc_tid, job=job,
                                        template=template, seed=seed, marker=marker):
        for message in messages:
            await link._drain()
            link.channel.send(message)
        result.sent[kind] += 1
    result.seconds = time.monotonic() - started
    return result


# ---- STUN -------------------------------------------------------------------------------------

STUN_KINDS: tuple[Kind, ...] = (Kind.RANDOM, Kind.SHORT, Kind.NO_COOKIE, Kind.BAD_LENGTH,
                                Kind.TRUNCATED_ATTRIBUTE, Kind.BAD_FINGERPRINT, Kind.OVERSIZED,
                                Kind.VALID)
_COOKIE = 0x2112A442


def stun_datagrams(count: int, *, seed: int = 0) -> Iterator[tuple[Kind, bytes]]:
    """``count`` hostile STUN datagrams (kind, datagram); about one in eight is valid."""
    import binascii

    r = random.Random(seed)

    def head(length: int, cookie: int = _COOKIE, mtype: int = 0x0001) -> bytes:
        return struct.pack("!HHI12s", mtype, length, cookie, r.randbytes(12))

    order = list(STUN_KINDS)[:count]
    while len(order) < count:
        order.append(r.choice(STUN_KINDS))
    for kind in order:
        if kind is Kind.RANDOM:
            data = r.randbytes(r.randint(0, 600))
        elif kind is Kind.SHORT:
            data = r.randbytes(r.randint(0, 19))
        elif kind is Kind.NO_COOKIE:
            data = head(0, cookie=r.getrandbits(32) | 1)
        elif kind is Kind.BAD_LENGTH:
            data = head(r.choice([3, 8, 400, 0xFFFC])) + r.randbytes(r.choice([0, 4, 12]))
        elif kind is Kind.TRUNCATED_ATTRIBUTE:
            code = r.choice([0x0020, 0x0009, 0x8028, 0x0006, 0x000A, 0x7777])
            attr = struct.pack("!HH", code, r.choice([4, 20, 300, 0xFFFF])) + r.randbytes(
                r.choice([0, 1, 2]))
            attr += bytes(-len(attr) % 4)
            data = head(len(attr)) + attr
        elif kind is Kind.BAD_FINGERPRINT:
            body = struct.pack("!HHI", 0x8028, 4, r.getrandbits(32))
            data = head(len(body)) + body
        elif kind is Kind.OVERSIZED:
            data = head(2000) + r.randbytes(2000)
        else:
            msg = head(8)
            crc = binascii.crc32(msg) ^ 0x5354554E
            data = msg + struct.pack("!HHI", 0x8028, 4, crc)
        yield kind, data


async def blast_stun(host: str, port: int, count: int, *, seed: int = 0,
                     answer_timeout: float = 1.0) -> BlastResult:
    """Send ``count`` hostile datagrams to a STUN server; ``replies`` counts the answers by
    STUN class (``success``, ``error``, ``other``). Paced a little so that loopback does
    not drop our own datagrams."""
    loop = asyncio.get_running_loop()
    result = BlastResult()

    class _Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            cls = struct.unpack("!H", data[:2])[0] & 0x0110 if len(data) >= 2 else -1
            result.replies[{0x100: "success", 0x110: "error"}.get(cls, "other")] += 1

    transport, _ = await loop.create_datagram_endpoint(_Client, remote_addr=(host, port))
    started = time.monotonic()
    try:
        for i, (kind, data) in enumerate(stun_datagrams(count, seed=seed)):
            transport.sendto(data)
            result.sent[kind] += 1
            if i % 20 == 19:
                await asyncio.sleep(0.01)
        await asyncio.sleep(answer_timeout)
    finally:
        transport.close()
    result.seconds = time.monotonic() - started
    return result


# ---- rendezvous WebSocket ---------------------------------------------------------------------

WS_KINDS: tuple[Kind, ...] = (Kind.RANDOM, Kind.TEXT, Kind.OVERSIZED, Kind.FAR_OVERSIZED,
                              Kind.NOT_MSGPACK, Kind.PICKLE, Kind.BAD_JOIN, Kind.JOIN_FLOOD)


def ws_frames(kind: Kind, r: random.Random, nonce: bytes, identity: Identity,
              job: str, max_bytes: int = 64 * 1024) -> list[bytes | str]:
    """The frames one hostile WebSocket session sends after the server's challenge."""
    from overlay.identity import DOMAIN_RENDEZVOUS_AUTH

    if kind is Kind.RANDOM:
        return [r.randbytes(r.randint(0, 500)) for _ in range(r.randint(1, 3))]
    if kind is Kind.TEXT:
        return ['{"type": "join"}']
    if kind is Kind.OVERSIZED:  # just over the limit: refused with an error frame
        return [b"\x80" + r.randbytes(max_bytes + r.randint(1, 4096))]
    if kind is Kind.FAR_OVERSIZED:  # far over: the WebSocket layer closes (1009)
        return [b"\x80" + r.randbytes(3 * max_bytes)]
    if kind is Kind.NOT_MSGPACK:
        return [b"\xc1" * r.randint(1, 50)]
    if kind is Kind.PICKLE:
        return [pickle.dumps(_PickleTrap(default_marker()))]
    signature = identity.sign(DOMAIN_RENDEZVOUS_AUTH + nonce + job.encode())
    join = {"public_key": identity.public_key, "signature": signature, "job": job,
            "addrs": [], "meta": {}}
    if kind is Kind.BAD_JOIN:
        field_, value = r.choice([("signature", b"\0" * 64), ("job", "../" * 40),
                                  ("addrs", ["tcp://1.2.3.4:1"] * 100), ("public_key", b"x"),
                                  ("meta", {"k": [1] * 10}), ("addrs", "tcp://x:1")])
        return [encode_rendezvous(MsgType.JOIN, **{**join, field_: value})]
    # JOIN_FLOOD: a valid join, then garbage and heartbeats as fast as possible
    flood: list[bytes | str] = [encode_rendezvous(MsgType.JOIN, **join)]
    for _ in range(r.randint(20, 60)):
        flood.append(r.choice([encode_rendezvous(MsgType.HEARTBEAT), r.randbytes(10),
                               encode_rendezvous(MsgType.JOIN, **join)]))
    return flood


async def blast_rendezvous(
    url: str,
    sessions: int,
    *,
    job: str = "hostile",
    seed: int = 0,
    local_ip: str | None = None,
    max_bytes: int = 64 * 1024,
    concurrency: int = 16,
    quiet: float = 2.0,
) -> BlastResult:
    """Open ``sessions`` WebSocket sessions to the rendezvous at ``url`` (``ws://H:P/ws``), each
    sending one hostile kind of frames; ``replies`` counts the server's answers (``error`` by
    code, e.g. ``error:malformed``) and how sessions ended (``close:1009``). ``local_ip``
    binds our side (an attacker's address distinct from honest peers' on loopback)."""
    import aiohttp

    r = random.Random(seed)
    result = BlastResult()
    order = list(WS_KINDS)[:sessions]
    while len(order) < sessions:
        order.append(r.choice(WS_KINDS))
    slots = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(local_addr=(local_ip, 0) if local_ip else None,
                                     limit=concurrency)

    async def one(kind: Kind, rr: random.Random, session: aiohttp.ClientSession) -> None:
        async with slots:
            try:
                async with session.ws_connect(url, max_msg_size=4 * max_bytes,
                                              timeout=aiohttp.ClientWSTimeout(ws_close=2)) as ws:
                    first = await ws.receive(timeout=5)
                    challenge = msgpack.unpackb(first.data, raw=False)
                    for frame in ws_frames(kind, rr, challenge.get("nonce", b""),
                                           Identity.generate(), job, max_bytes):
                        if ws.closed:
                            break
                        if isinstance(frame, str):
                            await ws.send_str(frame)
                        else:
                            await ws.send_bytes(frame)
                    result.sent[kind] += 1
                    while True:  # the answers, until the server closes or falls quiet
                        try:
                            msg = await ws.receive(timeout=quiet)
                        except TimeoutError:
                            result.replies["open"] += 1
                            break
                        if msg.type is not aiohttp.WSMsgType.BINARY:
                            result.replies[f"close:{ws.close_code}"] += 1
                            break
                        reply = msgpack.unpackb(msg.data, raw=False)
                        what = str(reply.get("type"))
                        if what == MsgType.ERROR.value:
                            what = f"error:{reply.get('code')}"
                        result.replies[what] += 1
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
                result.replies[f"failed:{type(exc).__name__}"] += 1

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(k, random.Random(r.getrandbits(64)), session)
                               for k in order))
    result.seconds = time.monotonic() - started
    return result
