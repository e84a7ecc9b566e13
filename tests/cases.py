"""Small PyTorch modules covering every supported construct in module, functional, method and operator forms.

Shared by the frontend tests (interpreter vs PyTorch) and the backend tests (TVM vs PyTorch), so every construct
the frontend accepts is also proven to compile and to compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class _FnBase(nn.Module):
    def __init__(self, fn: Callable, **children: nn.Module):
        super().__init__()
        self.fn = fn
        for name, child in children.items():
            setattr(self, name, child)


class _Fn1(_FnBase):
    def forward(self, x):
        return self.fn(self, x)


class _Fn2(_FnBase):
    def forward(self, x, y):
        return self.fn(self, x, y)


class _Fn3(_FnBase):
    def forward(self, x, y, z):
        return self.fn(self, x, y, z)


def Fn(fn: Callable, **children: nn.Module) -> nn.Module:  # noqa: N802 (reads like a class at call sites)
    """Module with ``forward(x[, y[, z]]) = fn(self, ...)`` and optional children, so a case is one line.

    Fixed arity (no ``*args``) so torch.fx symbolic tracing sees one placeholder per input, as in real models.
    """
    arity = fn.__code__.co_argcount - 1
    return {1: _Fn1, 2: _Fn2, 3: _Fn3}[arity](fn, **children)


class ParamConv(nn.Module):
    """Functional conv with its own parameters: ``F.conv2d(x, self.weight, self.bias, ...)``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return F.relu(F.conv2d(x, self.weight, self.bias, stride=1, padding=1))


class ChunkSplitCat(nn.Module):
    def forward(self, x):
        a, b, c = x.chunk(3, dim=1)
        first, rest = torch.split(x, [1, 2], dim=1)
        return torch.cat([c, b, a, rest, first], dim=1)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    inputs: tuple  # shapes; an entry ("int64", shape, high) makes integer indices
    ops: tuple[str, ...] = ()  # IR ops the import must contain

    def example_inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        xs = []
        for spec in self.inputs:
            if spec and spec[0] == "int64":
                xs.append(torch.randint(0, spec[2], spec[1], generator=gen))
            else:
                xs.append(torch.randn(*spec, generator=gen))
        return tuple(xs)


def _bn(m):
    with torch.no_grad():
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        if m.affine:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.3, 0.3)
    return m


def _affine(m):
    """Non-trivial affine parameters for LayerNorm / GroupNorm (their defaults are ones and zeros)."""
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.3, 0.3)
    return m


def _layer_norm2d():
    """torchvision's ConvNeXt ``LayerNorm2d``: a LayerNorm subclass whose forward permutes to NHWC and back."""
    from torchvision.models.convnext import LayerNorm2d
    return _affine(LayerNorm2d(3))


def _stochastic_depth():
    from torchvision.ops import StochasticDepth
    return Fn(lambda s, x: x + s.sd(F.relu(x)) + s.sd2(x), sd=StochasticDepth(0.3, "row"),
              sd2=StochasticDepth(0.5, "batch"))


