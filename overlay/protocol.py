"""The rendezvous session protocol: msgpack maps over a WebSocket (binary frames).

Message types are an enum and each one's fields are declared once, in ``SCHEMA``; ``decode``
checks a received frame against it and fails with a precise ``ProtocolError``.

    server -> peer   challenge {nonce, server, version}
    peer   -> server join      {public_key, signature, job, addrs, meta, [proof]}
                               signature = sign(DOMAIN_RENDEZVOUS_AUTH + nonce + job)
                               proof (closed jobs, see overlay.membership) =
                                 HMAC-SHA256(join secret, DOMAIN_JOB_PROOF + job + public_key)
    server -> peer   welcome   {peer_id, observed_ip, reachable_addrs, members, ttl,
                                heartbeat_interval, ice_servers, [ice_ttl]}
    server -> peer   joined    {member}            (pushed, no polling)
    server -> peer   left      {peer_id, reason}   (reason: leave | expired | replaced)
    peer   -> server heartbeat {}
    peer   -> server report    {epoch, metrics}    (shown by GET /peers)
    peer   -> server leave     {}
    peer   -> server refresh_ice {}            (fresh TURN credentials, before they expire)
    server -> peer   ice_servers {ice_servers, [ice_ttl]}   (the answer to refresh_ice)
    peer   -> server signal    {to, kind, data}    (relayed to ``to``, a connected member of
                                                    the same job; whole message <= 32 KiB)
    server -> peer   signal    {from, kind, data}  (``from`` set by the server, never copied)
                               kind: offer | answer | candidate | bye; data: bin or map
    server -> peer   error     {code, message}

``ice_ttl``: seconds until the TURN credentials in ``ice_servers`` expire; present when they
do, and then the rendezvous answers ``refresh_ice`` (a peer renews at ~80 % of ``ice_ttl``).

An ``error`` may carry more fields: ``unknown_peer`` has ``to``, the target it refers to.

Size: a job holds at most ``MAX_MEMBERS`` members (more joins get ``error job_full``), so a
``welcome`` is at most ``MAX_WELCOME_BYTES``; every other message, both ways, at most
``MAX_MESSAGE_BYTES``. Pushed ``joined`` / ``left`` about one peer that are still queued for a
slow socket are coalesced: only the latest is sent (it says all there is to know about that peer).

A member is {peer_id, public_key, addrs, meta, joined_at, [proof]}; ``addrs`` only ever holds
ZeroMQ addresses that the rendezvous dialed back and got a signed answer from; ``proof`` is the
member's join proof (present when it sent one), so that peers check membership themselves.
A join refused by the job's policy gets ``error not_invited`` (fatal: the client does not retry).
Fields in [brackets] are optional (``OPTIONAL``), and type-checked when present.
"""

from __future__ import annotations

import enum
import re
from typing import Any

import msgpack

from overlay.errors import ProtocolError
from overlay.identity import DOMAIN_RENDEZVOUS_AUTH, Identity

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
MAX_ADDRS = 8
MAX_META_ITEMS = 32
MAX_STR = 256
MAX_SIGNAL_BYTES = 32 * 1024
MAX_PEER_ID = 128
MAX_MEMBERS = 4096
"""Most members one job may have; the rendezvous refuses more joins with ``job_full``."""
MAX_MEMBER_BYTES = 2048
"""Largest packed member map (addresses + meta); a join making a bigger one is ``too_large``."""
MAX_WELCOME_BYTES = MAX_MESSAGE_BYTES + MAX_MEMBERS * MAX_MEMBER_BYTES
"""Largest server -> peer message: a ``welcome`` listing ``MAX_MEMBERS`` members (8 MiB + 64 KiB).
Peer -> server messages stay within ``MAX_MESSAGE_BYTES``."""
JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ADDR_RE = re.compile(r"^tcp://[A-Za-z0-9.\-\[\]:]{1,200}:\d{1,5}$")


