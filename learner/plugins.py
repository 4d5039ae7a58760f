"""Your own model and data: load them from ``package.module:attr`` specs.

``--model examples.my_model:factory`` names a function ``factory() -> nn.Module``;
``--data examples.my_data:load`` names ``load() -> (train_dataset, test_dataset)``, or
``load(num, total) -> (own_train_dataset, test_dataset)`` for users who split the data
themselves (the peer then trains on what it got, without partitioning it further). The current
directory is searched first, as ``python -m`` does, so a checkout's modules are found.

Every failure raises :class:`PluginError` with one line that says what to fix.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from learner.averaging import fingerprint
from learner.convert import numpy_dtype
from overlay.wire import NamedArray

__all__ = [
    "PluginError",
    "UserData",
    "architecture_entries",
    "architecture_mismatch",
    "build_from_factory",
    "check_model_accepts",
    "load_data_hook",
    "load_model_factory",
    "load_object",
    "model_fingerprint",
]


class PluginError(Exception):
    """A ``--model`` or ``--data`` spec cannot be loaded or gives the wrong kind of object."""


def load_object(spec: str, *, search_cwd: bool = True) -> Any:
    """The object ``attr`` of ``package.module`` named by ``"package.module:attr"``.

    ``attr`` may be dotted (``module:Class.method``). With ``search_cwd`` the current directory
    is put first on ``sys.path`` (once). The object must be callable.
    """
    module_name, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name or not attr or ":" in attr \
            or not all(part.isidentifier() for part in module_name.split(".")) \
            or not all(part.isidentifier() for part in attr.split(".")):
        raise PluginError(f"{spec!r} is not of the form package.module:function "
                          "(e.g. examples.my_model:factory)")
    if search_cwd:
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name
                                     or module_name.startswith(exc.name + ".")):
            raise PluginError(f"{spec}: module {module_name!r} not found (looked in the current "
                              "directory and on PYTHONPATH)") from exc
        raise PluginError(f"{spec}: importing {module_name} failed: {exc}") from exc
    except Exception as exc:  # the user's module raised while being imported
        raise PluginError(f"{spec}: importing {module_name} raised "
                          f"{type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"{spec}: {module_name} has no attribute {attr!r}") from None
    if not callable(obj):
        raise PluginError(f"{spec}: {attr} is a {type(obj).__name__}, not a function")
    return obj


# ------------------------------------------------------------------------------------- data


class UserData(NamedTuple):
    """What a ``--data`` hook gave."""

    train: Dataset[Any]
    """The training set; this peer's own part when ``presplit``."""
    test: Dataset[Any]
    presplit: bool
    """The hook took ``(num, total)`` and split the data itself: do not partition ``train``."""


