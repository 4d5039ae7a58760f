"""A local swarm of real processes: one rendezvous and N peers.

Used by ``peerlearn demo``, the integration tests and the benchmarks. Each process logs to
its own file in ``workdir``; peers also write JSON-lines events there (``peer-N.jsonl``).
On loopback by default; with ``host=`` (a :class:`testkit.natlab.Host`) a process runs in
that network namespace instead (the NAT lab).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Protocol


class NamespaceHost(Protocol):
    """What the swarm needs of a NAT-lab host (testkit.natlab.Host)."""

    @property
    def ip(self) -> str: ...

    def argv(self, cmd: list[str]) -> list[str]: ...


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalSwarm:
    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rendezvous: subprocess.Popen[bytes] | None = None
        self.rendezvous_port = 0
        self.rendezvous_ip = "127.0.0.1"
        self.peers: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []
        self._rendezvous_launch: tuple[list[str], NamespaceHost | None] | None = None
        self._peer_launch: dict[int, tuple[list[str], NamespaceHost | None, str]] = {}

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, args: list[str], host: NamespaceHost | None = None,
               module: str = "peerlearn") -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop())
        self._logs.append(log)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", module, *args]
        if host is not None:
            argv = host.argv(argv)
        return subprocess.Popen(argv, stdout=log,
                                stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)  # Ctrl+C reaches only us, we stop them

    def start_rendezvous(self, *, ttl: float = 15.0, heartbeat: float = 5.0,
                         port: int | None = None, timeout: float = 30.0,
                         host: NamespaceHost | None = None, extra: tuple[str, ...] = ()) -> int:
        """Start the rendezvous and wait until it serves. On loopback (no ``host``) its STUN
        port is picked freely unless ``extra`` says otherwise."""
        self.rendezvous_ip = host.ip if host is not None else "127.0.0.1"
        self.rendezvous_port = port or (5555 if host is not None else free_port())
        args = ["rendezvous", "--host", self.rendezvous_ip, "--port", str(self.rendezvous_port),
                "--ttl", str(ttl), "--heartbeat", str(heartbeat)]
        if host is None and "--stun-port" not in extra:
            args += ["--stun-port", "0"]
        self._rendezvous_launch = ([*args, *extra], host)
        return self._launch_rendezvous(timeout)

    def _launch_rendezvous(self, timeout: float) -> int:
        assert self._rendezvous_launch is not None
        args, host = self._rendezvous_launch
        seen = len(self.log("rendezvous"))  # a restart appends to the same log
        self.rendezvous = self._spawn("rendezvous", args, host)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.rendezvous.poll() is not None:
                raise RuntimeError(f"rendezvous exited: {self.log('rendezvous')[seen:][-2000:]}")
            if host is not None:  # its namespace is not reachable from here: read its log
                if "rendezvous listening on" in self.log("rendezvous")[seen:]:
                    return self.rendezvous_port
                time.sleep(0.1)
                continue
            try:
                self.http_json("/healthz")
                return self.rendezvous_port
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("the rendezvous did not start serving")

    def start_lab_services(self, lab: Any, turn_secret: str) -> tuple[Any, Any]:
        """In a :class:`testkit.natlab.NatLab`: coturn and the rendezvous (STUN on 3478,
        handing out TURN credentials) on two hosts of the lab's internet; returns them."""
        rdv = lab.add_server("rdv")
        turn = lab.add_server("turn")
        lab.start_coturn(turn, turn_secret)
        self.start_rendezvous(host=rdv, ttl=10, heartbeat=2, extra=(
            "--stun-port", "3478", "--turn-url", f"turn:{turn.ip}:3478",
            "--turn-secret", turn_secret))
        return rdv, turn

    def restart_rendezvous(self, sig: int = signal.SIGKILL, down: float = 0.0,
                           timeout: float = 30.0) -> None:
        """Kill the rendezvous with ``sig``, leave it down ``down`` seconds, start it again
        with the same command (same address and port) and wait until it serves. Its registry
        starts empty: the peers must re-register by themselves (soft state)."""
        if self.rendezvous is None or self._rendezvous_launch is None:
            raise RuntimeError("no rendezvous to restart")
        if self.rendezvous.poll() is None:
            self.rendezvous.send_signal(sig)
        self.rendezvous.wait(10)
        time.sleep(down)
        self._launch_rendezvous(timeout)

    def http_json(self, path: str) -> Any:
        """GET ``path`` from the rendezvous (from inside its namespace in the NAT lab)."""
        url = f"http://{self.rendezvous_ip}:{self.rendezvous_port}{path}"
        host = self._rendezvous_launch[1] if self._rendezvous_launch else None
        if host is None:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        fetch = ("import sys, urllib.request; "
                 "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
        proc = subprocess.run(host.argv([sys.executable, "-c", fetch, url]), capture_output=True,
                              text=True, timeout=30)
        if proc.returncode != 0:  # the same exception type as the loopback branch raises
            raise OSError(f"GET {url} in the lab failed: {proc.stderr.strip()[-500:]}")
        return json.loads(proc.stdout)

    def start_peer(self, num: int, total: int, epochs: int, *extra: str,
                   threads: int | None = 1, host: NamespaceHost | None = None,
                   listen: str | None = "127.0.0.1:0", module: str = "peerlearn"
                   ) -> subprocess.Popen[bytes]:
        """Start peer ``num``; ``listen=None``: no ZeroMQ listener (a peer behind NAT);
        ``module``: run ``python -m module peer ...`` instead (the tests' attacker)."""
        args = ["peer", "--num", str(num), "--total", str(total), "--epochs", str(epochs),
                "--rendezvous", f"{self.rendezvous_ip}:{self.rendezvous_port}",
                "--key", str(self.workdir / f"peer-{num}.pem"),
                "--checkpoint", str(self.workdir / f"peer-{num}.ckpt"),
                "--events", str(self.events_path(num)), "--no-progress", *extra]
        if listen is not None:
            args += ["--listen", listen]
        if threads:
            args += ["--threads", str(threads)]
        self._peer_launch[num] = (args, host, module)
        proc = self.peers[num] = self._spawn(f"peer-{num}", args, host, module)
        return proc

    def restart_peer(self, num: int, *extra: str, sig: int = signal.SIGKILL
                     ) -> subprocess.Popen[bytes]:
        """Kill peer ``num`` with ``sig`` (if it still runs) and start it again with the same
        command: the same key (so the same peer id), checkpoint, events file and log. A peer
        with a checkpoint resumes from it (its ``start`` event says ``resumed``). ``extra``
        is appended to the command (a later flag overrides an earlier one)."""
        if num not in self._peer_launch:
            raise KeyError(f"peer {num} was never started")
        if self.peers[num].poll() is None:
            self.kill(num, sig)
        args, host, module = self._peer_launch[num]
        proc = self.peers[num] = self._spawn(f"peer-{num}", [*args, *extra], host, module)
        return proc

    def events_path(self, num: int) -> Path:
        return self.workdir / f"peer-{num}.jsonl"

    def events(self, num: int, kind: str | None = None) -> list[dict[str, Any]]:
        path = self.events_path(num)
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if kind is None or record.get("event") == kind:
                records.append(record)
        return records

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_peers(self, timeout: float, nums: list[int] | None = None) -> dict[int, int | None]:
        """Wait for the peers to exit; returns their exit codes (None: still running)."""
        deadline = time.monotonic() + timeout
        for num in nums if nums is not None else list(self.peers):
            try:
                self.peers[num].wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return {n: self.peers[n].poll() for n in (nums if nums is not None else self.peers)}

    def wait_for(self, predicate: Any, timeout: float, interval: float = 0.2) -> bool:
        """Wait until ``predicate()`` is true (events are files written by other processes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(interval)
        return bool(predicate())

    def kill(self, num: int, sig: int = signal.SIGKILL) -> None:
        self.peers[num].send_signal(sig)
        self.peers[num].wait(10)

    def stop(self, grace: float = 10.0) -> None:
        procs = [p for p in [*self.peers.values(), self.rendezvous] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()
