"""Robust aggregation: merging when some received models may be poisoned.

A member of a job is authenticated, but it may still send a model that was scaled, replaced
by noise, or trained to do harm. A plain weighted average lets one such model move every
peer's weights anywhere it likes. The rules here bound what one model can do:

``median``
    The coordinate-wise median of our model and the received ones (for an even count, the
    mean of the two middle values, as numpy does). A value that lies beyond the others in a
    coordinate never gets in, whatever its size. Merge weights (samples, staleness) are
    ignored: the median counts models, not samples.
``trimmed:B``
    The coordinate-wise trimmed mean: in every coordinate, sort the ``n`` values, drop
    ``k = floor(B * n)`` at each end and average the rest, unweighted like the median. With
    ``B > 0`` at least one value is dropped at each end even when ``B * n < 1`` (4 models
    with ``B = 0.2``: ``k = 1``), and never so many that nothing is left: ``k`` is at most
    ``(n - 1) // 2``. So with 2 models nothing can be dropped and the rule is their plain
    mean (with two models nobody can tell which one lies); with ``k = (n - 1) // 2`` it is
    the median. ``0 <= B < 0.5``.
``clip:T``
    Norm clipping against our own model: each received model's difference from ours is
    scaled down, if needed, to at most ``T`` times the reference norm, then the usual
    weighted average (samples and staleness) runs on the clipped models. The reference is
    the median of the received models' difference norms, the *lower* middle one for an even
    count, so that with two received models one attacker cannot raise it. One attacker
    among ``n >= 2`` received models therefore moves our model by at most ``T`` times an
    honest difference, times its weight. With one received model the reference is its own
    norm: nothing is clipped. If at least half of the received models equal ours (reference
    0), the others are clipped all the way to ours. ``T > 0``.

Our own model is always one of the inputs and, by convention, the first. Only floating-point
entries are aggregated (in float64, cast back); integer entries such as BatchNorm's
``num_batches_tracked`` are counters and keep our value. The inputs have passed
:meth:`learner.peer.Peer.validate` (same names, shapes and dtypes, all values finite).

Memory: ``median`` and ``trimmed`` stack the ``n`` values of one tensor at a time, so they
need about ``n`` times the largest tensor in float64 on top of the models themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from learner.averaging import weighted_average
from learner.robust_rule import Robust, RobustRule

__all__ = [
    "Robust",
    "RobustReport",
    "RobustRule",
    "aggregate",
    "clip_to_reference",
    "coordinate_median",
    "trimmed_mean",
    "trim_count",
]

State = Mapping[str, torch.Tensor]


@dataclass
class RobustReport:
    """What a merge's rule did, for the log and the ``epoch`` event."""

    rule: str
    """The rule as given (``none``, ``median``, ``trimmed:0.25``, ``clip:2``)."""
    models: int
    """How many models went in, ours included."""
    trimmed_per_end: int | None = None
    """trimmed: values dropped at each end of every coordinate."""
    reference_norm: float | None = None
    """clip: the reference difference norm (the lower median of the received ones)."""
    norms: dict[str, float] = field(default_factory=dict)
    """clip: each received model's difference norm from ours, before clipping."""
    clipped: dict[str, float] = field(default_factory=dict)
    """clip: sender -> the factor (< 1) its difference was scaled by."""

    def describe(self) -> str:
        text = f"rule {self.rule} over {self.models} models"
        if self.trimmed_per_end is not None:
            text += f", {self.trimmed_per_end} dropped at each end"
        if self.reference_norm is not None:
            text += f", reference norm {self.reference_norm:.4g}"
            if self.clipped:
                text += ", clipped " + ", ".join(
                    f"{k[:8]} x{s:.3g} (norm {self.norms[k]:.4g})"
                    for k, s in self.clipped.items())
            else:
                text += ", none clipped"
        return text

    def as_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"rule": self.rule, "models": self.models}
        if self.trimmed_per_end is not None:
            record["trimmed_per_end"] = self.trimmed_per_end
        if self.reference_norm is not None:
            record["reference_norm"] = round(self.reference_norm, 6)
            record["clipped"] = {k: round(s, 6) for k, s in self.clipped.items()}
        return record


