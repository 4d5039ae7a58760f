"""Peers behind real NATs (network namespaces, nftables) training together: WebRTC through
port-restricted NATs, through coturn between symmetric NATs, and a mixed swarm with a public
ZeroMQ peer. The rendezvous (with its STUN server) and coturn run on the lab's "internet"."""

from __future__ import annotations

import pytest

from testkit.fixtures import LabSwarm
from testkit.natlab import NatType
from testkit.swarm import LocalSwarm

pytestmark = pytest.mark.slow

EPOCHS = 2


def _run(swarm: LocalSwarm, peers: list[tuple[object, str | None]]) -> dict[int, str]:
    """Start peers (host, listen address) with a shard each; wait; their peer ids."""
    for num, (host, listen) in enumerate(peers):
        swarm.start_peer(num, len(peers), EPOCHS, "--merge-wait", "120", host=host,  # type: ignore[arg-type]
                         listen=listen)
    codes = swarm.wait_peers(900)
    assert all(code == 0 for code in codes.values()), f"exit codes {codes}"
    return {n: swarm.events(n, "start")[0]["peer_id"] for n in range(len(peers))}


def _links(swarm: LocalSwarm, num: int) -> dict[str, str]:
    return {e["peer_id"]: e["kind"] for e in swarm.events(num, "link")}


def _assert_everyone_merged_everyone(swarm: LocalSwarm, ids: dict[int, str]) -> None:
    for num in ids:
        others = {pid for n, pid in ids.items() if n != num}
        epochs = swarm.events(num, "epoch")
        assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
        for record in epochs:
            assert set(record["merged_from"]) == others, (num, record)


def test_two_port_restricted_nats_connect_directly(lab_services: LabSwarm) -> None:
    lab, swarm = lab_services.lab, lab_services.swarm
    homes = [lab.add_home(f"h{i}", NatType.PORT_RESTRICTED) for i in range(2)]
    ids = _run(swarm, [(home.host, None) for home in homes])
    for num in range(2):
        assert _links(swarm, num) == {ids[1 - num]: "webrtc-direct"}
    _assert_everyone_merged_everyone(swarm, ids)


def test_two_symmetric_nats_connect_through_turn(lab_services: LabSwarm) -> None:
    lab, swarm = lab_services.lab, lab_services.swarm
    homes = [lab.add_home(f"s{i}", NatType.SYMMETRIC) for i in range(2)]
    ids = _run(swarm, [(home.host, None) for home in homes])
    for num in range(2):
        assert _links(swarm, num) == {ids[1 - num]: "webrtc-relay"}
    _assert_everyone_merged_everyone(swarm, ids)


def test_mixed_swarm_public_zmq_peer_and_two_natted_peers(lab_services: LabSwarm) -> None:
    lab, swarm = lab_services.lab, lab_services.swarm
    public = lab.add_public_host("pub")
    cone = lab.add_home("pr", NatType.PORT_RESTRICTED)
    sym = lab.add_home("sy", NatType.SYMMETRIC)
    ids = _run(swarm, [(public, f"{public.ip}:6000"), (cone.host, None), (sym.host, None)])
    # towards the public peer everyone uses ZeroMQ; the public peer reaches the NATed ones
    # over WebRTC, directly (its own address needs no punching); the two NATed peers need
    # the relay (symmetric x port-restricted)
    assert _links(swarm, 0) == {ids[1]: "webrtc-direct", ids[2]: "webrtc-direct"}
    assert _links(swarm, 1)[ids[0]] == "zmq"
    assert _links(swarm, 2)[ids[0]] == "zmq"
    assert _links(swarm, 1)[ids[2]] == "webrtc-relay"
    assert _links(swarm, 2)[ids[1]] == "webrtc-relay"
    _assert_everyone_merged_everyone(swarm, ids)


def test_codec_auto_picks_per_link_kind(lab_services: LabSwarm) -> None:
    """--codec auto in one swarm: raw to the public peer over ZeroMQ, int8 through the relay
    between the two NATed peers that need it (symmetric x port-restricted)."""
    lab, swarm = lab_services.lab, lab_services.swarm
    public = lab.add_public_host("pub")
    cone = lab.add_home("pr", NatType.PORT_RESTRICTED)
    sym = lab.add_home("sy", NatType.SYMMETRIC)
    peers = [(public, f"{public.ip}:6000"), (cone.host, None), (sym.host, None)]
    for num, (host, listen) in enumerate(peers):
        swarm.start_peer(num, len(peers), 3, "--merge-wait", "120", "--codec", "auto",
                         host=host, listen=listen)  # type: ignore[arg-type]
    codes = swarm.wait_peers(900)
    assert all(code == 0 for code in codes.values()), f"exit codes {codes}"
    ids = {n: swarm.events(n, "start")[0]["peer_id"] for n in range(len(peers))}
    for num in (1, 2):  # the NATed peers, in the last epoch (every link up by then)
        last = swarm.events(num, "epoch")[-1]
        other = ids[3 - num]
        assert _links(swarm, num)[other] == "webrtc-relay"
        assert last["codecs"][ids[0]] == "raw" and last["codecs"][other] == "int8", last
        assert last["bytes_saved"] > 0
        codecs = {e["codec"] for e in swarm.events(num, "sending")}
        assert {"raw", "int8"} <= codecs, codecs
