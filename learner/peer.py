"""A training peer: the main loop that ties the learner to the overlay.

Each epoch: train locally -> test ("before averaging") -> send the model to the neighbours
(everyone, or ``fanout`` of them) -> wait (bounded) for the neighbours' models of this epoch ->
merge, weighted by training samples and staleness, minus what the gate refuses -> test
("after averaging") -> save a checkpoint -> report to the rendezvous. A newcomer first fetches
the current models of up to ``bootstrap_peers`` members in parallel and starts from their
weighted average; a restarted peer continues from its checkpoint.

Torch work runs in a worker thread; the event loop keeps receiving meanwhile.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from learner import checkpoint
from learner.averaging import fingerprint, weighted_average
from learner.convert import ModelMismatch, arrays_to_state, state_to_arrays
from learner.data import load_dataset
from learner.merge import Candidate, MergePolicy, neighbours, plan_merge
from learner.model import build_model
from learner.partition import split_dataset
from learner.plugins import (
    PluginError,
    architecture_mismatch,
    build_from_factory,
    check_model_accepts,
    load_data_hook,
    load_model_factory,
)
from learner.robust import Robust, RobustRule, aggregate, coordinate_median
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
from overlay.membership import JobPolicy, policy_from_files
from overlay.wire import CODECS, Limits, ModelMessage

log = logging.getLogger(__name__)

DATA_HOME = os.path.expanduser("~/.local/share/peerlearn")


@dataclass
class PeerConfig:
    """Everything a peer needs; the CLI only fills this in (and so can a Python script)."""

    num: int
    """This peer's part of the data, 0 <= num < total."""
    total: int
    """Number of parts the training set is split into."""
    rendezvous: str
    """Rendezvous address, HOST:PORT."""
    listen: str | None = None
    """ZeroMQ listen address HOST:PORT (port 0 picks one); None: reached over WebRTC only."""
    advertise: str | None = None
    """Address to announce instead of the bound one (port forwarding)."""
    job: str = "mnist"
    """Swarm name; all peers of a job train the same model."""
    dataset: str = "digits"
    """digits (offline, 10,000 real MNIST digits), mnist (full, downloads), fashion-mnist,
    folder (an ImageFolder tree in ``data_dir``)."""
    data_dir: str | None = None
    """Where to look for the data set's files before downloading."""
    data_hook: str | None = None
    """``package.module:function`` returning (train, test) datasets: your own data."""
    train_set: Dataset[Any] | None = None
    """Your own training data as an object (Python API); overrides dataset and data_hook."""
    test_set: Dataset[Any] | None = None
    """Your own test data as an object (Python API)."""
    partition: str = "iid"
    """How the training set is split among peers: iid, dirichlet:ALPHA, classes:K."""
    model_spec: str | None = None
    """``package.module:factory`` returning an nn.Module: your own model (default: the CNN)."""
    model_factory: Callable[[], nn.Module] | None = None
    """Your own model factory as an object (Python API); overrides model_spec."""
    epochs: int = 3
    """Epochs this peer trains (a resumed peer trains only the rest)."""
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
    checkpoint_file: str | None = None
    """Saved after every epoch; default ~/.local/share/peerlearn/JOB-peer-NUM.ckpt."""
    resume: bool = True
    """Continue from the checkpoint if there is one."""
    merge_wait: float = 60.0
    """How long to wait for the neighbours' models of an epoch before merging what came.
    Models arriving later are merged at the next epoch (weighted down as stale)."""
    fanout: int | None = None
    """Send each epoch's model to this many neighbours (None: to every member)."""
    staleness_exponent: float = 0.5
    """A model s epochs behind weighs (s+1)^-a times its samples (FedAsync); 0: no decay."""
    max_staleness: int = 10
    """Refuse models more epochs behind than this."""
    gate: bool = False
    """Refuse received models that score clearly worse than ours on a local validation split."""
    gate_margin: float = 5.0
    """Accuracy points a received model may be below ours before the gate refuses it."""
    val_fraction: float = 0.1
    """Part of the local training data held out for the gate (only when the gate is on)."""
    robust: Robust = Robust()
    """How admitted models are combined: weighted average (none), coordinate-wise median,
    trimmed mean or norm clipping against ours (``Robust.parse("trimmed:0.25")``)."""
    codec: str = "raw"
    """How our model travels: raw, fp16, int8 (blockwise)."""
    min_peers: int = 1
    """Wait until this many peers (ourselves included) are in the job before training."""
    min_peers_timeout: float = 600.0
    """How long to wait for ``min_peers``; then train with whoever is there. A peer that
    resumes from its checkpoint does not wait."""
    bootstrap_peers: int = 3
    """A newcomer averages the current models of up to this many members."""
    bootstrap_timeout: float = 20.0
    """A newcomer waits this long for its donors, then uses what arrived."""
    linger: float = 2.0
    """Seconds to keep serving after the last epoch (late fetches, final deliveries)."""
    events_file: str | None = None
    """Append one JSON object per event (start, epoch, done, ...) to this file."""
    progress: bool = True
    """Show a progress bar while training."""
    limits: Limits | None = None
    """What we accept from other peers; None: sized to our own model (:func:`model_limits`)."""
    job_secret_file: str | None = None
    """Closed job: a file holding the job's join secret (not the secret itself: command lines
    show in ``ps``). We prove membership with it and ignore members without a valid proof."""
    job_secret_env: str | None = None
    """Closed job: the name of an environment variable holding the join secret instead."""
    allow_peers_file: str | None = None
    """Closed job: a file of allowed peer ids, one per line (``#`` comments); members not on
    it are ignored even if the rendezvous admits them."""

    def membership(self) -> JobPolicy | None:
        """The job's policy from ``job_secret_*`` and ``allow_peers_file`` (ValueError if a
        file cannot be read or holds no valid entry); None for an open job."""
        return policy_from_files(self.job_secret_file, self.job_secret_env,
                                 self.allow_peers_file)

    def __post_init__(self) -> None:
        if not 0 <= self.num < self.total:
            raise ValueError(f"--num must be in 0..{self.total - 1}, got {self.num}")
        if self.codec not in CODECS:
            raise ValueError(f"--codec must be one of {sorted(CODECS)}, got {self.codec!r}")
        if self.fanout is not None and self.fanout < 1:
            raise ValueError(f"--fanout must be at least 1, got {self.fanout}")
        if (self.train_set is None) != (self.test_set is None):
            raise ValueError("give both train_set and test_set, or neither")


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


