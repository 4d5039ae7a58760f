"""The ``peerlearn`` command line: rendezvous, peer, demo."""
