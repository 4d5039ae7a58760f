"""ICE configuration and staging for WebRTC links.

Direct first, relay as fallback: when a TURN server is configured, the offerer first tries a
``direct`` stage (host and server-reflexive candidates only) and only then re-offers with
``any`` (TURN relay candidates too). aioice nominates the first pair whose check succeeds;
between two port-restricted NATs the punched pair and the pair through TURN succeed at about
the same time, so with TURN candidates present from the start a punchable pair could end up
relayed. An offer says its stage; the answerer follows it.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from overlay.transport.base import LinkKind

log = logging.getLogger(__name__)

IceServers = list[dict[str, Any]]
"""Items look like ``{"urls": [...] | str, "username": ..., "credential": ...}``."""


class IceStage(enum.StrEnum):
    """Which candidates a link attempt gathers (the ``stage`` of an offer on the wire)."""

    DIRECT = "direct"
    """Host and server-reflexive candidates: STUN servers only."""
    ANY = "any"
    """Every configured server, TURN relays included."""


def _urls(server: dict[str, Any]) -> list[str]:
    urls = server["urls"]
    return [urls] if isinstance(urls, str) else list(urls)


def has_turn(ice_servers: IceServers) -> bool:
    return any(u.startswith(("turn:", "turns:")) for s in ice_servers for u in _urls(s))


def first_stage(ice_servers: IceServers, ice_transport_policy: str = "all") -> IceStage:
    """``direct`` when a relay is configured and allowed but not forced, else ``any``."""
    if ice_transport_policy == "all" and has_turn(ice_servers):
        return IceStage.DIRECT
    return IceStage.ANY


def ice_configuration(
    ice_servers: IceServers, ice_transport_policy: str = "all",
    stage: IceStage = IceStage.ANY,
) -> RTCConfiguration:
    """An explicit RTCConfiguration (an empty list means no STUN/TURN at all, never a default).

    The ``direct`` stage leaves the TURN servers out.
    """
    if stage is IceStage.DIRECT:
        ice_servers = [
            {**s, "urls": [u for u in _urls(s) if u.startswith(("stun:", "stuns:"))]}
            for s in ice_servers
        ]
        ice_servers = [s for s in ice_servers if s["urls"]]
    servers = [
        RTCIceServer(
            urls=list(s["urls"]) if not isinstance(s["urls"], str) else s["urls"],
            username=s.get("username"),
            credential=s.get("credential"),
        )
        for s in ice_servers
    ]
    return RTCConfiguration(
        iceServers=servers, iceTransportPolicy=RTCIceTransportPolicy(ice_transport_policy)
    )


def selected_kind(pc: RTCPeerConnection) -> LinkKind:
    """``webrtc-relay`` if the nominated ICE pair uses a TURN candidate on either side."""
    try:
        connection = pc.sctp.transport.transport._connection  # type: ignore[union-attr]
        pairs = list(connection._nominated.values())
    except AttributeError:
        pairs = []
    if not pairs:
        log.warning("no nominated ICE pair found; reporting the link as direct")
        return LinkKind.WEBRTC_DIRECT
    relayed = any(
        "relay" in (p.local_candidate.type, p.remote_candidate.type) for p in pairs
    )
    return LinkKind.WEBRTC_RELAY if relayed else LinkKind.WEBRTC_DIRECT
