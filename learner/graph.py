"""Whom each peer sends its model to, and whose models it waits for, in each epoch.

Without ``fanout`` every peer sends to every other. With ``fanout = k`` each peer sends to
``k`` neighbours, on one of two graphs that every peer derives alone, from the member list,
the job seed and the epoch (so each one also knows exactly whom to wait for):

- ``exponential`` (default): a *time-varying exponential graph* (Ying et al., "Exponential
  Graph is Provably Efficient for Decentralized Deep Training", NeurIPS 2021). The members sit
  on a circle in a fixed order; in epoch ``e`` peer ``i`` sends to ``i + 2**((e*k + j) mod
  tau)`` for ``j < k`` (``tau = ceil(log2 n)``), and waits for ``i - `` the same offsets. A
  model reaches every peer within ``tau`` epochs with ``k = 1`` (any position is a sum of
  distinct powers of two), against about ``n / (2k)`` on a ring.
- ``ring``: the ``k`` successors on a circle shuffled anew each epoch (the earlier default).

**Direct links first.** A link between two peers that both sit behind NAT is WebRTC, and
relayed where their NATs do not allow a punched path; one with a public peer is ZeroMQ. Among
several seeded orders of the circle, the exponential graph takes the one with the fewest edges
between two NATed peers over a whole period (``public``: the members with a verified
address, which every peer sees alike in the membership).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence

GRAPHS = ("exponential", "ring")
ORDER_CANDIDATES = 16
"""Seeded orders of the circle compared for the fewest NATed-NATed edges."""


def _period(n: int) -> int:
    return max(1, math.ceil(math.log2(n)))


def exponential_offsets(n: int, epoch: int, k: int) -> list[int]:
    """The ``k`` distinct offsets (1..n-1) of epoch ``epoch`` on ``n`` peers."""
    tau = _period(n)
    offsets: list[int] = []
    for j in range(k):
        offset = 2 ** ((epoch * k + j) % tau) % n
        if offset and offset not in offsets:
            offsets.append(offset)
    spare = iter(o for o in range(1, n) if o not in offsets)
    while len(offsets) < min(k, n - 1):  # k > tau: more neighbours than powers of two
        offsets.append(next(spare))
    return offsets


def _natted_edges(order: Sequence[str], public: Collection[str], k: int) -> int:
    n = len(order)
    natted = [m not in public for m in order]
    count = 0
    for epoch in range(_period(n)):
        for offset in exponential_offsets(n, epoch, k):
            count += sum(natted[i] and natted[(i + offset) % n] for i in range(n))
    return count


def circle(members: Collection[str], seed: int, k: int,
           public: Collection[str] = ()) -> list[str]:
    """The exponential graph's fixed order: of :data:`ORDER_CANDIDATES` seeded shuffles, the
    one with the fewest edges between two NATed peers (the first on a tie)."""
    base = sorted(set(members))
    best: list[str] = []
    best_score = -1
    for candidate in range(ORDER_CANDIDATES):
        order = list(base)
        random.Random(seed * 1_000_003 + 7919 * candidate).shuffle(order)
        score = _natted_edges(order, public, k)
        if best_score < 0 or score < best_score:
            best, best_score = order, score
        if not public:
            break  # every order scores the same
    return best


def neighbours(members: Sequence[str], me: str, epoch: int, fanout: int | None, seed: int,
               *, graph: str = "exponential", public: Collection[str] = ()
               ) -> tuple[list[str], list[str]]:
    """(send to, expect from) for ``me`` in ``epoch``; ``fanout`` None or >= n-1: everyone.
    ``members`` may or may not include ``me``; ``public``: members with a verified address."""
    others = sorted(m for m in set(members) if m != me)
    if fanout is None or fanout >= len(others):
        return others, others
    if fanout < 1:
        raise ValueError(f"fanout must be at least 1, got {fanout}")
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, not {graph!r}")
    everyone = sorted([*others, me])
    n = len(everyone)
    if graph == "ring":
        order = list(everyone)
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        offsets = list(range(1, fanout + 1))
    else:
        order = circle(everyone, seed, fanout, public)
        offsets = exponential_offsets(n, epoch, fanout)
    pos = order.index(me)
    send_to = [order[(pos + o) % n] for o in offsets]
    expect_from = [order[(pos - o) % n] for o in offsets]
    return send_to, expect_from
