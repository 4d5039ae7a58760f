"""The model wire format: round trips, and every kind of bad frame refused with its reason.

tests/data/model_small.msgpack holds the frames ``[header, payload, ...]`` of
``golden_message()`` signed by ``GOLDEN_KEY`` (digest hash sha256, as every sender wrote before
the ``hash`` field existed), model_small_blake3.msgpack the same digested with blake3; Ed25519
signatures and the header encoding are deterministic, so re-encoding must give the same bytes.
Regenerate (after a deliberate format change) with::

    .venv/bin/python -c "import tests.test_wire as t; t.write_golden()"
"""

from __future__ import annotations

import hashlib
import pickle
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay import wire
from overlay.errors import WireError
from overlay.identity import Identity
from overlay.wire import (
    ALLOWED_DTYPES,
    BLAKE3,
    CODECS,
    SHA256,
    WIRE_VERSION,
    Limits,
    ModelMessage,
    NamedArray,
    decode_header,
    decode_model,
    encode_model,
    model_parts,
    pack_header,
)

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "model_small.msgpack"
GOLDEN_BY_HASH = {SHA256: GOLDEN, BLAKE3: DATA / "model_small_blake3.msgpack"}
HAVE_BLAKE3 = wire._HASHES[BLAKE3] is not None
GOLDEN_KEY = bytes(range(32))

ALICE = Identity(Ed25519PrivateKey.from_private_bytes(GOLDEN_KEY))
MALLORY = Identity(Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))


def keys(peer_id: str) -> bytes | None:
    return {ALICE.peer_id: ALICE.public_key, MALLORY.peer_id: MALLORY.public_key}.get(peer_id)


def message(arrays: list[NamedArray] | None = None, **kw: Any) -> ModelMessage:
    if arrays is None:
        arrays = [
            NamedArray("w", np.arange(12, dtype=np.float32).reshape(3, 4)),
            NamedArray("b", np.array([1, -2, 3], dtype=np.int64)),
        ]
    fields: dict[str, Any] = {"job": "j", "sender": ALICE.peer_id, "epoch": 3, "samples": 100}
    fields.update(kw)
    return ModelMessage(arrays=arrays, **fields)


def frames_of(msg: ModelMessage, identity: Identity = ALICE) -> tuple[dict[str, Any], list[bytes]]:
    """The decoded header and the payloads (as bytes) of ``msg`` as a receiver sees them."""
    frames = encode_model(msg, identity)
    return decode_header(bytes(frames[0])), [bytes(f) for f in frames[1:]]


def signed_parts(msg: ModelMessage) -> tuple[dict[str, Any], list[bytes]]:
    header, payloads = model_parts(msg, ALICE)
    return header, [bytes(p) for p in payloads]


def reason_of(header: Any, payloads: list[bytes], limits: Limits = Limits(),
              public_key_of: Any = keys) -> str:
    """The reason the (packed, if not bytes) ``header`` + ``payloads`` are refused."""
    frame = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    with pytest.raises(WireError) as info:
        decode_model(decode_header(frame, limits), payloads, public_key_of, limits)
    return info.value.reason


# ---- round trips ----------------------------------------------------------------------------


def all_dtype_arrays() -> list[NamedArray]:
    rng = np.random.default_rng(0)
    out = []
    for dtype in sorted(ALLOWED_DTYPES):
        values = rng.integers(-100, 100, size=(2, 3, 4)).astype(dtype)
        out.append(NamedArray(f"{dtype}/3d", values))
        out.append(NamedArray(f"{dtype}/0d", np.array(values.flat[5], dtype=dtype)))
        out.append(NamedArray(f"{dtype}/empty", np.zeros((0,), dtype=dtype)))
        out.append(NamedArray(f"{dtype}/empty2d", np.zeros((0, 3), dtype=dtype)))
        out.append(NamedArray(f"{dtype}/strided", values[:, ::2, 1:]))  # not contiguous
        out.append(NamedArray(f"{dtype}/fortran", np.asfortranarray(values[0])))
    return out


def assert_same_arrays(got: list[NamedArray], want: list[NamedArray]) -> None:
    assert [a.name for a in got] == [a.name for a in want]
    for g, w in zip(got, want, strict=True):
        assert g.array.dtype.name == w.array.dtype.name, g.name
        assert g.array.shape == w.array.shape, g.name
        np.testing.assert_array_equal(g.array, w.array, err_msg=g.name)