IMG, SEQ = (1, 3, 9, 9), (1, 6, 4)
CASES = [
    # ------------------------------------------------------------------ convolutions
    Case("conv1d", lambda: nn.Conv1d(4, 6, 3, padding=1), ((1, 4, 12),), ("conv1d",)),
    Case("conv1d_same_dilated", lambda: nn.Conv1d(4, 6, 3, padding="same", dilation=2), ((1, 4, 12),)),
    Case("conv2d", lambda: nn.Conv2d(3, 6, 3, padding=1), (IMG,), ("conv2d",)),
    Case("conv2d_stride_nobias", lambda: nn.Conv2d(3, 6, 3, stride=2, bias=False), (IMG,)),
    Case("conv2d_groups", lambda: nn.Conv2d(4, 8, 3, groups=2, padding=1), ((1, 4, 8, 8),)),
    Case("conv2d_depthwise", lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1), ((1, 4, 8, 8),)),
    Case("conv2d_dilation", lambda: nn.Conv2d(3, 4, 3, dilation=2, padding=2), (IMG,)),
    Case("conv2d_same_odd", lambda: nn.Conv2d(3, 4, 3, padding="same"), (IMG,)),
    Case("conv2d_same_even", lambda: nn.Conv2d(3, 4, 4, padding="same"), (IMG,), ("pad", "conv2d")),
    Case("conv2d_valid", lambda: nn.Conv2d(3, 4, 3, padding="valid"), (IMG,)),
    Case("conv2d_reflect", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (IMG,), ("pad",)),
    Case("conv2d_replicate", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate"), (IMG,)),
    Case("conv2d_circular", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (IMG,)),
    Case("conv2d_functional", ParamConv, (IMG,), ("conv2d", "relu")),
    Case("conv_transpose2d", lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
         (IMG,), ("conv_transpose2d",)),
    Case("conv_transpose1d", lambda: nn.ConvTranspose1d(4, 2, 4, stride=2), ((1, 4, 7),), ("conv_transpose1d",)),
    # ------------------------------------------------------------------ normalization, linear
    Case("batch_norm2d", lambda: _bn(nn.BatchNorm2d(3)), (IMG,), ("batch_norm",)),
    Case("batch_norm1d_2d_input", lambda: _bn(nn.BatchNorm1d(5)), ((2, 5),)),
    Case("batch_norm1d_3d_input", lambda: _bn(nn.BatchNorm1d(4)), ((1, 4, 10),)),
    Case("batch_norm_no_affine", lambda: _bn(nn.BatchNorm2d(3, affine=False)), (IMG,)),
    Case("local_response_norm", lambda: nn.LocalResponseNorm(3, alpha=0.01, beta=0.75, k=2.0), ((1, 6, 5, 5),),
         ("lrn",)),
    Case("layer_norm", lambda: _affine(nn.LayerNorm(5)), ((2, 3, 5),), ("layer_norm",)),
    Case("layer_norm_2d_shape", lambda: _affine(nn.LayerNorm((4, 5), eps=1e-3)), ((2, 3, 4, 5),), ("layer_norm",)),
    Case("layer_norm_convnext_nhwc", lambda: Fn(lambda s, x: s.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                                                + F.layer_norm(x, (9,)), ln=_affine(nn.LayerNorm(3))), (IMG,),
         ("layer_norm", "permute")),
    Case("layer_norm2d_subclass", _layer_norm2d, (IMG,), ("layer_norm", "permute")),
    Case("group_norm", lambda: _affine(nn.GroupNorm(2, 6)), ((1, 6, 5, 5),), ("group_norm",)),
    Case("group_norm_functional", lambda: Fn(lambda s, x: F.group_norm(x, 3, eps=1e-3)), ((2, 6, 4),),
         ("group_norm",)),
    Case("linear", lambda: nn.Linear(6, 5), ((2, 6),), ("linear",)),
    Case("linear_3d_nobias", lambda: nn.Linear(4, 3, bias=False), ((2, 5, 4),)),
    Case("linear_functional", lambda: Fn(lambda s, x: F.linear(x, s.l.weight, s.l.bias), l=nn.Linear(6, 2)),
         ((3, 6),)),
    Case("matmul_operator", lambda: Fn(lambda s, a, b: a @ b), ((2, 3, 4), (2, 4, 5)), ("matmul",)),
    Case("matmul_torch", lambda: Fn(lambda s, a, b: torch.matmul(a, b.transpose(-1, -2))), ((3, 4), (5, 4))),
    Case("embedding", lambda: nn.Embedding(10, 4), (("int64", (2, 5), 10),), ("embedding",)),
    # ------------------------------------------------------------------ activations
    *[Case(f"act_{name}", (lambda m=m: m), ((2, 3, 5),))
      for name, m in (("relu", nn.ReLU()), ("relu6", nn.ReLU6()), ("leaky_relu", nn.LeakyReLU(0.2)),
                      ("elu", nn.ELU(0.7)), ("gelu", nn.GELU()), ("gelu_tanh", nn.GELU("tanh")), ("silu", nn.SiLU()),
                      ("mish", nn.Mish()), ("sigmoid", nn.Sigmoid()), ("tanh", nn.Tanh()),
                      ("hardswish", nn.Hardswish()), ("hardsigmoid", nn.Hardsigmoid()),
                      ("hardtanh", nn.Hardtanh(-0.5, 0.5)), ("softmax", nn.Softmax(dim=-1)),
                      ("log_softmax", nn.LogSoftmax(dim=1)), ("identity", nn.Identity()),
                      ("dropout", nn.Dropout(0.3)))],
    Case("act_functional", lambda: Fn(lambda s, x: F.relu6(F.silu(F.gelu(F.leaky_relu(x, 0.1)))) +
                                      F.hardswish(x) * F.hardsigmoid(x) + F.mish(F.elu(x))), ((2, 8),)),
    Case("act_torch_and_methods", lambda: Fn(lambda s, x: torch.sigmoid(x) + torch.tanh(x).relu() +
                                             x.sigmoid() * torch.relu(x) - x.tanh()), ((2, 8),)),
    Case("clamp_forms", lambda: Fn(lambda s, x: torch.clamp(x, -0.5, 0.5) + x.clamp(min=0.1) +
                                   torch.clip(x, max=0.2) + F.hardtanh(x)), ((2, 8),), ("clamp",)),
    Case("softmax_functional", lambda: Fn(lambda s, x: F.softmax(x, dim=1) + x.log_softmax(-1) +
                                          torch.softmax(x, 0)), ((3, 4),)),
    Case("dropout_functional", lambda: Fn(lambda s, x: F.dropout(x, 0.2, training=False)), ((2, 4),)),
    Case("dropout_variants", lambda: Fn(
        lambda s, x: s.d3(s.a(s.fa(F.dropout1d(x[0], 0.1, s.training)[None] + F.dropout2d(x, 0.1, s.training)
                                   + F.alpha_dropout(x, 0.2, s.training)
                                   + F.feature_alpha_dropout(x, 0.3, s.training)))),
        d3=nn.Dropout3d(0.2), a=nn.AlphaDropout(0.1), fa=nn.FeatureAlphaDropout(0.1)), ((1, 4, 3, 5),)),
    Case("stochastic_depth", _stochastic_depth, (IMG,)),
    Case("act_gelu_tanh_functional", lambda: Fn(lambda s, x: F.gelu(x, approximate="tanh") + F.silu(x, inplace=False)
                                                + F.relu(x * 1.0, inplace=True)), ((2, 8),), ("gelu", "silu")),
    # ------------------------------------------------------------------ pools
    Case("max_pool2d", lambda: nn.MaxPool2d(3, 2, padding=1), (IMG,), ("max_pool2d",)),
    Case("max_pool2d_ceil", lambda: nn.MaxPool2d(2, 2, ceil_mode=True), (IMG,)),
    Case("max_pool2d_dilation", lambda: nn.MaxPool2d(2, 1, dilation=2), (IMG,)),
    Case("avg_pool2d", lambda: nn.AvgPool2d(3, 2, padding=1), (IMG,), ("avg_pool2d",)),
    Case("avg_pool2d_exclude_pad", lambda: nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), (IMG,)),
    Case("avg_pool2d_ceil", lambda: nn.AvgPool2d(2, 2, ceil_mode=True), ((1, 2, 8, 8),)),
    Case("max_pool1d", lambda: nn.MaxPool1d(2), ((1, 3, 10),), ("max_pool1d",)),
    Case("avg_pool1d", lambda: nn.AvgPool1d(3, 2, padding=1), ((1, 3, 10),), ("avg_pool1d",)),
    Case("adaptive_avg_pool2d_global", lambda: nn.AdaptiveAvgPool2d(1), (IMG,), ("adaptive_avg_pool2d",)),
    Case("adaptive_avg_pool2d_uneven", lambda: nn.AdaptiveAvgPool2d((2, 4)), (IMG,)),
    Case("adaptive_max_pool2d_global", lambda: nn.AdaptiveMaxPool2d(1), (IMG,), ("adaptive_max_pool2d",)),
    Case("adaptive_max_pool2d_even", lambda: nn.AdaptiveMaxPool2d(2), ((1, 3, 8, 8),)),
    Case("adaptive_avg_pool1d", lambda: nn.AdaptiveAvgPool1d(1), ((1, 3, 10),), ("adaptive_avg_pool1d",)),
    Case("adaptive_max_pool1d", lambda: nn.AdaptiveMaxPool1d(1), ((1, 3, 10),), ("adaptive_max_pool1d",)),
    Case("pool_functional", lambda: Fn(lambda s, x: F.max_pool2d(x, 2) + F.avg_pool2d(x, 2)
                                       + F.adaptive_avg_pool2d(x, (4, 4)) + F.adaptive_max_pool2d(x, 4)),
         ((1, 2, 8, 8),)),
    # ------------------------------------------------------------------ shapes and data movement
    Case("flatten_module", lambda: nn.Flatten(), (IMG,), ("flatten",)),
    Case("flatten_forms", lambda: Fn(lambda s, x: torch.flatten(x, 1) + x.flatten(1)), (IMG,)),
    Case("view_reshape", lambda: Fn(lambda s, x: x.view(x.size(0), -1).reshape(1, 3, -1)
                                    + torch.reshape(x, (1, 3, 81))), (IMG,), ("reshape",)),
    Case("permute_transpose", lambda: Fn(lambda s, x: x.permute(0, 2, 3, 1).transpose(1, 2).contiguous()
                                         + torch.transpose(x.permute(0, 3, 2, 1), 1, 2)), (IMG,), ("permute",)),
    Case("chunk_split_cat", lambda: ChunkSplitCat(), (IMG,), ("split", "concat")),
    Case("stack", lambda: Fn(lambda s, x, y: torch.stack([x, y, x * y], dim=1)), ((2, 3), (2, 3)), ("stack",)),
    Case("mean_sum", lambda: Fn(lambda s, x: x.mean((2, 3)) + torch.sum(x, dim=[2, 3]) +
                                x.mean(dim=-1, keepdim=True).sum(-2).squeeze(-1)), (IMG,), ("mean", "sum")),
    Case("squeeze_unsqueeze", lambda: Fn(lambda s, x: x.unsqueeze(1).squeeze(1) + torch.unsqueeze(x, 0)[0]),
         ((2, 3),)),
    Case("indexing", lambda: Fn(lambda s, x: x[:, 1:3, ::2, -1] + x[..., 0:2, 0, 2:7] + x[0][None, :2, 3, 2:7]),
         (IMG,), ("slice", "select")),
    Case("size_and_shape", lambda: Fn(lambda s, x: x.view(x.shape[0], x.size(1), -1).mean(-1) *
                                      (x.size(-1) // 2)), (IMG,)),
    Case("arithmetic", lambda: Fn(lambda s, x, y: (x + y) * 2.0 - y / 3.0 + 1 - x * y
                                  + torch.add(x, y, alpha=2) + torch.sub(x, 1.5) + x.mul(y) + x.div(2.0)
                                  + (-x)), ((2, 3, 4), (2, 3, 4)), ("add", "mul", "sub", "div")),
    Case("broadcast", lambda: Fn(lambda s, x, y: x * y + x / (y.abs() + 1)), ((2, 3, 4), (3, 1))),
    Case("exp_sqrt_erf", lambda: Fn(lambda s, x: torch.exp(x * 0.1) + (x * x + 1).sqrt() + torch.erf(x)), ((2, 4),),
         ("erf",)),
    Case("pad_functional", lambda: Fn(lambda s, x: F.pad(x, (1, 2, 0, 1)) + 0 * F.pad(x, (1, 2, 0, 1),
                                                                                     mode="reflect")),
         (IMG,), ("pad",)),
    Case("pad_modules", lambda: Fn(lambda s, x: s.zero(x) + s.const(x) + s.reflect(x) + s.replicate(x),
                                   zero=nn.ZeroPad2d((1, 2, 0, 1)), const=nn.ConstantPad2d((1, 2, 0, 1), 0.5),
                                   reflect=nn.ReflectionPad2d((1, 2, 0, 1)),
                                   replicate=nn.ReplicationPad2d((1, 2, 0, 1))),
         (IMG,), ("pad",)),
    Case("upsample_nearest_scale", lambda: nn.Upsample(scale_factor=2), ((1, 2, 4, 5),), ("interpolate",)),
    Case("upsample_bilinear_align_corners", lambda: nn.UpsamplingBilinear2d(scale_factor=2), ((1, 2, 4, 5),),
         ("interpolate",)),
    Case("upsample_nearest_size_module", lambda: nn.UpsamplingNearest2d(size=(7, 9)), ((1, 2, 4, 5),)),
    Case("interpolate_functional", lambda: Fn(lambda s, x: F.interpolate(x, size=(6, 11), mode="bilinear")
                                              + F.interpolate(x, size=(6, 11), mode="bilinear", align_corners=True)
                                              + F.interpolate(x, size=(6, 11), mode="nearest-exact")),
         ((1, 2, 4, 5),), ("interpolate",)),
    Case("channel_shuffle", lambda: Fn(lambda s, x: x.view(1, 2, 2, 5, 5).transpose(1, 2).contiguous()
                                       .view(1, 4, 5, 5)), ((1, 4, 5, 5),)),
    Case("squeeze_excitation", lambda: Fn(
        lambda s, x: x * torch.sigmoid(s.up(F.relu(s.down(F.adaptive_avg_pool2d(x, 1))))),
        down=nn.Conv2d(8, 2, 1), up=nn.Conv2d(2, 8, 1)), ((1, 8, 6, 6),)),
    # ------------------------------------------------------------------ recurrent
    Case("lstm", lambda: nn.LSTM(4, 5), ((6, 1, 4),), ("lstm",)),
    Case("lstm_2layer_bidir_batch_first", lambda: Fn(lambda s, x: s.rnn(x)[0][:, -1],
                                                     rnn=nn.LSTM(4, 5, 2, batch_first=True, bidirectional=True)),
         (SEQ,), ("lstm", "select")),
    Case("lstm_initial_state", lambda: Fn(lambda s, x, h, c: s.rnn(x, (h, c)), rnn=nn.LSTM(4, 5, 2)),
         ((6, 2, 4), (2, 2, 5), (2, 2, 5))),
    Case("lstm_tuple_outputs", lambda: Fn(lambda s, x: (lambda o: (o[0], o[1][0][-1], o[1][1]))(s.rnn(x)),
                                          rnn=nn.LSTM(4, 3, bidirectional=True)), ((5, 1, 4),)),
    Case("lstm_no_bias", lambda: nn.LSTM(4, 5, bias=False), ((6, 1, 4),)),
    Case("gru_initial_state", lambda: Fn(lambda s, x, h: s.rnn(x, h), rnn=nn.GRU(4, 5, 2)),
         ((6, 2, 4), (2, 2, 5)), ("gru",)),
    Case("gru_bidir_batch_first", lambda: nn.GRU(4, 5, bidirectional=True, batch_first=True), (SEQ,)),
    Case("rnn_tanh", lambda: nn.RNN(4, 5, 2), ((6, 1, 4),), ("rnn",)),
    Case("rnn_relu_bidir", lambda: nn.RNN(4, 5, nonlinearity="relu", bidirectional=True), ((6, 1, 4),)),
    Case("embedding_lstm", lambda: Fn(lambda s, t: s.fc(s.rnn(s.emb(t))[1][0][-1]), emb=nn.Embedding(20, 6),
                                      rnn=nn.LSTM(6, 8, batch_first=True), fc=nn.Linear(8, 3)),
         (("int64", (2, 7), 20),)),
]

CASES_BY_NAME = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES), "duplicate case names"
