"""``--codec auto``: a codec per neighbour, from the link's kind and its measured throughput.

Fewer bytes cost a little accuracy (docs/developers.md: fp16 about -0.3 points, int8 about
-0.5 in our benchmark) and buy time only where the link is what limits the round. The rule:

=========================  ==========  =======================  ==========
link                        >= 20 MB/s  2-20 MB/s or unmeasured   < 2 MB/s
=========================  ==========  =======================  ==========
``zmq`` (public peer)       raw         raw / fp16 (measured)     int8
``webrtc-direct``           fp16        fp16                      int8
``webrtc-relay`` (TURN)     int8        int8                      int8
no link yet                 fp16        fp16                      fp16
=========================  ==========  =======================  ==========

Throughput is what our own deliveries of a model of at least :data:`MIN_MEASURED` bytes to that
neighbour achieved (an exponential average, see :class:`Throughput`), so a neighbour's codec
follows its link as it changes. Relayed links always get the smallest codec: the relay is
the operator's bandwidth and the slowest path.
"""

from __future__ import annotations

from overlay.transport.base import LinkKind

FAST = 20e6
"""Bytes/s from which a ZeroMQ link carries raw models."""
SLOW = 2e6
"""Bytes/s below which every link gets int8."""
MIN_MEASURED = 1_000_000
"""Deliveries smaller than this say more about latency than throughput: not measured."""


def pick_codec(kind: LinkKind | None, bytes_per_s: float | None) -> str:
    """The codec for one neighbour (see the table in the module docstring)."""
    if kind is LinkKind.WEBRTC_RELAY:
        return "int8"
    if bytes_per_s is not None and bytes_per_s < SLOW:
        return "int8"
    if kind is LinkKind.ZMQ:
        return "raw" if bytes_per_s is None or bytes_per_s >= FAST else "fp16"
    return "fp16"


class Throughput:
    """Bytes/s of our deliveries per neighbour: an exponential average (weight ``alpha`` for
    the newest delivery)."""

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = alpha
        self._rate: dict[str, float] = {}

    def record(self, peer_id: str, nbytes: int, seconds: float) -> None:
        if nbytes < MIN_MEASURED or seconds <= 0:
            return
        rate = nbytes / seconds
        old = self._rate.get(peer_id)
        self._rate[peer_id] = rate if old is None else self.alpha * rate + (1 - self.alpha) * old

    def get(self, peer_id: str) -> float | None:
        return self._rate.get(peer_id)

    def forget(self, peer_id: str) -> None:
        self._rate.pop(peer_id, None)
