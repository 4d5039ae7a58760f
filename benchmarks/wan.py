"""Transfers over internet-like links: our transports against one TCP flow and one bare aiortc
data channel on the same emulated links, model delivery times, connection set-up, and a NATed
swarm training on every link profile (issue 11). See docs/wan.md.

One NAT lab (network namespaces, nftables, the user-space link "wire" of testkit.natlab.links)
with the rendezvous (STUN) and coturn on its unshaped "internet". Each home or public peer gets
an access link profile (testkit.natlab.PROFILES or a custom LinkProfile); a pair of peers with
profile P on both sides has RTT 4 * P.delay_ms. Paths:

- ``zmq``: two public peers (ZeroMQ, CURVE) -- ``overlay.transport.zeromq.ZmqTransport``;
- ``direct``: two homes behind port-restricted NATs -- WebRTC hole-punched;
- ``relay``: two homes behind symmetric NATs -- WebRTC through coturn.

"Ours" is ``overlay.host.Host.send_model`` (the transport's request API underneath; delivered =
acknowledged after digest and signature checks) run by ``benchmarks/_wanprobe.py`` in the lab's
namespaces; "bare" one aiortc data channel (explicit iceServers, 64 KiB messages); "tcp" one
plain TCP flow (``testkit.natlab.probe.tcp_transfer``) between the same two namespaces, with
cubic (the reference for the targets) and bbr. MB = 1e6 bytes. Figures are medians of
``--repeats``. Ends with one JSON line (figures and targets, pass/fail each).

    sudo .venv/bin/python benchmarks/wan.py            # full run (~25 min on a quiet machine)
    sudo .venv/bin/python benchmarks/wan.py --quick    # cable only, CNN only, 1 repeat
"""

from __future__ import annotations

import argparse
import inspect
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _wanshapes import Shapes, cnn_shapes, flat_shapes, nbytes, resnet18_shapes  # noqa: E402

from testkit.natlab import PROFILES, Host, LinkProfile, NatLab, NatType, available  # noqa: E402
from testkit.natlab.probe import tcp_transfer  # noqa: E402
from testkit.swarm import LocalSwarm  # noqa: E402

PROBE = Path(__file__).resolve().parent / "_wanprobe.py"
TURN_SECRET = "wan-bench-secret"  # noqa: S105 (a throwaway lab secret)
PATHS = ("zmq", "direct", "relay")
KIND = {"zmq": "zmq", "direct": "webrtc-direct", "relay": "webrtc-relay"}
SIZES = {"cnn": cnn_shapes, "resnet18": resnet18_shapes}
CONNECT_TIMEOUT = 30.0
PATH_ATTEMPTS = 3
"""Fresh connections tried until one takes the path being measured (aioice may nominate the
relay between two port-restricted NATs when the TURN check wins the race)."""

