"""Child processes of this one: a rendezvous and N training peers (what ``peerlearn demo`` runs).

Each process logs to its own file in ``workdir`` (``rendezvous.log``, ``peer-N.log``); peers also
write JSON-lines events there (``peer-N.jsonl``). The rendezvous binds port 0 and reports the
port it got (``--ready-file``), so nothing guesses a free port. The test kit's
``testkit.swarm.LocalSwarm`` builds on this class (network namespaces, restarts).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

log = logging.getLogger(__name__)

Wrap = Callable[[list[str]], list[str]]
"""Turns an argv into the argv that runs it elsewhere (e.g. inside a network namespace)."""

@dataclass
class Launch:
    """How a process was started, so that it can be started again the same way."""

    name: str
    args: list[str]
    module: str = "peerlearn"
    wrap: Wrap | None = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", self.module, *self.args]
        return self.wrap(argv) if self.wrap is not None else argv


def _set_flag(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with the last ``flag``'s value replaced by ``value`` (appended if absent)."""
    out = list(args)
    for i in range(len(out) - 2, -1, -1):
        if out[i] == flag:
            out[i + 1] = value
            return out
    return [*out, flag, value]


class Launcher:
    """A rendezvous and peers as child processes; ``with Launcher(dir) as swarm: ...``."""

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rendezvous: subprocess.Popen[bytes] | None = None
        self.rendezvous_ip = "127.0.0.1"
        self.rendezvous_port = 0
        self.stun_port: int | None = None
        self.peers: dict[int, subprocess.Popen[bytes]] = {}
        self.launches: dict[str, Launch] = {}
        self._logs: list[IO[bytes]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- processes

    def spawn(self, launch: Launch) -> subprocess.Popen[bytes]:
        """Start ``launch`` with its output appended to ``<name>.log``; remembered by name."""
        self.launches[launch.name] = launch
        out = open(self.workdir / f"{launch.name}.log", "ab")  # noqa: SIM115 (closed in stop())
        self._logs.append(out)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log.debug("launch %s: %s", launch.name, " ".join(launch.argv()))
        return subprocess.Popen(launch.argv(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # Ctrl+C reaches only us, we stop them

    def start_rendezvous(self, *, ttl: float = 15.0, heartbeat: float = 5.0, port: int = 0,
                         timeout: float = 30.0, extra: tuple[str, ...] = ()) -> int:
        """Start the rendezvous on loopback and wait until it serves; returns its port. Its
        STUN port is picked freely unless ``extra`` says otherwise."""
        return self._start_rendezvous("127.0.0.1", port, ttl, heartbeat, extra, None, timeout)

    def _start_rendezvous(self, ip: str, port: int, ttl: float, heartbeat: float,
                          extra: tuple[str, ...], wrap: Wrap | None, timeout: float) -> int:
        self.rendezvous_ip = ip
        args = ["rendezvous", "--host", ip, "--port", str(port), "--ttl", str(ttl),
                "--heartbeat", str(heartbeat)]
        if "--stun-port" not in extra:
            args += ["--stun-port", "0"]
        return self.launch_rendezvous(Launch("rendezvous", [*args, *extra], wrap=wrap), timeout)

    def launch_rendezvous(self, launch: Launch, timeout: float = 30.0) -> int:
        """Start the rendezvous ``launch`` and wait until it reports its ports; afterwards
        ``launches["rendezvous"]`` names those ports, so a restart binds the same ones."""
        ready = self.workdir / "rendezvous.ready"
        ready.unlink(missing_ok=True)
        launch = Launch(launch.name, _set_flag(launch.args, "--ready-file", str(ready)),
                        launch.module, launch.wrap)
        seen = len(self.log("rendezvous"))  # a restart appends to the same log
        proc = self.rendezvous = self.spawn(launch)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"rendezvous exited: {self.log('rendezvous')[seen:][-2000:]}")
            ports = self._ready_ports(ready)
            if ports is not None:
                self.rendezvous_port, self.stun_port = ports
                args = _set_flag(launch.args, "--port", str(self.rendezvous_port))
                if self.stun_port is not None:
                    args = _set_flag(args, "--stun-port", str(self.stun_port))
                self.launches["rendezvous"] = Launch(launch.name, args, launch.module, launch.wrap)
                return self.rendezvous_port
            time.sleep(0.05)
        raise TimeoutError("the rendezvous did not start serving")

    @staticmethod
    def _ready_ports(path: Path) -> tuple[int, int | None] | None:
        try:
            ready = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None  # not written yet (it is written atomically)
        stun = ready.get("stun_port")
        return int(ready["port"]), int(stun) if stun else None

    def peer_args(self, num: int, total: int, epochs: int, *extra: str,
                  threads: int | None = 1, listen: str | None = "127.0.0.1:0") -> list[str]:
        """The ``peer`` command line of peer ``num``: its key, checkpoint, events and log in
        ``workdir``, joined to this rendezvous."""
        args = ["peer", "--num", str(num), "--total", str(total), "--epochs", str(epochs),
                "--rendezvous", f"{self.rendezvous_ip}:{self.rendezvous_port}",
                "--key", str(self.workdir / f"peer-{num}.pem"),
                "--checkpoint", str(self.workdir / f"peer-{num}.ckpt"),
                "--events", str(self.events_path(num)), "--no-progress", *extra]
        if listen is not None:
            args += ["--listen", listen]
        if threads:
            args += ["--threads", str(threads)]
        return args

    def start_peer(self, num: int, total: int, epochs: int, *extra: str,
                   threads: int | None = 1, listen: str | None = "127.0.0.1:0",
                   module: str = "peerlearn") -> subprocess.Popen[bytes]:
        """Start peer ``num``; ``listen=None``: no ZeroMQ listener (a peer behind NAT);
        ``module``: run ``python -m module peer ...`` instead (the tests' attacker)."""
        args = self.peer_args(num, total, epochs, *extra, threads=threads, listen=listen)
        proc = self.peers[num] = self.spawn(Launch(f"peer-{num}", args, module))
        return proc

    # -- what the processes wrote

    def events_path(self, num: int) -> Path:
        return self.workdir / f"peer-{num}.jsonl"

    def events(self, num: int, kind: str | None = None) -> list[dict[str, Any]]:
        """Peer ``num``'s events so far (all, or those whose ``event`` is ``kind``)."""
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

    # -- waiting and stopping

    def wait_peers(self, timeout: float, nums: list[int] | None = None) -> dict[int, int | None]:
        """Wait for the peers to exit; returns their exit codes (None: still running)."""
        deadline = time.monotonic() + timeout
        for num in nums if nums is not None else list(self.peers):
            try:
                self.peers[num].wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return {n: self.peers[n].poll() for n in (nums if nums is not None else self.peers)}

    def wait_for(self, predicate: Callable[[], object], timeout: float,
                 interval: float = 0.2) -> bool:
        """Wait until ``predicate()`` is true (events are files written by other processes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(interval)
        return bool(predicate())

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process, SIGKILL those still running after ``grace`` seconds; safe
        to call twice."""
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
        for out in self._logs:
            out.close()
        self._logs.clear()
