"""alter-layout: CPU convs hand each other NCHW[8]c activations; layout transforms only where a value reaches an op
with no blocked form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backends.tvm.target import cpu_has
from passes.core.pass_base import PassContext
from passes.core.pipeline import Pipeline, resolve
from passes.ir.interpret import run_reference
from passes.ir.ops import to_layout
from passes.ir.text import graph_text
from passes.transforms.alter_layout import AlterLayout
from tests.cases import Fn
from tests.helpers import assert_outputs_close
from tests.passes.helpers import assert_graph_text, assert_idempotent, run_pass

FUSE = "fuse-conv-activation,fuse-conv-add"


class InvertedResidual(nn.Module):
    """A MobileNetV2-like model: stem (3 channels, stride 2), expand 1x1, depthwise 3x3, project 1x1 + residual,
    a last 1x1 conv, then global pool + linear."""

    def __init__(self, stem: int = 16, expand: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, stride=2, padding=1)
        self.expand = nn.Conv2d(stem, expand, 1)
        self.dw = nn.Conv2d(expand, expand, 3, padding=1, groups=expand)
        self.project = nn.Conv2d(expand, stem, 1)
        self.last = nn.Conv2d(stem, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = nn.functional.relu6(self.stem(x))
        y = nn.functional.relu6(self.dw(nn.functional.relu6(self.expand(x))))
        y = nn.functional.relu6(self.last(self.project(y) + x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class SqueezeExcite(nn.Module):
    """An EfficientNet-like block: depthwise conv, squeeze-excite (global pool, 1x1 convs, sigmoid, mul), project;
    the squeeze conv has 4 channels (no whole block)."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(8, 24, 1)
        self.dw = nn.Conv2d(24, 24, 5, stride=2, padding=2, groups=24)
        self.squeeze, self.excite = nn.Conv2d(24, 4, 1), nn.Conv2d(4, 24, 1)
        self.project = nn.Conv2d(24, 16, 1)

    def forward(self, x):
        y = nn.functional.silu(self.dw(nn.functional.silu(self.expand(x))))
        s = torch.sigmoid(self.excite(nn.functional.silu(self.squeeze(nn.functional.adaptive_avg_pool2d(y, 1)))))
        return self.project(y * s)


def prepared(model: nn.Module, x: torch.Tensor, passes: str = FUSE):
    from frontend.torch_fx import from_torch

    graph = from_torch(model.eval(), (x,))
    Pipeline(resolve(passes)).run(graph, PassContext())
    return graph


def check(model: nn.Module, x: torch.Tensor, ctx: PassContext | None = None, passes: str = FUSE, block: int = 8):
    """Run alter-layout after ``passes``; the interpreter matches PyTorch and the graph before the pass. ``block``
    8 (AVX2's vector) by default, so the printed IR is the same on every host (0 would take this host's lanes)."""
    graph = prepared(model, x, passes)
    before = run_reference(graph, (x,))
    result = run_pass(AlterLayout(block=block), graph, ctx)
    with torch.no_grad():
        assert_outputs_close(model(x), run_reference(graph, (x,)), rtol=1e-5, atol=1e-6)
    assert_outputs_close(before, run_reference(graph, (x,)), rtol=1e-5, atol=1e-6)
    return graph, result


