"""Sending our model to the neighbours and collecting theirs, one epoch at a time.

What the overlay hands over is a :class:`overlay.models.ReceivedModel` (digest and signature
checked, arrays validated); :func:`accept_model` runs in the host's worker thread for every one
of them and turns it into an :class:`Incoming`, the model plus its torch state, or refuses it
(:class:`overlay.errors.WireError`: counted, nacked and logged by the host). Torch state stays
here, in the learner's own objects.

:class:`Exchange` keeps the newest unmerged model per sender, sends an encoded model to
neighbours (one delivery per neighbour at a time: a delivery still running when the next
round starts is not cancelled, it finishes and the receiver merges it with its staleness
weight; the newest model waits behind it) and waits for the neighbours' models of an epoch,
``merge_wait`` seconds, longer while a neighbour's model is visibly arriving (pieces keep
coming), up to ``merge_wait_cap``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from learner.codec_choice import Throughput
from learner.convert import ModelMismatch, arrays_to_state
from overlay.errors import TransportError, WireError
from overlay.host import Host
from overlay.models import EncodedModel, ReceivedModel

__all__ = ["Exchange", "Incoming", "accept_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Incoming:
    """A received model the learner accepted: the overlay's model and its torch state (whose
    tensors share the received, read-only buffers: they are only averaged and loaded)."""

    model: ReceivedModel
    state: dict[str, torch.Tensor]

    @property
    def sender(self) -> str:
        return self.model.sender

    @property
    def epoch(self) -> int:
        return self.model.epoch

    @property
    def samples(self) -> int:
        return self.model.samples

    @property
    def digest(self) -> bytes:
        return self.model.digest


def accept_model(model: ReceivedModel, reference: Mapping[str, torch.Tensor],
                 fingerprint: str) -> Incoming:
    """Refuse models that cannot be merged (another architecture, NaN/Inf, no samples);
    runs in a worker thread."""
    try:
        state = arrays_to_state(model.arrays, reference, share_readonly=True)
    except ModelMismatch as exc:
        raise WireError(
            "model_mismatch",
            f"{exc} (the sender trains another architecture; all peers of a job need the "
            f"same model: fingerprint {fingerprint[:16]} here)") from exc
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WireError("non_finite", f"{name} holds NaN or Inf")
    if model.samples <= 0:
        raise WireError("no_samples", "a model trained on 0 samples carries no weight")
    return Incoming(model, state)


PROGRESS_GRACE = 5.0
"""Seconds since a neighbour's last piece during which its model counts as arriving."""


def _arriving(host: Host[Incoming], peer_id: str, now: float) -> bool:
    last = host.receiving_from(peer_id)
    return last is not None and now - last < PROGRESS_GRACE


class Exchange:
    """Our side of one job's model traffic through ``host``."""

    def __init__(self, host: Host[Incoming], merge_wait: float,
                 merge_wait_cap: float | None = None) -> None:
        self.host = host
        self.merge_wait = merge_wait
        self.merge_wait_cap = merge_wait_cap if merge_wait_cap is not None else 4 * merge_wait
        self.pending: dict[str, Incoming] = {}
        """The newest unmerged model per sender."""
        self.merged_epoch: dict[str, int] = {}
        """The epoch of the last model merged, per sender."""
        self.bytes_sent = 0
        self.models_received = 0
        self.throughput = Throughput()
        """Bytes/s of our deliveries, per neighbour (``--codec auto`` reads it)."""
        self.late_sends = 0
        """Deliveries that were still running when a newer model was ready for that peer."""
        self._sends: set[asyncio.Task[None]] = set()
        self._sending: dict[str, asyncio.Task[None]] = {}
        self._next: dict[str, EncodedModel] = {}

    def send(self, model: EncodedModel, peers: Sequence[str]) -> None:
        """Deliver ``model`` to each of ``peers``; to a peer whose previous delivery is still
        running, right after it (only the newest waiting model is kept)."""
        for pid in peers:
            running = self._sending.get(pid)
            if running is not None and not running.done():
                if pid not in self._next:
                    self.late_sends += 1
                    log.info("the delivery to %s is still running; epoch %d follows it", pid,
                             model.epoch)
                self._next[pid] = model
                continue
            self._start(pid, model)

    def _start(self, peer_id: str, model: EncodedModel) -> None:
        task = asyncio.create_task(self._send(peer_id, model))
        self._sending[peer_id] = task
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, peer_id: str, model: EncodedModel) -> None:
        try:
            started = time.monotonic()
            await self.host.send_model(peer_id, model)
            self.throughput.record(peer_id, model.nbytes, time.monotonic() - started)
            self.bytes_sent += model.nbytes
        except TransportError as exc:
            log.warning("could not deliver our model to %s: %s", peer_id, exc)
        finally:
            following = self._next.pop(peer_id, None)
            if self._sending.get(peer_id) is asyncio.current_task():
                del self._sending[peer_id]
            if following is not None and peer_id in self.host.members:
                self._start(peer_id, following)

    async def cancel_sends(self) -> None:
        """Stop every delivery (shutting down)."""
        self._next.clear()
        for task in list(self._sends):
            task.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)
        self._sends.clear()
        self._sending.clear()

    async def finish_sends(self, timeout: float) -> None:
        """Give the deliveries still running up to ``timeout`` seconds."""
        if self._sends:
            await asyncio.wait(set(self._sends), timeout=timeout)

    def _drain(self) -> None:
        inbox = self.host.inbox
        while not inbox.empty():
            incoming = inbox.get_nowait()
            self.models_received += 1
            old = self.pending.get(incoming.sender)
            if old is None or incoming.epoch >= old.epoch:
                self.pending[incoming.sender] = incoming

    async def collect(self, epoch: int, expect_from: Sequence[str]) -> dict[str, Incoming]:
        """Wait until the expected neighbours' models of ``epoch`` are here, or merge_wait;
        past it, while one of them is still arriving (a piece within the last
        :data:`PROGRESS_GRACE` s), up to merge_wait_cap. Whatever else arrived meanwhile is
        merged too."""
        host = self.host
        started = time.monotonic()
        deadline = started + self.merge_wait
        cap = started + max(self.merge_wait, self.merge_wait_cap)
        while True:
            host.changed.clear()
            self._drain()
            members = set(host.members)
            # a neighbour is done for this epoch once we hold (or already merged) a model of
            # it that is at least this fresh; a fast one's newer model may have come early
            waiting = [pid for pid in expect_from if pid in members
                       and max(self.pending[pid].epoch if pid in self.pending else -1,
                               self.merged_epoch.get(pid, -1)) < epoch]
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0 and waiting and now < cap:
                arriving = [pid for pid in waiting if _arriving(host, pid, now)]
                if arriving:
                    remaining = min(1.0, cap - now)  # pieces do not set host.changed: poll
                    if now - deadline < 1.0:
                        log.info("epoch %d: still receiving from %s; waiting on", epoch,
                                 arriving)
            if not waiting or remaining <= 0:
                break
            try:
                await asyncio.wait_for(host.changed.wait(), remaining)
            except TimeoutError:
                pass
        if waiting:
            log.info("epoch %d: no model yet from %s; merging what arrived", epoch, waiting)
        received, self.pending = self.pending, {}
        return received

    def merged(self, received: Mapping[str, Incoming], senders: Sequence[str]) -> None:
        """Note which of ``received`` went into a merge."""
        self.merged_epoch.update({pid: received[pid].epoch for pid in senders})