class MsgType(enum.StrEnum):
    CHALLENGE = "challenge"
    JOIN = "join"
    WELCOME = "welcome"
    JOINED = "joined"
    LEFT = "left"
    HEARTBEAT = "heartbeat"
    REPORT = "report"
    LINKS = "links"
    LEAVE = "leave"
    SIGNAL = "signal"
    REFRESH_ICE = "refresh_ice"
    ICE_SERVERS = "ice_servers"
    ERROR = "error"


class SignalKind(enum.StrEnum):
    """What a relayed ``signal`` carries (WebRTC offer/answer, a trickled ICE candidate)."""

    OFFER = "offer"
    ANSWER = "answer"
    CANDIDATE = "candidate"
    BYE = "bye"
    HELLO = "hello"  # the larger peer id asks the smaller one for an offer


class LeftReason(enum.StrEnum):
    """Why a member left (the ``left`` message's ``reason``)."""

    LEAVE = "leave"  # it said goodbye
    EXPIRED = "expired"  # no heartbeat within the TTL
    REPLACED = "replaced"  # it joined again (a new session or new addresses)
    LOST = "lost"  # client side only: gone from the welcome after we reconnected


class ErrorCode(enum.StrEnum):
    MALFORMED = "malformed"  # not msgpack, not a map, unknown type, wrong field types
    TOO_LARGE = "too_large"
    BAD_SIGNATURE = "bad_signature"
    BAD_STATE = "bad_state"  # e.g. heartbeat before join
    BAD_JOB = "bad_job"
    RATE_LIMITED = "rate_limited"
    UNKNOWN_PEER = "unknown_peer"  # signal target not a connected member of the sender's job
    JOB_FULL = "job_full"  # the job already has MAX_MEMBERS members
    NOT_INVITED = "not_invited"  # the job is closed to this peer (secret, list, closed server)


FATAL_ERRORS = frozenset([ErrorCode.NOT_INVITED])
"""Refusals that a retry cannot fix: the client gives up instead of reconnecting."""


# Messages a peer may send, by type: field -> allowed Python types.
_SCALAR = (int, float, str, bool)
SCHEMA: dict[MsgType, dict[str, tuple[type, ...]]] = {
    MsgType.JOIN: {
        "public_key": (bytes,),
        "signature": (bytes,),
        "job": (str,),
        "addrs": (list,),
        "meta": (dict,),
    },
    MsgType.HEARTBEAT: {},
    MsgType.REPORT: {"epoch": (int,), "metrics": (dict,)},
    MsgType.LINKS: {"links": (dict,)},
    MsgType.LEAVE: {},
    MsgType.REFRESH_ICE: {},
    # both ways; the peer field ("to" / "from") is checked by check_signal()
    MsgType.SIGNAL: {"kind": (str,), "data": (bytes, dict)},
    # server -> peer (checked by the client)
    MsgType.CHALLENGE: {"nonce": (bytes,), "server": (str,), "version": (int,)},
    MsgType.WELCOME: {
        "peer_id": (str,),
        "observed_ip": (str,),
        "reachable_addrs": (list,),
        "members": (list,),
        "ttl": (int, float),
        "heartbeat_interval": (int, float),
        "ice_servers": (list,),
    },
    MsgType.JOINED: {"member": (dict,)},
    MsgType.LEFT: {"peer_id": (str,), "reason": (str,)},
    MsgType.ICE_SERVERS: {"ice_servers": (list,)},
    MsgType.ERROR: {"code": (str,), "message": (str,)},
}
# Fields a message may carry, by type: checked like SCHEMA's when present.
OPTIONAL: dict[MsgType, dict[str, tuple[type, ...]]] = {
    MsgType.JOIN: {"proof": (bytes,)},
    MsgType.WELCOME: {"ice_ttl": (int, float)},
    MsgType.ICE_SERVERS: {"ice_ttl": (int, float)},
}
MAX_PROOF_BYTES = 64


