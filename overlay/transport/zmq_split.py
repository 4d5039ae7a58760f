"""ZeroMQ messages with large frames, split into sub-frames and joined again.

Large frames travel split. A message with a frame larger than ``SPLIT_BYTES`` goes as
``[split envelope, sub-frames...]``: every frame cut into sub-frames of ``SPLIT_BYTES`` (the
last one shorter), the envelope a msgpack map ``{v, type: "split", parts: [k_0, k_1, ...],
request_id?}`` saying that frame i is the next k_i sub-frames laid end to end. libzmq
encrypts, sends and decrypts one frame at a time, so the two I/O threads work on different
sub-frames at once instead of one waiting for the other's whole frame (a 4.8 MB frame over
CURVE on loopback: ~10 ms whole, ~4.5 ms in 512 KiB sub-frames); the receiver joins them (one
copy) before anything else looks at the message. A peer that predates splitting refuses the
envelope as an unknown type (``malformed``, with the request id).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from overlay.errors import WireError
from overlay.transport.base import max_frame, max_parts
from overlay.wire import WIRE_VERSION, Limits

SPLIT_BYTES = 512 * 1024
"""Frames larger than this travel as sub-frames of this size (see the module's docstring)."""
SPLIT_TYPE = "split"
_SPLIT_PREFIX = msgpack.packb({"v": WIRE_VERSION, "type": SPLIT_TYPE})[1:]
"""An envelope's bytes after its map header: how a receiver recognizes one cheaply."""
JOIN_IN_THREAD_BYTES = 16 * 1024 * 1024
"""A split message at least this large is joined off the event loop."""


def split_frames(frames: Sequence[bytes | memoryview],
                 request_id: str | None = None) -> list[bytes | memoryview]:
    """``frames`` as they travel: unchanged if none is larger than SPLIT_BYTES, else the
    envelope and the sub-frames (views of ``frames``, no copy)."""
    views: list[memoryview] = []
    for frame in frames:
        view = memoryview(frame)
        views.append(view.cast("B") if view.nbytes else memoryview(b""))
    if all(len(v) <= SPLIT_BYTES for v in views):
        return list(frames)
    counts: list[int] = []
    out: list[bytes | memoryview] = []
    for view in views:
        pieces = [view[i : i + SPLIT_BYTES] for i in range(0, len(view), SPLIT_BYTES)] or [view]
        counts.append(len(pieces))
        out.extend(pieces)
    envelope: dict[str, Any] = {"v": WIRE_VERSION, "type": SPLIT_TYPE, "parts": counts}
    if request_id is not None:
        envelope["request_id"] = request_id
    packed: bytes = msgpack.packb(envelope, use_bin_type=True)
    return [packed, *out]


def is_split(frame: bytes | memoryview) -> bool:
    """Whether ``frame`` is a split envelope (as :func:`split_frames` packs it)."""
    n = len(_SPLIT_PREFIX)
    return (len(frame) > n and frame[0] in (0x83, 0x84)
            and bytes(frame[1 : n + 1]) == _SPLIT_PREFIX)


def _split_counts(envelope: bytes | memoryview, n_sub: int, limits: Limits) -> list[int]:
    """The envelope's ``parts``, checked against the ``n_sub`` sub-frames that came with it."""
    try:
        fields = msgpack.unpackb(envelope, raw=False, strict_map_key=True, max_map_len=8,
                                 max_array_len=max_parts(limits))
    except Exception:  # msgpack signals bad input with several exception types
        raise WireError("malformed", "split envelope is not msgpack") from None
    counts = fields.get("parts") if isinstance(fields, dict) else None
    if not (isinstance(counts, list) and counts and all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in counts)):
        raise WireError("malformed", "split envelope: parts must be a list of counts >= 1")
    if sum(counts) != n_sub:
        raise WireError("truncated", f"split envelope names {sum(counts)} sub-frames, "
                        f"{n_sub} came")
    return counts


def split_groups(envelope: bytes | memoryview, subs: Sequence[memoryview],
                 limits: Limits) -> list[Sequence[memoryview]]:
    """The sub-frames of each frame of a split message, as its envelope says.

    WireError ``malformed``/``truncated`` for an envelope that does not fit its sub-frames,
    ``too_many_parts`` beyond the part limit, ``too_large`` for a frame beyond the size limit.
    """
    counts = _split_counts(envelope, len(subs), limits)
    if len(counts) > max_parts(limits):
        raise WireError("too_many_parts", f"more than {max_parts(limits)} parts")
    groups: list[Sequence[memoryview]] = []
    at = 0
    for k in counts:
        group = subs[at : at + k]
        at += k
        if sum(len(g) for g in group) > max_frame(limits):
            raise WireError("too_large", f"a frame larger than {max_frame(limits)} bytes")
        groups.append(group)
    return groups


def join_group(group: Sequence[memoryview]) -> memoryview:
    """One frame from its sub-frames: a read-only copy (numpy copies without the GIL, so a
    digest thread hashes the same sub-frames meanwhile), or the sub-frame itself if alone."""
    if len(group) == 1:
        return group[0]
    out = np.empty(sum(len(g) for g in group), dtype=np.uint8)
    at = 0
    for sub in group:
        out[at : at + len(sub)] = np.frombuffer(sub, dtype=np.uint8)
        at += len(sub)
    out.flags.writeable = False
    return out.data.cast("B")
