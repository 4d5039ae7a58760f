"""Hostile input against every decoder, in-process (hypothesis): the model wire format, the
WebRTC chunk framing and reassembly, the rendezvous protocol, the STUN parser and server, and
the learner's validator. Each input gives either a valid object or the layer's own error
with a reason (WireError, ChunkError, ProtocolError, StunParseError), never another
exception, never an allocation beyond the limits, never an unpickled object.

tests/test_wire.py fuzzes decode_header/decode_model with random maps and bytes; this file
adds the hostile kinds of testkit.hostile, shape/dtype bombs with the allocation measured,
NaN/Inf through every codec up to the validator, and the other entry points.
"""

from __future__ import annotations

import asyncio
import math
import pickle
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.errors import ProtocolError, WireError
from overlay.identity import Identity
from overlay.protocol import (
    MsgType,
    check_addrs,
    check_job,
    check_links,
    check_meta,
    check_signal,
    decode,
)
from overlay.transport.webrtc import (
    CHUNK_HEADER,
    CHUNK_SIZE,
    ChunkError,
    ChunkHeader,
    WebRtcTransport,
    iter_chunks,
)
from overlay.wire import (
    WIRE_VERSION,
    Limits,
    ModelMessage,
    NamedArray,
    decode_header,
    decode_model,
    model_parts,
    pack_header,
)
from rendezvous.stun import (
    Class,
    Message,
    Method,
    StunParseError,
    StunServer,
    parse_message,
)
from testkit.hostile import ZMQ_KINDS, Kind, pickle_bomb, stun_datagrams, zmq_messages

fuzz = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ALICE = Identity.generate()
KEYS = {ALICE.peer_id: ALICE.public_key}
SMALL = Limits(max_total_bytes=1 << 20, max_arrays=16, max_header_bytes=1 << 20)


def decode_or_reason(frames: list[bytes], limits: Limits = Limits()) -> ModelMessage | str | None:
    """The model, None for a control frame, or the WireError's reason; anything else raises."""
    try:
        header = decode_header(frames[0], limits)
        if header["type"] != "model":
            return None
        return decode_model(header, frames[1:], KEYS.get, limits)
    except WireError as exc:
        assert exc.reason and str(exc).startswith(exc.reason)
        return exc.reason


# ---- the model wire format ------------------------------------------------------------------


@fuzz
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(
    [k for k in ZMQ_KINDS if k not in (Kind.LARGE_FRAME, Kind.MANY_PARTS)]))
