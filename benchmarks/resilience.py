"""Resilience: the same swarm trained without and with faults, and the rendezvous under load.

    sudo .venv/bin/python benchmarks/resilience.py [--epochs 4] [--peers 4] [--repeats 1]
        [--seed 7] [--skip-load] [--load-peers 2000] [--no-lab]

(a) fault-free: ``--peers`` peers (digits, IID, one part each) train ``--epochs`` epochs;
(b) faulty, the same swarm (same seed, same job, same length) while a seeded schedule injects:
    two SIGKILLs of a random non-public peer at a random epoch, each followed by a restart
    with the same key and checkpoint (it must resume); one SIGKILL + restart of the
    rendezvous (the peers must re-register by themselves); 5 % packet loss on one NAT path
    for the whole run (NAT lab only); hostile ZeroMQ frames against the public peer while it
    trains (``testkit.hostile.blast_zmq``, as a stranger: random parts, truncated models,
    bad digests, pickles, ...);
(c) the rendezvous load tool (``benchmarks/_rendezvous_load.py --peers N``, H6): join-event
    delivery latency p50/p99 and resident memory at N peers.

In the NAT lab (root, ``ip``, ``nft``, ``turnserver``) peer 0 is public (ZeroMQ) and the others
sit behind port-restricted NATs (WebRTC between them), for both runs; elsewhere (or with
``--no-lab``) everything runs on loopback and the loss fault is reported as skipped.

A fault counts as survived when: a killed peer came back with ``resumed`` from its checkpoint
and finished all its epochs; after the rendezvous restart every running peer was listed by
``GET /peers`` again within 60 s; the peers behind the lossy NAT finished all their epochs; the
hostile frames were all refused (no ``ack``) and their target finished all its epochs.
Frames rejected by reason are the peers' own counters (``rejected`` of their ``done`` events).

Targets: final accuracy (mean of the peers' last after-averaging test) of the faulty run within
1 point of the fault-free one; join delivery p99 under 200 ms and rendezvous memory under 300 MB
at 2,000 peers. Prints tables and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testkit.natlab import NatLab, NatType, available  # noqa: E402
from testkit.swarm import LocalSwarm  # noqa: E402

JOB = "resilience"
TURN_SECRET = "resilience-secret"  # noqa: S105 (a throwaway secret for a lab that lives minutes)
LOSS_PERCENT = 5
HOSTILE_FRAMES = 300
TARGET_GAP = 1.0
TARGET_JOIN_P99_MS = 200.0
TARGET_RSS_MB = 300.0
REREGISTER_TIMEOUT = 60.0


@dataclass
class Faults:
    """Faults of one faulty run, by kind: what was injected, what the swarm survived."""

    injected: Counter[str] = field(default_factory=Counter)
    survived: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


@dataclass
class Topology:
    """Where each peer runs: ``(host or None, listen address or None)``; the lossy home."""

    places: list[tuple[Any, str | None]]
    lab: NatLab | None = None
    lossy: Any = None
    lossy_peers: list[int] = field(default_factory=list)


def build_topology(lab: NatLab | None, peers: int, tag: str) -> Topology:
    if lab is None:
        return Topology([(None, "127.0.0.1:0")] * peers)
    public = lab.add_public_host(f"pub{tag}")
    places: list[tuple[Any, str | None]] = [(public, f"{public.ip}:6000")]
    homes = [lab.add_home(f"h{tag}x{i}", NatType.PORT_RESTRICTED) for i in range(1, peers)]
    places += [(home.host, None) for home in homes]
    return Topology(places, lab, homes[0] if homes else None, [1] if homes else [])


def final_accuracy(swarm: LocalSwarm, peers: int) -> float:
    return statistics.fmean(swarm.events(n, "epoch")[-1]["acc_after"] for n in range(peers))


def rejected_by_reason(swarm: LocalSwarm, peers: int) -> Counter[str]:
    """Sum of the peers' transport counters (every life's ``done`` event: a killed life has
    none, its counters died with it)."""
    total: Counter[str] = Counter()
    for num in range(peers):
        for done in swarm.events(num, "done"):
            for by_reason in done.get("rejected", {}).values():
                total.update(by_reason)
    return total


def run_swarm(topo: Topology, peers: int, epochs: int, workdir: Path, *, faulty: bool,
              rng: random.Random) -> tuple[float, Counter[str], Faults]:
    faults = Faults()
    with LocalSwarm(workdir) as swarm:
        if topo.lab is not None:
            swarm.start_lab_services(topo.lab, TURN_SECRET)
        else:
            swarm.start_rendezvous(ttl=10, heartbeat=2)
        if faulty and topo.lab is not None and topo.lossy is not None:
            topo.lab.loss(topo.lossy, LOSS_PERCENT)
            faults.injected["loss"] += 1
        elif faulty:
            faults.notes.append("loss: skipped (no NAT lab here; loopback has no NAT path)")
        flags = ("--job", JOB, "--merge-wait", "60", "--min-peers", str(peers))
        for num, (host, listen) in enumerate(topo.places):
            swarm.start_peer(num, peers, epochs, *flags, host=host, listen=listen)
        try:
            if faulty:
                inject(swarm, topo, peers, epochs, rng, faults)
            codes = swarm.wait_peers(3600)
        finally:
            if faulty and topo.lab is not None and topo.lossy is not None:
                dropped = topo.lab.loss_dropped(topo.lossy)
                faults.notes.append(f"loss: the rule dropped {dropped['in']} packets in, "
                                    f"{dropped['out']} out")
                topo.lab.loss(topo.lossy, 0)
        if any(code != 0 for code in codes.values()):
            for num in swarm.peers:
                print(swarm.log(f"peer-{num}")[-3000:], file=sys.stderr)
            raise SystemExit(f"a peer failed: {codes}")
        for num in range(peers):
            if [e["epoch"] for e in swarm.events(num, "epoch")][-1:] != [
                    swarm.events(num, "done")[-1]["epoch"]]:
                raise SystemExit(f"peer {num} did not finish its epochs")
        if faulty:
            judge(swarm, topo, peers, epochs, faults)
        return final_accuracy(swarm, peers), rejected_by_reason(swarm, peers), faults


def inject(swarm: LocalSwarm, topo: Topology, peers: int, epochs: int, rng: random.Random,
           faults: Faults) -> None:
    """The seeded schedule: (epoch of peer 0 to wait for, fault) in order."""
    last = max(1, epochs - 1)
    plan = [(rng.randint(1, last), "kill"), (rng.randint(1, last), "kill"),
            (rng.randint(1, last), "rendezvous"), (rng.randint(1, last), "hostile")]
    plan.sort(key=lambda step: step[0])
    for epoch, kind in plan:
        if not swarm.wait_for(lambda e=epoch: len(swarm.events(0, "epoch")) >= e, 3600):
            raise SystemExit(f"peer 0 never reached epoch {epoch}")
        time.sleep(rng.uniform(0.0, 3.0))
        if kind == "kill":
            victim = rng.randrange(1, peers)
            # a kill before its first checkpoint would test a fresh start, not a resume
            swarm.wait_for(lambda v=victim: bool(swarm.events(v, "epoch"))
                           or swarm.peers[v].poll() is not None, 3600)
            if swarm.peers[victim].poll() is not None:
                faults.notes.append(f"kill at epoch {epoch}: peer {victim} had finished; "
                                    "skipped")
                continue
            swarm.restart_peer(victim, "--min-peers", "1")  # the others may be done by then
            faults.injected["kill"] += 1
            print(f"  fault: SIGKILL peer {victim} at peer 0's epoch {epoch}, restarted",
                  flush=True)
        elif kind == "rendezvous":
            swarm.restart_rendezvous(down=rng.uniform(0.5, 2.0))
            faults.injected["rendezvous_restart"] += 1
            print(f"  fault: rendezvous SIGKILLed at peer 0's epoch {epoch}, restarted",
                  flush=True)
            if reregistered(swarm, peers):
                faults.survived["rendezvous_restart"] += 1
        else:
            result = hostile(swarm, topo)
            faults.injected["hostile_frames"] += 1
            faults.notes.append(f"hostile: {sum(result['sent'].values())} frames sent, "
                                f"replies {dict(result['replies'])}")
            print(f"  fault: {sum(result['sent'].values())} hostile ZeroMQ frames at peer 0",
                  flush=True)
            if "ack" not in result["replies"]:
                faults.survived["hostile_frames"] += 1  # provided peer 0 finishes (judge)


def reregistered(swarm: LocalSwarm, peers: int) -> bool:
    """Every running peer is listed by the restarted rendezvous within the timeout."""
    def listed() -> bool:
        try:
            got = {p["peer_id"] for p in swarm.http_json(f"/peers?job={JOB}")["peers"]}
        except OSError:
            return False
        running = {swarm.events(n, "start")[0]["peer_id"] for n in range(peers)
                   if swarm.peers[n].poll() is None and swarm.events(n, "start")}
        return running <= got
    return swarm.wait_for(listed, REREGISTER_TIMEOUT, interval=0.5)


def hostile(swarm: LocalSwarm, topo: Topology) -> dict[str, Any]:
    """Blast peer 0's ZeroMQ listener from where it is reachable (its lab's internet)."""
    from overlay.identity import Identity

    key = Identity.load_or_create(swarm.workdir / "peer-0.pem").public_key
    host, listen = topo.places[0]
    if listen is not None and listen.endswith(":0"):  # loopback: the bound port is in /peers
        peer_id = swarm.events(0, "start")[0]["peer_id"]
        members = swarm.http_json(f"/peers?job={JOB}")["peers"]
        addrs = [a for p in members if p["peer_id"] == peer_id for a in p.get("addrs", [])]
        if not addrs:
            raise SystemExit("cannot find peer 0's ZeroMQ address (rendezvous hides addrs?)")
        address = addrs[0]
    else:
        address = f"tcp://{listen}"
    argv = [sys.executable, str(Path(__file__).resolve()), "--blast", address, key.hex()]
    if host is not None:
        argv = host.argv(argv)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"the hostile blaster failed: {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def blast_main(address: str, key_hex: str) -> int:
    """``--blast``: run in the target's network (a lab namespace); prints the result as JSON."""
    from testkit.hostile import blast_zmq

    result = asyncio.run(blast_zmq(address, bytes.fromhex(key_hex), HOSTILE_FRAMES, job=JOB,
                                   seed=11, quiet=5.0))
    print(json.dumps({"sent": dict(result.sent), "replies": dict(result.replies),
                      "seconds": round(result.seconds, 2)}))
    return 0


