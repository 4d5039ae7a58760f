"""What a model is at the border between the learner and the overlay.

The learner hands over an :class:`OutgoingModel` (named numpy arrays and who/when), gets back
an :class:`EncodedModel` (encoded, hashed and signed once, opaque: sent to many peers and
served on request), and is handed a :class:`ReceivedModel` for every model that arrives
(decoded; digest, signature, names and dtypes checked). Wire frames and request ids stay in
the overlay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from overlay.wire import NamedArray


@dataclass(frozen=True)
class OutgoingModel:
    """What the learner hands over to be sent or served."""

    job: str
    sender: str
    epoch: int
    samples: int
    arrays: Sequence[NamedArray]
    """Hand over arrays that no longer change (a copy): raw payloads are views of them."""
    codec: str = "raw"
    """How floating arrays travel: ``raw``, ``fp16`` or ``int8`` (overlay.codecs)."""


@dataclass(frozen=True)
class EncodedModel:
    """A model encoded once, sent to many peers and served on request."""

    epoch: int
    codec: str
    """The codec actually used (a model fp16 cannot carry goes raw)."""
    digest: bytes
    nbytes: int
    """Bytes on the wire, header included."""
    header: dict[str, Any] = field(repr=False)
    """The signed header map (without a request id): the overlay's, not the learner's."""
    payloads: tuple[memoryview, ...] = field(repr=False)
    """The encoded payload frames (for ``raw`` arrays: views of the handed-over arrays)."""


@dataclass(frozen=True)
class ReceivedModel:
    """A model from another peer: decoded, digest and signature checked, names/dtypes limited."""

    sender: str
    job: str
    epoch: int
    samples: int
    codec: str
    digest: bytes
    arrays: Sequence[NamedArray]

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded arrays."""
        return sum(a.array.nbytes for a in self.arrays)
