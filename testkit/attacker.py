"""A poisoning peer, for the robust-merge test and the ``poisoning`` benchmark; not a feature.

    python -m testkit.attacker peer --num 3 --total 4 --rendezvous ... --attack scale:50

Besides ``--attack SPEC``, the arguments are an ordinary ``peerlearn peer`` command line
(``LocalSwarm.start_peer(..., "--attack", SPEC, module="testkit.attacker")``). The process
runs the real :class:`learner.peer.Peer` (a member of the job with a valid key and signatures,
trained on its own shard, merging what it receives) but corrupts every model it *sends* and
*serves* (:meth:`Peer._outgoing`, the model copied out before it is encoded):

``scale:S``
    every floating-point entry multiplied by ``S``;
``random``
    every floating-point entry replaced by standard-normal noise of the same shape (seeded per
    epoch, so runs are repeatable).

Only the merge rule of the receivers can defend against it. Run it from the repository root
(``-m testkit.attacker``; the testkit is not installed).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

import learner.peer
from learner.convert import state_to_arrays
from learner.peer import Peer, PeerConfig
from overlay.models import OutgoingModel
from peerlearn import cli

log = logging.getLogger("peerlearn.attacker")


@dataclass(frozen=True)
class Attack:
    """What the attacker does to the model it sends."""

    kind: str
    """``scale`` or ``random``."""
    factor: float = 1.0
    """scale: the multiplier."""

    @classmethod
    def parse(cls, text: str) -> Attack:
        kind, sep, value = text.partition(":")
        if kind == "random" and not sep:
            return cls("random")
        if kind == "scale" and sep:
            try:
                return cls("scale", float(value))
            except ValueError:
                pass
        raise ValueError(f"--attack must be scale:S or random, got {text!r}")

    def corrupt(self, state: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(1_000 + epoch)
        out = {}
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                out[name] = tensor
            elif self.kind == "scale":
                out[name] = tensor.detach().cpu() * self.factor
            else:
                out[name] = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        return out


class AttackingPeer(Peer):
    """A real peer whose outgoing models are corrupted by ``attack``."""

    def __init__(self, config: PeerConfig, attack: Attack) -> None:
        super().__init__(config)
        self.attack = attack

    def _outgoing(self, epoch: int, codec: str) -> OutgoingModel:
        honest = super()._outgoing(epoch, codec)
        state = self.attack.corrupt(self.model.state_dict(), epoch)
        log.info("epoch %d: sending a poisoned model (%s)", epoch, self.attack)
        return replace(honest, arrays=state_to_arrays(state, copy=True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        usage="python -m testkit.attacker peer [peerlearn peer options] --attack SPEC")
    parser.add_argument("--attack", required=True, help="scale:S or random")
    args, rest = parser.parse_known_args(argv)
    try:
        attack = Attack.parse(args.attack)
    except ValueError as exc:
        parser.error(str(exc))
    if not rest or rest[0] != "peer":
        parser.error("give a `peer ...` command line besides --attack")

    async def run_attacker(config: PeerConfig) -> dict[str, Any]:
        return await AttackingPeer(config, attack).run()

    # the CLI fills in the PeerConfig exactly as for `peerlearn peer` and calls run_peer, which
    # it looks up in learner.peer at call time: this process runs the attacker instead
    learner.peer.run_peer = run_attacker
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
