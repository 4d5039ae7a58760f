"""The nft scripts of the lab's routers: how each NAT behaviour translates and filters, and the
packet loss on a home's WAN (NATLAB.md's table)."""

from __future__ import annotations

import enum


class NatType(enum.StrEnum):
    """How a home router translates and filters (RFC 4787 terms in the docstrings)."""

    PORT_RESTRICTED = "port-restricted"
    """Endpoint-independent mapping, address-and-port-dependent filtering (Linux masquerade)."""
    SYMMETRIC = "symmetric"
    """A new random public port per destination (masquerade fully-random)."""
    FULL_CONE = "full-cone"
    """1:1 NAT: anyone can reach the inner host's UDP ports on the public address."""
    ADDRESS_RESTRICTED = "address-restricted"
    """1:1 NAT, but only from addresses the inner host has sent UDP to (any of their ports)."""


def nat_ruleset(nat: NatType, host_ip: str, public_ip: str) -> str:
    """The nft script for a router with WAN ``wan`` and LAN ``lan`` (NATLAB.md's table).

    Every router gets an ``input`` chain with policy drop (NATLAB.md trap 1): otherwise a punch
    packet to the router creates conntrack state on the router itself and re-maps its ports.
    """
    prerouting = ""
    postrouting = 'oifname "wan" masquerade'
    outbound = 'iifname "lan" oifname "wan" accept'
    inbound = ""
    sets = ""
    if nat is NatType.SYMMETRIC:
        postrouting = 'oifname "wan" masquerade fully-random'
    elif nat in (NatType.FULL_CONE, NatType.ADDRESS_RESTRICTED):
        prerouting = f"""
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "wan" ip daddr {public_ip} meta l4proto udp dnat to {host_ip}
    }}"""
        postrouting = f'oifname "wan" ip saddr {host_ip} snat to {public_ip}'
        if nat is NatType.FULL_CONE:
            inbound = f'iifname "wan" oifname "lan" ip daddr {host_ip} meta l4proto udp accept'
        else:
            sets = """
    set contacted {
        type ipv4_addr . inet_service; flags dynamic, timeout; timeout 5m;
    }"""
            outbound = (
                'iifname "lan" oifname "wan" meta l4proto udp'
                " update @contacted { ip daddr . udp sport }\n        " + outbound
            )
            inbound = 'iifname "wan" oifname "lan" ip saddr . udp dport @contacted accept'
    return f"""table ip natlab {{{sets}
    chain input {{
        type filter hook input priority filter; policy drop;
        iif "lo" accept
        ct state established,related accept
        iifname "lan" accept
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        {outbound}
        {inbound}
    }}{prerouting}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        {postrouting}
    }}
}}
"""


def loss_ruleset(percent: int) -> str:
    """Drop ``percent`` % of packets crossing ``wan``, each direction on its own; the rules
    count what they drop (:meth:`NatLab.loss_dropped`)."""
    script = "add table ip natlab_loss\ndelete table ip natlab_loss\n"
    if percent > 0:
        match = "" if percent >= 100 else f"numgen random mod 100 < {percent} "  # max is 99
        script += f"""table ip natlab_loss {{
    chain rx {{
        type filter hook prerouting priority raw; policy accept;
        iifname "wan" {match}counter drop
    }}
    chain tx {{
        type filter hook postrouting priority 300; policy accept;
        oifname "wan" {match}counter drop
    }}
}}
"""
    return script

