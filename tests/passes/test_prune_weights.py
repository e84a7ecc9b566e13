"""prune-weights: achieved sparsity, exact stats, refusals, idempotence, and numerics of the pruned model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from frontend.torch_fx import from_torch
from passes.core.pass_base import PassError
from passes.core.pipeline import parse_spec
from passes.ir.interpret import run_reference
from passes.transforms.prune_weights import PruneWeights
from tests.passes.helpers import assert_idempotent, run_pass


def model_and_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=16), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 64)).eval()
    x = torch.randn(1, 8, 8, 8)
    return model, x, from_torch(model, (x,))


def test_layer_scope_reaches_the_sparsity_and_counts_zeroed_weights():
    _, _, graph = model_and_graph()
    result = run_pass(PruneWeights(sparsity=0.75, min_weights=256), graph)
    convs = [n for n, d in graph.nodes(data=True) if d["op"] in ("conv2d", "linear")]
    pruned = [n for n in convs if "prune.sparsity" in graph.nodes[n]["meta"]]
    assert len(pruned) == 2  # the depthwise conv (144 weights) is too small
    zeroed = sum(int((graph.nodes[n]["params"]["weight"] == 0).sum()) for n in pruned)
    assert result.stats == {"zeroed": zeroed, "skipped.too_small": 1}
    for n in pruned:
        assert graph.nodes[n]["meta"]["prune.sparsity"] == pytest.approx(0.75, abs=0.01)
    assert_idempotent(PruneWeights(sparsity=0.75, min_weights=256), graph)


def test_global_scope_uses_one_threshold():
    _, _, graph = model_and_graph()
    prunable = [n for n, d in graph.nodes(data=True) if d["op"] in ("conv2d", "linear")
                and d["params"]["weight"].size >= 256]
    before = {n: graph.nodes[n]["params"]["weight"].copy() for n in prunable}
    run_pass(PruneWeights(sparsity=0.5, scope="global", min_weights=256), graph)
    threshold = np.quantile(np.concatenate([np.abs(w).ravel() for w in before.values()]), 0.5)
    for n in prunable:
        after = graph.nodes[n]["params"]["weight"]
        assert np.all(np.abs(before[n][after == 0]) <= threshold)   # everything dropped was small
        assert np.all(np.abs(after[after != 0]) > threshold)         # everything kept was large
    zeros = sum(int((graph.nodes[n]["params"]["weight"] == 0).sum()) for n in prunable)
    assert zeros / sum(w.size for w in before.values()) == pytest.approx(0.5, abs=0.01)


def test_pruned_graph_equals_a_masked_pytorch_model():
    model, x, graph = model_and_graph()
    run_pass(PruneWeights(sparsity=0.6, min_weights=256), graph)
    with torch.no_grad():
        for name, module in model.named_children():
            node = next((n for n, d in graph.nodes(data=True) if d["origin"] == (name,) and
                         "prune.sparsity" in d["meta"]), None)
            if node is not None:
                module.weight.copy_(torch.from_numpy(graph.nodes[node]["params"]["weight"]))
        torch.testing.assert_close(run_reference(graph, (x,)), model(x), rtol=1e-5, atol=1e-6)


def test_refusals_and_bad_options():
    _, _, graph = model_and_graph()
    result = run_pass(PruneWeights(sparsity=0.5, min_weights=0, skip=("0", "4")), graph)
    assert result.stats["skipped.skipped_by_name"] == 2 and result.stats["zeroed"] > 0
    assert parse_spec("prune-weights{sparsity=0.3,skip=0;4}").skip == ("0", "4")
    with pytest.raises(PassError, match="sparsity must be in"):
        PruneWeights(sparsity=1.5)
    with pytest.raises(PassError, match="scope must be"):
        PruneWeights(scope="row")
