"""Merge weights (samples x staleness), the gate, fan-out neighbours, checkpoints."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch

from learner import checkpoint
from learner.merge import Candidate, MergePolicy, neighbours, plan_merge


def test_weights_are_samples_times_polynomial_staleness() -> None:
    policy = MergePolicy(staleness_exponent=0.5)
    plan = plan_merge(policy, own_epoch=5, own_samples=100, candidates=[
        Candidate("fresh", 5, 100), Candidate("behind3", 2, 100), Candidate("big", 5, 300)])
    raw = {"self": 100, "fresh": 100, "behind3": 100 * (3 + 1) ** -0.5, "big": 300}
    total = sum(raw.values())
    assert plan.weights == pytest.approx({k: v / total for k, v in raw.items()})
    assert plan.refused == {}
    assert sum(plan.weights.values()) == pytest.approx(1.0)


def test_no_decay_and_too_stale() -> None:
    plan = plan_merge(MergePolicy(staleness_exponent=0.0, max_staleness=2), 10, 50,
                      [Candidate("a", 9, 50), Candidate("old", 7, 50)])
    assert plan.weights == pytest.approx({"self": 0.5, "a": 0.5})
    assert plan.refused["old"].startswith("stale: 3 epochs behind")


def test_gate_refuses_clearly_worse_models_and_says_why() -> None:
    scores = {"good": 93.0, "bad": 40.0}
    plan = plan_merge(MergePolicy(gate=True, gate_margin=5.0), 3, 10,
                      [Candidate("good", 3, 10), Candidate("bad", 3, 10)],
                      own_accuracy=95.0, score=scores.__getitem__)
    assert set(plan.weights) == {"self", "good"}
    assert "gate: 40.00%" in plan.refused["bad"] and "95.00%" in plan.refused["bad"]
    assert "refused bad" in plan.describe()


def test_gate_off_never_scores() -> None:
    def boom(_sender: str) -> float:
        raise AssertionError("scored without the gate")

    plan = plan_merge(MergePolicy(), 1, 10, [Candidate("x", 1, 10)], own_accuracy=90.0,
                      score=boom)
    assert set(plan.weights) == {"self", "x"}


def test_neighbours_all_by_default() -> None:
    members = ["a", "b", "c", "d"]
    assert neighbours(members, "b", 1, None, 7) == (["a", "c", "d"], ["a", "c", "d"])
    assert neighbours(members, "b", 1, 3, 7) == (["a", "c", "d"], ["a", "c", "d"])


@pytest.mark.parametrize("n,k", [(5, 1), (8, 2), (12, 3)])
def test_fanout_ring_is_consistent_and_linear(n: int, k: int) -> None:
    members = [f"p{i:02d}" for i in range(n)]
    for epoch in (1, 2, 3):
        plans = {m: neighbours(members, m, epoch, k, 42) for m in members}
        sent = Counter()
        for me, (send_to, expect_from) in plans.items():
            assert len(send_to) == len(expect_from) == k and me not in send_to
            sent.update((me, t) for t in send_to)
        # everybody expects exactly the peers that send to it: nobody waits in vain
        for me, (_, expect_from) in plans.items():
            assert sorted(expect_from) == sorted(s for s, t in sent if t == me)
        assert sum(sent.values()) == n * k  # linear, not n * (n - 1)
    # the neighbours change from epoch to epoch
    rounds = [tuple(neighbours(members, "p00", e, k, 42)[0]) for e in range(1, 6)]
    assert len(set(rounds)) > 1


def test_fanout_rejects_zero() -> None:
    with pytest.raises(ValueError, match="fanout"):
        neighbours(["a", "b", "c"], "a", 1, 0, 1)


def _ckpt(epoch: int, fp: str = "fp") -> checkpoint.Checkpoint:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adadelta(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.7)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    return checkpoint.Checkpoint(epoch, epoch - 1, fp, model.state_dict(), opt.state_dict(),
                                 sched.state_dict())


def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "peer.ckpt"
    assert checkpoint.load(path, "fp") is None
    saved = _ckpt(4)
    checkpoint.save(path, saved)
    loaded = checkpoint.load(path, "fp")
    assert loaded is not None and (loaded.epoch, loaded.epochs_trained) == (4, 3)
    for name, tensor in saved.model.items():
        assert torch.equal(loaded.model[name], tensor)
    assert loaded.scheduler["last_epoch"] == 1
    assert checkpoint.load(path, "other-architecture") is None
    assert not list(path.parent.glob(".*.tmp"))  # written atomically, nothing left over
    path.write_bytes(path.read_bytes()[:50])  # truncated: ignored, not a crash
    assert checkpoint.load(path, "fp") is None


def test_pairs_are_symmetric_over_members_order() -> None:
    members = ["c", "a", "d", "b", "e"]
    for perm in itertools.islice(itertools.permutations(members), 5):
        assert neighbours(list(perm), "a", 3, 2, 9) == neighbours(members, "a", 3, 2, 9)


def test_merge_received_merges_by_the_plan_and_restore_loads_the_training_state(
        tmp_path: Path) -> None:
    import torch

    from learner.merge import merge_received
    from learner.model import build_model
    from learner.train import make_optimizer, make_scheduler

    class _In:  # what the merge reads of a received model
        def __init__(self, epoch: int, state: dict[str, torch.Tensor]) -> None:
            self.epoch, self.samples, self.state = epoch, 100, state

    model = build_model(1)
    other = {k: (v + 1 if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan, merged = merge_received(MergePolicy(), model, 1, 100, {"x": _In(1, other)},
                                  self_key="me", val_loader=None, device=torch.device("cpu"))
    assert merged == ["x"] and plan.weights == {"me": 0.5, "x": 0.5}
    name = next(k for k, v in before.items() if v.is_floating_point())
    assert torch.allclose(model.state_dict()[name], before[name] + 0.5)
    optimizer, scheduler = make_optimizer(model), make_scheduler(make_optimizer(model))
    path = tmp_path / "c.ckpt"
    checkpoint.save_training(path, 5, 3, "fp", model, optimizer, scheduler)
    fresh = build_model(2)
    ckpt = checkpoint.restore(path, "fp", fresh, make_optimizer(fresh),
                              make_scheduler(make_optimizer(fresh)))
    assert ckpt is not None and (ckpt.epoch, ckpt.epochs_trained) == (5, 3)
    assert torch.equal(fresh.state_dict()[name], model.state_dict()[name])
    assert checkpoint.restore(path, "other", fresh, optimizer, scheduler) is None
