"""The NAT lab builds real NATs: mappings and filtering seen by UDP reflectors in namespaces.

Needs root, iproute2 and nftables (coturn for the TURN test); skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit import natlab
from testkit.fixtures import nat_lab, skip_unless_lab
from testkit.natlab import Host, NatLab, NatType

QUIET = 0.5  # how long an unsolicited datagram gets to (not) arrive

pytestmark = pytest.mark.timeout(60)


@dataclass
class World:
    lab: NatLab
    r1: Host
    r2: Host
    stranger: Host


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with nat_lab() as lab:
        r1, r2, stranger = (lab.add_public_host(n) for n in ("r1", "r2", "stranger"))
        lab.reflector(r1, 7000)
        lab.reflector(r2, 7000)
        yield World(lab, r1, r2, stranger)


def _home(world: World, nat: NatType) -> natlab.Home:
    name = nat.value.replace("-", "")[:12]
    return world.lab.homes.get(name) or world.lab.add_home(name, nat)


def test_port_restricted_keeps_one_mapping_and_filters_strangers(world: World) -> None:
    home = _home(world, NatType.PORT_RESTRICTED)
    inner = world.lab.udp_agent(home.host)
    m1 = inner.mapped(world.r1.ip, 7000)
    m2 = inner.mapped(world.r2.ip, 7000)
    assert m1 == m2 == (home.public_ip, inner.port)  # endpoint-independent, port kept

    stranger = world.lab.udp_agent(world.stranger)
    stranger.send(*m1, b"unsolicited")
    assert inner.recv(QUIET) is None
    # Same address as a contacted reflector, other port: still filtered (port-restricted).
    other = world.lab.udp_agent(world.r1)
    other.send(*m1, b"other port")
    assert inner.recv(QUIET) is None
    # Once the inner host has sent to the stranger, the stranger gets in on the same mapping.
    inner.send(world.stranger.ip, stranger.port, b"punch")
    assert stranger.recv(2.0) == (b"punch", *m1)
    stranger.send(*m1, b"welcome")
    assert inner.recv(2.0) == (b"welcome", world.stranger.ip, stranger.port)


def test_symmetric_maps_each_destination_to_a_new_port(world: World) -> None:
    home = _home(world, NatType.SYMMETRIC)
    inner = world.lab.udp_agent(home.host)
    m1 = inner.mapped(world.r1.ip, 7000)
    m2 = inner.mapped(world.r2.ip, 7000)
    assert m1[0] == m2[0] == home.public_ip
    assert m1[1] != m2[1]
    assert inner.mapped(world.r1.ip, 7000) == m1  # stable per destination

    world.lab.udp_agent(world.stranger).send(*m1, b"unsolicited")
    assert inner.recv(QUIET) is None


def test_full_cone_lets_anyone_in(world: World) -> None:
    home = _home(world, NatType.FULL_CONE)
    inner = world.lab.udp_agent(home.host)
    m1 = inner.mapped(world.r1.ip, 7000)
    assert inner.mapped(world.r2.ip, 7000) == m1 == (home.public_ip, inner.port)

    stranger = world.lab.udp_agent(world.stranger)
    stranger.send(*m1, b"unsolicited")
    assert inner.recv(2.0) == (b"unsolicited", world.stranger.ip, stranger.port)


def test_address_restricted_admits_contacted_addresses_only(world: World) -> None:
    home = _home(world, NatType.ADDRESS_RESTRICTED)
    inner = world.lab.udp_agent(home.host)
    m1 = inner.mapped(world.r1.ip, 7000)
    assert m1 == (home.public_ip, inner.port)

    other = world.lab.udp_agent(world.r1)  # contacted address, another port: gets in
    other.send(*m1, b"same ip")
    assert inner.recv(2.0) == (b"same ip", world.r1.ip, other.port)
    world.lab.udp_agent(world.stranger).send(*m1, b"unsolicited")
    assert inner.recv(QUIET) is None


def test_router_drops_unsolicited_packets_to_itself(world: World) -> None:
    """Trap 1: a router's input chain drops what is not for an existing flow."""
    home = _home(world, NatType.PORT_RESTRICTED)
    listener = world.lab.udp_agent(home.router, 5000)
    world.lab.udp_agent(world.stranger).send(home.public_ip, 5000, b"to the router")
    assert listener.recv(QUIET) is None
    rules = home.router.check_output(["nft", "list", "chain", "ip", "natlab", "input"])
    assert "policy drop" in rules