def test_mobilenet_block_has_one_transform_at_the_exit():
    """The stem packs the NCHW input itself (no entry transform), the convs hand each other NCHW8c (the residual
    too), the global pool is a mean over H, W of the blocked tensor, and the one layout_transform is on the pooled
    1x1 map, before flatten."""
    torch.manual_seed(0)
    graph, result = check(InvertedResidual(), torch.randn(1, 3, 12, 10))
    assert result.stats == {"blocked": 6, "transforms": 1}
    assert_graph_text(graph, """
graph InvertedResidual(%x: f32[1,3,12,10]) {
  %stem = conv2d_nchwc(%x) {activation='relu6', activation_params=(), dilation=(1, 1), groups=1, in_layout='NCHW', input_scale=False, out_layout='NCHW8c', padding=(1, 1), stride=(2, 2)} [bias: f32[16], weight: f32[16,3,3,3]] -> f32[1,2,6,5,8]
  %expand = conv2d_nchwc(%stem) {activation='relu6', activation_params=(), dilation=(1, 1), groups=1, in_layout='NCHW8c', input_scale=False, out_layout='NCHW8c', padding=(0, 0), stride=(1, 1)} [bias: f32[32], weight: f32[32,16,1,1]] -> f32[1,4,6,5,8]
  %dw = conv2d_nchwc(%expand) {activation='relu6', activation_params=(), dilation=(1, 1), groups=32, in_layout='NCHW8c', input_scale=False, out_layout='NCHW8c', padding=(1, 1), stride=(1, 1)} [bias: f32[32], weight: f32[32,1,3,3]] -> f32[1,4,6,5,8]
  %project = conv2d_nchwc(%dw, %stem) {activation='none', activation_params=(), dilation=(1, 1), groups=1, in_layout='NCHW8c', input_scale=False, out_layout='NCHW8c', padding=(0, 0), stride=(1, 1)} [bias: f32[16], weight: f32[16,32,1,1]] -> f32[1,2,6,5,8]
  %last = conv2d_nchwc(%project) {activation='relu6', activation_params=(), dilation=(1, 1), groups=1, in_layout='NCHW8c', input_scale=False, out_layout='NCHW8c', padding=(0, 0), stride=(1, 1)} [bias: f32[24], weight: f32[24,16,1,1]] -> f32[1,3,6,5,8]
  %adaptive_avg_pool2d = mean(%last) {dim=(2, 3), keepdim=True} -> f32[1,3,1,1,8]  meta{alter_layout.layout='NCHW8c'}
  %adaptive_avg_pool2d_to_NCHW = layout_transform(%adaptive_avg_pool2d) {dst='NCHW', src='NCHW8c'} -> f32[1,24,1,1]
  %flatten = flatten(%adaptive_avg_pool2d_to_NCHW) {end_dim=3, start_dim=1} -> f32[1,24]
  %fc = linear(%flatten) {activation='none', activation_params=()} [bias: f32[10], weight: f32[10,24]] -> f32[1,10]
  return %fc
}""")