def trim_count(n: int, fraction: float) -> int:
    """Values dropped at each end of ``n`` for ``trimmed:fraction`` (see the module text)."""
    if n < 1:
        raise ValueError("trim_count: no models")
    k = math.floor(fraction * n)
    if fraction > 0:
        k = max(k, 1)
    return min(k, (n - 1) // 2)


def _sorted_stack(states: Sequence[State], name: str) -> torch.Tensor:
    return torch.stack([s[name].detach().to("cpu", torch.float64) for s in states]).sort(
        dim=0).values


def _coordinatewise(states: Sequence[State], k: int) -> dict[str, torch.Tensor]:
    """Per coordinate, the mean of the sorted values with ``k`` dropped at each end."""
    if not states:
        raise ValueError("robust merge: no states given")
    first = states[0]
    n = len(states)
    result: dict[str, torch.Tensor] = {}
    for name, reference in first.items():
        if not reference.is_floating_point():
            result[name] = reference.detach().clone()
            continue
        kept = _sorted_stack(states, name)[k:n - k]
        result[name] = kept.mean(dim=0).to(device=reference.device, dtype=reference.dtype)
    return result


def coordinate_median(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """The coordinate-wise median of ``states`` (ours first); for an even count the mean of the
    two middle values. Integer entries are taken from the first state."""
    return _coordinatewise(states, (len(states) - 1) // 2)


def trimmed_mean(states: Sequence[State], fraction: float) -> tuple[dict[str, torch.Tensor], int]:
    """The coordinate-wise trimmed mean and how many values were dropped at each end."""
    k = trim_count(len(states), fraction)
    return _coordinatewise(states, k), k


def _delta_norm(state: State, local: State) -> float:
    total = 0.0
    for name, ours in local.items():
        if ours.is_floating_point():
            diff = state[name].detach().to("cpu", torch.float64) - ours.detach().to(
                "cpu", torch.float64)
            total += float((diff * diff).sum())
    return math.sqrt(total)


def clip_to_reference(local: State, received: Sequence[tuple[str, State]], threshold: float
                      ) -> tuple[list[dict[str, torch.Tensor]], float, dict[str, float],
                                 dict[str, float]]:
    """Scale each received model's difference from ``local`` down to at most ``threshold``
    times the lower median of those differences' norms.

    Returns the clipped states (in ``received``'s order), the reference norm, each sender's
    norm and the factors of the clipped senders (only those scaled by less than 1)."""
    if not received:
        return [], 0.0, {}, {}
    norms = {sender: _delta_norm(state, local) for sender, state in received}
    ordered = sorted(norms.values())
    reference = ordered[(len(ordered) - 1) // 2]
    bound = threshold * reference
    clipped_states: list[dict[str, torch.Tensor]] = []
    factors: dict[str, float] = {}
    for sender, state in received:
        norm = norms[sender]
        factor = 1.0 if norm <= bound else bound / norm
        if factor >= 1.0:
            clipped_states.append(dict(state))
            continue
        factors[sender] = factor
        out: dict[str, torch.Tensor] = {}
        for name, ours in local.items():
            if not ours.is_floating_point():
                out[name] = state[name]
                continue
            base = ours.detach().to("cpu", torch.float64)
            moved = base + factor * (state[name].detach().to("cpu", torch.float64) - base)
            out[name] = moved.to(dtype=ours.dtype)
        clipped_states.append(out)
    return clipped_states, reference, norms, factors


def aggregate(robust: Robust, local: State, local_weight: float,
              received: Sequence[tuple[str, State, float]]
              ) -> tuple[dict[str, torch.Tensor], RobustReport]:
    """Merge ``local`` (ours) with ``received`` (sender, state, weight) by ``robust``.

    NONE and CLIP use the weights (normalized by :func:`weighted_average`); MEDIAN and
    TRIMMED count each model once. The result lives where ``local`` does."""
    report = RobustReport(rule=str(robust), models=1 + len(received))
    states: list[State] = [local, *(state for _, state, _ in received)]
    if robust.rule is RobustRule.NONE:
        merged = weighted_average([(local, local_weight),
                                   *((state, w) for _, state, w in received)])
    elif robust.rule is RobustRule.MEDIAN:
        merged = coordinate_median(states)
    elif robust.rule is RobustRule.TRIMMED:
        merged, report.trimmed_per_end = trimmed_mean(states, robust.param)
    else:
        clipped, report.reference_norm, report.norms, report.clipped = clip_to_reference(
            local, [(sender, state) for sender, state, _ in received], robust.param)
        merged = weighted_average([(local, local_weight),
                                   *((state, w) for state, (_, _, w) in
                                     zip(clipped, received, strict=True))])
    return merged, report
