"""``peerlearn demo``: a rendezvous and N peers as separate processes on loopback."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learner.config import DATASET_CHOICES, PeerConfig, option
from learner.options import to_argv
from peerlearn.launch import Launcher

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """A local swarm: a rendezvous and ``peers`` peers on loopback."""

    peers: int = option(3, "number of peers; the training set is split into this many equal "
                        "shards", "--peers", kind="int")
    epochs: int = option(3, "epochs every peer trains", "--epochs", kind="int")
    dataset: str = option("digits", "data set (digits works offline)", "--dataset",
                          choices=DATASET_CHOICES)
    data_dir: str | None = option(None, "look for data set files here first", "--data-dir")
    workdir: str | None = option(
        None, "keep logs, keys and event files here (default: a temporary folder, removed "
        "afterwards)", "--workdir")
    device: str = option("cpu", "device for every peer", "--device")
    timeout: float = option(1800.0, "give up after this many seconds")


LAUNCHER_FIELDS = ("num", "total", "rendezvous", "epochs", "key_file", "checkpoint_file",
                   "events_file", "progress", "listen", "threads")
"""The fields :meth:`Launcher.peer_args` fills in itself."""


def peer_config(config: DemoConfig, num: int, swarm: Launcher, threads: int) -> PeerConfig:
    """The configuration of the demo's peer ``num``: its command line says exactly this."""
    files = swarm.workdir
    return PeerConfig(
        num, config.peers, f"{swarm.rendezvous_ip}:{swarm.rendezvous_port}", job="demo",
        epochs=config.epochs, dataset=config.dataset, data_dir=config.data_dir,
        device=config.device, threads=threads, progress=False, listen="127.0.0.1:0",
        key_file=str(files / f"peer-{num}.pem"), checkpoint_file=str(files / f"peer-{num}.ckpt"),
        events_file=str(swarm.events_path(num)))


def peer_extra_args(config: DemoConfig, num: int, swarm: Launcher, threads: int) -> list[str]:
    """What the demo adds to the launcher's ``peer`` command line for peer ``num``."""
    return to_argv(peer_config(config, num, swarm, threads), omit=LAUNCHER_FIELDS)


def _fmt_row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                     enumerate(zip(cells, widths, strict=True)))


def results_table(swarm: Launcher, peers: int, epochs: int) -> str:
    """Per peer: accuracy before -> after averaging per epoch, models received, MB sent."""
    header = ["peer", "samples"] + [f"epoch {e}: before -> after" for e in range(1, epochs + 1)]
    header += ["models recv", "MB sent"]
    rows = [header]
    for num in range(peers):
        starts = swarm.events(num, "start")
        by_epoch: dict[int, dict[str, Any]] = {}
        for rec in swarm.events(num, "epoch"):
            by_epoch[rec["epoch"]] = rec
        last = by_epoch[max(by_epoch)] if by_epoch else {}
        row = [str(num), str(starts[0]["samples"]) if starts else "?"]
        for epoch in range(1, epochs + 1):
            got = by_epoch.get(epoch)
            row.append(f"{got['acc_before']:.2f}% -> {got['acc_after']:.2f}%" if got else "-")
        row += [str(last.get("models_received", 0)), f"{last.get('bytes_sent', 0) / 1e6:.1f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(_fmt_row(r, widths) for r in rows)


def _progress(swarm: Launcher, peers: int, seen: dict[int, int]) -> None:
    for num in range(peers):
        records = swarm.events(num)
        for rec in records[seen.get(num, 0):]:
            if rec["event"] == "start":
                origin = (f"average of {len(rec['bootstrapped_from'])} peers"
                          if rec["bootstrapped_from"] else "fresh model")
                print(f"peer {num}: joined with {rec['samples']} samples ({origin})", flush=True)
            elif rec["event"] == "epoch":
                print(f"peer {num}: epoch {rec['epoch']}: trained in {rec['train_s']:.1f} s, "
                      f"test before averaging {rec['acc_before']:.2f}%, merged "
                      f"{len(rec['merged_from'])} models, after {rec['acc_after']:.2f}%",
                      flush=True)
            elif rec["event"] == "done":
                print(f"peer {num}: done", flush=True)
        seen[num] = len(records)


def run_demo(config: DemoConfig) -> int:
    if config.peers < 1 or config.epochs < 1:
        log.error("--peers and --epochs must be at least 1")
        return 2
    from learner.data import DatasetError, load_dataset

    try:  # fetch once here, so the peers find it in the cache instead of racing for it
        train, test = load_dataset(config.dataset, config.data_dir)
    except DatasetError as exc:
        log.error("%s", exc)
        return 1
    print(f"data set {config.dataset}: {len(train)} training images in {config.peers} shards "
          f"of {len(train) // config.peers}, {len(test)} test images", flush=True)
    tmp = None
    if config.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="peerlearn-demo-")
        workdir = Path(tmp.name)
    else:
        workdir = Path(config.workdir)
    threads = max(1, (os.cpu_count() or 1) // config.peers)
    swarm = Launcher(workdir)
    seen: dict[int, int] = {}
    try:
        port = swarm.start_rendezvous()
        print(f"rendezvous on http://127.0.0.1:{port} (try /peers?job=demo); logs in {workdir}",
              flush=True)
        for num in range(config.peers):
            swarm.start_peer(num, config.peers, config.epochs,
                             *peer_extra_args(config, num, swarm, threads), threads=threads)
        deadline = time.monotonic() + config.timeout
        while time.monotonic() < deadline:
            _progress(swarm, config.peers, seen)
            codes = {n: p.poll() for n, p in swarm.peers.items()}
            if all(c is not None for c in codes.values()):
                break
            time.sleep(0.5)
        _progress(swarm, config.peers, seen)
        failed = {n: c for n, p in swarm.peers.items() if (c := p.poll()) != 0}
        print("\n" + results_table(swarm, config.peers, config.epochs), flush=True)
        for num, code in failed.items():
            tail = swarm.log(f"peer-{num}")[-1500:]
            print(f"\npeer {num} ended with {code}; the end of its log:\n{tail}", file=sys.stderr)
        return 1 if failed else 0
    except KeyboardInterrupt:
        print("\nstopping the swarm ...", flush=True)
        swarm.stop()
        _progress(swarm, config.peers, seen)
        print("\n" + results_table(swarm, config.peers, config.epochs), flush=True)
        return 130
    finally:
        swarm.stop()
        if tmp is not None:
            tmp.cleanup()