class PooledStem(nn.Module):
    """ResNet's shape in small: conv + BN + ReLU + 3x3/2 max pool (fused into one conv2d_pool), a residual conv
    pair on the pooled map, then global pooling; ``head_only``: the pooled map, flattened, is the output."""

    def __init__(self, head_only: bool = False):
        super().__init__()
        self.head_only = head_only
        self.stem, self.bn = nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.pool(torch.relu(self.bn(self.stem(x))))
        if self.head_only:
            return torch.flatten(y, 1)
        y = torch.relu(self.conv2(torch.relu(self.conv1(y))) + y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_conv_pool_stores_blocked_for_blocked_readers():
    """A conv2d_pool reads NCHW (its kernel packs the input) but stores NCHW[b]c where a blocked conv reads it: the
    convs after it, the residual included, need no transform; where only a flatten reads it, it stays NCHW."""
    torch.manual_seed(0)
    graph, result = check(PooledStem(), torch.randn(1, 3, 20, 18), passes=FUSE + ",fuse-conv-pool")
    assert result.stats == {"blocked": 4, "transforms": 1}
    (pool,) = graph.op_nodes("conv2d_pool")
    assert graph.nodes[pool]["attrs"]["out_layout"] == "NCHW8c"
    assert graph.value_type(graph.operands("conv2")[1]).shape == (1, 2, 5, 5, 8)  # the residual: the pool's output
    graph, result = check(PooledStem(head_only=True), torch.randn(1, 3, 20, 18), passes=FUSE + ",fuse-conv-pool")
    (pool,) = graph.op_nodes("conv2d_pool")
    assert graph.nodes[pool]["attrs"]["out_layout"] == "NCHW" and result.stats["blocked"] == 0


def test_avx512_blocks_of_16_where_they_divide_the_channels_else_8():
    """With 16 lanes (AVX-512) a tensor of 16 or 32 channels is NCHW16c (a whole zmm vector per pixel), one of 24
    NCHW8c: the block follows the channel count, so the residual (16 channels, like the project conv's output) needs
    no transform, and the last conv reads 16c and writes 8c itself. Still one transform, at the exit."""
    torch.manual_seed(0)
    graph, result = check(InvertedResidual(), torch.randn(1, 3, 12, 10), block=16)
    assert result.stats == {"blocked": 6, "transforms": 1}
    layouts = {n: (d["attrs"]["in_layout"], d["attrs"]["out_layout"]) for n, d in graph.nodes(data=True)
               if d["op"] == "conv2d_nchwc"}
    assert layouts == {"stem": ("NCHW", "NCHW16c"), "expand": ("NCHW16c", "NCHW16c"), "dw": ("NCHW16c", "NCHW16c"),
                       "project": ("NCHW16c", "NCHW16c"), "last": ("NCHW16c", "NCHW8c")}
    assert [d["attrs"]["src"] for _, d in graph.nodes(data=True) if d["op"] == "layout_transform"] == ["NCHW8c"]


@pytest.mark.parametrize("lanes", [8, 16])
def test_block_follows_the_targets_vector_width(lanes):
    """``block=0`` (the default) takes ``PassContext.lanes``, the target's fp32 lanes: AVX2 (Zen 3) 8, AVX-512 16."""
    torch.manual_seed(0)
    graph, _ = check(InvertedResidual(), torch.randn(1, 3, 12, 10), PassContext(lanes=lanes), block=0)
    assert graph.nodes["expand"]["attrs"]["out_layout"] == f"NCHW{lanes}c"


def test_optimize_lays_out_for_the_target_it_builds_for():
    """optimize() sets ``PassContext.lanes`` from the resolved target: a Zen 3 target gets NCHW8c, an AVX-512 one
    NCHW16c, whatever this host is (the AVX-512 build is only lowered, not run, where the host lacks it)."""
    import passes

    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 10)
    for mcpu, block in (("znver3", 8), ("skylake-avx512", 16)):
        target = {"kind": "llvm", "mcpu": mcpu, "num-cores": 2}
        if block == 16 and not cpu_has("avx512f"):
            continue
        opt = passes.optimize(InvertedResidual().eval(), example_inputs=(x,), target=target, measure=False)
        layouts = {d["attrs"]["out_layout"] for _, d in opt.graph.nodes(data=True) if d["op"] == "conv2d_nchwc"}
        assert f"NCHW{block}c" in layouts


def test_transforms_only_where_a_blocked_value_meets_an_op_without_a_blocked_form():
    """A blocked value read by a conv and by a max pool, and returned: one transform to NCHW, shared by the pool
    and the graph output."""
    model = Fn(lambda s, x: (lambda y: (s.b(y), nn.functional.max_pool2d(y, 2), y))(s.a(x)),
               a=nn.Conv2d(8, 16, 1), b=nn.Conv2d(16, 8, 1))
    graph, result = check(model, torch.randn(1, 8, 6, 6))
    assert result.stats == {"blocked": 2, "transforms": 1}
    (transform,) = graph.op_nodes("layout_transform")
    assert graph.nodes[transform]["attrs"] == {"src": "NCHW8c", "dst": "NCHW"}
    assert sorted(user for user, _ in graph.users(transform)) == ["max_pool2d"]
    assert graph.outputs[2].node == transform


def test_residual_in_the_other_layout_is_converted():
    """A conv that stores NCHW (its output is only returned) but whose fused residual comes blocked."""
    model = Fn(lambda s, x: (lambda y: s.c(s.b(y)) + y)(s.a(x)),
               a=nn.Conv2d(8, 16, 1), b=nn.Conv2d(16, 16, 3, padding=1, groups=16), c=nn.Conv2d(16, 16, 1))
    graph, result = check(model, torch.randn(1, 8, 5, 7))
    assert result.stats == {"blocked": 3, "transforms": 1}
    assert graph.nodes["c"]["attrs"]["out_layout"] == "NCHW"
    assert graph.operands("c")[1].node == "a_to_NCHW"


def test_layout_transforms_are_inverse_bijections():
    x = torch.randn(2, 24, 3, 5)
    blocked = to_layout(x, "NCHW", "NCHW8c")
    assert blocked.shape == (2, 3, 3, 5, 8) and blocked[1, 2, 0, 4, 5] == x[1, 21, 0, 4]
    assert torch.equal(to_layout(blocked, "NCHW8c", "NCHW"), x)


