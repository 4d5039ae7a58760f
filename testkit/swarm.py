"""A local swarm of real processes: one rendezvous and N peers, for tests and benchmarks.

:class:`peerlearn.launch.Launcher` starts them (logs, events, ports read back); this adds what
only tests need: running a process in a NAT-lab network namespace (``host=``, a
:class:`testkit.natlab.Host`), killing and restarting peers and the rendezvous, reading the
rendezvous's HTTP endpoints, and the lab's coturn + rendezvous pair.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any, Protocol

from peerlearn.launch import Launch, Launcher


class NamespaceHost(Protocol):
    """What the swarm needs of a NAT-lab host (testkit.natlab.Host)."""

    @property
    def ip(self) -> str: ...

    def argv(self, cmd: list[str]) -> list[str]: ...


class LocalSwarm(Launcher):
    """``with LocalSwarm(tmp_path) as swarm:`` (or ``async with``) a rendezvous and peers."""

    async def __aenter__(self) -> LocalSwarm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def start_rendezvous(self, *, ttl: float = 15.0, heartbeat: float = 5.0, port: int = 0,
                         timeout: float = 30.0, extra: tuple[str, ...] = (),
                         host: NamespaceHost | None = None) -> int:
        """Start the rendezvous (in ``host``'s namespace, else on loopback) and wait until it
        serves; returns its port (``port=0``: the one it picked, read back). Its STUN port is
        picked freely unless ``extra`` says otherwise."""
        if host is None:
            return super().start_rendezvous(ttl=ttl, heartbeat=heartbeat, port=port,
                                            timeout=timeout, extra=extra)
        return self._start_rendezvous(host.ip, port, ttl, heartbeat, extra, host.argv, timeout)

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
        with the same command (same address and ports) and wait until it serves. Its registry
        starts empty: the peers must re-register by themselves (soft state)."""
        if self.rendezvous is None or "rendezvous" not in self.launches:
            raise RuntimeError("no rendezvous to restart")
        if self.rendezvous.poll() is None:
            self.rendezvous.send_signal(sig)
        self.rendezvous.wait(10)
        time.sleep(down)
        self.launch_rendezvous(self.launches["rendezvous"], timeout)

    def http_json(self, path: str) -> Any:
        """GET ``path`` from the rendezvous (from inside its namespace in the NAT lab)."""
        url = f"http://{self.rendezvous_ip}:{self.rendezvous_port}{path}"
        launch = self.launches.get("rendezvous")
        if launch is None or launch.wrap is None:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        fetch = ("import sys, urllib.request; "
                 "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
        proc = subprocess.run(launch.wrap([sys.executable, "-c", fetch, url]),
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:  # the same exception type as the loopback branch raises
            raise OSError(f"GET {url} in the lab failed: {proc.stderr.strip()[-500:]}")
        return json.loads(proc.stdout)

    def start_peer(self, num: int, total: int, epochs: int, *extra: str,
                   threads: int | None = 1, listen: str | None = "127.0.0.1:0",
                   module: str = "peerlearn", host: NamespaceHost | None = None
                   ) -> subprocess.Popen[bytes]:
        """Start peer ``num`` (in ``host``'s namespace, else here); ``listen=None``: no ZeroMQ
        listener (a peer behind NAT); ``module``: run ``python -m module peer ...`` instead
        (the tests' attacker)."""
        args = self.peer_args(num, total, epochs, *extra, threads=threads, listen=listen)
        wrap = host.argv if host is not None else None
        proc = self.peers[num] = self.spawn(Launch(f"peer-{num}", args, module, wrap))
        return proc

    def restart_peer(self, num: int, *extra: str, sig: int = signal.SIGKILL
                     ) -> subprocess.Popen[bytes]:
        """Kill peer ``num`` with ``sig`` (if it still runs) and start it again with the same
        command: the same key (so the same peer id), checkpoint, events file and log. A peer
        with a checkpoint resumes from it (its ``start`` event says ``resumed``). ``extra``
        is appended to the command (a later flag overrides an earlier one)."""
        launch = self.launches.get(f"peer-{num}")
        if launch is None:
            raise KeyError(f"peer {num} was never started")
        if self.peers[num].poll() is None:
            self.kill(num, sig)
        again = Launch(launch.name, [*launch.args, *extra], launch.module, launch.wrap)
        proc = self.peers[num] = self.spawn(again)
        self.launches[launch.name] = launch  # a second restart does not repeat ``extra``
        return proc

    def kill(self, num: int, sig: int = signal.SIGKILL) -> None:
        self.peers[num].send_signal(sig)
        self.peers[num].wait(10)
