"""Local checkpoints, so a restarted peer continues where it stopped.

After every epoch the peer saves its model, optimizer and scheduler state and its epoch
counters to one file, atomically (a temporary file, fsync, rename): a crash mid-write leaves
the previous checkpoint intact. Loading uses ``torch.load(weights_only=True)``; the file is
our own, but even so nothing but tensors and plain containers is accepted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass
class Checkpoint:
    epoch: int
    """The swarm epoch the saved model belongs to (after its merge)."""
    epochs_trained: int
    """How many epochs this peer trained itself (``--epochs`` counts these)."""
    fingerprint: str
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]


def save(path: str | os.PathLike[str], ckpt: Checkpoint) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = {"format": FORMAT, "epoch": ckpt.epoch, "epochs_trained": ckpt.epochs_trained,
               "fingerprint": ckpt.fingerprint, "model": ckpt.model,
               "optimizer": ckpt.optimizer, "scheduler": ckpt.scheduler}
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | os.PathLike[str], fingerprint: str) -> Checkpoint | None:
    """The checkpoint at ``path``; None if there is none. A checkpoint of another model
    architecture or an unreadable file is reported and ignored (we start afresh)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say so, start afresh
        log.warning("ignoring checkpoint %s: unreadable (%s)", path, exc)
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        log.warning("ignoring checkpoint %s: unknown format", path)
        return None
    if payload.get("fingerprint") != fingerprint:
        log.warning("ignoring checkpoint %s: it is of another model architecture", path)
        return None
    return Checkpoint(epoch=int(payload["epoch"]), epochs_trained=int(payload["epochs_trained"]),
                      fingerprint=fingerprint, model=payload["model"],
                      optimizer=payload["optimizer"], scheduler=payload["scheduler"])


def save_training(path: str | os.PathLike[str], epoch: int, epochs_trained: int,
                  fingerprint: str, model: nn.Module, optimizer: Optimizer,
                  scheduler: LRScheduler) -> None:
    """Save a peer's training state (model on the CPU, optimizer, scheduler, counters)."""
    save(path, Checkpoint(
        epoch=epoch, epochs_trained=epochs_trained, fingerprint=fingerprint,
        model={k: v.detach().cpu() for k, v in model.state_dict().items()},
        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict()))


def restore(path: str | os.PathLike[str], fingerprint: str, model: nn.Module,
            optimizer: Optimizer, scheduler: LRScheduler) -> Checkpoint | None:
    """Load the checkpoint at ``path`` into ``model``, ``optimizer`` and ``scheduler``; None
    (nothing loaded) if there is none or it is not ours (:func:`load`)."""
    ckpt = load(path, fingerprint)
    if ckpt is None:
        return None
    model.load_state_dict(ckpt.model)
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    return ckpt
