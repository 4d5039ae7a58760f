"""Real NATs on one Linux machine: network namespaces, veth pairs, a bridge and nftables.

The topology (see ``docs/natlab.md`` and ``/work/shared/NATLAB.md``)::

    [host ns 10.0.K.2] --lan-- [router ns 10.0.K.1 | 203.0.113.N] --wan-- br0 (internet ns)
                                                   public/server ns 203.0.113.M --/

Every interface is created directly inside a namespace of the lab, so nothing ever appears in
(or is routed from) the root namespace; deleting the lab's namespaces deletes everything it made.
Namespaces are named ``<lab>-<host>`` and ``<lab>-gw-<home>``, with ``<lab>`` = ``plab`` plus a
random suffix, so concurrent labs never collide.

Needs root, ``ip`` (iproute2) and ``nft`` (nftables); ``turnserver`` (coturn) for TURN. STUN is
spoken with the rendezvous's own codec (``rendezvous.stun``). The modules:

- :mod:`~testkit.natlab.rules`: the NAT behaviours and their nft scripts (and packet loss);
- :mod:`~testkit.natlab.system`: running ``ip``/``nft``, process groups, :func:`available`;
- :mod:`~testkit.natlab.hosts`: hosts, homes, daemons and UDP agents inside namespaces;
- :mod:`~testkit.natlab.coturn`: coturn in a namespace;
- :mod:`~testkit.natlab.links`: link profiles (:data:`PROFILES`) and the user-space wire
  (``wire.c``) that emulates rate, delay, jitter and loss between a router's WAN and the bridge;
- :mod:`~testkit.natlab.probe`: UDP RTT / loss and TCP goodput probes inside namespaces;
- :mod:`~testkit.natlab.verify`: the emulator measured against its settings;
- :mod:`~testkit.natlab.lab`: :class:`NatLab` and the teardown of recorded labs;
- ``__main__``: the command line (``python -m testkit.natlab up|down|list|status|verify``).
"""

from testkit.natlab.coturn import start_coturn
from testkit.natlab.hosts import Datagram, Home, Host, Process, UdpAgent
from testkit.natlab.lab import GATEWAY_IP, STATE_DIR, NatLab, teardown, teardown_all
from testkit.natlab.links import PROFILES, LinkProfile, Wire, resolve_profile, wire_available
from testkit.natlab.rules import NatType, loss_ruleset, nat_ruleset
from testkit.natlab.system import NatLabError, available

__all__ = [
    "GATEWAY_IP", "PROFILES", "STATE_DIR", "Datagram", "Home", "Host", "LinkProfile", "NatLab",
    "NatLabError", "NatType", "Process", "UdpAgent", "Wire", "available", "loss_ruleset",
    "nat_ruleset", "resolve_profile", "start_coturn", "teardown", "teardown_all",
    "wire_available",
]
