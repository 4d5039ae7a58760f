"""What lives in the lab: hosts (one namespace, one address), homes (a NAT router and the host
behind it), daemons, and UDP agents — sockets inside a namespace driven from here."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from rendezvous.stun import binding_request, parse_binding_response
from testkit.natlab.rules import NatType
from testkit.natlab.system import NatLabError, python_env, terminate

if TYPE_CHECKING:
    from testkit.natlab.lab import NatLab


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
            env=python_env(),
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
        request = binding_request()
        out = self.check_output(
            [sys.executable, "-c", ONESHOT_SRC, server_ip, str(port), str(timeout),
             request.hex()],
            timeout=timeout + 10,
        ).strip()
        return parse_binding_response(bytes.fromhex(out), request[8:20]) if out else None


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
        terminate([self.popen])


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
            text=True, bufsize=1, env=python_env(),
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
        terminate([self._proc], grace=1.0)
        self._reader.join(timeout=5)


# One request, one reply: argv = ip port timeout hex-payload; prints the reply in hex, or nothing.
ONESHOT_SRC = """\
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


def agent_main(port: int, reflect: bool) -> None:
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

