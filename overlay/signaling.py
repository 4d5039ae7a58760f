"""Signed signaling: the envelope every WebRTC signaling message travels in, end to end.

The rendezvous relays ``signal {from, kind, data}`` between members of a job. Since the
offer and the answer carry the SDP, and the SDP carries the DTLS certificate fingerprint that
decides whom a WebRTC link is with, a relay that could change them could put itself in the
middle of every link. So the sender seals each message and the receiver opens it; the
rendezvous only sees and relays opaque bytes::

    data      = payload || signature
    payload   = msgpack {v: 1, from, to, job, kind, body, ts, nonce}
    signature = Ed25519(DOMAIN_SIGNAL + payload) by ``from`` (64 bytes)

``body`` is what the WebRTC transport sends (a flat map: ``{}`` for ``hello``,
``{sdp, type, stage}`` for ``offer`` / ``answer``), ``ts`` the sender's clock (Unix seconds)
and ``nonce`` 16 random bytes. :meth:`SignalGuard.open` refuses, with a :class:`SignalError`
whose ``reason`` says why (:class:`SignalReject`), anything that is:

- not bytes (an old-style map: ``unsigned``) or not a well-formed envelope (``malformed``);
- sealed by someone else than the relay says (``sender_mismatch``);
- from a peer that is not in our membership view (``not_member``);
- not signed by the key our membership view holds for that peer (``bad_signature``);
- for another peer, another job or another kind than the relay says (``wrong_recipient``,
  ``wrong_job``, ``kind_mismatch``);
- older or newer than :data:`SIGNAL_WINDOW` seconds (``stale``), or already seen within it
  (``replayed``).

The replay guard keeps, per sender, the nonces of the last window in bounded memory
(:data:`MAX_REMEMBERED` per sender); when a sender's share is full, its oldest nonce is
forgotten and everything from that sender as old as it or older is refused as ``stale`` from
then on, so forgetting never lets a replay through. The state is per sender so that a member
flooding us (say with signals dated at the far end of the window) only ever locks out itself.
"""

from __future__ import annotations

import enum
import heapq
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import msgpack

from overlay.errors import SignalError
from overlay.identity import DOMAIN_SIGNAL, SIGNATURE_SIZE, Identity, verify_signature
from overlay.protocol import MAX_PEER_ID, MAX_SIGNAL_BYTES, SignalKind

SIGNAL_VERSION = 1
NONCE_SIZE = 16
SIGNAL_WINDOW = 120.0
"""Seconds a sealed signal is valid either side of the receiver's clock (peers' clocks must
agree to within this)."""
MAX_REMEMBERED = 512
"""Nonces the replay guard keeps per sender (a link set-up takes a handful of signals)."""
MAX_BODY_ITEMS = 16
MAX_JOB = 64
_PAYLOAD_FIELDS: dict[str, tuple[type, ...]] = {
    "v": (int,),
    "from": (str,),
    "to": (str,),
    "job": (str,),
    "kind": (str,),
    "body": (dict,),
    "ts": (float,),
    "nonce": (bytes,),
}
_BODY_VALUE = (str, int, float, bool, bytes, type(None))


class SignalReject(enum.StrEnum):
    """Why a received signal was refused (log lines and ``signal_<reason>`` counters)."""

    UNSIGNED = "unsigned"
    MALFORMED = "malformed"
    SENDER_MISMATCH = "sender_mismatch"
    NOT_MEMBER = "not_member"
    BAD_SIGNATURE = "bad_signature"
    WRONG_RECIPIENT = "wrong_recipient"
    WRONG_JOB = "wrong_job"
    KIND_MISMATCH = "kind_mismatch"
    STALE = "stale"
    REPLAYED = "replayed"


def _check_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or len(body) > MAX_BODY_ITEMS:
        raise ValueError(f"a signal body is a map of at most {MAX_BODY_ITEMS} items")
    for key, value in body.items():
        if not isinstance(key, str) or not isinstance(value, _BODY_VALUE):
            raise ValueError(f"signal body item {str(key)[:40]!r}: want str -> scalar")
    return body


