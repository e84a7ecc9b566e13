"""A small zoo of real CNN/RNN model families for tests and benchmarks.

Every model is written out here (no downloads, no torchvision) so that the compiler sees the
same structure real networks have: residual adds, downsample branches, depthwise and grouped
convolutions, channel concat/shuffle, squeeze-and-excitation, pooling with ``ceil_mode``,
recurrent layers, dilated and ``padding='same'`` 1-D convolutions. The code mixes ``nn``
modules, functional calls (``F.relu``, ``F.adaptive_avg_pool2d``), tensor methods
(``x.view``, ``x.flatten``, ``x.mean``) and operators, as real model code does, and has no
control flow on tensor values, so every model traces with ``torch.fx.symbolic_trace``.

Default constructor arguments give tiny models (a few channels, 1x3x32x32 images, short
sequences) so tests compile quickly. ``FULL`` holds bigger versions for benchmarks (e.g.
``resnet18_like`` at 224x224). Use :func:`make` to get a seeded model in eval mode, with
randomized BatchNorm statistics (so BN folding is non-trivial), and matching example inputs.

Run ``python examples/zoo.py`` to check that every entry runs and traces.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

Shape = tuple[int, ...]

__all__ = [
    "ResNetStyle",
    "resnet18_like",
    "MobileNetV2Style",
    "SqueezeNetStyle",
    "ShuffleNetStyle",
    "EfficientNetStyle",
    "VGGStyle",
    "BiLSTMClassifier",
    "GRUSeq2Seq",
    "Audio1dConv",
    "ZOO",
    "FULL",
    "make",
]


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias, 'same'-style padding for odd k) followed by BatchNorm."""
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN with a residual add; 1x1 conv+BN downsample when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNetStyle(nn.Module):
    """ResNet with BasicBlocks: stem conv+bn+relu+maxpool, stages, avg pool, linear.

    Stage ``i`` has ``width * 2**i`` channels; every stage but the first halves the resolution.
    """

    def __init__(
        self,
        layers: Sequence[int] = (1, 1, 1),
        width: int = 8,
        num_classes: int = 10,
        in_channels: int = 3,
        stem_kernel: int = 7,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, stem_kernel, 2, stem_kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], width
        for i, n in enumerate(layers):
            cout = width * 2**i
            blocks = [BasicBlock(cin, cout, 1 if i == 0 else 2)]
            blocks += [BasicBlock(cout, cout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18_like(num_classes: int = 10, width: int = 64) -> ResNetStyle:
    """ResNet-18 layout (layers [2, 2, 2, 2]) for benchmarks at 224x224."""
    return ResNetStyle(layers=(2, 2, 2, 2), width=width, num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """1x1 expand -> depthwise 3x3 -> 1x1 linear bottleneck; residual if stride 1 and cin == cout."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += _conv_bn(hidden, cout, 1)  # linear bottleneck: no activation
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2Style(nn.Module):
    """MobileNetV2: stem, inverted residual blocks (t, c-multiplier, n, s), 1x1 head, mean pool."""

    DEFAULT_SETTINGS = ((1, 1, 1, 1), (4, 2, 2, 2), (4, 3, 2, 2), (4, 4, 1, 1))

    def __init__(
        self,
        width: int = 8,
        num_classes: int = 10,
        settings: Sequence[tuple[int, int, int, int]] = DEFAULT_SETTINGS,
        last_channels: int | None = None,
        in_channels: int = 3,
    ):
        super().__init__()
        last_channels = last_channels or width * 8
        layers: list[nn.Module] = [*_conv_bn(in_channels, width, 3, 2), nn.ReLU6()]
        cin = width
        for t, mult, n, s in settings:
            cout = width * mult
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers += [*_conv_bn(cin, last_channels, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.mean((2, 3))
        return self.classifier(x)


# --------------------------------------------------------------------------------------------
# SqueezeNet
# --------------------------------------------------------------------------------------------


class Fire(nn.Module):
    """Squeeze 1x1, then expand 1x1 and 3x3 in parallel, concatenated on channels."""

    def __init__(self, cin: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_act = nn.ReLU()
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze_act(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(s)), F.relu(self.expand3x3(s))], dim=1)


class SqueezeNetStyle(nn.Module):
    """SqueezeNet 1.1 layout with the paper's simple bypass on same-shape Fire modules."""

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 4 * w, 3, 2), nn.ReLU())
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.fire2 = Fire(4 * w, w, 4 * w, 4 * w)
        self.fire3 = Fire(8 * w, w, 4 * w, 4 * w)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.fire4 = Fire(8 * w, 2 * w, 8 * w, 8 * w)
        self.fire5 = Fire(16 * w, 2 * w, 8 * w, 8 * w)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Conv2d(16 * w, num_classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.stem(x))
        x = self.fire2(x)
        x = x + self.fire3(x)
        x = self.pool2(x)
        x = self.fire4(x)
        x = x + self.fire5(x)
        return self.classifier(x).flatten(1)


# --------------------------------------------------------------------------------------------
# ShuffleNetV2
# --------------------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split (stride 1) or two branches (stride 2), concat, channel shuffle."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int = 2):
        super().__init__()
        self.stride = stride
        self.groups = groups
        branch = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                *_conv_bn(cin, cin, 3, stride, groups=cin), *_conv_bn(cin, branch, 1), nn.ReLU()
            )
        b2_in = cin if stride > 1 else branch
        self.branch2 = nn.Sequential(
            *_conv_bn(b2_in, branch, 1),
            nn.ReLU(),
            *_conv_bn(branch, branch, 3, stride, groups=branch),
            *_conv_bn(branch, branch, 1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, self.groups)


class ShuffleNetStyle(nn.Module):
    """ShuffleNetV2: conv+maxpool stem, stages of shuffle units, 1x1 conv, global mean, linear."""

    def __init__(
        self,
        width: int = 8,
        num_classes: int = 10,
        repeats: Sequence[int] = (2, 2),
        in_channels: int = 3,
    ):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, width, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i, n in enumerate(repeats):
            cout = width * 2 ** (i + 1)
            units = [ShuffleUnit(cin, cout, 2)] + [ShuffleUnit(cout, cout, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.conv_last = nn.Sequential(*_conv_bn(cin, 4 * cin, 1), nn.ReLU())
        self.fc = nn.Linear(4 * cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_last(self.stages(self.stem(x)))
        x = x.mean([2, 3])
        return self.fc(x)


# --------------------------------------------------------------------------------------------
# EfficientNet
# --------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 reduce -> SiLU -> 1x1 expand -> sigmoid gate, multiplied into x."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.expand(self.act(self.reduce(s))))
        return x * s


class MBConv(nn.Module):
    """MBConv: 1x1 expand (SiLU) -> depthwise kxk (SiLU) -> SE -> 1x1 project; residual if possible."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, se_ratio: float = 0.25):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.SiLU()]
        layers += [*_conv_bn(hidden, hidden, kernel, stride, groups=hidden), nn.SiLU()]
        layers.append(SqueezeExcite(hidden, max(1, int(cin * se_ratio))))
        layers += _conv_bn(hidden, cout, 1)
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res else out


class EfficientNetStyle(nn.Module):
    """EfficientNet-B0-like: stem, MBConv stages (t, c-multiplier, n, s, k), head, pool, linear."""

    DEFAULT_SETTINGS = ((1, 1, 1, 1, 3), (4, 2, 2, 2, 3), (4, 3, 2, 2, 5), (4, 4, 1, 1, 3))

    def __init__(
        self,
        width: int = 8,
        num_classes: int = 10,
        settings: Sequence[tuple[int, int, int, int, int]] = DEFAULT_SETTINGS,
        in_channels: int = 3,
    ):
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(in_channels, width, 3, 2), nn.SiLU()]
        cin = width
        for t, mult, n, s, k in settings:
            cout = width * mult
            for i in range(n):
                layers.append(MBConv(cin, cout, k, s if i == 0 else 1, t))
                cin = cout
        head = 4 * cin
        layers += [*_conv_bn(cin, head, 1), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        x = self.dropout(x.flatten(1))
        return self.fc(x)


# --------------------------------------------------------------------------------------------
# VGG
# --------------------------------------------------------------------------------------------


class VGGStyle(nn.Module):
    """VGG: stages of conv3x3-ReLU (repeated) + 2x2 max pool, flatten, MLP classifier with dropout.

    ``stages`` gives per-stage channel multipliers of ``width``; ``image_size`` sizes the first
    linear layer and must be divisible by ``2 ** len(stages)``.
    """

    DEFAULT_STAGES = ((1,), (2, 2), (4, 4))

    def __init__(
        self,
        width: int = 8,
        image_size: int = 32,
        num_classes: int = 10,
        stages: Sequence[Sequence[int]] = DEFAULT_STAGES,
        hidden: int = 64,
        in_channels: int = 3,
    ):
        super().__init__()
        if image_size % 2 ** len(stages):
            raise ValueError(f"image_size {image_size} not divisible by {2 ** len(stages)}")
        layers: list[nn.Module] = []
        cin = in_channels
        for stage in stages:
            for mult in stage:
                layers += [nn.Conv2d(cin, width * mult, 3, padding=1), nn.ReLU()]
                cin = width * mult
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(stages)
        self.classifier = nn.Sequential(
            nn.Linear(cin * side * side, hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------------------------
# Recurrent models
# --------------------------------------------------------------------------------------------


class BiLSTMClassifier(nn.Module):
    """2-layer bidirectional LSTM over (N, T, F); classifies from the last time step's output."""

    def __init__(self, input_size: int = 8, hidden_size: int = 16, num_layers: int = 2, num_classes: int = 5):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(2 * hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.lstm(x)
        last = out[:, -1, :]
        return self.fc(self.dropout(last))


class GRUSeq2Seq(nn.Module):
    """GRU encoder-decoder over (T, N, F) float features; the decoder starts from the encoder state.

    ``forward(src, tgt)`` returns ``(logits, hidden)``: projected decoder outputs (T_tgt, N, out)
    and the decoder's final hidden state (num_layers, N, hidden).
    """

    def __init__(self, input_size: int = 8, hidden_size: int = 16, output_size: int = 8, num_layers: int = 1):
        super().__init__()
        self.encoder = nn.GRU(input_size, hidden_size, num_layers)
        self.decoder = nn.GRU(output_size, hidden_size, num_layers)
        self.proj = nn.Linear(hidden_size, output_size)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, hidden = self.encoder(src)
        out, hidden = self.decoder(tgt, hidden)
        return self.proj(out), hidden


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


class Audio1dConv(nn.Module):
    """1-D conv net over raw audio (N, C, L): strided, dilated and padding='same' convs, pools, linear."""

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        w = width
        self.conv1 = nn.Conv1d(in_channels, w, 9, stride=2, padding=4, bias=False)
        self.bn1 = nn.BatchNorm1d(w)
        self.pool1 = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(w, 2 * w, 3, padding=2, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm1d(2 * w)
        self.act2 = nn.GELU()
        self.conv3 = nn.Conv1d(2 * w, 2 * w, 5, padding="same")
        self.bn3 = nn.BatchNorm1d(2 * w)
        self.pool3 = nn.MaxPool1d(2)
        self.conv4 = nn.Conv1d(2 * w, 4 * w, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm1d(4 * w)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.bn1(self.conv1(x))))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.pool3(F.relu(self.bn3(self.conv3(x))))
        x = F.gelu(self.bn4(self.conv4(x)))
        x = self.pool(x)
        x = x.view(x.shape[0], -1)
        return self.fc(x)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

Entry = tuple[Callable[..., nn.Module], tuple[Shape, ...]]

#: name -> (factory, example input shapes, one per forward argument). Small, for tests.
ZOO: dict[str, Entry] = {
    "resnet": (ResNetStyle, ((1, 3, 32, 32),)),
    "mobilenetv2": (MobileNetV2Style, ((1, 3, 32, 32),)),
    "squeezenet": (SqueezeNetStyle, ((1, 3, 32, 32),)),
    "shufflenet": (ShuffleNetStyle, ((1, 3, 32, 32),)),
    "efficientnet": (EfficientNetStyle, ((1, 3, 32, 32),)),
    "vgg": (VGGStyle, ((1, 3, 32, 32),)),
    "bilstm": (BiLSTMClassifier, ((1, 16, 8),)),
    "gru_seq2seq": (GRUSeq2Seq, ((12, 1, 8), (10, 1, 8))),
    "audio1d": (Audio1dConv, ((1, 1, 400),)),
}

#: Same keys, full-size versions for benchmarks.
FULL: dict[str, Entry] = {
    "resnet": (resnet18_like, ((1, 3, 224, 224),)),
    "mobilenetv2": (partial(MobileNetV2Style, width=32, last_channels=1280), ((1, 3, 224, 224),)),
    "squeezenet": (partial(SqueezeNetStyle, width=16), ((1, 3, 224, 224),)),
    "shufflenet": (partial(ShuffleNetStyle, width=24, repeats=(4, 8, 4)), ((1, 3, 224, 224),)),
    "efficientnet": (partial(EfficientNetStyle, width=16), ((1, 3, 224, 224),)),
    "vgg": (
        partial(VGGStyle, width=32, image_size=224, stages=((1,), (2,), (4, 4), (8, 8), (8, 8)), hidden=256),
        ((1, 3, 224, 224),),
    ),
    "bilstm": (partial(BiLSTMClassifier, input_size=40, hidden_size=128), ((1, 100, 40),)),
    "gru_seq2seq": (
        partial(GRUSeq2Seq, input_size=32, hidden_size=128, output_size=32, num_layers=2),
        ((50, 1, 32), (40, 1, 32)),
    ),
    "audio1d": (partial(Audio1dConv, width=32), ((1, 1, 16000),)),
}


def _randomize_batchnorm(model: nn.Module) -> None:
    """Give BatchNorm layers non-trivial running stats and affine params (uses the global RNG)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)


def make(
    name: str,
    seed: int = 0,
    full: bool = False,
    input_shapes: Sequence[Shape] | None = None,
    **kwargs,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build zoo model ``name`` in eval mode with seeded weights, plus seeded float32 example inputs.

    ``full`` picks the benchmark-size entry from ``FULL``. ``kwargs`` go to the factory, except
    ``image_size``, which also resizes the H and W of 4-D example inputs (it is only passed on to
    factories that accept it). ``input_shapes`` overrides the example shapes entirely.
    """
    factory, shapes = (FULL if full else ZOO)[name]
    image_size = kwargs.get("image_size")
    if image_size is not None and "image_size" not in inspect.signature(factory).parameters:
        kwargs.pop("image_size")
    if input_shapes is not None:
        shapes = tuple(tuple(s) for s in input_shapes)
    elif image_size is not None:
        shapes = tuple(s[:2] + (image_size, image_size) if len(s) == 4 else s for s in shapes)
    torch.manual_seed(seed)
    model = factory(**kwargs)
    _randomize_batchnorm(model)
    gen = torch.Generator().manual_seed(seed)
    inputs = tuple(torch.randn(s, generator=gen, dtype=torch.float32) for s in shapes)
    return model.eval(), inputs


def _main() -> None:
    import time

    import torch.fx

    for name in ZOO:
        model, inputs = make(name)
        params = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            out = model(*inputs)  # warm-up
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                model(*inputs)
                times.append((time.perf_counter() - t0) * 1e3)
            ms = sorted(times)[len(times) // 2]
            try:
                gm = torch.fx.symbolic_trace(model)
                ref = out if isinstance(out, tuple) else (out,)
                got = gm(*inputs)
                got = got if isinstance(got, tuple) else (got,)
                ok = all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
                fx = "pass" if ok else "MISMATCH"
            except Exception as e:  # noqa: BLE001 - report any tracing failure
                fx = f"FAIL ({type(e).__name__}: {e})"
        outs = out if isinstance(out, tuple) else (out,)
        print(
            f"{name:13s} in={[tuple(i.shape) for i in inputs]} out={[tuple(o.shape) for o in outs]} "
            f"params={params:,} fwd(median)={ms:.1f}ms fx={fx}"
        )


if __name__ == "__main__":
    _main()
