"""Your own model for ``peerlearn peer --model examples.my_model:factory``.

A ``--model`` function takes no arguments and returns a fresh ``torch.nn.Module``. Training uses
``nll_loss``, so the model must output ``N x classes`` log-probabilities (end with
``LogSoftmax``). Peers call it under a seed derived from the job name, so all of them start
from the same weights; every peer of a job must use the same factory, or their models are not
averaged (the architecture fingerprint differs).
"""

from __future__ import annotations

from torch import nn


def factory() -> nn.Module:
    """A small MLP for 1 x 28 x 28 images and 10 classes (about 100 k parameters)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
        nn.LogSoftmax(dim=1),
    )
