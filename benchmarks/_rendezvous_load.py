"""Rendezvous load: N simulated peers in one job against one rendezvous process.

    .venv/bin/python benchmarks/_rendezvous_load.py --peers 2000 [--joins 100]
        [--signals-per-s 200] [--generators 4]

The rendezvous runs as its own process (``python -m peerlearn rendezvous`` on a free port, STUN
off). K load-generator processes (multiprocessing, spawn) each hold their share of the N
WebSocket sessions, one aiohttp ClientSession per process; every session is a real protocol
client: challenge, join signed with its own Ed25519 key, heartbeats at the interval the welcome
gives, and the generators send ``signal`` messages between random pairs of the job at a fixed
total rate (relayed for real; each carries its send time).

Once all N are in, this process (the driver, which holds no load sessions) lets ``--joins``
newcomers join and leave one at a time. Measured:

- join delivery: for each newcomer, from the moment it sends ``join`` (just before the
  ``send_bytes``) to each of the N members receiving its ``joined`` -- so it includes the
  rendezvous verifying the join and building the ~N-member welcome. Also reported from the
  newcomer's receipt of its ``welcome``, and the same for ``left`` after the newcomer's ``leave``.
  All processes use ``time.monotonic()`` (CLOCK_MONOTONIC, one clock system-wide on Linux);
- the rendezvous' VmRSS / VmHWM (``/proc/PID/status``) with N sessions, and its CPU seconds
  (``/proc/PID/stat``) while filling and while measuring;
- relayed-signal latency (send -> receipt) and counts;
- errors: sessions closed under us, ``left`` of any of the N, ``error`` frames, missing
  deliveries.

Separating the rendezvous from the generators' own backlog: the sessions are spread over K
processes; a generator decodes only what it must (msgpack of small frames, no schema check) and
runs a 20 ms ticker whose lateness (event-loop lag) is reported per generator with its CPU
seconds. A generator lag p99 far below the latency figures means the figures are the
rendezvous'. Note the machine's cores are shared with the generators (and whatever else runs).

Prints a table and, as the last line, one JSON object (see ``summary`` keys).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import msgpack  # noqa: E402

from overlay.identity import Identity  # noqa: E402
from overlay.protocol import (  # noqa: E402
    MAX_MEMBERS,
    MAX_WELCOME_BYTES,
    MsgType,
    decode,
    encode,
    signed_join,
)

log = logging.getLogger("rendezvous_load")

JOB = "load"
TARGET_JOIN_P99_MS = 200.0
TARGET_RSS_MB = 300.0
SERVER_START_TIMEOUT = 20.0
CONNECT_TIMEOUT = 60.0
"""Bound on one session's connect + challenge + join + welcome (the fill is a burst)."""
SETTLE_S = 1.0
"""Wait after the last measured event before collecting (late deliveries count as missing)."""
TICK_S = 0.02
"""Period of the generators' lag ticker."""


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


# -- the load generator (one process) ----------------------------------------------------------


@dataclass
class _GenStats:
    joined_at: dict[str, list[float]] = field(default_factory=dict)
    """Newcomer peer id -> receipt times of its ``joined`` (one per receiving session)."""
    left_at: dict[str, list[float]] = field(default_factory=dict)
    signal_latency: list[float] = field(default_factory=list)
    signals_sent: int = 0
    signals_received: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    """Sessions whose socket closed while we were not closing it, by close code."""
    lost_members: int = 0
    """``left`` received about one of the N load peers."""
    lags: list[float] = field(default_factory=list)
    measuring: bool = False
    measure_from: float = float("inf")
    """Signals sent at or after this (monotonic) time are counted, on both ends."""


