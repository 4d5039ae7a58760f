"""A model in pieces: resumable transfers, each piece acknowledged (sans-I/O here).

A model larger than one piece travels as ``piece`` requests instead of one ``model`` request.
The bytes are the model's frames ``[header, payload, ...]`` laid end to end; every piece
says which model it belongs to and where it goes::

    piece {v, type, request_id, job, sender, model: digest, frames: [len, ...], offset}
          + one payload frame: the bytes at [offset, offset + len)

``frames`` (the lengths of the model's frames; ``total`` is their sum) and ``model`` (the
digest the model's header will carry) are the same in every piece of a model, so any piece
can open the receiver's buffer and pieces may arrive in any order, over any lane or link.
Each piece is answered ``ack {have}`` (bytes of the model the receiver holds); the piece that
completes the model is answered as a ``model`` request would be (``ack {digest}`` or
``nack``) once the whole model passed every check of ``decode_model`` and its digest equals
``model``.

The receiver keeps a partial model for ``idle_timeout`` seconds after its last piece, so a
sender whose link broke (a flap, a reconnect, a rendezvous restart) sends only the pieces
that were not acknowledged: the transfer resumes instead of starting over. Duplicates are
written again and counted once. What a receiver holds is bounded: ``partials_per_sender``
partial models per sender (the newest win) and ``max_bytes`` in all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from overlay.errors import WireError
from overlay.wire import Limits

log = logging.getLogger(__name__)

PIECE_BYTES = 256 * 1024
"""Bytes per piece on a WebRTC link: small enough that the pieces in flight spread evenly over
the lanes and the last ones do not leave most lanes idle (a lane on a lossy link moves
~0.1 MB/s)."""
PIECE_BYTES_ZMQ = 16 * 1024 * 1024
"""Bytes per piece on a ZeroMQ link (TCP: fewer, larger requests; the 4.8 MB CNN goes whole,
as benchmarks/transfer.py measures it)."""
WINDOW = 12
"""Pieces in flight per model and peer (below the WebRTC transport's requests per link)."""
IDLE_TIMEOUT = 300.0
"""Seconds a receiver keeps a partial model after its last piece (resumable meanwhile)."""


def piece_plan(total: int, piece_bytes: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of every piece of a ``total``-byte model."""
    if piece_bytes <= 0:
        raise ValueError("piece_bytes must be positive")
    return [(off, min(piece_bytes, total - off)) for off in range(0, total, piece_bytes)]


def piece_bytes_of(frames: Sequence[memoryview], offset: int, length: int) -> bytes:
    """The bytes at ``[offset, offset + length)`` of ``frames`` laid end to end."""
    out: list[memoryview] = []
    pos = 0
    end = offset + length
    for frame in frames:
        flen = frame.nbytes
        if pos + flen > offset and pos < end:
            lo = max(offset - pos, 0)
            hi = min(end - pos, flen)
            out.append(frame[lo:hi])
        pos += flen
        if pos >= end:
            break
    return b"".join(out)


@dataclass
class Partial:
    """A model being received in pieces."""

    sender: str
    digest: bytes
    lengths: tuple[int, ...]
    buf: bytearray
    started: float
    last: float
    pieces: dict[int, int] = field(default_factory=dict)  # offset -> length
    have: int = 0

    @property
    def total(self) -> int:
        return len(self.buf)

    @property
    def complete(self) -> bool:
        return self.have == self.total

    def frames(self) -> list[memoryview]:
        view = memoryview(self.buf)
        frames: list[memoryview] = []
        pos = 0
        for length in self.lengths:
            frames.append(view[pos : pos + length])
            pos += length
        return frames


class PieceStore:
    """The partial models a receiver holds, by (sender, model digest)."""

    def __init__(self, limits: Limits = Limits(), *, idle_timeout: float = IDLE_TIMEOUT,
                 partials_per_sender: int = 2, max_bytes: int | None = None) -> None:
        self.limits = limits
        self.idle_timeout = idle_timeout
        self.partials_per_sender = partials_per_sender
        self.max_bytes = max_bytes if max_bytes is not None else 4 * limits.max_total_bytes
        self._partials: dict[tuple[str, bytes], Partial] = {}
        self.completed = 0
        """Models rebuilt whole from pieces so far."""

    def __len__(self) -> int:
        return len(self._partials)

    def held_bytes(self) -> int:
        return sum(p.total for p in self._partials.values())

    def last_progress(self, sender: str) -> float | None:
        """When a piece from ``sender`` last arrived (monotonic), None if nothing is pending."""
        times = [p.last for p in self._partials.values() if p.sender == sender]
        return max(times) if times else None

    def partials(self) -> Iterator[Partial]:
        return iter(list(self._partials.values()))

    def expire(self, now: float) -> None:
        for key, p in list(self._partials.items()):
            if now - p.last >= self.idle_timeout:
                log.info("dropping a partial model from %s: no piece for %.0f s (%d/%d bytes)",
                         p.sender, now - p.last, p.have, p.total)
                del self._partials[key]

    def forget(self, sender: str) -> None:
        for key in [k for k in self._partials if k[0] == sender]:
            del self._partials[key]

    def add(self, sender: str, header: dict[str, Any], data: memoryview,
            now: float | None = None) -> Partial:
        """Write one piece; the partial model it belongs to (``complete`` once whole, then
        forgotten here). Raises WireError for a piece that breaks the rules."""
        now = time.monotonic() if now is None else now
        self.expire(now)
        digest = header.get("model")
        lengths = header.get("frames")
        offset = header.get("offset")
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise WireError("bad_piece", "piece without a 32-byte model digest")
        if (not isinstance(lengths, list) or not lengths
                or len(lengths) > self.limits.max_arrays + 3
                or not all(isinstance(n, int) and n >= 0 for n in lengths)):
            raise WireError("bad_piece", "piece without a valid list of frame lengths")
        total = sum(lengths)
        most = self.limits.max_total_bytes + self.limits.max_header_bytes
        if total > most:
            raise WireError("too_large", f"model of {total} bytes > {most}")
        if lengths[0] > self.limits.max_header_bytes:
            raise WireError("header_too_large", f"{lengths[0]} bytes")
        length = data.nbytes
        if (not isinstance(offset, int) or offset < 0 or length == 0
                or offset + length > total):
            raise WireError("bad_piece", f"piece at {offset!r} of {length} bytes outside "
                            f"a model of {total} bytes")
        key = (sender, digest)
        partial = self._partials.get(key)
        if partial is None:
            partial = self._open(sender, digest, tuple(lengths), total, now)
        elif partial.lengths != tuple(lengths):
            raise WireError("bad_piece", "pieces of one model disagree on its frames")
        known = partial.pieces.get(offset)
        if known is not None and known != length:
            raise WireError("bad_piece", f"piece at {offset} changed its length")
        if known is None and self._overlaps(partial, offset, length):
            raise WireError("bad_piece", f"piece at {offset} overlaps another")
        partial.buf[offset : offset + length] = data
        if known is None:
            partial.pieces[offset] = length
            partial.have += length
        partial.last = now
        if partial.complete:
            del self._partials[key]
            self.completed += 1
        return partial

    @staticmethod
    def _overlaps(partial: Partial, offset: int, length: int) -> bool:
        end = offset + length
        return any(off < end and offset < off + n for off, n in partial.pieces.items())

    def _open(self, sender: str, digest: bytes, lengths: tuple[int, ...], total: int,
              now: float) -> Partial:
        mine = sorted((p for p in self._partials.values() if p.sender == sender),
                      key=lambda p: p.last)
        while len(mine) >= self.partials_per_sender:
            old = mine.pop(0)
            log.info("dropping an older partial model from %s for a new one", sender)
            del self._partials[(old.sender, old.digest)]
        if self.held_bytes() + total > self.max_bytes:
            raise WireError("busy", f"{self.held_bytes()} bytes of partial models held")
        partial = Partial(sender, digest, lengths, bytearray(total), now, now)
        self._partials[(sender, digest)] = partial
        return partial
