"""Membership events as data: what the host tells the learner about the other peers."""

from __future__ import annotations

from dataclasses import dataclass

from overlay.membership import Member
from overlay.transport.base import LinkKind


@dataclass(frozen=True)
class Joined:
    """A member of our job joined (or came back)."""

    member: Member

    @property
    def peer_id(self) -> str:
        return self.member.peer_id


@dataclass(frozen=True)
class Left:
    """A member left: ``reason`` is the rendezvous' (``leave``, ``expired``, ``replaced``) or
    ``lost`` (gone from the welcome after we reconnected)."""

    peer_id: str
    reason: str


@dataclass(frozen=True)
class LinkUp:
    """A link to ``peer_id`` was set up (its first ``ping`` answered after ``connect_s``)."""

    peer_id: str
    kind: LinkKind
    connect_s: float


MemberEvent = Joined | Left | LinkUp
