"""Weighted averaging of model states, and architecture fingerprints.

Peers merge the models they receive with their own, weighted by the number of training samples
(the caller may lower the weight of stale models). Floating-point entries are averaged in float64
and cast back; integer entries (e.g. BatchNorm's ``num_batches_tracked``) are counters, not
parameters, and are taken from the first state, which is the local one by convention.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from learner.convert import numpy_dtype
from overlay.wire import NamedArray

__all__ = ["fingerprint", "weighted_average"]

State = Mapping[str, torch.Tensor]


def weighted_average(states: Sequence[tuple[State, float]]) -> dict[str, torch.Tensor]:
    """The weighted mean of ``states``, a list of ``(state_dict, weight)``; local state first.

    Weights are normalized to sum to 1; each must be finite and non-negative and their total
    positive. All states must have the same names, shapes and dtypes, and every floating-point
    value must be finite; otherwise ``ValueError`` names the offending input and tensor. The
    result lives on the devices of the first state; the inputs are not modified.
    """
    if not states:
        raise ValueError("weighted_average: no states given")
    weights = [float(w) for _, w in states]
    for index, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weighted_average: weight of input {index} is {w}; "
                             "weights must be finite and >= 0")
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError(f"weighted_average: total weight is {total}; it must be positive")
    normalized = [w / total for w in weights]

    first = states[0][0]
    for index, (state, _) in enumerate(states):
        if state.keys() != first.keys():
            missing = sorted(set(first) - set(state))
            extra = sorted(set(state) - set(first))
            raise ValueError(f"weighted_average: input {index} has different entries than "
                             f"input 0 (missing {missing}, extra {extra})")

    result: dict[str, torch.Tensor] = {}
    for name, reference in first.items():
        for index, (state, _) in enumerate(states):
            tensor = state[name]
            if tensor.shape != reference.shape or tensor.dtype != reference.dtype:
                raise ValueError(
                    f"weighted_average: {name} of input {index} is {tensor.dtype} "
                    f"{tuple(tensor.shape)}, input 0 has {reference.dtype} {tuple(reference.shape)}"
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"weighted_average: {name} of input {index} has non-finite values")
        if not reference.is_floating_point():
            result[name] = reference.detach().clone()
            continue
        device = reference.device
        accumulate_on = device if device.type in ("cpu", "cuda") else torch.device("cpu")
        acc = torch.zeros(reference.shape, dtype=torch.float64, device=accumulate_on)
        for (state, _), w in zip(states, normalized, strict=True):
            if w:
                acc.add_(state[name].detach().to(accumulate_on, torch.float64), alpha=w)
        result[name] = acc.to(device=device, dtype=reference.dtype)
    return result


def fingerprint(state: State | Iterable[NamedArray]) -> str:
    """SHA-256 (hex) of the sorted ``name shape dtype`` lines of a state dict or array list.

    Two peers with the same architecture get the same fingerprint, whatever the values; a state
    dict and the :class:`NamedArray` list made from it also agree. Dtypes are spelled the numpy
    way (``float32``), so the fingerprint does not depend on the torch version.
    """
    entries: list[tuple[str, tuple[int, ...], str]] = []
    if isinstance(state, Mapping):
        for name, tensor in state.items():
            entries.append((name, tuple(tensor.shape), numpy_dtype(tensor.dtype).name))
    else:
        for item in state:
            entries.append((item.name, tuple(item.array.shape), item.array.dtype.name))
    entries.sort()
    text = "".join(f"{name} {','.join(map(str, shape))} {dtype}\n"
                   for name, shape, dtype in entries)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
