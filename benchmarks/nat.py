"""Links through real NATs: which kind each pair of NAT behaviours gets, how fast it is set up,
and model delivery throughput, ours vs. bare aiortc on the same path.

One NAT lab (network namespaces, nftables; see /work/shared/NATLAB.md and testkit/natlab.py)
with the rendezvous (STUN built in) and coturn on its "internet". For every unordered pair of
{public, full-cone, port-restricted, symmetric} two fresh peers are placed (a public host
listening for ZeroMQ on ``<ip>:6000``, or a home behind that NAT) and run
``benchmarks/_natprobe.py``: both join a job of their own with :class:`overlay.host.Host`, the
sender delivers the 4.8 MB MNIST-CNN model 3 times with ``Host.send_model`` (acknowledged after
digest and signature checks). When only one side is public, the public one sends, so that it
must use WebRTC towards the NATed one. Reported: the link kind ``Host.links`` chose, its set-up
time, and the median MB/s of the 3 deliveries (the first minus the link set-up).

For port-restricted x port-restricted (direct) and symmetric x symmetric (relayed through
coturn) a bare aiortc sender/receiver also runs between the same namespaces (same bytes,
65,536-byte messages, same pacing; median of 3 on one connection): ratio = ours / bare. aioice
nominates the first candidate pair whose check succeeds, so a port-restricted pair sometimes ends
up relayed; for the ratio each side connects again (up to 3 times) until it takes the path being
compared. The pairs table always shows the first connection.

    sudo .venv/bin/python benchmarks/nat.py

Needs root, ``ip``, ``nft`` and ``turnserver``. Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testkit.natlab import Host, NatLab, NatType, available  # noqa: E402
from testkit.swarm import LocalSwarm  # noqa: E402

RATIO_ROUNDS = 7  # transfers per connection for the ours-vs-bare comparison
PROBE = Path(__file__).resolve().parent / "_natprobe.py"
TURN_SECRET = "nat-bench-secret"  # noqa: S105 (a throwaway lab secret)
BEHAVIOURS = ["public", "full-cone", "port-restricted", "symmetric"]
BARE_PATHS = {("port-restricted", "port-restricted"): "direct",
              ("symmetric", "symmetric"): "relay"}
CONNECT_TIMEOUT = 30.0
"""A pair whose link is not up within this many seconds is reported as failed."""
PAIR_DEADLINE = 100.0
"""Hard bound on one pair's processes (join + connect + 3 deliveries)."""
PATH_ATTEMPTS = 3
"""Connections made (ours, bare) until one takes the path being compared (direct, relay)."""
TARGET_CONNECT_S = 1.5
TARGET_RATIO = 0.9


def expected_kind(a: str, b: str) -> str:
    """NATLAB.md: only symmetric x symmetric and symmetric x port-restricted need the relay."""
    if a == b == "public":
        return "zmq"
    if {a, b} in ({"symmetric"}, {"symmetric", "port-restricted"}):
        return "webrtc-relay"
    return "webrtc-direct"


def place(lab: NatLab, nat: str, name: str) -> tuple[Host, str | None]:
    """A public host listening for ZeroMQ, or the host of a fresh home behind ``nat``."""
    if nat == "public":
        host = lab.add_public_host(name)
        return host, f"tcp://{host.ip}:6000"
    return lab.add_home(name, NatType(nat)).host, None