def test_every_hostile_kind_is_a_wire_error_or_a_checked_model(seed: int, kind: Kind,
                                                               tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (_, frames), = zmq_messages(ALICE, 1, job="j", kinds=[kind], seed=seed, marker=marker)
    got = decode_or_reason(frames)
    if isinstance(got, ModelMessage):
        # only signed models of the right size get through the wire; the validator judges
        assert kind in (Kind.NAN_WEIGHTS, Kind.WRONG_ARCHITECTURE, Kind.MUTATED)
    assert not marker.exists()


def test_each_hostile_kind_has_its_reason() -> None:
    reasons: dict[Kind, set[Any]] = {}
    for seed in range(8):
        for kind, frames in zmq_messages(ALICE, len(ZMQ_KINDS), job="j", seed=seed,
                                         large_bytes=4096):
            got = decode_or_reason(frames)
            reasons.setdefault(kind, set()).add(
                "model" if isinstance(got, ModelMessage) else got)
    assert reasons[Kind.NOT_MSGPACK] == {"malformed"}
    assert reasons[Kind.PICKLE] <= {"malformed", "bad_dtype"}
    assert reasons[Kind.BAD_VERSION] == {"bad_version"}
    assert reasons[Kind.HEADER_TOO_LARGE] == {"header_too_large"}
    assert reasons[Kind.BAD_DIGEST] == {"bad_digest"}
    assert reasons[Kind.SHAPE_BOMB] <= {"bad_shape", "too_large"}
    assert reasons[Kind.BAD_DTYPE] == {"bad_dtype"}
    assert reasons[Kind.TRUNCATED_MODEL] <= {"truncated", "bad_size"}
    assert reasons[Kind.MANY_PARTS] == reasons[Kind.LARGE_FRAME] == {"truncated"}
    assert reasons[Kind.NAN_WEIGHTS] == {"model"}  # the wire is finite-agnostic: see below
    assert reasons[Kind.NOT_A_REQUEST] == {None}  # control frames: refused by the host


dims = st.integers(-(2**63), 2**64 - 1) | st.sampled_from([0, 1, 2**31, 2**32, 2**63, -1])
dtypes = st.sampled_from(["float32", "int8", "bool", "O", "object", "<U8", "U", "S4", "V8",
                          "complex64", "complex128", "float128", ">f4", "<f4", "f4", "datetime64",
                          "[('a', '<f4')]", "M8[s]", "bfloat16", "float", "int"]) | st.text(
    max_size=8)


@fuzz
@given(shape=st.lists(dims | st.floats() | st.booleans() | st.none(), max_size=10),
       dtype=dtypes, codec=st.sampled_from(["raw", "fp16", "int8"]),
       payload_len=st.integers(0, 4096))
def test_shape_and_dtype_bombs_allocate_nothing(shape: list[Any], dtype: Any, codec: str,
                                                 payload_len: int) -> None:
    header = {"v": WIRE_VERSION, "type": "model", "job": "j", "sender": ALICE.peer_id,
              "epoch": 1, "samples": 1, "codec": codec, "arrays": [["w", dtype, shape, codec]],
              "digest": bytes(32), "signature": bytes(64)}
    if codec == "int8":
        header["block"] = 256
    frame = msgpack.packb(header, use_bin_type=True)
    decode_or_reason([frame, bytes(payload_len)], SMALL)  # first-use allocations not counted
    tracemalloc.start()
    try:
        got = decode_or_reason([frame, bytes(payload_len)], SMALL)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(got, str)  # all zeros never carry a valid signature
    # a bomb would allocate gigabytes; 1 MiB covers msgpack, hashing and the error
    assert peak < 1 << 20, f"{peak} bytes allocated for a refused header"


@fuzz
@given(data=st.data())
def test_mutated_signed_models_never_escape_the_checks(data: st.DataObject) -> None:
    arrays = [NamedArray("w", np.arange(64, dtype=np.float32).reshape(8, 8)),
              NamedArray("n", np.arange(5, dtype=np.int64))]
    codec = data.draw(st.sampled_from(["raw", "fp16", "int8"]))
    header, payloads = model_parts(ModelMessage("j", ALICE.peer_id, 1, 10, arrays, codec=codec),
                                   ALICE)
    frames = [bytearray(pack_header(header)), *(bytearray(p) for p in payloads)]
    for _ in range(data.draw(st.integers(1, 6))):
        which = data.draw(st.integers(0, len(frames) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "extend", "drop", "dup"]))
        frame = frames[which]
        if op == "flip" and frame:
            frame[data.draw(st.integers(0, len(frame) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del frame[data.draw(st.integers(0, len(frame))):]
        elif op == "extend":
            frame += data.draw(st.binary(min_size=1, max_size=16))
        elif op == "drop" and len(frames) > 1:
            del frames[which]
        elif op == "dup":
            frames.insert(which, bytearray(frame))
    got = decode_or_reason([bytes(f) for f in frames])
    if isinstance(got, ModelMessage):  # a mutation that changed nothing the digest covers
        assert [a.name for a in got.arrays] == ["w", "n"]
        assert got.digest == header["digest"]


def test_int8_scales_of_nan_or_negative_are_refused_on_the_wire() -> None:
    arrays = [NamedArray("w", np.ones(300, dtype=np.float32))]
    header, payloads = model_parts(ModelMessage("j", ALICE.peer_id, 1, 10, arrays, codec="int8"),
                                   ALICE)
    for bad in (np.nan, np.inf, -1.0):
        payload = bytearray(payloads[0])
        payload[:4] = struct.pack("<f", bad)  # the first block's scale
        assert decode_or_reason([pack_header(header), bytes(payload)]) == "bad_payload"


# ---- NaN/Inf: refused by the encoders, and by the learner's validator -------------------------


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from learner.peer import Peer, PeerConfig

    tmp = tmp_path_factory.mktemp("peer")
    return Peer(PeerConfig(num=0, total=1, rendezvous="127.0.0.1:1", device="cpu",
                           key_file=str(tmp / "k.pem"), checkpoint_file=str(tmp / "c.ckpt"),
                           progress=False))


def peer_model(peer: Any, codec: str = "raw") -> ModelMessage:
    from learner.convert import state_to_arrays

    return ModelMessage("mnist", ALICE.peer_id, 1, 100,
                        state_to_arrays(peer.reference, copy=True), codec=codec)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 7), pos=st.floats(0, 1, exclude_max=True),
       value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_validator_refuses_non_finite_weights_that_the_raw_wire_carries(
        peer: Any, which: int, pos: float, value: float) -> None:
    msg = peer_model(peer)
    floats = [a for a in msg.arrays if a.array.dtype.kind == "f"]
    target = floats[which % len(floats)].array.reshape(-1)
    target[int(pos * target.size)] = value
    header, payloads = model_parts(msg, ALICE)
    got = decode_model(header, payloads, KEYS.get)  # signed, right size: the wire lets it in
    with pytest.raises(WireError) as info:
        peer.validate(got)
    assert info.value.reason == "non_finite"
    for codec in ("fp16", "int8"):  # the lossy encoders refuse to carry it at all
        with pytest.raises(WireError) as info:
            model_parts(ModelMessage("mnist", ALICE.peer_id, 1, 100, msg.arrays, codec=codec),
                        ALICE)
        assert info.value.reason == "non_finite"


def test_validator_refuses_hostile_models_of_every_kind(peer: Any, tmp_path: Path) -> None:
    from learner.convert import state_to_arrays

    template = [(a.name, a.array.dtype.name, a.array.shape)
                for a in state_to_arrays(peer.reference)]
    refused: dict[str, int] = {}
    accepted = 0
    for kind, frames in zmq_messages(ALICE, 40, job="mnist", template=template, seed=3,
                                     kinds=[Kind.NAN_WEIGHTS, Kind.WRONG_ARCHITECTURE],
                                     marker=tmp_path / "pwned"):
        got = decode_or_reason(frames)
        assert isinstance(got, ModelMessage), (kind, got)
        try:
            peer.validate(got)
            accepted += 1
        except WireError as exc:
            refused[exc.reason] = refused.get(exc.reason, 0) + 1
    assert accepted == 0
    assert set(refused) == {"non_finite", "model_mismatch"}
    h, p = model_parts(peer_model(peer), ALICE)
    ok = decode_or_reason([pack_header(h), *(bytes(x) for x in p)])
    assert isinstance(ok, ModelMessage)
    peer.validate(ok)  # and an honest one passes


def test_a_peer_accepts_nothing_larger_than_its_own_model(peer: Any) -> None:
    limits = peer.limits
    assert limits.max_total_bytes == sum(t.numel() * t.element_size()
                                         for t in peer.reference.values())
    assert limits.max_arrays == len(peer.reference)
    h, p = model_parts(peer_model(peer), ALICE)
    assert isinstance(decode_or_reason([pack_header(h), *(bytes(x) for x in p)], limits),
                      ModelMessage)
    msg = peer_model(peer)
    msg.arrays[0] = NamedArray(msg.arrays[0].name, np.zeros(msg.arrays[0].array.size + 1,
                                                            dtype=np.float32))
    h, p = model_parts(msg, ALICE)
    assert decode_or_reason([pack_header(h), *(bytes(x) for x in p)], limits) == "too_large"
    msg = peer_model(peer)
    msg.arrays.append(NamedArray("extra", np.zeros(1, dtype=np.float32)))
    h, p = model_parts(msg, ALICE)
    assert decode_or_reason([pack_header(h), *(bytes(x) for x in p)], limits) in (
        "too_many_arrays", "too_large")


# ---- WebRTC chunk framing and reassembly ----------------------------------------------------


@fuzz
@given(message=st.binary(max_size=80))
def test_chunk_header_unpack_gives_a_header_or_a_chunk_error(message: bytes) -> None:
    try:
        head = ChunkHeader.unpack(message)
    except ChunkError as exc:
        assert exc.reason == "bad_chunk"
        return
    assert head.pack() == message[: CHUNK_HEADER.size]


async def _noop_signal(peer: str, kind: str, data: dict[str, Any]) -> None:
    pass


async def _reassemble(messages: list[bytes | str], limits: Limits) -> tuple[list[list[bytes]],
                                                                             WebRtcTransport,
                                                                             int]:
    """Feed ``messages`` to a fresh link's receive path; (delivered requests, transport, peak
    buffered bytes)."""
    got: list[list[bytes]] = []

    async def handler(header: dict[str, Any], payloads: list[memoryview], *_: Any) -> None:
        got.append([bytes(p) for p in payloads])
        return None

    transport = WebRtcTransport(Identity.generate(), [], handler, limits,
                                send_signal=_noop_signal,
                                chunk_idle_timeout=5)
    link = transport._new_link("z" * 32, reason="fuzz")
    peak = 0
    try:
        for message in messages:
            link._on_message(message)
            peak = max(peak, sum(len(i.buf) for i in link._incoming.values()))
        for _ in range(5):
            await asyncio.sleep(0)
        assert link._requests_active >= 0
    finally:
        await transport.close()
    return got, transport, peak


def _transfer(tid: int, payload_sizes: list[int]) -> tuple[list[bytes], list[bytes]]:
    frames = [msgpack.packb({"v": 1, "type": "ping", "request_id": str(tid)}),
              *(bytes([tid % 251]) * n for n in payload_sizes)]
    return frames, list(iter_chunks(tid, frames))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_reassembly_of_mutated_chunk_streams(data: st.DataObject) -> None:
    limits = Limits(max_total_bytes=3 * CHUNK_SIZE, max_arrays=8, max_header_bytes=4096)
    sent: list[list[bytes]] = []
    messages: list[bytes | str] = []
    for tid in range(data.draw(st.integers(1, 3))):
        frames, chunks = _transfer(tid, data.draw(st.lists(st.integers(0, CHUNK_SIZE + 100),
                                                           max_size=3)))
        sent.append(frames)
        messages += chunks
    clean = list(messages)
    content_changed = False  # the channel itself has no checksum: the model digest catches it
    for _ in range(data.draw(st.integers(0, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "drop", "dup", "swap", "text",
                                        "garbage", "header"]))
        content_changed |= op in ("flip", "garbage", "header")
        i = data.draw(st.integers(0, len(messages) - 1))
        m = messages[i]
        if op == "flip" and isinstance(m, bytes) and m:
            b = bytearray(m)
            b[data.draw(st.integers(0, len(b) - 1))] ^= 1 << data.draw(st.integers(0, 7))
            messages[i] = bytes(b)
        elif op == "cut" and isinstance(m, bytes):
            messages[i] = m[: data.draw(st.integers(0, len(m)))]
        elif op == "drop" and len(messages) > 1:
            del messages[i]
        elif op == "dup":
            messages.insert(i, m)
        elif op == "swap":
            j = data.draw(st.integers(0, len(messages) - 1))
            messages[i], messages[j] = messages[j], messages[i]
        elif op == "text":
            messages.insert(i, data.draw(st.text(max_size=10)))
        elif op == "garbage":
            messages.insert(i, data.draw(st.binary(max_size=100)))
        elif op == "header":  # a first chunk with arbitrary counts and sizes
            messages.insert(i, ChunkHeader(
                1, data.draw(st.sampled_from([0, 1])), data.draw(st.integers(0, 2**32 - 1)),
                0, data.draw(st.integers(0, 2**32 - 1)), data.draw(st.integers(0, 2**32 - 1)),
                data.draw(st.integers(0, 2**64 - 1))).pack() + data.draw(st.binary(max_size=64)))
    got, transport, peak = asyncio.run(_reassemble(messages, limits))
    max_transfer = limits.max_total_bytes + limits.max_header_bytes + 8 * (limits.max_arrays + 3)
    assert peak <= 4 * max_transfer  # at most MAX_TRANSFERS transfers, each within the limits
    first_chunks = sum(isinstance(m, bytes) and len(m) >= CHUNK_HEADER.size
                       and CHUNK_HEADER.unpack_from(m)[4] == 0 for m in messages)
    assert len(got) <= first_chunks  # nothing is handed up that did not start as a transfer
    if not content_changed:  # whatever was delivered is exactly one of the transfers sent
        for frames in got:
            assert frames in [s[1:] for s in sent]
    if messages == clean:
        assert len(got) == len(sent) and not transport.stats.rejected


# ---- the rendezvous protocol -----------------------------------------------------------------

leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
        | st.text(max_size=20) | st.binary(max_size=40))
keys_ = st.text(max_size=8) | st.integers(-100, 100)
values = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(keys_, inner, max_size=4), max_leaves=8)
rendezvous_maps = st.fixed_dictionaries(
    {"type": st.sampled_from([t.value for t in MsgType]) | leaf},
    optional={name: values for name in ["public_key", "signature", "job", "addrs", "meta", "epoch",
                                        "metrics", "links", "kind", "data", "to", "from"]},
)


