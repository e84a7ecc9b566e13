"""prune-channels: every coupling case of the dependency groups, exact numerics, refusals, allocation, the zoo.

Numerics oracle (``assert_pruned_equals_masked``): zeroing, in the *unpruned* graph, every weight/norm/constant
entry that pruning removes makes the removed channels carry nothing downstream (a zero-weight conv channel is 0,
relu(0) = 0, a zero-gate LSTM unit stays 0, and every consumer's columns for it are 0). So the pruned graph must
compute exactly what that masked graph computes: any index taken from the wrong place, any missed site, breaks it.
Tests with hand-zeroed channels also check the pruned graph against the untouched PyTorch model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples import zoo
from frontend.torch_fx import from_torch
from passes.core.pass_base import PassContext, PassError
from passes.core.pipeline import parse_spec
from passes.ir.cost import graph_flops
from passes.ir.graph import Graph
from passes.ir.interpret import run_reference
from passes.transforms.prune_channels import PruneChannels
from tests.cases import Fn
from tests.helpers import assert_outputs_close
from tests.passes.helpers import run_pass


def masked(graph: Graph, p: PruneChannels) -> Graph:
    """The unpruned graph with every entry that ``p`` would remove set to zero."""
    copy = graph.copy_graph()
    cg, keep = p.plan(copy)
    for site in cg.sites:
        if site.kind == "attr" or not any(cg.find(d) in keep for d, _ in site.space.segments):
            continue
        params = copy.nodes[site.node]["params"]
        value = np.array(params[site.name])
        mask = np.ones(value.shape[site.axis], bool)
        mask[cg.positions(site.space, keep)] = False
        index = [slice(None)] * value.ndim
        index[site.axis] = mask
        value[tuple(index)] = 0
        params[site.name] = value
    return copy


def prune(model: nn.Module, inputs: tuple, p: PruneChannels) -> tuple[Graph, Graph, dict]:
    """(original graph, pruned graph, stats); checks the pruned graph against the masked original."""
    original = from_torch(model.eval(), inputs)
    reference = run_reference(masked(original, p), inputs)
    graph = original.copy_graph()
    stats = run_pass(p, graph).stats
    assert_outputs_close(reference, run_reference(graph, inputs), rtol=1e-5, atol=1e-6)
    return original, graph, stats


def weight_shapes(graph: Graph) -> dict[str, tuple]:
    return {n: tuple(d["params"]["weight"].shape) for n, d in graph.nodes(data=True) if "weight" in d["params"]}


torch.manual_seed(0)
X = (torch.randn(2, 3, 8, 8),)


def test_chain_structure_exact_stats_and_meta():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                          nn.Flatten(), nn.Linear(6 * 6 * 6, 5))
    _, graph, stats = prune(model, X, PruneChannels(ratio=0.5))
    assert stats == {"pruned_groups": 2, "removed_channels": 7, "skipped.graph_output": 1}
    assert weight_shapes(graph) == {"n0": (4, 3, 3, 3), "n1": (4,), "n3": (3, 4, 3, 3), "n5": (5, 108)}
    assert {k: v.shape for k, v in graph.nodes["n1"]["params"].items()} == {
        "running_mean": (4,), "running_var": (4,), "weight": (4,), "bias": (4,)}
    assert graph.nodes["n0"]["meta"]["prune.channels"] == [8, 4]
    assert graph.nodes["n3"]["meta"]["prune.channels"] == [6, 3]


def test_ratio_zero_changes_nothing():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    original, graph, stats = prune(model, X, PruneChannels(ratio=0.0))
    assert stats == {"pruned_groups": 0, "removed_channels": 0, "skipped.graph_output": 1}
    assert weight_shapes(graph) == weight_shapes(original)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn(self.b(F.relu(self.a(x)))))


def test_residual_adds_merge_groups():
    model = Fn(lambda s, x: s.head(s.b2(s.b1(s.stem(x))).mean((2, 3))), stem=nn.Conv2d(3, 8, 3), b1=Block(8),
               b2=Block(8), head=nn.Linear(8, 4))
    _, graph, stats = prune(model, X, PruneChannels(ratio=0.5))
    # groups: stem + both blocks' second convs (tied by the adds), b1.a, b2.a
    assert stats == {"pruned_groups": 3, "removed_channels": 12, "skipped.graph_output": 1}
    shapes = weight_shapes(graph)
    assert shapes["stem"] == (4, 3, 3, 3) and shapes["b1_b"] == (4, 4, 3, 3) and shapes["b2_b"] == (4, 4, 3, 3)
    assert shapes["head"] == (4, 4)


def test_concat_offsets_indices():
    model = Fn(lambda s, x: s.out(torch.cat([F.relu(s.a(x)), s.b(x), x], 1)), a=nn.Conv2d(3, 6, 1),
               b=nn.Conv2d(3, 4, 3, padding=1), out=nn.Conv2d(13, 5, 1))
    _, graph, stats = prune(model, X, PruneChannels(ratio=0.5))
    assert stats == {"pruned_groups": 2, "removed_channels": 5, "skipped.graph_output": 1}
    assert weight_shapes(graph)["out"] == (5, 3 + 2 + 3, 1, 1)  # the graph input's 3 channels stay


def test_depthwise_ties_in_and_out():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    _, graph, stats = prune(model, X, PruneChannels(ratio=0.5))
    assert stats == {"pruned_groups": 1, "removed_channels": 4, "skipped.graph_output": 1}
    assert weight_shapes(graph)["n2"] == (4, 1, 3, 3) and graph.nodes["n2"]["attrs"]["groups"] == 4


@pytest.mark.parametrize("flatten", [nn.Flatten(), Fn(lambda s, x: x.view(x.shape[0], -1)),
                                     Fn(lambda s, x: x.reshape(2, -1))], ids=["flatten", "view", "reshape"])
def test_flatten_maps_a_channel_to_its_block_of_features(flatten):
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.MaxPool2d(2), flatten, nn.Linear(6 * 3 * 3, 4))
    _, graph, stats = prune(model, X, PruneChannels(ratio=0.5))
    assert stats["removed_channels"] == 3
    assert weight_shapes(graph)["n4"] == (4, 27)


def test_squeeze_excite_gating_and_constant_operands_are_sliced():
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.reduce, self.expand = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
            self.shift = nn.Parameter(torch.randn(8, 1, 1), requires_grad=False)
            self.out = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            y = F.silu(self.conv(x))
            gate = torch.sigmoid(self.expand(F.silu(self.reduce(y.mean((2, 3), keepdim=True)))))
            return self.out(y * gate + self.shift)

    _, graph, stats = prune(SE(), X, PruneChannels(ratio=0.5))
    assert stats == {"pruned_groups": 2, "removed_channels": 5, "skipped.graph_output": 1}
    constants = [d["params"]["value"].shape for _, d in graph.nodes(data=True) if d["op"] == "constant"]
    assert (4, 1, 1) in constants


def test_permute_select_and_reductions_move_the_channel_axis():
    model = Fn(lambda s, x: s.head(s.conv(x).permute(0, 2, 3, 1)[:, 0].amax(1)), conv=nn.Conv2d(3, 8, 3),
               head=nn.Linear(8, 2))
    _, graph, _ = prune(model, X, PruneChannels(ratio=0.5))
    assert weight_shapes(graph)["head"] == (2, 4)


@pytest.mark.parametrize("kind, bidirectional, layers", [("LSTM", True, 2), ("LSTM", False, 1), ("GRU", True, 1),
                                                         ("RNN", False, 2)])
def test_recurrent_hidden_size_is_a_group(kind, bidirectional, layers):
    rnn = getattr(nn, kind)(5, 8, num_layers=layers, bidirectional=bidirectional, batch_first=True)
    model = Fn(lambda s, x: s.head(s.rnn(x)[0][:, -1]), rnn=rnn, head=nn.Linear(8 * (1 + bidirectional), 3))
    x = (torch.randn(2, 7, 5),)
    _, graph, stats = prune(model, x, PruneChannels(ratio=0.25))
    assert stats == {"pruned_groups": 1, "removed_channels": 2, "skipped.graph_output": 1}
    node = graph.nodes["rnn"]
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    assert node["attrs"]["hidden_size"] == 6
    assert node["params"]["weight_hh_l0"].shape == (gates * 6, 6)
    if layers > 1:
        assert node["params"]["weight_ih_l1"].shape == (gates * 6, 6 * (1 + bidirectional))
    assert weight_shapes(graph)["head"] == (3, 6 * (1 + bidirectional))


def test_zeroed_channels_are_the_ones_removed_and_the_model_is_unchanged():
    """BN-scale importance on channels whose gamma and beta are zero: pruned == the untouched PyTorch model."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    dead = [1, 4, 6, 7]
    with torch.no_grad():
        model[1].weight[dead] = 0
        model[1].bias[dead] = 0
    graph = from_torch(model, X)
    run_pass(PruneChannels(ratio=0.5, importance="bn_scale"), graph)
    assert graph.nodes["n0"]["params"]["weight"].shape[0] == 4
    np.testing.assert_array_equal(graph.nodes["n0"]["params"]["weight"],
                                  model[0].weight.detach().numpy()[[0, 2, 3, 5]])
    with torch.no_grad():
        assert_outputs_close(model(*X), run_reference(graph, X), rtol=1e-6, atol=1e-7)


