"""Real peers for tests, as context managers on port 0 with the ports read back.

In-process (async): :func:`running_rendezvous`, :func:`running_client`, :func:`running_host`.
Processes and namespaces (blocking, so plain context managers; ``LocalSwarm`` also works with
``async with``): :func:`local_swarm`, :func:`nat_lab`, :func:`lab_swarm`. And the small things
test files kept typing again: :func:`until`, :func:`reserved_port`, :func:`print_logs`.
``tests/conftest.py`` exposes them as pytest fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from rendezvous import RendezvousConfig
from rendezvous.server import RendezvousServer, run_rendezvous
from testkit.natlab import Host as LabHost
from testkit.natlab import LinkProfile, NatLab, available, wire_available
from testkit.swarm import LocalSwarm

if TYPE_CHECKING:  # imported where used: a lab test does not need the overlay to import
    from overlay.host import Host
    from overlay.identity import Identity
    from overlay.rendezvous_client import RendezvousClient

FAST_RENDEZVOUS: Mapping[str, float] = {"ttl": 2.0, "heartbeat_interval": 0.5,
                                        "dialback_timeout": 1.0, "join_timeout": 2.0}
"""Rendezvous timers for tests: a member is dropped seconds after it goes silent."""

LAB_TURN_SECRET = "lab-secret"  # noqa: S105 (a throwaway secret for a lab that lives minutes)


# -- in-process -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_rendezvous(config: RendezvousConfig | None = None, *, fast: bool = False,
                             **overrides: Any) -> AsyncIterator[RendezvousServer]:
    """A started in-process rendezvous (default 127.0.0.1, TCP and STUN on port 0; the bound
    ports in ``.port`` / ``.stun_port``, ``.url``), closed on exit. ``fast``: the
    :data:`FAST_RENDEZVOUS` timers under ``overrides``."""
    merged = {**FAST_RENDEZVOUS, **overrides} if fast else overrides
    async with run_rendezvous(config, **merged) as server:
        yield server


def _url(rendezvous: RendezvousServer | str) -> str:
    return rendezvous if isinstance(rendezvous, str) else f"127.0.0.1:{rendezvous.port}"


@contextlib.asynccontextmanager
async def running_client(rendezvous: RendezvousServer | str, identity: Identity | None = None,
                         job: str = "mnist", *, addrs: Sequence[str] = (),
                         meta: Mapping[str, Any] | None = None, backoff_initial: float = 0.1,
                         **kw: Any) -> AsyncIterator[RendezvousClient]:
    """A started rendezvous client (a fresh identity unless given), closed on exit; ``kw``
    goes to :class:`RendezvousClient` (``reconnect``, ``membership``, ...)."""
    from overlay.identity import Identity
    from overlay.rendezvous_client import RendezvousClient

    url = rendezvous if isinstance(rendezvous, str) else rendezvous.url
    client = RendezvousClient(url, identity or Identity.generate(), job, list(addrs),
                              dict(meta or {}), backoff_initial=backoff_initial, **kw)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


def _accept_as_is(model: Any) -> Any:
    return model


@contextlib.asynccontextmanager
async def running_host(rendezvous: RendezvousServer | str, *, identity: Identity | None = None,
                       job: str = "test", listen: str | None = "tcp://127.0.0.1:0",
                       meta: Mapping[str, Any] | None = None,
                       accept: Callable[[Any], Any] | None = None,
                       on_member_event: Callable[[Any], None] | None = None,
                       **config: Any) -> AsyncIterator[Host[Any]]:
    """A started overlay :class:`Host` (a fresh identity unless given; ZeroMQ on port 0,
    ``listen=None``: not reachable), closed on exit. ``config``: further :class:`HostConfig`
    fields (``send_timeout``, ``membership``, ...). ``accept`` turns each received model into
    what lands in ``inbox`` (default: the :class:`overlay.models.ReceivedModel` itself)."""
    from overlay.host import Host, HostConfig
    from overlay.identity import Identity

    host_config = HostConfig(rendezvous=_url(rendezvous), job=job, listen=listen, **config)
    ident = identity or Identity.generate()
    host: Host[Any] = Host(ident, host_config, dict(meta or {}),
                           accept=accept or _accept_as_is, on_member_event=on_member_event)
    await host.start()
    try:
        yield host
    finally:
        await host.close()


async def until(predicate: Callable[[], object], timeout: float = 5.0,
                interval: float = 0.02) -> None:
    """Wait until ``predicate()`` is true; TimeoutError after ``timeout`` seconds. For state
    that has no event to await (another process, a counter)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