def encode(msg_type: MsgType, **fields: Any) -> bytes:
    """Pack one message. Fields are not checked here: the sender builds them."""
    return pack({"type": msg_type.value, **fields})


def pack(value: Any) -> bytes:
    """One value as msgpack, for ``encode_prepacked``."""
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def pack_array(packed_items: list[bytes]) -> bytes:
    """An array of values each already packed (see ``pack``)."""
    header: bytes = msgpack.Packer().pack_array_header(len(packed_items))
    return header + b"".join(packed_items)


def encode_prepacked(msg_type: MsgType, prepacked: dict[str, bytes], **fields: Any) -> bytes:
    """Like ``encode``, with the values of ``prepacked`` already msgpack (the same bytes as
    ``encode`` would give): the rendezvous packs a member once, not once per frame."""
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack_map_header(1 + len(fields) + len(prepacked)),
             packer.pack("type"), packer.pack(msg_type.value)]
    for name, value in fields.items():
        parts += [packer.pack(name), packer.pack(value)]
    for name, packed in prepacked.items():
        parts += [packer.pack(name), packed]
    return b"".join(parts)


def decode(
    data: bytes | str, *, max_bytes: int = MAX_MESSAGE_BYTES, max_items: int = 1024
) -> tuple[MsgType, dict[str, Any]]:
    """Unpack and check one message; raise ProtocolError with a precise reason otherwise.

    ``max_items`` bounds every array (a ``welcome`` needs ``MAX_MEMBERS``).
    """
    if isinstance(data, str):
        raise ProtocolError(ErrorCode.MALFORMED, "text frame; messages are binary msgpack")
    if len(data) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message of {len(data)} bytes > {max_bytes}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_items,
            max_map_len=256,
        )
    except Exception as exc:  # msgpack raises many types; all mean "malformed"
        raise ProtocolError(ErrorCode.MALFORMED, f"not msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "message is not a map")
    raw_type = obj.pop("type", None)
    try:
        msg_type = MsgType(raw_type)
    except ValueError:
        raise ProtocolError(ErrorCode.MALFORMED, f"unknown message type {raw_type!r}") from None
    optional = OPTIONAL.get(msg_type, {})
    for name, types in [*SCHEMA[msg_type].items(), *optional.items()]:
        if name not in obj:
            if name in optional:
                continue
            raise ProtocolError(ErrorCode.MALFORMED, f"{msg_type.value}: missing field {name!r}")
        value = obj[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"{msg_type.value}.{name}: expected {'/'.join(t.__name__ for t in types)}, "
                f"got {type(value).__name__}",
            )
    return msg_type, obj


def signed_join(
    identity: Identity, nonce: bytes, job: str, *, addrs: list[str] | None = None,
    meta: dict[str, Any] | None = None, proof: bytes | None = None,
) -> bytes:
    """The ``join`` answering a ``challenge`` with ``nonce``: ``identity`` signs
    ``DOMAIN_RENDEZVOUS_AUTH + nonce + job``; ``proof`` only for a closed job."""
    return encode(
        MsgType.JOIN,
        public_key=identity.public_key,
        signature=identity.sign(DOMAIN_RENDEZVOUS_AUTH + nonce + job.encode()),
        job=job,
        addrs=list(addrs or []),
        meta=dict(meta or {}),
        **({} if proof is None else {"proof": proof}),
    )


def check_job(job: str) -> str:
    if not JOB_RE.match(job):
        raise ProtocolError(ErrorCode.BAD_JOB, f"job name {job[:80]!r} must match {JOB_RE.pattern}")
    return job


def check_addrs(addrs: list[Any]) -> list[str]:
    if len(addrs) > MAX_ADDRS:
        raise ProtocolError(ErrorCode.MALFORMED, f"at most {MAX_ADDRS} addresses, got {len(addrs)}")
    for addr in addrs:
        if not isinstance(addr, str) or not ADDR_RE.match(addr):
            raise ProtocolError(
                ErrorCode.MALFORMED, f"bad address {str(addr)[:80]!r}; want tcp://HOST:PORT"
            )
    return list(addrs)


def check_proof(proof: bytes | None) -> bytes | None:
    """``join.proof``: absent, or a short byte string (an HMAC-SHA256 is 32 bytes)."""
    if proof is not None and not 0 < len(proof) <= MAX_PROOF_BYTES:
        raise ProtocolError(
            ErrorCode.MALFORMED, f"join.proof: {len(proof)} bytes, want 1..{MAX_PROOF_BYTES}"
        )
    return proof


def check_meta(meta: dict[Any, Any]) -> dict[str, Any]:
    """Metadata and metrics: a small flat map of short strings to scalars."""
    if len(meta) > MAX_META_ITEMS:
        raise ProtocolError(ErrorCode.MALFORMED, f"at most {MAX_META_ITEMS} items, got {len(meta)}")
    for key, value in meta.items():
        if not isinstance(key, str) or len(key) > 64:
            raise ProtocolError(ErrorCode.MALFORMED, f"bad key {str(key)[:80]!r}")
        if value is not None and not isinstance(value, _SCALAR):
            raise ProtocolError(ErrorCode.MALFORMED, f"{key}: value must be a scalar")
        if isinstance(value, str) and len(value) > MAX_STR:
            raise ProtocolError(ErrorCode.MALFORMED, f"{key}: string longer than {MAX_STR}")
    return dict(meta)


def check_signal(fields: dict[str, Any], peer_field: str) -> tuple[str, SignalKind, Any]:
    """(peer, kind, data) of a decoded ``signal``; ``peer_field`` is "to" or "from"."""
    peer = fields.get(peer_field)
    if not isinstance(peer, str) or not 0 < len(peer) <= MAX_PEER_ID:
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"signal.{peer_field}: expected a peer id (str of 1..{MAX_PEER_ID} chars)",
        )
    try:
        kind = SignalKind(fields["kind"])
    except ValueError:
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"signal.kind {str(fields['kind'])[:40]!r} is not one of "
            f"{', '.join(k.value for k in SignalKind)}",
        ) from None
    return peer, kind, fields["data"]


