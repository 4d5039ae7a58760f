"""Closed jobs: who may be a member of a job.

A job's policy may ask for a **join secret** and/or a **list of allowed peer ids**. A peer that
knows the secret proves it with ``proof = HMAC-SHA256(secret, DOMAIN_JOB_PROOF + job + public
key)``, sent in ``join`` and passed on in the member map. The proof is bound to the key, so a
copied proof is worthless to anyone without the matching private key (the rendezvous checks
the join signature first), and the secret itself never travels. The rendezvous applies the
policy when a peer joins; every peer applies its own copy to the members it is told about, so a
misconfigured or hostile rendezvous cannot slip a stranger into the job.

Secrets come from files or environment variables, never from the command line (``ps`` shows
it); allowed peers from a file with one peer id per line (``#`` starts a comment).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from overlay.identity import DOMAIN_JOB_PROOF, peer_id_from_public_key

JOB_SECRET_ENV = "PEERLEARN_JOB_SECRET"
"""Environment variable a peer reads its job's join secret from (when no file is given)."""

PEER_ID_RE = re.compile(r"^[a-z2-7]{32}$")
"""A peer id: lowercase base32 of 20 bytes (see ``overlay.identity.peer_id_from_public_key``)."""

PROOF_SIZE = 32
MIN_SECRET_BYTES = 16


class Refusal(enum.StrEnum):
    """Why a peer is not admitted to a job."""

    NO_PROOF = "no_proof"  # the job needs a join secret and the peer gave no proof
    BAD_PROOF = "bad_proof"  # a proof that does not match the secret (wrong secret)
    NOT_LISTED = "not_listed"  # the peer id is not on the job's list


@dataclass(frozen=True)
class Member:
    """Another member of our job, as the rendezvous announced it (client side)."""

    peer_id: str
    public_key: bytes
    """Its Ed25519 key; ``peer_id`` is derived from it (checked on receipt)."""
    addrs: tuple[str, ...] = ()
    """ZeroMQ addresses the rendezvous dialed back (verified); empty: reach it over WebRTC."""
    meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """What the peer announced (``num``, ``samples``, ``fingerprint``, ...)."""
    joined_at: float | None = None
    """Wall-clock time (Unix seconds) of its first join, as the rendezvous saw it."""
    proof: bytes | None = field(default=None, repr=False)
    """Its join proof (closed jobs)."""

    @property
    def address(self) -> str | None:
        """The address to reach it over ZeroMQ, None when it has none."""
        return self.addrs[0] if self.addrs else None

    @classmethod
    def from_wire(cls, obj: Any) -> Member | None:
        """The member in a protocol member map, or None if it is not a valid one (the peer id
        must be the one its key gives)."""
        if not isinstance(obj, dict):
            return None
        peer_id, public_key, addrs = obj.get("peer_id"), obj.get("public_key"), obj.get("addrs")
        if not isinstance(peer_id, str) or not isinstance(public_key, bytes):
            return None
        if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
            return None
        try:
            if peer_id_from_public_key(public_key) != peer_id:
                return None
        except ValueError:
            return None
        meta, joined_at, proof = obj.get("meta"), obj.get("joined_at"), obj.get("proof")
        return cls(
            peer_id=peer_id,
            public_key=public_key,
            addrs=tuple(addrs),
            meta=MappingProxyType(dict(meta) if isinstance(meta, dict) else {}),
            joined_at=float(joined_at) if isinstance(joined_at, int | float)
            and not isinstance(joined_at, bool) else None,
            proof=proof if isinstance(proof, bytes) else None,
        )


def job_proof(secret: bytes, job: str, public_key: bytes) -> bytes:
    """The proof that the holder of ``public_key`` knows the join secret of ``job``."""
    return hmac.new(secret, DOMAIN_JOB_PROOF + job.encode() + public_key, hashlib.sha256).digest()