def judge(swarm: LocalSwarm, topo: Topology, peers: int, epochs: int, faults: Faults) -> None:
    """Count the survived kills, loss and hostile frames from the peers' events."""
    for num in range(peers):
        starts = swarm.events(num, "start")
        finished = swarm.events(num, "done")[-1]["epochs_trained"] == epochs
        faults.survived["kill"] += sum(bool(s["resumed"]) and finished for s in starts[1:])
    if faults.injected["loss"]:
        faults.survived["loss"] += all(
            swarm.events(n, "done")[-1]["epochs_trained"] == epochs for n in topo.lossy_peers)
    if faults.survived["hostile_frames"] and not (
            swarm.events(0, "done") and swarm.events(0, "done")[-1]["epochs_trained"] == epochs):
        faults.survived["hostile_frames"] = 0


def run_load(load_peers: int) -> dict[str, Any]:
    tool = ROOT / "benchmarks" / "_rendezvous_load.py"
    if not tool.exists():
        return {"skipped": f"{tool.relative_to(ROOT)} does not exist"}
    proc = subprocess.run([sys.executable, str(tool), "--peers", str(load_peers)],
                          capture_output=True, text=True, timeout=3600, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    try:
        figures = dict(json.loads(lines[-1]))
    except (IndexError, ValueError):
        return {"skipped": f"the load tool printed no JSON (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-500:]}"}
    p99, rss = figures.get("join_latency_p99_ms"), figures.get("rss_mb")
    figures["targets_met"] = bool(p99 is not None and p99 < TARGET_JOIN_P99_MS
                                  and rss is not None and rss < TARGET_RSS_MB
                                  and figures.get("targets_met", True))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (default 4)")
    parser.add_argument("--peers", type=int, default=4, help="peers per swarm (default 4)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="fault-free/faulty pairs; accuracies are means (default 1)")
    parser.add_argument("--seed", type=int, default=7, help="fault schedule seed (default 7)")
    parser.add_argument("--skip-load", action="store_true", help="skip (c), the load tool")
    parser.add_argument("--skip-swarm", action="store_true", help="skip (a) and (b)")
    parser.add_argument("--load-peers", type=int, default=2000,
                        help="peers for the load tool (default 2000)")
    parser.add_argument("--no-lab", action="store_true", help="loopback even where a lab runs")
    parser.add_argument("--blast", nargs=2, metavar=("ADDRESS", "KEYHEX"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.blast:
        return blast_main(*args.blast)
    if args.peers < 2 or args.epochs < 2 or args.repeats < 1:
        parser.error("--peers and --epochs must be at least 2, --repeats at least 1")

    out: dict[str, Any] = {"peers": args.peers, "epochs": args.epochs,
                           "repeats": args.repeats, "seed": args.seed}
    if not args.skip_swarm:
        reason = "--no-lab" if args.no_lab else available(coturn=True)
        out["topology"] = "loopback" if reason else "nat-lab"
        if reason:
            print(f"loopback swarm (no NAT lab: {reason}); the loss fault is skipped", flush=True)
        clean: list[float] = []
        faulty: list[float] = []
        rejected: Counter[str] = Counter()
        faults = Faults()
        rng = random.Random(args.seed)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="resilience-") as tmp:
            for rep in range(args.repeats):
                for kind in ("clean", "faulty"):
                    lab = None if reason else NatLab()
                    try:
                        topo = build_topology(lab, args.peers, f"{rep}{kind[0]}")
                        print(f"run {rep + 1}/{args.repeats} {kind} ({out['topology']})",
                              flush=True)
                        acc, rej, got = run_swarm(topo, args.peers, args.epochs,
                                                  Path(tmp) / f"{kind}-{rep}",
                                                  faulty=kind == "faulty", rng=rng)
                    finally:
                        if lab is not None:
                            lab.close()
                    print(f"  final accuracy {acc:.2f} %, rejected {dict(rej)}", flush=True)
                    (faulty if kind == "faulty" else clean).append(acc)
                    if kind == "faulty":
                        rejected += rej
                        faults.injected += got.injected
                        faults.survived += got.survived
                        faults.notes += got.notes
        gap = statistics.fmean(clean) - statistics.fmean(faulty)
        out.update({
            "swarm_s": round(time.monotonic() - started, 1),
            "acc_fault_free": round(statistics.fmean(clean), 2),
            "acc_faulty": round(statistics.fmean(faulty), 2),
            "acc_runs": {"fault_free": clean, "faulty": faulty},
            "gap_points": round(gap, 2),
            "faults_injected": dict(faults.injected),
            "faults_survived": {k: faults.survived[k] for k in faults.injected},
            "rejected_by_reason": dict(rejected),
            "notes": faults.notes,
            "accuracy_target_met": gap <= TARGET_GAP,
        })
        print("\nfault               injected  survived")
        for kind, count in sorted(faults.injected.items()):
            print(f"{kind:<20}{count:>8}  {faults.survived[kind]:>8}")
        for note in faults.notes:
            print(f"  {note}")
        print("\nrejected frames by reason: "
              + (", ".join(f"{r} {n}" for r, n in rejected.most_common()) or "none"))
        print(f"final accuracy: fault-free {out['acc_fault_free']:.2f} %, faulty "
              f"{out['acc_faulty']:.2f} %, gap {gap:.2f} points (target <= {TARGET_GAP:g})")
    if not args.skip_load:
        print(f"\nrendezvous load, {args.load_peers} peers ...", flush=True)
        load = run_load(args.load_peers)
        out["load"] = load
        if "skipped" in load:
            print(f"  skipped: {load['skipped']}")
        else:
            print(f"  join delivery p50 {load.get('join_latency_p50_ms')} ms, p99 "
                  f"{load.get('join_latency_p99_ms')} ms (target < {TARGET_JOIN_P99_MS:g}); "
                  f"rendezvous RSS {load.get('rss_mb')} MB (target < {TARGET_RSS_MB:g}); "
                  f"targets met: {load['targets_met']}")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
