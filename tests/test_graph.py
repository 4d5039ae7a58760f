"""The fan-out graphs (learner.graph): consistent (everyone waits for exactly who sends to it),
linear in traffic, fast mixing on the exponential graph (log2 N epochs against ~N/2k on the
ring), and fewer links between two NATed peers when the order can avoid them."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from learner.graph import circle, exponential_offsets, neighbours


def _plans(members: list[str], epoch: int, k: int, graph: str,
           public: set[str] | None = None) -> dict[str, tuple[list[str], list[str]]]:
    return {m: neighbours(members, m, epoch, k, 42, graph=graph, public=public or set())
            for m in members}


@pytest.mark.parametrize("graph", ["exponential", "ring"])
@pytest.mark.parametrize("n,k", [(5, 1), (8, 2), (12, 3), (9, 5)])
def test_every_peer_waits_for_exactly_its_senders(graph: str, n: int, k: int) -> None:
    members = [f"p{i:02d}" for i in range(n)]
    for epoch in range(1, 7):
        plans = _plans(members, epoch, k, graph)
        sent: Counter[tuple[str, str]] = Counter()
        for me, (send_to, expect_from) in plans.items():
            assert len(send_to) == len(set(send_to)) == len(expect_from) == k
            assert me not in send_to
            sent.update((me, t) for t in send_to)
        for me, (_, expect_from) in plans.items():
            assert sorted(expect_from) == sorted(s for s, t in sent if t == me)
        assert sum(sent.values()) == n * k and max(sent.values()) == 1


def _epochs_to_spread(members: list[str], k: int, graph: str, limit: int = 64) -> int:
    """Epochs until every peer's model has (transitively) reached every other peer."""
    reach = {m: {m} for m in members}
    for epoch in range(1, limit + 1):
        new = {m: set(r) for m, r in reach.items()}
        for me, (send_to, _) in _plans(members, epoch, k, graph).items():
            for target in send_to:
                new[target] |= reach[me]
        reach = new
        if all(len(r) == len(members) for r in reach.values()):
            return epoch
    return limit + 1


@pytest.mark.parametrize("n", [8, 12, 16, 32])
def test_the_exponential_graph_spreads_a_model_in_log2_n_epochs(n: int) -> None:
    members = [f"p{i:02d}" for i in range(n)]
    exponential = _epochs_to_spread(members, 1, "exponential")
    ring = _epochs_to_spread(members, 1, "ring")
    assert exponential <= math.ceil(math.log2(n)) + 1, exponential
    assert exponential < ring, (exponential, ring)  # the ring takes ~n/2 epochs


def test_offsets_are_distinct_powers_of_two_and_fill_up_past_them() -> None:
    assert exponential_offsets(8, 0, 1) == [1]
    assert [exponential_offsets(8, e, 1)[0] for e in range(6)] == [1, 2, 4, 1, 2, 4]
    assert sorted(exponential_offsets(8, 0, 3)) == [1, 2, 4]
    assert sorted(exponential_offsets(5, 0, 4)) == [1, 2, 3, 4]  # k > log2 n: the rest too


def test_the_order_avoids_links_between_two_natted_peers() -> None:
    members = [f"p{i:02d}" for i in range(12)]
    public = {"p00", "p01", "p02", "p03", "p04", "p05"}

    def natted_links(order_public: set[str]) -> int:
        count = 0
        for epoch in range(4):  # one period on 12 peers
            for me, (send_to, _) in _plans(members, epoch, 1, "exponential",
                                           order_public).items():
                count += sum(me not in public and t not in public for t in send_to)
        return count

    # the order chosen knowing who is public has fewer NATed-NATed links than one chosen blind
    assert natted_links(public) < natted_links(set())
    # and every peer computes the same circle whatever order it lists the members in
    assert circle(members, 3, 1, public) == circle(list(reversed(members)), 3, 1, public)


def test_refusals() -> None:
    with pytest.raises(ValueError, match="fanout"):
        neighbours(["a", "b", "c"], "a", 1, 0, 1)
    with pytest.raises(ValueError, match="graph"):
        neighbours(["a", "b", "c"], "a", 1, 1, 1, graph="star")
