"""Array encodings of the model wire format: ``raw``, ``fp16`` and blockwise ``int8``.

A model message names one codec; each floating array of the message travels in that encoding,
every other array raw. The table ``ENCODINGS`` says, per encoding, which original dtypes it
applies to, how long its payload is, and how to encode, check and reconstruct it:

- ``raw``: the array's little-endian bytes; decoded as a read-only view of the payload.
- ``fp16``: the values as little-endian float16, reconstructed to the original dtype.
  Relative error <= 2**-11 for |x| in float16's normal range [2**-14, 65504]; absolute error
  <= 2**-25 below it. Finite values beyond ±65504 are refused (``fp16_overflow``): the sender
  falls back to ``raw``.
- ``int8``: blockwise absmax quantization (as bitsandbytes' and hivemind's 8-bit blockwise
  codecs). The flattened array is cut into blocks of ``block`` values (the last one may be
  short); per block ``scale = max |x|`` (float32) and ``code = round(x / scale * 127)``.
  Payload = the scales (``<f4``, one per block) followed by the codes (``i1``, one per value);
  ``x̂ = code * scale / 127``, so ``|x - x̂| <= scale / 254`` plus float rounding (a few ulps
  of ``scale``; for float16 arrays also float16's rounding of x̂; for float64 blocks below
  float32's range, ~1.4e-45 absolute). Blocks with scale 0 come back as exact zeros; a finite
  float64 beyond float32's range is refused (``int8_overflow``).

NaN and Inf are refused by every lossy encoder (``non_finite``). All work is vectorized numpy.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from overlay.errors import WireError

# Only plain numeric dtypes travel; object/void/structured dtypes could smuggle anything.
ALLOWED_DTYPES = frozenset(
    ["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]
)
FLOAT_DTYPES = frozenset(["float64", "float32", "float16"])
BLOCK = 256
"""Values per int8 block, sent in the header as ``block``."""
MAX_BLOCK = 1 << 16
"""Largest ``block`` a receiver accepts."""

_FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_F32_MAX = float(np.finfo(np.float32).max)
_SCALE = np.dtype("<f4")
_CODE = np.dtype("i1")


class Encoding(enum.StrEnum):
    RAW = "raw"
    FP16 = "fp16"
    INT8 = "int8"


Shape = tuple[int, ...]


def work_dtype(dtype: np.dtype) -> np.dtype:
    """float64 stays float64; float16 and float32 are computed in float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _check_finite(name: str, lo: float, hi: float) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise WireError("non_finite", f"{name}: NaN or Inf cannot be encoded")


# ---- raw ------------------------------------------------------------------------------------


def _raw_nbytes(n: int, dtype: np.dtype, block: int) -> int:
    return n * dtype.itemsize


def _raw_encode(name: str, array: np.ndarray, block: int) -> memoryview:
    # Little-endian on the wire: a big-endian array's dtype.name is the same ("float32").
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    if array.nbytes == 0:
        return memoryview(b"")  # memoryview cannot cast a view with zeros in its shape
    return array.data.cast("B")


def _raw_decode(payload: memoryview | bytes, dtype: np.dtype, shape: Shape,
                block: int) -> np.ndarray:
    return np.frombuffer(payload, dtype=dtype.newbyteorder("<")).reshape(shape)


# ---- fp16 -----------------------------------------------------------------------------------


def _fp16_nbytes(n: int, dtype: np.dtype, block: int) -> int:
    return n * 2


def _fp16_encode(name: str, array: np.ndarray, block: int) -> memoryview:
    if array.size:
        lo, hi = float(array.min()), float(array.max())
        _check_finite(name, lo, hi)
        if max(hi, -lo) > _FP16_MAX:
            raise WireError(
                "fp16_overflow", f"{name}: |x| = {max(hi, -lo):.4g} beyond float16's ±65504"
            )
    return _raw_encode(name, array.astype("<f2"), block)


def _fp16_decode(payload: memoryview | bytes, dtype: np.dtype, shape: Shape,
                 block: int) -> np.ndarray:
    return np.frombuffer(payload, dtype="<f2").reshape(shape).astype(dtype)


# ---- int8 -----------------------------------------------------------------------------------


