"""Real NATs on one Linux machine: network namespaces, veth pairs, a bridge and nftables.

The topology (see ``docs/natlab.md`` and ``/work/shared/NATLAB.md``)::

    [host ns 10.0.K.2] --lan-- [router ns 10.0.K.1 | 203.0.113.N] --wan-- br0 (internet ns)
                                                   public/server ns 203.0.113.M --/

Every interface is created directly inside a namespace of the lab, so nothing ever appears in
(or is routed from) the root namespace; deleting the lab's namespaces deletes everything it made.
Namespaces are named ``<lab>-<host>`` and ``<lab>-gw-<home>``, with ``<lab>`` = ``plab`` plus a
random suffix, so concurrent labs never collide.

Needs root, ``ip`` (iproute2) and ``nft`` (nftables); ``turnserver`` (coturn) for TURN. This
module imports nothing outside the standard library, so it runs anywhere the rendezvous does.
"""

from __future__ import annotations

import argparse
import base64
import enum
import functools
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

STATE_DIR = Path("/run/peerlearn-natlab")
"""Where every lab records what it created, so ``python -m testkit.natlab down`` can undo it."""

GATEWAY_IP = "203.0.113.100"
"""The internet namespace's own address on the bridge; every bridge host's default route."""

_PREFIX = "plab"
_AUTO_NAME = re.compile(r"^plab[0-9a-f]{4}$")
_AUTO_NETNS = re.compile(r"^plab[0-9a-f]{4}-")
_LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_ROOT = Path(__file__).resolve().parent.parent  # so ``python -m testkit.natlab`` works in a netns

STUN_MAGIC = 0x2112A442
_STUN_BINDING_REQUEST = 0x0001
_STUN_BINDING_SUCCESS = 0x0101
_ATTR_MAPPED_ADDRESS = 0x0001
_ATTR_XOR_MAPPED_ADDRESS = 0x0020


class NatLabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


class NatType(enum.StrEnum):
    """How a home router translates and filters (RFC 4787 terms in the docstrings)."""

    PORT_RESTRICTED = "port-restricted"
    """Endpoint-independent mapping, address-and-port-dependent filtering (Linux masquerade)."""
    SYMMETRIC = "symmetric"
    """A new random public port per destination (masquerade fully-random)."""
    FULL_CONE = "full-cone"
    """1:1 NAT: anyone can reach the inner host's UDP ports on the public address."""
    ADDRESS_RESTRICTED = "address-restricted"
    """1:1 NAT, but only from addresses the inner host has sent UDP to (any of their ports)."""


# --------------------------------------------------------------------------- nftables rules


def nat_ruleset(nat: NatType, host_ip: str, public_ip: str) -> str:
    """The nft script for a router with WAN ``wan`` and LAN ``lan`` (NATLAB.md's table).

    Every router gets an ``input`` chain with policy drop (NATLAB.md trap 1): otherwise a punch
    packet to the router creates conntrack state on the router itself and re-maps its ports.
    """
    prerouting = ""
    postrouting = 'oifname "wan" masquerade'
    outbound = 'iifname "lan" oifname "wan" accept'
    inbound = ""
    sets = ""
    if nat is NatType.SYMMETRIC:
        postrouting = 'oifname "wan" masquerade fully-random'
    elif nat in (NatType.FULL_CONE, NatType.ADDRESS_RESTRICTED):
        prerouting = f"""
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "wan" ip daddr {public_ip} meta l4proto udp dnat to {host_ip}
    }}"""
        postrouting = f'oifname "wan" ip saddr {host_ip} snat to {public_ip}'
        if nat is NatType.FULL_CONE:
            inbound = f'iifname "wan" oifname "lan" ip daddr {host_ip} meta l4proto udp accept'
        else:
            sets = """
    set contacted {
        type ipv4_addr . inet_service; flags dynamic, timeout; timeout 5m;
    }"""
            outbound = (
                'iifname "lan" oifname "wan" meta l4proto udp'
                " update @contacted { ip daddr . udp sport }\n        " + outbound
            )
            inbound = 'iifname "wan" oifname "lan" ip saddr . udp dport @contacted accept'
    return f"""table ip natlab {{{sets}
    chain input {{
        type filter hook input priority filter; policy drop;
        iif "lo" accept
        ct state established,related accept
        iifname "lan" accept
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        {outbound}
        {inbound}
    }}{prerouting}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        {postrouting}
    }}
}}
"""