# targets (issue 11)
SETUP_PROFILE = LinkProfile("rtt20", 100, 100, 5)
"""5 ms one-way on each home's access link: 2 * (5 + 5) = 20 ms RTT between two homes."""
TARGET_CASES: list[tuple[str, LinkProfile, LinkProfile, float]] = [
    # name, sender's link, receiver's link, minimum ours / tcp(cubic)
    ("100M/50ms", LinkProfile("t100", 100, 100, 12.5), LinkProfile("t100", 100, 100, 12.5),
     0.7),
    ("20M/50ms", LinkProfile("t20", 20, 20, 12.5), LinkProfile("t20", 20, 20, 12.5), 0.9),
    # 0.5 % random loss on the sender's access link (both directions), none on the receiver's
    ("100M/50ms/0.5%", LinkProfile("t100l", 100, 100, 12.5, loss_pct=0.5),
     LinkProfile("t100", 100, 100, 12.5), 1.0),
]
TARGET_SETUP_S = {"direct": 1.0, "relay": 2.0}
TARGET_SWARM_RATIO = 1.3
SWARM_PEERS = 4
SWARM_EPOCHS = 3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def rnd(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def lanes_info() -> dict[str, Any]:
    """What the current WebRTC transport offers for striping (read from its signature)."""
    from overlay.host import HostConfig
    from overlay.transport.webrtc import WebRtcTransport

    param = inspect.signature(WebRtcTransport.__init__).parameters.get("lanes")
    fields = getattr(HostConfig, "__dataclass_fields__", {})
    info: dict[str, Any] = {"webrtc_lanes_param": param is not None,
                            "default_lanes": None, "hostconfig_lanes": "lanes" in fields}
    if param is not None and param.default is not inspect.Parameter.empty:
        info["default_lanes"] = param.default
    if "lanes" in fields:
        info["default_lanes"] = fields["lanes"].default
    return info


# ---- one pair of probe processes ----------------------------------------------------------


class Probe:
    """One ``_wanprobe.py`` process in a lab namespace; its stdout's last JSON line is the
    result, its stderr goes to ``logfile``."""

    def __init__(self, host: Host, mode: str, shapes: Path, rendezvous: str, job: str,
                 logfile: Path, listen: str | None, rounds: int, deadline: float,
                 lanes: int | None = None) -> None:
        self.logfile = logfile
        lane_args = ["--lanes", str(lanes)] if lanes is not None else []
        args = [str(PROBE), "--shapes", str(shapes), *lane_args, mode,
                "--rendezvous", rendezvous,
                "--job", job, "--connect-timeout", str(CONNECT_TIMEOUT),
                "--deadline", str(deadline), "--rounds", str(rounds)]
        if listen is not None:
            args += ["--listen", listen]
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        with open(logfile, "w") as err:
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
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                return record
        return None

    def tail(self, n: int = 1200) -> str:
        return self.logfile.read_text(errors="replace")[-n:]


class Bench:
    """The lab, its services and the files the probes share."""

    def __init__(self, lab: NatLab, rendezvous: str, tmp: Path,
                 lanes: int | None = None) -> None:
        self.lab = lab
        self.rendezvous = rendezvous
        self.tmp = tmp
        self.lanes = lanes
        self.jobs = 0
        self.names = 0
        self.shape_files: dict[str, tuple[Path, int]] = {}

    def shapes(self, label: str, shapes: Shapes) -> tuple[Path, int]:
        """A shapes file for the probes and the payload's bytes."""
        if label not in self.shape_files:
            path = self.tmp / f"shapes-{label}.json"
            path.write_text(json.dumps([[n, list(d)] for n, d in shapes]))
            self.shape_files[label] = (path, nbytes(shapes))
        return self.shape_files[label]

    def pair(self, path: str, a: LinkProfile, b: LinkProfile
             ) -> tuple[Host, Host, tuple[str | None, str | None]]:
        """Sender and receiver for ``path`` with access links ``a`` and ``b``."""
        self.names += 1
        na, nb = f"w{self.names}a", f"w{self.names}b"
        if path == "zmq":
            ha = self.lab.add_public_host(na, profile=a)
            hb = self.lab.add_public_host(nb, profile=b)
            return ha, hb, (f"tcp://{ha.ip}:6000", f"tcp://{hb.ip}:6000")
        nat = NatType.PORT_RESTRICTED if path == "direct" else NatType.SYMMETRIC
        return (self.lab.add_home(na, nat, profile=a).host,
                self.lab.add_home(nb, nat, profile=b).host, (None, None))

    def run(self, mode: str, sender: Host, receiver: Host, label: str, rounds: int,
            listens: tuple[str | None, str | None], deadline: float) -> dict[str, Any]:
        """One pair of probes (receiver first); the sender's record, ``error`` on failure."""
        shapes, _ = self.shape_files[label]
        self.jobs += 1
        job = f"wan{self.jobs}-{mode}"
        recv = Probe(receiver, f"{mode}-recv", shapes, self.rendezvous, job,
                     self.tmp / f"{job}-recv.log", listens[1], rounds, deadline, self.lanes)
        send = Probe(sender, f"{mode}-send", shapes, self.rendezvous, job,
                     self.tmp / f"{job}-send.log", listens[0], rounds, deadline, self.lanes)
        end = time.monotonic() + deadline
        got = send.result(end - time.monotonic())
        recv.result(max(5.0, end - time.monotonic()))
        if got is None:
            got = {"kind": None, "connect_s": None, "times": [], "bytes": 0,
                   "error": "the sender printed no result"}
        if got.get("error"):
            log(f"  {job}: {got['error']}\n  sender log: {send.tail()}\n"
                f"  receiver log: {recv.tail()}")
        return got

    def on_path(self, mode: str, path: str, sender: Host, receiver: Host, label: str,
                rounds: int, listens: tuple[str | None, str | None], deadline: float
                ) -> dict[str, Any]:
        """Like :meth:`run`, connecting again (fresh jobs) until the link is ``path``'s."""
        rec: dict[str, Any] = {}
        for attempt in range(1, PATH_ATTEMPTS + 1):
            rec = self.run(mode, sender, receiver, label, rounds, listens, deadline)
            rec["tries"] = attempt
            if rec.get("error") or rec.get("kind") == KIND[path]:
                break
            log(f"  {mode} on {path}: got {rec.get('kind')}, connecting again")
        return rec


def goodput(rec: dict[str, Any]) -> float | None:
    """MB/s of the median delivery (on a set-up link)."""
    times = [t for t in rec.get("times", []) if t > 0]
    if rec.get("error") or not times:
        return None
    return float(rec["bytes"]) / 1e6 / float(statistics.median(times))


def tcp_figures(sender: Host, receiver: Host, nbytes_: int, repeats: int,
                timeout: float) -> dict[str, Any]:
    """Median MB/s of ``repeats`` single TCP flows with cubic and with bbr (whole transfer,
    slow start included) and their steady (second-half) goodput."""
    out: dict[str, Any] = {}
    for cc in ("cubic", "bbr"):
        whole, steady = [], []
        for _ in range(repeats):
            try:
                res = tcp_transfer(sender, receiver, nbytes_, cc, timeout=timeout)
            except Exception as exc:  # noqa: BLE001 (reported, the run goes on)
                out[f"{cc}_error"] = str(exc)[:200]
                break
            whole.append(res.goodput)
            steady.append(res.steady_goodput)
        out[cc] = rnd(median(whole))
        out[f"{cc}_steady"] = rnd(median(steady))
    return out


def deadline_for(nbytes_: int, profile: LinkProfile, rounds: int) -> float:
    """A generous bound on one probe pair: set-up plus rounds at a tenth of the uplink."""
    rate = min(profile.up_mbit, profile.down_mbit) * 1e6 / 8
    return 60.0 + rounds * nbytes_ / (0.1 * rate)


# ---- the sections ---------------------------------------------------------------------------


def profile_path(bench: Bench, profile: LinkProfile, path: str, sizes: list[str],
                 repeats: int) -> dict[str, Any]:
    """Goodput (ours, tcp cubic/bbr, bare) with the CNN, and delivery time of every size."""
    sender, receiver, listens = bench.pair(path, profile, profile)
    out: dict[str, Any] = {"profile": profile.name, "path": path}
    first = sizes[0]
    _, first_bytes = bench.shape_files[first]
    deliveries: dict[str, Any] = {}
    for label in sizes:
        _, size = bench.shape_files[label]
        # the goodput payload repeats; bigger ones are delivered once (bounded run time)
        rounds = repeats if label == first else 1
        rec = bench.on_path("ours", path, sender, receiver, label, rounds, listens,
                            deadline_for(size, profile, rounds))
        times = [t for t in rec.get("times", []) if t > 0]
        deliveries[label] = {"bytes": size, "kind": rec.get("kind"),
                             "connect_s": rec.get("connect_s"),
                             "delivery_s": rnd(median(times)), "times": rec.get("times"),
                             "mb_s": rnd(goodput(rec)), "tries": rec.get("tries"),
                             **({"error": str(rec["error"])[:200]} if rec.get("error") else {})}
        log(f"  {profile.name}/{path} ours {label}: {rec.get('kind')}, times {times}")
    out["deliveries"] = deliveries
    out["kind"] = deliveries[first]["kind"]
    out["connect_s"] = deliveries[first]["connect_s"]
    out["ours_mb_s"] = deliveries[first]["mb_s"]
    out["goodput_bytes"] = first_bytes
    out["tcp"] = tcp_figures(sender, receiver, first_bytes, repeats,
                             deadline_for(first_bytes, profile, 1))
    log(f"  {profile.name}/{path} tcp: {out['tcp']}")
    if path != "zmq":
        bare = bench.on_path("bare", path, sender, receiver, first, repeats, listens,
                             deadline_for(first_bytes, profile, repeats))
        out["bare_kind"] = bare.get("kind")
        out["bare_mb_s"] = rnd(goodput(bare))
        log(f"  {profile.name}/{path} bare: {bare.get('kind')}, times {bare.get('times')}")
    else:
        out["bare_kind"] = out["bare_mb_s"] = None
    cubic = out["tcp"].get("cubic")
    out["ours_vs_tcp"] = rnd(out["ours_mb_s"] / cubic) if out["ours_mb_s"] and cubic else None
    out["ours_vs_bare"] = (rnd(out["ours_mb_s"] / out["bare_mb_s"])
                           if out["ours_mb_s"] and out["bare_mb_s"] else None)
    return out


def setup_times(bench: Bench, repeats: int) -> dict[str, Any]:
    """Link set-up (first ping answered, ICE included) at 20 ms RTT, fresh pairs."""
    bench.shapes("tiny", flat_shapes(64 * 1024, 1))
    out: dict[str, Any] = {}
    for path in ("direct", "relay"):
        samples, kinds = [], []
        for _ in range(repeats):
            sender, receiver, listens = bench.pair(path, SETUP_PROFILE, SETUP_PROFILE)
            rec = bench.run("ours", sender, receiver, "tiny", 1, listens, 60.0)
            kinds.append(rec.get("kind"))
            if rec.get("kind") == KIND[path] and rec.get("connect_s") is not None:
                samples.append(float(rec["connect_s"]))
        out[path] = {"median_s": rnd(median(samples)), "samples": samples, "kinds": kinds}
        log(f"  set-up {path}: {samples} ({kinds})")
    return out


def target_goodput(bench: Bench, label: str, repeats: int) -> list[dict[str, Any]]:
    _, size = bench.shape_files[label]
    rows = []
    for name, a, b, minimum in TARGET_CASES:
        for path in ("direct", "relay"):
            sender, receiver, listens = bench.pair(path, a, b)
            ours = bench.on_path("ours", path, sender, receiver, label, repeats, listens,
                                 deadline_for(size, a, repeats))
            tcp = tcp_figures(sender, receiver, size, repeats, deadline_for(size, a, 1))
            bare = bench.on_path("bare", path, sender, receiver, label, repeats, listens,
                                 deadline_for(size, a, repeats))
            o, c = goodput(ours), tcp.get("cubic")
            ratio = o / c if o and c else None
            row = {"case": name, "path": path, "bytes": size, "ours_kind": ours.get("kind"),
                   "ours_mb_s": rnd(o), "tcp": tcp, "bare_kind": bare.get("kind"),
                   "bare_mb_s": rnd(goodput(bare)), "ratio_vs_tcp_cubic": rnd(ratio),
                   "ratio_vs_tcp_bbr": rnd(o / tcp["bbr"]) if o and tcp.get("bbr") else None,
                   "target": f">= {minimum}x tcp cubic, same path",
                   "pass": ratio is not None and ratio >= minimum
                   and ours.get("kind") == KIND[path]}
            log(f"  target {name} {path}: {row}")
            rows.append(row)
    return rows


def swarm(profile: LinkProfile, tmp: Path, epochs: int,
          lanes: int | None = None) -> dict[str, Any]:
    """Four peers behind port-restricted NATs on ``profile`` train ``epochs`` epochs."""
    lane_args = ["--lanes", str(lanes)] if lanes is not None else []
    out: dict[str, Any] = {"profile": profile.name, "peers": SWARM_PEERS, "epochs": epochs}
    started = time.monotonic()
    with NatLab(profile=None) as lab, LocalSwarm(tmp / f"swarm-{profile.name}") as sw:
        sw.start_lab_services(lab, TURN_SECRET)
        homes = [lab.add_home(f"s{i}", NatType.PORT_RESTRICTED, profile=profile)
                 for i in range(SWARM_PEERS)]
        for num, home in enumerate(homes):
            sw.start_peer(num, SWARM_PEERS, epochs, "--merge-wait", "300", *lane_args,
                          host=home.host, listen=None)
        codes = sw.wait_peers(900)
        out["exit_codes"] = {str(k): v for k, v in codes.items()}
        ids = {n: str((sw.events(n, "start") or [{}])[0].get("peer_id"))
               for n in range(SWARM_PEERS)}
        sending = {n: {e["epoch"]: e for e in sw.events(n, "sending")} for n in ids}
        rounds, lost, ratios, accs = [], [], [], []
        rate = profile.up_mbit * 1e6 / 8
        for n in ids:
            for ep in sw.events(n, "epoch"):
                e = int(ep["epoch"])
                snd = sending[n].get(e)
                if snd is None:
                    continue
                # whoever sent to n this epoch must have been merged by n
                from_nums = [m for m in ids if m != n and ids[n] in
                             (sending[m].get(e) or {}).get("sent_to", [])]
                senders = {ids[m] for m in from_nums}
                # the exchange: from the last of these sends (or n's own) starting to n's
                # merge, so that neighbours still training (skew) are not counted
                start = max([float(snd["t"])] + [float(sending[m][e]["t"]) for m in from_nums])
                exchange_s = float(ep["t"]) - start
                wait_s = start - float(snd["t"])
                bound = float(snd["bytes"]) * len(snd["sent_to"]) / rate
                ratios.append(exchange_s / bound if bound else None)
                rounds.append({"peer": n, "epoch": e, "exchange_s": round(exchange_s, 3),
                               "waited_for_training_s": round(wait_s, 3),
                               "from_own_send_s": round(float(ep["t"]) - float(snd["t"]), 3),
                               "bound_s": round(bound, 3)})
                missing = senders - set(ep.get("merged_from", []))
                if missing:
                    lost.append({"peer": n, "epoch": e, "missing": sorted(str(m) for m in missing)})
            last = sw.events(n, "epoch")
            if last:
                accs.append(float(last[-1]["acc_after"]))
        complete = all(len(sw.events(n, "epoch")) == epochs for n in ids)
    good = [r for r in ratios if r is not None]
    out.update({
        "rounds": rounds, "round_s": rnd(median([r["exchange_s"] for r in rounds])),
        "bound_s": rnd(median([r["bound_s"] for r in rounds])),
        "round_vs_bound": rnd(median(good)), "final_accuracy": rnd(median(accs), 2),
        "all_epochs_done": complete, "lost": lost,
        "no_model_lost": complete and not lost, "elapsed_s": round(time.monotonic() - started, 1)})
    log(f"  swarm {profile.name}: round {out['round_s']} s vs bound {out['bound_s']} s, "
        f"acc {out['final_accuracy']}, lost {lost}, codes {codes}")
    return out


# ---- main -----------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default=",".join(PROFILES),
                        help=f"comma-separated, of {', '.join(PROFILES)} (default all)")
    parser.add_argument("--paths", default=",".join(PATHS), help="zmq,direct,relay")
    parser.add_argument("--repeats", type=int, default=3, help="median of N (default 3)")
    parser.add_argument("--sizes", default="cnn,resnet18",
                        help="payloads delivered: cnn (4.8 MB), resnet18 (46.8 MB); the "
                        "first is the goodput payload")
    parser.add_argument("--target-mb", type=float, default=10.0,
                        help="payload of the goodput-target cases, MB (default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="cable only, CNN only, 1 repeat, 4.8 MB target payload")
    parser.add_argument("--lanes", type=int, default=None,
                        help="WebRTC peer connections per link for our transfers (default: "
                        "HostConfig's); 1 = one SCTP association, as bare aiortc")
    parser.add_argument("--skip-swarm", action="store_true")
    parser.add_argument("--skip-targets", action="store_true",
                        help="leave out the set-up and goodput-target cases")
    parser.add_argument("--epochs", type=int, default=SWARM_EPOCHS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.profiles, args.sizes, args.repeats, args.target_mb = "cable", "cnn", 1, 4.8
    args.profiles = [p for p in args.profiles.split(",") if p]
    args.paths = [p for p in args.paths.split(",") if p]
    args.sizes = [s for s in args.sizes.split(",") if s]
    for name, values, allowed in (("profile", args.profiles, PROFILES),
                                  ("path", args.paths, PATHS), ("size", args.sizes, SIZES)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            parser.error(f"unknown or no {name}(s) {bad}: choose from {', '.join(allowed)}")
    if args.lanes is not None and not 1 <= args.lanes <= 16:
        parser.error(f"--lanes must be 1..16, got {args.lanes}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if not 0.1 <= args.target_mb <= 1000:
        parser.error(f"--target-mb must be 0.1..1000, got {args.target_mb}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    reason = available(coturn=True)
    if reason is not None:
        log(f"wan benchmark cannot run: {reason}")
        return 2
    t0 = time.monotonic()
    lanes = lanes_info()
    lanes["used"] = args.lanes if args.lanes is not None else lanes["default_lanes"]
    figures: dict[str, Any] = {"lanes": lanes, "repeats": args.repeats,
                               "tcp_reference": "one flow, cubic (bbr shown)"}
    with tempfile.TemporaryDirectory(prefix="wanbench-") as tmpname, NatLab() as lab, \
            LocalSwarm(Path(tmpname) / "svc") as services:
        tmp = Path(tmpname)
        rdv, turn = services.start_lab_services(lab, TURN_SECRET)
        bench = Bench(lab, f"{rdv.ip}:{services.rendezvous_port}", tmp, args.lanes)
        log(f"lab {lab.name}: rendezvous {bench.rendezvous}, coturn {turn.ip}:3478, "
            f"lanes {lanes}")
        for label in args.sizes:
            bench.shapes(label, SIZES[label]())
        links = []
        for name in args.profiles:
            for path in args.paths:
                log(f"{name} / {path}")
                links.append(profile_path(bench, PROFILES[name], path, args.sizes,
                                          args.repeats))
        figures["links"] = links
        if not args.skip_targets:
            log("set-up at 20 ms RTT")
            figures["setup"] = setup_times(bench, max(3, args.repeats))
            bench.shapes("target", flat_shapes(int(args.target_mb * 1e6)))
            log("goodput targets")
            figures["target_goodput"] = target_goodput(bench, "target", args.repeats)
    swarms = []
    if not args.skip_swarm:
        with tempfile.TemporaryDirectory(prefix="wanswarm-") as tmpname:
            for name in args.profiles:
                log(f"swarm on {name}")
                swarms.append(swarm(PROFILES[name], Path(tmpname), args.epochs, args.lanes))
    figures["swarms"] = swarms
    figures["targets"] = targets(figures)
    figures["elapsed_s"] = round(time.monotonic() - t0, 1)
    report(figures)
    print(json.dumps(figures))
    return 0


def targets(figures: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row in figures.get("target_goodput", []):
        out[f"goodput_{row['path']}_{row['case']}"] = {
            "target": row["target"], "value": row["ratio_vs_tcp_cubic"], "pass": row["pass"]}
    for path, info in figures.get("setup", {}).items():
        value = info["median_s"]
        out[f"setup_{path}_20ms"] = {"target": f"median < {TARGET_SETUP_S[path]} s",
                                     "value": value,
                                     "pass": value is not None and value < TARGET_SETUP_S[path]}
    for sw in figures.get("swarms", []):
        if sw["profile"] == "cable":
            value = sw["round_vs_bound"]
            out["swarm_round_cable"] = {"target": f"<= {TARGET_SWARM_RATIO}x lower bound",
                                        "value": value,
                                        "pass": value is not None
                                        and value <= TARGET_SWARM_RATIO}
    if figures.get("swarms"):
        out["no_epoch_lost_a_model"] = {
            "target": "every epoch merged every model sent to it",
            "value": [sw["lost"] for sw in figures["swarms"]],
            "pass": all(sw["no_model_lost"] for sw in figures["swarms"])}
    return out


def report(figures: dict[str, Any]) -> None:
    print(f"WebRTC lanes: {figures['lanes']}; TCP reference: one flow, cubic (bbr shown)")
    print(f"\n{'profile':<8} {'path':<7} {'kind':<14} {'setup s':>7} {'ours':>6} {'cubic':>6} "
          f"{'bbr':>6} {'bare':>6} {'/tcp':>5} {'/bare':>5}  deliveries (s)   [MB/s]")
    for r in figures.get("links", []):
        dl = ", ".join(f"{k} {fmt(v['delivery_s'])}" for k, v in r["deliveries"].items())
        print(f"{r['profile']:<8} {r['path']:<7} {r['kind'] or 'FAILED':<14} "
              f"{fmt(r['connect_s']):>7} {fmt(r['ours_mb_s']):>6} {fmt(r['tcp'].get('cubic')):>6} "
              f"{fmt(r['tcp'].get('bbr')):>6} {fmt(r['bare_mb_s']):>6} "
              f"{fmt(r['ours_vs_tcp']):>5} {fmt(r['ours_vs_bare']):>5}  {dl}")
    if figures.get("setup"):
        print("\nset-up at 20 ms RTT: " + ", ".join(
            f"{p} median {fmt(i['median_s'], '.3f')} s of {i['samples']}"
            for p, i in figures["setup"].items()))
    if figures.get("target_goodput"):
        print(f"\n{'case':<16} {'path':<7} {'ours':>6} {'cubic':>6} {'bbr':>6} {'bare':>6} "
              f"{'/cubic':>6} {'/bbr':>5}")
        for r in figures["target_goodput"]:
            print(f"{r['case']:<16} {r['path']:<7} {fmt(r['ours_mb_s']):>6} "
                  f"{fmt(r['tcp'].get('cubic')):>6} {fmt(r['tcp'].get('bbr')):>6} "
                  f"{fmt(r['bare_mb_s']):>6} {fmt(r['ratio_vs_tcp_cubic']):>6} "
                  f"{fmt(r['ratio_vs_tcp_bbr']):>5}")
    if figures.get("swarms"):
        print(f"\n{'swarm':<8} {'round s':>7} {'bound s':>7} {'ratio':>5} {'acc %':>6} lost")
        for s in figures["swarms"]:
            print(f"{s['profile']:<8} {fmt(s['round_s']):>7} {fmt(s['bound_s']):>7} "
                  f"{fmt(s['round_vs_bound']):>5} {fmt(s['final_accuracy']):>6} "
                  f"{'none' if s['no_model_lost'] else s['lost'] or 'incomplete'}")
    print("\ntargets:")
    for name, t in figures["targets"].items():
        print(f"  {'PASS' if t['pass'] else 'FAIL'} {name}: {t['value']} ({t['target']})")
    print(f"ran {figures.get('elapsed_s', 0):.0f} s")


if __name__ == "__main__":
    sys.exit(main())
