"""Wire format for models: a msgpack header plus one raw payload frame per named array.

    frames = [header, payload_0, payload_1, ...]
    header = msgpack {"v": 1, "type": "model", "job", "sender", "epoch", "samples", "codec",
                      "arrays": [[name, dtype, [dim, ...]], ...], "digest", "signature",
                      "request_id" (optional: the answer to a get_model request)}

``digest`` = SHA-256 over the canonical metadata and the SHA-256 of every 1 MiB piece of every
payload (a hash list, so large payloads hash on several cores); ``signature`` =
Ed25519(DOMAIN_MODEL + digest) by the sender. The receiver checks, before it allocates
anything: header size, array count, names, dtype allow-list, ndim, that each payload's length
is exactly prod(shape) * itemsize, the total size; then the digest and the signature against
the sender's known public key.
Nothing is ever unpickled: payloads become numpy arrays with ``np.frombuffer``.

Control messages on the same sockets are one-frame msgpack maps with a ``type``:
``get_model {request_id, job, sender}``, ``ack {request_id?, digest}``,
``nack {request_id?, reason}``, and the dial-back ``probe`` (see overlay.dialback).
"""

from __future__ import annotations

import enum
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from overlay.errors import WireError
from overlay.identity import DOMAIN_MODEL, Identity, verify_signature

WIRE_VERSION = 1

