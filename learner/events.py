"""The event log: JSON lines for programs (the demo, the tests, the benchmarks).

Logging is for people; these records are for programs. One object per line with ``t``,
``num`` and ``event`` (``start``, ``joined``, ``left``, ``link``, ``sending``, ``epoch``,
``done``) and the event's fields; each line is flushed as it is written.
"""

from __future__ import annotations

import json
import time
from typing import Any, TextIO

from overlay.events import Joined, Left, LinkUp, MemberEvent

__all__ = ["EventLog"]


class EventLog:
    """Appends events to ``path`` (None: writes nothing)."""

    def __init__(self, path: str | None, num: int) -> None:
        self._num = num
        self._file: TextIO | None = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115

    def emit(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"t": time.time(), "num": self._num, "event": event, **fields}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def member(self, event: MemberEvent) -> None:
        """A membership event of the host: ``joined``, ``left`` or ``link``."""
        if isinstance(event, Joined):
            self.emit("joined", peer_id=event.peer_id, peer_num=event.member.meta.get("num"))
        elif isinstance(event, LinkUp):
            self.emit("link", peer_id=event.peer_id, kind=str(event.kind),
                      connect_s=event.connect_s)
        elif isinstance(event, Left):
            self.emit("left", peer_id=event.peer_id, reason=event.reason)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
