"""Byte counts of the report: weights at their stored dtype and the peak of live intermediates, on tiny graphs
whose answers are known by hand."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from passes.ir.cost import graph_weight_bytes, peak_activation_bytes
from passes.ir.graph import Graph, TensorType

F32 = 4 * 1 * 4 * 8 * 8  # bytes of one (1, 4, 8, 8) float32 value


def test_weight_bytes_follow_the_stored_dtype():
    g = Graph()
    x = g.add_input("x", TensorType((1, 3, 8, 8)))
    y = g.add_op("conv2d", [x], attrs={"padding": (1, 1)},
                 params={"weight": np.ones((4, 3, 3, 3), np.float32), "bias": np.zeros(4, np.float32)})
    g.set_outputs(g.add_op("relu", [y]))
    assert graph_weight_bytes(g) == (4 * 3 * 9 + 4) * 4
    g.nodes[y.node]["params"]["weight"] = np.ones((4, 3, 3, 3), ml_dtypes.bfloat16)
    assert graph_weight_bytes(g) == 4 * 3 * 9 * 2 + 4 * 4
    g.nodes[y.node]["params"]["weight"] = np.ones((4, 3, 3, 3), np.int8)
    assert graph_weight_bytes(g) == 4 * 3 * 9 + 4 * 4


def _conv(g: Graph, x, channels: int = 4):
    return g.add_op("conv2d", [x], attrs={"padding": (1, 1)},
                    params={"weight": np.ones((4, channels, 3, 3), np.float32)})


def test_chain_holds_at_most_producer_and_consumer():
    """x -> conv -> relu -> relu: while the second relu runs, its input and output are live; inputs don't count."""
    g = Graph()
    x = g.add_input("x", TensorType((1, 3, 8, 8)))
    a = g.add_op("relu", [_conv(g, x, 3)])
    g.set_outputs(g.add_op("relu", [a]))
    assert peak_activation_bytes(g) == 2 * F32


def test_branches_stay_live_until_their_last_use():
    """conv -> (relu, sigmoid) -> add: at most three values are live at once, since the conv output dies once both
    branches have read it."""
    g = Graph()
    x = g.add_input("x", TensorType((1, 3, 8, 8)))
    c = _conv(g, x, 3)
    a, b = g.add_op("relu", [c]), g.add_op("sigmoid", [c])
    g.set_outputs(g.add_op("add", [a, b]))
    assert peak_activation_bytes(g) == 3 * F32


def test_graph_outputs_live_to_the_end():
    g = Graph()
    x = g.add_input("x", TensorType((1, 3, 8, 8)))
    c = _conv(g, x, 3)
    r = g.add_op("relu", [c])
    g.set_outputs((c, g.add_op("relu", [r])))
    assert peak_activation_bytes(g) == 3 * F32