class _Generator:
    def __init__(self, index: int, url: str, count: int, seed: int) -> None:
        self.index = index
        self.url = url
        self.identities = [Identity.generate() for _ in range(count)]
        self.ids = {i.peer_id for i in self.identities}
        self.all_ids: set[str] = set()
        self.stats = _GenStats()
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.owners: list[str] = []  # peer id of each socket
        self.heartbeat_interval = 5.0
        self.rng = random.Random(seed)
        self.closing = False
        self.session: aiohttp.ClientSession | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def fill(self, concurrency: int) -> tuple[list[str], float, int]:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        self.session = aiohttp.ClientSession(connector=connector)
        gate = asyncio.Semaphore(concurrency)
        start = time.monotonic()
        self.tasks.append(asyncio.create_task(self.heartbeats()))  # from the first join on
        results = await asyncio.gather(
            *(self._join(identity, gate) for identity in self.identities), return_exceptions=True
        )
        failures = 0
        for result in results:
            if isinstance(result, BaseException):
                failures += 1
                log.warning("generator %d: a join failed: %r", self.index, result)
        return [i.peer_id for i in self.identities], time.monotonic() - start, failures

    async def _join(self, identity: Identity, gate: asyncio.Semaphore) -> None:
        assert self.session is not None
        async with gate, asyncio.timeout(CONNECT_TIMEOUT):
            ws = await self.session.ws_connect(self.url, max_msg_size=MAX_WELCOME_BYTES,
                                               compress=0, autoping=True)
            msg = await ws.receive()
            _, challenge = decode(msg.data)
            await ws.send_bytes(signed_join(identity, challenge["nonce"], JOB,
                                            meta={"load": self.index}))
            msg = await ws.receive()
            msg_type, welcome = decode(msg.data, max_bytes=MAX_WELCOME_BYTES,
                                       max_items=MAX_MEMBERS)
            if msg_type is not MsgType.WELCOME:
                raise RuntimeError(f"expected welcome, got {msg_type.value}: {welcome}")
            self.heartbeat_interval = float(welcome["heartbeat_interval"])
        self.sockets.append(ws)
        self.owners.append(identity.peer_id)
        self.tasks.append(asyncio.create_task(self._read(ws)))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        stats = self.stats
        unpackb = msgpack.unpackb
        async for msg in ws:
            now = time.monotonic()
            if msg.type is not aiohttp.WSMsgType.BINARY:
                continue
            if not stats.measuring and msg.data[6:13] == b"\xa6joined":
                continue  # filling: a "joined" (map, "type", "joined"); not measured, not decoded
            obj = unpackb(msg.data)
            kind = obj.get("type")
            if kind == "joined":
                peer_id = obj["member"]["peer_id"]
                if stats.measuring and peer_id not in self.all_ids:
                    stats.joined_at.setdefault(peer_id, []).append(now)
            elif kind == "left":
                peer_id = obj["peer_id"]
                if peer_id in self.all_ids:
                    stats.lost_members += 1
                elif stats.measuring:
                    stats.left_at.setdefault(peer_id, []).append(now)
            elif kind == "signal" and obj["data"]["t"] >= stats.measure_from:
                stats.signals_received += 1
                stats.signal_latency.append(now - obj["data"]["t"])
            elif kind == "error":
                stats.errors[obj["code"]] = stats.errors.get(obj["code"], 0) + 1
        if not self.closing:
            code = str(ws.close_code)
            stats.dropped[code] = stats.dropped.get(code, 0) + 1
            log.warning("generator %d: session closed by the server (%s)", self.index,
                        ws.close_code)

    async def heartbeats(self) -> None:
        """Every session heartbeats once per interval, spread evenly over the interval (and
        catching up after a late tick, so a busy generator does not let sessions expire)."""
        frame = encode(MsgType.HEARTBEAT)
        position, sent_at = 0, time.monotonic()
        while True:
            await asyncio.sleep(0.05)
            sockets, now = self.sockets, time.monotonic()
            if not sockets:
                sent_at = now
                continue
            due = int((now - sent_at) * len(sockets) / self.heartbeat_interval)
            sent_at += due * self.heartbeat_interval / len(sockets)
            for _ in range(min(due, len(sockets))):
                ws = sockets[position % len(sockets)]
                position += 1
                if not ws.closed:
                    with contextlib.suppress(ConnectionError):
                        await ws.send_bytes(frame)

    async def signals(self, rate: float) -> None:
        if rate <= 0:
            return
        targets = sorted(self.all_ids)
        step = 1.0 / rate
        next_at = time.monotonic()
        while True:
            next_at += step
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            i = self.rng.randrange(len(self.sockets))
            ws, to = self.sockets[i], self.rng.choice(targets)
            if ws.closed or to == self.owners[i]:
                continue
            sent_at = time.monotonic()
            frame = encode(MsgType.SIGNAL, to=to, kind="candidate",
                           data={"t": sent_at, "g": self.index})
            with contextlib.suppress(ConnectionError):
                await ws.send_bytes(frame)
                if sent_at >= self.stats.measure_from:
                    self.stats.signals_sent += 1

    async def ticker(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(TICK_S)
            if self.stats.measuring:
                self.stats.lags.append(time.monotonic() - before - TICK_S)

    async def close(self) -> None:
        self.closing = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()


async def _generator_async(index: int, conn: Connection, url: str, count: int) -> None:
    gen = _Generator(index, url, count, seed=index)
    cpu0 = time.process_time()
    while True:
        command, arg = await asyncio.to_thread(conn.recv)
        if command == "fill":
            conn.send(await gen.fill(arg))
        elif command == "run":  # arg: (all peer ids, signals per second for this generator)
            gen.all_ids = set(arg[0])
            for coro in (gen.signals(arg[1]), gen.ticker()):
                gen.tasks.append(asyncio.create_task(coro))
            conn.send("ok")
        elif command == "measure":  # arg: the driver's monotonic time (one clock system-wide)
            gen.stats.measuring = True
            gen.stats.measure_from = arg
            cpu0 = time.process_time()
            conn.send("ok")
        elif command == "report":
            gen.stats.measuring = False
            report = dict(vars(gen.stats))
            report["cpu_s"] = time.process_time() - cpu0
            report["open"] = sum(not ws.closed for ws in gen.sockets)
            conn.send(report)
        elif command == "stop":
            await gen.close()
            conn.send("ok")
            return


def _generator_main(index: int, conn: Connection, url: str, count: int) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"gen{index} %(levelname)s %(message)s")
    asyncio.run(_generator_async(index, conn, url, count))