def test_round_trip_all_dtypes_0d_empty_and_non_contiguous() -> None:
    arrays = all_dtype_arrays()
    assert not arrays[4].array.flags.c_contiguous
    msg = message(arrays, request_id="r-1")
    header, payloads = frames_of(msg)
    got = decode_model(header, payloads, keys)
    assert_same_arrays(got.arrays, arrays)
    assert (got.job, got.sender, got.epoch, got.samples, got.codec) == (
        "j", ALICE.peer_id, 3, 100, "raw")
    assert got.request_id == "r-1"
    assert got.digest == msg.digest and len(got.digest) == 32


def test_big_endian_input_arrives_with_its_values() -> None:
    arrays = [NamedArray("be", np.arange(6, dtype=">f4")),
              NamedArray("i", np.arange(3, dtype=">i8"))]
    got = decode_model(*frames_of(message(arrays)), keys)
    assert_same_arrays(got.arrays, arrays)


def test_decoded_arrays_are_views_of_the_payloads_not_copies() -> None:
    header, payloads = frames_of(message())
    got = decode_model(header, payloads, keys)
    assert not got.arrays[0].array.flags.writeable  # np.frombuffer over the received bytes


def test_digest_is_stable_and_depends_on_content() -> None:
    a, b = message(), message()
    frames_a, frames_b = encode_model(a, ALICE), encode_model(b, ALICE)
    assert a.digest == b.digest
    assert [bytes(f) for f in frames_a] == [bytes(f) for f in frames_b]
    c = message(epoch=4)
    encode_model(c, ALICE)
    assert c.digest != a.digest


def test_request_id_is_outside_the_digest() -> None:
    msg = message(request_id="first")
    header, payloads = model_parts(msg, ALICE)
    for rid in ("second", None):
        frame = pack_header(header, request_id=rid) if rid else pack_header(
            {k: v for k, v in header.items() if k != "request_id"})
        got = decode_model(decode_header(frame), payloads, keys)
        assert got.request_id == rid
        assert got.digest == msg.digest


def test_large_payload_hashed_in_pieces_round_trips() -> None:
    big = np.random.default_rng(1).standard_normal(700_000).astype(np.float32)  # 2.8 MB
    arrays = [NamedArray("big", big), NamedArray("small", np.ones(3, np.float16))]
    header, payloads = frames_of(message(arrays))
    assert_same_arrays(decode_model(header, payloads, keys).arrays, arrays)
    flipped = bytearray(payloads[0])
    flipped[-1] ^= 1  # in the last 1 MiB piece
    assert reason_of(header, [bytes(flipped), payloads[1]]) == "bad_digest"


def golden_message(hash_name: str = SHA256) -> ModelMessage:
    return message([
        NamedArray("layer.weight", np.arange(6, dtype=np.float32).reshape(2, 3) / 4),
        NamedArray("layer.bias", np.array([1, -1], dtype=np.int16)),
        NamedArray("steps", np.array(7, dtype=np.int64)),
    ], hash=hash_name, request_id="golden")


def write_golden() -> None:
    DATA.mkdir(exist_ok=True)
    for hash_name, path in GOLDEN_BY_HASH.items():
        frames = [bytes(f) for f in encode_model(golden_message(hash_name), ALICE)]
        path.write_bytes(msgpack.packb(frames, use_bin_type=True))


@pytest.mark.parametrize("hash_name", [
    SHA256,
    pytest.param(BLAKE3, marks=pytest.mark.skipif(not HAVE_BLAKE3, reason="blake3 not installed")),
])
def test_recorded_frames_decode_and_encoding_has_not_drifted(hash_name: str) -> None:
    recorded = msgpack.unpackb(GOLDEN_BY_HASH[hash_name].read_bytes(), raw=False)
    header = decode_header(recorded[0])
    assert header.get("hash", SHA256) == hash_name
    assert ("hash" in header) == (hash_name != SHA256)  # sha256 headers are as they always were
    got = decode_model(header, recorded[1:], keys)
    assert_same_arrays(got.arrays, golden_message().arrays)
    assert got.request_id == "golden" and got.hash == hash_name
    assert [bytes(f) for f in encode_model(golden_message(hash_name), ALICE)] == recorded


def test_default_hash_is_blake3_where_installed() -> None:
    assert wire.DEFAULT_HASH == (BLAKE3 if HAVE_BLAKE3 else SHA256)
    header, _ = frames_of(message())
    assert header.get("hash", SHA256) == wire.DEFAULT_HASH