# Only plain numeric dtypes travel; object/void/structured dtypes could smuggle anything.
ALLOWED_DTYPES = frozenset(
    ["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]
)
CODECS = frozenset(["raw"])
_PARALLEL_HASH_BYTES = 1 << 20
HASH_CHUNK = 1 << 20
_hash_pool: ThreadPoolExecutor | None = None


class FrameType(enum.StrEnum):
    MODEL = "model"
    GET_MODEL = "get_model"
    ACK = "ack"
    NACK = "nack"
    PROBE = "probe"
    PROBE_REPLY = "probe_reply"
    PING = "ping"
    PONG = "pong"


@dataclass(frozen=True)
class NamedArray:
    """One named array as it travels: dtype and shape come from ``array``."""

    name: str
    array: np.ndarray


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; anything beyond is rejected before it is allocated."""

    max_total_bytes: int = 512 * 1024 * 1024
    """Sum of all payloads of one model."""
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
    digest: bytes = b""
    request_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.array.nbytes for a in self.arrays)


def _canonical_meta(
    job: str, sender: str, epoch: int, samples: int, codec: str, specs: list[list[Any]]
) -> bytes:
    return msgpack.packb(
        [WIRE_VERSION, job, sender, epoch, samples, codec, specs], use_bin_type=True
    )


def _pool() -> ThreadPoolExecutor:
    global _hash_pool
    if _hash_pool is None:
        _hash_pool = ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="wire-hash"
        )
    return _hash_pool


def _sha256(buf: memoryview) -> bytes:
    h = hashlib.sha256()
    h.update(buf)  # releases the GIL on large buffers
    return h.digest()


def _digest(meta: bytes, payloads: Sequence[memoryview | bytes]) -> bytes:
    """SHA-256 over ``meta`` and the SHA-256 of every HASH_CHUNK-sized piece of every payload.

    Hashing pieces instead of whole payloads lets a large model hash on several cores.
    """
    pieces: list[memoryview] = []
    for payload in payloads:
        view = memoryview(payload).cast("B")
        pieces.extend(view[i : i + HASH_CHUNK] for i in range(0, len(view), HASH_CHUNK))
        if not len(view):
            pieces.append(view)
    if len(pieces) > 1 and sum(len(p) for p in pieces) >= _PARALLEL_HASH_BYTES:
        parts = list(_pool().map(_sha256, pieces))
    else:
        parts = [_sha256(p) for p in pieces]
    h = hashlib.sha256(meta)
    for part in parts:
        h.update(part)
    return h.digest()


def _as_payload(array: np.ndarray) -> memoryview:
    # Little-endian on the wire: a big-endian array's dtype.name is the same ("float32").
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    if array.nbytes == 0:
        return memoryview(b"")  # memoryview cannot cast a view with zeros in its shape
    return array.data.cast("B")


def model_parts(msg: ModelMessage, identity: Identity) -> tuple[dict[str, Any], list[memoryview]]:
    """The header map and the payloads of ``msg``, signed by ``identity``.

    Payloads are views of the arrays, not copies: the arrays must not change until sent.
    ``request_id`` is outside the digest, so a header may be re-packed with another one.
    """
    specs: list[list[Any]] = []
    payloads: list[memoryview] = []
    for item in msg.arrays:
        dtype = item.array.dtype.name
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            raise WireError("bad_dtype", f"{item.name}: dtype {dtype} cannot be sent")
        specs.append([item.name, dtype, list(item.array.shape)])
        payloads.append(_as_payload(item.array))
    meta = _canonical_meta(msg.job, msg.sender, msg.epoch, msg.samples, msg.codec, specs)
    digest = _digest(meta, payloads)
    header: dict[str, Any] = {
        "v": WIRE_VERSION,
        "type": FrameType.MODEL.value,
        "job": msg.job,
        "sender": msg.sender,
        "epoch": msg.epoch,
        "samples": msg.samples,
        "codec": msg.codec,
        "arrays": specs,
        "digest": digest,
        "signature": identity.sign(DOMAIN_MODEL + digest),
    }
    if msg.request_id is not None:
        header["request_id"] = msg.request_id
    msg.digest = digest
    return header, payloads


def pack_header(header: dict[str, Any], **overrides: Any) -> bytes:
    return msgpack.packb({**header, **overrides}, use_bin_type=True)


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


def _field(header: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise WireError("malformed", f"field {name!r} missing or of the wrong type")
    return value


def _check_specs(
    raw_specs: Any, limits: Limits
) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    if not isinstance(raw_specs, list):
        raise WireError("malformed", "arrays is not a list")
    if len(raw_specs) > limits.max_arrays:
        raise WireError("too_many_arrays", f"{len(raw_specs)} > {limits.max_arrays}")
    out = []
    names: set[str] = set()
    total = 0
    for spec in raw_specs:
        if not (isinstance(spec, list) and len(spec) == 3):
            raise WireError("malformed", "array spec is not [name, dtype, shape]")
        name, dtype, shape = spec
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
        np_dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * np_dtype.itemsize  # Python ints: no overflow
        total += nbytes
        if total > limits.max_total_bytes:
            raise WireError("too_large", f"model larger than {limits.max_total_bytes} bytes")
        if math.prod(d or 1 for d in shape) * np_dtype.itemsize > limits.max_total_bytes:
            # empty, but numpy cannot even describe it (e.g. [0, 2**40, 2**40])
            raise WireError("bad_shape", f"{name}: shape {shape} is too large")
        out.append((name, np_dtype, tuple(shape), nbytes))
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
    if epoch < 0 or samples < 0:
        raise WireError("malformed", "epoch and samples must be >= 0")
    specs = _check_specs(header.get("arrays"), limits)
    if len(payloads) != len(specs):
        raise WireError("truncated", f"{len(payloads)} payload frames for {len(specs)} arrays")
    for (name, _, _, nbytes), payload in zip(specs, payloads, strict=True):
        if len(payload) != nbytes:
            raise WireError("bad_size", f"{name}: {len(payload)} bytes, shape says {nbytes}")
    public_key = public_key_of(sender)
    if public_key is None:
        raise WireError("unknown_sender", f"{sender[:64]!r} is not a member of this job")
    meta = _canonical_meta(
        job, sender, epoch, samples, codec, [[n, d.name, list(s)] for n, d, s, _ in specs]
    )
    if _digest(meta, payloads) != digest:
        raise WireError("bad_digest", "payload does not match its digest")
    if not verify_signature(public_key, signature, DOMAIN_MODEL + digest):
        raise WireError("bad_signature", f"signature does not verify for {sender}")
    arrays = [
        NamedArray(name, np.frombuffer(payload, dtype=dtype.newbyteorder("<")).reshape(shape))
        for (name, dtype, shape, _), payload in zip(specs, payloads, strict=True)
    ]
    return ModelMessage(
        job=job,
        sender=sender,
        epoch=epoch,
        samples=samples,
        arrays=arrays,
        codec=codec,
        digest=digest,
        request_id=request_id,
    )


def encode_control(frame_type: FrameType, **fields: Any) -> bytes:
    return msgpack.packb({"v": WIRE_VERSION, "type": frame_type.value, **fields}, use_bin_type=True)
