"""peerlearn's learner: everything that knows about models.

Submodules (import them directly; this package imports nothing heavy on its own):

- :mod:`learner.model` -- the default CNN (the classic PyTorch MNIST net).
- :mod:`learner.data` -- data sets and how they are split among peers.
- :mod:`learner.train` -- training, evaluation, optimizer and device selection.
- :mod:`learner.convert` -- torch state dicts to/from :class:`overlay.wire.NamedArray` lists.
- :mod:`learner.averaging` -- weighted averaging of model states and architecture fingerprints.
"""
