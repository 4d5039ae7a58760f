"""The default model: the classic PyTorch ``examples/mnist`` CNN (about 1.2 M parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Net", "build_model"]


class Net(nn.Module):
    """Two 3x3 convolutions, max-pooling, dropout and two linear layers; outputs log-probabilities.

    Input: ``N x 1 x 28 x 28`` float images. Output: ``N x 10`` log-softmax scores.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def build_model(seed: int | None = None) -> Net:
    """Build a fresh :class:`Net`.

    With a ``seed`` the initial weights are a pure function of it: every peer of a job derives the
    same seed from the job name, so all of them start from the same point (which matters for
    averaging -- see ``docs``/benchmarks). The global torch RNG is left untouched.
    """
    if seed is None:
        return Net()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net()
