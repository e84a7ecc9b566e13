"""Seeded random small CNN and RNN models, described as JSON-able specs (so a failure is a file to replay).

A spec is ``{"kind": "cnn" | "rnn", "input": [shape], "layers": [{"type": ..., ...}, ...]}``; ``build(spec)``
turns it into an eval-mode ``nn.Module`` with seeded weights. The generator tracks the activation shape so every
layer it picks is valid: convs (kernel, stride, padding incl. 'same' and asymmetric: ``F.pad``, ``nn.ZeroPad2d`` or
``nn.ReflectionPad2d``, dilation, groups incl.
depthwise), batch norm, every supported activation, max/avg/adaptive pools (overlapping windows, ceil mode,
padding), residual add, concat, squeeze-excite, flatten + linear; LSTM/GRU/RNN (layers, bidirectional,
batch_first, with and without bias).
"""

from __future__ import annotations

import random

import torch
from torch import nn

PAD_MODULES = ["F.pad", "ZeroPad2d", "ReflectionPad2d"]  # how an asymmetric-padded conv pads its input
ACTIVATIONS = ["relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "mish", "sigmoid", "tanh", "hardswish",
               "hardsigmoid", "hardtanh"]


def activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "leaky_relu": nn.LeakyReLU(0.1), "elu": nn.ELU(0.8),
            "gelu": nn.GELU(), "silu": nn.SiLU(), "mish": nn.Mish(), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(),
            "hardswish": nn.Hardswish(), "hardsigmoid": nn.Hardsigmoid(), "hardtanh": nn.Hardtanh(-2.0, 1.5)}[name]


# ------------------------------------------------------------------------------------------------ generator
def _out(size: int, kernel: int, stride: int, pad_total: int, dilation: int = 1, ceil: bool = False) -> int:
    span = size + pad_total - dilation * (kernel - 1) - 1
    count = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (count - 1) * stride >= size + pad_total // 2:  # torch: the last window starts inside the input
        count -= 1
    return count


