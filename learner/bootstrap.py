"""Joining a swarm: waiting for ``--min-peers``, and a newcomer's first model.

A newcomer fetches the current (published, post-merge) models of up to ``bootstrap_peers``
members in parallel, waits ``bootstrap_timeout`` for them, and starts from their weighted
average, or with a robust rule from their coordinate-wise median (it has no model of its own
to judge them by yet), continuing their epoch numbering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import torch

from learner.averaging import weighted_average
from learner.exchange import Incoming
from learner.robust import coordinate_median
from learner.robust_rule import Robust, RobustRule
from overlay.host import Host

__all__ = ["combine", "fetch_donors", "wait_for_peers"]

log = logging.getLogger(__name__)


async def wait_for_peers(host: Host[Incoming], partners: Callable[[], list[str]],
                         min_peers: int, timeout: float) -> None:
    """Until ``min_peers`` peers (ourselves included) are in the job, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while len(partners()) + 1 < min_peers:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log.warning("only %d of %d peers after %.0f s; training anyway",
                        len(partners()) + 1, min_peers, timeout)
            return
        log.info("waiting for peers: %d of %d here", len(partners()) + 1, min_peers)
        host.changed.clear()
        try:
            await asyncio.wait_for(host.changed.wait(), remaining)
        except TimeoutError:
            pass


async def fetch_donors(host: Host[Incoming], donors: Sequence[str], timeout: float
                       ) -> list[Incoming]:
    """The current models of ``donors`` that arrived within ``timeout``."""
    if not donors:
        return []
    tasks = {asyncio.create_task(host.fetch_model(p)): p for p in donors}
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        log.info("bootstrap: %s too slow, going on without it", tasks[task])
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    got = []
    for task in done:
        if task.exception() is not None:
            log.info("bootstrap: no model from %s (%s)", tasks[task], task.exception())
            continue
        got.append(task.result())
    return got


def combine(models: Sequence[Incoming], robust: Robust) -> dict[str, torch.Tensor]:
    """The donors' models as one starting model; runs in a worker thread."""
    if robust.rule is RobustRule.NONE:
        return weighted_average([(m.state, m.samples) for m in models])
    return coordinate_median([m.state for m in models])