def seal(
    identity: Identity, to: str, job: str, kind: SignalKind | str, body: dict[str, Any],
    *, now: float | None = None, nonce: bytes | None = None,
) -> bytes:
    """The sealed ``data`` of a signal from ``identity`` to peer ``to`` in ``job``.

    Raises ValueError for a kind that is not a :class:`SignalKind`, a body that is not a flat
    map, or a sealed message over :data:`MAX_SIGNAL_BYTES`.
    """
    payload: bytes = msgpack.packb(
        {
            "v": SIGNAL_VERSION,
            "from": identity.peer_id,
            "to": to,
            "job": job,
            "kind": SignalKind(kind).value,
            "body": _check_body(body),
            "ts": float(time.time() if now is None else now),
            "nonce": secrets.token_bytes(NONCE_SIZE) if nonce is None else nonce,
        },
        use_bin_type=True,
    )
    data = payload + identity.sign(DOMAIN_SIGNAL + payload)
    if len(data) > MAX_SIGNAL_BYTES:
        raise ValueError(f"sealed signal of {len(data)} bytes > {MAX_SIGNAL_BYTES}")
    return data


def unpack_payload(data: bytes) -> dict[str, Any]:
    """The payload of sealed ``data``, checked for shape only (no signature, no policy)."""
    if len(data) > MAX_SIGNAL_BYTES:
        raise SignalError(SignalReject.MALFORMED, f"{len(data)} bytes > {MAX_SIGNAL_BYTES}")
    if len(data) <= SIGNATURE_SIZE:
        raise SignalError(SignalReject.MALFORMED, f"{len(data)} bytes: no room for a signature")
    try:
        payload = msgpack.unpackb(
            data[:-SIGNATURE_SIZE],
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_SIGNAL_BYTES,
            max_bin_len=MAX_SIGNAL_BYTES,
            max_array_len=0,
            max_map_len=max(len(_PAYLOAD_FIELDS), MAX_BODY_ITEMS),
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types; all mean "malformed"
        raise SignalError(SignalReject.MALFORMED,
                          f"payload is not msgpack ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.keys() != _PAYLOAD_FIELDS.keys():
        raise SignalError(SignalReject.MALFORMED,
                          f"payload is not a map of exactly {', '.join(_PAYLOAD_FIELDS)}")
    for name, types in _PAYLOAD_FIELDS.items():
        value = payload[name]
        if not isinstance(value, types) or isinstance(value, bool):
            raise SignalError(SignalReject.MALFORMED,
                              f"{name}: expected {types[0].__name__}, got {type(value).__name__}")
    if payload["v"] != SIGNAL_VERSION:
        raise SignalError(SignalReject.MALFORMED, f"version {payload['v']} != {SIGNAL_VERSION}")
    for name, limit in (("from", MAX_PEER_ID), ("to", MAX_PEER_ID), ("job", MAX_JOB)):
        if not 0 < len(payload[name]) <= limit:
            raise SignalError(SignalReject.MALFORMED, f"{name}: 1..{limit} characters")
    if payload["kind"] not in SignalKind.__members__.values():
        raise SignalError(SignalReject.MALFORMED, f"kind {payload['kind'][:40]!r} is unknown")
    if len(payload["nonce"]) != NONCE_SIZE or not math.isfinite(payload["ts"]):
        raise SignalError(SignalReject.MALFORMED, "bad nonce or timestamp")
    try:
        _check_body(payload["body"])
    except ValueError as exc:
        raise SignalError(SignalReject.MALFORMED, str(exc)) from None
    return payload


class SignalGuard:
    """Opens the signals addressed to one peer in one job; keeps the replay state."""

    def __init__(
        self,
        peer_id: str,
        job: str,
        public_key_of: Callable[[str], bytes | None],
        *,
        window: float = SIGNAL_WINDOW,
        max_remembered: int = MAX_REMEMBERED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.peer_id = peer_id
        self.job = job
        self.window = window
        self.max_remembered = max_remembered
        self._public_key_of = public_key_of
        """Our membership view: the key of a member, None for anybody else."""
        self._clock = clock
        self._senders: dict[str, _Replay] = {}
        self._opened = 0
        self._dropped_floor = -math.inf
        """The highest floor of the sender states dropped so far (always a window behind the
        clock when dropped): a new state starts there, so dropping one never reopens a replay."""

    def open(self, relay_from: str, kind: SignalKind | str, data: Any) -> dict[str, Any]:
        """The body of ``data``, relayed as ``signal {from: relay_from, kind, data}``.

        Raises SignalError (its ``reason`` a :class:`SignalReject`) and then remembers nothing.
        """
        if not isinstance(data, bytes):
            raise SignalError(SignalReject.UNSIGNED,
                              f"data is a {type(data).__name__}, not a sealed envelope")
        payload = unpack_payload(data)
        sender = payload["from"]
        if sender != relay_from:
            raise SignalError(SignalReject.SENDER_MISMATCH,
                              f"sealed by {sender[:64]}, relayed as from {relay_from[:64]}")
        public_key = self._public_key_of(sender)
        if public_key is None:
            raise SignalError(SignalReject.NOT_MEMBER, f"{sender} is not a member of our job")
        if not verify_signature(public_key, data[-SIGNATURE_SIZE:],
                                DOMAIN_SIGNAL + data[:-SIGNATURE_SIZE]):
            raise SignalError(SignalReject.BAD_SIGNATURE,
                              f"not signed by the key of member {sender}")
        if payload["to"] != self.peer_id:
            raise SignalError(SignalReject.WRONG_RECIPIENT, f"sealed for {payload['to']}")
        if payload["job"] != self.job:
            raise SignalError(SignalReject.WRONG_JOB, f"sealed for job {payload['job']!r}")
        if payload["kind"] != kind:
            raise SignalError(SignalReject.KIND_MISMATCH,
                              f"sealed as {payload['kind']}, relayed as {kind[:20]}")
        now = self._clock()
        ts = payload["ts"]
        if abs(now - ts) > self.window:
            raise SignalError(SignalReject.STALE,
                              f"sealed {now - ts:+.1f} s from now (window {self.window:g} s)")
        replay = self._senders.get(sender)
        if replay is None:
            replay = self._senders[sender] = _Replay(self._dropped_floor)
        replay.forget_before(now - self.window)
        if ts <= replay.floor:
            raise SignalError(SignalReject.STALE, "older than the replay guard remembers")
        if payload["nonce"] in replay.seen:
            raise SignalError(SignalReject.REPLAYED, f"nonce {payload['nonce'].hex()} seen before")
        replay.remember(ts, payload["nonce"], self.max_remembered)
        self._opened += 1
        if self._opened % 256 == 0:  # now and then: drop senders with nothing left to remember
            for peer, state in list(self._senders.items()):
                state.forget_before(now - self.window)
                if not state.seen:
                    self._dropped_floor = max(self._dropped_floor, state.floor)
                    del self._senders[peer]
        return payload["body"]  # type: ignore[no-any-return]

    @property
    def remembered(self) -> int:
        """Nonces held by the replay guard now (all senders)."""
        return sum(len(state.seen) for state in self._senders.values())


class _Replay:
    """One sender's recent nonces, oldest first, and the age below which it is refused."""

    def __init__(self, floor: float) -> None:
        self.seen: set[bytes] = set()
        self.by_age: list[tuple[float, bytes]] = []  # heap of (ts, nonce)
        self.floor = floor  # this sender's signals this old or older are refused

    def forget_before(self, oldest: float) -> None:
        """Drop nonces whose signals the window refuses anyway."""
        while self.by_age and self.by_age[0][0] < oldest:
            self._pop_oldest()

    def _pop_oldest(self) -> None:
        """Forget the oldest nonce; from now on its age is refused (even if our clock jumps
        back)."""
        ts, nonce = heapq.heappop(self.by_age)
        self.seen.discard(nonce)
        self.floor = max(self.floor, ts)

    def remember(self, ts: float, nonce: bytes, limit: int) -> None:
        while len(self.by_age) >= limit:
            self._pop_oldest()
        self.seen.add(nonce)
        heapq.heappush(self.by_age, (ts, nonce))
