"""Torch state dicts to and from the overlay's :class:`~overlay.wire.NamedArray` lists.

The overlay moves named numpy arrays and knows nothing of torch; this module is the only bridge.
Outgoing arrays share memory with the model (no copy); incoming arrays are checked name by name
against the local model before they become tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from overlay.wire import NamedArray

__all__ = ["ModelMismatch", "arrays_to_state", "numpy_dtype", "state_to_arrays"]


class ModelMismatch(Exception):
    """Received arrays do not fit the local model (names, shapes or dtypes differ)."""


# torch dtype -> numpy dtype, for the dtypes a model state can hold and numpy can represent.
_TORCH_TO_NUMPY: dict[torch.dtype, np.dtype] = {
    torch.float64: np.dtype(np.float64),
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.int64: np.dtype(np.int64),
    torch.int32: np.dtype(np.int32),
    torch.int16: np.dtype(np.int16),
    torch.int8: np.dtype(np.int8),
    torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_),
}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype holding the same values as ``dtype``; ModelMismatch if there is none."""
    try:
        return _TORCH_TO_NUMPY[dtype]
    except KeyError:
        raise ModelMismatch(f"tensor dtype {dtype} has no numpy equivalent on the wire") from None


def state_to_arrays(state_dict: Mapping[str, torch.Tensor], copy: bool = False) -> list[NamedArray]:
    """One :class:`NamedArray` per entry of ``state_dict``, in its order.

    Without ``copy``, CPU tensors that are already contiguous are exposed as-is: the arrays share
    memory with the model, so serialize them before the model trains again (or pass
    ``copy=True`` to snapshot). GPU tensors are necessarily copied to the host.
    """
    arrays: list[NamedArray] = []
    for name, tensor in state_dict.items():
        numpy_dtype(tensor.dtype)  # reject bfloat16 and friends with a clear message
        t = tensor.detach().cpu().contiguous()
        array = t.numpy()
        if copy and t.data_ptr() == tensor.data_ptr():
            array = array.copy()
        arrays.append(NamedArray(name, array))
    return arrays


def arrays_to_state(arrays: Iterable[NamedArray],
                    reference_state: Mapping[str, torch.Tensor],
                    *, share_readonly: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from ``arrays``, checked against ``reference_state`` (normally the local model's).

    The set of names must be the same, and each array must have the reference's shape and dtype;
    otherwise :class:`ModelMismatch` names the first offending entry. The tensors are on the CPU
    and in the reference's order.

    Copies: an array that is writable, C-contiguous and native-endian becomes a tensor sharing its
    memory (the caller hands it over). Arrays decoded from wire bytes are usually read-only views
    of the received buffer; torch tensors are always writable, so wrapping such a buffer would
    allow writes into memory numpy promised not to change (torch warns about exactly that). Those
    arrays are copied once, deliberately, unless ``share_readonly``: then they are wrapped too,
    and the caller promises to treat the tensors as read-only (the receive path does: received
    models are only averaged and loaded, never modified; a 100 MB model saves a 100 MB copy).
    """
    received: dict[str, np.ndarray] = {}
    for item in arrays:
        if item.name in received:
            raise ModelMismatch(f"array {item.name!r} received twice")
        received[item.name] = item.array
    missing = [name for name in reference_state if name not in received]
    unexpected = [name for name in received if name not in reference_state]
    if missing or unexpected:
        raise ModelMismatch(
            "model entries differ: "
            + "; ".join(part for part in (
                f"missing {sorted(missing)}" if missing else "",
                f"unexpected {sorted(unexpected)}" if unexpected else "",
            ) if part)
        )
    state: dict[str, torch.Tensor] = {}
    for name, reference in reference_state.items():
        array = received[name]
        if not isinstance(array, np.ndarray):
            raise ModelMismatch(f"{name}: expected a numpy array, got {type(array).__name__}")
        expected_dtype = numpy_dtype(reference.dtype)
        expected_shape = tuple(reference.shape)
        if tuple(array.shape) != expected_shape:
            raise ModelMismatch(
                f"{name}: expected shape {expected_shape}, got {tuple(array.shape)}"
            )
        # Compare values' type, not byte order: a big-endian float32 is still a float32.
        if array.dtype.newbyteorder("=") != expected_dtype:
            raise ModelMismatch(f"{name}: expected dtype {expected_dtype}, got {array.dtype}")
        if not (array.flags.c_contiguous and array.dtype.isnative) or (
            not array.flags.writeable and not share_readonly
        ):
            array = np.array(array, dtype=expected_dtype, order="C", copy=True)
        if array.flags.writeable:
            state[name] = torch.from_numpy(array)
        else:
            with warnings.catch_warnings():  # read-only by the caller's promise, see above
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                state[name] = torch.from_numpy(array)
    return state
