"""A real swarm on loopback: a rendezvous and peers as separate processes, training on the
offline digits and exchanging models over ZeroMQ."""

from __future__ import annotations

import time

import pytest

from testkit.swarm import LocalSwarm

pytestmark = pytest.mark.slow


def _ids(swarm: LocalSwarm, nums: range | list[int]) -> dict[int, str]:
    return {n: swarm.events(n, "start")[0]["peer_id"] for n in nums}


def _assert_exit_ok(codes: dict[int, int | None]) -> None:
    assert all(code == 0 for code in codes.values()), f"exit codes {codes}"


def test_three_peers_merge_both_others_every_epoch(swarm: LocalSwarm) -> None:
    swarm.start_rendezvous()
    for num in range(3):
        swarm.start_peer(num, 3, 2)
    _assert_exit_ok(swarm.wait_peers(600))
    ids = _ids(swarm, range(3))
    assert len(set(ids.values())) == 3
    for num in range(3):
        epochs = swarm.events(num, "epoch")
        assert [e["epoch"] for e in epochs] == [1, 2]
        others = {ids[m] for m in range(3) if m != num}
        for record in epochs:
            assert set(record["merged_from"]) == others, (num, record)
            assert set(record["merged_epochs"].values()) == {record["epoch"]}
        assert epochs[-1]["models_received"] == 4
        assert epochs[-1]["bytes_sent"] > 2 * 2 * 4_000_000  # 2 epochs x 2 peers x 4.8 MB
        assert epochs[-1]["acc_after"] > 90.0


def test_late_joiner_starts_from_the_swarm_average(swarm: LocalSwarm) -> None:
    swarm.start_rendezvous()
    for num in range(3):
        swarm.start_peer(num, 4, 4)
    assert swarm.wait_for(lambda: all(swarm.events(n, "epoch") for n in range(3)), 400)
    swarm.start_peer(3, 4, 2)
    _assert_exit_ok(swarm.wait_peers(900))
    ids = _ids(swarm, range(4))
    fresh = [swarm.events(n, "start")[0] for n in range(3)]
    late = swarm.events(3, "start")[0]
    assert all(not s["bootstrapped_from"] for s in fresh)
    assert set(late["bootstrapped_from"]) == {ids[n] for n in range(3)}
    # a fresh model is at chance level (~10 %); the newcomer starts near the swarm's level
    assert late["accuracy"] > max(s["accuracy"] for s in fresh) + 50, (late, fresh)
    first = swarm.events(3, "epoch")[0]
    assert first["epoch"] == late["epoch"] + 1 >= 2
    # its first "before averaging" test is far above what a fresh model scores
    assert first["acc_before"] > max(s["accuracy"] for s in fresh) + 50, (first, fresh)
    # and the incumbents took the newcomer's model into their average
    merged_late = [e for n in range(3) for e in swarm.events(n, "epoch")
                   if ids[3] in e["merged_from"]]
    assert merged_late


def test_sigkilled_peer_is_dropped_within_the_ttl(swarm: LocalSwarm) -> None:
    ttl = 3.0
    swarm.start_rendezvous(ttl=ttl, heartbeat=1.0)
    for num in range(3):
        swarm.start_peer(num, 3, 4)
    assert swarm.wait_for(lambda: bool(swarm.events(2, "epoch")), 400)
    killed_at = time.time()
    swarm.kill(2)
    _assert_exit_ok(swarm.wait_peers(900, [0, 1]))
    ids = _ids(swarm, range(3))
    for num in (0, 1):
        left = [e for e in swarm.events(num, "left") if e["peer_id"] == ids[2]]
        assert left, f"peer {num} never heard that peer 2 left"
        assert left[0]["t"] - killed_at <= ttl + 2.0, left[0]["t"] - killed_at
        epochs = swarm.events(num, "epoch")
        assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]  # kept training
        survivor = ids[1 - num]
        assert epochs[-1]["merged_from"] == [survivor]


def test_restarted_peer_resumes_from_its_checkpoint(swarm: LocalSwarm) -> None:
    swarm.start_rendezvous(ttl=3.0, heartbeat=1.0)
    for num in range(2):
        swarm.start_peer(num, 2, 4)
    assert swarm.wait_for(lambda: any(e["epoch"] >= 2 for e in swarm.events(1, "epoch")), 400)
    swarm.kill(1)
    swarm.start_peer(1, 2, 4)  # the same command again: same key, same checkpoint file
    _assert_exit_ok(swarm.wait_peers(900))
    first, second = swarm.events(1, "start")
    assert not first["resumed"] and second["resumed"]
    assert second["epochs_trained"] >= 2 and second["accuracy"] > 85.0  # not from scratch
    after_restart = [e for e in swarm.events(1, "epoch") if e["t"] > second["t"]]
    assert [e["epoch"] for e in after_restart] == list(
        range(second["epoch"] + 1, second["epoch"] + 1 + 4 - second["epochs_trained"]))
    assert swarm.events(1, "done")[-1]["epochs_trained"] == 4
    # the other peer kept training and merged the restarted peer's models again
    assert [e["epoch"] for e in swarm.events(0, "epoch")] == [1, 2, 3, 4]
    assert swarm.events(0, "epoch")[-1]["merged_from"] == [second["peer_id"]]
