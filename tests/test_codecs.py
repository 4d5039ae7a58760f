"""Compressed models on the wire (overlay.codecs): round trips within the error bounds, sizes,
and every bad encoded payload refused with its reason.

tests/data/model_int8.msgpack holds the frames of ``golden_message()`` (codec int8) signed by
the key of tests/test_wire.py; regenerate after a deliberate format change with::

    .venv/bin/python -c "import tests.test_codecs as t; t.write_golden()"
"""

from __future__ import annotations

import math
import time
import tracemalloc
from pathlib import Path
from typing import Any, Literal

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from overlay import wire
from overlay.codecs import BLOCK, CODECS, FLOAT_DTYPES, encoding_for
from overlay.errors import WireError
from overlay.identity import DOMAIN_MODEL
from overlay.wire import (
    Limits,
    ModelMessage,
    NamedArray,
    decode_header,
    decode_model,
    encode_model,
    model_parts,
    pack_header,
)
from tests.test_wire import ALICE, keys, message, reason_of

GOLDEN = Path(__file__).parent / "data" / "model_int8.msgpack"
F32_TINY = float(np.finfo(np.float32).smallest_subnormal)


def round_trip(arrays: list[NamedArray], codec: str) -> tuple[list[NamedArray], dict[str, Any]]:
    frames = encode_model(message(arrays, codec=codec), ALICE)
    header = decode_header(bytes(frames[0]))
    got = decode_model(header, [bytes(f) for f in frames[1:]], keys)
    assert got.codec == codec
    return got.arrays, header


def signed(codec: str, arrays: list[NamedArray]) -> tuple[dict[str, Any], list[bytes]]:
    header, payloads = model_parts(message(arrays, codec=codec), ALICE)
    return header, [bytes(p) for p in payloads]


def resign(header: dict[str, Any], payloads: list[bytes]) -> dict[str, Any]:
    """``header`` with a valid digest and signature by ALICE over whatever it now says."""
    meta = wire._canonical_meta(header["job"], header["sender"], header["epoch"],
                                header["samples"], header["codec"], header.get("block"),
                                header["arrays"], header.get("hash", wire.SHA256))
    digest = wire._digest(meta, payloads, header.get("hash", wire.SHA256))
    return {**header, "digest": digest, "signature": ALICE.sign(DOMAIN_MODEL + digest)}