def model_limits(reference: dict[str, torch.Tensor], base: Limits = Limits()) -> Limits:
    """Receive limits for a peer whose model is ``reference``.

    Peers of a job exchange only models of the job's architecture (:meth:`Peer.validate`
    refuses any other, same names, shapes and dtypes), so nothing larger than our own model
    needs to get in: a hostile sender's transfer is refused on its first chunk (WebRTC) or
    its header (ZeroMQ) instead of being buffered up to the generic 512 MB per transfer.
    """
    nbytes = sum(t.numel() * t.element_size() for t in reference.values())
    return dataclasses.replace(
        base,
        max_total_bytes=min(base.max_total_bytes, nbytes),
        max_arrays=min(base.max_arrays, len(reference)),
        max_ndim=min(base.max_ndim, max((t.dim() for t in reference.values()), default=0)),
    )


def job_seed(job: str) -> int:
    """Initial-weights seed shared by all peers of a job."""
    return int.from_bytes(hashlib.sha256(job.encode()).digest()[:4], "big")


def _tcp(address: str | None) -> str | None:
    if address is None or address.startswith("tcp://"):
        return address
    return f"tcp://{address}"


class _Bar:
    """A one-line progress bar on stderr."""

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


def _make_model(config: PeerConfig) -> nn.Module:
    """The job's model with the job's initial weights (the same in every peer)."""
    seed = config.seed if config.seed is not None else job_seed(config.job)
    factory = config.model_factory
    if factory is None and config.model_spec:
        factory = load_model_factory(config.model_spec)
    if factory is None:
        return build_model(seed)
    model = build_from_factory(factory, seed)
    if not isinstance(model, nn.Module):
        raise PluginError(f"the model factory returned {type(model).__name__}, not an nn.Module")
    return model


