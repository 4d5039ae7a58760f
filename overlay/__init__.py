"""The peerlearn overlay: identity, wire format, transports, rendezvous client. No torch here."""

from overlay.errors import OverlayError, ProtocolError, WireError
from overlay.identity import Identity, peer_id_from_public_key, verify_signature

__all__ = [
    "Identity",
    "OverlayError",
    "ProtocolError",
    "WireError",
    "peer_id_from_public_key",
    "verify_signature",
]
