"""The rendezvous: introduces peers of a job to each other (aiohttp, no torch, no numpy).

- ``server``: ``RendezvousServer`` (start, close, the reaper), ``run_rendezvous`` (in-process,
  an async context manager on port 0), ``serve`` (a process until SIGINT/SIGTERM, ready file);
- ``session``: the WebSocket session at ``/ws`` (challenge, join, welcome, messages, relay);
- ``admission``: who may join (the job's policy) and where it is reachable (dial-back);
- ``connection``: one WebSocket: its session's stage and its outbox (back-pressure);
- ``http``: ``/healthz``, ``/peers`` and the ``/`` dashboard;
- ``registry``: jobs and members (pure data); ``ratelimit``: token buckets;
- ``stun``: the STUN binding server (and a client's request/response); ``turn``: TURN REST
  credentials; ``config``: ``RendezvousConfig``; ``options``: the command line.
"""

from rendezvous.config import RendezvousConfig
from rendezvous.registry import Registry
from rendezvous.server import RendezvousServer, run_rendezvous, serve

__all__ = ["Registry", "RendezvousConfig", "RendezvousServer", "run_rendezvous", "serve"]
