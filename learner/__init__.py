"""peerlearn's learner: everything that knows about models.

The Python API, for starting a peer from your own script with your own model and data::

    import asyncio
    from learner import PeerConfig, run_peer

    config = PeerConfig(num=0, total=3, rendezvous="RENDEZVOUS_HOST:5555",
                        model_factory=MyNet, train_set=my_train, test_set=my_test)
    summary = asyncio.run(run_peer(config))

Submodules:

- :mod:`learner.config` -- the peer's configuration, in sections (data, train, merge,
  network, closed job, files); :mod:`learner.options` builds ``peerlearn peer`` from it.
- :mod:`learner.peer` -- the peer's main loop; beside it :mod:`learner.exchange` (sending
  and collecting models), :mod:`learner.bootstrap` (a newcomer's first model),
  :mod:`learner.events` (the JSON event log) and :mod:`learner.prepare` (model, data, limits).
- :mod:`learner.model` -- the default CNN (the classic PyTorch MNIST net).
- :mod:`learner.data`, :mod:`learner.partition` -- data sets and how they are split
  (:mod:`learner.digits`, :mod:`learner.imagefolder`, :mod:`learner.datafiles` hold the loaders).
- :mod:`learner.plugins` -- ``module:function`` hooks for your own data and model.
- :mod:`learner.train` -- training, evaluation, optimizer and device selection.
- :mod:`learner.merge` -- merge weights (samples, staleness), the gate, the merge step,
  fan-out neighbours; :mod:`learner.robust` the robust rules (:mod:`learner.robust_rule`
  names them).
- :mod:`learner.averaging` -- weighted averaging of model states, architecture fingerprints.
- :mod:`learner.convert` -- torch state dicts to/from :class:`overlay.wire.NamedArray` lists.
- :mod:`learner.checkpoint` -- local checkpoints for resuming.

Names are imported lazily, so ``import learner`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PeerConfig": "learner.config",
    "DataConfig": "learner.config",
    "TrainConfig": "learner.config",
    "MergeConfig": "learner.config",
    "NetworkConfig": "learner.config",
    "JobAccessConfig": "learner.config",
    "FilesConfig": "learner.config",
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
