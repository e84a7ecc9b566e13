"""integer-max-pool: structure on a tiny graph, exactness after quantize, one test per refusal, idempotence."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from frontend.torch_fx import from_torch
from passes.core.pass_base import PassContext
from passes.ir.graph import Graph, TensorType
from passes.ir.interpret import run_reference
from passes.ir.text import graph_text
from passes.transforms.fuse_conv_activation import FuseConvActivation
from passes.transforms.integer_max_pool import IntegerMaxPool
from passes.transforms.quantization import quant_params
from passes.transforms.quantize import Quantize
from tests.passes.helpers import assert_graph_text, assert_idempotent, run_pass

POOL = {"kernel_size": (2, 2), "stride": (2, 2)}


def qdq_pool_graph(dequantize_attrs: dict | None = None, scale: float = 0.1) -> Graph:
    """x -> quantize -> dequantize -> max_pool2d -> quantize (same params) -> dequantize -> output."""
    g = Graph(name="qdq_pool")
    x = g.add_input("x", TensorType((1, 2, 4, 4)))
    q = g.add_op("quantize", [x], attrs={"dtype": "uint8"}, params=quant_params(0.1, 128), name="q")
    params = quant_params(scale, 128)
    if dequantize_attrs:  # per channel: one scale and zero point per channel
        params = {"scale": np.full(2, scale, np.float32), "zero_point": np.full(2, 128, np.uint8)}
    dq = g.add_op("dequantize", [q], attrs=dequantize_attrs or {}, params=params, name="dq")
    pool = g.add_op("max_pool2d", [dq], attrs=POOL, name="pool")
    q2 = g.add_op("quantize", [pool], attrs={"dtype": "uint8"}, params=quant_params(scale, 128), name="q2")
    g.set_outputs(g.add_op("dequantize", [q2], params=quant_params(scale, 128), name="dq2"))
    return g


def test_structure_the_pool_reads_the_integer_tensor():
    graph = qdq_pool_graph()
    result = run_pass(IntegerMaxPool(), graph)
    assert result.changed and result.stats == {"moved": 1}
    assert_graph_text(graph, """
graph qdq_pool(%x: f32[1,2,4,4]) {
  %q = quantize(%x) {axis=None, dtype='uint8'} [scale: f32[], zero_point: u8[]] -> u8[1,2,4,4]
  %pool = max_pool2d(%q) {ceil_mode=False, dilation=(1, 1), kernel_size=(2, 2), padding=(0, 0), stride=(2, 2)} -> u8[1,2,2,2]
  %dq2 = dequantize(%pool) {axis=None} [scale: f32[], zero_point: u8[]] -> f32[1,2,2,2]
  return %dq2
}""")


def test_numerics_exact_after_quantize():
    """Static int8 of ResNet's stem + first block: moving the pool to uint8 changes no output bit."""

    class PoolResidual(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem, self.pool, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(3, 2, 1), \
                nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = self.pool(torch.relu(self.stem(x)))
            return torch.relu(self.conv(y)) + y

    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 8, 8, generator=generator),) for _ in range(4)]
    graph = from_torch(PoolResidual().eval(), data[0])
    run_pass(FuseConvActivation(), graph)
    run_pass(Quantize(), graph, PassContext(data=data))
    before = graph.copy_graph()
    assert run_pass(IntegerMaxPool(), graph).stats == {"moved": 1}
    pool = graph.op_nodes("max_pool2d")[0]
    assert str(graph.nodes[pool]["out_types"][0]) == "u8[4,8,4,4]" and graph.operands(pool)[0].node == "stem"
    users = {graph.nodes[user]["op"] for user, _ in graph.users(pool)}
    assert users == {"qconv2d", "dequantize"}  # the conv reads it directly (equal params), the float add dequantized
    assert [graph.nodes[n]["op"] for n in graph.topo_order()].count("quantize") == 1  # only the model input
    for inputs in data:
        np.testing.assert_array_equal(run_reference(graph, inputs).numpy(), run_reference(before, inputs).numpy())
    assert_idempotent(IntegerMaxPool(), graph)


def assert_refused(graph: Graph, reason: str) -> None:
    before = graph_text(graph)
    result = run_pass(IntegerMaxPool(), graph)
    assert not result.changed and result.stats == {"moved": 0, f"skipped.{reason}": 1}
    assert graph_text(graph) == before


def test_refuses_a_per_channel_dequantize():
    assert_refused(qdq_pool_graph({"axis": 1}), "per_channel")


def test_refuses_a_non_positive_scale():
    assert_refused(qdq_pool_graph(scale=-0.1), "scale")


def test_float_pools_are_not_candidates():
    graph = from_torch(nn.Sequential(nn.MaxPool2d(2), nn.AvgPool2d(2)).eval(), (torch.randn(1, 2, 8, 8),))
    before = graph_text(graph)
    assert run_pass(IntegerMaxPool(), graph).stats == {"moved": 0}
    assert graph_text(graph) == before