@pytest.mark.parametrize("hash_name", [
    SHA256,
    pytest.param(BLAKE3, marks=pytest.mark.skipif(not HAVE_BLAKE3, reason="blake3 not installed")),
])
def test_each_hash_round_trips_and_catches_a_flipped_byte(hash_name: str) -> None:
    arrays = [NamedArray("big", np.arange(600_000, dtype=np.float32)),
              NamedArray("b", np.array([1, 2], dtype=np.int8))]
    header, payloads = frames_of(message(arrays, hash=hash_name))
    assert decode_model(header, payloads, keys).hash == hash_name
    flipped = bytearray(payloads[0])
    flipped[-1] ^= 1
    assert reason_of(header, [bytes(flipped), payloads[1]]) == "bad_digest"


@pytest.mark.skipif(not HAVE_BLAKE3, reason="blake3 not installed")
def test_hash_field_is_covered_by_the_digest() -> None:
    """Renaming a model's hash (sha256 <-> blake3) without re-digesting it is caught."""
    header, payloads = frames_of(message(hash=SHA256))
    assert reason_of({**header, "hash": BLAKE3}, payloads) == "bad_digest"
    header, payloads = frames_of(message(hash=BLAKE3))
    assert reason_of({**header, "hash": SHA256}, payloads) == "bad_digest"
    without = {k: v for k, v in header.items() if k != "hash"}
    assert reason_of(without, payloads) == "bad_digest"


@pytest.mark.parametrize(("value", "reason"), [
    ("md5", "bad_hash"), ("", "bad_hash"), ("x" * 1000, "bad_hash"), (5, "malformed"),
    (b"blake3", "malformed"),
])
def test_unknown_or_mistyped_hash_is_refused(value: Any, reason: str) -> None:
    header, payloads = frames_of(message())
    assert reason_of({**header, "hash": value}, payloads) == reason