@dataclass(frozen=True)
class JobPolicy:
    """Who may join one job. Both None: anybody (an open job)."""

    secret: bytes | None = field(default=None, repr=False)
    """The join secret; members must prove they know it. Never logged nor served."""

    allowed_peers: frozenset[str] | None = None
    """Peer ids allowed in the job; None: any peer (that knows the secret, if there is one)."""

    def __post_init__(self) -> None:
        if self.secret is not None and len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a join secret needs at least {MIN_SECRET_BYTES} bytes, "
                             f"got {len(self.secret)}")
        if self.allowed_peers is not None:
            for peer_id in self.allowed_peers:
                if not PEER_ID_RE.match(peer_id):
                    raise ValueError(f"{peer_id[:80]!r} is not a peer id")

    @property
    def is_open(self) -> bool:
        return self.secret is None and self.allowed_peers is None

    def proof(self, job: str, public_key: bytes) -> bytes | None:
        """Our proof for ``join`` (None without a secret)."""
        return None if self.secret is None else job_proof(self.secret, job, public_key)

    def check(self, job: str, public_key: bytes, proof: bytes | None) -> Refusal | None:
        """None if the holder of ``public_key`` may be a member of ``job``, else why not."""
        if self.allowed_peers is not None:
            try:
                peer_id = peer_id_from_public_key(public_key)
            except ValueError:
                return Refusal.NOT_LISTED
            if peer_id not in self.allowed_peers:
                return Refusal.NOT_LISTED
        if self.secret is not None:
            if proof is None:
                return Refusal.NO_PROOF
            if not hmac.compare_digest(proof, job_proof(self.secret, job, public_key)):
                return Refusal.BAD_PROOF
        return None


def refusal_message(refusal: Refusal, job: str, peer_id: str) -> str:
    """The words for a refusal, as the refused peer and the logs see them."""
    if refusal is Refusal.NO_PROOF:
        return f"job {job} needs a join secret"
    if refusal is Refusal.BAD_PROOF:
        return f"wrong join secret for job {job}"
    return f"peer {peer_id} is not on job {job}'s list"


def read_secret(path: str | os.PathLike[str]) -> bytes:
    """A join secret from a file (surrounding white space, such as the final newline, is not
    part of it)."""
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the join secret: {exc}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{path}: a join secret needs at least {MIN_SECRET_BYTES} bytes, "
                         f"got {len(secret)}")
    return secret


def secret_from_env(name: str) -> bytes:
    """A join secret from environment variable ``name``."""
    value = os.environ.get(name, "").strip()
    if not value:
        raise ValueError(f"environment variable {name} is not set (or empty)")
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"{name}: a join secret needs at least {MIN_SECRET_BYTES} bytes")
    return value.encode()


def parse_peer_ids(lines: Iterable[str], source: str = "<list>") -> frozenset[str]:
    """Peer ids, one per line; ``#`` starts a comment, blank lines are skipped. Upper case is
    accepted (ids are copied by hand) and lowered."""
    peers: set[str] = set()
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip().lower()
        if not text:
            continue
        if not PEER_ID_RE.match(text):
            raise ValueError(f"{source}:{number}: {text[:80]!r} is not a peer id "
                             "(32 characters a-z, 2-7; see `peerlearn identity`)")
        peers.add(text)
    return frozenset(peers)


def read_peer_list(path: str | os.PathLike[str]) -> frozenset[str]:
    """Allowed peer ids from a file (see ``parse_peer_ids``); an empty list is an error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the peer list: {exc}") from None
    peers = parse_peer_ids(text.splitlines(), str(path))
    if not peers:
        raise ValueError(f"{path}: no peer ids in the list")
    return peers


def split_assignment(value: str, what: str) -> tuple[str, str]:
    """``JOB=VALUE`` -> (job, value), for the rendezvous' per-job flags."""
    job, sep, rest = value.partition("=")
    if not sep or not job or not rest:
        raise ValueError(f"{what} {value!r}: expected JOB={what.split()[-1].upper()}")
    return job, rest


def policy_from_files(
    secret_file: str | None = None,
    secret_env: str | None = None,
    allow_peers_file: str | None = None,
) -> JobPolicy | None:
    """A policy from the usual sources; None when none is given."""
    if secret_file is not None and secret_env is not None:
        raise ValueError("give the join secret as a file or an environment variable, not both")
    secret = None
    if secret_file is not None:
        secret = read_secret(secret_file)
    elif secret_env is not None:
        secret = secret_from_env(secret_env)
    allowed = None if allow_peers_file is None else read_peer_list(allow_peers_file)
    if secret is None and allowed is None:
        return None
    return JobPolicy(secret=secret, allowed_peers=allowed)
