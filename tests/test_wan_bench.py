"""Smoke test of benchmarks/wan.py so the benchmark cannot rot: its option checks and payload
shapes, and one tiny real run (one profile, the direct WebRTC path, the CNN once, no swarm, no
target cases) in the NAT lab. Figures are not judged here (that is the benchmark's job)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.fixtures import skip_unless_lab

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import _wanshapes  # noqa: E402
import wan  # noqa: E402


def test_payload_shapes() -> None:
    assert _wanshapes.nbytes(_wanshapes.cnn_shapes()) == 4_799_528
    # torchvision's resnet18: 11,699,112 float values
    assert _wanshapes.nbytes(_wanshapes.resnet18_shapes()) == 46_796_448
    assert _wanshapes.nbytes(_wanshapes.flat_shapes(1_000_000)) == 1_000_000
    with pytest.raises(ValueError, match="too small"):
        _wanshapes.flat_shapes(8)


@pytest.mark.parametrize("argv, message", [
    (["--profiles", "moon"], "unknown or no profile"),
    (["--paths", "carrier-pigeon"], "unknown or no path"),
    (["--sizes", "gpt"], "unknown or no size"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--target-mb", "0"], "--target-mb must be"),
])
def test_bad_options_are_refused(argv: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        wan.parse(argv)
    assert message in capsys.readouterr().err


def test_quick_mode_is_small() -> None:
    args = wan.parse(["--quick"])
    assert (args.profiles, args.sizes, args.repeats) == (["cable"], ["cnn"], 1)


@pytest.mark.slow
def test_one_tiny_run_ends_in_one_json_line() -> None:
    skip_unless_lab(coturn=True, links=True)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "wan.py"), "--profiles", "fiber",
         "--paths", "direct", "--sizes", "cnn", "--repeats", "1", "--skip-swarm",
         "--skip-targets"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.splitlines()[-1])
    (link,) = figures["links"]
    assert link["profile"] == "fiber" and link["path"] == "direct"
    assert link["kind"] in ("webrtc-direct", "webrtc-relay"), proc.stderr[-3000:]
    assert link["deliveries"]["cnn"]["bytes"] == 4_799_528
    assert link["ours_mb_s"] > 0 and link["tcp"]["cubic"] > 0 and link["tcp"]["bbr"] > 0
    assert link["bare_mb_s"] > 0
    assert "webrtc_lanes_param" in figures["lanes"]
