"""Links like the internet: link profiles and the user-space "wire" that emulates them.

This kernel has ``tbf``/``htb`` but no ``netem``, so delay and jitter need user space. The wire
(``wire.c``, compiled on demand with ``cc -O2`` into :data:`WIRE_CACHE`) creates one TAP
device in each of two namespaces and copies Ethernet frames between them, per direction
through a serialising rate limit with a tail-drop queue, Bernoulli loss, and a one-way delay
with jitter (FIFO: never reordering). In the lab it replaces the veth between a router's WAN
(or a public host's ``eth0``) and the internet bridge; *up* is from the home towards the bridge.
Its counters live in a small mmap'ed stats file, always current (:meth:`Wire.stats`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from testkit.natlab.system import NatLabError, terminate

log = logging.getLogger(__name__)

WIRE_SOURCE = Path(__file__).with_name("wire.c")
WIRE_CACHE = Path("/var/cache/peerlearn-natlab")
"""Where the compiled wire is kept, one binary per hash of its source and flags."""
CFLAGS = ("-O2", "-Wall")

MIN_QUEUE_BYTES = 64 * 1024
"""The smallest tail-drop queue of a rate-limited direction."""

COUNTERS = ("rx_packets", "rx_bytes", "packets", "bytes", "dropped_queue", "dropped_loss",
            "dropped_write", "backlog_max_bytes", "late_ns")
"""Per direction, in the stats file's order: frames read from the sending side and their
bytes; frames delivered and their bytes; dropped by the full queue, by random loss, by a
failed write; the largest queue backlog seen (IP bytes waiting to be serialised); the sum
over delivered frames of how late each was released (ns after its due time)."""
_MAGIC = 0x3130455249574C50  # "PLWIRE01"
_HEADER = struct.Struct("<4Q")


@dataclass(frozen=True)
class LinkProfile:
    """An access link: what a home's (or a public host's) line to the internet does."""

    name: str
    """A label (the key in :data:`PROFILES` for the named ones)."""
    up_mbit: float
    """Uplink rate (from the home towards the internet), Mbit/s of IP packets."""
    down_mbit: float
    """Downlink rate (from the internet to the home), Mbit/s of IP packets."""
    delay_ms: float
    """ONE-WAY delay added in each direction of this link: the RTT from this host to an
    unshaped server is 2 * delay_ms, between two hosts with profiles 2 * (d1 + d2)."""
    jitter_ms: float = 0.0
    """Each packet's delay is delay_ms plus uniform [-jitter_ms, +jitter_ms], but never before
    the previous packet of its direction (no reordering: under load the delay leans towards
    +jitter_ms)."""
    loss_pct: float = 0.0
    """Random (Bernoulli) loss per direction, percent of the packets."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a link profile needs a name")
        for field in ("up_mbit", "down_mbit"):
            if not getattr(self, field) > 0:
                raise ValueError(f"link profile {self.name}: {field} must be > 0, "
                                 f"got {getattr(self, field)}")
        if not 0 <= self.delay_ms <= 10_000:
            raise ValueError(f"link profile {self.name}: delay_ms must be 0..10000, "
                             f"got {self.delay_ms}")
        if not 0 <= self.jitter_ms <= self.delay_ms:
            raise ValueError(f"link profile {self.name}: jitter_ms must be 0..delay_ms "
                             f"({self.delay_ms}), got {self.jitter_ms}")
        if not 0 <= self.loss_pct <= 100:
            raise ValueError(f"link profile {self.name}: loss_pct must be 0..100, "
                             f"got {self.loss_pct}")

    def queue_bytes(self, mbit: float) -> int:
        """The tail-drop queue of a direction at ``mbit``: one bandwidth-delay product of a
        path between two homes with this profile (RTT 4 * (delay + jitter)), at least
        :data:`MIN_QUEUE_BYTES`."""
        return max(MIN_QUEUE_BYTES,
                   int(mbit * 1e6 / 8 * 4 * (self.delay_ms + self.jitter_ms) / 1000))

    def summary(self) -> str:
        """``20/100 Mbit/s, 20 ms, 0.05 % loss`` (for listings)."""
        text = f"{self.up_mbit:g}/{self.down_mbit:g} Mbit/s, {self.delay_ms:g} ms"
        if self.jitter_ms:
            text += f" ± {self.jitter_ms:g}"
        if self.loss_pct:
            text += f", {self.loss_pct:g} % loss"
        return text


PROFILES: dict[str, LinkProfile] = {p.name: p for p in (
    LinkProfile("fiber", 100, 100, 5),
    LinkProfile("cable", 20, 100, 20, loss_pct=0.05),
    LinkProfile("dsl", 5, 25, 30, loss_pct=0.2),
    LinkProfile("mobile", 10, 30, 40, jitter_ms=10, loss_pct=1),
    LinkProfile("far", 50, 50, 75),
)}
"""The named profiles (issue 11): home access links, and ``far`` for another continent."""


def resolve_profile(profile: LinkProfile | str | None) -> LinkProfile | None:
    """A :class:`LinkProfile`, or a name from :data:`PROFILES`, or None (no emulated link)."""
    if profile is None or isinstance(profile, LinkProfile):
        return profile
    if isinstance(profile, str):
        try:
            return PROFILES[profile]
        except KeyError:
            raise ValueError(f"no link profile {profile!r}; named profiles: "
                             f"{', '.join(PROFILES)}") from None
    raise TypeError(f"a link profile is a LinkProfile, a name or None, not {profile!r}")


def wire_available() -> str | None:
    """None when wires can run here, else why not (no C compiler, no TUN device)."""
    if shutil.which("cc") is None:
        return "link profiles need a C compiler for the wire (apt-get install gcc)"
    if not os.path.exists("/dev/net/tun"):
        return "link profiles need /dev/net/tun (the tun kernel module)"
    return None