def test_loss_drops_packets_on_the_wan(world: World) -> None:
    home = _home(world, NatType.PORT_RESTRICTED)
    inner = world.lab.udp_agent(home.host)
    world.lab.loss(home, 100)
    try:
        assert inner.ask(world.r1.ip, 7000, timeout=0.6) is None
    finally:
        world.lab.loss(home, 0)
    assert inner.ask(world.r1.ip, 7000) is not None


def test_teardown_removes_everything_even_when_the_body_raises(tmp_path: Path) -> None:
    skip_unless_lab()
    links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    with pytest.raises(RuntimeError, match="boom"), NatLab(state_dir=tmp_path) as lab:
        home = lab.add_home("home", NatType.SYMMETRIC)
        pub = lab.add_public_host("pub")
        agent = lab.udp_agent(pub)
        sleeper = home.host.run(["sleep", "600"])
        namespaces = list(lab.namespaces)
        state = json.loads((tmp_path / f"{lab.name}.json").read_text())
        assert set(state["namespaces"]) == set(namespaces)
        raise RuntimeError("boom")
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ns for ns in namespaces if ns in left.split()]
    assert not [line for line in left.splitlines() if line.startswith(lab.name)]
    links_after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert links_after.count("\n") == links_before.count("\n")
    assert sleeper.poll() is not None and agent._proc.poll() is not None
    assert not (tmp_path / f"{lab.name}.json").exists()
    lab.close()  # idempotent


def test_cli_up_and_down() -> None:
    skip_unless_lab()
    name = f"plabcli{secrets.token_hex(2)}"
    run = [sys.executable, "-m", "testkit.natlab"]
    up = subprocess.run([*run, "up", "--name", name, "--homes", "full-cone", "--public", "1"],
                        capture_output=True, text=True, timeout=30)
    try:
        assert up.returncode == 0, up.stderr
        assert f"ip netns exec {name}-home1 bash" in up.stdout
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"{name}-gw-home1" in netns and f"{name}-pub1" in netns
    finally:
        down = subprocess.run([*run, "down", name], capture_output=True, text=True, timeout=30)
    assert down.returncode == 0, down.stderr
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in netns


def test_coturn_answers_stun_from_behind_a_nat() -> None:
    with nat_lab(coturn=True) as lab:
        turn = lab.add_server("turn")
        home = lab.add_home("home", NatType.PORT_RESTRICTED)
        proc = lab.start_coturn(turn, "s3cret", min_port=49160, max_port=49170)
        assert proc.popen.poll() is None
        mapped = home.host.stun_binding(turn.ip)
        assert mapped is not None and mapped[0] == home.public_ip
    assert proc.popen.poll() is not None  # stopped with the lab


def test_available_gives_a_reason_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = natlab.available.__wrapped__(coturn=False)
    assert reason is not None and "root" in reason


def test_partial_loss_drops_some_packets_each_way_and_counts_them(world: World) -> None:
    home = _home(world, NatType.PORT_RESTRICTED)
    inner = world.lab.udp_agent(home.host)
    assert world.lab.loss_dropped(home) == {"in": 0, "out": 0}
    world.lab.loss(home, 50)
    try:
        for _ in range(200):
            inner.send(world.r1.ip, 7000)
        replies = 0
        while inner.recv(QUIET) is not None:
            replies += 1
        dropped = world.lab.loss_dropped(home)
    finally:
        world.lab.loss(home, 0)
    # 200 requests, half lost on the way out, half of the replies on the way back: about 50
    # come back (binomial, sd 6); the counters saw both directions
    assert 10 < replies < 110, replies
    assert dropped["out"] + replies + dropped["in"] == 200, (dropped, replies)
    assert dropped["in"] > 0 and dropped["out"] > 0
    assert world.lab.loss_dropped(home) == {"in": 0, "out": 0}  # rule removed
    assert inner.ask(world.r1.ip, 7000) is not None
