"""Deliveries on an internet-like link (the lab's ``mobile`` profile: 10/30 Mbit/s, 40 ms
one-way per access link with 10 ms jitter, 1 % loss): a model delivered by real host
processes in NATed homes completes over the direct WebRTC path and through coturn.

The same probes as benchmarks/wan.py (``_wanprobe.py``: ``Host.send_model``, acknowledged
after the digest and signature checks); figures are the benchmark's, not judged here.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from testkit.fixtures import skip_unless_lab

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PAYLOAD = 1_500_000
"""Bytes per delivery: two pieces on WebRTC; on this link about 10-30 s each."""


@pytest.mark.parametrize("path", ["direct", "relay"])
def test_a_delivery_on_mobile_completes(path: str) -> None:
    skip_unless_lab(coturn=True, links=True)
    import wan
    from _wanshapes import flat_shapes

    from testkit.natlab import PROFILES, NatLab
    from testkit.swarm import LocalSwarm

    mobile = PROFILES["mobile"]
    with tempfile.TemporaryDirectory(prefix="wanlinks-") as tmpname, NatLab() as lab, \
            LocalSwarm(Path(tmpname) / "svc") as services:
        rdv, _turn = services.start_lab_services(lab, wan.TURN_SECRET)
        bench = wan.Bench(lab, f"{rdv.ip}:{services.rendezvous_port}", Path(tmpname))
        bench.shapes("payload", flat_shapes(PAYLOAD))
        sender, receiver, listens = bench.pair(path, mobile, mobile)
        rec = bench.on_path("ours", path, sender, receiver, "payload", 1, listens, 400.0)
        assert not rec.get("error"), rec
        assert rec["kind"] == wan.KIND[path], rec
        assert len(rec["times"]) == 1 and rec["bytes"] >= PAYLOAD, rec
