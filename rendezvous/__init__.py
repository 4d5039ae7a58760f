"""The rendezvous: introduces peers of a job to each other (aiohttp, no torch, no numpy)."""

from rendezvous.config import RendezvousConfig
from rendezvous.registry import Registry
from rendezvous.server import RendezvousServer, run_rendezvous, serve

__all__ = ["Registry", "RendezvousConfig", "RendezvousServer", "run_rendezvous", "serve"]
