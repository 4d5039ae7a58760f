"""Short-lived TURN credentials for coturn's ``use-auth-secret`` (the "TURN REST API").

draft-uberti-behave-turn-rest-00, as coturn implements it: the username is
``"<expiry unix time>:<user>"`` and the password is ``base64(HMAC-SHA1(secret, username))``.
coturn recomputes the password from the username with the shared ``static-auth-secret`` and
refuses a username whose time has passed, so the rendezvous never talks to coturn.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

SEPARATOR = ":"
"""coturn's default ``rest-api-separator``."""


@dataclass(frozen=True)
class TurnCredentials:
    username: str
    credential: str
    expires: int
    """Unix time after which coturn refuses them."""

    def ice_server(self, urls: list[str]) -> dict[str, Any]:
        """One RTCIceServer-shaped map: {urls, username, credential}."""
        return {"urls": list(urls), "username": self.username, "credential": self.credential}


def turn_password(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def make_credentials(
    secret: str, user: str, ttl: float, now: float | None = None
) -> TurnCredentials:
    """Credentials for ``user`` valid ``ttl`` seconds from ``now`` (default: the wall clock)."""
    if not secret:
        raise ValueError("an empty TURN secret")
    if SEPARATOR in user:
        raise ValueError(f"TURN user {user!r} must not contain {SEPARATOR!r}")
    expires = int((time.time() if now is None else now) + ttl)
    username = f"{expires}{SEPARATOR}{user}"
    return TurnCredentials(username, turn_password(secret, username), expires)


def verify_credentials(
    secret: str, username: str, password: str, now: float | None = None
) -> bool:
    """What coturn checks: the password matches the username and its time has not passed."""
    stamp, sep, _ = username.partition(SEPARATOR)
    if not sep or not stamp.isdigit():
        return False
    if int(stamp) < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(turn_password(secret, username), password)


def turn_ice_server(
    urls: list[str], secret: str, user: str, ttl: float, now: float | None = None
) -> dict[str, Any]:
    """One RTCIceServer-shaped map: {urls, username, credential}."""
    return make_credentials(secret, user, ttl, now).ice_server(urls)
