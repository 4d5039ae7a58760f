"""Who may join and where they are reachable: the job's policy and the dial-back.

A ``join`` whose signature verified is checked against the job's policy (join secret, allowed
peer ids, a ``--closed`` rendezvous), then every offered ZeroMQ address is dialed back
(``overlay.dialback``); only the addresses that answered with a valid signature are kept. As
AutoNAT does, only addresses on the IP the peer's WebSocket came from are dialed (a host name
must resolve to it), so nobody can aim the rendezvous at a third party.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket

from overlay.dialback import dial_back
from overlay.errors import ProtocolError
from overlay.identity import peer_id_from_public_key
from overlay.membership import refusal_message
from overlay.protocol import ErrorCode
from rendezvous.config import RendezvousConfig

log = logging.getLogger(__name__)

MAX_LOOKUPS = 8
"""Host-name look-ups for dial-back at once (executor threads)."""


def as_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP (brackets and a zone id removed, IPv4-mapped IPv6 as IPv4), or None
    if it is not an IP literal."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: IPv6 literals in brackets."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[{ip}]" if ip.version == 6 else str(ip)


class Admission:
    """The checks of a join after its signature: policy, then dial-back of its addresses."""

    def __init__(self, config: RendezvousConfig) -> None:
        self.config = config
        self._lookups = asyncio.Semaphore(MAX_LOOKUPS)
        """Host-name look-ups for dial-back in flight (each holds an executor thread until it
        ends, even after we stopped waiting for it)."""

    def check_policy(self, job: str, public_key: bytes, proof: bytes | None) -> None:
        """Raise ``not_invited`` unless the job's policy admits this (authenticated) key."""
        policy = self.config.policy_for(job)
        if policy is None:
            if self.config.closed:
                raise ProtocolError(
                    ErrorCode.NOT_INVITED, f"job {job} is not served by this rendezvous"
                )
            return
        refusal = policy.check(job, public_key, proof)
        if refusal is not None:
            peer_id = peer_id_from_public_key(public_key)
            raise ProtocolError(ErrorCode.NOT_INVITED, refusal_message(refusal, job, peer_id))

    async def verify_addrs(self, addrs: list[str], public_key: bytes, remote: str) -> list[str]:
        """The offered addresses that answered a dial-back with a valid signature. Only
        addresses on ``remote`` (the IP the WebSocket came from) are dialed, unless
        ``dialback_any_host``: the rendezvous is not a port scanner for hire."""
        timeout = self.config.dialback_timeout
        targets = await asyncio.gather(*(self.dialback_target(a, remote) for a in addrs))
        results = await asyncio.gather(*(
            dial_back(t, public_key, timeout) for t in targets if t is not None
        ))
        dialed = iter(results)
        return [a for a, t in zip(addrs, targets, strict=True) if t is not None and next(dialed)]

    async def dialback_target(self, addr: str, remote: str) -> str | None:
        """What to dial to check ``addr`` (it, or its host name resolved to ``remote``), or
        None when ``addr`` is not on the peer's own IP."""
        if self.config.dialback_any_host:
            return addr
        host, _, port = addr.removeprefix("tcp://").rpartition(":")
        observed = as_ip(remote)
        if observed is None:
            log.info("not dialing back %s: no IP for the peer's connection (%r)", addr, remote)
            return None
        offered = as_ip(host)
        if offered is not None:
            if offered == observed:
                return addr
            log.info("not dialing back %s: not on %s, where the peer connects from", addr, remote)
            return None
        try:
            async with asyncio.timeout(self.config.dialback_timeout):
                await self._lookups.acquire()
                lookup = asyncio.get_running_loop().run_in_executor(
                    None, functools.partial(socket.getaddrinfo, host, int(port),
                                            type=socket.SOCK_STREAM))
                lookup.add_done_callback(lambda _f: self._lookups.release())
                infos = await asyncio.shield(lookup)
        except (OSError, TimeoutError, UnicodeError) as exc:
            log.info("not dialing back %s: cannot resolve %s (%s)", addr, host, exc)
            return None
        if any(as_ip(str(info[4][0])) == observed for info in infos):
            return f"tcp://{url_host(str(observed))}:{port}"
        log.info("not dialing back %s: %s does not resolve to %s, where the peer connects "
                 "from", addr, host, remote)
        return None
