"""Training and evaluation, with the hyper-parameters of the original prototype.

Defaults (from PyTorch's ``examples/mnist``): batch 64, test batch 1000, Adadelta with lr 1.0,
StepLR with gamma 0.7 stepped once per epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Adadelta, Optimizer
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader

__all__ = [
    "BATCH_SIZE",
    "GAMMA",
    "LR",
    "TEST_BATCH_SIZE",
    "evaluate",
    "make_optimizer",
    "make_scheduler",
    "pick_device",
    "train_epoch",
]

BATCH_SIZE = 64
TEST_BATCH_SIZE = 1000
LR = 1.0
GAMMA = 0.7

Progress = Callable[[int, int, float], None]
"""``progress(batch_index, number_of_batches, batch_loss)``, called after every batch."""


def pick_device(spec: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; otherwise the named device, checked to exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {spec!r} (try auto, cpu or cuda)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available here; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def make_optimizer(model: nn.Module, lr: float = LR) -> Adadelta:
    """Adadelta over all parameters of ``model``."""
    return Adadelta(model.parameters(), lr=lr)


def make_scheduler(optimizer: Optimizer, gamma: float = GAMMA) -> StepLR:
    """Multiply the learning rate by ``gamma`` after each epoch (call ``step()`` once per epoch)."""
    return StepLR(optimizer, step_size=1, gamma=gamma)


def train_epoch(model: nn.Module, loader: DataLoader[Any], optimizer: Optimizer,
                device: torch.device, progress: Progress | None = None) -> dict[str, float | int]:
    """One pass over ``loader``; returns ``{"loss": mean per-sample loss, "samples": n}``."""
    model.train()
    total_loss = 0.0
    samples = 0
    batches = len(loader)
    for index, (data, target) in enumerate(loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.nll_loss(model(data), target)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        batch_loss = loss.item()
        total_loss += batch_loss * len(target)
        samples += len(target)
        if progress is not None:
            progress(index, batches, batch_loss)
    return {"loss": total_loss / samples if samples else float("nan"), "samples": samples}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader[Any], device: torch.device
             ) -> dict[str, float | int]:
    """Returns ``{"loss": mean per-sample loss, "accuracy": percent, "samples": n}``."""
    model.eval()
    total_loss = 0.0
    correct = 0
    samples = 0
    for data, target in loader:
        data, target = data.to(device), target.to(device)
        output = model(data)
        total_loss += F.nll_loss(output, target, reduction="sum").item()
        correct += int((output.argmax(dim=1) == target).sum().item())
        samples += len(target)
    if samples == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "samples": 0}
    return {"loss": total_loss / samples, "accuracy": 100.0 * correct / samples, "samples": samples}
