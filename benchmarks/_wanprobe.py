"""One side of a benchmarks/wan.py measurement, run inside a NAT-lab namespace.

    python benchmarks/_wanprobe.py --shapes FILE.json [--lanes N] MODE --rendezvous IP:PORT ...

The same processes as ``benchmarks/_natprobe.py`` (``ours-*``: two :class:`overlay.host.Host`
peers, ``Host.send_model`` acknowledged after digest and signature checks; ``bare-*``: one bare
aiortc data channel with explicit ``iceServers`` from the rendezvous), but the payload is the
state dict described by ``--shapes``: a JSON list of ``[name, [dims...]]`` (float32 arrays of
that shape, random values), e.g. the 4.8 MB CNN or a ResNet-18-sized state dict, and one
``send_model`` may take up to :data:`SEND_TIMEOUT` (big payloads on slow uplinks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _natprobe  # noqa: E402

from overlay.host import HostConfig  # noqa: E402

SEND_TIMEOUT = 900.0
"""Bound on one ``Host.send_model`` (``_natprobe`` uses 120 s: too short for 46.8 MB on a
5 Mbit/s uplink); the deadline of the whole pair (``--deadline``) still applies."""


LANES: int | None = None
"""``--lanes N`` (before MODE): WebRTC peer connections per link; None: HostConfig's."""


def _config(**kw: Any) -> HostConfig:
    kw["send_timeout"] = max(float(kw.get("send_timeout", 0.0)), SEND_TIMEOUT)
    if LANES is not None:
        kw["lanes"] = LANES
    return HostConfig(**kw)


def load_shapes(path: str) -> list[tuple[str, tuple[int, ...]]]:
    """The ``[[name, [dims...]], ...]`` list in ``path``, checked."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, list) or not raw:
        raise SystemExit(f"{path}: expected a non-empty list of [name, [dims...]]")
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for item in raw:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], list)
                or not all(isinstance(d, int) and d > 0 for d in item[1])):
            raise SystemExit(f"{path}: bad entry {item!r} (want [name, [positive ints]])")
        shapes.append((item[0], tuple(item[1])))
    return shapes


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[0] != "--shapes":
        raise SystemExit("usage: _wanprobe.py --shapes FILE.json MODE [natprobe options]")
    _natprobe.SHAPES = load_shapes(argv[1])
    argv = argv[2:]
    if len(argv) >= 2 and argv[0] == "--lanes":
        global LANES
        LANES = int(argv[1])
        argv = argv[2:]
    setattr(_natprobe, "HostConfig", _config)  # noqa: B010 (its ours_send reads this name)
    sys.argv = [sys.argv[0], *argv]
    _natprobe.main()


if __name__ == "__main__":
    main()