# -- the driver -------------------------------------------------------------------------------


class _Server:
    """The rendezvous as a child process on port 0, its port read back from ``--ready-file``."""

    def __init__(self) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="rendezvous-load-", suffix=".log")  # noqa: SIM115
        self._ready = Path(self.log.name).with_suffix(".ready.json")
        cmd = [sys.executable, "-m", "peerlearn", "rendezvous", "--host", "127.0.0.1",
               "--port", "0", "--stun-port", "-1", "--ready-file", str(self._ready)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = self._wait_port()

    def _wait_port(self) -> int:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rendezvous exited ({self.proc.returncode}): {self.tail()}")
            if self._ready.exists():  # written atomically once the server serves
                return int(json.loads(self._ready.read_text())["port"])
            time.sleep(0.1)
        raise RuntimeError(f"rendezvous did not start in {SERVER_START_TIMEOUT}s: {self.tail()}")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(Path(self.log.name).read_text().splitlines()[-lines:])

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MB."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            fields[name] = value.split()
        return int(fields["VmRSS"][0]) / 1024, int(fields["VmHWM"][0]) / 1024

    def cpu_s(self) -> float:
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        values = stat.rsplit(")", 1)[1].split()
        return (int(values[11]) + int(values[12])) / os.sysconf("SC_CLK_TCK")

    def warnings(self) -> list[str]:
        text = Path(self.log.name).read_text()
        return [line for line in text.splitlines() if " W " in line or " E " in line]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._ready.unlink(missing_ok=True)  # left behind by a killed server
        self.log.close()


class _Newcomer:
    """The driver's measured joins: one fresh peer at a time, join, wait, leave."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.join_sent: dict[str, float] = {}
        self.welcomed: dict[str, float] = {}
        self.leave_sent: dict[str, float] = {}
        self.welcome_bytes: list[int] = []
        self.failures = 0

    async def run(self, joins: int, interval: float) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(joins):
                try:
                    await self._one(session, interval)
                except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError) as exc:
                    self.failures += 1
                    log.warning("a measured join failed: %r", exc)
                await asyncio.sleep(interval)

    async def _one(self, session: aiohttp.ClientSession, interval: float) -> None:
        identity = Identity.generate()
        async with asyncio.timeout(CONNECT_TIMEOUT):
            ws = await session.ws_connect(self.url, max_msg_size=MAX_WELCOME_BYTES, compress=0)
            msg = await ws.receive()
            _, challenge = decode(msg.data)
            frame = signed_join(identity, challenge["nonce"], JOB)
            self.join_sent[identity.peer_id] = time.monotonic()
            await ws.send_bytes(frame)
            msg = await ws.receive()
            self.welcomed[identity.peer_id] = time.monotonic()
            if msg.type is not aiohttp.WSMsgType.BINARY:
                raise RuntimeError(f"no welcome: {msg.type}")
            self.welcome_bytes.append(len(msg.data))
            await asyncio.sleep(interval)
            self.leave_sent[identity.peer_id] = time.monotonic()
            await ws.send_bytes(encode(MsgType.LEAVE))
            await ws.close()


def _request(conns: list[Connection], command: str, args: list[Any] | None = None) -> list[Any]:
    for i, conn in enumerate(conns):
        conn.send((command, None if args is None else args[i]))
    return [conn.recv() for conn in conns]


def run(args: argparse.Namespace) -> dict[str, Any]:
    server = _Server()
    url = f"ws://127.0.0.1:{server.port}/ws"
    ctx = multiprocessing.get_context("spawn")
    shares = [args.peers // args.generators + (i < args.peers % args.generators)
              for i in range(args.generators)]
    conns, procs = [], []
    try:
        for i, count in enumerate(shares):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_generator_main, args=(i, child, url, count), daemon=True)
            proc.start()
            conns.append(parent)
            procs.append(proc)
        cpu_start = server.cpu_s()
        t0 = time.monotonic()
        filled = _request(conns, "fill", [args.concurrency] * len(conns))
        fill_s = time.monotonic() - t0
        cpu_fill = server.cpu_s() - cpu_start
        all_ids = [pid for ids, _, _ in filled for pid in ids]
        fill_failures = sum(f for _, _, f in filled)
        per_gen_rate = args.signals_per_s / len(conns)
        _request(conns, "run", [(all_ids, per_gen_rate)] * len(conns))
        time.sleep(args.warmup)
        _request(conns, "measure", [time.monotonic()] * len(conns))
        rss_before, _ = server.memory_mb()
        cpu0, t_measure = server.cpu_s(), time.monotonic()
        newcomer = _Newcomer(url)
        asyncio.run(newcomer.run(args.joins, args.interval))
        time.sleep(SETTLE_S)
        measure_s = time.monotonic() - t_measure
        cpu_measure = server.cpu_s() - cpu0
        rss_mb, hwm_mb = server.memory_mb()
        reports = _request(conns, "report")
        warnings = server.warnings()
    finally:
        with contextlib.suppress(Exception):
            _request(conns, "stop")
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        server.stop()
    return _summarize(args, locals_=dict(
        fill_s=fill_s, cpu_fill=cpu_fill, fill_failures=fill_failures, rss_before=rss_before,
        rss_mb=rss_mb, hwm_mb=hwm_mb, cpu_measure=cpu_measure, measure_s=measure_s,
        reports=reports, newcomer=newcomer, warnings=warnings, all_ids=all_ids))


def _summarize(args: argparse.Namespace, locals_: dict[str, Any]) -> dict[str, Any]:
    newcomer: _Newcomer = locals_["newcomer"]
    reports: list[dict[str, Any]] = locals_["reports"]
    join_lat, join_lat_w, left_lat, missing = [], [], [], 0
    n_members = len(locals_["all_ids"])
    for pid, sent in newcomer.join_sent.items():
        times = [t for r in reports for t in r["joined_at"].get(pid, [])]
        missing += n_members - len(times)
        join_lat += [t - sent for t in times]
        if pid in newcomer.welcomed:
            join_lat_w += [t - newcomer.welcomed[pid] for t in times]
    for pid, sent in newcomer.leave_sent.items():
        left_lat += [t - sent for r in reports for t in r["left_at"].get(pid, [])]
    signal_lat = [x for r in reports for x in r["signal_latency"]]
    errors: dict[str, int] = {}
    for r in reports:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    dropped_codes: dict[str, int] = {}
    for r in reports:
        for code, n in r["dropped"].items():
            dropped_codes[code] = dropped_codes.get(code, 0) + n
    dropped = sum(dropped_codes.values())
    lost = sum(r["lost_members"] for r in reports)
    open_sessions = sum(r["open"] for r in reports)
    error_count = (sum(errors.values()) + dropped + lost + missing + newcomer.failures
                   + locals_["fill_failures"])
    lags = [x for r in reports for x in r["lags"]]
    p99 = _ms(_percentile(join_lat, 99))
    summary = {
        "peers": n_members,
        "open_sessions": open_sessions,
        "generators": len(reports),
        "joins": len(newcomer.join_sent),
        "fill_s": round(locals_["fill_s"], 2),
        "join_latency_p50_ms": _ms(_percentile(join_lat, 50)),
        "join_latency_p99_ms": p99,
        "join_latency_max_ms": _ms(max(join_lat, default=None)),
        "join_from_welcome_p50_ms": _ms(_percentile(join_lat_w, 50)),
        "join_from_welcome_p99_ms": _ms(_percentile(join_lat_w, 99)),
        "left_latency_p50_ms": _ms(_percentile(left_lat, 50)),
        "left_latency_p99_ms": _ms(_percentile(left_lat, 99)),
        "deliveries": len(join_lat),
        "missing_deliveries": missing,
        "welcome_kb": round(statistics.mean(newcomer.welcome_bytes) / 1024, 1)
        if newcomer.welcome_bytes else None,
        "rss_mb": round(locals_["rss_mb"], 1),
        "hwm_mb": round(locals_["hwm_mb"], 1),
        "server_cpu_fill_s": round(locals_["cpu_fill"], 2),
        "server_cpu_measure_s": round(locals_["cpu_measure"], 2),
        "measure_s": round(locals_["measure_s"], 2),
        "signals": sum(r["signals_sent"] for r in reports),
        "signals_received": sum(r["signals_received"] for r in reports),
        "signal_latency_p50_ms": _ms(_percentile(signal_lat, 50)),
        "signal_latency_p99_ms": _ms(_percentile(signal_lat, 99)),
        "errors": error_count,
        "error_detail": {"error_frames": errors, "dropped_sessions": dropped_codes,
                         "left_of_load_peers": lost, "missing_deliveries": missing,
                         "failed_measured_joins": newcomer.failures,
                         "failed_fill_joins": locals_["fill_failures"],
                         "server_warnings": len(locals_["warnings"])},
        "generator_cpu_s": [round(r["cpu_s"], 2) for r in reports],
        "generator_lag_p99_ms": _ms(_percentile(lags, 99)),
        "generator_lag_max_ms": _ms(max(lags, default=None)),
    }
    summary["targets_met"] = bool(
        p99 is not None and p99 < TARGET_JOIN_P99_MS and summary["rss_mb"] < TARGET_RSS_MB
        and summary["hwm_mb"] < TARGET_RSS_MB and error_count == 0
        and open_sessions == n_members
    )
    for line in locals_["warnings"][:10]:
        log.warning("rendezvous: %s", line)
    return summary


def _print_table(s: dict[str, Any]) -> None:
    rows = [
        ("peers (open sessions)", f"{s['peers']} ({s['open_sessions']}) in {s['generators']} "
                                  f"generator processes, filled in {s['fill_s']} s"),
        ("measured joins", f"{s['joins']}: {s['deliveries']} joined deliveries, "
                           f"{s['missing_deliveries']} missing"),
        ("join -> joined p50 / p99 / max", f"{s['join_latency_p50_ms']} / "
                                           f"{s['join_latency_p99_ms']} / "
                                           f"{s['join_latency_max_ms']} ms (target p99 < "
                                           f"{TARGET_JOIN_P99_MS:g})"),
        ("welcome -> joined p50 / p99", f"{s['join_from_welcome_p50_ms']} / "
                                        f"{s['join_from_welcome_p99_ms']} ms"),
        ("leave -> left p50 / p99", f"{s['left_latency_p50_ms']} / {s['left_latency_p99_ms']} ms"),
        ("welcome size", f"{s['welcome_kb']} KiB"),
        ("rendezvous VmRSS / VmHWM", f"{s['rss_mb']} / {s['hwm_mb']} MB (target < "
                                     f"{TARGET_RSS_MB:g})"),
        ("rendezvous CPU fill / measure", f"{s['server_cpu_fill_s']} s / "
                                          f"{s['server_cpu_measure_s']} s of "
                                          f"{s['measure_s']} s"),
        ("signals sent / received", f"{s['signals']} / {s['signals_received']}"),
        ("signal latency p50 / p99", f"{s['signal_latency_p50_ms']} / "
                                     f"{s['signal_latency_p99_ms']} ms"),
        ("errors", f"{s['errors']} {s['error_detail']}"),
        ("generators: CPU s / lag p99 / max", f"{s['generator_cpu_s']} / "
                                              f"{s['generator_lag_p99_ms']} / "
                                              f"{s['generator_lag_max_ms']} ms"),
        ("targets met", str(s["targets_met"])),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=2000, help="sessions held (default 2000)")
    parser.add_argument("--joins", type=int, default=100,
                        help="measured newcomers, one at a time (default 100)")
    parser.add_argument("--interval", type=float, default=0.1,
                        help="seconds between a newcomer's welcome and leave, and between "
                        "newcomers (default 0.1)")
    parser.add_argument("--signals-per-s", type=float, default=200.0,
                        help="relayed signals per second, all sessions together (default 200)")
    parser.add_argument("--generators", type=int, default=4,
                        help="load-generator processes (default 4)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="joins in flight per generator while filling (default 16)")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of heartbeats and signals before measuring (default 3)")
    args = parser.parse_args(argv)
    if args.peers < 1 or args.generators < 1 or args.joins < 1:
        parser.error("--peers, --generators and --joins must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # killed by a harness: still stop the rendezvous and the generators (run()'s finally)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    summary = run(args)
    _print_table(summary)
    print(json.dumps(summary), flush=True)
    return 0 if summary["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
