"""Probes with real sockets inside lab namespaces: UDP round trips, UDP delivery (loss) and TCP
bulk goodput. Each side is a small child Python process in its namespace (``Host.run`` /
``Host.check_output``); the results come back as one JSON line.

The destination must be reachable from the source: a public host or server, or a home's host,
which gets a temporary port forward on its router for the probe (so two NATed homes can measure
the physical path between them).
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testkit.natlab.hosts import Host
from testkit.natlab.system import NatLabError, python_env, run, terminate

_CC_AVAILABLE = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")

# argv: ready; echoes every datagram back to its sender. Probes come one at a time, so it
# sleeps until shortly before the next one is due (the shortest gap seen) and then polls: its
# own wake-up (a fraction of a ms in a VM) stays out of the measured RTT.
_UDP_ECHO = """\
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
print("ready", s.getsockname()[1], flush=True)
last = shortest = None
while True:
    got = None
    now = time.perf_counter()
    if last is not None and shortest is not None and now < last + shortest + 0.005:
        wake = last + shortest - 0.0015
        if now < wake:
            s.settimeout(wake - now)
            try:
                got = s.recvfrom(65535)
            except TimeoutError:
                pass
        s.setblocking(False)
        while got is None and time.perf_counter() < last + shortest + 0.005:
            try:
                got = s.recvfrom(65535)
            except BlockingIOError:
                pass
    if got is None:
        s.setblocking(True)
        got = s.recvfrom(65535)
    t = time.perf_counter()
    s.sendto(*got)
    if last is not None:
        shortest = t - last if shortest is None else min(shortest, t - last)
    last = t
"""

# argv: ip port count timeout gap; prints the RTTs (seconds) of the echoes that came back.
_UDP_PING = """\
import json, socket, struct, sys, time
ip, port, count, timeout, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
    float(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((ip, port))
s.settimeout(timeout)
try:  # one echo first, untimed: it also resolves ARP across the emulated links
    s.send(struct.pack("!I", 0xFFFFFFFF))
    while s.recv(2048)[:4] != struct.pack("!I", 0xFFFFFFFF):
        pass
except (TimeoutError, ConnectionRefusedError):
    pass
rtts = []
for seq in range(count):
    t0 = time.perf_counter()
    s.send(struct.pack("!I", seq) + bytes(60))
    end = t0 + timeout
    # sleep until shortly before the earliest echo seen so far, then poll: the probe's own
    # wake-up (a fraction of a ms in a VM) stays out of the measured RTT
    early = t0 + min(rtts) - 0.0015 if rtts else t0
    while (left := end - time.perf_counter()) > 0:
        now = time.perf_counter()
        s.settimeout(max(0.0, early - now) if now < early else 0.0)
        try:
            data = s.recv(2048)
        except (BlockingIOError, TimeoutError):
            continue
        except ConnectionRefusedError:
            break
        if data[:4] == struct.pack("!I", seq):
            rtts.append(time.perf_counter() - t0)
            break
    time.sleep(gap)
print(json.dumps(rtts))
"""

# argv: ready; counts distinct sequence numbers until stdin closes, then prints the count and
# how many datagrams this namespace's UDP dropped for full socket buffers meanwhile.
_UDP_SINK = """\
import select, socket, struct, sys
def rcvbuf_errors():
    lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.setsockopt(socket.SOL_SOCKET, 33, 1 << 25)  # SO_RCVBUFFORCE (root): 32 MB
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 25)
s.bind(("0.0.0.0", 0))
errors = rcvbuf_errors()
print("ready", s.getsockname()[1], flush=True)
seen = set()
while True:
    r, _, _ = select.select([s, sys.stdin], [], [])
    if s in r:
        data = s.recv(65535)
        seen.add(struct.unpack("!I", data[:4])[0])
    if sys.stdin in r and not sys.stdin.readline():
        break
print(len(seen), rcvbuf_errors() - errors, flush=True)
"""

# argv: ip port count gap size; sends count numbered datagrams, gap seconds apart.
_UDP_BLAST = """\
import socket, struct, sys, time
ip, port, count, gap, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
    float(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
pad = bytes(max(0, size - 4))
start = time.perf_counter()
for seq in range(count):
    while time.perf_counter() < start + seq * gap:
        pass
    s.sendto(struct.pack("!I", seq) + pad, (ip, port))
"""

# argv: nbytes; accepts one connection, reads nbytes (or to EOF), acknowledges the count and
# the seconds its second half took to arrive (the steady state, after slow start).
_TCP_SINK = """\
import socket, struct, sys, time
n = int(sys.argv[1])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 0))
srv.listen(1)
print("ready", srv.getsockname()[1], flush=True)
c, _ = srv.accept()
buf = memoryview(bytearray(1 << 20))
got = 0
half = None
while got < n:
    k = c.recv_into(buf)
    if not k:
        break
    got += k
    if half is None and got >= n // 2:
        half, at_half = time.perf_counter(), got