def _conv(rng: random.Random, c: int, h: int, w: int) -> tuple[dict, tuple[int, int, int]] | None:
    kernel = rng.choice([1, 1, 3, 3, 5])
    stride = rng.choice([1, 1, 2])
    dilation = rng.choice([1, 1, 1, 2]) if kernel > 1 else 1
    groups_kind = rng.choice(["dense", "dense", "depthwise", "grouped"])
    out = rng.choice([2, 3, 4, 6, 8, 12, 16])
    if groups_kind == "depthwise":
        groups, out = c, c * rng.choice([1, 1, 2])
    elif groups_kind == "grouped" and c % 2 == 0:
        groups, out = 2, 2 * rng.choice([1, 2, 3, 4])
    else:
        groups = 1
    padding_kind = rng.choice(["int", "int", "same", "asymmetric", "none"])
    reach = dilation * (kernel - 1)
    if padding_kind == "same" and stride == 1:
        layer, pads = {"padding": "same"}, (reach, reach)
    elif padding_kind == "asymmetric":
        pad = [rng.randint(0, 2) for _ in range(4)]  # left, right, top, bottom (F.pad)
        modes = PAD_MODULES if max(pad) < min(h, w) else PAD_MODULES[:2]  # reflection needs pad < size
        layer, pads = {"pad": pad, "pad_module": rng.choice(modes), "padding": 0}, (pad[2] + pad[3], pad[0] + pad[1])
    else:
        p = rng.randint(0, reach // 2 + 1) if padding_kind != "none" else 0
        layer, pads = {"padding": p}, (2 * p, 2 * p)
    oh, ow = _out(h, kernel, stride, pads[0], dilation), _out(w, kernel, stride, pads[1], dilation)
    if oh < 1 or ow < 1:
        return None
    layer |= {"type": "conv", "in": c, "out": out, "kernel": kernel, "stride": stride, "dilation": dilation,
              "groups": groups, "bias": rng.random() < 0.7}
    return layer, (out, oh, ow)


def _pool(rng: random.Random, c: int, h: int, w: int) -> tuple[dict, tuple[int, int, int]] | None:
    kind = rng.choice(["max", "max", "avg", "adaptive_avg", "adaptive_max"])
    if kind.startswith("adaptive"):
        size = rng.choice([1, 1, 2]) if kind == "adaptive_avg" else 1
        if kind == "adaptive_max" and h % 2 == 0 and w % 2 == 0 and rng.random() < 0.5:
            size = 2  # even windows: our adaptive max pool needs input sizes divisible by the output
        return {"type": kind, "size": size}, (c, size, size)
    kernel = rng.choice([2, 2, 3])
    stride = rng.choice([1, 2, kernel])  # stride < kernel: overlapping windows
    padding = rng.randint(0, kernel // 2)
    ceil = rng.random() < 0.3
    oh, ow = _out(h, kernel, stride, 2 * padding, ceil=ceil), _out(w, kernel, stride, 2 * padding, ceil=ceil)
    if oh < 1 or ow < 1 or h + 2 * padding < kernel or w + 2 * padding < kernel:
        return None
    layer = {"type": kind, "kernel": kernel, "stride": stride, "padding": padding, "ceil": ceil}
    if kind == "avg":
        layer["count_include_pad"] = rng.random() < 0.5
    return layer, (c, oh, ow)


def cnn_spec(rng: random.Random) -> dict:
    c, h, w = rng.choice([1, 3, 4, 8]), rng.randint(6, 16), rng.randint(6, 16)
    shape = [rng.choice([1, 1, 2]), c, h, w]
    layers: list[dict] = []
    for _ in range(rng.randint(1, 6)):
        choice = rng.choice(["conv", "conv", "conv", "bn", "act", "pool", "residual", "concat", "se"])
        if choice == "conv":
            made = _conv(rng, c, h, w)
            if made is None:
                continue
            layer, (c, h, w) = made
            layers.append(layer)
            if rng.random() < 0.5:
                layers.append({"type": "bn", "channels": c})
            if rng.random() < 0.7:
                layers.append({"type": "act", "name": rng.choice(ACTIVATIONS)})
        elif choice == "bn":
            layers.append({"type": "bn", "channels": c})
        elif choice == "act":
            layers.append({"type": "act", "name": rng.choice(ACTIVATIONS)})
        elif choice == "pool":
            made = _pool(rng, c, h, w)
            if made is not None:
                layer, (c, h, w) = made
                layers.append(layer)
        elif choice == "residual":  # conv(same) [+ bn] + x, then an activation
            layers.append({"type": "residual", "channels": c, "kernel": rng.choice([1, 3]),
                           "bn": rng.random() < 0.5, "act": rng.choice(ACTIVATIONS)})
        elif choice == "concat":  # two conv branches side by side
            a, b = rng.choice([2, 4, 6]), rng.choice([2, 3, 4])
            layers.append({"type": "concat", "in": c, "branches": [a, b], "act": rng.choice(ACTIVATIONS)})
            c = a + b
        elif choice == "se":
            layers.append({"type": "se", "channels": c, "hidden": max(1, c // rng.choice([1, 2, 4]))})
    if rng.random() < 0.5:
        layers.append({"type": "adaptive_avg", "size": 1})
        h = w = 1
    layers.append({"type": "flatten"})
    layers.append({"type": "linear", "in": c * h * w, "out": rng.choice([1, 3, 5, 10]), "bias": rng.random() < 0.8})
    return {"kind": "cnn", "input": shape, "layers": layers}


def rnn_spec(rng: random.Random) -> dict:
    batch, steps, features = rng.choice([1, 2]), rng.randint(2, 6), rng.choice([1, 3, 4, 8])
    batch_first = rng.random() < 0.5
    cell = {"type": rng.choice(["lstm", "gru", "rnn"]), "in": features, "hidden": rng.choice([1, 3, 4, 8, 16]),
            "layers": rng.choice([1, 1, 2]), "bidirectional": rng.random() < 0.5, "batch_first": batch_first,
            "bias": rng.random() < 0.8}
    if cell["type"] == "rnn":
        cell["nonlinearity"] = rng.choice(["tanh", "relu"])
    width = cell["hidden"] * (2 if cell["bidirectional"] else 1)
    layers = [cell, {"type": "last_step" if rng.random() < 0.6 else "all_steps", "batch_first": batch_first},
              {"type": "linear", "in": width, "out": rng.choice([1, 2, 5]), "bias": True}]
    shape = [batch, steps, features] if batch_first else [steps, batch, features]
    return {"kind": "rnn", "input": shape, "layers": layers}


def random_spec(seed: int) -> dict:
    """The model of ``seed``: a CNN three times in four, an RNN otherwise."""
    rng = random.Random(seed)
    spec = cnn_spec(rng) if rng.random() < 0.75 else rnn_spec(rng)
    spec["seed"] = seed
    return spec


# ------------------------------------------------------------------------------------------------ builder
class Pad(nn.Module):
    """Asymmetric zero padding as ``F.pad``."""

    def __init__(self, pad: list[int]):
        super().__init__()
        self.pad = tuple(pad)

    def forward(self, x):
        return nn.functional.pad(x, self.pad)


class Residual(nn.Module):
    def __init__(self, layer: dict):
        super().__init__()
        c, k = layer["channels"], layer["kernel"]
        self.conv = nn.Conv2d(c, c, k, padding=k // 2)
        self.bn = nn.BatchNorm2d(c) if layer["bn"] else nn.Identity()
        self.act = activation(layer["act"])

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + x)


class Concat(nn.Module):
    def __init__(self, layer: dict):
        super().__init__()
        a, b = layer["branches"]
        self.left, self.right = nn.Conv2d(layer["in"], a, 1), nn.Conv2d(layer["in"], b, 3, padding=1)
        self.act = activation(layer["act"])

    def forward(self, x):
        return torch.cat([self.act(self.left(x)), self.right(x)], dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, layer: dict):
        super().__init__()
        c, hidden = layer["channels"], layer["hidden"]
        self.reduce, self.expand = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        scale = torch.sigmoid(self.expand(torch.relu(self.reduce(nn.functional.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class Recurrent(nn.Module):
    def __init__(self, layer: dict):
        super().__init__()
        kind = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[layer["type"]]
        extra = {"nonlinearity": layer["nonlinearity"]} if layer["type"] == "rnn" else {}
        self.rnn = kind(layer["in"], layer["hidden"], num_layers=layer["layers"], bias=layer["bias"],
                        batch_first=layer["batch_first"], bidirectional=layer["bidirectional"], **extra)

    def forward(self, x):
        return self.rnn(x)[0]


class Step(nn.Module):
    def __init__(self, layer: dict):
        super().__init__()
        self.last, self.batch_first = layer["type"] == "last_step", layer["batch_first"]

    def forward(self, x):
        if self.last:
            return x[:, -1] if self.batch_first else x[-1]
        return x


def _layer(layer: dict) -> nn.Module:
    t = layer["type"]
    if t == "conv":
        conv = nn.Conv2d(layer["in"], layer["out"], layer["kernel"], stride=layer["stride"],
                         padding=layer["padding"], dilation=layer["dilation"], groups=layer["groups"],
                         bias=layer["bias"])
        if "pad" not in layer:
            return conv
        module = layer.get("pad_module", "F.pad")  # specs written before the field existed used F.pad
        pad = {"F.pad": Pad, "ZeroPad2d": nn.ZeroPad2d, "ReflectionPad2d": nn.ReflectionPad2d}[module](layer["pad"])
        return nn.Sequential(pad, conv)
    if t == "bn":
        return nn.BatchNorm2d(layer["channels"])
    if t == "act":
        return activation(layer["name"])
    if t in ("max", "avg"):
        kwargs = {"count_include_pad": layer["count_include_pad"]} if t == "avg" else {}
        pool = nn.MaxPool2d if t == "max" else nn.AvgPool2d
        return pool(layer["kernel"], layer["stride"], layer["padding"], ceil_mode=layer["ceil"], **kwargs)
    if t in ("adaptive_avg", "adaptive_max"):
        return (nn.AdaptiveAvgPool2d if t == "adaptive_avg" else nn.AdaptiveMaxPool2d)(layer["size"])
    if t == "flatten":
        return nn.Flatten()
    if t == "linear":
        return nn.Linear(layer["in"], layer["out"], bias=layer["bias"])
    if t in ("lstm", "gru", "rnn"):
        return Recurrent(layer)
    return {"residual": Residual, "concat": Concat, "se": SqueezeExcite, "last_step": Step,
            "all_steps": Step}[t](layer)


def build(spec: dict) -> tuple[nn.Module, torch.Tensor]:
    """The eval-mode model of ``spec`` with seeded weights (batch-norm statistics randomized so folding matters)
    and a seeded example input."""
    torch.manual_seed(spec["seed"])
    model = nn.Sequential(*[_layer(layer) for layer in spec["layers"]]).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model, torch.randn(spec["input"])


def describe(spec: dict) -> str:
    return " -> ".join(layer["type"] if layer["type"] != "act" else layer["name"] for layer in spec["layers"])