def _check_fields(msg_type: MsgType, fields: dict[str, Any]) -> None:
    """What the server applies to a decoded message (each raises ProtocolError)."""
    if msg_type is MsgType.JOIN:
        check_job(fields["job"])
        check_addrs(fields["addrs"])
        check_meta(fields["meta"])
    elif msg_type is MsgType.REPORT:
        check_meta(fields["metrics"])
    elif msg_type is MsgType.LINKS:
        check_links(fields["links"])
    elif msg_type is MsgType.SIGNAL:
        check_signal(fields, "to")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=rendezvous_maps | values, raw=st.binary(max_size=200), text=st.text(max_size=20))
def test_rendezvous_decode_and_checks_only_raise_protocol_error(obj: Any, raw: bytes,
                                                                text: str) -> None:
    for data in (msgpack.packb(obj, use_bin_type=True), raw, text, pickle_bomb()):
        try:
            msg_type, fields = decode(data)
            _check_fields(msg_type, fields)
        except ProtocolError as exc:
            assert exc.code and str(exc).startswith(exc.code)


def test_rendezvous_decode_refuses_oversized_and_deep_input() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(b"\x80" + bytes(64 * 1024))
    assert info.value.code == "too_large"
    deep = b"\x91" * 5000 + b"\xc0"  # 5000 nested one-element arrays
    with pytest.raises(ProtocolError) as info:
        decode(deep)
    assert info.value.code == "malformed"
    wide = msgpack.packb({"type": "report", "epoch": 1, "metrics": {str(i): i for i in range(300)}})
    with pytest.raises(ProtocolError) as info:
        decode(wide)
    assert info.value.code == "malformed"


