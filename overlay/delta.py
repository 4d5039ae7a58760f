"""Compressed model deltas: blockwise ``int8`` and ``q4``, ``topk`` sparsification, and error
feedback.

A sender that knows a model both sides hold (the *reference*) can send ``delta = model -
reference`` instead of the model. A delta is small and centred on zero, so it compresses much
further than whole weights. This module turns one float array ``delta`` into a payload and
back; it does no I/O, knows nothing of the wire format and imports no torch. The codec and
its parameters (``DeltaCodec``) travel in the message header; a receiver computes each
payload's exact length from the array's shape and those parameters
(``DeltaCodec.payload_nbytes``) before it reads a byte of the payload.

Notation: the delta has ``n`` values (its flattened, C-order form ``x``) and dtype float16,
float32 or float64. Work is done in float32 (float64 for float64 deltas). All multi-byte
fields are little-endian. ``s_b`` is the float32 scale of block ``b``; blocks are runs of
``block`` consecutive values of ``x`` (the last one may be short), ``nb = ceil(n / block)``.

``int8`` (``block`` default 256): blockwise absmax, the layout of ``overlay.codecs``' int8::

    [0, 4 nb)        nb scales, <f4      s_b = float32(max |x_i| over block b)
    [4 nb, 4 nb + n) n codes, i1         c_i = round(x_i / s_b * 127), in -127..127

  ``x̂_i = c_i * s_b / 127``; ``|x_i - x̂_i| <= s_b / 254`` plus float rounding. Length
  ``4 nb + n``: 0.254 of raw float32 at block 256.

``q4`` (``block`` default 64): the same with 15 levels, two codes per byte::

    [0, 4 nb)                    nb scales, <f4   as int8
    [4 nb, 4 nb + ceil(n / 2))   packed codes, u1 byte j = u_{2j} | u_{2j+1} << 4

  ``u_i = c_i + 8`` with ``c_i = round(x_i / s_b * 7)`` in -7..7 (nibble 0, i.e. -8, is never
  sent); for odd ``n`` the last high nibble is 8 (code 0). ``x̂_i = c_i * s_b / 7``;
  ``|x_i - x̂_i| <= s_b / 14`` plus float rounding. Length ``4 nb + ceil(n / 2)``: 0.141 of raw
  float32 at block 64, 0.133 at block 128.

``topk`` (``fraction`` default 0.01, ``values`` float32 or float16): keep the
``k = min(n, ceil(fraction * n))`` values of largest ``|x_i|`` (``fraction * n`` in IEEE double,
so both sides agree; ``k >= 1`` when ``n >= 1``), every other value is sent as 0::

    [0, 4 k)             k indices, <u4   strictly increasing, < n
    [4 k, 4 k + w k)     k values, <f4 (w = 4) or <f2 (w = 2), in index order

  A dropped value is at most the smallest kept magnitude ``t``: ``|x_i - x̂_i| = |x_i| <= t``
  (so ``||x - x̂||² <= (1 - k/n) ||x||²``). A kept value is exact for float32 values of a
  float16/float32 delta, within float32's rounding (relative 2**-24) for float64 deltas, and
  within relative 2**-11 (absolute 2**-25 below 2**-14) for float16 values. Length
  ``(4 + w) k``: 0.02 of raw float32 at 1 % with float32 values, 0.015 with float16. Arrays of
  more than 2**32 values cannot be indexed and are refused (``too_large``).

``topk_int8`` (``fraction``, ``block`` default 256): ``topk``'s indices, then the kept values
(in index order, ``kb = ceil(k / block)`` blocks) in the ``int8`` layout::

    [0, 4 k)                   k indices, <u4
    [4 k, 4 k + 4 kb)          kb scales, <f4
    [4 k + 4 kb, 5 k + 4 kb)   k codes, i1

  Dropped values as ``topk``; kept ones within ``s_b / 254`` of their block of kept values.
  Length ``5 k + 4 kb``: 0.0125 of raw float32 at 1 %.

"Float rounding" is a few ulps of ``s_b`` in the delta's dtype and, for float64 blocks below
float32's normal range, ~1.4e-45 absolute (their scale is a float32 subnormal or 0). A block
whose scale is 0 comes back as exact zeros.

What an encoder refuses (``WireError`` with ``reason``): NaN or Inf (``non_finite``); a
block magnitude the decoder's arithmetic could not carry (``int8_overflow``, ``q4_overflow``:
above float32's range / levels for float32 deltas, above float32's range for float64 ones); a
kept value beyond its value type (``fp16_overflow``, ``f32_overflow``); a non-float delta
(``bad_dtype``). The sender then falls back to a less compressed codec or the full model.

What a decoder refuses, before it reconstructs anything: a dtype other than float16/32/64
(``bad_dtype``); a shape that is not non-negative ints (``bad_shape``); a payload whose length
is not ``payload_nbytes`` (``bad_size``); NaN, Inf or negative scales, or a scale whose block
would not fit the delta's dtype (above 65504 for float16, float32's range / levels for
float32); an int8 code of -128, a q4 nibble 0 or a q4 padding nibble other than 8; indices
out of range or not strictly increasing; NaN or Inf kept values, or float32 kept values
beyond a float16 delta's range (all ``bad_payload``). So every decoded array is finite, of the
shape and dtype asked for, and within the bound of what some encoder could have sent. The
decoder allocates the output (``n`` values) and temporaries of O(n) bytes, never more: the
wire layer bounds ``n`` (``Limits.max_total_bytes`` on reconstructed arrays) before calling it.
Nothing is unpickled; all work is vectorized numpy.

Error feedback (``ErrorFeedback``): the sender keeps, per array, what the codec dropped last
time (the residual ``e``) and adds it to the next delta before compressing::

    p_t = encode(delta_t + e_{t-1});   e_t = (delta_t + e_{t-1}) - decode(p_t)

so the sum of what the receiver decoded over steps 1..T is the sum of the true deltas minus
``e_T``: nothing is lost for good, it arrives late. This is EF-SGD (Karimireddy et al. 2019,
"Error Feedback Fixes SignSGD") and the compression of 1-bit Adam (Tang et al. 2021); it is
what lets top-k at 1 % and 4-bit codes converge like uncompressed exchanges.

Use it where the reference does not absorb the error by itself: when ``delta_t`` is a
difference of the sender's own models (``model_t - model_{t-1}``) or is taken against a
reference that stays fixed. When the reference is the receiver's own reconstruction (the
sender tracks ``reference + decode(payload)``, as a receiver that checks the digest of the
rebuilt model needs), the next delta already contains what was dropped, and error feedback on
top would send it twice.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from overlay.codecs import FLOAT_DTYPES, MAX_BLOCK, dequantize_blocks, work_dtype
from overlay.errors import WireError

Shape = tuple[int, ...]

MAX_INDEXED = 1 << 32
"""Most values a ``topk`` delta can index (uint32 indices)."""

_FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_F32_MAX = float(np.finfo(np.float32).max)
_SCALE = np.dtype("<f4")
_CODE = np.dtype("i1")
_INDEX = np.dtype("<u4")
_Q4_ZERO = 8  # the nibble of code 0


class Compressor(enum.StrEnum):
    INT8 = "int8"
    Q4 = "q4"
    TOPK = "topk"
    TOPK_INT8 = "topk_int8"


_DEFAULT_BLOCK = {Compressor.INT8: 256, Compressor.Q4: 64, Compressor.TOPK_INT8: 256}
_LEVELS = {Compressor.INT8: 127, Compressor.Q4: 7, Compressor.TOPK_INT8: 127}
_VALUE_TYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


def _n_blocks(n: int, block: int) -> int:
    return -(-n // block)


def _float_dtype(name: str, dtype: DTypeLike) -> np.dtype:
    try:
        if dtype is None:  # numpy would read float64
            raise TypeError("no dtype")
        np_dtype = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise WireError("bad_dtype", f"{name}: {str(dtype)[:40]!r} is not a dtype") from exc
    if np_dtype.name not in FLOAT_DTYPES:
        raise WireError("bad_dtype", f"{name}: a delta is float16/32/64, not {np_dtype}")
    return np.dtype(np_dtype.name)  # native byte order


def _check_shape(name: str, shape: object) -> Shape:
    if not isinstance(shape, tuple | list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise WireError("bad_shape", f"{name}: shape must be non-negative integers")
    return tuple(shape)


def _scale_limit(dtype: np.dtype, levels: int) -> float:
    """Largest scale whose block the decoder reconstructs finitely in ``dtype``: ``code *
    scale`` is computed in the work dtype, then divided by ``levels``."""
    if dtype == np.float16:
        return _FP16_MAX
    return _F32_MAX / levels if dtype == np.float32 else _F32_MAX


# ---- blockwise absmax quantization (int8, q4, topk_int8's values) ---------------------------


def _quantize(name: str, flat: np.ndarray, block: int, levels: int,
              reason: str) -> tuple[np.ndarray, np.ndarray]:
    """(scales ``<f4``, codes ``i1`` in -levels..levels) of the 1-d ``flat``."""
    n = flat.size
    n_blocks = _n_blocks(n, block)
    if n == 0:
        return np.empty(0, _SCALE), np.empty(0, _CODE)
    work = work_dtype(flat.dtype)
    blocks = np.zeros((n_blocks, block), dtype=work)  # the last block is padded with zeros
    blocks.reshape(-1)[:n] = flat
    absmax = np.maximum(blocks.max(axis=1), -blocks.min(axis=1))  # NaN propagates
    lo, hi = float(absmax.min()), float(absmax.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise WireError("non_finite", f"{name}: NaN or Inf cannot be encoded")
    limit = _scale_limit(flat.dtype, levels)
    if hi > limit:
        raise WireError(reason, f"{name}: |x| = {hi:.4g} beyond {limit:.4g}")
    scales = absmax.astype(_SCALE)
    divisor = scales.astype(work)[:, None]
    np.divide(blocks, divisor, out=blocks, where=divisor > 0)  # scale 0: |x| < 1e-45, codes 0
    blocks *= levels
    np.rint(blocks, out=blocks)
    np.clip(blocks, -levels, levels, out=blocks)  # float32(absmax) may round below absmax
    return scales, blocks.reshape(-1)[:n].astype(_CODE)


def _check_scales(name: str, scales: np.ndarray, dtype: np.dtype, levels: int) -> None:
    if scales.size and not (
        np.isfinite(scales).all()
        and float(scales.min()) >= 0
        and float(scales.max()) <= _scale_limit(dtype, levels)
    ):
        raise WireError("bad_payload", f"{name}: scales must be finite, >= 0 and fit {dtype}")


# ---- the codec ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaCodec:
    """One compressor and its parameters, as the header of a delta message declares them.

    Built from untrusted header values too: bad parameters raise ``WireError("bad_codec")``.
    """

    kind: Compressor
    """Which compressor (a ``Compressor`` or its string value)."""
    block: int = 0
    """Values per scale block (int8, q4, topk_int8), 1..``MAX_BLOCK``; 0 = the kind's default
    (256 for int8 and topk_int8, 64 for q4). Ignored, and kept 0, for topk."""
    fraction: float = 0.01
    """Share of the values that topk and topk_int8 keep, in (0, 1]."""
    values: str = "float32"
    """Type of topk's kept values: "float32" or "float16"."""

    def __post_init__(self) -> None:
        try:
            kind = Compressor(self.kind)
        except ValueError as exc:
            raise WireError("bad_codec", f"unknown delta codec {str(self.kind)[:40]!r}") from exc
        object.__setattr__(self, "kind", kind)
        if not isinstance(self.block, int) or isinstance(self.block, bool):
            raise WireError("bad_codec", "block must be an integer")
        if kind == Compressor.TOPK:
            object.__setattr__(self, "block", 0)
        elif self.block == 0:
            object.__setattr__(self, "block", _DEFAULT_BLOCK[kind])
        elif not 0 < self.block <= MAX_BLOCK:
            raise WireError("bad_codec", f"block {self.block} not in 1..{MAX_BLOCK}")
        if (not isinstance(self.fraction, float | int) or isinstance(self.fraction, bool)
                or not 0 < self.fraction <= 1):  # NaN fails the comparison too
            raise WireError("bad_codec", f"fraction {str(self.fraction)[:40]} not in (0, 1]")
        object.__setattr__(self, "fraction", float(self.fraction))
        if self.values not in _VALUE_TYPES:
            raise WireError("bad_codec", f"topk values {str(self.values)[:40]!r} not supported")

    @property
    def params(self) -> dict[str, int | float | str]:
        """The parameters that matter for this kind (what a header needs to carry)."""
        if self.kind == Compressor.TOPK:
            return {"fraction": self.fraction, "values": self.values}
        if self.kind == Compressor.TOPK_INT8:
            return {"fraction": self.fraction, "block": self.block}
        return {"block": self.block}

    def k(self, n: int) -> int:
        """Values that topk and topk_int8 keep out of ``n``."""
        return min(n, math.ceil(self.fraction * n))

    def payload_nbytes(self, shape: Shape) -> int:
        """Exact payload length for a delta of ``shape`` (any float dtype), in Python ints."""
        n = math.prod(_check_shape("delta", shape))
        if self.kind == Compressor.INT8:
            return _n_blocks(n, self.block) * _SCALE.itemsize + n
        if self.kind == Compressor.Q4:
            return _n_blocks(n, self.block) * _SCALE.itemsize + -(-n // 2)
        k = self.k(n)
        if self.kind == Compressor.TOPK:
            return k * (_INDEX.itemsize + _VALUE_TYPES[self.values].itemsize)
        return k * (_INDEX.itemsize + _CODE.itemsize) + _n_blocks(k, self.block) * _SCALE.itemsize

    # ---- encode -----------------------------------------------------------------------------

    def encode(self, name: str, delta: ArrayLike) -> bytes:
        """The payload of ``delta`` (a float array); raises WireError for what it cannot
        carry (see the module's docstring). ``name`` only labels errors."""
        array = np.asarray(delta)
        flat = array.astype(_float_dtype(name, array.dtype), copy=False).reshape(-1)
        if self.kind in (Compressor.INT8, Compressor.Q4):
            levels = _LEVELS[self.kind]
            scales, codes = _quantize(name, flat, self.block, levels, f"{self.kind}_overflow")
            if self.kind == Compressor.INT8:
                return scales.tobytes() + codes.tobytes()
            nibbles = np.full(codes.size + codes.size % 2, _Q4_ZERO, dtype=np.uint8)
            nibbles[: codes.size] = codes.view(np.uint8) + _Q4_ZERO  # -7..7 -> 1..15
            packed = nibbles[0::2] | (nibbles[1::2] << 4)
            return scales.tobytes() + packed.tobytes()
        return self._encode_topk(name, flat)

    def _encode_topk(self, name: str, flat: np.ndarray) -> bytes:
        n = flat.size
        if n > MAX_INDEXED:
            raise WireError("too_large", f"{name}: {n} values cannot be indexed by uint32")
        if n == 0:
            return b""
        lo, hi = float(flat.min()), float(flat.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise WireError("non_finite", f"{name}: NaN or Inf cannot be encoded")
        k = self.k(n)
        if k == n:
            index = np.arange(n, dtype=_INDEX)
        else:
            index = np.argpartition(np.abs(flat), n - k)[n - k :].astype(_INDEX)
            index.sort()
        kept = flat[index]
        if self.kind == Compressor.TOPK_INT8:
            scales, codes = _quantize(name, kept, self.block, 127, "int8_overflow")
            return index.tobytes() + scales.tobytes() + codes.tobytes()
        value_type = _VALUE_TYPES[self.values]
        top = max(hi, -lo)  # the largest magnitude is always kept
        limit = _FP16_MAX if value_type.itemsize == 2 else _F32_MAX
        if top > limit:
            reason = "fp16_overflow" if value_type.itemsize == 2 else "f32_overflow"
            raise WireError(reason, f"{name}: |x| = {top:.4g} beyond {self.values}")
        return index.tobytes() + kept.astype(value_type).tobytes()

    # ---- decode -----------------------------------------------------------------------------

    def decode(self, payload: bytes | memoryview, shape: Shape, dtype: DTypeLike,
               name: str = "delta") -> np.ndarray:
        """The delta of ``shape`` and ``dtype`` (native, writable) from ``payload``; raises
        WireError, and nothing else, for a payload no encoder could have sent."""
        np_dtype = _float_dtype(name, dtype)
        shape = _check_shape(name, shape)
        expected = self.payload_nbytes(shape)
        if len(payload) != expected:
            raise WireError("bad_size", f"{name}: {len(payload)} bytes, {expected} expected")
        n = math.prod(shape)
        if self.kind in (Compressor.INT8, Compressor.Q4):
            levels = _LEVELS[self.kind]
            n_blocks = _n_blocks(n, self.block)
            scales = np.frombuffer(payload, dtype=_SCALE, count=n_blocks)
            _check_scales(name, scales, np_dtype, levels)
            if self.kind == Compressor.INT8:
                codes = np.frombuffer(payload, dtype=_CODE, offset=scales.nbytes)
                if n and int(codes.min()) < -127:
                    raise WireError("bad_payload", f"{name}: int8 code -128")
            else:
                codes = _unpack_q4(name, payload, scales.nbytes, n)
            return dequantize_blocks(scales, codes, self.block, levels, np_dtype).reshape(shape)
        return self._decode_topk(name, payload, n, np_dtype).reshape(shape)

    def _decode_topk(self, name: str, payload: bytes | memoryview, n: int,
                     dtype: np.dtype) -> np.ndarray:
        if n > MAX_INDEXED:
            raise WireError("too_large", f"{name}: {n} values cannot be indexed by uint32")
        k = self.k(n)
        index = np.frombuffer(payload, dtype=_INDEX, count=k)
        if k and not (int(index[-1]) < n and bool((index[1:] > index[:-1]).all())):
            raise WireError("bad_payload", f"{name}: indices not increasing and below {n}")
        if self.kind == Compressor.TOPK_INT8:
            n_blocks = _n_blocks(k, self.block)
            scales = np.frombuffer(payload, dtype=_SCALE, count=n_blocks, offset=index.nbytes)
            _check_scales(name, scales, dtype, 127)
            codes = np.frombuffer(payload, dtype=_CODE, offset=index.nbytes + scales.nbytes)
            if k and int(codes.min()) < -127:
                raise WireError("bad_payload", f"{name}: int8 code -128")
            kept = dequantize_blocks(scales, codes, self.block, 127, dtype)
        else:
            values = np.frombuffer(payload, dtype=_VALUE_TYPES[self.values], offset=index.nbytes)
            limit = _FP16_MAX if dtype == np.float16 else math.inf
            if k and not (np.isfinite(values).all() and float(np.abs(values).max()) <= limit):
                raise WireError("bad_payload", f"{name}: kept values must be finite, fit {dtype}")
            kept = values.astype(dtype)
        out = np.zeros(n, dtype=dtype)
        out[index] = kept
        return out


def _unpack_q4(name: str, payload: bytes | memoryview, offset: int, n: int) -> np.ndarray:
    """The ``n`` q4 codes (``i1``, -7..7) of the packed bytes at ``offset``."""
    packed = np.frombuffer(payload, dtype=np.uint8, offset=offset)
    nibbles = np.empty(packed.size * 2, dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=nibbles[0::2])
    np.right_shift(packed, 4, out=nibbles[1::2])
    if n % 2 and nibbles[n] != _Q4_ZERO:
        raise WireError("bad_payload", f"{name}: q4 padding nibble {nibbles[n]} is not 8")
    codes = nibbles[:n]
    if n and int(codes.min()) == 0:
        raise WireError("bad_payload", f"{name}: q4 nibble 0 (code -8)")
    codes -= _Q4_ZERO  # wraps 1..15 to -7..7 as int8
    return codes.view(_CODE)


def int8(block: int = 256) -> DeltaCodec:
    """Blockwise absmax int8 (0.254 of raw float32 at block 256)."""
    return DeltaCodec(Compressor.INT8, block=block)


def q4(block: int = 64) -> DeltaCodec:
    """Blockwise absmax 4-bit (0.141 of raw float32 at block 64, 0.133 at 128)."""
    return DeltaCodec(Compressor.Q4, block=block)


def topk(fraction: float = 0.01, values: str = "float32") -> DeltaCodec:
    """The ``fraction`` largest magnitudes, uint32 indices + float32/float16 values."""
    return DeltaCodec(Compressor.TOPK, fraction=fraction, values=values)


def topk_int8(fraction: float = 0.01, block: int = 256) -> DeltaCodec:
    """topk whose kept values travel as blockwise int8."""
    return DeltaCodec(Compressor.TOPK_INT8, block=block, fraction=fraction)


# ---- error feedback -------------------------------------------------------------------------


class ErrorFeedback:
    """Compresses successive deltas of named arrays, carrying what the codec dropped into the
    next delta of the same array (see "Error feedback" in the module's docstring).

    One instance per receiver (what one receiver has not yet got is that link's business).
    It holds one residual per array name, in the work dtype (float32, float64 for float64
    deltas): as much memory as the model again. ``compress`` assumes its payload reaches the
    receiver; when it does not, or the receiver refused the delta and got the full model
    instead, call ``reset()``: the receiver then holds the sender's exact model, nothing is owed.
    """

    def __init__(self, codec: DeltaCodec) -> None:
        self.codec = codec
        self._residuals: dict[str, np.ndarray] = {}

    def compress(self, name: str, delta: ArrayLike) -> bytes:
        """The payload of ``delta + residual``; the new residual is what decoding it misses.

        The payload decodes (``codec.decode(payload, delta.shape, delta.dtype)``) as a delta
        of ``delta``'s dtype. A WireError from the codec leaves the residual as it was. A
        residual of another shape or dtype than ``delta`` raises ValueError (reset first).
        """
        array = np.asarray(delta)
        dtype = _float_dtype(name, array.dtype)
        work = work_dtype(dtype)
        target = array.astype(work)  # a copy: becomes the new residual
        residual = self._residuals.get(name)
        if residual is not None:
            if residual.shape != target.shape or residual.dtype != work:
                raise ValueError(
                    f"{name}: residual {residual.dtype}{list(residual.shape)} does not match "
                    f"delta {dtype}{list(target.shape)}"
                )
            target += residual
        sent = target.astype(dtype, copy=False)
        payload = self.codec.encode(name, sent)
        target -= self.codec.decode(payload, target.shape, dtype, name)
        self._residuals[name] = target
        return payload

    def residual(self, name: str) -> np.ndarray | None:
        """What is owed for ``name`` (read-only view), None before its first delta."""
        residual = self._residuals.get(name)
        if residual is None:
            return None
        view = residual.view()
        view.flags.writeable = False
        return view

    def reset(self, name: str | None = None) -> None:
        """Forget the residual of ``name``, or of every array."""
        if name is None:
            self._residuals.clear()
        else:
            self._residuals.pop(name, None)
