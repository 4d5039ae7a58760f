"""Token buckets: one per session (messages, signals), or one per key in a bounded table
(per source IP: STUN requests, failed joins).

Time comes in as an argument (monotonic seconds), so tests drive them without sleeping.
"""

from __future__ import annotations

import collections


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; ``rate <= 0``: no limit."""

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = burst
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self, now: float) -> bool:
        """Spend one token; False (and nothing spent) when the bucket is empty."""
        if self.rate <= 0:
            return True
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def empty(self, now: float) -> bool:
        """True if no token is left (nothing is spent)."""
        if self.rate <= 0:
            return False
        self._refill(now)
        return self._tokens < 1.0


class KeyedRateLimiter:
    """A token bucket per key (a source IP); the table is bounded: the least recently seen key
    is forgotten first."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def _bucket(self, key: str) -> TokenBucket:
        """``key``'s bucket, now the most recently seen."""
        bucket = self._buckets.pop(key, None) or TokenBucket(self.rate, self.burst)
        self._buckets[key] = bucket
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return bucket

    def allow(self, key: str, now: float) -> bool:
        """Spend one of ``key``'s tokens; False when it has none left."""
        if self.rate <= 0:
            return True
        return self._bucket(key).take(now)

    def exhausted(self, key: str, now: float) -> bool:
        """True if ``key`` has no token left (nothing is spent)."""
        if self.rate <= 0 or key not in self._buckets:
            return False
        return self._bucket(key).empty(now)
