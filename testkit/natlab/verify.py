"""Verify the link emulator against its settings: ``python -m testkit.natlab verify --profile
cable`` builds a lab, measures RTT, jitter, TCP goodput each way, loss and the wire's CPU cost
with the probes of :mod:`testkit.natlab.probe`, and prints measured against set values.

Topology: ``ref`` is an unshaped server; ``pub`` a public host and ``home`` a NATed home with
the profile; ``clean`` a public host with the profile's rates and delay but no loss or jitter,
for the rate checks (a random loss keeps a single TCP flow well below any rate).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from testkit.natlab.lab import NatLab
from testkit.natlab.links import LinkProfile, Wire, resolve_profile
from testkit.natlab.probe import tcp_transfer, udp_delivery, udp_rtt

RTT_TOLERANCE = 0.10
"""An RTT median within 10 % of the set one (issue 11)."""
RATE_FRACTION = 0.90
"""TCP bulk reaches at least 90 % of the set rate with no loss (issue 11)."""
MAX_USER_US_PER_PACKET = 20.0
"""The wire's own (user) CPU per packet: 20 us would still carry 100 Mbit/s each way on one
core with room to spare."""


@dataclass(frozen=True)
class Check:
    """One measured quantity against its set value."""

    quantity: str
    unit: str
    expected: float
    measured: float
    ok: bool
    bound: str

    def line(self) -> str:
        ratio = self.measured / self.expected if self.expected else float("nan")
        return (f"{self.quantity:<40} {self.expected:>10.3f} {self.measured:>10.3f} {self.unit:<5}"
                f" {ratio:>6.3f}  {'ok ' if self.ok else 'BAD'} {self.bound}")


def _rtt_check(what: str, rtts: list[float], expected_ms: float) -> Check:
    median = statistics.median(rtts) * 1000 if rtts else float("nan")
    return Check(f"RTT {what} (median)", "ms", expected_ms, median,
                 abs(median - expected_ms) <= RTT_TOLERANCE * expected_ms,
                 f"±{RTT_TOLERANCE:.0%}")


def verify(profile: LinkProfile | str, *, seconds: float = 3.0, rtt_count: int = 30,
           loss_count: int = 20000, report: Callable[[Check], None] | None = None
           ) -> list[Check]:
    """Measure a lab with ``profile`` (see the module doc); every :class:`Check` made, in
    order (``report`` is called with each as soon as it is known)."""
    prof = resolve_profile(profile)
    if prof is None:
        raise ValueError("verify needs a link profile")
    if seconds <= 0 or rtt_count < 3 or loss_count < 100:
        raise ValueError("verify needs seconds > 0, rtt_count >= 3 and loss_count >= 100")
    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        if report is not None:
            report(check)

    d = prof.delay_ms
    with NatLab() as lab:
        ref = lab.add_server("ref")
        pub = lab.add_public_host("pub", profile=prof)
        home = lab.add_home("home", profile=prof)
        clean_profile = dataclasses.replace(prof, name=f"{prof.name}-clean", jitter_ms=0.0,
                                            loss_pct=0.0)
        clean = (lab.add_public_host("clean", profile=clean_profile)
                 if (prof.jitter_ms or prof.loss_pct) else pub)
        wires: list[Wire] = list(lab.wires.values())
        cpu0 = {w.name: w.cpu_times() for w in wires}
        pk0 = {w.name: _packets(w) for w in wires}

        rtts = udp_rtt(pub, ref, rtt_count)
        add(_rtt_check("public host <-> server", rtts, 2 * d))
        add(_rtt_check("home (NAT) <-> server", udp_rtt(home.host, ref, rtt_count), 2 * d))
        add(_rtt_check("home (NAT) <-> public host", udp_rtt(home.host, pub, rtt_count), 4 * d))
        if prof.jitter_ms:
            # two independent uniform jitters of +-j each: sd j*sqrt(2/3)
            expected = prof.jitter_ms * math.sqrt(2 / 3)
            sd = statistics.pstdev(rtts) * 1000
            add(Check("RTT spread public <-> server (sd)", "ms", expected, sd,
                      0.6 * expected <= sd <= 1.4 * expected, "0.6..1.4x"))
            lo, hi = min(rtts) * 1000, max(rtts) * 1000
            add(Check("RTT min >= 2(d - j)", "ms", 2 * (d - prof.jitter_ms), lo,
                      lo >= 2 * (d - prof.jitter_ms) * 0.98, "-2 %"))
            add(Check("RTT max <= 2(d + j)", "ms", 2 * (d + prof.jitter_ms), hi,
                      hi <= 2 * (d + prof.jitter_ms) * 1.1, "+10 %"))
        for direction, mbit, src, dst in (("up", prof.up_mbit, clean, ref),
                                          ("down", prof.down_mbit, ref, clean)):
            rate = mbit / 8  # MB/s of IP packets
            nbytes = max(1_000_000, int(rate * 1e6 * seconds))
            before = lab.link_stats(clean.name)[direction]["dropped_loss"]
            result = tcp_transfer(src, dst, nbytes)
            lost = lab.link_stats(clean.name)[direction]["dropped_loss"] - before
            got = result.steady_goodput
            add(Check(f"TCP cubic {direction}, no loss, 2nd half", "MB/s", rate, got,
                      got >= RATE_FRACTION * rate and lost == 0, f">= {RATE_FRACTION:.0%}"))
            add(Check(f"TCP cubic {direction}, whole {nbytes / 1e6:.1f} MB", "MB/s", rate,
                      result.goodput, True, "info: slow start included"))
        if prof.loss_pct:
            p = prof.loss_pct / 100
            arrived = udp_delivery(pub, ref, loss_count, gap=0.00025, size=100)
            measured = 1 - arrived / loss_count
            sigma = math.sqrt(p * (1 - p) / loss_count)
            add(Check(f"UDP loss up ({loss_count} datagrams)", "%", prof.loss_pct,
                      measured * 100, abs(measured - p) <= 4 * sigma + 1 / loss_count,
                      f"±4 sd ({4 * sigma * 100:.3f} %)"))
        for w in wires:
            user, system = (a - b for a, b in zip(w.cpu_times(), cpu0[w.name], strict=True))
            packets = _packets(w) - pk0[w.name]
            if packets < 1000:
                continue
            add(Check(f"wire {w.name}: user CPU/packet", "us", MAX_USER_US_PER_PACKET,
                      user / packets * 1e6, user / packets * 1e6 <= MAX_USER_US_PER_PACKET,
                      f"<= {MAX_USER_US_PER_PACKET:g} us ({packets} packets)"))
            add(Check(f"wire {w.name}: user+sys CPU/packet", "us", MAX_USER_US_PER_PACKET,
                      (user + system) / packets * 1e6, True,
                      "info: sys includes the stack behind the TAP"))
    return checks


def _packets(wire: Wire) -> int:
    stats = wire.stats()
    return stats["up"]["rx_packets"] + stats["down"]["rx_packets"]


HEADER = (f"{'quantity':<40} {'set':>10} {'measured':>10} {'unit':<5} {'ratio':>6}  "
          "verdict")