def _required_positional(fn: Callable[..., Any]) -> int | None:
    """Number of required positional parameters, or None if it takes ``*args``."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: call them without arguments
        return 0
    required = 0
    for p in parameters:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) \
                and p.default is inspect.Parameter.empty:
            required += 1
        elif p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty:
            required += 99  # cannot be called by us
    return required


def _check_dataset(spec: str, what: str, dataset: object) -> None:
    if not isinstance(dataset, Dataset) and not hasattr(dataset, "__getitem__"):
        raise PluginError(f"{spec}: the {what} set is a {type(dataset).__name__}, not a "
                          "torch.utils.data.Dataset")
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise PluginError(f"{spec}: the {what} set has no len(); give a map-style Dataset "
                          "(e.g. TensorDataset)") from None
    if n == 0:
        raise PluginError(f"{spec}: the {what} set is empty")
    try:
        item = dataset[0]
    except Exception as exc:
        raise PluginError(f"{spec}: reading item 0 of the {what} set raised "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise PluginError(f"{spec}: items of the {what} set must be (x, y) pairs, item 0 is "
                          f"a {type(item).__name__}")
    x, y = item
    if not isinstance(x, torch.Tensor | np.ndarray):
        raise PluginError(f"{spec}: x of the {what} set must be a tensor, item 0 has a "
                          f"{type(x).__name__}")
    label_ok = (isinstance(y, int | np.integer) and not isinstance(y, bool)) or (
        isinstance(y, torch.Tensor) and y.numel() == 1 and not y.is_floating_point()
        and y.dtype is not torch.bool)
    if not label_ok:
        raise PluginError(f"{spec}: y of the {what} set must be an integer class label (int or "
                          f"an integer scalar tensor), item 0 has {y!r}")


def load_data_hook(spec: str, num: int = 0, total: int = 1) -> UserData:
    """Call the ``--data`` function named by ``spec`` and check what it returns.

    ``fn()`` returns ``(train, test)`` for the whole data set (the peer partitions ``train``);
    ``fn(num, total)`` returns ``(this peer's train set, test)``. Both must be map-style datasets
    with a ``len()`` whose items are ``(x tensor, integer label)``.
    """
    fn = load_object(spec)
    required = _required_positional(fn)
    presplit = required == 2
    if required not in (None, 0, 2):
        raise PluginError(f"{spec}: the function must take no arguments, or two (num, total); "
                          f"it has signature {inspect.signature(fn)}")
    try:
        result = fn(num, total) if presplit else fn()
    except Exception as exc:
        raise PluginError(f"{spec}: calling it raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise PluginError(f"{spec}: must return (train_dataset, test_dataset), returned a "
                          f"{type(result).__name__}")
    train, test = result
    _check_dataset(spec, "training", train)
    _check_dataset(spec, "test", test)
    return UserData(train, test, presplit)


# ------------------------------------------------------------------------------------ model


def load_model_factory(spec: str) -> Callable[[], nn.Module]:
    """The ``--model`` factory named by ``spec``, checked by building one model now.

    The returned callable checks every model it builds as well. Seed it with
    :func:`build_from_factory` so that all peers of a job start from the same weights.
    """
    fn = load_object(spec)
    if _required_positional(fn) not in (None, 0):
        raise PluginError(f"{spec}: a model factory takes no arguments; it has signature "
                          f"{inspect.signature(fn)}")

    def factory() -> nn.Module:
        try:
            model = fn()
        except Exception as exc:
            raise PluginError(f"{spec}: calling it raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise PluginError(f"{spec}: must return a torch.nn.Module, returned a "
                              f"{type(model).__name__}")
        if not model.state_dict():
            raise PluginError(f"{spec}: the model has no parameters to train and average")
        return model

    factory()
    return factory


def build_from_factory(factory: Callable[[], nn.Module], seed: int | None = None) -> nn.Module:
    """``factory()`` with its initial weights a pure function of ``seed`` (as
    :func:`learner.model.build_model`); the global torch RNG is left untouched."""
    if seed is None:
        return factory()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def check_model_accepts(model: nn.Module, dataset: Dataset[Any], spec: str = "the model") -> None:
    """Run the model on item 0 of ``dataset`` (a batch of one, on the CPU, without gradients)
    so that a model/data mismatch fails at start with a clear message, not mid-training."""
    x = dataset[0][0]
    batch = torch.as_tensor(x).unsqueeze(0)
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(batch.to(device))
    except Exception as exc:
        raise PluginError(f"{spec} cannot take the data's inputs (one input: "
                          f"{tuple(batch.shape)[1:]} {batch.dtype}): {type(exc).__name__}: "
                          f"{exc}") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise PluginError(f"{spec} must return N x classes log-probabilities (training uses "
                          f"nll_loss); it returned {getattr(out, 'shape', type(out).__name__)}")


# ----------------------------------------------------------------------------- architecture

Entry = tuple[str, tuple[int, ...], str]


def architecture_entries(state: Mapping[str, torch.Tensor] | Iterable[NamedArray]
                         ) -> list[Entry]:
    """The sorted ``(name, shape, dtype)`` triples that :func:`fingerprint` hashes."""
    if isinstance(state, Mapping):
        entries = [(name, tuple(t.shape), numpy_dtype(t.dtype).name) for name, t in state.items()]
    else:
        entries = [(a.name, tuple(a.array.shape), a.array.dtype.name) for a in state]
    return sorted(entries)


def model_fingerprint(model: nn.Module) -> str:
    """:func:`learner.averaging.fingerprint` of the model's state dict."""
    return fingerprint(model.state_dict())


def _spell(entry: Entry) -> str:
    return f"{entry[2]} {'x'.join(map(str, entry[1])) or 'scalar'}"


def architecture_mismatch(local_fp: str, remote_fp: str, *, peer: str | None = None,
                          local: Iterable[Entry] | None = None,
                          remote: Iterable[Entry] | None = None, limit: int = 5) -> str:
    """A message for a peer whose model fingerprint differs from ours.

    Fingerprints may be shortened (the rendezvous metadata carries 16 hex digits). Given both
    sides' :func:`architecture_entries`, the first ``limit`` differences are named too.
    """
    who = f"peer {peer}" if peer else "a peer"
    text = (f"{who} trains a different model architecture (fingerprint {remote_fp[:12]}, ours "
            f"{local_fp[:12]}); its models are not averaged with ours. All peers of a job must "
            "build the same model: the same --model factory (or none, for the default) and the "
            "same code version")
    if local is None or remote is None:
        return text + "."
    mine = {name: (name, shape, dtype) for name, shape, dtype in local}
    theirs = {name: (name, shape, dtype) for name, shape, dtype in remote}
    differences = []
    for name in sorted(mine.keys() | theirs.keys()):
        if name not in theirs:
            differences.append(f"{name} only in ours")
        elif name not in mine:
            differences.append(f"{name} only in theirs")
        elif mine[name] != theirs[name]:
            differences.append(f"{name} is {_spell(theirs[name])}, ours {_spell(mine[name])}")
    if not differences:
        return text + "."
    shown = "; ".join(differences[:limit])
    more = f"; and {len(differences) - limit} more" if len(differences) > limit else ""
    return f"{text}. Differences: {shown}{more}."
