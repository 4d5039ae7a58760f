"""Loading your own model and data from ``module:attr`` specs, and mismatch messages."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from learner.averaging import fingerprint
from learner.convert import state_to_arrays
from learner.model import Net
from learner.plugins import (
    PluginError,
    architecture_entries,
    architecture_mismatch,
    build_from_factory,
    check_model_accepts,
    load_data_hook,
    load_model_factory,
    load_object,
    model_fingerprint,
)

PLUGINS = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

NOT_CALLABLE = 3

def data(n=8):
    x = torch.randn(n, 1, 28, 28)
    return TensorDataset(x, torch.arange(n) % 10), TensorDataset(x[:4], torch.arange(4))

def own_part(num, total):
    train, test = data(8)
    return TensorDataset(*(t[num::total] for t in train.tensors)), test

def three(a, b, c):
    return None

def not_a_pair():
    return [1, 2, 3]

def no_len():
    return iter([]), iter([])

def empty():
    return TensorDataset(torch.zeros(0, 2), torch.zeros(0)), data()[1]

def float_labels():
    return TensorDataset(torch.zeros(3, 2), torch.zeros(3)), data()[1]

def raises():
    raise RuntimeError("disk on fire")

def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.LogSoftmax(dim=1))

def not_a_module():
    return "a model"

def needs_arg(width):
    return nn.Linear(width, 1)

def no_parameters():
    return nn.ReLU()

class Box:
    @staticmethod
    def build():
        return mlp()
'''


def _len(dataset: object) -> int:
    return len(dataset)  # type: ignore[arg-type]  # torch's Dataset type has no __len__


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module of plugins in a fresh current directory; yields its name."""
    name = f"plugs_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGINS))
    (tmp_path / "broken_dep.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "broken_code.py").write_text("raise ValueError('bad config')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield name
    for module in (name, "broken_dep", "broken_code"):
        sys.modules.pop(module, None)


def test_load_object_from_current_directory(plugins: str) -> None:
    assert load_object(f"{plugins}:mlp").__name__ == "mlp"
    assert callable(load_object(f"{plugins}:Box.build"))
    assert load_object("learner.model:build_model").__name__ == "build_model"


@pytest.mark.parametrize("spec", ["", "mlp", "mod:", ":attr", "a:b:c", "a b:c", "mod:1x",
                                  "mod.:x"])
def test_load_object_bad_format(spec: str) -> None:
    with pytest.raises(PluginError, match="not of the form package.module:function"):
        load_object(spec)


def test_load_object_errors(plugins: str) -> None:
    with pytest.raises(PluginError, match="module 'nowhere_xyz' not found"):
        load_object("nowhere_xyz:f")
    with pytest.raises(PluginError, match="module 'learner.nowhere' not found"):
        load_object("learner.nowhere:f")
    with pytest.raises(PluginError, match="importing broken_dep failed: No module named "
                                          "'no_such_dependency_xyz'"):
        load_object("broken_dep:f")
    with pytest.raises(PluginError, match="importing broken_code raised ValueError: bad config"):
        load_object("broken_code:f")
    with pytest.raises(PluginError, match="has no attribute 'missing'"):
        load_object(f"{plugins}:missing")
    with pytest.raises(PluginError, match="NOT_CALLABLE is a int, not a function"):
        load_object(f"{plugins}:NOT_CALLABLE")


def test_load_data_hook(plugins: str) -> None:
    whole = load_data_hook(f"{plugins}:data")
    assert not whole.presplit and _len(whole.train) == 8 and _len(whole.test) == 4
    train, test, presplit = load_data_hook(f"{plugins}:own_part", num=1, total=2)
    assert presplit and _len(train) == 4 and _len(test) == 4
    assert train[0][1].item() == 1


@pytest.mark.parametrize("attr,match", [
    ("three", "no arguments, or two"),
    ("not_a_pair", "must return \\(train_dataset, test_dataset\\), returned a list"),
    ("no_len", "not a torch.utils.data.Dataset"),
    ("empty", "training set is empty"),
    ("float_labels", "y of the training set must be an integer class label"),
    ("raises", "calling it raised RuntimeError: disk on fire"),
])
def test_load_data_hook_rejects(plugins: str, attr: str, match: str) -> None:
    with pytest.raises(PluginError, match=match):
        load_data_hook(f"{plugins}:{attr}")


def test_load_model_factory(plugins: str) -> None:
    factory = load_model_factory(f"{plugins}:mlp")
    a, b = build_from_factory(factory, seed=5), build_from_factory(factory, seed=5)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(factory())
    data = TensorDataset(torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))
    check_model_accepts(a, data)
    with pytest.raises(PluginError, match=r"cannot take the data's inputs \(one input: \(3,\)"):
        check_model_accepts(a, TensorDataset(torch.randn(2, 3), torch.tensor([0, 1])))


@pytest.mark.parametrize("attr,match", [
    ("not_a_module", "must return a torch.nn.Module, returned a str"),
    ("needs_arg", "takes no arguments"),
    ("no_parameters", "no parameters"),
    ("raises", "calling it raised RuntimeError"),
])
def test_load_model_factory_rejects(plugins: str, attr: str, match: str) -> None:
    with pytest.raises(PluginError, match=match):
        load_model_factory(f"{plugins}:{attr}")


def test_architecture_mismatch() -> None:
    ours = Net().state_dict()
    theirs = nn.Sequential(nn.Linear(4, 2)).state_dict()
    net = Net()
    net.fc2 = nn.Linear(128, 5)
    changed = net.state_dict()
    fp_ours, fp_changed = fingerprint(ours), fingerprint(changed)
    short = architecture_mismatch(fp_ours, fp_changed[:16], peer="abc")
    assert short.startswith(f"peer abc trains a different model architecture (fingerprint "
                            f"{fp_changed[:12]}, ours {fp_ours[:12]})")
    assert short.endswith("same code version.")
    detailed = architecture_mismatch(fp_ours, fp_changed, local=architecture_entries(ours),
                                     remote=architecture_entries(state_to_arrays(changed)))
    assert detailed.endswith(". Differences: fc2.bias is float32 5, ours float32 10; "
                             "fc2.weight is float32 5x128, ours float32 10x128.")
    many = architecture_mismatch("a", "b", local=architecture_entries(ours),
                                 remote=architecture_entries(theirs), limit=2)
    assert "0.bias only in theirs; 0.weight only in theirs; and 8 more." in many


def test_examples_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    data = load_data_hook("examples.my_data:load")
    own = load_data_hook("examples.my_data:load_own_part", num=1, total=3)
    assert (_len(data.train), _len(data.test)) == (3000, 600)
    assert own.presplit and _len(own.train) == 1000
    model = build_from_factory(load_model_factory("examples.my_model:factory"), seed=1)
    check_model_accepts(model, data.train)
