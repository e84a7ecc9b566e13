"""The op table: schema sanity, inference from the reference, FLOP formulas."""

from __future__ import annotations

import numpy as np

from passes.ir.cost import graph_flops
from passes.ir.graph import Graph, TensorType
from passes.ir.ops import OPS


def test_every_op_is_documented_and_named_consistently():
    for name, opdef in OPS.items():
        assert opdef.name == name
        assert callable(opdef.reference) and callable(opdef.flops)
        assert name == name.lower() and " " not in name


def test_conv_and_linear_flops_follow_the_formula():
    g = Graph()
    x = g.add_input("x", TensorType((1, 8, 16, 16)))
    y = g.add_op("conv2d", [x], attrs={"padding": (1, 1), "groups": 2},
                 params={"weight": np.zeros((16, 4, 3, 3), np.float32), "bias": np.zeros(16, np.float32)})
    f = g.add_op("flatten", [y])
    g.set_outputs(g.add_op("linear", [f], params={"weight": np.zeros((10, 16 * 256), np.float32)}))
    conv = 2 * (16 * 16 * 16) * (4 * 3 * 3) + 16 * 16 * 16
    linear = 2 * 10 * 16 * 256
    assert graph_flops(g) == conv + linear


def test_lstm_types_come_from_torch_semantics():
    g = Graph()
    x = g.add_input("x", TensorType((2, 7, 3)))
    params = {}
    for layer in range(2):
        for suffix in ("", "_reverse"):
            inp = 3 if layer == 0 else 10
            params |= {f"weight_ih_l{layer}{suffix}": np.zeros((20, inp), np.float32),
                       f"weight_hh_l{layer}{suffix}": np.zeros((20, 5), np.float32),
                       f"bias_ih_l{layer}{suffix}": np.zeros(20, np.float32),
                       f"bias_hh_l{layer}{suffix}": np.zeros(20, np.float32)}
    y, h, c = g.add_op("lstm", [x], attrs={"hidden_size": 5, "num_layers": 2, "bidirectional": True,
                                           "batch_first": True}, params=params)
    assert [g.value_type(v).shape for v in (y, h, c)] == [(2, 7, 10), (4, 2, 5), (4, 2, 5)]
