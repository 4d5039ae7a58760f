"""Exception tree of the overlay layer."""


class OverlayError(Exception):
    """Base class of everything the overlay raises on purpose."""


class WireError(OverlayError):
    """A frame could not be decoded or failed a check (size, dtype, shape, digest, signature).

    ``reason`` is a short stable code (used in logs and counters), the message says more.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class ProtocolError(OverlayError):
    """A rendezvous message was malformed or not allowed in the current state."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class TransportError(OverlayError):
    """A transfer to or from a remote peer failed (timeout, refused, peer gone)."""


class RendezvousError(OverlayError):
    """The rendezvous refused us or could not be reached."""


class RendezvousRefused(RendezvousError):
    """The rendezvous refused us for good (``code``, e.g. ``not_invited``): no retry helps."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class SignalError(OverlayError):
    """A relayed signaling message was refused (unsigned, forged, replayed, ...).

    ``reason`` is a ``overlay.signaling.SignalReject`` code (used in logs and counters).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
