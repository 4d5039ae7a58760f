"""Sending a model in pieces and taking pieces in (overlay.pieces is the sans-I/O part).

:func:`send_pieces` delivers one model to one peer as ``piece`` requests, :data:`WINDOW` in
flight; once a piece was acknowledged, a failed piece is sent again when the link is back
(acknowledged ones never), and the delivery fails only after ``stall_timeout`` seconds
without an acknowledgement. :class:`PieceReceiver` answers each piece, and the piece that
completes a model with that model's own answer (what ``take_model`` made of it), remembered
for a sender that did not get it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from overlay.errors import TransportError, WireError
from overlay.models import EncodedModel
from overlay.pieces import WINDOW, PieceStore, piece_bytes_of, piece_plan
from overlay.transport.base import Frames
from overlay.wire import FrameType, Limits, decode_header, encode_control, pack_header

log = logging.getLogger(__name__)

Request = Callable[[str, Frames, str, float], Awaitable[tuple[dict[str, Any], list[memoryview]]]]
"""request(peer_id, frames, request_id, timeout): one request and its reply (the host's)."""
TakeModel = Callable[[dict[str, Any], list[memoryview], str], Awaitable[bytes]]
"""take_model(header, payloads, origin): check and accept a whole model; its digest."""

REMEMBERED = 64
"""Answers to completing pieces kept for senders that lost them."""


def check_ack(peer_id: str, header: dict[str, Any]) -> None:
    """TransportError unless ``header`` acknowledges."""
    if header["type"] != FrameType.ACK.value:
        raise TransportError(f"{peer_id} refused our model: {header.get('reason')}"
                             f" {header.get('message', '')}")


async def send_pieces(request: Request, peer_id: str, model: EncodedModel, piece_bytes: int, *,
                      job: str, sender: str, send_timeout: float,
                      stall_timeout: float) -> None:
    """Deliver ``model`` to ``peer_id`` in pieces of ``piece_bytes``; raises TransportError."""
    frames = [memoryview(pack_header(model.header)), *model.payloads]
    lengths = [f.nbytes for f in frames]
    todo = collections.deque(piece_plan(sum(lengths), piece_bytes))
    base = {"job": job, "sender": sender, "model": model.digest,
            "frames": lengths}
    progress = [time.monotonic(), 0]  # last acknowledged, bytes acknowledged
    finished = asyncio.Event()
    retries = 0

    async def worker() -> None:
        nonlocal retries
        while todo and not finished.is_set():
            offset, length = todo.popleft()
            request_id = secrets.token_hex(8)
            head = encode_control(FrameType.PIECE, request_id=request_id, offset=offset,
                                  **base)
            try:
                header, _ = await request(
                    peer_id, [head, piece_bytes_of(frames, offset, length)], request_id,
                    send_timeout)
            except TransportError as exc:
                if not progress[1]:  # nothing acknowledged yet: nothing to resume
                    raise
                todo.appendleft((offset, length))  # again, once the link is back
                retries += 1
                log.info("piece at %d to %s failed (%s); sending it again", offset,
                         peer_id, exc)
                await asyncio.sleep(min(0.2 * retries, 2.0))
                continue
            check_ack(peer_id, header)
            progress[0] = time.monotonic()
            progress[1] += length
            if "digest" in header:
                finished.set()

    workers = [asyncio.create_task(worker(), name=f"piece-{peer_id[:8]}")
               for _ in range(WINDOW)]
    done_waiter = asyncio.create_task(finished.wait())
    try:
        while not finished.is_set():
            alive = [w for w in workers if not w.done()]
            for w in workers:
                if w.done() and not w.cancelled() and w.exception() is not None:
                    raise w.exception()  # type: ignore[misc]
            if not alive:
                raise TransportError(f"{peer_id}: every piece was sent but the model "
                                     "was not confirmed")
            wait = progress[0] + stall_timeout - time.monotonic()
            if wait <= 0:
                raise TransportError(
                    f"{peer_id}: delivery stalled, no piece acknowledged for "
                    f"{stall_timeout:.0f} s ({progress[1]}/{sum(lengths)} "
                    "bytes)")
            await asyncio.wait([*alive, done_waiter], timeout=min(wait, 1.0),
                               return_when=asyncio.FIRST_COMPLETED)
    finally:
        tasks: list[asyncio.Task[Any]] = [*workers, done_waiter]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*workers, done_waiter, return_exceptions=True)
    if retries:
        log.info("delivered to %s after %d piece retries (resumed, not restarted)",
                 peer_id, retries)


class PieceReceiver:
    """Takes pieces into ``store``; the piece that completes a model is answered as a
    ``model`` request would be."""

    def __init__(self, store: PieceStore, limits: Limits) -> None:
        self.store = store
        self.limits = limits
        self._completed: dict[tuple[str, bytes], bytes] = {}
        """The answer to the piece that completed a model, by (sender, digest): resent to a
        sender that did not get it (its link broke) instead of opening the model again."""

    async def take(self, header: dict[str, Any], payloads: list[memoryview], origin: str,
                   take_model: TakeModel) -> bytes:
        """One piece of a model (overlay.pieces): ``ack {have}``, or the model's own answer
        once the piece completed it."""
        request_id = header.get("request_id")
        if len(payloads) != 1:
            raise WireError("bad_piece", f"a piece carries one payload, not {len(payloads)}")
        digest = header.get("model")
        done = self._completed.get((origin, digest)) if isinstance(digest, bytes) else None
        if done is not None:
            return done
        partial = self.store.add(origin, header, payloads[0])
        if not partial.complete:
            return encode_control(FrameType.ACK, request_id=request_id, have=partial.have)
        frames = partial.frames()
        model_header = decode_header(frames[0], self.limits)
        if model_header.get("type") != FrameType.MODEL.value:
            raise WireError("bad_piece", "the pieces do not make a model")
        if model_header.get("digest") != partial.digest:
            raise WireError("bad_piece", "the model's digest is not the one its pieces named")
        try:
            digest = await take_model(model_header, frames[1:], origin)
        except WireError as exc:
            answer = encode_control(FrameType.NACK, request_id=request_id, reason=exc.reason,
                                    message=str(exc)[:200])
            self._remember_answer(origin, partial.digest, answer)
            raise
        answer = encode_control(FrameType.ACK, request_id=request_id, digest=digest,
                                have=partial.total)
        self._remember_answer(origin, partial.digest, answer)
        return answer

    def _remember_answer(self, origin: str, digest: bytes, answer: bytes) -> None:
        self._completed[(origin, digest)] = answer
        while len(self._completed) > REMEMBERED:
            del self._completed[next(iter(self._completed))]
