"""A training peer: the main loop that ties the learner to the overlay.

Each epoch: train locally -> test ("before averaging") -> send the model to every reachable
member -> wait (bounded) for the members' models of this epoch -> merge, weighted by training
samples -> test ("after averaging") -> report to the rendezvous. A newcomer first fetches the
current models of up to ``bootstrap_peers`` members and starts from their weighted average.

Torch work runs in a worker thread; the event loop keeps receiving meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch.utils.data import DataLoader

from learner.averaging import fingerprint, weighted_average
from learner.convert import ModelMismatch, arrays_to_state, state_to_arrays
from learner.data import load_dataset, shard
from learner.model import build_model
from learner.train import (
    evaluate,
    make_optimizer,
    make_scheduler,
    pick_device,
    train_epoch,
)
from overlay.errors import TransportError, WireError
from overlay.host import Host, HostConfig
from overlay.identity import Identity
from overlay.wire import Limits, ModelMessage

log = logging.getLogger(__name__)


@dataclass
class PeerConfig:
    """Everything a peer needs; the CLI only fills this in."""

    num: int
    """This peer's shard index, 0 <= num < total."""
    total: int
    """Number of equal shards the training set is split into."""
    rendezvous: str
    """Rendezvous address, HOST:PORT."""
    listen: str | None = None
    """ZeroMQ listen address HOST:PORT (port 0 picks one); None: not reachable over ZeroMQ."""
    advertise: str | None = None
    """Address to announce instead of the bound one (port forwarding)."""
    job: str = "mnist"
    """Swarm name; all peers of a job train the same model."""
    dataset: str = "digits"
    """digits (offline, 10,000 real MNIST digits), mnist (full, downloads), fashion-mnist."""
    data_dir: str | None = None
    """Where to look for the data set's files before downloading."""
    epochs: int = 3
    """Local epochs to train."""
    batch_size: int = 64
    test_batch_size: int = 1000
    lr: float = 1.0
    """Adadelta learning rate."""
    gamma: float = 0.7
    """StepLR decay per epoch."""
    seed: int | None = None
    """Initial weights; None derives it from the job name so all peers start alike."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda, cuda:N."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    key_file: str | None = None
    """Identity key (created on first run); default ~/.local/share/peerlearn/peer-NUM.pem."""
    merge_wait: float = 60.0
    """How long to wait for the other members' models of an epoch before merging what came.
    Models arriving later are merged at the next epoch."""
    bootstrap_peers: int = 3
    """A newcomer averages the current models of up to this many members."""
    linger: float = 2.0
    """Seconds to keep serving after the last epoch (late fetches, final deliveries)."""
    events_file: str | None = None
    """Append one JSON object per event (start, epoch, done) to this file."""
    progress: bool = True
    """Show a progress bar while training."""
    limits: Limits = field(default_factory=Limits)


class EventLog:
    """JSON lines for programs (demo, tests, benchmarks); logging is for people."""

    def __init__(self, path: str | None, num: int) -> None:
        self._num = num
        self._file: TextIO | None = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115

    def emit(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"t": time.time(), "num": self._num, "event": event, **fields}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def job_seed(job: str) -> int:
    """Initial-weights seed shared by all peers of a job."""
    return int.from_bytes(hashlib.sha256(job.encode()).digest()[:4], "big")


def _tcp(address: str | None) -> str | None:
    if address is None or address.startswith("tcp://"):
        return address
    return f"tcp://{address}"


class _Bar:
    """A one-line progress bar on stderr (only when it is a terminal, or forced)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self._last = 0.0

    def __call__(self, index: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.2 and index + 1 < total):
            return
        self._last = now
        done = int(30 * (index + 1) / total)
        sys.stderr.write(f"\r{self.label} [{'#' * done}{'.' * (30 - done)}] "
                         f"{index + 1}/{total} loss {loss:.3f}")
        if index + 1 == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


