"""Shared fixtures: a local swarm of real processes that prints its logs when a test fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.swarm import LocalSwarm


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def swarm(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path) as s:
        yield s
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for path in sorted(tmp_path.glob("*.log")):
            print(f"\n===== {path.name} =====\n{path.read_text(errors='replace')[-6000:]}")
