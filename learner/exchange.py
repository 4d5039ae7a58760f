"""Sending our model to the neighbours and collecting theirs, one epoch at a time.

What the overlay hands over is a :class:`overlay.models.ReceivedModel` (digest and signature
checked, arrays validated); :func:`accept_model` runs in the host's worker thread for every one
of them and turns it into an :class:`Incoming`, the model plus its torch state, or refuses it
(:class:`overlay.errors.WireError`: counted, nacked and logged by the host). Torch state stays
here, in the learner's own objects.

:class:`Exchange` keeps the newest unmerged model per sender, sends an encoded model to
neighbours (one task per neighbour, cancelled when the next round starts) and waits, bounded,
for the neighbours' models of an epoch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

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


class Exchange:
    """Our side of one job's model traffic through ``host``."""

    def __init__(self, host: Host[Incoming], merge_wait: float) -> None:
        self.host = host
        self.merge_wait = merge_wait
        self.pending: dict[str, Incoming] = {}
        """The newest unmerged model per sender."""
        self.merged_epoch: dict[str, int] = {}
        """The epoch of the last model merged, per sender."""
        self.bytes_sent = 0
        self.models_received = 0
        self._sends: set[asyncio.Task[None]] = set()

    def send(self, model: EncodedModel, peers: Sequence[str]) -> None:
        """Start delivering ``model`` to each of ``peers`` (until acked, or the next round)."""
        for pid in peers:
            task = asyncio.create_task(self._send(pid, model))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    async def _send(self, peer_id: str, model: EncodedModel) -> None:
        try:
            await self.host.send_model(peer_id, model)
            self.bytes_sent += model.nbytes
        except TransportError as exc:
            log.warning("could not deliver our model to %s: %s", peer_id, exc)

    async def cancel_sends(self) -> None:
        """Stop the deliveries still running (the previous round had its chance)."""
        for task in list(self._sends):
            task.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)
        self._sends.clear()

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
        """Wait until the expected neighbours' models of ``epoch`` are here, or merge_wait.
        Whatever else arrived meanwhile is merged too."""
        host = self.host
        deadline = time.monotonic() + self.merge_wait
        while True:
            host.changed.clear()
            self._drain()
            members = set(host.members)
            # a neighbour is done for this epoch once we hold (or already merged) a model of
            # it that is at least this fresh; a fast one's newer model may have come early
            waiting = [pid for pid in expect_from if pid in members
                       and max(self.pending[pid].epoch if pid in self.pending else -1,
                               self.merged_epoch.get(pid, -1)) < epoch]
            remaining = deadline - time.monotonic()
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