def loss_ruleset(percent: int) -> str:
    """Drop ``percent`` % of packets crossing ``wan``, each direction on its own; the rules
    count what they drop (:meth:`NatLab.loss_dropped`)."""
    script = "add table ip natlab_loss\ndelete table ip natlab_loss\n"
    if percent > 0:
        match = "" if percent >= 100 else f"numgen random mod 100 < {percent} "  # max is 99
        script += f"""table ip natlab_loss {{
    chain rx {{
        type filter hook prerouting priority raw; policy accept;
        iifname "wan" {match}counter drop
    }}
    chain tx {{
        type filter hook postrouting priority 300; policy accept;
        oifname "wan" {match}counter drop
    }}
}}
"""
    return script


# --------------------------------------------------------------------------- STUN (RFC 8489)


def stun_binding_request(transaction_id: bytes | None = None) -> bytes:
    """A bare Binding request (RFC 8489 section 5), no attributes."""
    tid = transaction_id if transaction_id is not None else secrets.token_bytes(12)
    if len(tid) != 12:
        raise ValueError(f"STUN transaction id must be 12 bytes, got {len(tid)}")
    return struct.pack("!HHI", _STUN_BINDING_REQUEST, 0, STUN_MAGIC) + tid


def parse_stun_binding_response(data: bytes, transaction_id: bytes) -> tuple[str, int]:
    """The (XOR-)MAPPED-ADDRESS of a Binding success response, as ``(ip, port)``."""
    if len(data) < 20:
        raise ValueError(f"STUN message too short: {len(data)} bytes")
    mtype, length, magic = struct.unpack_from("!HHI", data)
    if magic != STUN_MAGIC:
        raise ValueError(f"not a STUN message: magic cookie {magic:#010x}")
    if mtype != _STUN_BINDING_SUCCESS:
        raise ValueError(f"not a Binding success response: type {mtype:#06x}")
    if data[8:20] != transaction_id:
        raise ValueError("STUN transaction id does not match the request")
    if 20 + length > len(data):
        raise ValueError(f"STUN length {length} runs past the {len(data)}-byte datagram")
    found: dict[int, bytes] = {}
    pos = 20
    while pos + 4 <= 20 + length:
        atype, alen = struct.unpack_from("!HH", data, pos)
        found.setdefault(atype, data[pos + 4 : pos + 4 + alen])
        pos += 4 + alen + (-alen % 4)  # attributes are padded to 32 bits (section 14)
    if (value := found.get(_ATTR_XOR_MAPPED_ADDRESS)) is not None and len(value) >= 8:
        port = struct.unpack_from("!H", value, 2)[0] ^ (STUN_MAGIC >> 16)
        addr = struct.unpack_from("!I", value, 4)[0] ^ STUN_MAGIC
        return _ipv4(addr), port
    if (value := found.get(_ATTR_MAPPED_ADDRESS)) is not None and len(value) >= 8:
        return _ipv4(struct.unpack_from("!I", value, 4)[0]), struct.unpack_from("!H", value, 2)[0]
    raise ValueError("STUN Binding response has no IPv4 (XOR-)MAPPED-ADDRESS")


def _ipv4(addr: int) -> str:
    return ".".join(str(b) for b in addr.to_bytes(4, "big"))


def turn_credentials(secret: str, peer: str, ttl: float = 3600.0) -> tuple[str, str]:
    """TURN REST API credentials for coturn's ``use-auth-secret``: ``(username, password)``."""
    username = f"{int(time.time() + ttl)}:{peer}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


# --------------------------------------------------------------------------- commands