def test_uniform_allocation_rounds_and_respects_min_channels():
    model = nn.Sequential(nn.Conv2d(3, 24, 3), nn.ReLU(), nn.Conv2d(24, 10, 3), nn.ReLU(), nn.Conv2d(10, 4, 1))
    _, graph, _ = prune(model, X, PruneChannels(ratio=0.7, round_to=8, min_channels=4))
    shapes = weight_shapes(graph)
    assert shapes["n0"][0] == 8           # 24 * 0.3 = 7.2 kept -> rounded to 8
    assert shapes["n2"][0] == 8           # 10 * 0.3 = 3 kept -> at least round_to


def test_global_allocation_prunes_the_least_important_channels_overall():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():  # the first conv's channels 0..5 are nearly dead: global allocation takes them first
        model[0].weight[:6] *= 1e-3
        model[2].weight[:, :6] *= 1e-3
    _, graph, stats = prune(model, X, PruneChannels(ratio=0.5, allocation="global"))
    assert stats["removed_channels"] == 8
    assert weight_shapes(graph)["n0"][0] == 2


@pytest.mark.parametrize("model, reason", [
    (nn.Sequential(nn.Conv2d(3, 8, 3)), "graph_output"),
    (nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1)), "grouped_conv"),
    (nn.Sequential(nn.Conv2d(3, 8, 3), nn.Softmax(1), nn.Conv2d(8, 2, 1)), "normalized_over_channels"),
    (Fn(lambda s, x: s.b(zoo.channel_shuffle(s.a(x), 2)), a=nn.Conv2d(3, 8, 1), b=nn.Conv2d(8, 2, 1)),
     "channel_axis_changed"),
    (Fn(lambda s, x: s.b(s.a(x)[:, :4]), a=nn.Conv2d(3, 8, 1), b=nn.Conv2d(4, 2, 1)), "channel_axis_changed"),
    (Fn(lambda s, x: s.b(s.a(x) + x), a=nn.Conv2d(3, 3, 1), b=nn.Conv2d(3, 2, 1)), "opaque_operand"),
    (Fn(lambda s, x: s.b(torch.matmul(s.a(x), x)), a=nn.Conv2d(3, 3, 1), b=nn.Conv2d(3, 2, 1)),
     "unsupported_op_matmul"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_refusals(model, reason):
    graph = from_torch(model.eval(), X)
    stats = run_pass(PruneChannels(ratio=0.5), graph).stats
    assert stats.get(f"skipped.{reason}", 0) >= 1, stats


def test_skip_by_name_too_small_and_no_bn():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 1, 3), nn.ReLU(), nn.Conv2d(1, 2, 1))
    graph = from_torch(model.eval(), X)
    stats = run_pass(PruneChannels(ratio=0.5, skip=("0",)), graph).stats
    assert stats == {"pruned_groups": 0, "removed_channels": 0, "skipped.skipped_by_name": 1,
                     "skipped.too_small": 1, "skipped.graph_output": 1}
    stats = run_pass(PruneChannels(importance="bn_scale"), from_torch(model.eval(), X)).stats
    assert stats["skipped.no_bn"] == 1


