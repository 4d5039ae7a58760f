"""Framing of one transfer over a WebRTC data channel, and its reassembly (sans-I/O).

A message is a *transfer*; its byte stream is a table of frame lengths (``frame_count`` x u64,
big-endian) followed by the frames, cut into chunks of at most :data:`MAX_MESSAGE` bytes
(aiortc refuses messages above the peer's maximum, 65536 by default). Each chunk is
:data:`CHUNK_HEADER` + data::

    version u8 | flags u8 | reserved u16 | transfer_id u32 | index u32 | count u32
    | frame_count u32 | total_len u64                                       (28 bytes)

``transfer_id`` counts up per sender and link; ``count`` = ceil(total_len / CHUNK_SIZE);
every chunk but the last carries exactly :data:`CHUNK_SIZE` bytes and all chunks of a transfer
repeat the same ``count``/``frame_count``/``total_len``. Flags: ``REPLY`` (the transfer answers
one of our requests), ``ABORT`` (the sender gave a transfer up), ``REJECT`` (the receiver
refused one of *our* transfers; data = reason), ``PING`` (a heartbeat: transfer id 0, no
data). The channel is ordered and reliable, so chunks arrive in order and any deviation is a
protocol error.

A receiver gives a transfer up when it stalls (no chunk for ``chunk_idle_timeout``) or when it
falls below ``min_rate`` bytes/s on average (:func:`transfer_cap`: a bound that grows with
the transfer's size); a slow transfer that keeps moving is never cut by a fixed deadline.

:func:`begin_transfer` checks a transfer's first chunk against the limits *before* anything is
allocated; the :class:`Assembly` it returns preallocates the whole transfer from its announced
size and writes each chunk in place. Nothing here does I/O or keeps time.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from overlay.transport.base import Frames, max_parts
from overlay.wire import Limits

MAX_MESSAGE = 64 * 1024
"""Largest data channel message we send (aiortc's default remote maximum)."""
CHUNK_HEADER = struct.Struct("!BBHIIIIQ")
CHUNK_VERSION = 1
CHUNK_SIZE = MAX_MESSAGE - CHUNK_HEADER.size
"""Transfer bytes per chunk."""
FRAME_LEN = 8
"""Bytes per frame length (u64) in the table that opens a transfer."""


class ChunkFlag(enum.IntEnum):
    DATA = 0x00
    REPLY = 0x01
    ABORT = 0x02
    REJECT = 0x04
    PING = 0x08


FLAG_REPLY = ChunkFlag.REPLY
FLAG_ABORT = ChunkFlag.ABORT
FLAG_REJECT = ChunkFlag.REJECT
DATA_FLAGS = frozenset({ChunkFlag.DATA, ChunkFlag.REPLY})
CONTROL_FLAGS = frozenset({ChunkFlag.ABORT, ChunkFlag.REJECT, ChunkFlag.PING})


class ChunkError(Exception):
    """A chunk broke the framing; ``reason`` is the stats.rejected code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class ChunkHeader:
    version: int
    flags: int
    transfer_id: int
    index: int
    count: int
    frame_count: int
    total_len: int

    def pack(self) -> bytes:
        return CHUNK_HEADER.pack(
            self.version, self.flags, 0, self.transfer_id, self.index, self.count,
            self.frame_count, self.total_len,
        )

    @classmethod
    def unpack(cls, message: bytes) -> ChunkHeader:
        if len(message) < CHUNK_HEADER.size:
            raise ChunkError("bad_chunk", f"{len(message)} bytes, shorter than a chunk header")
        version, flags, reserved, tid, index, count, nframes, total = CHUNK_HEADER.unpack_from(
            message
        )
        if version != CHUNK_VERSION or reserved != 0:
            raise ChunkError("bad_chunk", f"version {version}, reserved {reserved}")
        if flags not in DATA_FLAGS and flags not in CONTROL_FLAGS:
            raise ChunkError("bad_chunk", f"flags {flags:#x}")
        return cls(version, flags, tid, index, count, nframes, total)

    @property
    def is_reply(self) -> bool:
        return self.flags == ChunkFlag.REPLY


def chunk_count(total_len: int) -> int:
    return max(1, math.ceil(total_len / CHUNK_SIZE))


def iter_chunks(transfer_id: int, frames: Frames, flags: int = 0) -> Iterator[bytes]:
    """The data channel messages that carry ``frames`` as transfer ``transfer_id``."""
    views = [memoryview(f).cast("B") for f in frames]
    table = struct.pack(f"!{len(views)}Q", *(len(v) for v in views))
    total = len(table) + sum(len(v) for v in views)
    count = chunk_count(total)
    index = 0
    pieces: list[bytes | memoryview] = []
    size = 0
    for view in [memoryview(table), *views]:
        pos = 0
        while pos < len(view):
            take = min(CHUNK_SIZE - size, len(view) - pos)
            pieces.append(view[pos : pos + take])
            size += take
            pos += take
            if size == CHUNK_SIZE:
                head = ChunkHeader(CHUNK_VERSION, flags, transfer_id, index, count,
                                   len(views), total)
                yield b"".join([head.pack(), *pieces])
                index += 1
                pieces, size = [], 0
    if size:
        head = ChunkHeader(CHUNK_VERSION, flags, transfer_id, index, count, len(views), total)
        yield b"".join([head.pack(), *pieces])


def control_chunk(flags: int, transfer_id: int, reason: str = "") -> bytes:
    """An ``ABORT`` or ``REJECT`` chunk (data: the reason, at most 200 ASCII bytes)."""
    data = reason.encode("ascii", "replace")[:200]
    return ChunkHeader(CHUNK_VERSION, flags, transfer_id, 0, 0, 0, len(data)).pack() + data


def control_reason(message: bytes) -> str:
    return message[CHUNK_HEADER.size :].decode("ascii", "replace")


MIN_RATE = 16 * 1024
"""Bytes/s: the slowest average rate at which a receiver keeps an incoming transfer."""


def transfer_cap(total_len: int, chunk_idle_timeout: float, min_rate: float = MIN_RATE) -> float:
    """Seconds an incoming transfer of ``total_len`` bytes may take in all."""
    return 4 * chunk_idle_timeout + total_len / min_rate


def max_transfer_len(limits: Limits) -> int:
    """The largest transfer a receiver with ``limits`` accepts (frame table included)."""
    return limits.max_total_bytes + limits.max_header_bytes + FRAME_LEN * max_parts(limits)


@dataclass
class Assembly:
    """One incoming transfer being reassembled into a buffer preallocated to its size."""

    transfer_id: int
    reply: bool
    count: int
    frame_count: int
    total_len: int
    started: float
    last: float
    buf: bytearray
    next_index: int = 0

    @classmethod
    def allocate(cls, head: ChunkHeader, now: float) -> Assembly:
        """A transfer's buffer, preallocated to its announced size: check the first chunk
        (:func:`check_first_chunk`) before calling this."""
        return cls(head.transfer_id, head.is_reply, head.count, head.frame_count,
                   head.total_len, now, now, bytearray(head.total_len))

    @property
    def complete(self) -> bool:
        return self.next_index == self.count

    def add(self, head: ChunkHeader, data: memoryview, now: float) -> bool:
        """Write the next chunk in place; True once the transfer is complete.

        Raises ChunkError (``bad_chunk``) for a chunk out of sequence (duplicate, skipped,
        another transfer's shape) or of the wrong size.
        """
        if (head.index != self.next_index or head.count != self.count
                or head.frame_count != self.frame_count or head.total_len != self.total_len):
            raise ChunkError("bad_chunk", f"chunk {head.index}/{head.count} out of sequence")
        pos = head.index * CHUNK_SIZE
        expected = min(CHUNK_SIZE, self.total_len - pos)
        if len(data) != expected:
            raise ChunkError("bad_chunk", f"chunk {head.index}: {len(data)} bytes, want {expected}")
        self.buf[pos : pos + expected] = data
        self.next_index += 1
        self.last = now
        return self.complete

    def frames(self) -> list[memoryview]:
        """The frames of a complete transfer (views into its buffer); ChunkError if the table
        of frame lengths does not add up to the transfer."""
        n = self.frame_count
        lengths = struct.unpack_from(f"!{n}Q", self.buf, 0)
        if FRAME_LEN * n + sum(lengths) != len(self.buf):
            raise ChunkError("bad_frames", "frame lengths do not add up to the transfer")
        view = memoryview(self.buf)
        frames: list[memoryview] = []
        pos = FRAME_LEN * n
        for length in lengths:
            frames.append(view[pos : pos + length])
            pos += length
        return frames

    def deadline(self, chunk_idle_timeout: float, min_rate: float = MIN_RATE) -> float:
        """When the transfer is overdue (the clock of ``started`` / ``last``)."""
        cap = transfer_cap(self.total_len, chunk_idle_timeout, min_rate)
        return min(self.started + cap, self.last + chunk_idle_timeout)

    def overdue(self, now: float, chunk_idle_timeout: float,
                min_rate: float = MIN_RATE) -> ChunkError | None:
        """Why the transfer is given up at ``now`` (stalled: no chunk for
        ``chunk_idle_timeout``; too slow: :func:`transfer_cap` since its first chunk), or
        None while it keeps moving."""
        cap = transfer_cap(self.total_len, chunk_idle_timeout, min_rate)
        if now - self.started >= cap:
            return ChunkError("too_slow", f"not complete within {cap:.1f} s "
                              f"(below {min_rate / 1024:.0f} KiB/s on average)")
        if now - self.last >= chunk_idle_timeout:
            return ChunkError("chunk_timeout", f"no chunk for {chunk_idle_timeout:.1f} s "
                              f"({self.next_index}/{self.count} received)")
        return None

    def free(self) -> None:
        self.buf = bytearray()


def check_first_chunk(head: ChunkHeader, limits: Limits) -> None:
    """Refuse (ChunkError) a transfer whose first chunk breaks the framing or ``limits``."""
    most = max_parts(limits)
    max_total = max_transfer_len(limits)
    if head.index != 0:
        raise ChunkError("bad_chunk", f"transfer {head.transfer_id} starts at chunk {head.index}")
    if not 1 <= head.frame_count <= most:
        raise ChunkError("too_many_parts", f"{head.frame_count} frames (1..{most})")
    if head.total_len > max_total:
        raise ChunkError("too_large", f"{head.total_len} bytes > {max_total}")
    if (head.total_len < FRAME_LEN * head.frame_count
            or head.count != chunk_count(head.total_len)):
        raise ChunkError("bad_chunk", f"{head.count} chunks for {head.total_len} bytes")


def begin_transfer(head: ChunkHeader, limits: Limits, now: float) -> Assembly:
    """The assembly of a new transfer, its buffer preallocated once the first chunk has
    passed :func:`check_first_chunk`. Feed it the first chunk with :meth:`Assembly.add`."""
    check_first_chunk(head, limits)
    return Assembly.allocate(head, now)
