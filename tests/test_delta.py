"""Compressed deltas (overlay.delta): round trips within each codec's documented bound, payload
sizes, hostile payloads refused with WireError, and error feedback recovering what a codec
drops."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from overlay import codecs
from overlay.delta import (
    Compressor,
    DeltaCodec,
    ErrorFeedback,
    int8,
    q4,
    topk,
    topk_int8,
)
from overlay.errors import WireError

F32_TINY = float(np.finfo(np.float32).smallest_subnormal)
DTYPES = ["float16", "float32", "float64"]
CODECS = {
    "int8": int8(),
    "int8/b7": int8(block=7),
    "q4": q4(),
    "q4/b128": q4(block=128),
    "q4/b5": q4(block=5),
    "topk": topk(0.01),
    "topk/f16": topk(0.05, values="float16"),
    "topk/all": topk(1.0),
    "topk_int8": topk_int8(0.01),
    "topk_int8/b3": topk_int8(0.3, block=3),
}
WIDTH: dict[str, Literal[16, 32, 64]] = {"float16": 16, "float32": 32, "float64": 64}
LEVELS = {Compressor.INT8: 127, Compressor.Q4: 7, Compressor.TOPK_INT8: 127}


def reason_of(info: pytest.ExceptionInfo[WireError]) -> str:
    return info.value.reason


# ---- the documented bounds, computed independently ------------------------------------------


def blockwise_bound(x: np.ndarray, block: int, levels: int, dtype: np.dtype) -> np.ndarray:
    """Per value: s / (2 levels) plus float rounding, s = the float32 absmax of its block."""
    flat = np.abs(x.astype(np.float64).ravel())
    padded = np.zeros(-(-flat.size // block) * block)
    padded[: flat.size] = flat
    absmax = padded.reshape(-1, block).max(axis=1).astype(np.float32).astype(np.float64)
    scale = np.repeat(absmax, block)[: flat.size]
    finfo = np.finfo(dtype)
    return scale / (2 * levels) + 4 * float(finfo.eps) * scale + 2 * max(
        float(finfo.smallest_subnormal), F32_TINY)


def kept_indices(codec: DeltaCodec, payload: bytes, n: int) -> np.ndarray:
    """topk's indices, read by the layout of the module's docstring."""
    return np.frombuffer(payload, "<u4", count=codec.k(n))


def assert_within_bound(codec: DeltaCodec, x: np.ndarray, payload: bytes,
                        got: np.ndarray) -> None:
    assert got.shape == x.shape and got.dtype == x.dtype
    assert got.flags.writeable and got.dtype.isnative
    assert np.isfinite(got).all()
    want = x.astype(np.float64).ravel()
    err = np.abs(got.astype(np.float64).ravel() - want)
    if codec.kind in (Compressor.INT8, Compressor.Q4):
        bound = blockwise_bound(x, codec.block, LEVELS[codec.kind], x.dtype)
        assert (err <= bound).all(), float((err - bound).max())
        return
    n = x.size
    index = kept_indices(codec, payload, n)
    assert index.size == codec.k(n) and (np.diff(index.astype(np.int64)) > 0).all()
    dropped = np.ones(n, bool)
    dropped[index] = False
    # the kept values are the largest magnitudes; the dropped ones come back as exact zeros
    if index.size and dropped.any():
        assert np.abs(want[dropped]).max() <= np.abs(want[index]).min()
    assert not got.ravel()[dropped].any()
    kept_err, kept = err[index], np.abs(want[index])
    if codec.kind == Compressor.TOPK_INT8:
        bound = blockwise_bound(x.ravel()[index], codec.block, 127, x.dtype)
    elif codec.values == "float16":
        bound = np.maximum(kept * 2.0**-11, 2.0**-25)
    elif x.dtype == np.float64:
        bound = np.maximum(kept * 2.0**-24, F32_TINY)
    else:
        bound = np.zeros_like(kept)  # float16/float32 values are exact in float32
    assert (kept_err <= bound).all(), float((kept_err - bound).max())


# ---- round trips ----------------------------------------------------------------------------


def delta_arrays(dtype: str, codec: DeltaCodec) -> st.SearchStrategy[np.ndarray]:
    # beyond: the encoder refuses (overflow)
    limit = 6e4 if dtype == "float16" or codec.values == "float16" else 2.0**100
    elements = st.floats(-limit, limit, width=WIDTH[dtype],
                         allow_nan=False, allow_infinity=False)
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40)
    return hnp.arrays(dtype, shapes, elements=elements)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label", sorted(CODECS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_within_the_documented_bound(label: str, dtype: str, data: st.DataObject
                                                ) -> None:
    codec = CODECS[label]
    x = data.draw(delta_arrays(dtype, codec))
    payload = codec.encode("x", x)
    assert isinstance(payload, bytes) and len(payload) == codec.payload_nbytes(x.shape)
    got = codec.decode(payload, x.shape, x.dtype, "x")
    assert_within_bound(codec, x, payload, got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label", sorted(CODECS))
@pytest.mark.parametrize("shape", [(0,), (), (1,), (0, 3), (1, 1), (255,), (257,), (3, 700)])
def test_round_trip_edge_shapes(label: str, dtype: str, shape: tuple[int, ...]) -> None:
    codec = CODECS[label]
    x = (np.random.default_rng(1).standard_normal(shape) * 3).astype(dtype)
    payload = codec.encode("x", x)
    assert len(payload) == codec.payload_nbytes(shape)
    assert_within_bound(codec, x, payload, codec.decode(payload, shape, dtype))


def test_big_endian_and_strided_deltas() -> None:
    base = np.random.default_rng(2).standard_normal((6, 90))
    for x in [base.astype(">f8"), base.astype(">f4"), base[:, ::2], np.asfortranarray(base)]:
        native = x.astype(x.dtype.newbyteorder("="))
        for codec in CODECS.values():
            payload = codec.encode("x", x)
            assert payload == codec.encode("x", np.ascontiguousarray(native))
            assert_within_bound(codec, native, payload, codec.decode(payload, x.shape, x.dtype))


def test_int8_payload_is_the_layout_of_overlay_codecs() -> None:
    rng = np.random.default_rng(3)
    for dtype in DTYPES:
        x = (rng.standard_normal(1000) * 0.01).astype(dtype)
        ours = int8(block=codecs.BLOCK).encode("x", x)
        assert ours == bytes(codecs.ENCODINGS["int8"].encode("x", x, codecs.BLOCK))


def test_zero_blocks_and_an_outlier_only_costs_its_block() -> None:
    x = (np.random.default_rng(4).standard_normal(4 * 64) * 0.01).astype(np.float32)
    x[64 + 5] = 100.0
    x[128:192] = 0
    codec = q4()
    got = codec.decode(codec.encode("x", x), x.shape, x.dtype)
    assert got[64 + 5] == np.float32(100.0) and not got[128:192].any()
    err = np.abs(got - x)
    others = np.r_[err[:64], err[192:]]
    assert others.max() <= np.abs(x).max(where=np.abs(x) < 1, initial=0) / 14 * (1 + 1e-6)


def test_topk_picks_the_largest_magnitudes() -> None:
    x = np.zeros(1000, np.float32)
    x[[3, 500, 999]] = [-5.0, 4.0, 3.0]
    x[10] = 0.5
    codec = topk(0.003)  # k = 3
    payload = codec.encode("x", x)
    assert codec.k(1000) == 3 and len(payload) == 24
    assert list(kept_indices(codec, payload, 1000)) == [3, 500, 999]
    got = codec.decode(payload, (1000,), "float32")
    np.testing.assert_array_equal(np.nonzero(got)[0], [3, 500, 999])
    assert got[3] == -5.0 and got[10] == 0


def test_k_is_computed_the_same_on_both_sides() -> None:
    codec = topk(0.01)
    assert [codec.k(n) for n in [0, 1, 99, 100, 101, 10_000]] == [0, 1, 1, 1, 2, 100]
    assert topk(1.0).k(7) == 7 and topk(1e-9).k(5) == 1


# ---- sizes ----------------------------------------------------------------------------------


def test_byte_ratios_against_raw_float32() -> None:
    n = 1_000_000
    x = np.random.default_rng(5).standard_normal(n).astype(np.float32)
    ratio = {label: len(CODECS[label].encode("x", x)) / x.nbytes
             for label in ["int8", "q4", "q4/b128", "topk", "topk_int8"]}
    ratio["topk/f16 1%"] = len(topk(0.01, values="float16").encode("x", x)) / x.nbytes
    assert 0.25 < ratio["int8"] < 0.255  # 1 + 4/256 bytes per value
    assert 0.14 < ratio["q4"] < 0.141  # 1/2 + 4/64
    assert 0.132 < ratio["q4/b128"] < 0.133  # 1/2 + 4/128
    assert ratio["topk"] == pytest.approx(0.02)  # 1 % of (4 + 4) bytes
    assert ratio["topk/f16 1%"] == pytest.approx(0.015)
    assert 0.0125 < ratio["topk_int8"] < 0.0127  # 1 % of (4 + 1 + 4/256) bytes


def test_payload_nbytes_needs_only_shape_and_params() -> None:
    assert int8().payload_nbytes((3, 100)) == 2 * 4 + 300
    assert q4().payload_nbytes((129,)) == 3 * 4 + 65
    assert topk(0.01).payload_nbytes((10_000,)) == 100 * 8
    assert topk(0.01, "float16").payload_nbytes((10_000,)) == 100 * 6
    assert topk_int8(0.01).payload_nbytes((100_000,)) == 1000 * 5 + 4 * 4
    assert all(c.payload_nbytes((0,)) == 0 for c in CODECS.values())
    assert topk(0.5).payload_nbytes((2**40,)) == 2**39 * 8  # Python ints: no overflow


# ---- what the encoder refuses ---------------------------------------------------------------


@pytest.mark.parametrize("label", sorted(CODECS))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_deltas_are_refused(label: str, bad: float) -> None:
    x = np.ones(300, np.float32)
    x[123] = bad
    with pytest.raises(WireError) as info:
        CODECS[label].encode("x", x)
    assert reason_of(info) == "non_finite"


@pytest.mark.parametrize(("codec", "x", "reason"), [
    (int8(), np.array([1e39, 1.0]), "int8_overflow"),
    (int8(), np.array([3e36, 1.0], np.float32), "int8_overflow"),  # 127 * x beyond float32
    (q4(), np.array([1e39]), "q4_overflow"),
    (topk(1.0), np.array([1e39]), "f32_overflow"),
    (topk(1.0, "float16"), np.array([65520.0]), "fp16_overflow"),
    (topk_int8(1.0), np.array([1e39]), "int8_overflow"),
    (int8(), np.array([1, 2]), "bad_dtype"),
    (topk(), np.array([True]), "bad_dtype"),
])
def test_what_cannot_be_carried_is_refused(codec: DeltaCodec, x: np.ndarray,
                                           reason: str) -> None:
    with pytest.raises(WireError) as info:
        codec.encode("x", x)
    assert reason_of(info) == reason


@pytest.mark.parametrize("params", [
    {"kind": "zstd"}, {"kind": "q4", "block": -1}, {"kind": "q4", "block": 1 << 17},
    {"kind": "int8", "block": True}, {"kind": "int8", "block": 2.5},
    {"kind": "topk", "fraction": 0}, {"kind": "topk", "fraction": 1.5},
    {"kind": "topk", "fraction": math.nan}, {"kind": "topk", "fraction": "0.1"},
    {"kind": "topk", "values": "int8"},
])
def test_bad_params_are_refused(params: dict[str, object]) -> None:
    with pytest.raises(WireError) as info:
        DeltaCodec(**params)  # type: ignore[arg-type]
    assert reason_of(info) == "bad_codec"


def test_params_and_defaults() -> None:
    assert DeltaCodec(Compressor.Q4) == q4(64) and DeltaCodec("int8") == int8(256)  # type: ignore[arg-type]
    assert topk(0.01).params == {"fraction": 0.01, "values": "float32"}
    assert topk_int8(0.01).params == {"fraction": 0.01, "block": 256}
    assert q4().params == {"block": 64} and topk().block == 0


# ---- what the decoder refuses ---------------------------------------------------------------


def encoded(codec: DeltaCodec, n: int = 301, dtype: str = "float32") -> bytearray:
    x = np.random.default_rng(6).standard_normal(n).astype(dtype)
    return bytearray(codec.encode("x", x))


def refused(codec: DeltaCodec, payload: bytes | bytearray, shape: object = (301,),
            dtype: object = "float32") -> str:
    with pytest.raises(WireError) as info:
        codec.decode(bytes(payload), shape, dtype)  # type: ignore[arg-type]
    return reason_of(info)


@pytest.mark.parametrize("label", sorted(CODECS))
def test_wrong_lengths_are_refused(label: str) -> None:
    codec = CODECS[label]
    payload = encoded(codec)
    assert refused(codec, payload[:-1]) == "bad_size"
    assert refused(codec, payload + b"\0") == "bad_size"
    assert refused(codec, b"") == "bad_size"
    assert refused(codec, payload, (1000,)) == "bad_size"
    assert refused(codec, payload, (2**40,)) == "bad_size"  # nothing allocated for it


@pytest.mark.parametrize("label", sorted(CODECS))
def test_bad_shapes_and_dtypes_are_refused(label: str) -> None:
    codec = CODECS[label]
    payload = encoded(codec)
    for shape in [(-1,), (3.0,), (True,), "301", None]:
        assert refused(codec, payload, shape) == "bad_shape"
    for dtype in ["int32", "object", "V8", "bogus", "complex64", None]:
        assert refused(codec, payload, dtype=dtype) == "bad_dtype"


@pytest.mark.parametrize("label", ["int8", "q4", "topk_int8"])
@pytest.mark.parametrize("scale", [math.nan, math.inf, -1.0, 65505.0])
def test_bad_scales_are_refused(label: str, scale: float) -> None:
    codec = CODECS[label]
    payload = encoded(codec, dtype="float16")
    offset = 4 * codec.k(301) if codec.kind == Compressor.TOPK_INT8 else 0
    payload[offset : offset + 4] = np.float32(scale).tobytes()
    assert refused(codec, payload, dtype="float16") == "bad_payload"


def test_scales_that_would_overflow_the_float32_arithmetic_are_refused() -> None:
    payload = encoded(int8())
    payload[:4] = np.float32(3e36).tobytes()  # 127 * 3e36 > float32's max
    assert refused(int8(), payload) == "bad_payload"
    got = int8().decode(bytes(payload), (301,), "float64")  # float64 works in float64
    assert np.isfinite(got).all()


def test_bad_codes_are_refused() -> None:
    payload = encoded(int8())
    payload[-1] = 0x80  # -128
    assert refused(int8(), payload) == "bad_payload"
    payload = encoded(q4())
    payload[4 * 5] &= 0xF0  # nibble 0 (code -8)
    assert refused(q4(), payload) == "bad_payload"
    payload = encoded(q4())
    payload[-1] = (payload[-1] & 0x0F) | 0x90  # 301 values: the last high nibble pads
    assert refused(q4(), payload) == "bad_payload"
    payload = encoded(topk_int8(0.1))
    payload[-1] = 0x80
    assert refused(topk_int8(0.1), payload) == "bad_payload"


@pytest.mark.parametrize("label", ["topk", "topk/f16", "topk_int8", "topk/all"])
def test_bad_indices_are_refused(label: str) -> None:
    codec = CODECS[label]
    k = codec.k(301)
    good = encoded(codec)
    index = np.frombuffer(bytes(good[: 4 * k]), "<u4").copy()
    for bad in [301, 2**32 - 1, "dup", "swap"]:
        hostile = index.copy()
        if bad == "dup":
            hostile[-1] = hostile[0] if k == 1 else hostile[-2]
        elif bad == "swap":
            hostile[[0, -1]] = hostile[[-1, 0]] if k > 1 else [2**31]
        else:
            hostile[-1] = bad
        payload = bytearray(good)
        payload[: 4 * k] = hostile.astype("<u4").tobytes()
        assert refused(codec, payload) == "bad_payload", bad


@pytest.mark.parametrize("values", ["float16", "float32"])
@pytest.mark.parametrize("value", [math.nan, math.inf, 1e5])
def test_bad_kept_values_are_refused(values: str, value: float) -> None:
    codec = topk(0.1, values)
    payload = encoded(codec, dtype="float16")
    width = np.dtype(values).itemsize
    with np.errstate(over="ignore"):
        payload[-width:] = np.array(value, values).tobytes()  # 1e5 as float16: inf
    assert refused(codec, payload, dtype="float16") == "bad_payload"
    if math.isfinite(value) and values == "float32":  # a float32 delta holds it
        assert codec.decode(bytes(payload), (301,), "float32").max() == 1e5


@pytest.mark.parametrize("label", sorted(CODECS))
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_payload_of_the_right_length_decodes_finitely_or_is_refused(
        label: str, dtype: str, data: st.DataObject) -> None:
    codec = CODECS[label]
    n = data.draw(st.integers(0, 700))
    size = codec.payload_nbytes((n,))
    payload = data.draw(st.binary(min_size=size, max_size=size))
    try:
        got = codec.decode(payload, (n,), dtype)
    except WireError:
        return
    assert got.shape == (n,) and got.dtype == np.dtype(dtype) and np.isfinite(got).all()


# ---- error feedback -------------------------------------------------------------------------


def transmitted_sum(codec: DeltaCodec, delta: np.ndarray, steps: int,
                    feedback: bool) -> np.ndarray:
    """What the receiver has added up after ``steps`` deltas, with or without feedback."""
    ef = ErrorFeedback(codec)
    total = np.zeros(delta.shape)
    for _ in range(steps):
        payload = ef.compress("w", delta) if feedback else codec.encode("w", delta)
        total += codec.decode(payload, delta.shape, delta.dtype)
    return total


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_error_feedback_delivers_what_topk_alone_never_sends() -> None:
    # 100 large and 100 small constant values among 10 000: topk(1 %) keeps k = 100, so
    # alone it sends the large ones every step and the small ones never.
    steps, codec = 50, topk(0.01)
    delta = np.zeros(10_000, np.float32)
    delta[:100] = 1.0
    small = slice(5000, 5100)
    delta[small] = 0.2
    want = steps * delta.astype(np.float64)
    without = transmitted_sum(codec, delta, steps, feedback=False)
    with_ef = transmitted_sum(codec, delta, steps, feedback=True)
    assert not without[small].any()  # dropped systematically
    assert rel_error(without, want) > 0.15
    assert rel_error(with_ef, want) < 0.05
    assert rel_error(with_ef[small], want[small]) < 0.25  # late, not lost


def test_error_feedback_undoes_q4_rounding_bias() -> None:
    # Per block of 64 one value 1.0 and 63 at 0.03 < 1/14: q4 alone rounds them all to 0.
    steps, codec = 50, q4()
    delta = np.full(64 * 100, 0.03, np.float32)
    delta[::64] = 1.0
    want = steps * delta.astype(np.float64)
    without = transmitted_sum(codec, delta, steps, feedback=False)
    with_ef = transmitted_sum(codec, delta, steps, feedback=True)
    assert rel_error(without, want) > 0.2
    assert rel_error(with_ef, want) < 0.05


@pytest.mark.parametrize("label", sorted(CODECS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_received_sum_is_true_sum_minus_the_residual(label: str, dtype: str) -> None:
    codec = CODECS[label]
    rng = np.random.default_rng(7)
    ef = ErrorFeedback(codec)
    total = np.zeros((7, 45))
    want = np.zeros((7, 45))
    for _ in range(10):
        delta = (rng.standard_normal((7, 45)) * 0.1).astype(dtype)
        want += delta.astype(np.float64)
        total += codec.decode(ef.compress("w", delta), delta.shape, dtype)
    residual = ef.residual("w")
    assert residual is not None and not residual.flags.writeable
    np.testing.assert_allclose(total + residual, want, rtol=0, atol=1e-4)


def test_reset_and_per_name_residuals() -> None:
    ef = ErrorFeedback(topk(0.01))
    a, b = np.ones(1000, np.float32), np.ones((2, 3), np.float64)
    ef.compress("a", a)
    ef.compress("b", b)
    residual_a = ef.residual("a")
    assert residual_a is not None and residual_a.dtype == np.float32
    assert float(residual_a.sum()) == pytest.approx(990)
    residual_b = ef.residual("b")
    assert residual_b is not None and residual_b.dtype == np.float64
    ef.reset("a")
    assert ef.residual("a") is None and ef.residual("b") is not None
    ef.reset()
    assert ef.residual("b") is None
    assert ef.residual("never") is None


def test_refused_delta_leaves_the_residual_and_mismatch_raises() -> None:
    ef = ErrorFeedback(int8())
    ef.compress("w", np.full(10, 0.5, np.float32))
    before = ef.residual("w")
    assert before is not None
    before = before.copy()
    with pytest.raises(WireError):
        ef.compress("w", np.full(10, np.nan, np.float32))
    after = ef.residual("w")
    assert after is not None
    np.testing.assert_array_equal(after, before)
    with pytest.raises(ValueError):
        ef.compress("w", np.zeros(11, np.float32))
    with pytest.raises(ValueError):
        ef.compress("w", np.zeros(10, np.float64))  # the residual is float32
