"""Which received models go into a merge, and with which weights.

A received model's weight is its training-sample count times a staleness factor: a model
``s`` epochs behind ours counts ``(s + 1) ** -a`` as much (FedAsync's polynomial staleness
function, Xie et al. 2019; ``a = 0`` ignores staleness). Our own model has staleness 0.
An optional gate refuses a model that scores clearly worse than ours on a small local
validation split (a cheap guard against broken or hostile peers). An optional robust rule
(:mod:`learner.robust`: coordinate-wise median, trimmed mean, or norm clipping against our
model) then combines what the plan admitted, so that one poisoned model cannot drag the merge.

Fan-out (``fanout = k``: each peer sends to ``k`` neighbours instead of to everybody, on a graph
every peer derives alone, so each one knows whose models to wait for) is :mod:`learner.graph`;
``neighbours`` is re-exported here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from learner.graph import neighbours as neighbours  # re-exported (callers, tests)
from learner.robust import Robust, RobustReport, aggregate

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from learner.exchange import Incoming


@dataclass(frozen=True)
class MergePolicy:
    """How received models are weighted and filtered."""

    staleness_exponent: float = 0.5
    """``a`` in ``(staleness + 1) ** -a``; 0 weighs stale models like fresh ones."""
    max_staleness: int = 10
    """Models more epochs behind than this are refused."""
    gate: bool = False
    """Refuse models that score clearly worse than ours on the local validation split."""
    gate_margin: float = 5.0
    """How many accuracy points worse than ours a model may be before the gate refuses it."""
    robust: Robust = Robust()
    """How the admitted models are combined: the weighted average (none), or a robust rule."""

    def staleness_factor(self, staleness: int) -> float:
        return float((max(0, staleness) + 1) ** -self.staleness_exponent)


@dataclass(frozen=True)
class Candidate:
    """A received model as the merge sees it."""

    sender: str
    epoch: int
    samples: int


@dataclass
class MergePlan:
    """The outcome: normalized weights of what goes in (ours under ``self_key``) and reasons
    for what was refused."""

    weights: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    robust: RobustReport | None = None
    """What the merge rule did; None until the models were merged."""

    def describe(self, self_key: str = "self") -> str:
        parts = [f"{'ours' if k == self_key else k[:8]} {w:.3f}" for k, w in self.weights.items()]
        text = "weights " + ", ".join(parts)
        if self.refused:
            text += "; refused " + ", ".join(f"{k[:8]} ({r})" for k, r in self.refused.items())
        if self.robust is not None and self.robust.rule != "none":
            text += "; " + self.robust.describe()
        return text


def plan_merge(
    policy: MergePolicy,
    own_epoch: int,
    own_samples: int,
    candidates: Sequence[Candidate],
    *,
    own_accuracy: float | None = None,
    score: Callable[[str], float] | None = None,
    self_key: str = "self",
) -> MergePlan:
    """Decide the weights. ``score(sender)`` (validation accuracy of that sender's model) is
    only called when the gate is on and ``own_accuracy`` is known."""
    plan = MergePlan()
    raw: dict[str, float] = {self_key: float(own_samples)}
    for cand in candidates:
        staleness = own_epoch - cand.epoch
        if staleness > policy.max_staleness:
            plan.refused[cand.sender] = f"stale: {staleness} epochs behind"
            continue
        if policy.gate and own_accuracy is not None and score is not None:
            accuracy = score(cand.sender)
            if accuracy < own_accuracy - policy.gate_margin:
                plan.refused[cand.sender] = (
                    f"gate: {accuracy:.2f}% on validation < ours {own_accuracy:.2f}% "
                    f"- {policy.gate_margin:g}"
                )
                continue
        raw[cand.sender] = cand.samples * policy.staleness_factor(staleness)
    total = sum(raw.values())
    plan.weights = {k: v / total for k, v in raw.items()} if total > 0 else {self_key: 1.0}
    return plan


def merge_received(policy: MergePolicy, model: nn.Module, epoch: int, samples: int,
                   received: Mapping[str, Incoming], *, self_key: str,
                   val_loader: DataLoader[Any] | None, device: torch.device
                   ) -> tuple[MergePlan, list[str]]:
    """Plan the weights (staleness, gate) and merge ``received`` into ``model`` by the
    policy's rule; returns the plan and the senders merged. Runs in a worker thread."""
    from learner.train import evaluate  # torch

    own_accuracy = None
    if policy.gate and val_loader is not None and received:
        own_accuracy = float(evaluate(model, val_loader, device)["accuracy"])

    def score(sender: str) -> float:
        assert val_loader is not None
        probe = copy.deepcopy(model)
        probe.load_state_dict(received[sender].state)
        return float(evaluate(probe, val_loader, device)["accuracy"])

    plan = plan_merge(
        policy, epoch, samples,
        [Candidate(pid, m.epoch, m.samples) for pid, m in received.items()],
        own_accuracy=own_accuracy, score=score, self_key=self_key)
    merged = [pid for pid in plan.weights if pid != self_key]
    if merged:
        state, plan.robust = aggregate(
            policy.robust, model.state_dict(), plan.weights[self_key],
            [(pid, received[pid].state, plan.weights[pid]) for pid in merged])
        model.load_state_dict(state)
    return plan, merged


