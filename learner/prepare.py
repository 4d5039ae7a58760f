"""What a peer prepares before it joins: the job's model with the job's initial weights, its
part of the data, and the limits on what it accepts from other peers."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from learner.config import PeerConfig
from learner.data import load_dataset
from learner.model import build_model
from learner.partition import split_dataset
from learner.plugins import PluginError, build_from_factory, load_data_hook, load_model_factory
from overlay.wire import Limits

__all__ = ["job_seed", "load_data", "make_model", "model_limits"]


def job_seed(job: str) -> int:
    """Initial-weights seed shared by all peers of a job."""
    return int.from_bytes(hashlib.sha256(job.encode()).digest()[:4], "big")


def model_limits(reference: dict[str, torch.Tensor], base: Limits = Limits()) -> Limits:
    """Receive limits for a peer whose model is ``reference``.

    Peers of a job exchange only models of the job's architecture
    (:func:`learner.exchange.accept_model` refuses any other, same names, shapes and dtypes),
    so nothing larger than our own model needs to get in: a hostile sender's transfer is
    refused on its first chunk (WebRTC) or its header (ZeroMQ) instead of being buffered up
    to the generic 512 MB per transfer.
    """
    nbytes = sum(t.numel() * t.element_size() for t in reference.values())
    return dataclasses.replace(
        base,
        max_total_bytes=min(base.max_total_bytes, nbytes),
        max_arrays=min(base.max_arrays, len(reference)),
        max_ndim=min(base.max_ndim, max((t.dim() for t in reference.values()), default=0)),
    )


def make_model(config: PeerConfig) -> nn.Module:
    """The job's model with the job's initial weights (the same in every peer)."""
    train = config.train
    seed = train.seed if train.seed is not None else job_seed(config.network.job)
    factory = train.model_factory
    if factory is None and train.model_spec:
        factory = load_model_factory(train.model_spec)
    if factory is None:
        return build_model(seed)
    model = build_from_factory(factory, seed)
    if not isinstance(model, nn.Module):
        raise PluginError(f"the model factory returned {type(model).__name__}, not an nn.Module")
    return model


def load_data(config: PeerConfig) -> tuple[Dataset[Any], Dataset[Any], str]:
    """(this peer's training data, the test data, how it was made); in a worker thread."""
    data = config.data
    if data.train_set is not None and data.test_set is not None:
        train, test, presplit = data.train_set, data.test_set, False
    elif data.data_hook:
        train, test, presplit = load_data_hook(data.data_hook, config.num, config.total)
    else:
        train, test = load_dataset(data.dataset, data.data_dir)
        presplit = False
    if presplit:  # a hook that took (num, total) returned this peer's own part
        return train, test, "own part"
    part = split_dataset(train, config.num, config.total, data.partition)
    return part, test, f"{data.partition} part {config.num} of {config.total}"
