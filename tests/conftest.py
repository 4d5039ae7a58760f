"""Shared fixtures (from testkit.fixtures): the local swarm of real processes, which prints its
logs when a test fails; an in-process rendezvous; NAT labs, skipped with the reason where they
cannot run; a swarm whose rendezvous and coturn run in a lab."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from rendezvous.server import RendezvousServer
from testkit.fixtures import (
    LabSwarm,
    lab_swarm,
    nat_lab,
    print_logs,
    running_rendezvous,
)
from testkit.natlab import NatLab
from testkit.swarm import LocalSwarm


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return report is not None and bool(report.failed)


@pytest.fixture
def swarm(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalSwarm]:
    """A LocalSwarm in ``tmp_path``; its logs are printed when the test fails."""
    with LocalSwarm(tmp_path) as s:
        yield s
    if _failed(request):
        print_logs(tmp_path)


@pytest.fixture
async def rendezvous_server() -> AsyncIterator[RendezvousServer]:
    """An in-process rendezvous on 127.0.0.1 (TCP and STUN on port 0), fast timers."""
    async with running_rendezvous(fast=True) as server:
        yield server


@pytest.fixture
def lab() -> Iterator[NatLab]:
    """A NAT lab (no daemons yet); skipped with the reason where labs cannot run."""
    with nat_lab() as built:
        yield built


@pytest.fixture
def coturn_lab() -> Iterator[NatLab]:
    """A NAT lab where coturn can run; skipped with the reason otherwise."""
    with nat_lab(coturn=True) as built:
        yield built


@pytest.fixture
def lab_services(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LabSwarm]:
    """A coturn lab, with coturn and the rendezvous running on its internet, and the swarm;
    the swarm's logs are printed when the test fails."""
    with lab_swarm(tmp_path) as built:
        yield built
    if _failed(request):
        print_logs(tmp_path)