@contextlib.contextmanager
def reserved_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A TCP port bound (SO_REUSEADDR) but not listening while the block runs: connecting to
    it is refused, nobody else gets it, and a ZeroMQ socket may still bind it later (it sets
    SO_REUSEADDR too). Instead of bind-and-close ``free_port()``, which races."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        yield int(sock.getsockname()[1])


# -- processes and namespaces -------------------------------------------------------------------


def print_logs(workdir: str | os.PathLike[str], tail: int = 6000) -> None:
    """Print the end of every ``*.log`` in ``workdir`` (pytest shows it with a failure)."""
    for path in sorted(Path(workdir).glob("*.log")):
        print(f"\n===== {path.name} =====\n{path.read_text(errors='replace')[-tail:]}")


@contextlib.contextmanager
def local_swarm(workdir: str | os.PathLike[str], *,
                logs_on_error: bool = True) -> Iterator[LocalSwarm]:
    """A :class:`LocalSwarm` in ``workdir``, stopped on exit; with ``logs_on_error`` its
    logs are printed when the block raises."""
    with LocalSwarm(workdir) as swarm:
        try:
            yield swarm
        except BaseException:
            if logs_on_error:
                swarm.stop()
                print_logs(workdir)
            raise


def skip_unless_lab(coturn: bool = False, links: bool = False) -> None:
    """``pytest.skip`` with the reason when a NAT lab (with coturn; with emulated links, i.e.
    a C compiler and /dev/net/tun) cannot run here."""
    reason = available(coturn=coturn)
    if reason is None and links:
        reason = wire_available()
    if reason is not None:
        pytest.skip(reason)


@contextlib.contextmanager
def nat_lab(*, coturn: bool = False, profile: LinkProfile | str | None = None,
            **kw: Any) -> Iterator[NatLab]:
    """A :class:`NatLab` (``kw``: name, state_dir, workdir), torn down on exit; skips the test
    with the reason when labs (or coturn, or emulated links) are not available here.
    ``profile`` (a :class:`LinkProfile` or a name in ``PROFILES``): the link of every home and
    public host added without one of its own; servers stay unshaped unless given one."""
    skip_unless_lab(coturn, links=profile is not None)
    with NatLab(profile=profile, **kw) as lab:
        yield lab


@dataclass
class LabSwarm:
    """A NAT lab with coturn and the rendezvous running on its internet, and the swarm."""

    lab: NatLab
    swarm: LocalSwarm
    rdv: LabHost
    turn: LabHost
    turn_secret: str


@contextlib.contextmanager
def lab_swarm(workdir: str | os.PathLike[str], *, turn_secret: str = LAB_TURN_SECRET,
              profile: LinkProfile | str | None = None) -> Iterator[LabSwarm]:
    """A coturn lab and a swarm whose rendezvous (STUN on 3478, TURN credentials for the
    lab's coturn) runs in it (:meth:`LocalSwarm.start_lab_services`); skips without a lab.
    ``profile``: the lab's default link profile (homes and public hosts the test adds; the
    rendezvous and coturn servers stay unshaped)."""
    with nat_lab(coturn=True, profile=profile) as lab, local_swarm(workdir) as swarm:
        rdv, turn = swarm.start_lab_services(lab, turn_secret)
        yield LabSwarm(lab, swarm, rdv, turn, turn_secret)
