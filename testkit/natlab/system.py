"""Running commands for the lab: ``ip``/``nft`` calls, namespaces' teardown, process groups,
and whether a lab can run on this machine at all."""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "plab"
"""Automatic lab names are ``plab`` plus random hex."""

ROOT = Path(__file__).resolve().parents[2]
"""The checkout, on ``PYTHONPATH`` so ``python -m testkit.natlab`` also works in a netns."""


class NatLabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def python_env() -> dict[str, str]:
    """This environment with the checkout on ``PYTHONPATH`` (for Python run in a namespace)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env



def run(cmd: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    log.debug("natlab: %s", " ".join(cmd))
    proc = subprocess.run(list(cmd), input=input, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NatLabError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def netns_list() -> list[str]:
    out = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def destroy_netns(names: Sequence[str]) -> None:
    """SIGKILL whatever still runs in these namespaces, then delete them (errors ignored)."""
    for ns in names:
        for pid in run(["ip", "netns", "pids", ns], check=False).split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        run(["ip", "netns", "del", ns], check=False)


def terminate(procs: Sequence[subprocess.Popen[Any]], grace: float = 2.0) -> None:
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
    probe = f"{PREFIX}probe{secrets.token_hex(3)}"
    try:
        run(["ip", "netns", "add", probe])
    except (NatLabError, OSError) as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        run(["ip", "netns", "exec", probe, "nft", "-f", "-"], input="add table ip natlab_probe\n")
    except (NatLabError, OSError) as exc:
        return f"nftables does not work in a network namespace: {exc}"
    finally:
        run(["ip", "netns", "del", probe], check=False)
    return None

