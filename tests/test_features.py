"""Issue-4 features end to end with real peer processes on loopback: your own model and data
(module:function hooks), label-skewed partitions, int8 on the wire, fan-out, the architecture
check, and the Python API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.swarm import LocalSwarm

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
OWN = ("--model", "examples.my_model:factory", "--data", "examples.my_data:load")


def test_own_model_and_data_skewed_int8_fanout_one(swarm: LocalSwarm) -> None:
    swarm.start_rendezvous()
    for num in range(3):
        swarm.start_peer(num, 3, 2, *OWN, "--partition", "dirichlet:0.5", "--codec", "int8",
                         "--fanout", "1", "--job", "own", "--min-peers", "3")
    codes = swarm.wait_peers(600)
    assert all(code == 0 for code in codes.values()), codes
    ids = {n: swarm.events(n, "start")[0]["peer_id"] for n in range(3)}
    sent, merged = set(), set()
    for num in range(3):
        records = swarm.events(num, "epoch")
        assert len(records) == 2  # (a peer that starts late continues the swarm's numbering)
        for record in records:
            assert len(record["sent_to"]) == 1 and ids[num] not in record["sent_to"]
            assert sum(record["weights"].values()) == pytest.approx(1.0, abs=1e-3)
            sent |= {(ids[num], to) for to in record["sent_to"]}
            merged |= {(sender, ids[num]) for sender in record["merged_from"]}
        assert any(r["merged_from"] for r in records), f"peer {num} never merged anything"
        log = swarm.log(f"peer-{num}")
        assert "int8" in log and "dirichlet:0.5 part" in log
    # fan-out routing: a peer only ever merges models that were addressed to it (the epochs
    # of these tiny models take milliseconds, so which epoch merges what varies; not this)
    assert merged <= sent


def test_a_peer_with_another_architecture_is_never_averaged(swarm: LocalSwarm) -> None:
    swarm.start_rendezvous()
    swarm.start_peer(0, 2, 1, "--job", "mixed", "--merge-wait", "5")
    # the small model trains in a blink: it stays around until the CNN peer has looked
    swarm.start_peer(1, 2, 1, *OWN, "--job", "mixed", "--merge-wait", "5", "--linger", "45")
    codes = swarm.wait_peers(600)
    assert all(code == 0 for code in codes.values()), codes
    for num in range(2):
        assert swarm.events(num, "epoch")[0]["merged_from"] == []
    # the CNN peer trains for seconds while the small one is still around: it must have looked
    # at it and said why it leaves it out (the small one may have finished before the other
    # joined, so it need not have seen it)
    assert "different model architecture" in swarm.log("peer-0")


def test_python_api_example_script(tmp_path: Path, swarm: LocalSwarm) -> None:
    swarm.start_rendezvous()
    env = {**os.environ, "HOME": str(tmp_path)}  # its key and checkpoint go there
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_from_script.py"), "--num", "0",
         "--total", "1", "--epochs", "1", "--rendezvous", f"127.0.0.1:{swarm.rendezvous_port}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'epochs': [{'epoch': 1" in proc.stdout
    assert list((tmp_path / ".local" / "share" / "peerlearn").glob("*.ckpt"))