class Peer:
    """One peer's state; ``run()`` is the whole life of the peer."""

    def __init__(self, config: PeerConfig) -> None:
        if not 0 <= config.num < config.total:
            raise ValueError(f"--num must be in 0..{config.total - 1}, got {config.num}")
        self.config = config
        self.events = EventLog(config.events_file, config.num)
        self.device = pick_device(config.device)
        self.model = build_model(config.seed if config.seed is not None else job_seed(config.job))
        self.model.to(self.device)
        self.reference = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        self.fingerprint = fingerprint(self.reference)
        self.optimizer = make_optimizer(self.model, config.lr)
        self.scheduler = make_scheduler(self.optimizer, config.gamma)
        self.epoch = 0
        self.samples = 0
        self.pending: dict[str, ModelMessage] = {}  # newest unmerged model per sender
        self.bytes_sent = 0
        self.models_received = 0
        self.host: Host | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._mismatched: set[str] = set()

    # ---- checks on what arrives ------------------------------------------------------------

    def validate(self, msg: ModelMessage) -> None:
        """Runs in the receive path (worker thread): refuse models that cannot be merged."""
        try:
            state = arrays_to_state(msg.arrays, self.reference, share_readonly=True)
        except ModelMismatch as exc:
            raise WireError("model_mismatch", str(exc)) from exc
        for name, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise WireError("non_finite", f"{name} holds NaN or Inf")
        if msg.samples <= 0:
            raise WireError("no_samples", "a model trained on 0 samples carries no weight")
        msg.extra["state"] = state

    def _member_event(self, kind: str, peer_id: str, detail: Any) -> None:
        if kind == "joined":
            self.events.emit("joined", peer_id=peer_id,
                             peer_num=detail.get("meta", {}).get("num"))
        elif kind == "link":
            self.events.emit("link", peer_id=peer_id, kind=detail["kind"],
                             connect_s=detail["connect_s"])
        else:
            self.events.emit("left", peer_id=peer_id, reason=detail)

    def _partners(self) -> list[str]:
        """Members that train the same architecture as we do (ZeroMQ or WebRTC reaches them)."""
        assert self.host is not None
        partners = []
        for pid, member in self.host.members.items():
            if member.get("meta", {}).get("fingerprint") != self.fingerprint[:16]:
                if pid not in self._mismatched:
                    self._mismatched.add(pid)
                    log.warning("ignoring %s: it trains a different model architecture", pid)
                continue
            partners.append(pid)
        return partners

    # ---- the loop ------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        train_set, test_set = await asyncio.to_thread(load_dataset, cfg.dataset, cfg.data_dir)
        train_shard = shard(train_set, cfg.num, cfg.total)
        self.samples = len(train_shard)
        generator = torch.Generator().manual_seed(job_seed(cfg.job) + cfg.num)
        train_loader = DataLoader(train_shard, batch_size=cfg.batch_size, shuffle=True,
                                  generator=generator)
        test_loader = DataLoader(test_set, batch_size=cfg.test_batch_size)
        key_file = cfg.key_file or os.path.join(
            os.path.expanduser("~/.local/share/peerlearn"), f"peer-{cfg.num}.pem"
        )
        identity = Identity.load_or_create(key_file)
        meta = {"num": cfg.num, "samples": self.samples, "fingerprint": self.fingerprint[:16],
                "dataset": cfg.dataset}
        host = self.host = Host(
            identity,
            HostConfig(rendezvous=cfg.rendezvous, job=cfg.job, listen=_tcp(cfg.listen),
                       advertise=_tcp(cfg.advertise), limits=cfg.limits),
            meta,
            validator=self.validate,
            on_member_event=self._member_event,
        )
        await host.start()
        log.info("peer %d is %s; %d training samples; %d members in job %r", cfg.num,
                 identity.peer_id, self.samples, len(host.members), cfg.job)
        try:
            await self._bootstrap(test_loader)
            history = []
            for _ in range(cfg.epochs):
                history.append(await self._epoch(train_loader, test_loader))
            await self._finish()
        finally:
            await self._cancel_sends()
            await host.close()
            self.events.close()
        summary = {"peer_id": identity.peer_id, "epochs": history, "bytes_sent": self.bytes_sent,
                   "models_received": self.models_received}
        return summary

    async def _bootstrap(self, test_loader: DataLoader) -> None:
        assert self.host is not None
        donors = self._partners()[: self.config.bootstrap_peers]
        used: list[str] = []
        if donors:
            results = await asyncio.gather(*(self.host.fetch_model(p) for p in donors),
                                           return_exceptions=True)
            got = []
            for pid, result in zip(donors, results, strict=True):
                if isinstance(result, BaseException):
                    log.info("bootstrap: no model from %s (%s)", pid, result)
                    continue
                got.append(result)
                used.append(pid)
            if got:
                state = await asyncio.to_thread(
                    weighted_average, [(m.extra["state"], m.samples) for m in got])
                self.model.load_state_dict(state)
                self.epoch = max(m.epoch for m in got)
                log.info("bootstrapped from %d peers at epoch %d", len(got), self.epoch)
        initial = await asyncio.to_thread(evaluate, self.model, test_loader, self.device)
        log.info("start: accuracy %.2f%% (%s)", initial["accuracy"],
                 f"average of {len(used)} peers" if used else "fresh model")
        self.events.emit("start", peer_id=self.host.peer_id, accuracy=initial["accuracy"],
                         bootstrapped_from=used, epoch=self.epoch, samples=self.samples)

    async def _epoch(self, train_loader: DataLoader, test_loader: DataLoader) -> dict[str, Any]:
        assert self.host is not None
        cfg = self.config
        self.epoch += 1
        epoch = self.epoch
        bar = _Bar(f"peer {cfg.num} epoch {epoch}", cfg.progress)
        started = time.monotonic()
        stats = await asyncio.to_thread(train_epoch, self.model, train_loader, self.optimizer,
                                        self.device, bar)
        self.scheduler.step()
        train_s = time.monotonic() - started
        before = await asyncio.to_thread(evaluate, self.model, test_loader, self.device)
        log.info("epoch %d: trained in %.1f s (loss %.4f); test before averaging: %.2f%%",
                 epoch, train_s, stats["loss"], before["accuracy"])

        await self._cancel_sends()  # the previous round had its chance
        snapshot = state_to_arrays(self.model.state_dict(), copy=True)
        msg = ModelMessage(job=cfg.job, sender=self.host.peer_id, epoch=epoch,
                           samples=self.samples, arrays=snapshot)
        frames, request_id = await asyncio.to_thread(self.host.encode, msg)
        targets = self._partners()
        size = sum(len(f) for f in frames)
        for pid in targets:
            task = asyncio.create_task(self._send(pid, frames, request_id, size))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        log.info("epoch %d: sending to %d peers (%.1f MB each)", epoch, len(targets), size / 1e6)

        received = await self._collect(epoch)
        merged_from = sorted(received)
        if received:
            inputs = [(self.model.state_dict(), float(self.samples))]
            inputs += [(m.extra["state"], float(m.samples)) for m in received.values()]
            state = await asyncio.to_thread(weighted_average, inputs)
            self.model.load_state_dict(state)
        after = await asyncio.to_thread(evaluate, self.model, test_loader, self.device)
        weights = {pid: m.samples for pid, m in received.items()}
        log.info("epoch %d: merged %d models %s; test after averaging: %.2f%%", epoch,
                 len(received), weights or "", after["accuracy"])
        self.host.publish(ModelMessage(job=cfg.job, sender=self.host.peer_id, epoch=epoch,
                                       samples=self.samples,
                                       arrays=state_to_arrays(self.model.state_dict(), copy=True)))
        record = {"epoch": epoch, "train_loss": stats["loss"], "train_s": round(train_s, 3),
                  "acc_before": before["accuracy"], "acc_after": after["accuracy"],
                  "merged_from": merged_from,
                  "merged_epochs": {pid: m.epoch for pid, m in received.items()},
                  "bytes_sent": self.bytes_sent, "models_received": self.models_received}
        self.events.emit("epoch", **record)
        await self.host.report(epoch, {"acc_before": before["accuracy"],
                                       "acc_after": after["accuracy"],
                                       "merged": len(received), "bytes_sent": self.bytes_sent})
        return record

    async def _send(self, peer_id: str, frames: Any, request_id: str, size: int) -> None:
        assert self.host is not None
        try:
            await self.host.send_model(peer_id, frames, request_id)
            self.bytes_sent += size
        except TransportError as exc:
            log.warning("could not deliver our model to %s: %s", peer_id, exc)

    async def _cancel_sends(self) -> None:
        for task in list(self._sends):
            task.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)
        self._sends.clear()

    def _drain(self) -> None:
        assert self.host is not None
        while not self.host.inbox.empty():
            msg = self.host.inbox.get_nowait()
            self.models_received += 1
            old = self.pending.get(msg.sender)
            if old is None or msg.epoch >= old.epoch:
                self.pending[msg.sender] = msg

    async def _collect(self, epoch: int) -> dict[str, ModelMessage]:
        """Wait until every reachable member's model of ``epoch`` is here, or merge_wait."""
        assert self.host is not None
        host = self.host
        deadline = time.monotonic() + self.config.merge_wait
        while True:
            host.changed.clear()
            self._drain()
            waiting = [pid for pid in self._partners()
                       if pid not in self.pending or self.pending[pid].epoch < epoch]
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

    async def _finish(self) -> None:
        """Give outstanding deliveries and late fetches a moment, then leave."""
        if self._sends:
            await asyncio.wait(set(self._sends), timeout=max(self.config.linger, 5.0))
        await asyncio.sleep(self.config.linger)
        self.events.emit("done", epoch=self.epoch, bytes_sent=self.bytes_sent,
                         models_received=self.models_received)


async def run_peer(config: PeerConfig) -> dict[str, Any]:
    """Run one peer to the end; returns its summary."""
    return await Peer(config).run()


__all__ = ["Peer", "PeerConfig", "run_peer"]