def _run(cmd: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    log.debug("natlab: %s", " ".join(cmd))
    proc = subprocess.run(list(cmd), input=input, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NatLabError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _destroy_netns(names: Sequence[str]) -> None:
    """SIGKILL whatever still runs in these namespaces, then delete them (errors ignored)."""
    for ns in names:
        for pid in _run(["ip", "netns", "pids", ns], check=False).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _run(["ip", "netns", "del", ns], check=False)


def _terminate(procs: Sequence[subprocess.Popen[Any]], grace: float = 2.0) -> None:
    """SIGTERM each process group, SIGKILL what is left after ``grace`` seconds."""

    def signal_all(sig: signal.Signals) -> None:
        for p in procs:
            if p.poll() is not None:
                continue
            try:
                if os.getpgid(p.pid) == p.pid:  # its own group (start_new_session=True)
                    os.killpg(p.pid, sig)
                else:
                    p.send_signal(sig)
            except ProcessLookupError:
                pass

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    signal_all(signal.SIGKILL)
    for p in procs:
        try:
            p.wait(5.0)
        except subprocess.TimeoutExpired:
            log.warning("natlab: pid %d survived SIGKILL", p.pid)
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                stream.close()


@functools.cache
def available(coturn: bool = False) -> str | None:
    """None when a lab can run here, else the reason it cannot (for ``pytest.skip``)."""
    if sys.platform != "linux":
        return f"natlab needs Linux network namespaces, not {sys.platform}"
    if os.geteuid() != 0:
        return "natlab needs root (network namespaces, nftables)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"natlab needs `{tool}` (apt-get install {package})"
    if coturn and shutil.which("turnserver") is None:
        return "natlab needs `turnserver` for TURN (apt-get install coturn)"
    probe = f"{_PREFIX}probe{secrets.token_hex(3)}"
    try:
        _run(["ip", "netns", "add", probe])
    except (NatLabError, OSError) as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _run(["ip", "netns", "exec", probe, "nft", "-f", "-"], input="add table ip natlab_probe\n")
    except (NatLabError, OSError) as exc:
        return f"nftables does not work in a network namespace: {exc}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


# --------------------------------------------------------------------------- the lab


class Host:
    """One network namespace with one address; runs commands inside it."""

    def __init__(self, lab: NatLab, name: str, netns: str, ip: str, role: str) -> None:
        self.lab = lab
        self.name = name
        self.netns = netns
        self.role = role
        self._ip = ip

    @property
    def ip(self) -> str:
        """Its address: on the bridge for public/server hosts, 10.0.K.x behind a router."""
        return self._ip

    def __repr__(self) -> str:
        return f"Host({self.name!r}, netns={self.netns!r}, ip={self._ip!r})"

    def argv(self, cmd: Sequence[str] | str) -> list[str]:
        """``cmd`` prefixed to run in this namespace; a string runs under ``sh -c``."""
        args = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return ["ip", "netns", "exec", self.netns, *args]

    def run(self, cmd: Sequence[str] | str, **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` here in its own process group; the lab kills the group on close."""
        return self.lab._spawn(self, cmd, popen_kw)

    def check_output(
        self, cmd: Sequence[str] | str, *, input: str | None = None, timeout: float = 30.0
    ) -> str:
        """Run ``cmd`` here to completion; its stdout, or CalledProcessError (with stderr)."""
        proc = subprocess.run(
            self.argv(cmd), input=input, capture_output=True, text=True, timeout=timeout,
            env=_python_env(),
        )
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout,
                                                proc.stderr)
        return proc.stdout

    def python(self, *args: str) -> list[str]:
        """argv for this interpreter (``sys.executable``) with ``args``, ready for ``run``."""
        return [sys.executable, *args]

    def stun_binding(
        self, server_ip: str, port: int = 3478, timeout: float = 2.0
    ) -> tuple[str, int] | None:
        """Ask a STUN server, from this namespace, which address it sees; None on no answer."""
        tid = secrets.token_bytes(12)
        out = self.check_output(
            [sys.executable, "-c", _ONESHOT_SRC, server_ip, str(port), str(timeout),
             stun_binding_request(tid).hex()],
            timeout=timeout + 10,
        ).strip()
        return parse_stun_binding_response(bytes.fromhex(out), tid) if out else None


class Home:
    """A home network: a NAT ``router`` namespace and the ``host`` behind it."""

    def __init__(self, name: str, nat: NatType, router: Host, host: Host, index: int) -> None:
        self.name = name
        self.nat = nat
        self.router = router
        self.host = host
        self.index = index

    @property
    def public_ip(self) -> str:
        """The router's WAN address on the bridge, which the NAT maps the host to."""
        return self.router.ip

    def __repr__(self) -> str:
        return f"Home({self.name!r}, {self.nat.value}, {self.host.ip} -> {self.public_ip})"


class Process:
    """A long-running daemon in the lab (coturn), with its log file."""

    def __init__(self, name: str, host: Host, popen: subprocess.Popen[Any], log_path: Path) -> None:
        self.name = name
        self.host = host
        self.popen = popen
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Terminate it (its whole process group); safe to call twice."""
        _terminate([self.popen])


class Datagram(NamedTuple):
    data: bytes
    ip: str
    port: int


class UdpAgent:
    """A UDP socket inside a namespace, driven from here: ``send`` out, ``recv`` what arrived.

    With ``reflect=True`` it answers every datagram with the ``ip:port`` it came from (a STUN
    in miniature), which is how the tests read a NAT's mapping.
    """

    def __init__(self, host: Host, port: int = 0, reflect: bool = False,
                 ready_timeout: float = 10.0) -> None:
        self.host = host
        args = ["-m", "testkit.natlab", "agent", "--port", str(port)]
        self._proc = host.run(
            host.python(*args, *(["--reflect"] if reflect else [])),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1, env=_python_env(),
        )
        self._inbox: queue.Queue[Datagram | None] = queue.Queue()
        self._ready: queue.Queue[int] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"natlab-agent-{host.name}",
                                        daemon=True)
        self._reader.start()
        try:
            self.port = self._ready.get(timeout=ready_timeout)
        except queue.Empty:
            exited = self._proc.poll() is not None
            err = self._proc.stderr.read() if exited and self._proc.stderr else ""
            self.close()
            raise NatLabError(f"UDP agent in {host.netns} did not start: {err.strip()}") from None

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            fields = line.split()
            if len(fields) == 2 and fields[0] == "ready":
                self._ready.put(int(fields[1]))
            elif len(fields) == 3:
                data = b"" if fields[0] == "-" else bytes.fromhex(fields[0])
                self._inbox.put(Datagram(data, fields[1], int(fields[2])))
        self._inbox.put(None)

    def send(self, ip: str, port: int, data: bytes = b"ping") -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{ip} {port} {data.hex() or '-'}\n")
        self._proc.stdin.flush()

    def recv(self, timeout: float = 2.0) -> Datagram | None:
        """The next datagram that arrived, or None when none comes within ``timeout``."""
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def ask(self, ip: str, port: int, data: bytes = b"ping", timeout: float = 2.0,
            tries: int = 3) -> Datagram | None:
        """Send and wait for a reply from exactly ``ip:port``, resending up to ``tries`` times."""
        for _ in range(tries):
            self.send(ip, port, data)
            deadline = time.monotonic() + timeout / tries
            while (left := deadline - time.monotonic()) > 0:
                got = self.recv(left)
                if got is not None and (got.ip, got.port) == (ip, port):
                    return got
        return None

    def mapped(self, reflector_ip: str, reflector_port: int) -> tuple[str, int]:
        """The ``(ip, port)`` a reflector sees this socket as (raises when it never answers)."""
        got = self.ask(reflector_ip, reflector_port)
        if got is None:
            raise NatLabError(f"no answer from reflector {reflector_ip}:{reflector_port}")
        ip, _, port = got.data.decode().rpartition(":")
        return ip, int(port)

    def close(self) -> None:
        _terminate([self._proc], grace=1.0)
        self._reader.join(timeout=5)


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    return env


class NatLab:
    """A throwaway "internet" of namespaces with NAT routers; ``with NatLab() as lab: ...``.

    Creating it builds the internet namespace with bridge ``br0`` (203.0.113.0/24); hosts and
    homes are added with the methods below. ``close()`` (or leaving the ``with`` block, also on
    an exception) kills every process it started and deletes every namespace, which deletes
    every interface. A state file in ``state_dir`` lets ``python -m testkit.natlab down``
    clean up after a lab whose owner was killed.
    """

    def __init__(self, name: str | None = None, *, state_dir: Path | str | None = STATE_DIR,
                 workdir: Path | str | None = None) -> None:
        if name is not None and not _LAB_NAME.match(name):
            raise ValueError(f"lab name must match {_LAB_NAME.pattern}: {name!r}")
        self.name = name or f"{_PREFIX}{secrets.token_hex(2)}"
        self.hosts: dict[str, Host] = {}
        self.homes: dict[str, Home] = {}
        self.processes: list[Process] = []
        self.namespaces: list[str] = []
        self._popens: list[subprocess.Popen[Any]] = []
        self._agents: list[UdpAgent] = []
        self._next_public = 1
        self._next_home = 1
        self._closed = False
        self._state_file = Path(state_dir) / f"{self.name}.json" if state_dir else None
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.internet = f"{self.name}-inet"
        try:
            self._add_netns(self.internet)
            self._ip(self.internet, "link add br0 type bridge")
            self._ip(self.internet, f"addr add {GATEWAY_IP}/24 dev br0")
            self._ip(self.internet, "link set br0 up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> NatLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NatLab({self.name!r}, hosts={list(self.hosts)}, homes={list(self.homes)})"

    # -- building

    def _ip(self, netns: str, args: str) -> None:
        _run(["ip", "-n", netns, *args.split()])

    def _add_netns(self, netns: str) -> None:
        self._check_open()
        _run(["ip", "netns", "add", netns])
        self.namespaces.append(netns)  # only after it exists: never delete someone else's
        self._save_state()
        self._ip(netns, "link set lo up")

    def _check_open(self) -> None:
        if self._closed:
            raise NatLabError(f"lab {self.name} is closed")

    def _check_name(self, name: str) -> None:
        if not _HOST_NAME.match(name):
            raise ValueError(f"host name must match {_HOST_NAME.pattern}: {name!r}")
        if name in self.hosts or name in self.homes:
            raise ValueError(f"lab {self.name} already has a host or home named {name!r}")

    def _attach(self, netns: str, ifname: str) -> str:
        """Plug ``netns`` into the bridge as ``ifname``; its address, default route via gateway."""
        n = self._next_public
        self._next_public += 1 if n != 99 else 2  # .100 is the gateway
        if n > 254:
            raise NatLabError("the bridge 203.0.113.0/24 is full")
        ip = f"203.0.113.{n}"
        port = f"p{n}"
        _run(["ip", "link", "add", "name", port, "netns", self.internet, "type", "veth",
              "peer", "name", ifname, "netns", netns])
        self._ip(self.internet, f"link set {port} master br0 up")
        self._ip(netns, f"addr add {ip}/24 dev {ifname}")
        self._ip(netns, f"link set {ifname} up")
        # NATLAB.md trap 2: coturn needs a default route even to relay towards private addresses.
        self._ip(netns, f"route add default via {GATEWAY_IP}")
        return ip

    def add_public_host(self, name: str, role: str = "public") -> Host:
        """A namespace directly on the bridge (no NAT), e.g. a public peer or a reflector."""
        self._check_name(name)
        netns = f"{self.name}-{name}"
        self._add_netns(netns)
        host = Host(self, name, netns, self._attach(netns, "eth0"), role)
        self.hosts[name] = host
        self._save_state()
        log.info("natlab %s: %s host %s at %s", self.name, role, name, host.ip)
        return host

    def add_server(self, name: str) -> Host:
        """A public host for a server (rendezvous, coturn): its own namespace on the bridge."""
        return self.add_public_host(name, role="server")

    def add_home(self, name: str, nat: NatType | str = NatType.PORT_RESTRICTED) -> Home:
        """A router namespace doing ``nat`` (WAN on the bridge, LAN 10.0.K.1/24) and a host
        namespace 10.0.K.2/24 behind it."""
        nat = NatType(nat)
        self._check_name(name)
        k = self._next_home
        if k > 254:
            raise NatLabError("no more 10.0.K.0/24 home networks")
        self._next_home += 1
        router_ns, host_ns = f"{self.name}-gw-{name}", f"{self.name}-{name}"
        self._add_netns(router_ns)
        self._add_netns(host_ns)
        public_ip = self._attach(router_ns, "wan")
        lan_ip, host_ip = f"10.0.{k}.1", f"10.0.{k}.2"
        _run(["ip", "link", "add", "name", "lan", "netns", router_ns, "type", "veth",
              "peer", "name", "eth0", "netns", host_ns])
        self._ip(router_ns, f"addr add {lan_ip}/24 dev lan")
        self._ip(router_ns, "link set lan up")
        self._ip(host_ns, f"addr add {host_ip}/24 dev eth0")
        self._ip(host_ns, "link set eth0 up")
        self._ip(host_ns, f"route add default via {lan_ip}")
        _run(["ip", "netns", "exec", router_ns, "sh", "-c",
              "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        _run(["ip", "netns", "exec", router_ns, "nft", "-f", "-"],
             input=nat_ruleset(nat, host_ip, public_ip))
        router = Host(self, f"gw-{name}", router_ns, public_ip, "router")
        home = Home(name, nat, router, Host(self, name, host_ns, host_ip, "home"), k)
        self.homes[name] = home
        self._save_state()
        log.info("natlab %s: home %s (%s) %s -> %s", self.name, name, nat.value, host_ip,
                 public_ip)
        return home

    def loss(self, home: Home, percent: int) -> None:
        """Drop ``percent`` % of the packets crossing ``home``'s WAN, in each direction
        (0 removes it; a new call replaces the old rate)."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss percent must be 0..100, got {percent}")
        self._check_open()
        _run(["ip", "netns", "exec", home.router.netns, "nft", "-f", "-"],
             input=loss_ruleset(percent))

    def loss_dropped(self, home: Home) -> dict[str, int]:
        """Packets the loss rule of ``home`` dropped so far: ``{"in": n, "out": m}`` (zeros
        when there is no loss rule)."""
        self._check_open()
        out = _run(["ip", "netns", "exec", home.router.netns, "nft", "-j", "list", "table",
                    "ip", "natlab_loss"], check=False)
        dropped = {"in": 0, "out": 0}
        try:
            items = json.loads(out)["nftables"] if out.strip() else []
        except (ValueError, KeyError, TypeError) as exc:
            raise NatLabError(f"cannot read the loss counters of {home.name}: {exc}") from exc
        for item in items:
            rule = item.get("rule")
            if not rule:
                continue
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    dropped["in" if rule["chain"] == "rx" else "out"] += int(
                        expr["counter"]["packets"])
        return dropped

    # -- processes

    def _spawn(self, host: Host, cmd: Sequence[str] | str,
               popen_kw: dict[str, Any]) -> subprocess.Popen[Any]:
        self._check_open()
        popen_kw.setdefault("start_new_session", True)
        popen = subprocess.Popen(host.argv(cmd), **popen_kw)
        self._popens.append(popen)
        return popen

    def udp_agent(self, host: Host, port: int = 0, reflect: bool = False) -> UdpAgent:
        """A driven UDP socket in ``host`` (see UdpAgent); closed with the lab."""
        agent = UdpAgent(host, port, reflect)
        self._agents.append(agent)
        return agent

    def reflector(self, host: Host, port: int = 7000) -> UdpAgent:
        """A UDP reflector in ``host``: replies ``ip:port`` of each sender."""
        return self.udp_agent(host, port, reflect=True)

    def start_coturn(self, host: Host, secret: str, realm: str = "peerlearn", *,
                     port: int = 3478, min_port: int = 49160, max_port: int = 49200,
                     ready_timeout: float = 10.0) -> Process:
        """Debian's ``turnserver`` in ``host``, NATLAB.md's minimal config; returns once it
        answers a STUN Binding request. Credentials: :func:`turn_credentials`."""
        rundir = self.workdir / f"coturn-{host.name}"
        rundir.mkdir(parents=True, exist_ok=True)
        conf = rundir / "turnserver.conf"
        conf.write_text("\n".join([
            f"listening-ip={host.ip}", f"relay-ip={host.ip}", f"listening-port={port}",
            f"min-port={min_port}", f"max-port={max_port}", f"realm={realm}",
            "use-auth-secret", f"static-auth-secret={secret}", "fingerprint",
            "no-tls", "no-dtls",
            "no-cli",  # 4.6.1 exits when the CLI has an empty password
            "log-file=stdout", f"pidfile={rundir / 'turnserver.pid'}",
            f"userdb={rundir / 'turndb'}",
        ]) + "\n")
        log_path = rundir / "turnserver.log"
        with open(log_path, "w") as log_file:
            popen = host.run(["turnserver", "-c", str(conf)], stdout=log_file,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        proc = Process(f"coturn-{host.name}", host, popen, log_path)
        self.processes.append(proc)
        self._save_state()
        deadline = time.monotonic() + ready_timeout
        while True:
            if popen.poll() is not None:
                raise NatLabError(f"turnserver in {host.netns} exited ({popen.returncode}):\n"
                                  + proc.log_text()[-3000:])
            if host.stun_binding(host.ip, port, timeout=0.5) is not None:
                log.info("natlab %s: coturn on %s:%d", self.name, host.ip, port)
                return proc
            if time.monotonic() > deadline:
                proc.stop()
                raise NatLabError(f"turnserver in {host.netns} did not answer STUN in "
                                  f"{ready_timeout:.0f} s:\n" + proc.log_text()[-3000:])

    # -- teardown

    def close(self) -> None:
        """Kill every process this lab started, delete every namespace; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            _terminate(self._popens)
            for agent in self._agents:
                agent._reader.join(timeout=5)
        finally:
            _destroy_netns(list(reversed(self.namespaces)))
            if self._state_file is not None:
                self._state_file.unlink(missing_ok=True)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            log.info("natlab %s: torn down", self.name)

    def detach(self) -> None:
        """Leave everything running (for the CLI's ``up``); ``down`` removes it later."""
        self._save_state()
        self._closed = True

    # -- state file

    def describe(self) -> dict[str, Any]:
        """Everything the lab made, as JSON-ready data (the state file's content)."""
        return {
            "name": self.name,
            "internet": {"netns": self.internet, "ip": GATEWAY_IP, "bridge": "br0"},
            "namespaces": self.namespaces,
            "workdir": str(self.workdir),
            "hosts": {h.name: {"netns": h.netns, "ip": h.ip, "role": h.role}
                      for h in self.hosts.values()},
            "homes": {
                m.name: {"nat": m.nat.value, "netns": m.host.netns, "ip": m.host.ip,
                         "router_netns": m.router.netns, "public_ip": m.public_ip}
                for m in self.homes.values()
            },
            "processes": [{"name": p.name, "netns": p.host.netns, "pid": p.pid,
                           "log": str(p.log_path)} for p in self.processes],
        }

    def _save_state(self) -> None:
        if self._state_file is None:
            return
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.describe(), indent=2) + "\n")
            tmp.replace(self._state_file)
        except OSError as exc:
            log.warning("natlab %s: cannot write state file: %s", self.name, exc)


def teardown(name: str, state_dir: Path = STATE_DIR) -> bool:
    """Delete a lab recorded in ``state_dir`` (processes, namespaces, its files); False if
    there is no such lab."""
    path = state_dir / f"{name}.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        state = None
    namespaces = list(state["namespaces"]) if state else []
    if _AUTO_NAME.match(name):  # also what a lab that died before saving state left behind
        namespaces += [ns for ns in _netns_list() if ns.startswith(f"{name}-")]
    if not namespaces and state is None:
        return False
    _destroy_netns(list(dict.fromkeys(reversed(namespaces))))
    if state is not None:
        workdir = Path(state.get("workdir", ""))
        if workdir.is_relative_to(state_dir) and workdir != state_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    path.unlink(missing_ok=True)
    return True


def teardown_all(state_dir: Path = STATE_DIR) -> list[str]:
    """Delete every recorded lab and every namespace named like an automatic lab."""
    names = {p.stem for p in state_dir.glob("*.json")} if state_dir.is_dir() else set()
    names |= {ns.split("-", 1)[0] for ns in _netns_list() if _AUTO_NETNS.match(ns)}
    return [name for name in sorted(names) if teardown(name, state_dir)]


# --------------------------------------------------------------------------- in-namespace helpers

# One request, one reply: argv = ip port timeout hex-payload; prints the reply in hex, or nothing.
_ONESHOT_SRC = """\
import socket, sys, time
ip, port, timeout, payload = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + timeout
while (left := end - time.monotonic()) > 0:
    s.sendto(bytes.fromhex(payload), (ip, port))
    s.settimeout(min(left, 0.25))
    try:
        print(s.recv(65535).hex())
        break
    except OSError:
        pass
"""


def _agent_main(port: int, reflect: bool) -> None:
    """Bind UDP ``port``; print ``ready PORT`` then ``HEX IP PORT`` per datagram received;
    send ``IP PORT HEX`` lines read from stdin; with ``reflect``, answer each datagram with
    the sender's ``ip:port``."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    print("ready", sock.getsockname()[1], flush=True)

    def receive() -> None:
        while True:
            data, (ip, sport) = sock.recvfrom(65535)
            if reflect:
                sock.sendto(f"{ip}:{sport}".encode(), (ip, sport))
            print(data.hex() or "-", ip, sport, flush=True)

    if reflect:
        receive()
    threading.Thread(target=receive, daemon=True).start()
    for line in sys.stdin:
        ip, dport, hexdata = line.split()
        sock.sendto(b"" if hexdata == "-" else bytes.fromhex(hexdata), (ip, int(dport)))


# --------------------------------------------------------------------------- command line


def _print_lab(lab: NatLab, secret: str | None) -> None:
    print(f"lab {lab.name}: internet namespace {lab.internet}, bridge br0 {GATEWAY_IP}/24")
    for h in lab.hosts.values():
        print(f"  {h.role:<8} {h.name:<10} {h.ip:<15} ip netns exec {h.netns} bash")
    for m in lab.homes.values():
        print(f"  home     {m.name:<10} {m.host.ip:<15} ip netns exec {m.host.netns} bash"
              f"   ({m.nat.value} NAT -> {m.public_ip}, router {m.router.netns})")
    for p in lab.processes:
        print(f"  coturn   {p.host.ip}:3478 pid {p.pid}, secret {secret}, log {p.log_path}")
    if "rdv" in lab.hosts:
        rdv = lab.hosts["rdv"]
        print(f"rendezvous: ip netns exec {rdv.netns} peerlearn rendezvous --host {rdv.ip}")
    print(f"tear down:  python -m testkit.natlab down {lab.name}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testkit.natlab",
                                     description="real NATs in network namespaces")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a lab and leave it running")
    up.add_argument("--homes", default="port-restricted,symmetric",
                    help=f"comma-separated NAT types, one home each: {', '.join(NatType)}")
    up.add_argument("--public", type=int, default=0, help="public hosts (no NAT)")
    up.add_argument("--coturn", action="store_true", help="run coturn in server namespace 'turn'")
    up.add_argument("--secret", default=None, help="coturn static-auth-secret (default random)")
    up.add_argument("--name", default=None, help="lab name (default plab + random hex)")
    down = sub.add_parser("down", help="tear down a lab")
    down.add_argument("name", nargs="?")
    down.add_argument("--all", action="store_true", help="every lab on this machine")
    sub.add_parser("list", help="labs recorded in " + str(STATE_DIR))
    for cmd in ("agent", "reflect"):
        p = sub.add_parser(cmd, help="UDP agent (used inside namespaces by the lab)")
        p.add_argument("--port", type=int, default=0)
        p.add_argument("--reflect", action="store_true", default=cmd == "reflect")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname).1s %(name)s: %(message)s")

    if args.cmd in ("agent", "reflect"):
        _agent_main(args.port, args.reflect)
        return 0
    if args.cmd == "list":
        for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []:
            state = json.loads(path.read_text())
            print(path.stem, " ".join(f"{n}={h['ip']}" for n, h in state["hosts"].items()),
                  " ".join(f"{n}={m['nat']}" for n, m in state["homes"].items()))
        return 0
    reason = available(coturn=args.cmd == "up" and args.coturn)
    if reason is not None:
        print(f"natlab: {reason}", file=sys.stderr)
        return 2
    if args.cmd == "down":
        if args.all:
            print("removed:", " ".join(teardown_all()) or "nothing")
            return 0
        if not args.name:
            parser.error("down needs a lab NAME or --all")
        if not teardown(args.name):
            print(f"natlab: no lab {args.name}", file=sys.stderr)
            return 1
        return 0

    try:
        nats = [NatType(n.strip()) for n in args.homes.split(",") if n.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    name = args.name or f"{_PREFIX}{secrets.token_hex(2)}"
    lab = NatLab(name, workdir=STATE_DIR / name)
    secret = None
    try:
        lab.add_server("rdv")
        if args.coturn:
            secret = args.secret or secrets.token_hex(8)
            lab.start_coturn(lab.add_server("turn"), secret)
        for i in range(args.public):
            lab.add_public_host(f"pub{i + 1}")
        for i, nat in enumerate(nats):
            lab.add_home(f"home{i + 1}", nat)
    except BaseException:
        lab.close()
        raise
    lab.detach()
    _print_lab(lab, secret)
    return 0


if __name__ == "__main__":
    sys.exit(main())
