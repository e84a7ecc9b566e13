"""verify(): every invariant violation is reported, all at once, naming the node."""

from __future__ import annotations

import numpy as np
import pytest

from passes.ir.graph import TensorType
from passes.ir.verify import VerificationError, verify
from tests.ir.test_graph import tiny


def test_valid_graph_passes():
    g, _, _ = tiny()
    assert verify(g) is g


def test_all_problems_reported_together():
    g, y, z = tiny()
    w = g.add_op("sigmoid", [z])
    g.nodes[y.node]["extra"] = 1                                   # unknown node key
    g.nodes[z.node]["attrs"]["inplace"] = True                     # unknown attr
    g.nodes[w.node]["out_types"] = [TensorType((9,))]               # wrong inferred type
    g.graph["notes"] = "x"                                          # unknown graph attribute
    with pytest.raises(VerificationError) as info:
        verify(g)
    problems = info.value.problems
    assert len(problems) == 4, problems
    text = str(info.value)
    assert "unknown key 'extra'" in text and "unknown attribute 'inplace'" in text
    assert "graph attribute 'notes'" in text and "(from features.0)" in text


def test_out_types_must_match_inference():
    g, y, z = tiny()
    g.nodes[z.node]["out_types"] = [TensorType((1, 4, 8, 9))]
    with pytest.raises(VerificationError, match=r"out_types \['f32\[1,4,8,9\]'\] but the op infers"):
        verify(g)


def test_operand_slot_problems():
    g, y, z = tiny()
    g.add_edge("x", z.node, src_out=0, dst_in=0)                    # slot 0 fed twice
    with pytest.raises(VerificationError, match="not 0..1 each fed once"):
        verify(g)
    g, y, z = tiny()
    g.add_edge("x", z.node, src_out=3, dst_in=1)                    # bad producer index and arity
    problems = pytest.raises(VerificationError, verify, g).value.problems
    assert any("reads output 3" in p for p in problems) and any("takes (1, 1) operands" in p for p in problems)


def test_cycles_dangling_outputs_and_inputs():
    g, y, z = tiny()
    g.add_edge(z.node, y.node, src_out=0, dst_in=1)
    with pytest.raises(VerificationError, match="cycle"):
        verify(g)
    g, y, z = tiny()
    g.set_outputs(type(y)("ghost", 0))
    with pytest.raises(VerificationError, match="names a missing node"):
        verify(g)
    g, _, _ = tiny()
    g.graph["inputs"] = []
    with pytest.raises(VerificationError, match="not listed in graph inputs"):
        verify(g)


def test_params_and_missing_keys():
    g, y, _ = tiny()
    g.nodes[y.node]["params"]["gamma"] = np.ones(4)
    del g.nodes[y.node]["meta"]
    with pytest.raises(VerificationError, match="missing key 'meta'"):
        verify(g)
    g, y, _ = tiny()
    g.nodes[y.node]["params"]["gamma"] = np.ones(4)
    with pytest.raises(VerificationError, match="unknown param 'gamma'"):
        verify(g)
