"""Payload shapes for benchmarks/wan.py: the 4.8 MB CNN and a ResNet-18-sized state dict."""

from __future__ import annotations

Shapes = list[tuple[str, tuple[int, ...]]]


def cnn_shapes() -> Shapes:
    """The shapes of ``learner.model.build_model(0).state_dict()`` (the MNIST CNN, 4.8 MB)."""
    from learner.model import build_model

    return [(name, tuple(t.shape)) for name, t in build_model(0).state_dict().items()
            if t.is_floating_point()]


def resnet18_shapes(classes: int = 1000) -> Shapes:
    """torchvision's resnet18 state dict (float tensors: 11.69 M values, 46.8 MB as float32),
    written out by hand so that no model has to be built."""
    shapes: Shapes = [("conv1.weight", (64, 3, 7, 7)), *_bn("bn1", 64)]
    inp = 64
    for layer, out in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{layer}.{block}"
            cin = inp if block == 0 else out
            shapes += [(f"{p}.conv1.weight", (out, cin, 3, 3)), *_bn(f"{p}.bn1", out),
                       (f"{p}.conv2.weight", (out, out, 3, 3)), *_bn(f"{p}.bn2", out)]
            if block == 0 and cin != out:
                shapes += [(f"{p}.downsample.0.weight", (out, cin, 1, 1)),
                           *_bn(f"{p}.downsample.1", out)]
        inp = out
    return shapes + [("fc.weight", (classes, 512)), ("fc.bias", (classes,))]


def flat_shapes(nbytes: int, pieces: int = 8) -> Shapes:
    """``pieces`` float32 arrays of ``nbytes`` in all (rounded down to 4 * pieces bytes)."""
    if nbytes < 4 * pieces:
        raise ValueError(f"payload of {nbytes} bytes is too small for {pieces} float32 arrays")
    return [(f"w{i}", (nbytes // 4 // pieces,)) for i in range(pieces)]


def nbytes(shapes: Shapes) -> int:
    total = 0
    for _, dims in shapes:
        n = 4
        for d in dims:
            n *= d
        total += n
    return total


def _bn(prefix: str, n: int) -> Shapes:
    return [(f"{prefix}.{k}", (n,)) for k in ("weight", "bias", "running_mean", "running_var")]
