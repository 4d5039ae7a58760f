"""The lab's emulated links (the wire) against their settings: RTT, rate, loss, jitter, queue,
FIFO order, the wire's CPU cost, teardown and the CLI. Real namespaces, TAPs and sockets.

Needs root, iproute2, nftables, a C compiler and /dev/net/tun; skips with the reason otherwise
(the profile and argument checks at the top run everywhere).
"""

from __future__ import annotations

import math
import secrets
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit.fixtures import nat_lab, skip_unless_lab
from testkit.natlab import PROFILES, Home, Host, LinkProfile, NatLab, NatLabError, NatType
from testkit.natlab.links import wire_binary
from testkit.natlab.probe import tcp_goodput, udp_delivery, udp_rtt

pytestmark = pytest.mark.timeout(120)

D25 = LinkProfile("d25", 50, 50, 25)
RATE20 = LinkProfile("r20", 20, 20, 10)
LOSSY = LinkProfile("lossy", 50, 50, 2, loss_pct=5)
JITTERY = LinkProfile("jittery", 50, 50, 20, jitter_ms=10)
NARROW = LinkProfile("narrow", 1, 1, 2)


# -- profiles and arguments (no lab needed) ----------------------------------------------------


def test_named_profiles_are_the_issues() -> None:
    assert {n: (p.up_mbit, p.down_mbit, p.delay_ms, p.jitter_ms, p.loss_pct)
            for n, p in PROFILES.items()} == {
        "fiber": (100, 100, 5, 0, 0), "cable": (20, 100, 20, 0, 0.05),
        "dsl": (5, 25, 30, 0, 0.2), "mobile": (10, 30, 40, 10, 1), "far": (50, 50, 75, 0, 0)}


@pytest.mark.parametrize(("kw", "message"), [
    ({"up_mbit": 0}, "up_mbit must be > 0"),
    ({"down_mbit": -1}, "down_mbit must be > 0"),
    ({"delay_ms": -1}, "delay_ms must be"),
    ({"jitter_ms": 30}, "jitter_ms must be 0..delay_ms"),
    ({"loss_pct": 101}, "loss_pct must be 0..100"),
])
def test_bad_profiles_are_refused(kw: dict[str, float], message: str) -> None:
    args = {"up_mbit": 10.0, "down_mbit": 10.0, "delay_ms": 20.0, **kw}
    with pytest.raises(ValueError, match=message):
        LinkProfile("bad", **args)


def test_queue_is_a_bandwidth_delay_product_with_a_floor() -> None:
    assert PROFILES["cable"].queue_bytes(100) == int(100e6 / 8 * 4 * 0.020)  # 1 MB
    assert PROFILES["fiber"].queue_bytes(1) == 64 * 1024