# ---- STUN ------------------------------------------------------------------------------------


def _valid_stun() -> bytes:
    msg = Message(Method.BINDING, Class.REQUEST, bytes(range(12)))
    msg.attributes["SOFTWARE"] = "x"
    msg.attributes["FINGERPRINT"] = 0
    return bytes(msg)


@fuzz
@given(data=st.binary(max_size=200) | st.builds(
    lambda base, cut, flips: bytes(_mutate(bytearray(base), cut, flips)),
    st.just(_valid_stun()), st.integers(0, 60),
    st.lists(st.tuples(st.integers(0, 59), st.integers(0, 7)), max_size=4)))
def test_stun_parser_and_server_on_any_datagram(data: bytes) -> None:
    try:
        parse_message(data)
    except StunParseError as exc:
        assert exc.reason
    server = StunServer("127.0.0.1", 0)
    reply = server.handle(data, ("127.0.0.1", 4000))
    assert sum(server.counters.values()) == 1, server.counters  # every datagram is counted
    assert "internal_error" not in server.counters
    if reply is not None:
        assert len(reply) <= 1500
        parse_message(reply)


def _mutate(buf: bytearray, cut: int, flips: list[tuple[int, int]]) -> bytearray:
    for pos, bit in flips:
        if pos < len(buf):
            buf[pos] ^= 1 << bit
    return buf[: len(buf) - cut] if cut else buf