def _n_blocks(n: int, block: int) -> int:
    return -(-n // block)


def _int8_nbytes(n: int, dtype: np.dtype, block: int) -> int:
    return _n_blocks(n, block) * _SCALE.itemsize + n


def _int8_encode(name: str, array: np.ndarray, block: int) -> memoryview:
    n = array.size
    n_blocks = _n_blocks(n, block)
    work = work_dtype(array.dtype)
    blocks = np.zeros((n_blocks, block), dtype=work)  # the last block is padded with zeros
    blocks.reshape(-1)[:n] = array.reshape(-1)
    out = np.empty(n_blocks * _SCALE.itemsize + n, dtype=np.uint8)
    if n == 0:
        return out.data.cast("B")
    absmax = np.maximum(blocks.max(axis=1), -blocks.min(axis=1))  # NaN propagates
    _check_finite(name, float(absmax.min()), float(absmax.max()))
    if float(absmax.max()) > _F32_MAX:
        raise WireError("int8_overflow", f"{name}: |x| beyond float32's range (scales)")
    scales = absmax.astype(_SCALE)
    divisor = scales.astype(work)[:, None]
    np.divide(blocks, divisor, out=blocks, where=divisor > 0)  # all-zero block: codes 0
    blocks *= 127
    np.rint(blocks, out=blocks)
    np.clip(blocks, -127, 127, out=blocks)  # float32(absmax) may round below absmax
    out[: scales.nbytes] = scales.view(np.uint8)
    np.copyto(out[scales.nbytes :].view(_CODE), blocks.reshape(-1)[:n], casting="unsafe")
    return out.data.cast("B")


def _int8_split(payload: memoryview | bytes, n: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    n_blocks = _n_blocks(n, block)
    scales = np.frombuffer(payload, dtype=_SCALE, count=n_blocks)
    codes = np.frombuffer(payload, dtype=_CODE, offset=n_blocks * _SCALE.itemsize)
    return scales, codes


def _int8_check(name: str, payload: memoryview | bytes, n: int, block: int) -> None:
    scales, _ = _int8_split(payload, n, block)
    if scales.size and not (np.isfinite(scales).all() and scales.min() >= 0):
        raise WireError("bad_payload", f"{name}: int8 scales must be finite and >= 0")


def _int8_decode(payload: memoryview | bytes, dtype: np.dtype, shape: Shape,
                 block: int) -> np.ndarray:
    scales, codes = _int8_split(payload, math.prod(shape), block)
    return dequantize_blocks(scales, codes, block, 127, dtype).reshape(shape)


def dequantize_blocks(scales: np.ndarray, codes: np.ndarray, block: int, levels: int,
                      dtype: np.dtype) -> np.ndarray:
    """The 1-d array ``codes * scale / levels`` as ``dtype``, one scale per ``block`` codes
    (blockwise absmax decoding; scales and codes already checked)."""
    n = codes.size
    work = work_dtype(dtype)
    wscales = scales.astype(work)
    full = n // block * block
    out = np.empty(n, dtype=work)
    # code * scale first, then / levels: exact enough even for subnormal scales
    np.multiply(codes[:full].reshape(-1, block), wscales[: full // block, None],
                out=out[:full].reshape(-1, block))
    if full < n:
        np.multiply(codes[full:], wscales[-1], out=out[full:])
    out /= levels
    return out.astype(dtype, copy=False)


# ---- the table ------------------------------------------------------------------------------


def _no_check(name: str, payload: memoryview | bytes, n: int, block: int) -> None:
    pass


@dataclass(frozen=True)
class ArrayEncoding:
    """How one encoding turns an array into a payload and back."""

    name: Encoding
    dtypes: frozenset[str]
    """Original dtypes this encoding applies to (in a message of this codec, the others
    travel raw)."""
    payload_nbytes: Callable[[int, np.dtype, int], int]
    """(values, original dtype, block) -> exact payload length, in Python ints."""
    encode: Callable[[str, np.ndarray, int], memoryview]
    """(name, array, block) -> payload; raises WireError for values it cannot carry."""
    check: Callable[[str, memoryview | bytes, int, int], None]
    """(name, payload, values, block): content checks before anything is reconstructed."""
    decode: Callable[[memoryview | bytes, np.dtype, Shape, int], np.ndarray]
    """(payload, original dtype, shape, block) -> the array, as the original dtype."""


ENCODINGS: dict[str, ArrayEncoding] = {
    e.name.value: e
    for e in [
        ArrayEncoding(Encoding.RAW, ALLOWED_DTYPES, _raw_nbytes, _raw_encode, _no_check,
                      _raw_decode),
        ArrayEncoding(Encoding.FP16, frozenset(["float64", "float32"]), _fp16_nbytes,
                      _fp16_encode, _no_check, _fp16_decode),
        ArrayEncoding(Encoding.INT8, FLOAT_DTYPES, _int8_nbytes, _int8_encode, _int8_check,
                      _int8_decode),
    ]
}
CODECS = frozenset(ENCODINGS)
"""A message's codec is the encoding of its floating arrays."""


def encoding_for(codec: str, dtype: str) -> str:
    """The encoding of an array of ``dtype`` in a message of ``codec``: the codec where it
    applies (floats), else ``raw``. Receivers require exactly this in each array spec."""
    return codec if dtype in ENCODINGS[codec].dtypes else Encoding.RAW.value