def test_options_are_checked_and_parse_from_text():
    assert parse_spec("prune-channels{ratio=0.25,round_to=8,allocation=global}") == \
        PruneChannels(ratio=0.25, round_to=8, allocation="global")
    for bad in ({"ratio": 1.0}, {"importance": "random"}, {"allocation": "greedy"}, {"round_to": 0}):
        with pytest.raises(PassError, match="prune-channels"):
            PruneChannels(**bad)


def test_explain_lists_every_group():
    graph = from_torch(Block(4).eval(), (torch.randn(1, 4, 6, 6),))
    ctx = PassContext(explanations=[])
    PruneChannels().run(graph, ctx)
    assert [(e.node, e.outcome, e.detail) for e in ctx.explanations] == [
        ("b", "skipped.opaque_operand", "'add' node 'add' (from add) operand %x"),
        ("a", "pruned_groups", "4 -> 2 channels, layers ['a']")]


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_models_shrink_and_match_their_masked_originals(name):
    model, inputs = zoo.make(name)
    original, graph, stats = prune(model, inputs, PruneChannels(ratio=0.5))
    if name != "gru_seq2seq":  # its hidden state is a model output: nothing may shrink
        assert stats["removed_channels"] > 0
        assert graph_flops(graph) < 0.75 * graph_flops(original)
        assert graph.num_params() < 0.75 * original.num_params()


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "squeezenet", "efficientnet", "bilstm"])
def test_graphs_imported_from_onnx_prune_alike(name, tmp_path):
    """ONNX graphs carry the same couplings in other spellings (Gemm, Flatten, Reshape from shape arithmetic)."""
    from frontend.onnx import from_onnx
    from tests.frontend.test_onnx import export_torch

    model, xs = zoo.make(name)
    export_torch(model, xs, 17, tmp_path / "m.onnx")
    original = from_onnx(tmp_path / "m.onnx")
    p = PruneChannels(ratio=0.5)
    reference = run_reference(masked(original, p), xs)
    stats = run_pass(p, original).stats
    assert stats["removed_channels"] > 0, stats
    assert_outputs_close(reference, run_reference(original, xs), rtol=1e-5, atol=1e-6)
