"""Wire format for models: a msgpack header plus one payload frame per named array.

    frames = [header, payload_0, payload_1, ...]
    header = msgpack {"v": 1, "type": "model", "job", "sender", "epoch", "samples",
                      "codec" ("raw" | "fp16" | "int8"), "block" (int8 only),
                      "arrays": [[name, dtype, [dim, ...], enc], ...], "hash" (optional),
                      "digest", "signature",
                      "request_id" (optional: the answer to a get_model request)}

``dtype`` and ``shape`` are the original array's, ``enc`` how its payload is encoded: the
message's codec for floating arrays, ``raw`` for the others (see overlay.codecs).
``digest`` = H over the canonical metadata and H of every 1 MiB piece of every (encoded)
payload (a hash list, so large payloads hash on several cores), where H is the header's
``hash``: ``sha256`` when the field is absent (as every sender wrote before the field
existed), or ``blake3`` (about four times faster; what a sender uses when the ``blake3``
package is installed). A ``hash`` other than ``sha256`` is covered by the digest too.
``signature`` = Ed25519(DOMAIN_MODEL + digest) by the sender. The receiver checks, before it
allocates anything: header size, codec, block and hash, array count, names, dtype allow-list,
ndim, encoding,
the total size (payloads and reconstructed arrays), that each payload's length is exactly what
its encoding, dtype and shape give; the int8 scales; then the digest and the signature against
the sender's known public key; only then does it reconstruct the arrays.
Nothing is ever unpickled: payloads become numpy arrays with ``np.frombuffer``.

Control messages on the same sockets are one-frame msgpack maps with a ``type``:
``get_model {request_id, job, sender}``, ``ack {request_id?, digest}``,
``nack {request_id?, reason}``, and the dial-back ``probe`` (see overlay.dialback).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from overlay.codecs import ALLOWED_DTYPES, BLOCK, CODECS, ENCODINGS, MAX_BLOCK, encoding_for
from overlay.digest import (  # noqa: F401 (re-exported: users of the wire format import them here)
    _HASHES,
    BLAKE3,
    DEFAULT_HASH,
    HASH_CHUNK,
    SHA256,
    PrehashedPayloads,
    hash_available,
    hasher,
    piece_hashes,
    submit_piece_hashes,
)
from overlay.digest import model_digest as _digest
from overlay.errors import WireError
from overlay.identity import DOMAIN_MODEL, Identity, verify_signature

WIRE_VERSION = 1


class FrameType(enum.StrEnum):
    MODEL = "model"
    GET_MODEL = "get_model"
    ACK = "ack"
    NACK = "nack"
    PROBE = "probe"
    PROBE_REPLY = "probe_reply"
    PING = "ping"
    PONG = "pong"
    PIECE = "piece"


@dataclass(frozen=True)
class NamedArray:
    """One named array as it travels: dtype and shape come from ``array``."""

    name: str
    array: np.ndarray


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; anything beyond is rejected before it is allocated."""

    max_total_bytes: int = 512 * 1024 * 1024
    """Sum of all payloads of one model, and separately of all its reconstructed arrays."""
    max_arrays: int = 4096
    """Named arrays per model."""
    max_ndim: int = 8
    """Dimensions per array."""
    max_name_len: int = 256
    """Characters per array name."""
    max_header_bytes: int = 1024 * 1024
    """Size of the msgpack header frame."""


@dataclass
class ModelMessage:
    """A decoded, verified model (or one about to be encoded)."""

    job: str
    sender: str
    epoch: int
    samples: int
    arrays: list[NamedArray]
    codec: str = "raw"
    """How floating arrays travel: "raw", "fp16" or "int8" (overlay.codecs)."""
    hash: str = DEFAULT_HASH
    """The digest's hash: "sha256" or "blake3" (see the module's docstring)."""
    digest: bytes = b""
    request_id: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(a.array.nbytes for a in self.arrays)