def _load_data(config: PeerConfig) -> tuple[Dataset[Any], Dataset[Any], str]:
    """(this peer's training data, the test data, how it was made); in a worker thread."""
    if config.train_set is not None and config.test_set is not None:
        train, test, presplit = config.train_set, config.test_set, False
    elif config.data_hook:
        train, test, presplit = load_data_hook(config.data_hook, config.num, config.total)
    else:
        train, test = load_dataset(config.dataset, config.data_dir)
        presplit = False
    if presplit:  # a hook that took (num, total) returned this peer's own part
        return train, test, "own part"
    part = split_dataset(train, config.num, config.total, config.partition)
    return part, test, f"{config.partition} part {config.num} of {config.total}"


class Peer:
    """One peer's state; ``run()`` is the whole life of the peer."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.membership = config.membership()  # a bad secret/list file fails here, at once
        self.events = EventLog(config.events_file, config.num)
        self.device = pick_device(config.device)
        self.model = _make_model(config).to(self.device)
        self.reference = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        self.fingerprint = fingerprint(self.reference)
        self.limits = config.limits or model_limits(self.reference)
        self.optimizer = make_optimizer(self.model, config.lr)
        self.scheduler = make_scheduler(self.optimizer, config.gamma)
        self.policy = MergePolicy(config.staleness_exponent, config.max_staleness, config.gate,
                                  config.gate_margin, config.robust)
        self.epoch = 0  # the swarm's epoch numbering (a newcomer continues its donors')
        self.epochs_trained = 0  # epochs this peer trained itself
        self.samples = 0
        self.pending: dict[str, ModelMessage] = {}  # newest unmerged model per sender
        self.merged_epoch: dict[str, int] = {}  # epoch of the last model merged, per sender
        self.bytes_sent = 0
        self.models_received = 0
        self.host: Host | None = None
        self.val_loader: DataLoader[Any] | None = None
        self.bootstrapped_from: list[str] = []
        self._sends: set[asyncio.Task[None]] = set()
        self._mismatched: set[str] = set()
        self.checkpoint_file = config.checkpoint_file or os.path.join(
            DATA_HOME, f"{config.job}-peer-{config.num}.ckpt")

    # ---- checks on what arrives ------------------------------------------------------------

    def validate(self, msg: ModelMessage) -> None:
        """Runs in the receive path (worker thread): refuse models that cannot be merged."""
        try:
            state = arrays_to_state(msg.arrays, self.reference, share_readonly=True)
        except ModelMismatch as exc:
            raise WireError(
                "model_mismatch",
                f"{exc} (the sender trains another architecture; all peers of a job need the "
                f"same model: fingerprint {self.fingerprint[:16]} here)") from exc
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
                    log.warning("%s", architecture_mismatch(
                        self.fingerprint, str(member.get("meta", {}).get("fingerprint", "?")),
                        peer=pid))
                continue
            partners.append(pid)
        return partners

    def _neighbours(self, epoch: int) -> tuple[list[str], list[str]]:
        assert self.host is not None
        return neighbours(self._partners(), self.host.peer_id, epoch, self.config.fanout,
                          job_seed(self.config.job))

    # ---- the loop ------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        train_part, test_set, how = await asyncio.to_thread(_load_data, cfg)
        await asyncio.to_thread(check_model_accepts, self.model, train_part,
                                cfg.model_spec or "the model")
        if cfg.gate:
            cut = max(1, int(len(train_part) * cfg.val_fraction))  # type: ignore[arg-type]
            indices = list(range(len(train_part)))  # type: ignore[arg-type]
            val_part = Subset(train_part, indices[-cut:])
            train_part = Subset(train_part, indices[:-cut])
            self.val_loader = DataLoader(val_part, batch_size=cfg.test_batch_size)
        self.samples = len(train_part)  # type: ignore[arg-type]
        if self.samples == 0:
            raise ValueError(f"peer {cfg.num} got no training samples ({how})")
        generator = torch.Generator().manual_seed(job_seed(cfg.job) + cfg.num)
        train_loader = DataLoader(train_part, batch_size=cfg.batch_size, shuffle=True,
                                  generator=generator)
        test_loader = DataLoader(test_set, batch_size=cfg.test_batch_size)
        key_file = cfg.key_file or os.path.join(DATA_HOME, f"peer-{cfg.num}.pem")
        identity = Identity.load_or_create(key_file)
        meta = {"num": cfg.num, "samples": self.samples, "fingerprint": self.fingerprint[:16],
                "dataset": cfg.dataset, "partition": cfg.partition, "codec": cfg.codec}
        host = self.host = Host(
            identity,
            HostConfig(rendezvous=cfg.rendezvous, job=cfg.job, listen=_tcp(cfg.listen),
                       advertise=_tcp(cfg.advertise), limits=self.limits,
                       membership=self.membership),
            meta,
            validator=self.validate,
            on_member_event=self._member_event,
        )
        await host.start()
        log.info("peer %d is %s; %d training samples (%s); %d members in job %r", cfg.num,
                 identity.peer_id, self.samples, how, len(host.members), cfg.job)
        try:
            # a peer resuming its checkpoint was part of the swarm already: it does not wait
            # for --min-peers again (the others may have finished meanwhile)
            resumed = await asyncio.to_thread(self._resume)
            if not resumed:
                await self._wait_for_peers()
                await self._bootstrap()
            await self._start_event(test_loader, resumed)
            history = []
            while self.epochs_trained < cfg.epochs:
                history.append(await self._epoch(train_loader, test_loader))
            await self._finish()
        finally:
            await self._cancel_sends()
            await host.close()
            self.events.close()
        return {"peer_id": identity.peer_id, "epochs": history, "bytes_sent": self.bytes_sent,
                "models_received": self.models_received}

    async def _wait_for_peers(self) -> None:
        assert self.host is not None
        deadline = time.monotonic() + self.config.min_peers_timeout
        while len(self._partners()) + 1 < self.config.min_peers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("only %d of %d peers after %.0f s; training anyway",
                            len(self._partners()) + 1, self.config.min_peers,
                            self.config.min_peers_timeout)
                return
            log.info("waiting for peers: %d of %d here", len(self._partners()) + 1,
                     self.config.min_peers)
            self.host.changed.clear()
            try:
                await asyncio.wait_for(self.host.changed.wait(), remaining)
            except TimeoutError:
                pass

    def _resume(self) -> bool:
        if not self.config.resume:
            return False
        ckpt = checkpoint.load(self.checkpoint_file, self.fingerprint)
        if ckpt is None:
            return False
        self.model.load_state_dict(ckpt.model)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.scheduler)
        self.epoch, self.epochs_trained = ckpt.epoch, ckpt.epochs_trained
        log.info("resumed from %s: epoch %d, %d of %d epochs trained", self.checkpoint_file,
                 self.epoch, self.epochs_trained, self.config.epochs)
        if self.epochs_trained >= self.config.epochs:
            log.warning("this peer already trained %d of %d epochs: nothing to do "
                        "(--no-resume starts afresh, --epochs trains more)",
                        self.epochs_trained, self.config.epochs)
        return True

    def _save(self) -> None:
        checkpoint.save(self.checkpoint_file, checkpoint.Checkpoint(
            epoch=self.epoch, epochs_trained=self.epochs_trained, fingerprint=self.fingerprint,
            model={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict()))

    async def _bootstrap(self) -> None:
        """Start from the weighted average of up to k members' current models."""
        assert self.host is not None
        donors = self._partners()[: self.config.bootstrap_peers]
        if not donors:
            return
        tasks = {asyncio.create_task(self.host.fetch_model(p)): p for p in donors}
        done, pending = await asyncio.wait(tasks, timeout=self.config.bootstrap_timeout)
        for task in pending:
            log.info("bootstrap: %s too slow, going on without it", tasks[task])
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        got = []
        for task in done:
            if task.exception() is not None:
                log.info("bootstrap: no model from %s (%s)", tasks[task], task.exception())
                continue
            got.append(task.result())
            self.bootstrapped_from.append(tasks[task])
        if got:
            if self.policy.robust.rule is RobustRule.NONE:
                state = await asyncio.to_thread(
                    weighted_average, [(m.extra["state"], m.samples) for m in got])
            else:  # no model of our own to judge the donors by yet: their median
                state = await asyncio.to_thread(
                    coordinate_median, [m.extra["state"] for m in got])
            self.model.load_state_dict(state)
            self.epoch = max(m.epoch for m in got)
            log.info("bootstrapped from %d peers at epoch %d", len(got), self.epoch)

    async def _start_event(self, test_loader: DataLoader[Any], resumed: bool) -> None:
        assert self.host is not None
        initial = await asyncio.to_thread(evaluate, self.model, test_loader, self.device)
        used = self.bootstrapped_from
        origin = ("checkpoint" if resumed else
                  f"average of {len(used)} peers" if used else "fresh model")
        log.info("start: accuracy %.2f%% (%s)", initial["accuracy"], origin)
        self.events.emit("start", peer_id=self.host.peer_id, accuracy=initial["accuracy"],
                         bootstrapped_from=used, resumed=resumed, epoch=self.epoch,
                         epochs_trained=self.epochs_trained, samples=self.samples)

    async def _epoch(self, train_loader: DataLoader[Any], test_loader: DataLoader[Any]
                     ) -> dict[str, Any]:
        assert self.host is not None
        cfg = self.config
        self.epoch += 1
        epoch = self.epoch
        bar = _Bar(f"peer {cfg.num} epoch {epoch}", cfg.progress)
        started = time.monotonic()
        stats = await asyncio.to_thread(train_epoch, self.model, train_loader, self.optimizer,
                                        self.device, bar)
        self.scheduler.step()
        self.epochs_trained += 1
        train_s = time.monotonic() - started
        before = await asyncio.to_thread(evaluate, self.model, test_loader, self.device)
        log.info("epoch %d: trained in %.1f s (loss %.4f); test before averaging: %.2f%%",
                 epoch, train_s, stats["loss"], before["accuracy"])

        await self._cancel_sends()  # the previous round had its chance
        send_to, expect_from = self._neighbours(epoch)
        msg = self._outgoing(epoch)
        frames, request_id = await asyncio.to_thread(self.host.encode, msg)
        size = sum(len(f) for f in frames)
        for pid in send_to:
            task = asyncio.create_task(self._send(pid, frames, request_id, size))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        log.info("epoch %d: sending to %d peers (%.2f MB each, %s)", epoch, len(send_to),
                 size / 1e6, cfg.codec)
        # before any byte leaves: what a receiver merges can be traced to this digest
        self.events.emit("sending", epoch=epoch, digest=msg.digest.hex(), sent_to=send_to,
                         bytes=size)

        received = await self._collect(epoch, expect_from)
        plan, merged = await asyncio.to_thread(self._merge, received)
        self.merged_epoch.update({pid: received[pid].epoch for pid in merged})
        after = await asyncio.to_thread(evaluate, self.model, test_loader, self.device)
        log.info("epoch %d: merged %s; test after averaging: %.2f%%", epoch,
                 plan.describe(self.host.peer_id), after["accuracy"])
        self.host.publish(self._outgoing(epoch))
        await asyncio.to_thread(self._save)
        record = {"epoch": epoch, "train_loss": stats["loss"], "train_s": round(train_s, 3),
                  "acc_before": before["accuracy"], "acc_after": after["accuracy"],
                  "merged_from": sorted(merged),
                  "merged_epochs": {pid: received[pid].epoch for pid in merged},
                  "weights": {("self" if k == self.host.peer_id else k): round(w, 5)
                              for k, w in plan.weights.items()},
                  "refused": plan.refused, "sent_to": send_to,
                  "robust": (plan.robust.as_record() if plan.robust else  # nothing merged
                             {"rule": str(self.policy.robust), "models": 1}),
                  "bytes_sent": self.bytes_sent, "models_received": self.models_received}
        record["merged_digests"] = {pid: received[pid].digest.hex() for pid in merged}
        record["rejected"] = self.rejected()
        self.events.emit("epoch", **record)
        await self.host.report(epoch, {"acc_before": before["accuracy"],
                                       "acc_after": after["accuracy"],
                                       "merged": len(merged), "bytes_sent": self.bytes_sent})
        return record

    def _merge(self, received: dict[str, ModelMessage]) -> tuple[Any, list[str]]:
        """Plan the weights (staleness, gate) and merge; runs in a worker thread."""
        assert self.host is not None
        own_key = self.host.peer_id
        own_accuracy = None
        if self.policy.gate and self.val_loader is not None and received:
            own_accuracy = float(evaluate(self.model, self.val_loader, self.device)["accuracy"])

        def score(sender: str) -> float:
            assert self.val_loader is not None
            probe = copy.deepcopy(self.model)
            probe.load_state_dict(received[sender].extra["state"])
            return float(evaluate(probe, self.val_loader, self.device)["accuracy"])

        plan = plan_merge(
            self.policy, self.epoch, self.samples,
            [Candidate(pid, m.epoch, m.samples) for pid, m in received.items()],
            own_accuracy=own_accuracy, score=score, self_key=own_key)
        merged = [pid for pid in plan.weights if pid != own_key]
        if merged:
            state, plan.robust = aggregate(
                self.policy.robust, self.model.state_dict(), plan.weights[own_key],
                [(pid, received[pid].extra["state"], plan.weights[pid]) for pid in merged])
            self.model.load_state_dict(state)
        return plan, merged

    def _outgoing(self, epoch: int) -> ModelMessage:
        """Our current model as a message: what we send to the neighbours after training and
        serve (publish) after merging."""
        assert self.host is not None
        return ModelMessage(job=self.config.job, sender=self.host.peer_id, epoch=epoch,
                            samples=self.samples, codec=self.config.codec,
                            arrays=state_to_arrays(self.model.state_dict(), copy=True))

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

    async def _collect(self, epoch: int, expect_from: list[str]) -> dict[str, ModelMessage]:
        """Wait until the expected neighbours' models of ``epoch`` are here, or merge_wait.
        Whatever else arrived meanwhile is merged too."""
        assert self.host is not None
        host = self.host
        deadline = time.monotonic() + self.config.merge_wait
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

    async def _finish(self) -> None:
        """Give outstanding deliveries and late fetches a moment, then leave."""
        if self._sends:
            await asyncio.wait(set(self._sends), timeout=max(self.config.linger, 5.0))
        await asyncio.sleep(self.config.linger)
        self.events.emit("done", epoch=self.epoch, epochs_trained=self.epochs_trained,
                         bytes_sent=self.bytes_sent, models_received=self.models_received,
                         rejected=self.rejected())

    def rejected(self) -> dict[str, dict[str, int]]:
        """Incoming messages the transports refused so far, by transport and reason code
        (``bad_digest``, ``chunk_timeout``, ``incomplete``, ...): nothing counted here was
        ever handed to the merge."""
        if self.host is None:
            return {}
        counts = {"zmq": dict(self.host.transport.stats.rejected)}
        if self.host.webrtc is not None:
            counts["webrtc"] = dict(self.host.webrtc.stats.rejected)
        return counts


async def run_peer(config: PeerConfig) -> dict[str, Any]:
    """Run one peer to the end; returns its summary (Python API: ``asyncio.run(run_peer(c))``)."""
    return await Peer(config).run()