def int8_bound(x: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Per element: scale / 254 plus float rounding, scale = the absmax of its block."""
    flat = np.abs(x.astype(np.float64).ravel())
    padded = np.zeros(-(-flat.size // block) * block)
    padded[: flat.size] = flat
    scale = np.repeat(padded.reshape(-1, block).max(axis=1), block)[: flat.size]
    finfo = np.finfo(x.dtype)
    return scale / 254 + 2 * float(finfo.eps) * scale + 2 * max(
        float(finfo.smallest_subnormal), F32_TINY)


def assert_within_bound(got: np.ndarray, want: np.ndarray, enc: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = np.abs(got.astype(np.float64) - want.astype(np.float64)).ravel()
    if enc == "raw":
        np.testing.assert_array_equal(got, want)
    elif enc == "fp16":
        ref = np.abs(want.astype(np.float64)).ravel()
        assert (err <= np.maximum(ref * 2.0**-11, 2.0**-25)).all()
    else:
        assert (err <= int8_bound(want)).all(), float((err - int8_bound(want)).max())


# ---- round trips ----------------------------------------------------------------------------


def mixed_arrays(seed: int = 0) -> list[NamedArray]:
    rng = np.random.default_rng(seed)
    out = []
    for dtype in ["float32", "float64", "float16", "int64", "int8", "uint8", "bool"]:
        for shape in [(3, 700), (), (0,), (0, 3), (1,), (255,), (257,), (BLOCK,), (5, 7, 11)]:
            values = rng.standard_normal(shape) * 3
            out.append(NamedArray(f"{dtype}/{shape}", values.astype(dtype)))
    return out


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_round_trip_each_codec_and_dtype(codec: str) -> None:
    arrays = mixed_arrays()
    got, header = round_trip(arrays, codec)
    assert [a.name for a in got] == [a.name for a in arrays]
    for g, w, spec in zip(got, arrays, header["arrays"], strict=True):
        enc = spec[3]
        assert spec[1:3] == [w.array.dtype.name, list(w.array.shape)]
        assert enc == (codec if w.array.dtype.name in FLOAT_DTYPES else "raw") or (
            codec == "fp16" and w.array.dtype.name == "float16" and enc == "raw")
        assert_within_bound(g.array, w.array, enc)
    assert ("block" in header) == (codec == "int8")


def test_encoding_table() -> None:
    assert encoding_for("int8", "float16") == "int8"
    assert encoding_for("fp16", "float16") == "raw"  # already float16: no gain
    assert encoding_for("fp16", "float64") == "fp16"
    assert all(encoding_for(c, "int32") == "raw" for c in CODECS)


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_reconstructed_arrays_are_writable_native_and_non_contiguous_input_works(
        codec: str) -> None:
    base = np.random.default_rng(2).standard_normal((6, 9))
    arrays = [NamedArray("be", base.astype(">f4")), NamedArray("strided", base[:, ::2]),
              NamedArray("fortran", np.asfortranarray(base.astype(np.float32)))]
    got, _ = round_trip(arrays, codec)
    for g, w in zip(got, arrays, strict=True):
        assert g.array.flags.writeable and g.array.dtype.isnative
        assert_within_bound(g.array, w.array.astype(w.array.dtype.newbyteorder("=")), codec)


def test_all_zero_blocks_have_scale_zero_and_come_back_exactly() -> None:
    x = np.zeros(3 * BLOCK + 5, np.float32)
    x[BLOCK : 2 * BLOCK] = np.linspace(-1, 1, BLOCK)  # one non-zero block among zeros
    header, payloads = signed("int8", [NamedArray("z", x)])
    scales = np.frombuffer(payloads[0], "<f4", count=4)
    np.testing.assert_array_equal(scales, [0, 1, 0, 0])
    got = decode_model(header, payloads, keys).arrays[0].array
    assert not got[:BLOCK].any() and not got[2 * BLOCK :].any()
    assert got[BLOCK] == -1 and got[2 * BLOCK - 1] == 1


def test_fp16_relative_error_for_normal_range_values() -> None:
    rng = np.random.default_rng(3)
    magnitudes = 10.0 ** rng.uniform(-4, 4.8, 50_000)  # 2**-14 < 1e-4, 10**4.8 < 65504
    for dtype in ["float32", "float64"]:
        x = (magnitudes * rng.choice([-1, 1], magnitudes.size)).astype(dtype)
        got = round_trip([NamedArray("x", x)], "fp16")[0][0].array
        rel = np.abs(got.astype(np.float64) / x.astype(np.float64) - 1)
        assert rel.max() <= 2.0**-11


@pytest.mark.parametrize("dtype", sorted(FLOAT_DTYPES))
def test_int8_max_error_within_scale_over_254_per_block(dtype: str) -> None:
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(10 * BLOCK + 77) * rng.uniform(0.01, 10)).astype(dtype)
    got = round_trip([NamedArray("x", x)], "int8")[0][0].array
    err = np.abs(got.astype(np.float64) - x.astype(np.float64))
    assert (err <= int8_bound(x)).all()
    assert err.max() > 0  # really quantized


def test_int8_outlier_only_costs_its_own_block() -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(4 * BLOCK) * 0.01).astype(np.float32)
    x[BLOCK + 17] = 1e4
    got = round_trip([NamedArray("x", x)], "int8")[0][0].array
    err = np.abs(got - x)
    assert got[BLOCK + 17] == np.float32(1e4)  # the outlier itself is exact
    assert err[BLOCK : 2 * BLOCK].max() <= 1e4 / 254 * (1 + 1e-6)  # its block: coarse
    others = np.r_[err[:BLOCK], err[2 * BLOCK :]]
    assert others.max() <= np.abs(x[:BLOCK]).max() * 0.01  # the others: unaffected
    assert (err <= int8_bound(x)).all()


def test_float64_blocks_beyond_float32_range() -> None:
    tiny = np.full(10, 1e-300)  # the float32 scale rounds to 0: comes back as 0
    got = round_trip([NamedArray("t", tiny)], "int8")[0][0].array
    assert (np.abs(got - tiny) <= int8_bound(tiny)).all()
    with pytest.raises(WireError) as info:
        encode_model(message([NamedArray("h", np.array([1e39, 1.0]))], codec="int8"), ALICE)
    assert info.value.reason == "int8_overflow"


# ---- what the sender refuses -----------------------------------------------------------------


@pytest.mark.parametrize("value", [65520.0, -1e5, 1e300])
def test_fp16_overflow_is_refused_so_the_sender_can_send_raw(value: float) -> None:
    x = np.array([1.0, value])
    with pytest.raises(WireError) as info:
        encode_model(message([NamedArray("x", x)], codec="fp16"), ALICE)
    assert info.value.reason == "fp16_overflow"
    assert round_trip([NamedArray("x", np.array([65504.0, -65504.0]))], "fp16")[0][0].array[0] \
        == 65504.0
    np.testing.assert_array_equal(round_trip([NamedArray("x", x)], "raw")[0][0].array, x)


@pytest.mark.parametrize("codec", ["fp16", "int8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_by_lossy_encoders(codec: str, bad: float) -> None:
    x = np.ones(300, np.float32)
    x[299] = bad
    with pytest.raises(WireError) as info:
        encode_model(message([NamedArray("x", x)], codec=codec), ALICE)
    assert info.value.reason == "non_finite"


# ---- what the receiver refuses -----------------------------------------------------------------


def int8_model() -> list[NamedArray]:
    rng = np.random.default_rng(6)
    return [NamedArray("w", rng.standard_normal(300).astype(np.float32)),  # 2 blocks: 8 + 300
            NamedArray("i", np.arange(5, dtype=np.int32))]


def test_int8_payload_length_is_exact() -> None:
    header, payloads = signed("int8", int8_model())
    assert len(payloads[0]) == 2 * 4 + 300 and len(payloads[1]) == 20
    for bad in (payloads[0][:-1], payloads[0] + b"\0", payloads[0][8:], payloads[0] + bytes(4)):
        assert reason_of(header, [bad, payloads[1]]) == "bad_size"


@pytest.mark.parametrize("scale", [np.nan, np.inf, -1.0, -0.0 - 1e-30])
def test_bad_scales(scale: float) -> None:
    header, payloads = signed("int8", int8_model())
    tampered = bytearray(payloads[0])
    tampered[4:8] = np.array([scale], "<f4").tobytes()
    bad = [bytes(tampered), payloads[1]]
    assert reason_of(header, bad) == "bad_payload"
    assert reason_of(resign(header, bad), bad) == "bad_payload"  # even when properly signed


def test_negative_zero_scale_is_harmless() -> None:
    header, payloads = signed("int8", int8_model())
    tampered = bytearray(payloads[0])
    tampered[4:8] = np.array([-0.0], "<f4").tobytes()
    bad = [bytes(tampered), payloads[1]]
    assert not decode_model(resign(header, bad), bad, keys).arrays[0].array[BLOCK:].any()


@pytest.mark.parametrize(("index", "enc", "reason"), [
    (0, "zstd", "bad_codec"),
    (0, 8, "bad_codec"),
    (0, None, "bad_codec"),
    (0, "fp16", "bad_codec"),  # not this message's codec
    (0, "raw", "bad_codec"),  # a float array must travel in the message's codec
    (1, "int8", "bad_codec"),  # int8 declared for an int array
])
def test_encoding_must_be_what_the_table_says(index: int, enc: Any, reason: str) -> None:
    header, payloads = signed("int8", int8_model())
    header["arrays"][index][3] = enc
    assert reason_of(header, payloads) == reason


def test_fp16_for_an_int_array_and_for_float16_is_refused() -> None:
    arrays = [NamedArray("h", np.ones(4, np.float16)), NamedArray("i", np.ones(4, np.int16))]
    header, payloads = signed("fp16", arrays)
    assert [s[3] for s in header["arrays"]] == ["raw", "raw"]
    for index in (0, 1):
        h = msgpack.unpackb(pack_header(header), raw=False)
        h["arrays"][index][3] = "fp16"
        assert reason_of(h, payloads) == "bad_codec"


def test_tampered_codes_scales_block_or_codec() -> None:
    header, payloads = signed("int8", int8_model())
    for pos in (0, 9, len(payloads[0]) - 1):  # a scale, the first code, the last code
        tampered = bytearray(payloads[0])
        tampered[pos] ^= 0x01
        assert reason_of(header, [bytes(tampered), payloads[1]]) == "bad_digest"
    assert reason_of({**header, "block": 128}, payloads) == "bad_size"  # 3 scales, not 2
    assert reason_of({**header, "block": 200}, payloads) == "bad_digest"  # 2 scales still


@pytest.mark.parametrize(("block", "reason"), [
    (0, "bad_codec"), (-1, "bad_codec"), (2**16 + 1, "bad_codec"), ("256", "malformed"),
    (256.0, "malformed"), (True, "malformed"), (None, "malformed"),
])
def test_bad_block(block: Any, reason: str) -> None:
    header, payloads = signed("int8", int8_model())
    header["block"] = block
    assert reason_of(header, payloads) == reason
    del header["block"]
    assert reason_of(header, payloads) == "malformed"


def test_block_in_a_message_without_int8_is_malformed() -> None:
    header, payloads = signed("fp16", int8_model())
    assert reason_of({**header, "block": 256}, payloads) == "malformed"


def test_size_limit_applies_to_reconstruction_and_to_payload() -> None:
    x = np.zeros(1000, np.float32)  # 4000 bytes reconstructed, 1000 + 16 on the wire
    header, payloads = signed("int8", [NamedArray("x", x)])
    assert sum(map(len, payloads)) == 1016
    assert reason_of(header, payloads, Limits(max_total_bytes=3999)) == "too_large"
    decode_model(header, payloads, keys, Limits(max_total_bytes=4000))

    # block 1 on float16: 5 bytes per value travel for 2 reconstructed
    h = {**header, "block": 1, "arrays": [["h", "float16", [100], "int8"]]}
    assert reason_of(h, [bytes(500)], Limits(max_total_bytes=499)) == "too_large"
    assert reason_of(h, [bytes(500)], Limits(max_total_bytes=500)) == "bad_digest"


def test_int8_shape_bomb_is_too_large_before_any_allocation() -> None:
    header, _ = signed("int8", int8_model())
    header["arrays"] = [["w", "float64", [2**31, 2**31], "int8"]]
    frame = msgpack.packb(header, use_bin_type=True)
    tracemalloc.start()
    try:
        with pytest.raises(WireError) as info:
            decode_model(decode_header(frame), [bytes(4096)], keys)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == "too_large"
    assert peak < 1_000_000


# ---- sizes and speed -----------------------------------------------------------------------


def cnn_model() -> list[NamedArray]:
    """MNIST-sized CNN, ~1.2M float32 parameters, plus an int64 step counter."""
    rng = np.random.default_rng(7)
    shapes = {"conv1.weight": (32, 1, 3, 3), "conv1.bias": (32,),
              "conv2.weight": (64, 32, 3, 3), "conv2.bias": (64,),
              "fc1.weight": (128, 9216), "fc1.bias": (128,),
              "fc2.weight": (10, 128), "fc2.bias": (10,)}
    arrays = [NamedArray(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))
              for name, shape in shapes.items()]
    return [*arrays, NamedArray("steps", np.array(1234, np.int64))]


def wire_bytes(codec: str, arrays: list[NamedArray]) -> int:
    return sum(len(f) for f in encode_model(message(arrays, codec=codec), ALICE))


def test_bytes_on_the_wire_for_a_cnn() -> None:
    arrays = cnn_model()
    assert 1_150_000 < sum(a.array.size for a in arrays) < 1_250_000
    raw = wire_bytes("raw", arrays)
    assert 0.49 < wire_bytes("fp16", arrays) / raw < 0.51
    assert 0.25 < wire_bytes("int8", arrays) / raw < 0.27  # 1/4 + 1/256 for the scales


def test_int8_is_vectorized() -> None:
    """Generous bound, for a loaded CI machine: a Python loop over 1.2M values takes > 1 s."""
    arrays = cnn_model()
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        frames = encode_model(message(arrays, codec="int8"), ALICE)
        decode_model(decode_header(bytes(frames[0])), frames[1:], keys)
        best = min(best, time.perf_counter() - started)
    assert best < 0.5


# ---- recorded frames -----------------------------------------------------------------------


def golden_message() -> ModelMessage:
    return message([
        NamedArray("layer.weight", np.linspace(-1, 1, 300, dtype=np.float32).reshape(3, 100)),
        NamedArray("layer.bias", np.array([0.5, -0.25], dtype=np.float64)),
        NamedArray("steps", np.array(7, dtype=np.int64)),
    ], codec="int8", hash=wire.SHA256, request_id="golden")  # recorded before blake3


def write_golden() -> None:
    frames = [bytes(f) for f in encode_model(golden_message(), ALICE)]
    GOLDEN.write_bytes(msgpack.packb(frames, use_bin_type=True))


def test_recorded_int8_frames_decode_and_encoding_has_not_drifted() -> None:
    recorded = msgpack.unpackb(GOLDEN.read_bytes(), raw=False)
    header = decode_header(recorded[0])
    assert header["codec"] == "int8" and header["block"] == BLOCK
    assert header["arrays"][0] == ["layer.weight", "float32", [3, 100], "int8"]
    got = decode_model(header, recorded[1:], keys)
    for g, w in zip(got.arrays, golden_message().arrays, strict=True):
        assert_within_bound(g.array, w.array, "raw" if w.name == "steps" else "int8")
    assert [bytes(f) for f in encode_model(golden_message(), ALICE)] == recorded


# ---- property ------------------------------------------------------------------------------

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=300)


@st.composite
def float_arrays(draw: st.DrawFn, codec: str) -> np.ndarray:
    dtype = draw(st.sampled_from(sorted(FLOAT_DTYPES)))
    widths: dict[str, Literal[16, 32, 64]] = {"float16": 16, "float32": 32, "float64": 64}
    width = widths[dtype]
    bound = 6e4 if codec == "fp16" or dtype == "float16" else 2.0**100
    elements = st.floats(-bound, bound, width=width, allow_nan=False, allow_infinity=False)
    return draw(hnp.arrays(dtype, draw(shapes), elements=elements))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), codec=st.sampled_from(["fp16", "int8"]))
def test_random_float_arrays_round_trip_within_the_bound(data: st.DataObject, codec: str) -> None:
    x = data.draw(float_arrays(codec))
    got = round_trip([NamedArray("x", x)], codec)[0][0].array
    enc = encoding_for(codec, x.dtype.name)
    if enc == "fp16":  # below float16's normal range the error is absolute
        err = np.abs(got.astype(np.float64) - x.astype(np.float64))
        assert (err <= np.maximum(np.abs(x.astype(np.float64)) * 2.0**-11, 2.0**-25)).all()
    else:
        assert_within_bound(got, x, enc)
