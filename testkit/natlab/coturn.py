"""coturn (Debian's ``turnserver``) in a lab namespace, with NATLAB.md's minimal config.

It authenticates with the TURN REST API's shared secret (``use-auth-secret``): the rendezvous
hands out the matching credentials (``rendezvous.turn.make_credentials``).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from testkit.natlab.hosts import Host, Process
from testkit.natlab.system import NatLabError


def coturn_config(host: Host, rundir: Path, secret: str, realm: str, *, port: int,
                  min_port: int, max_port: int) -> str:
    """The ``turnserver.conf`` for ``host``: plain UDP/TCP on ``port``, relays on
    ``min_port..max_port``, everything it writes under ``rundir``."""
    return "\n".join([
        f"listening-ip={host.ip}", f"relay-ip={host.ip}", f"listening-port={port}",
        f"min-port={min_port}", f"max-port={max_port}", f"realm={realm}",
        "use-auth-secret", f"static-auth-secret={secret}", "fingerprint",
        "no-tls", "no-dtls",
        "no-cli",  # 4.6.1 exits when the CLI has an empty password
        "log-file=stdout", f"pidfile={rundir / 'turnserver.pid'}",
        f"userdb={rundir / 'turndb'}",
    ]) + "\n"


def start_coturn(host: Host, rundir: Path, secret: str, realm: str = "peerlearn", *,
                 port: int = 3478, min_port: int = 49160, max_port: int = 49200,
                 ready_timeout: float = 10.0) -> Process:
    """Start ``turnserver`` in ``host`` (its config and log in ``rundir``); returns once it
    answers a STUN Binding request, raises NatLabError (with its log) when it does not."""
    rundir.mkdir(parents=True, exist_ok=True)
    conf = rundir / "turnserver.conf"
    conf.write_text(coturn_config(host, rundir, secret, realm, port=port, min_port=min_port,
                                  max_port=max_port))
    log_path = rundir / "turnserver.log"
    with open(log_path, "w") as log_file:
        popen = host.run(["turnserver", "-c", str(conf)], stdout=log_file,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc = Process(f"coturn-{host.name}", host, popen, log_path)
    deadline = time.monotonic() + ready_timeout
    while True:
        if popen.poll() is not None:
            raise NatLabError(f"turnserver in {host.netns} exited ({popen.returncode}):\n"
                              + proc.log_text()[-3000:])
        if host.stun_binding(host.ip, port, timeout=0.5) is not None:
            return proc
        if time.monotonic() > deadline:
            proc.stop()
            raise NatLabError(f"turnserver in {host.netns} did not answer STUN in "
                              f"{ready_timeout:.0f} s:\n" + proc.log_text()[-3000:])
