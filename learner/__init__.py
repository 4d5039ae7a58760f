"""peerlearn's learner: everything that knows about models.

The Python API, for starting a peer from your own script with your own model and data::

    import asyncio
    from learner import PeerConfig, run_peer

    config = PeerConfig(num=0, total=3, rendezvous="RENDEZVOUS_HOST:5555",
                        model_factory=MyNet, train_set=my_train, test_set=my_test)
    summary = asyncio.run(run_peer(config))

Submodules:

- :mod:`learner.peer` -- the peer's main loop and its configuration.
- :mod:`learner.model` -- the default CNN (the classic PyTorch MNIST net).
- :mod:`learner.data`, :mod:`learner.partition` -- data sets and how they are split.
- :mod:`learner.plugins` -- ``module:function`` hooks for your own data and model.
- :mod:`learner.train` -- training, evaluation, optimizer and device selection.
- :mod:`learner.merge` -- merge weights (samples, staleness), the gate, fan-out neighbours.
- :mod:`learner.averaging` -- weighted averaging of model states, architecture fingerprints.
- :mod:`learner.convert` -- torch state dicts to/from :class:`overlay.wire.NamedArray` lists.
- :mod:`learner.checkpoint` -- local checkpoints for resuming.

Names are imported lazily, so ``import learner`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PeerConfig": "learner.peer",
    "Peer": "learner.peer",
    "run_peer": "learner.peer",
    "build_model": "learner.model",
    "Net": "learner.model",
    "load_dataset": "learner.data",
    "DatasetError": "learner.data",
    "MergePolicy": "learner.merge",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'learner' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
