"""A training peer: the main loop that ties the learner to the overlay.

Each epoch: train locally -> test ("before averaging") -> send the model to the neighbours
(everyone, or ``fanout`` of them) -> wait (bounded) for the neighbours' models of this epoch ->
merge, weighted by training samples and staleness, minus what the gate refuses -> test
("after averaging") -> publish the merged model -> save a checkpoint -> report to the
rendezvous. A newcomer first starts from its donors' models (:mod:`learner.bootstrap`); a
restarted peer continues from its checkpoint (:mod:`learner.checkpoint`). Sending and
collecting are :mod:`learner.exchange`'s, the merge :mod:`learner.merge`'s, the event log
:mod:`learner.events`'s; the configuration is :mod:`learner.config`'s.

Torch work (training, evaluation, copying the model out, merging) runs in worker threads; the
event loop keeps receiving meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from learner import bootstrap, checkpoint
from learner.averaging import fingerprint
from learner.codec_choice import pick_codec
from learner.config import PeerConfig
from learner.convert import state_to_arrays
from learner.events import EventLog
from learner.exchange import Exchange, Incoming, accept_model
from learner.merge import MergePlan, MergePolicy, merge_received, neighbours
from learner.plugins import architecture_mismatch, check_model_accepts
from learner.prepare import job_seed, load_data, make_model, model_limits
from learner.train import evaluate, make_optimizer, make_scheduler, pick_device, train_epoch
from overlay.host import Host, HostConfig
from overlay.identity import Identity
from overlay.models import EncodedModel, OutgoingModel, ReceivedModel

__all__ = ["DATA_HOME", "Peer", "PeerConfig", "job_seed", "model_limits", "run_peer"]

log = logging.getLogger(__name__)

DATA_HOME = os.path.expanduser("~/.local/share/peerlearn")


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


class Peer:
    """One peer's state; ``run()`` is the whole life of the peer."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.membership = config.membership()  # a bad secret/list file fails here, at once
        self.events = EventLog(config.files.events_file, config.num)
        self.device = pick_device(config.train.device)
        self.model = make_model(config).to(self.device)
        self.reference = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        self.fingerprint = fingerprint(self.reference)
        self.limits = config.network.limits or model_limits(self.reference)
        self.optimizer = make_optimizer(self.model, config.train.lr)
        self.scheduler = make_scheduler(self.optimizer, config.train.gamma)
        merge = config.merge
        self.policy = MergePolicy(merge.staleness_exponent, merge.max_staleness, merge.gate,
                                  merge.gate_margin, merge.robust)
        self.epoch = 0  # the swarm's epoch numbering (a newcomer continues its donors')
        self.epochs_trained = 0  # epochs this peer trained itself
        self.samples = 0
        self._host: Host[Incoming] | None = None
        self._exchange: Exchange | None = None
        self.val_loader: DataLoader[Any] | None = None
        self.bootstrapped_from: list[str] = []
        self._mismatched: set[str] = set()
        self.bytes_saved = 0
        """Bytes our codecs saved against raw models so far (all neighbours)."""
        self.checkpoint_file = config.files.checkpoint_file or os.path.join(
            DATA_HOME, f"{config.network.job}-peer-{config.num}.ckpt")

    @property
    def host(self) -> Host[Incoming]:
        if self._host is None:
            raise RuntimeError("the peer has not joined yet")
        return self._host

    @property
    def exchange(self) -> Exchange:
        if self._exchange is None:
            raise RuntimeError("the peer has not joined yet")
        return self._exchange

    # ---- what arrives, and who we train with ---------------------------------------------

    def validate(self, model: ReceivedModel) -> Incoming:
        """The host's ``accept`` (worker thread): refuse models that cannot be merged."""
        return accept_model(model, self.reference, self.fingerprint)

    def _partners(self) -> list[str]:
        """Members that train the same architecture as we do (ZeroMQ or WebRTC reaches them)."""
        partners = []
        for pid, member in self.host.members.items():
            theirs = member.meta.get("fingerprint")
            if theirs != self.fingerprint[:16]:
                if pid not in self._mismatched:
                    self._mismatched.add(pid)
                    log.warning("%s", architecture_mismatch(
                        self.fingerprint, str(theirs if theirs is not None else "?"), peer=pid))
                continue
            partners.append(pid)
        return partners

    def _neighbours(self, epoch: int) -> tuple[list[str], list[str]]:
        host = self.host
        # who has a verified address: the same view on every peer (ours: the dial-back's)
        public = {pid for pid, member in host.members.items() if member.address}
        if host.rendezvous is not None and host.rendezvous.reachable_addrs:
            public.add(host.peer_id)
        return neighbours(self._partners(), host.peer_id, epoch, self.config.merge.fanout,
                          job_seed(self.config.network.job), graph=self.config.merge.graph,
                          public=public)

    # ---- the loop ------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        cfg = self.config
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        train_loader, test_loader, how = await self._loaders()
        key_file = cfg.files.key_file or os.path.join(DATA_HOME, f"peer-{cfg.num}.pem")
        identity = Identity.load_or_create(key_file)
        meta = {"num": cfg.num, "samples": self.samples, "fingerprint": self.fingerprint[:16],
                "dataset": cfg.data.dataset, "partition": cfg.data.partition,
                "codec": cfg.network.codec}
        net = cfg.network
        host = self._host = Host(
            identity,
            HostConfig(rendezvous=cfg.rendezvous, job=net.job, listen=_tcp(net.listen),
                       advertise=_tcp(net.advertise), limits=self.limits,
                       membership=self.membership, lanes=net.lanes),
            meta,
            accept=self.validate,
            on_member_event=self.events.member,
        )
        self._exchange = Exchange(host, cfg.merge.merge_wait)
        await host.start()
        log.info("peer %d is %s; %d training samples (%s); %d members in job %r", cfg.num,
                 identity.peer_id, self.samples, how, len(host.members), net.job)
        try:
            # a peer resuming its checkpoint was part of the swarm already: it does not wait
            # for --min-peers again (the others may have finished meanwhile)
            resumed = await asyncio.to_thread(self._resume)
            if not resumed:
                await bootstrap.wait_for_peers(host, self._partners, net.min_peers,
                                               net.min_peers_timeout)
                await self._bootstrap()
            await self._start_event(test_loader, resumed)
            history = []
            while self.epochs_trained < cfg.train.epochs:
                history.append(await self._epoch(train_loader, test_loader))
            await self._finish()
        finally:
            await self.exchange.cancel_sends()
            await host.close()
            self.events.close()
        return {"peer_id": identity.peer_id, "epochs": history,
                "bytes_sent": self.exchange.bytes_sent,
                "models_received": self.exchange.models_received}

    async def _loaders(self) -> tuple[DataLoader[Any], DataLoader[Any], str]:
        """(training loader, test loader, how our part was made); the gate's validation
        split is held out of our part."""
        cfg = self.config
        train_part, test_set, how = await asyncio.to_thread(load_data, cfg)
        await asyncio.to_thread(check_model_accepts, self.model, train_part,
                                cfg.train.model_spec or "the model")
        if cfg.merge.gate:
            cut = max(1, int(len(train_part) * cfg.merge.val_fraction))  # type: ignore[arg-type]
            indices = list(range(len(train_part)))  # type: ignore[arg-type]
            val_part = Subset(train_part, indices[-cut:])
            train_part = Subset(train_part, indices[:-cut])
            self.val_loader = DataLoader(val_part, batch_size=cfg.train.test_batch_size)
        self.samples = len(train_part)  # type: ignore[arg-type]
        if self.samples == 0:
            raise ValueError(f"peer {cfg.num} got no training samples ({how})")
        generator = torch.Generator().manual_seed(job_seed(cfg.network.job) + cfg.num)
        train_loader = DataLoader(train_part, batch_size=cfg.train.batch_size, shuffle=True,
                                  generator=generator)
        return train_loader, DataLoader(test_set, batch_size=cfg.train.test_batch_size), how

    def _resume(self) -> bool:
        epochs = self.config.train.epochs
        if not self.config.files.resume:
            return False
        ckpt = checkpoint.restore(self.checkpoint_file, self.fingerprint, self.model,
                                  self.optimizer, self.scheduler)
        if ckpt is None:
            return False
        self.epoch, self.epochs_trained = ckpt.epoch, ckpt.epochs_trained
        log.info("resumed from %s: epoch %d, %d of %d epochs trained", self.checkpoint_file,
                 self.epoch, self.epochs_trained, epochs)
        if self.epochs_trained >= epochs:
            log.warning("this peer already trained %d of %d epochs: nothing to do "
                        "(--no-resume starts afresh, --epochs trains more)",
                        self.epochs_trained, epochs)
        return True

    def _save(self) -> None:
        checkpoint.save_training(self.checkpoint_file, self.epoch, self.epochs_trained,
                                 self.fingerprint, self.model, self.optimizer, self.scheduler)

    async def _bootstrap(self) -> None:
        """Start from the combined current models of up to k members."""
        merge = self.config.merge
        donors = self._partners()[: merge.bootstrap_peers]
        got = await bootstrap.fetch_donors(self.host, donors, merge.bootstrap_timeout)
        if got:
            self.bootstrapped_from = [m.sender for m in got]
            state = await asyncio.to_thread(bootstrap.combine, got, self.policy.robust)
            self.model.load_state_dict(state)
            self.epoch = max(m.epoch for m in got)
            log.info("bootstrapped from %d peers at epoch %d", len(got), self.epoch)

    async def _start_event(self, test_loader: DataLoader[Any], resumed: bool) -> None:
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
        cfg, host, exchange = self.config, self.host, self.exchange
        self.epoch += 1
        epoch = self.epoch
        bar = _Bar(f"peer {cfg.num} epoch {epoch}", cfg.train.progress)
        started = time.monotonic()
        stats = await asyncio.to_thread(train_epoch, self.model, train_loader, self.optimizer,
                                        self.device, bar)
        self.scheduler.step()
        self.epochs_trained += 1
        train_s = time.monotonic() - started
        before = await asyncio.to_thread(evaluate, self.model, test_loader, self.device)
        log.info("epoch %d: trained in %.1f s (loss %.4f); test before averaging: %.2f%%",
                 epoch, train_s, stats["loss"], before["accuracy"])

        send_to, expect_from = self._neighbours(epoch)
        codecs = self._codecs_for(send_to)
        raw_bytes = self._raw_bytes()
        for codec in sorted(set(codecs.values())):
            peers = [pid for pid in send_to if codecs[pid] == codec]
            encoded = await self._encode(epoch, codec)
            exchange.send(encoded, peers)
            saved = max(raw_bytes - encoded.nbytes, 0) * len(peers)
            self.bytes_saved += saved
            log.info("epoch %d: sending to %d peers (%.2f MB each, %s%s)", epoch, len(peers),
                     encoded.nbytes / 1e6, encoded.codec,
                     f", {saved / 1e6:.1f} MB saved" if saved else "")
            # before any byte leaves: what a receiver merges can be traced to this digest
            self.events.emit("sending", epoch=epoch, digest=encoded.digest.hex(),
                             sent_to=peers, bytes=encoded.nbytes, codec=encoded.codec,
                             bytes_saved=saved)

        received = await exchange.collect(epoch, expect_from)
        plan, merged = await asyncio.to_thread(self._merge, received)
        exchange.merged(received, merged)
        after = await asyncio.to_thread(evaluate, self.model, test_loader, self.device)
        log.info("epoch %d: merged %s; test after averaging: %.2f%%", epoch,
                 plan.describe(host.peer_id), after["accuracy"])
        host.publish(await self._encode(epoch))
        await asyncio.to_thread(self._save)
        record = {"epoch": epoch, "train_loss": stats["loss"], "train_s": round(train_s, 3),
                  "acc_before": before["accuracy"], "acc_after": after["accuracy"],
                  "merged_from": sorted(merged),
                  "merged_epochs": {pid: received[pid].epoch for pid in merged},
                  "weights": {("self" if k == host.peer_id else k): round(w, 5)
                              for k, w in plan.weights.items()},
                  "refused": plan.refused, "sent_to": send_to,
                  "robust": (plan.robust.as_record() if plan.robust else  # nothing merged
                             {"rule": str(self.policy.robust), "models": 1}),
                  "bytes_sent": exchange.bytes_sent, "bytes_saved": self.bytes_saved,
                  "codecs": codecs,
                  "models_received": exchange.models_received,
                  "merged_digests": {pid: received[pid].digest.hex() for pid in merged},
                  "rejected": self.rejected()}
        self.events.emit("epoch", **record)
        await host.report(epoch, {"acc_before": before["accuracy"],
                                  "acc_after": after["accuracy"],
                                  "merged": len(merged), "bytes_sent": exchange.bytes_sent,
                                  "bytes_saved": self.bytes_saved,
                                  "codecs": _codec_summary(codecs)})
        return record

    def _merge(self, received: dict[str, Incoming]) -> tuple[MergePlan, list[str]]:
        """Plan the weights (staleness, gate) and merge; runs in a worker thread."""
        return merge_received(self.policy, self.model, self.epoch, self.samples, received,
                              self_key=self.host.peer_id, val_loader=self.val_loader,
                              device=self.device)

    def _outgoing(self, epoch: int, codec: str) -> OutgoingModel:
        """Our current model, copied out: what we send to the neighbours after training and
        serve (publish) after merging. Runs in a worker thread."""
        return OutgoingModel(job=self.config.network.job, sender=self.host.peer_id,
                             epoch=epoch, samples=self.samples, codec=codec,
                             arrays=state_to_arrays(self.model.state_dict(), copy=True))

    async def _encode(self, epoch: int, codec: str | None = None) -> EncodedModel:
        """Our current model, encoded once for every neighbour of ``codec`` (default: the
        configured one; ``auto`` serves raw); nothing of it on the loop."""
        if codec is None:
            codec = self.config.network.codec
        if codec == "auto":
            codec = "raw"
        return await self.host.encode(await asyncio.to_thread(self._outgoing, epoch, codec))

    def _codecs_for(self, peers: Sequence[str]) -> dict[str, str]:
        """The codec for each neighbour: the configured one, or with ``--codec auto`` one per
        link kind and measured throughput (learner.codec_choice)."""
        codec = self.config.network.codec
        if codec != "auto":
            return dict.fromkeys(peers, codec)
        chosen = {}
        for pid in peers:
            link = self.host.links.get(pid)
            chosen[pid] = pick_codec(link.kind if link is not None else None,
                                     self.exchange.throughput.get(pid))
        return chosen

    def _raw_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    async def _finish(self) -> None:
        """Give outstanding deliveries and late fetches a moment, then leave."""
        linger = self.config.network.linger
        await self.exchange.finish_sends(max(linger, 5.0))
        await asyncio.sleep(linger)
        self.events.emit("done", epoch=self.epoch, epochs_trained=self.epochs_trained,
                         bytes_sent=self.exchange.bytes_sent,
                         models_received=self.exchange.models_received,
                         rejected=self.rejected())

    def rejected(self) -> dict[str, dict[str, int]]:
        """Incoming messages the transports refused so far, by transport and reason code
        (``bad_digest``, ``chunk_timeout``, ``incomplete``, ...): nothing counted here was
        ever handed to the merge."""
        return self.host.rejected() if self._host is not None else {}


async def run_peer(config: PeerConfig) -> dict[str, Any]:
    """Run one peer to the end; returns its summary (Python API: ``asyncio.run(run_peer(c))``)."""
    return await Peer(config).run()


def _codec_summary(codecs: Mapping[str, str]) -> str:
    """``"int8:2,raw:1"``: how many neighbours got which codec (a flat metric for reports)."""
    counts: dict[str, int] = {}
    for codec in codecs.values():
        counts[codec] = counts.get(codec, 0) + 1
    return ",".join(f"{c}:{n}" for c, n in sorted(counts.items()))