@pytest.mark.parametrize("cuts", [[], [7], [1 << 19, 1 << 20, (1 << 20) + 5], [1 << 20]])
def test_piece_hashes_of_segments_match_the_digest_pieces(cuts: list[int]) -> None:
    payload = np.random.default_rng(1).bytes((2 << 20) + 100)
    bounds = [0, *cuts, len(payload)]
    segments = [memoryview(payload)[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    for hash_name in [SHA256] + ([BLAKE3] if HAVE_BLAKE3 else []):
        new = wire._HASHES[hash_name]
        assert new is not None
        want = [new(payload[i : i + wire.HASH_CHUNK]).digest()
                for i in range(0, len(payload), wire.HASH_CHUNK)]
        assert wire.piece_hashes(hash_name, segments) == want
    assert wire.piece_hashes(SHA256, [memoryview(b"")]) == [hashlib.sha256().digest()]


def prehashed(payloads: list[bytes], hash_name: str) -> wire.PrehashedPayloads:
    views = [memoryview(p) for p in payloads]
    return wire.PrehashedPayloads(views, hash_name,
                                  [wire.piece_hashes(hash_name, [v]) for v in views])


def test_prehashed_payloads_decode_like_plain_ones() -> None:
    arrays = [NamedArray("big", np.arange(600_000, dtype=np.float32)),
              NamedArray("b", np.array([1, 2], dtype=np.int8))]
    header, payloads = frames_of(message(arrays))
    got = decode_model(header, prehashed(payloads, wire.DEFAULT_HASH), keys)
    assert got.digest == header["digest"]


def test_a_prehashed_payload_replaced_afterwards_is_hashed_again() -> None:
    """Hashes count only for the very object they were computed over: swapping a payload in
    the list (or claiming another hash) cannot carry a stale hash past the digest check."""
    arrays = [NamedArray("big", np.arange(600_000, dtype=np.float32))]
    header, payloads = frames_of(message(arrays))
    received = prehashed(payloads, wire.DEFAULT_HASH)
    flipped = bytearray(payloads[0])
    flipped[5] ^= 1
    received[0] = memoryview(bytes(flipped))
    assert reason_of(header, received) == "bad_digest"
    wrong = wire.PrehashedPayloads([memoryview(payloads[0])], wire.DEFAULT_HASH, [[b"x" * 32]])
    assert reason_of(header, wrong) == "bad_digest"  # a wrong hash never passes either
    other = SHA256 if wire.DEFAULT_HASH != SHA256 else "md5"
    ignored = wire.PrehashedPayloads([memoryview(payloads[0])], other, [[b"x" * 32]])
    assert decode_model(header, ignored, keys).digest == header["digest"]


def test_sender_refuses_a_hash_it_does_not_have() -> None:
    with pytest.raises(WireError) as info:
        encode_model(message(hash="md5"), ALICE)
    assert info.value.reason == "bad_hash"


def test_a_receiver_without_blake3_refuses_it_as_bad_hash(
        monkeypatch: pytest.MonkeyPatch) -> None:
    header, payloads = frames_of(message(hash=SHA256))
    monkeypatch.setitem(wire._HASHES, BLAKE3, None)
    assert reason_of({**header, "hash": BLAKE3}, payloads) == "bad_hash"
    assert decode_model(header, payloads, keys).hash == SHA256  # sha256 still works


# ---- refusals: the header frame ------------------------------------------------------------


@pytest.mark.parametrize(("frame", "reason"), [
    (b"\xc1", "malformed"),  # never-used msgpack byte
    (b"\x92\x01", "malformed"),  # truncated array
    (b"", "malformed"),
    (msgpack.packb([1, "model"]), "malformed"),  # not a map
    (msgpack.packb("model"), "malformed"),
    (msgpack.packb({"v": 2, "type": "model"}), "bad_version"),
    (msgpack.packb({"type": "model"}), "bad_version"),
    (msgpack.packb({"v": WIRE_VERSION, "type": "exec"}), "malformed"),
    (msgpack.packb({"v": WIRE_VERSION}), "malformed"),
    (msgpack.packb({1: 2, "v": 1, "type": "ack"}), "malformed"),  # non-string map key
])
def test_bad_header_frames(frame: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        decode_header(frame)
    assert info.value.reason == reason


def test_header_too_large_is_refused_before_parsing() -> None:
    frame = msgpack.packb({"v": 1, "type": "ack", "pad": b"x" * 2000})
    with pytest.raises(WireError) as info:
        decode_header(frame, Limits(max_header_bytes=1000))
    assert info.value.reason == "header_too_large"
    decode_header(frame, Limits(max_header_bytes=len(frame)))


def test_decode_model_refuses_a_control_header() -> None:
    header = decode_header(msgpack.packb({"v": 1, "type": "ack"}))
    with pytest.raises(WireError) as info:
        decode_model(header, [], keys)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize(("field", "value"), [
    ("job", None), ("job", 5), ("sender", b"bytes"), ("epoch", True), ("epoch", "3"),
    ("epoch", 1.5), ("samples", False), ("samples", None), ("codec", 1), ("digest", "hex"),
    ("signature", None), ("request_id", 7), ("epoch", -1), ("samples", -5),
    ("arrays", {"w": 1}), ("arrays", None),
])
def test_missing_or_wrong_typed_fields(field: str, value: Any) -> None:
    header, payloads = signed_parts(message())
    header[field] = value
    assert reason_of(header, payloads) == "malformed"
    del header[field]
    if field != "request_id":
        assert reason_of(header, payloads) == "malformed"


@pytest.mark.parametrize("spec", [["w", "float32"], "w", ["w", "float32", [3, 4]],
                                  ["w", "float32", [3, 4], "raw", 0]])
def test_malformed_array_spec(spec: Any) -> None:
    header, payloads = signed_parts(message())
    header["arrays"] = [spec, header["arrays"][1]]
    assert reason_of(header, payloads) == "malformed"


@pytest.mark.parametrize("dtype", ["object", "O", "<U4", "V8", "complex64", "S3", "<f4",
                                   "float128", "", ["float32"], {"a": 1}, 4, None])
def test_disallowed_dtype(dtype: Any) -> None:
    header, payloads = signed_parts(message())
    header["arrays"][0][1] = dtype
    assert reason_of(header, payloads) == "bad_dtype"


def test_sender_refuses_to_encode_object_arrays() -> None:
    with pytest.raises(WireError) as info:
        encode_model(message([NamedArray("o", np.array([object()], dtype=object))]), ALICE)
    assert info.value.reason == "bad_dtype"


def test_shape_bomb_is_too_large_before_any_allocation() -> None:
    header, _ = signed_parts(message())
    header["arrays"] = [["w", "float32", [2**40, 2**40], "raw"]]
    frame = msgpack.packb(header, use_bin_type=True)
    tracemalloc.start()
    try:
        with pytest.raises(WireError) as info:
            decode_model(decode_header(frame), [b""], keys)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == "too_large"
    assert peak < 1_000_000


def test_total_size_limit_spans_arrays() -> None:
    header, payloads = signed_parts(message())  # 48 + 24 bytes
    assert reason_of(header, payloads, Limits(max_total_bytes=60)) == "too_large"
    decode_model(decode_header(pack_header(header), Limits(max_total_bytes=72)), payloads, keys,
                 Limits(max_total_bytes=72))


@pytest.mark.parametrize("shape", [[-1, 4], [3, "4"], [3, True], [3, 4.0], "3x4", None,
                                   [1] * 9, [0, 2**40, 2**40], [0, 2**64 - 1]])
def test_bad_shapes(shape: Any) -> None:
    header, payloads = signed_parts(message())
    header["arrays"][0][2] = shape
    assert reason_of(header, payloads) == "bad_shape"


def test_ndim_limit_is_configurable() -> None:
    arrays = [NamedArray("x", np.zeros((1, 1, 1), np.uint8))]
    header, payloads = signed_parts(message(arrays))
    assert reason_of(header, payloads, Limits(max_ndim=2)) == "bad_shape"


@pytest.mark.parametrize("names", [["w", "w"], ["", "b"], ["w", "n" * 257], [3, "b"], [None, "b"]])
def test_bad_names(names: list[Any]) -> None:
    header, payloads = signed_parts(message())
    for spec, name in zip(header["arrays"], names, strict=True):
        spec[0] = name
    assert reason_of(header, payloads) == "bad_name"


def test_name_length_limit_is_inclusive() -> None:
    arrays = [NamedArray("n" * 256, np.zeros(1, np.uint8))]
    decode_model(*frames_of(message(arrays)), keys)


def test_too_many_arrays() -> None:
    arrays = [NamedArray(f"a{i}", np.zeros(1, np.uint8)) for i in range(5)]
    header, payloads = signed_parts(message(arrays))
    assert reason_of(header, payloads, Limits(max_arrays=4)) == "too_many_arrays"
    decode_model(header, payloads, keys, Limits(max_arrays=5))


# ---- refusals: payloads, digest, signature ----------------------------------------------------


def test_payload_size_must_match_shape() -> None:
    header, payloads = signed_parts(message())
    assert reason_of(header, [payloads[0][:-1], payloads[1]]) == "bad_size"
    assert reason_of(header, [payloads[0] + b"\0", payloads[1]]) == "bad_size"
    assert reason_of(header, [payloads[1], payloads[0]]) == "bad_size"


def test_missing_and_extra_payload_frames() -> None:
    header, payloads = signed_parts(message())
    assert reason_of(header, payloads[:1]) == "truncated"
    assert reason_of(header, []) == "truncated"
    assert reason_of(header, [*payloads, b""]) == "truncated"


def test_flipped_payload_byte() -> None:
    header, payloads = signed_parts(message())
    for index in range(len(payloads)):
        for pos in (0, len(payloads[index]) - 1):
            tampered = list(payloads)
            buf = bytearray(tampered[index])
            buf[pos] ^= 0x80
            tampered[index] = bytes(buf)
            assert reason_of(header, tampered) == "bad_digest"


@pytest.mark.parametrize(("field", "value"), [
    ("epoch", 4), ("samples", 101), ("job", "other"), ("digest", bytes(32)),
])
def test_tampered_header_field(field: str, value: Any) -> None:
    header, payloads = signed_parts(message())
    header[field] = value
    assert reason_of(header, payloads) == "bad_digest"


def test_tampered_array_spec_same_size() -> None:
    header, payloads = signed_parts(message())
    header["arrays"][0] = ["w", "int32", [4, 3], "raw"]  # same 48 bytes, another meaning
    assert reason_of(header, payloads) == "bad_digest"
    header["arrays"][0] = ["renamed", "float32", [3, 4], "raw"]
    assert reason_of(header, payloads) == "bad_digest"


def test_signature_by_another_key() -> None:
    # Mallory signs a model claiming to be from Alice: digest is right, signature is not.
    header, payloads = frames_of(message(sender=ALICE.peer_id), identity=MALLORY)
    assert reason_of(header, payloads) == "bad_signature"
    header["signature"] = header["signature"][:-1]
    assert reason_of(header, payloads) == "bad_signature"
    # Alice's signature, replayed onto a message claiming to be Mallory's.
    header, payloads = signed_parts(message(sender=MALLORY.peer_id))
    assert reason_of(header, payloads) == "bad_signature"


def test_unknown_sender() -> None:
    header, payloads = signed_parts(message())
    assert reason_of(header, payloads, public_key_of=lambda _: None) == "unknown_sender"


def test_unknown_codec() -> None:
    with pytest.raises(WireError) as info:
        encode_model(message(codec="zstd"), ALICE)
    assert info.value.reason == "bad_codec"
    header, payloads = signed_parts(message())
    header["codec"] = "zstd"
    assert reason_of(header, payloads) == "bad_codec"


# ---- nothing is unpickled -----------------------------------------------------------------


class Trap:
    """Unpickling this creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_pickles_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bomb = pickle.dumps(Trap(marker))
    assert bomb[:1] == b"\x80"  # also a valid msgpack fixmap: make sure that does not help
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(WireError) as info:
            decode_header(pickle.dumps(Trap(marker), protocol=protocol))
        assert info.value.reason == "malformed"

    # As a payload declared as an object array: refused on the dtype.
    header, payloads = signed_parts(message())
    header["arrays"][0] = ["w", "O", [1], "raw"]
    assert reason_of(header, [bomb, payloads[1]]) == "bad_dtype"

    # As a properly signed uint8 payload: it arrives as plain bytes.
    arrays = [NamedArray("p", np.frombuffer(bomb, dtype=np.uint8))]
    got = decode_model(*frames_of(message(arrays)), keys)
    assert got.arrays[0].array.tobytes() == bomb

    assert not marker.exists()
    pickle.loads(bomb)  # the trap does work
    assert marker.exists()


# ---- fuzzing ---------------------------------------------------------------------------------

leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
        | st.text(max_size=20) | st.binary(max_size=40))
msgpackable = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=6,
)
dims = st.lists(st.integers(-2, 2**64 - 1) | st.sampled_from([0, 1, 3, 4]) | leaf, max_size=10)
specs = st.lists(
    st.lists(st.sampled_from(["w", "b", ""]) | leaf, min_size=2, max_size=5)
    | st.tuples(
        st.sampled_from(["w", "b", "x" * 300]) | leaf,
        st.sampled_from([*sorted(ALLOWED_DTYPES), "O", "complex64"]) | leaf,
        dims | leaf,
        st.sampled_from([*sorted(CODECS), "zstd"]) | leaf,
    ).map(list),
    max_size=6,
)
model_headers = st.fixed_dictionaries(
    {"v": st.just(WIRE_VERSION) | leaf, "type": st.just("model") | leaf},
    optional={
        "job": st.just("j") | leaf,
        "sender": st.just(ALICE.peer_id) | leaf,
        "epoch": st.integers(-5, 2**64 - 1) | leaf,
        "samples": st.integers(-5, 2**64 - 1) | leaf,
        "codec": st.sampled_from(sorted(CODECS)) | leaf,
        "block": st.sampled_from([256, 1, 0, 2**16 + 1]) | leaf,
        "arrays": specs | msgpackable,
        "digest": st.binary(min_size=32, max_size=32) | leaf,
        "signature": st.binary(min_size=64, max_size=64) | leaf,
        "request_id": st.text(max_size=8) | leaf,
    },
)
payload_lists = st.lists(st.binary(max_size=64), max_size=6)
fuzz = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = Limits(max_total_bytes=4096, max_arrays=8, max_header_bytes=65536)


def decode_all(frame: bytes, payloads: list[bytes], limits: Limits) -> None:
    try:
        header = decode_header(frame, limits)
        decode_model(header, payloads, keys, limits)
    except WireError:
        pass


@fuzz
@given(frame=st.binary(max_size=300), payloads=payload_lists)
def test_fuzz_random_bytes_only_raise_wire_error(frame: bytes, payloads: list[bytes]) -> None:
    decode_all(frame, payloads, Limits())
    decode_all(frame, payloads, SMALL)


@fuzz
@given(header=model_headers, payloads=payload_lists)
def test_fuzz_random_maps_only_raise_wire_error(header: dict[str, Any],
                                                payloads: list[bytes]) -> None:
    frame = msgpack.packb(header, use_bin_type=True)
    decode_all(frame, payloads, Limits())
    decode_all(frame, payloads, SMALL)


@settings(max_examples=100, deadline=None)
@given(value=msgpackable)
def test_fuzz_any_msgpack_value_as_header(value: Any) -> None:
    decode_all(msgpack.packb(value, use_bin_type=True), [], Limits())


@fuzz
@given(data=st.data())
def test_fuzz_mutated_valid_frames(data: st.DataObject) -> None:
    header, payloads = signed_parts(message())
    frame = bytearray(pack_header(header))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    decode_all(bytes(frame), payloads, Limits())