end = time.perf_counter()
c.sendall(struct.pack("!Qd", got, (n - at_half) / (end - half) if half and end > half else 0.0))
c.close()
"""

# argv: ip port nbytes cc; sends nbytes with congestion control cc, waits for the receiver's
# acknowledgement; prints seconds from connected to acknowledged, the count and the cc used.
_TCP_SOURCE = """\
import json, socket, struct, sys, time
ip, port, n, cc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
s.connect((ip, port))
t0 = time.perf_counter()
chunk = memoryview(bytes(1 << 20))
left = n
while left > 0:
    k = min(left, len(chunk))
    s.sendall(chunk[:k])
    left -= k
s.shutdown(socket.SHUT_WR)
ack = b""
while len(ack) < 16:
    part = s.recv(16 - len(ack))
    if not part:
        break
    ack += part
seconds = time.perf_counter() - t0
used = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\\0").decode()
got, steady = struct.unpack("!Qd", ack) if len(ack) == 16 else (-1, 0.0)
print(json.dumps({"seconds": seconds, "bytes": got, "cc": used, "steady": steady}))
"""


@contextlib.contextmanager
def _server(host: Host, src: str, *args: str,
            ready_timeout: float = 10.0) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A child Python running ``src`` in ``host``, once it printed ``ready PORT``."""
    proc = host.run([sys.executable, "-c", src, *args], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    env=python_env())
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], ready_timeout)
        line = proc.stdout.readline() if ready else ""
        fields = line.split()
        if len(fields) != 2 or fields[0] != "ready":
            err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
            raise NatLabError(f"probe server in {host.netns} did not start: {err.strip()}")
        yield proc, int(fields[1])
    finally:
        terminate([proc], grace=1.0)


def _home_of(host: Host) -> Any:
    for home in host.lab.homes.values():
        if home.host is host:
            return home
    return None


@contextlib.contextmanager
def _reach(src: Host, dst: Host, proto: str, port: int) -> Iterator[tuple[str, int]]:
    """The address ``src`` uses for ``dst``'s ``proto`` ``port``: dst's own, or, for a home's
    host seen from outside that home, its router's public address with a temporary forward."""
    home = _home_of(dst)
    if home is None or _home_of(src) is home:
        yield dst.ip, port
        return
    router = home.router
    table = f"natlab_probe_{proto}{port}"
    router.check_output(["nft", "-f", "-"], input=f"""table ip {table} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat - 10; policy accept;
        iifname "wan" ip daddr {home.public_ip} {proto} dport {port} dnat to {dst.ip}
    }}
}}
""")
    try:
        out = router.check_output(["nft", "-e", "-a", "insert", "rule", "ip", "natlab", "forward",
                                   "iifname", "wan", "ip", "daddr", dst.ip, proto, "dport",
                                   str(port), "accept"])
        handle = re.search(r"# handle (\d+)", out)
        try:
            yield home.public_ip, port
        finally:
            if handle:
                router.check_output(["nft", "delete", "rule", "ip", "natlab", "forward",
                                     "handle", handle.group(1)])
    finally:
        router.check_output(["nft", "delete", "table", "ip", table])


