"""Token buckets: one per session (messages, signals), or one per key in a bounded table
(per source IP: STUN requests, failed joins).

Time comes in as an argument (monotonic seconds), so tests drive them without sleeping.
"""

from __future__ import annotations

import collections


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; ``rate <= 0``: no limit."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = burst
        self._last: float | None = None

    def take(self, now: float) -> bool:
        """Spend one token; False (and nothing spent) when the bucket is empty."""
        if self.rate <= 0:
            return True
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class KeyedRateLimiter:
    """A token bucket per key (a source IP); the table is bounded: the least recently seen key
    is forgotten first."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = (
            collections.OrderedDict()
        )

    def _refill(self, key: str, now: float) -> float:
        tokens, last = self._buckets.pop(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def allow(self, key: str, now: float) -> bool:
        """Spend one of ``key``'s tokens; False when it has none left."""
        if self.rate <= 0:
            return True
        tokens = self._refill(key, now)
        allowed = tokens >= 1.0
        self._store(key, tokens - 1.0 if allowed else tokens, now)
        return allowed

    def exhausted(self, key: str, now: float) -> bool:
        """True if ``key`` has no token left (nothing is spent)."""
        if self.rate <= 0 or key not in self._buckets:
            return False
        tokens = self._refill(key, now)
        self._store(key, tokens, now)
        return tokens < 1.0