def test_stun_hostile_kinds_are_counted_by_reason() -> None:
    server = StunServer("127.0.0.1", 0)
    replies = 0
    for _, data in stun_datagrams(400, seed=1):
        replies += server.handle(data, ("127.0.0.1", 4000)) is not None
    assert sum(server.counters.values()) == 400
    assert "internal_error" not in server.counters
    assert server.counters["answered"] == replies - server.counters["error_420"] - server.counters[
        "error_400"]
    assert {"short", "bad_length", "bad_attribute", "bad_fingerprint",
            "too_large", "answered"} <= set(server.counters)
    # a request without the magic cookie is an RFC 3489 client's, answered (RFC 5389 section 12.2)
    assert server.answered_by_kind["rfc3489"] > 0 and server.answered_by_kind["rfc5389"] > 0
    assert sum(server.answered_by_kind.values()) == server.counters["answered"]


def test_pickled_frames_are_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bomb = pickle_bomb(marker)
    assert decode_or_reason([bomb]) == "malformed"
    with pytest.raises(ProtocolError):
        decode(bomb)
    with pytest.raises(StunParseError):
        parse_message(bomb)
    with pytest.raises(ChunkError):
        ChunkHeader.unpack(bomb[:20])
    assert not marker.exists()
    pickle.loads(bomb)  # the trap does work
    assert marker.exists()
