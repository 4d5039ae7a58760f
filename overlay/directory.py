"""The transports' directory (:class:`overlay.transport.base.Directory`) over a member view.

A member's verified address, its Ed25519 key, and the member a CURVE key belongs to: a
forward map, filled when a member joins (:meth:`MemberDirectory.remember`) and emptied when it
leaves (:meth:`MemberDirectory.forget`), kept for the members we know, so no key conversion
ever runs backwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from overlay.identity import curve_public_key_from_ed25519
from overlay.membership import Member


class MemberDirectory:
    """Addresses and keys of the members ``members()`` returns (the host's admitted ones)."""

    def __init__(self, members: Callable[[], Mapping[str, Member]]) -> None:
        self._members = members
        self._peer_of_curve: dict[bytes, str] = {}
        self._curve_of: dict[str, bytes] = {}

    def address_of(self, peer_id: str) -> str | None:
        member = self._members().get(peer_id)
        return member.address if member is not None else None

    def public_key_of(self, peer_id: str) -> bytes | None:
        member = self._members().get(peer_id)
        return member.public_key if member is not None else None

    def peer_of_curve_key(self, curve_public_key: bytes) -> str | None:
        """The member whose identity gives this CURVE key, or None. On a miss, members whose
        ``joined`` is still on its way (or who came in the welcome) are converted first."""
        members = self._members()
        peer_id = self._peer_of_curve.get(curve_public_key)
        if peer_id is None:
            for pid, known in list(members.items()):
                if pid not in self._curve_of:
                    self.remember(known)
            peer_id = self._peer_of_curve.get(curve_public_key)
        member = members.get(peer_id) if peer_id is not None else None
        if member is None or self._curve_of.get(member.peer_id) != curve_public_key:
            return None
        return member.peer_id

    def remember(self, member: Member) -> None:
        try:
            curve = curve_public_key_from_ed25519(member.public_key)
        except ValueError:  # the rendezvous checked the key; libsodium refuses it anyway
            return
        old = self._curve_of.get(member.peer_id)
        if old is not None and old != curve:
            self._peer_of_curve.pop(old, None)
        self._curve_of[member.peer_id] = curve
        self._peer_of_curve[curve] = member.peer_id

    def forget(self, peer_id: str) -> None:
        curve = self._curve_of.pop(peer_id, None)
        if curve is not None:
            self._peer_of_curve.pop(curve, None)
