"""The digest of a model message: H over the canonical metadata and H of every HASH_CHUNK
(1 MiB) piece of every payload, H named by the header's ``hash`` (``sha256`` when absent,
``blake3`` where installed; overlay.wire's docstring has the format). Pieces hash on several
threads for large models, and a transport may hash pieces as they arrive
(:class:`PrehashedPayloads`) so that they are not hashed again.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from overlay.errors import WireError

_PARALLEL_HASH_BYTES = {"sha256": 1 << 20, "blake3": 16 << 20}
"""From how many bytes a digest hashes its pieces on several threads (blake3 is fast enough
that for smaller models the threads cost more than they save)."""
HASH_CHUNK = 1 << 20
_hash_pool: ThreadPoolExecutor | None = None

SHA256 = "sha256"
"""The digest's hash when a header names none."""
BLAKE3 = "blake3"


def _blake3_new() -> Callable[[], Any] | None:
    try:  # optional: a peer without it still speaks sha256, and refuses blake3 as bad_hash
        module = importlib.import_module("blake3")
    except ImportError:
        return None
    factory: Callable[[], Any] = module.blake3
    return factory


_HASHES: dict[str, Callable[[], Any] | None] = {SHA256: hashlib.sha256, BLAKE3: _blake3_new()}
"""The digest hashes a header may name, and how to make one here (None: not installed)."""
DEFAULT_HASH = BLAKE3 if _HASHES[BLAKE3] is not None else SHA256
"""What this peer's models are digested with."""


def _pool() -> ThreadPoolExecutor:
    global _hash_pool
    if _hash_pool is None:
        _hash_pool = ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="wire-hash"
        )
    return _hash_pool


def hasher(hash_name: str) -> Callable[[], Any]:
    """The constructor of ``hash_name``; WireError ``bad_hash`` if unknown or not installed."""
    new = _HASHES.get(hash_name)
    if new is None:
        known = "unknown" if hash_name not in _HASHES else "not installed here"
        raise WireError("bad_hash", f"digest hash {hash_name[:40]!r} {known}")
    return new


def piece_hashes(hash_name: str, segments: Sequence[memoryview]) -> list[bytes]:
    """H of every HASH_CHUNK-sized piece of the payload that ``segments`` make end to end (as
    :func:`model_digest` hashes it; one hash of nothing for an empty payload). For a transport that
    received a payload in segments: it hashes them as they are, before or while it joins them.
    """
    new = hasher(hash_name)
    out: list[bytes] = []
    h = new()
    filled = 0
    for segment in segments:
        view = memoryview(segment).cast("B")
        at = 0
        while at < len(view):
            take = min(HASH_CHUNK - filled, len(view) - at)
            h.update(view[at : at + take])
            at += take
            filled += take
            if filled == HASH_CHUNK:
                out.append(h.digest())
                h, filled = new(), 0
    if filled or not out:
        out.append(h.digest())
    return out


def hash_available(hash_name: object) -> bool:
    """Whether a header's ``hash`` names a digest hash this peer can check."""
    return isinstance(hash_name, str) and _HASHES.get(hash_name) is not None


def submit_piece_hashes(hash_name: str, segments: Sequence[memoryview]) -> Future[list[bytes]]:
    """:func:`piece_hashes` on the digest's thread pool."""
    return _pool().submit(piece_hashes, hash_name, segments)


class PrehashedPayloads(list[memoryview]):
    """Payloads as a transport received them, with the piece hashes (:func:`piece_hashes`) it
    computed for some of them on arrival; :func:`decode_model` uses those instead of hashing
    again, for a payload that is still the very object they were computed over."""

    def __init__(self, payloads: Sequence[memoryview], hash_name: str,
                 hashes: Sequence[list[bytes] | None]) -> None:
        super().__init__(payloads)
        self.hash_name = hash_name
        self._hashed = [(p, h) for p, h in zip(payloads, hashes, strict=True)]

    def hashes_of(self, index: int, payload: object, hash_name: str) -> list[bytes] | None:
        if hash_name != self.hash_name or index >= len(self._hashed):
            return None
        original, hashes = self._hashed[index]
        return hashes if original is payload else None


def model_digest(meta: bytes, payloads: Sequence[memoryview | bytes],
            hash_name: str = SHA256) -> bytes:
    """H over ``meta`` and H of every HASH_CHUNK-sized piece of every payload (H: ``hash_name``).

    Hashing pieces instead of whole payloads lets a large model hash on several cores (both
    hashes release the GIL on large buffers). Pieces of :class:`PrehashedPayloads` hashed on
    arrival are not hashed again.
    """
    new = hasher(hash_name)

    def one(buf: memoryview) -> bytes:
        h = new()
        h.update(buf)
        digest: bytes = h.digest()
        return digest

    known: dict[int, list[bytes]] = {}
    if isinstance(payloads, PrehashedPayloads):
        for index, received in enumerate(payloads):
            hashes = payloads.hashes_of(index, received, hash_name)
            if hashes is not None:
                known[index] = hashes
    slots: list[bytes | None] = []
    pieces: list[memoryview] = []
    for index, payload in enumerate(payloads):
        if index in known:
            slots.extend(known[index])
            continue
        view = memoryview(payload).cast("B")
        own = [view[i : i + HASH_CHUNK] for i in range(0, len(view), HASH_CHUNK)] or [view]
        pieces.extend(own)
        slots.extend([None] * len(own))
    if len(pieces) > 1 and sum(len(p) for p in pieces) >= _PARALLEL_HASH_BYTES[hash_name]:
        computed = iter(list(_pool().map(one, pieces)))
    else:
        computed = iter([one(p) for p in pieces])
    h = new()
    h.update(meta)
    for slot in slots:
        h.update(slot if slot is not None else next(computed))
    digest: bytes = h.digest()
    return digest