def test_the_wire_refuses_bad_arguments(tmp_path: Path) -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (apt-get install gcc)")
    binary = wire_binary()
    bad = subprocess.run([str(binary), "--a-netns", "/nonexistent", "--a-if", "x", "--b-netns",
                          "/nonexistent", "--b-if", "y", "--up", "1,2,3", "--down", "1,0,0,0,0",
                          "--stats", str(tmp_path / "s")], capture_output=True, text=True)
    assert bad.returncode == 2 and "bad direction spec 1,2,3" in bad.stderr
    usage = subprocess.run([str(binary)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: wire" in usage.stderr


# -- in a lab -------------------------------------------------------------------------------


@dataclass
class World:
    lab: NatLab
    server: Host   # unshaped
    a: Host        # 25 ms one-way each
    b: Host
    home: Home     # 25 ms, behind a NAT


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with nat_lab(profile=D25) as lab:
        server = lab.add_server("server")
        a, b = lab.add_public_host("a"), lab.add_public_host("b")
        home = lab.add_home("home", NatType.PORT_RESTRICTED)
        yield World(lab, server, a, b, home)


def _within(measured: float, expected: float, tolerance: float = 0.10) -> bool:
    return abs(measured - expected) <= tolerance * expected


def test_rtt_between_two_delayed_hosts_is_twice_both_delays(world: World) -> None:
    rtts = udp_rtt(world.a, world.b, 20)
    assert len(rtts) == 20
    assert _within(statistics.median(rtts), 2 * (0.025 + 0.025)), rtts  # 100 ms
    assert min(rtts) >= 0.100  # the delay is a floor: nothing arrives early
    for name in ("a", "b"):  # the wire releases frames on time (mean lateness well under 1 ms)
        for direction in world.lab.link_stats(name).values():
            assert direction["packets"] >= 20
            assert direction["late_ns"] / direction["packets"] < 1e6, direction


def test_rtt_from_behind_a_nat_to_an_unshaped_server(world: World) -> None:
    assert world.lab.profile_of("server") is None and world.lab.profile_of("home") is D25
    rtts = udp_rtt(world.home.host, world.server, 20)
    assert _within(statistics.median(rtts), 0.050), rtts
    # and to a delayed host, through its forward-less NAT from outside: via a probe forward
    assert _within(statistics.median(udp_rtt(world.a, world.home.host, 10)), 0.100)
    rules = world.home.router.check_output(["nft", "list", "ruleset"])
    assert "natlab_probe" not in rules and "dport" not in rules  # the temporary forward is gone


def test_tcp_bulk_fills_the_set_rate_and_the_wire_is_cheap() -> None:
    with nat_lab(profile=RATE20) as lab:
        server = lab.add_server("server")
        pub = lab.add_public_host("pub")
        wire = lab.wires["pub"]
        cpu_before = wire.cpu_times()
        rate = RATE20.up_mbit / 8  # MB/s of IP packets
        got = tcp_goodput(pub, server, int(rate * 1e6 * 3))
        stats = lab.link_stats("pub")
        user = wire.cpu_times()[0] - cpu_before[0]
    assert got >= 0.9 * rate, got
    assert got <= rate  # the limit holds: payload cannot beat the IP rate
    assert stats["up"]["dropped_loss"] == 0 and stats["down"]["dropped_loss"] == 0
    packets = stats["up"]["rx_packets"] + stats["down"]["rx_packets"]
    assert packets > 5000
    # its own CPU per packet (clock ticks of 10 ms: a generous bound) — not the bottleneck
    assert user / packets < 20e-6, (user, packets)


def test_bbr_is_set_per_socket(world: World) -> None:
    assert tcp_goodput(world.a, world.server, 500_000, cc="bbr") > 0
    with pytest.raises(NatLabError, match="'nosuchcc' is not available"):
        tcp_goodput(world.a, world.server, 1000, cc="nosuchcc")


def test_tcp_between_two_homes_through_their_nats() -> None:
    with nat_lab(profile=LinkProfile("h", 50, 50, 2)) as lab:
        h1 = lab.add_home("h1", NatType.SYMMETRIC)
        h2 = lab.add_home("h2", NatType.PORT_RESTRICTED)
        assert tcp_goodput(h1.host, h2.host, 2_000_000) > 1.0
        assert lab.link_stats("h1")["up"]["bytes"] > 2_000_000
        assert lab.link_stats("h2")["down"]["bytes"] > 2_000_000


def test_loss_is_bernoulli_within_statistical_bounds() -> None:
    skip_unless_lab(links=True)
    with nat_lab() as lab:
        server = lab.add_server("server")
        pub = lab.add_public_host("pub", profile=LOSSY)
        n, p = 4000, LOSSY.loss_pct / 100
        arrived = udp_delivery(pub, server, n, gap=0.0003, size=100)
        up = lab.link_stats("pub")["up"]
    sd = math.sqrt(n * p * (1 - p))  # 13.8 datagrams
    assert abs((n - arrived) - n * p) <= 5 * sd, arrived
    # every frame read was either delivered or dropped, and the drops were the random ones
    assert up["rx_packets"] == up["packets"] + up["dropped_loss"] + up["dropped_queue"]
    assert up["dropped_queue"] == 0 and up["dropped_loss"] >= n - arrived


def test_jitter_spreads_rtts_but_keeps_packets_in_order() -> None:
    skip_unless_lab(links=True)
    with nat_lab() as lab:
        server = lab.add_server("server")
        pub = lab.add_public_host("pub", profile=JITTERY)
        rtts = [r * 1000 for r in udp_rtt(pub, server, 40)]
        # two independent uniform +-10 ms: sd 8.2 ms, range 20..60 ms around 40
        assert 4.0 <= statistics.pstdev(rtts) <= 12.0, rtts
        assert min(rtts) >= 20.0 and max(rtts) <= 62.0, rtts
        assert _within(statistics.median(rtts), 40.0, 0.15), rtts
        sender, receiver = lab.udp_agent(pub), lab.udp_agent(server)
        for i in range(100):
            sender.send(server.ip, receiver.port, i.to_bytes(2, "big"))
        got = []
        while (d := receiver.recv(1.0)) is not None:
            got.append(int.from_bytes(d.data, "big"))
    assert got == list(range(100))  # FIFO: jitter never reorders


def test_a_full_queue_tail_drops_and_holds_the_rate() -> None:
    skip_unless_lab(links=True)
    with nat_lab() as lab:
        server = lab.add_server("server")
        pub = lab.add_public_host("pub", profile=NARROW)
        # 2000 x 1000 bytes at 8 Mbit/s into a 1 Mbit/s link with a 64 KB queue
        arrived = udp_delivery(pub, server, 2000, gap=0.001, size=1000, settle=1.0)
        up = lab.link_stats("pub")["up"]
    assert up["dropped_queue"] > 1000 and up["dropped_loss"] == 0
    assert up["backlog_max_bytes"] <= NARROW.queue_bytes(1)
    # 2 s of sending plus the 64 KB queue draining: about 0.3 MB at 1 Mbit/s, not 2 MB
    assert 150 <= arrived <= 420, arrived


def test_close_stops_the_wires_and_leaves_no_interfaces(tmp_path: Path) -> None:
    skip_unless_lab(links=True)
    links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    with NatLab(state_dir=tmp_path, profile="fiber") as lab:
        lab.add_home("home")
        lab.add_public_host("pub")
        wires = list(lab.wires.values())
        assert {w.name for w in wires} == {"home", "pub"}
        state = (tmp_path / f"{lab.name}.json").read_text()
        assert all(f'"pid": {w.pid}' in state for w in wires)
        assert "wan" in lab.homes["home"].router.check_output(["ip", "-o", "link"])
        with pytest.raises(ValueError, match="no emulated link for 'nobody'"):
            lab.link_stats("nobody")
    assert all(w.popen.returncode == 0 for w in wires)  # exited cleanly on SIGTERM
    links_after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert links_after.count("\n") == links_before.count("\n")


def test_bad_probe_and_profile_inputs(world: World) -> None:
    with pytest.raises(ValueError, match="no link profile 'adsl'; named profiles: fiber"):
        world.lab.add_home("x", profile="adsl")
    with pytest.raises(ValueError, match="count must be >= 1"):
        udp_rtt(world.a, world.b, 0)
    with pytest.raises(ValueError, match="nbytes must be >= 1"):
        tcp_goodput(world.a, world.b, 0)


def test_cli_up_with_profiles_status_and_down() -> None:
    skip_unless_lab(links=True)
    name = f"plabln{secrets.token_hex(2)}"
    cli = [sys.executable, "-m", "testkit.natlab"]
    up = subprocess.run([*cli, "up", "--name", name, "--homes", "port-restricted,symmetric",
                         "--public", "1", "--profile", "dsl", "--home-profile", "home2=mobile"],
                        capture_output=True, text=True, timeout=60)
    try:
        assert up.returncode == 0, up.stderr
        assert "link dsl: 5/25 Mbit/s, 30 ms, 0.2 % loss" in up.stdout
        assert "link mobile: 10/30 Mbit/s, 40 ms ± 10, 1 % loss" in up.stdout
        status = subprocess.run([*cli, "status", name], capture_output=True, text=True,
                                timeout=30)
        assert status.returncode == 0, status.stderr
        assert "link veth (none)" in status.stdout  # the rendezvous server
        assert status.stdout.count("link dsl") == 2 and "up   " in status.stdout
        pids = [int(w.split()[0]) for w in status.stdout.split("wire pid ")[1:]]
        assert len(pids) == 3
    finally:
        down = subprocess.run([*cli, "down", name], capture_output=True, text=True, timeout=30)
    assert down.returncode == 0, down.stderr
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]
    bad = subprocess.run([*cli, "up", "--name", name, "--home-profile", "home9=dsl"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "names no such home: home9" in bad.stderr


@pytest.mark.slow
def test_cli_verify_passes_for_mobile() -> None:
    skip_unless_lab(links=True)
    out = subprocess.run([sys.executable, "-m", "testkit.natlab", "verify", "--profile",
                          "mobile", "--seconds", "2"], capture_output=True, text=True,
                         timeout=110)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"ok": true' in out.stdout.splitlines()[-1]