class Probe:
    """One ``_natprobe.py`` process in a lab namespace; its stdout's last JSON line is the
    result, its stderr goes to ``log``."""

    def __init__(self, host: Host, mode: str, rendezvous: str, job: str, log: Path,
                 listen: str | None = None, rounds: int = 3) -> None:
        self.log = log
        args = [str(PROBE), mode, "--rendezvous", rendezvous, "--job", job,
                "--connect-timeout", str(CONNECT_TIMEOUT), "--deadline", str(PAIR_DEADLINE),
                "--rounds", str(rounds)]
        if listen is not None:
            args += ["--listen", listen]
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        with open(log, "w") as err:
            self.proc = host.run(host.python(*args), stdout=subprocess.PIPE, stderr=err,
                                 stdin=subprocess.DEVNULL, text=True, env=env)

    def result(self, timeout: float) -> dict[str, Any] | None:
        try:
            out, _ = self.proc.communicate(timeout=max(0.1, timeout))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, _ = self.proc.communicate()
        for line in reversed((out or "").splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
        return None

    def log_tail(self, n: int = 1500) -> str:
        return self.log.read_text(errors="replace")[-n:]


def run_pair(sender: Host, receiver: Host, mode: str, rendezvous: str, job: str,
             logdir: Path, listens: tuple[str | None, str | None] = (None, None),
             rounds: int = 3) -> dict[str, Any]:
    """Receiver first, then sender; the sender's record (``error`` set when it failed)."""
    recv = Probe(receiver, f"{mode}-recv", rendezvous, job, logdir / f"{job}-recv.log",
                 listens[1], rounds)
    send = Probe(sender, f"{mode}-send", rendezvous, job, logdir / f"{job}-send.log",
                 listens[0], rounds)
    deadline = time.monotonic() + PAIR_DEADLINE
    got = send.result(deadline - time.monotonic())
    recv.result(max(5.0, deadline - time.monotonic()))
    if got is None:
        got = {"kind": None, "connect_s": None, "times": [], "bytes": 0,
               "error": "the sender printed no result"}
    if got.get("error"):
        print(f"  {job}: {got['error']}\n  sender log: {send.log_tail()}\n"
              f"  receiver log: {recv.log_tail()}", file=sys.stderr)
    return got


def mb_s(record: dict[str, Any]) -> float | None:
    times = [t for t in record.get("times", []) if t > 0]
    if record.get("error") or not times:
        return None
    return record["bytes"] / 1e6 / statistics.median(times)


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    reason = available(coturn=True)
    if reason is not None:
        print(f"nat benchmark cannot run: {reason}", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    pairs_out: list[dict[str, Any]] = []
    model_bytes = 0
    bare: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="natbench-") as tmp, NatLab() as lab, \
            LocalSwarm(Path(tmp) / "swarm") as swarm:
        logdir = Path(tmp)
        rdv, turn = swarm.start_lab_services(lab, TURN_SECRET)
        rendezvous = f"{rdv.ip}:{swarm.rendezvous_port}"
        print(f"lab {lab.name}: rendezvous {rendezvous}, coturn {turn.ip}:3478", file=sys.stderr)

        for i, (a, b) in enumerate(itertools.combinations_with_replacement(BEHAVIOURS, 2)):
            host_a, listen_a = place(lab, a, f"p{i}a")
            host_b, listen_b = place(lab, b, f"p{i}b")
            # the side that must use WebRTC (if either must) sends: a public receiver would
            # be reached over ZeroMQ
            if b == "public" and a != "public":
                (host_a, listen_a), (host_b, listen_b) = (host_b, listen_b), (host_a, listen_a)
                sender_nat, receiver_nat = b, a
            else:
                sender_nat, receiver_nat = a, b
            job = f"nat-{a}-{b}"
            t0 = time.monotonic()
            rec = run_pair(host_a, host_b, "ours", rendezvous, job, logdir, (listen_a, listen_b))
            model_bytes = max(model_bytes, int(rec.get("bytes") or 0))
            entry = {"a": a, "b": b, "sender": sender_nat, "receiver": receiver_nat,
                     "kind": rec.get("kind") if not rec.get("error") else None,
                     "expected": expected_kind(a, b),
                     "connect_s": rec.get("connect_s") if not rec.get("error") else None,
                     "mb_s": None if (v := mb_s(rec)) is None else round(v, 2)}
            if rec.get("error"):
                entry["error"] = str(rec["error"])[:200]
            pairs_out.append(entry)
            print(f"  {a} x {b}: {entry['kind']} in {fmt(entry['connect_s'], '.2f')} s, "
                  f"{fmt(entry['mb_s'], '.1f')} MB/s, times {rec.get('times')} "
                  f"({time.monotonic() - t0:.1f} s)",
                  file=sys.stderr)
            if (a, b) in BARE_PATHS:
                path = BARE_PATHS[(a, b)]
                want = f"webrtc-{path}"
                # aioice nominates aggressively: the first pair whose check succeeds wins, so
                # between two port-restricted NATs either side may end up relayed when the
                # TURN check wins the race. Only the same path is comparable: when a side did
                # not get the path being measured, it connects again (a fresh job each time).
                # Both sides of the comparison send RATIO_ROUNDS models on one connection
                # each (medians), right after each other on the same hosts.
                ours: dict[str, Any] = {}
                for attempt in range(1, PATH_ATTEMPTS + 1):
                    if ours.get("kind") == want or ours.get("error"):
                        break
                    ours = {**run_pair(host_a, host_b, "ours", rendezvous,
                                       f"ours{attempt}-{a}-{b}", logdir, (listen_a, listen_b),
                                       RATIO_ROUNDS),
                            "tries": attempt}
                    print(f"  ours {a} x {b} (try {attempt}): {ours.get('kind')}, "
                          f"{fmt(mb_s(ours), '.1f')} MB/s, times {ours.get('times')}",
                          file=sys.stderr)
                for attempt in range(1, PATH_ATTEMPTS + 1):
                    base = run_pair(host_a, host_b, "bare", rendezvous,
                                    f"bare{attempt}-{a}-{b}", logdir, rounds=RATIO_ROUNDS)
                    base["tries"] = attempt
                    print(f"  bare {a} x {b} (try {attempt}): {base.get('kind')}, "
                          f"{fmt(mb_s(base), '.1f')} MB/s, times {base.get('times')}",
                          file=sys.stderr)
                    if base.get("kind") == want or base.get("error"):
                        break
                bare[path] = {
                    "pair": f"{a} x {b}", "path": want,
                    "ours_kind": ours.get("kind"), "ours_tries": ours["tries"],
                    "ours_mb_s": None if (v := mb_s(ours)) is None else round(v, 2),
                    "bare_kind": base.get("kind"), "bare_tries": base["tries"],
                    "bare_connect_s": base.get("connect_s"),
                    "bare_mb_s": None if (v := mb_s(base)) is None else round(v, 2),
                    "same_path": ours.get("kind") == base.get("kind") == want}
                if base.get("error"):
                    bare[path]["error"] = str(base["error"])[:200]

    # ---- figures
    connected = [p for p in pairs_out if p["kind"] is not None]
    connects = [p["connect_s"] for p in connected if p["connect_s"] is not None]
    median_connect = round(statistics.median(connects), 4) if connects else None
    direct_ok = all(p["kind"] in ("zmq", "webrtc-direct")
                    for p in pairs_out if p["expected"] != "webrtc-relay")
    ratios: dict[str, float | None] = {}
    for path in ("direct", "relay"):
        info = bare.get(path, {})
        ours_v, bare_v = info.get("ours_mb_s"), info.get("bare_mb_s")
        ratios[path] = round(ours_v / bare_v, 3) if ours_v and bare_v else None
        info["ratio"] = ratios[path]
    elapsed = time.monotonic() - t_start

    print()
    print(f"{'A':<16} {'B':<16} {'sender':<16} {'kind':<14} {'expected':<14} "
          f"{'connect s':>9} {'MB/s':>7}")
    for p in pairs_out:
        print(f"{p['a']:<16} {p['b']:<16} {p['sender']:<16} {p['kind'] or 'FAILED':<14} "
              f"{p['expected']:<14} {fmt(p['connect_s'], '.3f'):>9} {fmt(p['mb_s'], '.1f'):>7}")
    print()
    print(f"{'path':<7} {'pair':<34} {'ours kind':<14} {'bare kind':<14} {'ours MB/s':>9} "
          f"{'bare MB/s':>9} {'ours/bare':>9}")
    for path in ("direct", "relay"):
        info = bare.get(path, {})
        print(f"{path:<7} {info.get('pair', '-'):<34} {info.get('ours_kind') or 'FAILED':<14} "
              f"{info.get('bare_kind') or 'FAILED':<14} "
              f"{fmt(info.get('ours_mb_s'), '.1f'):>9} {fmt(info.get('bare_mb_s'), '.1f'):>9} "
              f"{fmt(info.get('ratio'), '.2f'):>9}")
    print(f"\nall connected: {len(connected) == len(pairs_out)}, median connect "
          f"{fmt(median_connect, '.3f')} s, direct where possible: {direct_ok}; "
          f"ran {elapsed:.0f} s")

    figures = {
        "pairs": [{k: p[k] for k in ("a", "b", "kind", "connect_s", "mb_s")} for p in pairs_out],
        "all_connected": len(connected) == len(pairs_out),
        "median_connect_s": median_connect,
        "direct_where_possible": direct_ok,
        "ratio_direct": ratios["direct"],
        "ratio_relay": ratios["relay"],
        "bare": bare,
        "targets": {
            "median_connect_s": {"target": f"< {TARGET_CONNECT_S}",
                                 "met": median_connect is not None
                                 and median_connect < TARGET_CONNECT_S},
            **{f"ratio_{path}": {"target": f">= {TARGET_RATIO} (same path)",
                                 "met": bool(bare.get(path, {}).get("same_path"))
                                 and (ratios[path] or 0) >= TARGET_RATIO}
               for path in ("direct", "relay")},
        },
        "model_bytes": model_bytes,
        "elapsed_s": round(elapsed, 1),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
