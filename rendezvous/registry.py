"""The peer registry: jobs -> members, with soft-state expiry (pure data, no sockets).

Every change goes through one of the public methods below, which return the ``Event`` list the
server must push to the other members of the job. Time comes in as an argument (monotonic
seconds), so tests drive expiry without sleeping.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from overlay.errors import ProtocolError
from overlay.identity import peer_id_from_public_key
from overlay.protocol import MAX_MEMBER_BYTES, MAX_MEMBERS, ErrorCode, pack

EventKind = Literal["joined", "left"]


@dataclass
class Member:
    """One registration: a peer (by key) in a job, with its verified addresses."""

    peer_id: str
    public_key: bytes
    job: str
    addrs: list[str]
    meta: dict[str, Any]
    session: int
    """Id of the WebSocket session that owns the registration (a reconnect makes a new one)."""
    joined_at: float
    """Wall-clock time (Unix seconds) of the first join in this job."""
    last_seen: float
    """Monotonic time of the last message from the peer."""
    connected: bool = True
    history: deque[dict[str, Any]] = field(default_factory=deque)
    links: dict[str, dict[str, Any]] = field(default_factory=dict)
    """How this peer reaches the others: peer id -> {kind, connect_s} (its latest word)."""
    proof: bytes | None = field(default=None, repr=False)
    """The peer's join proof (closed jobs), passed on to the other members; never on HTTP."""

    def to_wire(self) -> dict[str, Any]:
        """The member map of the protocol: {peer_id, public_key, addrs, meta, joined_at,
        [proof]}."""
        wire = {
            "peer_id": self.peer_id,
            "public_key": self.public_key,
            "addrs": list(self.addrs),
            "meta": dict(self.meta),
            "joined_at": self.joined_at,
        }
        if self.proof is not None:
            wire["proof"] = self.proof
        return wire

    @functools.cached_property
    def packed(self) -> bytes:
        """``to_wire()`` packed once (the fields it shows never change after the join): every
        ``joined`` and ``welcome`` carries these bytes instead of packing the member again."""
        return pack(self.to_wire())

    @property
    def latest_report(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None


@dataclass(frozen=True)
class Event:
    """Something the other members of ``job`` must be told."""

    kind: EventKind
    job: str
    peer_id: str
    member: Member | None = None  # for "joined"
    reason: str | None = None  # for "left": leave | expired | replaced


class Registry:
    """Members per job; a registration lives until ``leave`` or ``ttl`` seconds of silence."""

    def __init__(
        self, ttl: float, history_len: int = 100, max_members: int = MAX_MEMBERS
    ) -> None:
        self.ttl = ttl
        self.history_len = history_len
        self.max_members = max_members
        """Most members per job (a welcome must fit ``MAX_WELCOME_BYTES``); more joins fail."""
        self._members: dict[str, Member] = {}  # peer_id -> member (one job per peer key)
        self._jobs: dict[str, dict[str, Member]] = {}  # job -> peer_id -> member

    # -- queries ---------------------------------------------------------------------------

    def get(self, peer_id: str) -> Member | None:
        return self._members.get(peer_id)

    def members(self, job: str, *, exclude: str | None = None) -> list[Member]:
        return [m for pid, m in self._jobs.get(job, {}).items() if pid != exclude]

    def jobs(self) -> dict[str, int]:
        """Job name -> number of members."""
        return {job: len(members) for job, members in sorted(self._jobs.items())}

    def __len__(self) -> int:
        return len(self._members)

    # -- changes ---------------------------------------------------------------------------

    def check_room(self, public_key: bytes, job: str) -> str:
        """The peer id of ``public_key``; raises ProtocolError ``job_full`` when joining
        ``job`` would take it beyond ``max_members`` (a member re-joining takes no room)."""
        peer_id = peer_id_from_public_key(public_key)
        old = self._members.get(peer_id)
        if (old is None or old.job != job) and len(self._jobs.get(job, ())) >= self.max_members:
            raise ProtocolError(
                ErrorCode.JOB_FULL, f"job {job} already has {self.max_members} members"
            )
        return peer_id

    def join(
        self,
        *,
        public_key: bytes,
        job: str,
        addrs: list[str],
        meta: dict[str, Any],
        session: int,
        now: float,
        wall_time: float | None = None,
        proof: bytes | None = None,
    ) -> tuple[Member, list[Event]]:
        """Register (or re-register) a peer; a re-join replaces the old session's entry.

        Others hear ``joined`` for a new peer; for a re-join they hear ``left(replaced)`` +
        ``joined`` only if the job or the addresses changed, otherwise nothing.
        Raises ProtocolError ``job_full`` when the job has ``max_members`` others already, and
        ``too_large`` when the member map would exceed ``MAX_MEMBER_BYTES``.
        """
        peer_id = self.check_room(public_key, job)
        old = self._members.get(peer_id)
        same_job = old is not None and old.job == job
        member = Member(
            peer_id=peer_id,
            public_key=public_key,
            job=job,
            addrs=list(addrs),
            meta=dict(meta),
            session=session,
            joined_at=old.joined_at if old is not None and same_job else (
                time.time() if wall_time is None else wall_time
            ),
            last_seen=now,
            history=old.history if old is not None and same_job else deque(maxlen=self.history_len),
            proof=proof,
        )
        size = len(member.packed)
        if size > MAX_MEMBER_BYTES:
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"member record of {size} bytes > {MAX_MEMBER_BYTES}: fewer addrs or less meta",
            )
        events: list[Event] = []
        if old is not None:
            self._remove(old)
            if not same_job or old.addrs != member.addrs or old.proof != member.proof:
                events.append(Event("left", old.job, peer_id, reason="replaced"))
        self._members[peer_id] = member
        self._jobs.setdefault(job, {})[peer_id] = member
        if old is None or events:
            events.append(Event("joined", job, peer_id, member=member))
        return member, events

    def touch(self, peer_id: str, session: int, now: float) -> bool:
        """Record activity of ``session``; False if it no longer owns the registration."""
        member = self._owned(peer_id, session)
        if member is None:
            return False
        member.last_seen = now
        return True

    def report(
        self, peer_id: str, session: int, epoch: int, metrics: dict[str, Any], now: float,
        wall_time: float | None = None,
    ) -> bool:
        """Store a progress report (latest plus a bounded history); also counts as activity."""
        member = self._owned(peer_id, session)
        if member is None:
            return False
        member.last_seen = now
        member.history.append({
            "epoch": epoch,
            "time": time.time() if wall_time is None else wall_time,
            "metrics": dict(metrics),
        })
        return True

    def update_links(
        self, peer_id: str, session: int, links: dict[str, dict[str, Any]], now: float
    ) -> bool:
        """Replace the peer's view of its links; also counts as activity."""
        member = self._owned(peer_id, session)
        if member is None:
            return False
        member.last_seen = now
        member.links = dict(links)
        return True

    def leave(self, peer_id: str, session: int) -> list[Event]:
        member = self._owned(peer_id, session)
        if member is None:
            return []
        self._remove(member)
        return [Event("left", member.job, peer_id, reason="leave")]

    def disconnect(self, peer_id: str, session: int) -> None:
        """The session's socket dropped: the registration stays until it expires."""
        member = self._owned(peer_id, session)
        if member is not None:
            member.connected = False

    def expire(self, now: float) -> list[Event]:
        """Remove every registration silent for more than ``ttl`` seconds."""
        expired = [m for m in self._members.values() if now - m.last_seen > self.ttl]
        for member in expired:
            self._remove(member)
        return [Event("left", m.job, m.peer_id, reason="expired") for m in expired]

    # -- internals -------------------------------------------------------------------------

    def _owned(self, peer_id: str, session: int) -> Member | None:
        member = self._members.get(peer_id)
        return member if member is not None and member.session == session else None

    def _remove(self, member: Member) -> None:
        self._members.pop(member.peer_id, None)
        job = self._jobs.get(member.job)
        if job is not None:
            job.pop(member.peer_id, None)
            if not job:
                del self._jobs[member.job]
