"""--codec auto's rule (learner.codec_choice): per link kind and measured throughput."""

from __future__ import annotations

from learner.codec_choice import MIN_MEASURED, Throughput, pick_codec
from overlay.transport.base import LinkKind


def test_the_rule_by_link_kind_and_throughput() -> None:
    assert pick_codec(LinkKind.ZMQ, None) == "raw"
    assert pick_codec(LinkKind.ZMQ, 50e6) == "raw"
    assert pick_codec(LinkKind.ZMQ, 5e6) == "fp16"
    assert pick_codec(LinkKind.ZMQ, 1e6) == "int8"
    assert pick_codec(LinkKind.WEBRTC_DIRECT, None) == "fp16"
    assert pick_codec(LinkKind.WEBRTC_DIRECT, 50e6) == "fp16"
    assert pick_codec(LinkKind.WEBRTC_DIRECT, 1e6) == "int8"
    assert pick_codec(LinkKind.WEBRTC_RELAY, 100e6) == "int8"  # the relay always gets int8
    assert pick_codec(None, None) == "fp16"


def test_throughput_averages_and_ignores_small_deliveries() -> None:
    t = Throughput(alpha=0.5)
    t.record("a", MIN_MEASURED - 1, 0.001)  # latency, not throughput
    assert t.get("a") is None
    t.record("a", 4_000_000, 1.0)
    t.record("a", 4_000_000, 0.5)
    assert t.get("a") == 6e6  # 0.5 * 8e6 + 0.5 * 4e6
    t.record("a", 4_000_000, 0.0)  # nonsense durations are ignored
    assert t.get("a") == 6e6
    t.forget("a")
    assert t.get("a") is None