LINK_KINDS = frozenset(["zmq", "webrtc-direct", "webrtc-relay"])
"""The values of ``overlay.transport.base.LinkKind`` (not imported here: the rendezvous runs
without numpy, which the transports need; tests/test_host.py checks that they agree)."""
MAX_LINKS = 256


def check_links(links: dict[Any, Any]) -> dict[str, dict[str, Any]]:
    """``links {links: {peer_id: {kind, connect_s}}}``: how a peer reaches each other peer."""
    if len(links) > MAX_LINKS:
        raise ProtocolError(ErrorCode.MALFORMED, f"at most {MAX_LINKS} links, got {len(links)}")
    out: dict[str, dict[str, Any]] = {}
    for peer_id, link in links.items():
        if not isinstance(peer_id, str) or not 0 < len(peer_id) <= 64:
            raise ProtocolError(ErrorCode.MALFORMED, f"bad peer id {str(peer_id)[:80]!r}")
        if not isinstance(link, dict) or link.get("kind") not in LINK_KINDS:
            raise ProtocolError(
                ErrorCode.MALFORMED, f"link to {peer_id}: kind must be one of {sorted(LINK_KINDS)}"
            )
        connect_s = link.get("connect_s")
        if not isinstance(connect_s, int | float) or isinstance(connect_s, bool) or connect_s < 0:
            raise ProtocolError(ErrorCode.MALFORMED, f"link to {peer_id}: bad connect_s")
        out[peer_id] = {"kind": link["kind"], "connect_s": float(connect_s)}
    return out