def test_squeeze_excite_block_numerics():
    """Squeeze-excite runs blocked: the pool as a mean of the depthwise conv's NCHW8c output, the excite conv stores
    NCHW8c for the gate product; only the squeeze conv (4 channels: no whole block) reads NCHW, through one
    transform of the pooled 1x1 map."""
    torch.manual_seed(1)
    graph, result = check(SqueezeExcite(), torch.randn(1, 8, 9, 11))
    assert result.stats == {"blocked": 6, "transforms": 1, "skipped.channels": 1}
    assert [graph.nodes[n]["attrs"]["in_layout"] + "->" + graph.nodes[n]["attrs"]["out_layout"]
            for n in graph.op_nodes("conv2d_nchwc")] == ["NCHW->NCHW8c", "NCHW8c->NCHW8c", "NCHW->NCHW8c",
                                                         "NCHW8c->NCHW"]
    assert graph.value_type(graph.operands("squeeze")[0]).shape == (1, 24, 1, 1)
    assert graph.nodes[graph.operands("mul")[0].node]["op"] == "conv2d_nchwc"


@pytest.mark.parametrize("model, reason", [
    (Fn(lambda s, x: s.b(s.a(x)), a=nn.Conv2d(8, 16, 1), b=nn.Conv2d(16, 16, 3, padding=1, groups=4)), "grouped"),
    (Fn(lambda s, x: s.b(s.a(x)), a=nn.Conv2d(8, 12, 1), b=nn.Conv2d(12, 12, 1)), "channels"),
    # depthwise with a channel multiplier (groups = C, OC = 2C) is a grouped conv here
    (Fn(lambda s, x: s.b(s.a(x)), a=nn.Conv2d(8, 16, 1), b=nn.Conv2d(16, 32, 3, padding=1, groups=16)), "grouped"),
], ids=["grouped", "channels", "channel_multiplier"])
def test_refusals(model, reason):
    """The refused conv keeps NCHW; its neighbour then has no blocked partner either, so nothing changes."""
    graph = prepared(model, torch.randn(1, 8, 8, 8))
    before = graph_text(graph)
    result = run_pass(AlterLayout(block=8), graph)
    assert result.stats == {"blocked": 0, "transforms": 0, f"skipped.{reason}": 1 + (reason == "channels")}
    assert graph_text(graph) == before


def test_refuses_a_cuda_target():
    graph = prepared(InvertedResidual(), torch.randn(1, 3, 8, 8))
    before = graph_text(graph)
    assert run_pass(AlterLayout(), graph, PassContext(target="cuda")).stats == {
        "blocked": 0, "transforms": 0, "skipped.target": 5}
    assert graph_text(graph) == before


def test_refuses_low_precision():
    graph = prepared(InvertedResidual(), torch.randn(1, 3, 8, 8), FUSE + ",mixed-precision{dtype=bf16}")
    before = graph_text(graph)
    assert run_pass(AlterLayout(), graph).stats == {"blocked": 0, "transforms": 0, "skipped.dtype": 5}
    assert graph_text(graph) == before


@pytest.mark.parametrize("size", [8, 7], ids=["winograd-sized", "7x7"])
def test_3x3_convs_are_blocked_whatever_kernel_runs_them(size):
    """The Winograd kernel reads and writes NCHW[b]c too: a 3x3 stride-1 conv is blocked whether its cost rule
    takes it (8x8) or keeps the direct kernel (7x7, ``winograd.MIN_OUTPUT``)."""
    model = Fn(lambda s, x: s.b(s.a(x)), a=nn.Conv2d(8, 32, 1), b=nn.Conv2d(32, 32, 3, padding=1))
    graph = prepared(model, torch.randn(1, 8, size, size))
    assert run_pass(AlterLayout(block=8), graph).stats == {"blocked": 2, "transforms": 0}


def test_idempotent():
    graph, _ = check(InvertedResidual(), torch.randn(1, 3, 8, 8))
    assert_idempotent(AlterLayout(), graph)
