"""Robust merge rules (learner.robust) on exact small tensors, and one real swarm with a
poisoning peer: with the median, the honest peers end where they end without it."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from learner.config import PeerConfig
from learner.merge import Candidate, MergePolicy, plan_merge
from learner.robust import (
    Robust,
    RobustRule,
    aggregate,
    clip_to_reference,
    coordinate_median,
    trim_count,
    trimmed_mean,
)
from peerlearn.cli import build_parser
from testkit.attacker import Attack
from testkit.swarm import LocalSwarm


def _state(w: list[float], count: int = 0) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w, dtype=torch.float32),
            "num_batches_tracked": torch.tensor(count, dtype=torch.int64)}


HONEST = [_state([1.0, 2.0, 3.0], 7), _state([1.2, 1.8, 3.1], 9), _state([0.8, 2.2, 2.9], 11)]
SCALED = {k: v * 100 if v.is_floating_point() else v for k, v in HONEST[1].items()}
RANDOM = _state([-40.0, 55.0, 13.0], 99)  # what normal noise x 30 could look like


# ---- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, rule, param", [
    ("none", RobustRule.NONE, 0.0), ("median", RobustRule.MEDIAN, 0.0),
    ("trimmed:0.25", RobustRule.TRIMMED, 0.25), ("trimmed:0", RobustRule.TRIMMED, 0.0),
    ("clip:2", RobustRule.CLIP, 2.0), ("MEDIAN", RobustRule.MEDIAN, 0.0)])
def test_parse(text: str, rule: RobustRule, param: float) -> None:
    robust = Robust.parse(text)
    assert (robust.rule, robust.param) == (rule, param)
    assert Robust.parse(str(robust)) == robust


@pytest.mark.parametrize("text, message", [
    ("mean", "unknown robust rule 'mean'"), ("trimmed", "trimmed needs a parameter"),
    ("trimmed:0.5", "0 <= B < 0.5"), ("trimmed:-0.1", "0 <= B < 0.5"),
    ("trimmed:x", "'x' is not a number"), ("clip:0", "T > 0"), ("clip:inf", "T > 0"),
    ("clip:nan", "T > 0"), ("median:3", "median takes no parameter")])
def test_parse_refuses_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Robust.parse(text)


def test_cli_flag_fills_the_peer_config() -> None:
    args = build_parser().parse_args(["peer", "--num", "0", "--total", "2", "--rendezvous",
                                      "h:1", "--robust", "trimmed:0.25"])
    assert args.robust == Robust(RobustRule.TRIMMED, 0.25)
    default = build_parser().parse_args(["peer", "--num", "0", "--total", "2", "--rendezvous",
                                         "h:1"])
    assert default.robust == Robust() and PeerConfig(0, 1, "h:1").robust == Robust()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["peer", "--num", "0", "--total", "2", "--rendezvous",
                                   "h:1", "--robust", "clip:-1"])


# ---- the rules ---------------------------------------------------------------------------


def test_median_odd_and_even_and_integer_entries_stay_ours() -> None:
    three = coordinate_median(HONEST)
    assert torch.equal(three["w"], torch.tensor([1.0, 2.0, 3.0]))
    assert three["num_batches_tracked"].item() == 7  # ours (the first), not a median
    four = coordinate_median([*HONEST, SCALED])
    # per coordinate the middle two of four: (1.0+1.2)/2, (2.0+2.2)/2, (3.0+3.1)/2
    assert torch.allclose(four["w"], torch.tensor([1.1, 2.1, 3.05]))
    assert four["w"].dtype == torch.float32


def test_median_ignores_a_scaled_and_a_random_attacker() -> None:
    for attacker in (SCALED, RANDOM):
        merged = coordinate_median([*HONEST, attacker])
        low = torch.stack([s["w"] for s in HONEST]).min(0).values
        high = torch.stack([s["w"] for s in HONEST]).max(0).values
        assert bool((merged["w"] >= low).all() and (merged["w"] <= high).all())


@pytest.mark.parametrize("n, fraction, k", [
    (1, 0.25, 0), (2, 0.25, 0), (2, 0.4, 0), (3, 0.1, 1), (4, 0.25, 1), (4, 0.1, 1),
    (5, 0.25, 1), (8, 0.25, 2), (10, 0.49, 4), (9, 0.49, 4), (4, 0.0, 0)])
def test_trim_count(n: int, fraction: float, k: int) -> None:
    assert trim_count(n, fraction) == k


def test_trimmed_mean_drops_one_at_each_end() -> None:
    merged, k = trimmed_mean([*HONEST, SCALED], 0.25)
    assert k == 1
    assert torch.allclose(merged["w"], torch.tensor([1.1, 2.1, 3.05]))
    five, k = trimmed_mean([*HONEST, SCALED, RANDOM], 0.2)
    # per coordinate: drop the lowest and the highest of five, mean of three; with two
    # attackers among five and one dropped at each end, one of them gets in where both lie high
    assert k == 1
    assert torch.allclose(five["w"], torch.tensor([(0.8 + 1.0 + 1.2) / 3, (2.0 + 2.2 + 55) / 3,
                                                   (3.0 + 3.1 + 13) / 3]))
    plain, k = trimmed_mean(HONEST[:2], 0.25)  # two models: nothing to drop, their mean
    assert k == 0 and torch.allclose(plain["w"], torch.tensor([1.1, 1.9, 3.05]))


def test_clip_scales_the_outlier_to_the_median_norm() -> None:
    ours = _state([0.0, 0.0, 0.0])
    a, b, c = _state([3.0, 4.0, 0.0]), _state([0.0, 0.0, 5.0]), _state([300.0, 400.0, 0.0])
    clipped, reference, norms, factors = clip_to_reference(
        ours, [("a", a), ("b", b), ("c", c)], 1.0)
    assert norms == {"a": 5.0, "b": 5.0, "c": 500.0}
    assert reference == 5.0  # the middle of 5, 5, 500
    assert factors == {"c": 5.0 / 500.0}
    assert torch.allclose(clipped[2]["w"], torch.tensor([3.0, 4.0, 0.0]))
    assert clipped[0]["w"] is a["w"] and clipped[1]["w"] is b["w"]  # untouched
    _, _, _, loose = clip_to_reference(ours, [("a", a), ("b", b), ("c", c)], 200.0)
    assert loose == {}  # 500 <= 200 * 5


def test_clip_reference_is_the_lower_middle_for_two_models() -> None:
    ours = _state([1.0, 1.0, 1.0])
    honest = _state([1.0, 1.0, 2.0])
    attacker = {k: v * 50 if v.is_floating_point() else v for k, v in honest.items()}
    _, reference, _, factors = clip_to_reference(ours, [("h", honest), ("x", attacker)], 2.0)
    assert reference == 1.0 and set(factors) == {"x"}
    _, _, _, none = clip_to_reference(ours, [("x", attacker)], 2.0)
    assert none == {}  # a single model is its own reference: nothing to compare it with


def test_aggregate_none_is_the_weighted_average_and_clip_keeps_weights() -> None:
    ours = _state([0.0, 0.0, 0.0], 5)
    merged, report = aggregate(Robust(), ours, 1.0, [("a", _state([4.0, 4.0, 4.0]), 3.0)])
    assert torch.allclose(merged["w"], torch.tensor([3.0, 3.0, 3.0]))
    assert report.as_record() == {"rule": "none", "models": 2}
    received = [("a", _state([3.0, 4.0, 0.0]), 1.0), ("b", _state([0.0, 0.0, 5.0]), 1.0),
                ("c", _state([300.0, 400.0, 0.0]), 2.0)]
    merged, report = aggregate(Robust.parse("clip:1"), ours, 1.0, received)
    # weights 1/5, 1/5, 1/5, 2/5 over ours, a, b, c clipped to (3, 4, 0)
    assert torch.allclose(merged["w"], torch.tensor([(3 + 6) / 5, (4 + 8) / 5, 5 / 5]))
    assert merged["num_batches_tracked"].item() == 5
    assert report.clipped == {"c": 0.01} and report.reference_norm == 5.0
    assert report.as_record()["clipped"] == {"c": 0.01}
    assert "clipped c x0.01 (norm 500)" in report.describe()


def test_aggregate_median_and_trimmed_count_models_not_weights() -> None:
    received = [("b", HONEST[1], 1000.0), ("c", HONEST[2], 1.0), ("x", SCALED, 1.0)]
    merged, report = aggregate(Robust.parse("median"), HONEST[0], 1.0, received)
    assert torch.allclose(merged["w"], torch.tensor([1.1, 2.1, 3.05]))
    assert report.as_record() == {"rule": "median", "models": 4}
    merged, report = aggregate(Robust.parse("trimmed:0.25"), HONEST[0], 1.0, received)
    assert torch.allclose(merged["w"], torch.tensor([1.1, 2.1, 3.05]))
    assert report.trimmed_per_end == 1
    # without a defence the scaled model takes the average far away
    merged, _ = aggregate(Robust(), HONEST[0], 1.0, received[2:])
    assert merged["w"][1].item() > 50


def test_attacker_corrupts_floats_only_and_repeatably() -> None:
    state = _state([1.0, -2.0, 0.5], 3)
    scaled = Attack.parse("scale:50").corrupt(state, 1)
    assert torch.equal(scaled["w"], torch.tensor([50.0, -100.0, 25.0]))
    assert scaled["num_batches_tracked"].item() == 3
    noise = Attack.parse("random")
    assert torch.equal(noise.corrupt(state, 2)["w"], noise.corrupt(state, 2)["w"])
    assert not torch.equal(noise.corrupt(state, 2)["w"], noise.corrupt(state, 3)["w"])
    with pytest.raises(ValueError, match="scale:S or random"):
        Attack.parse("scale")


def test_plan_carries_the_rule_report_into_its_description() -> None:
    plan = plan_merge(MergePolicy(robust=Robust.parse("median")), 2, 100,
                      [Candidate("b" * 64, 2, 100)], self_key="me")
    assert plan.robust is None  # planning does not merge
    _, plan.robust = aggregate(Robust.parse("median"), HONEST[0], 0.5,
                               [("b" * 64, HONEST[1], 0.5)])
    assert "rule median over 2 models" in plan.describe("me")


# ---- a real swarm with a poisoning peer ---------------------------------------------------

EPOCHS = 2
TOTAL = 8  # shards of 1,000 training digits; peers 0-2 honest, 3 the attacker in runs B and C
# the small MLP of the examples on the real digits: the CNN would take minutes per run here
MODEL = ("--model", "examples.my_model:factory")
RUNS = {"A": ("none", None), "B": ("median", "random"), "C": ("none", "random")}


def _start(swarm: LocalSwarm, robust: str, attack: str | None) -> None:
    swarm.start_rendezvous()
    peers = 3 if attack is None else 4
    # the same job name in every run: the same initial weights and shuffles
    common = ("--job", "poison", "--min-peers", str(peers), "--merge-wait", "120",
              "--robust", robust, *MODEL)
    for num in range(3):
        swarm.start_peer(num, TOTAL, EPOCHS, *common)
    if attack is not None:
        swarm.start_peer(3, TOTAL, EPOCHS, *common, "--attack", attack,
                         module="testkit.attacker")


def _honest_final(swarm: LocalSwarm, robust: str, attack: str | None) -> dict[int, float]:
    """Final after-averaging accuracy of the honest peers 0-2."""
    codes = swarm.wait_peers(300)
    assert all(code == 0 for code in codes.values()), codes
    final = {}
    for num in range(3):
        records = swarm.events(num, "epoch")
        assert len(records) == EPOCHS
        expected = 2 if attack is None else 3
        assert all(len(r["merged_from"]) == expected for r in records), records
        assert all(r["robust"]["rule"] == robust for r in records)
        final[num] = records[-1]["acc_after"]
    return final


@pytest.mark.slow
def test_median_keeps_honest_peers_on_course_against_a_poisoning_peer(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A: 3 honest peers; B: the same + an attacker sending random weights, median merge;
    C: the same attacker, plain average. The three swarms run side by side."""
    root = str(Path(__file__).resolve().parents[1])  # `-m testkit.attacker`, any cwd
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    started = time.monotonic()
    runs: dict[str, dict[int, float]] = {}
    with contextlib.ExitStack() as stack:
        swarms = {name: stack.enter_context(LocalSwarm(tmp_path_factory.mktemp(f"run-{name}")))
                  for name in RUNS}
        for name, (robust, attack) in RUNS.items():
            _start(swarms[name], robust, attack)
        for name, (robust, attack) in RUNS.items():
            try:
                runs[name] = _honest_final(swarms[name], robust, attack)
            except AssertionError:
                for log in ("peer-0", "peer-3"):
                    print(f"===== run {name} {log} =====\n{swarms[name].log(log)[-4000:]}")
                raise
        assert "sending a poisoned model" in swarms["B"].log("peer-3")
        assert "rule median over 4 models" in swarms["B"].log("peer-0")
    a, b, c = (statistics.fmean(runs[n].values()) for n in RUNS)
    print(f"honest final accuracy: A (no attacker) {a:.2f}, B (attacker, median) {b:.2f}, "
          f"C (attacker, no defence) {c:.2f}; {time.monotonic() - started:.0f} s")
    assert abs(a - b) <= 1.0, runs
    assert c < a - 20, runs  # the attack does real damage without a defence
