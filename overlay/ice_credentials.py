"""The ICE servers a peer uses now, and the renewal of their TURN credentials.

The welcome's ``ice_servers`` (with the TURN credentials the rendezvous made for us) are kept
in :attr:`IceCredentials.servers`; when they expire (``ice_ttl``, or the ``expiry:user``
username) :attr:`IceCredentials.expires_at` says, and :meth:`IceCredentials.renew_loop` asks for
fresh ones (``refresh_ice``, through the rendezvous client) at :data:`ICE_RENEW_AT` (80 %) of
their lifetime, retrying with back-off. A reconnect's welcome brings fresh ones too. A renewal
that fails keeps the current list (never an empty one).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger("overlay.rendezvous_client")

ICE_RENEW_AT = 0.8
"""Renew the TURN credentials once this fraction of their lifetime has passed."""
ICE_REFRESH_TIMEOUT = 5.0
"""Bound on one ``refresh_ice`` round trip (no ``ice_servers`` by then: retry with back-off)."""
ICE_MIN_LIFETIME = 1.0
"""Credentials that live less than this are renewed this often at the most (a clock skew or a
tiny ``turn_ttl`` must not turn renewal into a busy loop)."""
_REST_USERNAME = re.compile(r"^(\d{1,12}):")  # TURN REST API: "<expiry unix time>:<user>"


def ice_expiry(ice_servers: Sequence[Mapping[str, Any]]) -> float | None:
    """The earliest expiry (Unix time) in TURN REST API usernames (``expiry:user``) among
    ``ice_servers``; None when none has one."""
    stamps = [
        int(match.group(1))
        for server in ice_servers
        if isinstance(server.get("username"), str)
        and (match := _REST_USERNAME.match(server["username"])) is not None
    ]
    return float(min(stamps)) if stamps else None


class IceCredentials:
    """The ICE servers to use now and when to renew them."""

    def __init__(self, backoff_initial: float, backoff_max: float) -> None:
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.servers: list[dict[str, Any]] = []
        """The ICE servers to use now (asked for every new WebRTC peer connection)."""
        self.expires_at: float | None = None
        """Unix time at which the TURN credentials in ``servers`` expire (the rendezvous'
        ``ice_ttl`` from when we got them, else the username's stamp); None: they do not."""
        self.renewals = 0
        """How many times ``refresh_ice`` brought fresh ICE servers (a welcome does not count)."""
        self._renew_at: float | None = None  # monotonic; None: nothing to renew
        self._lifetime = 0.0
        self.changed = asyncio.Event()  # set whenever the servers are replaced

    def apply(self, servers: list[Any], ice_ttl: float | None, *, source: str) -> bool:
        """Take fresh ICE servers (from a welcome or an ``ice_servers`` answer) and schedule
        their renewal; False (and the current ones kept) for an empty answer."""
        fresh = [s for s in servers if isinstance(s, dict)]
        if not fresh and self.servers and source != "welcome":
            log.warning("the rendezvous answered refresh_ice with no ICE servers; keeping ours")
            return False
        now_wall, now = time.time(), time.monotonic()
        expires_at = now_wall + float(ice_ttl) if ice_ttl is not None else ice_expiry(fresh)
        self.servers = fresh
        self.expires_at = expires_at
        if expires_at is None or ice_ttl is None:
            # No expiry, or a rendezvous that did not say ice_ttl (so may not know
            # refresh_ice): only a reconnect renews them.
            self._renew_at = None
        else:
            self._lifetime = max(expires_at - now_wall, 0.0)
            self._renew_at = now + max(ICE_RENEW_AT * self._lifetime, ICE_MIN_LIFETIME)
        self.changed.set()
        log.debug("ICE servers from the %s: %d, %s", source, len(fresh),
                  "no expiry" if expires_at is None
                  else f"expire in {expires_at - now_wall:.1f} s")
        return True

    async def renew_loop(self, refresh: Callable[[], Awaitable[bool]]) -> None:
        """Renew the TURN credentials at ``ICE_RENEW_AT`` of their lifetime; on failure retry
        with back-off (``backoff_initial`` doubling to ``backoff_max``, and never later than
        a quarter of the time left), keeping the current ones meanwhile."""
        delay = self.backoff_initial
        while True:
            renew_at = self._renew_at
            wait = None if renew_at is None else renew_at - time.monotonic()
            if wait is None or wait > 0:
                if await self.changed_within(wait):
                    delay = self.backoff_initial  # fresh ones: a new schedule
                continue
            if await refresh():
                delay = self.backoff_initial
                continue
            left = None if self.expires_at is None else self.expires_at - time.time()
            retry = min(delay, self.backoff_max) * random.uniform(1.0, 1.5)
            if left is not None and left > 0:
                retry = min(retry, max(left / 4, 0.1))
            log.warning("renewing the TURN credentials failed (%s); retry in %.1f s",
                        f"they expire in {left:.1f} s" if left is not None and left > 0
                        else "they have expired", retry)
            self._renew_at = time.monotonic() + retry
            delay = min(delay * 2, self.backoff_max)

    async def changed_within(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: forever) for new ICE servers; True if so."""
        try:
            async with asyncio.timeout(timeout):
                await self.changed.wait()
        except TimeoutError:
            return False
        self.changed.clear()
        return True
