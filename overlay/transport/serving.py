"""What every transport does the same way: serving one request, limits, owned tasks.

- :func:`serve_request` decodes a request's header within the limits, answers the
  rendezvous' dial-back ``probe`` (ZeroMQ only), calls the handler with the origin, and turns
  a :class:`~overlay.errors.WireError` into a counted, logged refusal and its ``nack``.
- :func:`~overlay.transport.base.max_parts` / :func:`~overlay.transport.base.max_frame` are
  the part-count and size bounds both transports check before they keep anything.
- :class:`TaskSet` owns a transport's background tasks: ``close()`` cancels and awaits them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from overlay.dialback import answer_probe
from overlay.errors import WireError
from overlay.identity import Identity
from overlay.transport.base import Frames, Handler, TransportStats, max_frame, max_parts
from overlay.wire import FrameType, Limits, decode_header, nack_for

log = logging.getLogger(__name__)

INCOMPLETE = "incomplete"
"""Refusal code of a request abandoned midway: its link ended, or the transport closed."""


async def serve_request(
    head: bytes | memoryview,
    payloads: list[memoryview],
    origin: str | None,
    *,
    handler: Handler,
    limits: Limits,
    stats: TransportStats,
    log_prefix: str = "",
    probe_identity: Identity | None = None,
) -> Frames | None:
    """The reply frames to one incoming request (None: no reply).

    A request refused with a WireError (by the header's checks or by the handler) is counted
    in ``stats.rejected`` under its reason, logged and answered with a ``nack`` carrying the
    request id when it can be recovered. With ``probe_identity`` a dial-back ``probe`` is
    answered as that identity. A request cancelled midway (the transport closes) is counted
    as ``incomplete``.
    """
    request_id: Any = None
    try:
        header = decode_header(head, limits)
        request_id = header.get("request_id")
        if probe_identity is not None and header["type"] == FrameType.PROBE.value:
            probe_reply = answer_probe(probe_identity, header)
            return [probe_reply] if probe_reply is not None else None
        return await handler(header, payloads, origin)
    except WireError as exc:
        stats.reject(exc.reason)
        log.warning("%srejected a message: %s", log_prefix, exc)
        return [nack_for(exc, request_id, head, limits)]
    except asyncio.CancelledError:
        stats.reject(INCOMPLETE)
        raise


class TaskSet:
    """The background tasks one transport owns.

    :meth:`spawn` starts a task that :meth:`close` cancels; :meth:`spawn_closer` one that
    :meth:`close` lets finish (closing a peer connection). A task that fails is logged.
    """

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closers: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks) + len(self._closers)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def spawn_closer(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._closers.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._closers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: task %s failed", self._owner, task.get_name(),
                      exc_info=task.exception())

    async def cancel_all(self) -> None:
        """Cancel the cancellable tasks and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel the cancellable tasks, then wait for every task (closers too) to end."""
        while self._tasks or self._closers:
            await self.cancel_all()
            await asyncio.gather(*list(self._closers), return_exceptions=True)


__all__ = ["INCOMPLETE", "TaskSet", "max_frame", "max_parts", "serve_request"]