def udp_rtt(src: Host, dst: Host, count: int = 20, *, timeout: float = 2.0,
            gap: float = 0.01) -> list[float]:
    """Round-trip times in seconds of ``count`` UDP echoes from ``src`` to ``dst``, one at a
    time, ``gap`` seconds apart (there is no ``ping`` here). Lost echoes (no reply within
    ``timeout``) are left out, so the list may be shorter than ``count``. One untimed echo goes
    first (it also resolves ARP across the links, which costs an extra round trip)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    with _server(dst, _UDP_ECHO) as (_, port), _reach(src, dst, "udp", port) as (ip, p):
        out = src.check_output([sys.executable, "-c", _UDP_PING, ip, str(p), str(count),
                                str(timeout), str(gap)],
                               timeout=count * (timeout + gap) + 30)
    rtts: list[float] = json.loads(out)
    return rtts


def udp_delivery(src: Host, dst: Host, count: int = 5000, *, gap: float = 0.0005,
                 size: int = 200, settle: float = 1.0) -> int:
    """How many of ``count`` numbered UDP datagrams (``size`` bytes, ``gap`` seconds apart)
    sent from ``src`` arrived at ``dst`` (to measure loss; keep ``size / gap`` below the
    link's rate, or the queue drops some too). ``settle``: seconds to wait for the last."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if size < 4:
        raise ValueError(f"size must be >= 4 bytes, got {size}")
    with _server(dst, _UDP_SINK) as (sink, port), _reach(src, dst, "udp", port) as (ip, p):
        src.check_output([sys.executable, "-c", _UDP_BLAST, ip, str(p), str(count), str(gap),
                          str(size)], timeout=count * gap + 30)
        time.sleep(settle)
        assert sink.stdin is not None and sink.stdout is not None
        sink.stdin.close()
        ready, _, _ = select.select([sink.stdout], [], [], 10)
        line = sink.stdout.readline() if ready else ""
    fields = line.split()
    if len(fields) != 2 or not all(f.isdigit() for f in fields):
        raise NatLabError(f"UDP sink in {dst.netns} gave no count")
    if int(fields[1]):
        raise NatLabError(f"the UDP sink in {dst.netns} dropped {fields[1]} datagrams itself "
                          "(socket buffer full): its count does not measure the link")
    return int(fields[0])


def congestion_controls() -> list[str]:
    """The TCP congestion controls this kernel offers now."""
    return _CC_AVAILABLE.read_text().split()


def require_congestion_control(cc: str) -> None:
    """Make ``cc`` available (``modprobe tcp_<cc>`` if needed) or raise NatLabError."""
    if not re.fullmatch(r"[a-z0-9_]{1,15}", cc):
        raise ValueError(f"not a congestion control name: {cc!r}")
    if cc in congestion_controls():
        return
    out = run(["modprobe", f"tcp_{cc}"], check=False) if _has_modprobe() else ""
    if cc not in congestion_controls():
        raise NatLabError(f"TCP congestion control {cc!r} is not available (available: "
                          f"{' '.join(congestion_controls())}; modprobe tcp_{cc} "
                          f"{'failed' if _has_modprobe() else 'not installed (kmod)'}) {out}")


def _has_modprobe() -> bool:
    return shutil.which("modprobe") is not None


@dataclass(frozen=True)
class TcpResult:
    """One TCP bulk transfer measured by :func:`tcp_transfer`."""

    nbytes: int
    seconds: float
    """From connected until the receiver acknowledged the last byte."""
    cc: str
    steady_goodput: float
    """MB/s of the second half of the bytes, timed at the receiver (slow start left out)."""

    @property
    def goodput(self) -> float:
        """MB/s (1e6 bytes/s) over the whole transfer."""
        return self.nbytes / self.seconds / 1e6


def tcp_transfer(src: Host, dst: Host, nbytes: int, cc: str = "cubic", *,
                 timeout: float = 300.0) -> TcpResult:
    """One TCP flow sending ``nbytes`` from ``src`` to ``dst`` with congestion control ``cc``
    (``cubic``, ``bbr``, ...; set per socket), measured (see :class:`TcpResult`)."""
    if nbytes < 1:
        raise ValueError(f"nbytes must be >= 1, got {nbytes}")
    require_congestion_control(cc)
    with _server(dst, _TCP_SINK, str(nbytes)) as (_, port), \
            _reach(src, dst, "tcp", port) as (ip, p):
        out = src.check_output([sys.executable, "-c", _TCP_SOURCE, ip, str(p), str(nbytes), cc],
                               timeout=timeout)
    result = json.loads(out)
    if result["bytes"] != nbytes:
        raise NatLabError(f"TCP probe {src.name} -> {dst.name}: {result['bytes']} of {nbytes} "
                          "bytes acknowledged")
    if result["cc"] != cc:
        raise NatLabError(f"TCP probe used {result['cc']!r}, not {cc!r}")
    return TcpResult(nbytes, float(result["seconds"]), cc, float(result["steady"]) / 1e6)


def tcp_goodput(src: Host, dst: Host, nbytes: int, cc: str = "cubic", *,
                timeout: float = 300.0) -> float:
    """Goodput in MB/s (1e6 bytes/s) of one TCP flow sending ``nbytes`` from ``src`` to ``dst``
    with congestion control ``cc`` (set per socket): from connected until the receiver
    acknowledged every byte, slow start included (:func:`tcp_transfer` has more)."""
    return tcp_transfer(src, dst, nbytes, cc, timeout=timeout).goodput


def summary(rtts: list[float]) -> dict[str, float]:
    """Median, mean, min, max and standard deviation of RTTs, in milliseconds."""
    if not rtts:
        raise ValueError("no RTTs (every echo was lost)")
    ms = [r * 1000 for r in rtts]
    return {"median": statistics.median(ms), "mean": statistics.fmean(ms), "min": min(ms),
            "max": max(ms), "stdev": statistics.pstdev(ms)}