def _packb(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _canonical_meta(
    job: str,
    sender: str,
    epoch: int,
    samples: int,
    codec: str,
    block: int | None,
    specs: list[list[Any]],
    hash_name: str = SHA256,
) -> bytes:
    fields = [WIRE_VERSION, job, sender, epoch, samples, codec, block, specs]
    return _packb(fields if hash_name == SHA256 else [*fields, hash_name])


def model_parts(msg: ModelMessage, identity: Identity) -> tuple[dict[str, Any], list[memoryview]]:
    """The header map and the payloads of ``msg``, signed by ``identity``.

    Raw payloads are views of the arrays, not copies: the arrays must not change until sent.
    ``request_id`` is outside the digest, so a header may be re-packed with another one.
    Raises WireError ``bad_codec`` for an unknown codec, ``bad_hash`` for a digest hash not
    available here, ``non_finite`` for NaN/Inf in an array to be encoded lossily,
    ``fp16_overflow`` for |x| > 65504 under fp16 (send raw instead).
    """
    if msg.codec not in CODECS:
        raise WireError("bad_codec", f"codec {msg.codec[:40]!r} not supported")
    hasher(msg.hash)
    block = BLOCK if msg.codec == "int8" else None
    specs: list[list[Any]] = []
    payloads: list[memoryview] = []
    for item in msg.arrays:
        dtype = item.array.dtype.name
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            raise WireError("bad_dtype", f"{item.name}: dtype {dtype} cannot be sent")
        enc = encoding_for(msg.codec, dtype)
        specs.append([item.name, dtype, list(item.array.shape), enc])
        payloads.append(ENCODINGS[enc].encode(item.name, item.array, block or BLOCK))
    meta = _canonical_meta(msg.job, msg.sender, msg.epoch, msg.samples, msg.codec, block, specs,
                           msg.hash)
    digest = _digest(meta, payloads, msg.hash)
    header: dict[str, Any] = {
        "v": WIRE_VERSION,
        "type": FrameType.MODEL.value,
        "job": msg.job,
        "sender": msg.sender,
        "epoch": msg.epoch,
        "samples": msg.samples,
        "codec": msg.codec,
        **({} if block is None else {"block": block}),
        "arrays": specs,
        **({} if msg.hash == SHA256 else {"hash": msg.hash}),
        "digest": digest,
        "signature": identity.sign(DOMAIN_MODEL + digest),
    }
    if msg.request_id is not None:
        header["request_id"] = msg.request_id
    msg.digest = digest
    return header, payloads


def pack_header(header: dict[str, Any], **overrides: Any) -> bytes:
    return _packb({**header, **overrides})


def encode_model(msg: ModelMessage, identity: Identity) -> list[bytes | memoryview]:
    """Frames for ``msg``: the packed header, then one payload per array."""
    header, payloads = model_parts(msg, identity)
    return [pack_header(header), *payloads]


def decode_header(frame: bytes | memoryview, limits: Limits = Limits()) -> dict[str, Any]:
    """The first frame of any message: a msgpack map with a known ``type``."""
    if len(frame) > limits.max_header_bytes:
        raise WireError("header_too_large", f"{len(frame)} bytes > {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_array_len=max(limits.max_arrays, limits.max_ndim, 16),
            max_map_len=64,
        )
    except Exception as exc:  # msgpack signals bad input with several exception types
        raise WireError("malformed", f"header is not msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise WireError("malformed", "header is not a map")
    if header.get("v") != WIRE_VERSION:
        raise WireError("bad_version", f"wire version {header.get('v')!r}, want {WIRE_VERSION}")
    try:
        FrameType(str(header.get("type")))
    except ValueError:
        raise WireError("malformed", f"unknown frame type {header.get('type')!r}") from None
    return header


def request_id_of(frame: bytes | memoryview, limits: Limits = Limits()) -> str | None:
    """The ``request_id`` of a header frame that :func:`decode_header` refused, if it is a
    msgpack map within the size limit that names one (e.g. a peer of another wire version):
    the nack then carries it, so the requester learns why at once instead of timing out."""
    if len(frame) > limits.max_header_bytes:
        return None
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True,
                                 max_array_len=max(limits.max_arrays, limits.max_ndim, 16),
                                 max_map_len=64)
    except Exception:  # not msgpack: nothing to recover
        return None
    request_id = header.get("request_id") if isinstance(header, dict) else None
    return request_id if isinstance(request_id, str) and len(request_id) <= 256 else None


def nack_for(
    exc: WireError, request_id: Any, header_frame: bytes | memoryview, limits: Limits = Limits()
) -> bytes:
    """The ``nack`` refusing a request with ``exc``. The requester matches replies by
    ``request_id``: when the header was refused before it was decoded (``request_id`` None),
    it is recovered from ``header_frame`` if it can be, else the requester waits its timeout."""
    if request_id is None:
        request_id = request_id_of(header_frame, limits)
    ids = {"request_id": request_id} if isinstance(request_id, str) else {}
    return encode_control(FrameType.NACK, reason=exc.reason, message=str(exc)[:200], **ids)


def _field(header: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise WireError("malformed", f"field {name!r} missing or of the wrong type")
    return value


@dataclass(frozen=True)
class _Spec:
    """One array spec of a received header, checked."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    enc: str
    payload_nbytes: int

    def as_list(self) -> list[Any]:
        return [self.name, self.dtype.name, list(self.shape), self.enc]


def _check_specs(raw_specs: Any, codec: str, block: int, limits: Limits) -> list[_Spec]:
    if not isinstance(raw_specs, list):
        raise WireError("malformed", "arrays is not a list")
    if len(raw_specs) > limits.max_arrays:
        raise WireError("too_many_arrays", f"{len(raw_specs)} > {limits.max_arrays}")
    out = []
    names: set[str] = set()
    total = 0
    total_payload = 0
    for spec in raw_specs:
        if not (isinstance(spec, list) and len(spec) == 4):
            raise WireError("malformed", "array spec is not [name, dtype, shape, enc]")
        name, dtype, shape, enc = spec
        if not isinstance(name, str) or not 0 < len(name) <= limits.max_name_len:
            raise WireError("bad_name", f"array name {str(name)[:80]!r}")
        if name in names:
            raise WireError("bad_name", f"array name {name!r} appears twice")
        names.add(name)
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            raise WireError("bad_dtype", f"{name}: dtype {str(dtype)[:40]!r} not allowed")
        if not isinstance(shape, list) or len(shape) > limits.max_ndim:
            raise WireError(
                "bad_shape", f"{name}: shape must be a list of <= {limits.max_ndim} dims"
            )
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise WireError("bad_shape", f"{name}: dimensions must be non-negative integers")
        if not isinstance(enc, str) or enc != encoding_for(codec, dtype):
            raise WireError(
                "bad_codec", f"{name}: encoding {str(enc)[:40]!r} for {dtype} under {codec}"
            )
        np_dtype = np.dtype(dtype)
        n = math.prod(shape)  # Python ints: no overflow
        total += n * np_dtype.itemsize
        payload_nbytes = ENCODINGS[enc].payload_nbytes(n, np_dtype, block)
        total_payload += payload_nbytes
        if max(total, total_payload) > limits.max_total_bytes:
            raise WireError("too_large", f"model larger than {limits.max_total_bytes} bytes")
        if math.prod(d or 1 for d in shape) * np_dtype.itemsize > limits.max_total_bytes:
            # empty, but numpy cannot even describe it (e.g. [0, 2**40, 2**40])
            raise WireError("bad_shape", f"{name}: shape {shape} is too large")
        out.append(_Spec(name, np_dtype, tuple(shape), enc, payload_nbytes))
    return out


def decode_model(
    header: dict[str, Any],
    payloads: Sequence[memoryview | bytes],
    public_key_of: Callable[[str], bytes | None],
    limits: Limits = Limits(),
) -> ModelMessage:
    """Check and decode a model. ``public_key_of(sender)`` returns the sender's key, or None
    if the sender is not a peer we know (then the message is refused)."""
    if header.get("type") != FrameType.MODEL.value:
        raise WireError("malformed", "not a model message")
    job = _field(header, "job", str)
    sender = _field(header, "sender", str)
    epoch = _field(header, "epoch", int)
    samples = _field(header, "samples", int)
    codec = _field(header, "codec", str)
    digest = _field(header, "digest", bytes)
    signature = _field(header, "signature", bytes)
    request_id = header.get("request_id")
    if request_id is not None and not isinstance(request_id, str):
        raise WireError("malformed", "request_id must be a string")
    if codec not in CODECS:
        raise WireError("bad_codec", f"codec {codec[:40]!r} not supported")
    block: int | None = None
    if codec == "int8":
        block = _field(header, "block", int)
        if not 0 < block <= MAX_BLOCK:
            raise WireError("bad_codec", f"int8 block {block} not in 1..{MAX_BLOCK}")
    elif "block" in header:
        raise WireError("malformed", f"block given for codec {codec}")
    hash_name = header.get("hash", SHA256)
    if not isinstance(hash_name, str):
        raise WireError("malformed", "field 'hash' must be a string")
    hasher(hash_name)
    if epoch < 0 or samples < 0:
        raise WireError("malformed", "epoch and samples must be >= 0")
    specs = _check_specs(header.get("arrays"), codec, block or BLOCK, limits)
    if len(payloads) != len(specs):
        raise WireError("truncated", f"{len(payloads)} payload frames for {len(specs)} arrays")
    for spec, payload in zip(specs, payloads, strict=True):
        if len(payload) != spec.payload_nbytes:
            raise WireError(
                "bad_size", f"{spec.name}: {len(payload)} bytes, spec says {spec.payload_nbytes}"
            )
    for spec, payload in zip(specs, payloads, strict=True):
        ENCODINGS[spec.enc].check(spec.name, payload, math.prod(spec.shape), block or BLOCK)
    public_key = public_key_of(sender)
    if public_key is None:
        raise WireError("unknown_sender", f"{sender[:64]!r} is not a member of this job")
    meta = _canonical_meta(
        job, sender, epoch, samples, codec, block, [spec.as_list() for spec in specs], hash_name
    )
    if _digest(meta, payloads, hash_name) != digest:
        raise WireError("bad_digest", "payload does not match its digest")
    if not verify_signature(public_key, signature, DOMAIN_MODEL + digest):
        raise WireError("bad_signature", f"signature does not verify for {sender}")
    arrays = [
        NamedArray(
            spec.name,
            ENCODINGS[spec.enc].decode(payload, spec.dtype, spec.shape, block or BLOCK),
        )
        for spec, payload in zip(specs, payloads, strict=True)
    ]
    return ModelMessage(
        job=job,
        sender=sender,
        epoch=epoch,
        samples=samples,
        arrays=arrays,
        codec=codec,
        hash=hash_name,
        digest=digest,
        request_id=request_id,
    )


def encode_control(frame_type: FrameType, **fields: Any) -> bytes:
    return _packb({"v": WIRE_VERSION, "type": frame_type.value, **fields})