def wire_binary(cache: Path = WIRE_CACHE) -> Path:
    """The compiled wire, built on first use (``cc -O2``) and cached by its source's hash."""
    source = WIRE_SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    for directory in (cache, Path(tempfile.gettempdir()) / "peerlearn-natlab"):
        binary = directory / f"wire-{key}"
        if binary.exists():
            return binary
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            break
    else:
        raise NatLabError(f"no writable cache directory for the wire (tried {cache})")
    reason = wire_available()
    if reason is not None:
        raise NatLabError(reason)
    tmp = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    proc = subprocess.run(["cc", *CFLAGS, "-o", str(tmp), str(WIRE_SOURCE)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise NatLabError(f"cc failed to build the wire ({WIRE_SOURCE}):\n{proc.stderr}")
    tmp.replace(binary)  # atomic: concurrent labs may build it at the same time
    log.info("natlab: built %s", binary)
    return binary


def read_stats(path: Path) -> dict[str, dict[str, int]]:
    """The counters of a wire's stats file: ``{"up": {...}, "down": {...}}`` (:data:`COUNTERS`)."""
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise NatLabError(f"wire stats file {path} is truncated ({len(data)} bytes)")
    magic, _pid, _running, n = _HEADER.unpack_from(data)
    if magic != _MAGIC or n != len(COUNTERS) or len(data) < _HEADER.size + 16 * n:
        raise NatLabError(f"{path} is not a wire stats file of this version")
    values = struct.unpack_from(f"<{2 * n}Q", data, _HEADER.size)
    return {"up": dict(zip(COUNTERS, values[:n], strict=True)),
            "down": dict(zip(COUNTERS, values[n:], strict=True))}


def _spec(mbit: float, profile: LinkProfile) -> str:
    return ",".join(str(v) for v in (
        int(mbit * 1e6), int(profile.delay_ms * 1e6), int(profile.jitter_ms * 1e6),
        profile.loss_pct / 100, profile.queue_bytes(mbit)))


class Wire:
    """A running wire between ``a`` (the home or host side) and ``b`` (the internet bridge)."""

    def __init__(self, name: str, profile: LinkProfile, popen: subprocess.Popen[Any],
                 stats_path: Path, log_path: Path, a: tuple[str, str],
                 b: tuple[str, str]) -> None:
        self.name = name
        self.profile = profile
        self.popen = popen
        self.stats_path = stats_path
        self.log_path = log_path
        self.a = a
        self.b = b

    @property
    def pid(self) -> int:
        return self.popen.pid

    def __repr__(self) -> str:
        return (f"Wire({self.name!r}, {self.profile.name}, {self.a[0]}:{self.a[1]} <-> "
                f"{self.b[0]}:{self.b[1]}, pid {self.pid})")

    def stats(self) -> dict[str, dict[str, int]]:
        """Its counters now, per direction (see :data:`COUNTERS`)."""
        return read_stats(self.stats_path)

    def cpu_seconds(self) -> float:
        """User + system CPU time the wire used so far (``/proc/PID/stat``). System time also
        holds the kernel's work on the frames it writes (bridge, routing, the receiver's TCP
        stack run in the writer's context), so it over-states the wire's own cost."""
        return sum(cpu_times(self.pid))

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the wire so far."""
        return cpu_times(self.pid)

    def stop(self) -> None:
        """SIGTERM it (its TAPs vanish with it), SIGKILL after a grace; safe to call twice."""
        terminate([self.popen], grace=2.0)

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "profile": asdict(self.profile), "stats": str(self.stats_path),
                "log": str(self.log_path), "a": list(self.a), "b": list(self.b)}


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        raise NatLabError(f"no process {pid}") from None
    fields = stat.rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def start_wire(name: str, profile: LinkProfile, a: tuple[str, str], b: tuple[str, str],
               rundir: Path, *, seed: int | None = None, ready_timeout: float = 10.0) -> Wire:
    """Start a wire with TAP ``a[1]`` in namespace ``a[0]`` and ``b[1]`` in ``b[0]``; uplink
    (``profile.up_mbit``) is a -> b. Returns once both TAPs exist (still down, no address)."""
    binary = wire_binary()
    rundir.mkdir(parents=True, exist_ok=True)
    stats_path = rundir / f"wire-{name}.stats"
    log_path = rundir / f"wire-{name}.log"
    argv = [str(binary), "--a-netns", f"/run/netns/{a[0]}", "--a-if", a[1],
            "--b-netns", f"/run/netns/{b[0]}", "--b-if", b[1],
            "--up", _spec(profile.up_mbit, profile), "--down", _spec(profile.down_mbit, profile),
            "--stats", str(stats_path), "--realtime"]
    if seed is not None:
        argv += ["--seed", str(seed)]
    with open(log_path, "w") as log_file:
        popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log_file,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    wire = Wire(name, profile, popen, stats_path, log_path, a, b)
    assert popen.stdout is not None
    ready, _, _ = select.select([popen.stdout], [], [], ready_timeout)
    line = popen.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        wire.stop()
        raise NatLabError(f"wire {name} ({a[0]}:{a[1]} <-> {b[0]}:{b[1]}) did not start: "
                          + log_path.read_text(errors="replace").strip())
    log.info("natlab: wire %s (%s) pid %d", name, profile.summary(), popen.pid)
    return wire


def kill_recorded_wire(pid: int, stats_path: str, grace: float = 2.0) -> None:
    """Stop a wire recorded in a lab's state file, if ``pid`` still is that wire."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return
    if stats_path.encode() not in cmdline:
        return  # the pid was reused by something else
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return
            try:  # reap it if it is our child (a lab torn down by the process that built it)
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            time.sleep(0.02)
