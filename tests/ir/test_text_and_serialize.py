"""Printer determinism and the JSON + npz round trip (no pickle; corrupt files refused)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from examples import zoo
from frontend.torch_fx import from_torch
from passes.ir.graph import IRError
from passes.ir.interpret import run_reference
from passes.ir.serialize import load_graph, save_graph
from passes.ir.text import graph_text
from tests.helpers import assert_outputs_close
from tests.ir.test_graph import tiny

EXPECTED_TINY = """\
graph tiny(%x: f32[1,3,8,8]) {
  %features_0 = conv2d(%x) {activation='none', activation_params=(), dilation=(1, 1), groups=1, padding=(1, 1), stride=(1, 1)} [weight: f32[4,3,3,3]] -> f32[1,4,8,8]
  %features_1 = relu(%features_0) -> f32[1,4,8,8]
  return %features_1
}"""


def test_printer_output_is_exact():
    g, _, _ = tiny()
    assert graph_text(g) == EXPECTED_TINY


def test_printer_is_deterministic_across_imports():
    model, xs = zoo.make("squeezenet")
    assert graph_text(from_torch(model, xs)) == graph_text(from_torch(model, xs))


@pytest.mark.parametrize("name", ["resnet", "bilstm", "gru_seq2seq"])
def test_round_trip_preserves_structure_and_numbers(tmp_path, name):
    model, xs = zoo.make(name)
    graph = from_torch(model, xs)
    save_graph(graph, tmp_path)
    loaded = load_graph(tmp_path)
    assert graph_text(loaded, with_origin=True) == graph_text(graph, with_origin=True)
    assert_outputs_close(run_reference(graph, xs), run_reference(loaded, xs), rtol=0, atol=0)


def test_npz_is_loaded_without_pickle(tmp_path):
    g, _, _ = tiny()
    save_graph(g, tmp_path)
    np.savez(tmp_path / "params.npz", **{"features_0/weight": np.array([object()], dtype=object)})
    with pytest.raises(IRError, match="cannot read a saved graph"):
        load_graph(tmp_path)


def test_corrupt_graph_json_is_refused_with_problems(tmp_path):
    g, _, _ = tiny()
    save_graph(g, tmp_path)
    doc = json.loads((tmp_path / "graph.json").read_text())
    doc["nodes"][1]["out_types"][0]["shape"] = [1, 4, 8, 99]
    (tmp_path / "graph.json").write_text(json.dumps(doc))
    with pytest.raises(IRError, match="but the op infers"):
        load_graph(tmp_path)
    (tmp_path / "graph.json").write_text("{not json")
    with pytest.raises(IRError, match="cannot read a saved graph"):
        load_graph(tmp_path)


def test_interpreter_params_are_trainable_and_write_back():
    model, xs = zoo.make("vgg")
    graph = from_torch(model, xs)
    module = __import__("passes.ir.interpret", fromlist=["interpret"]).interpret(graph)
    params = list(module.parameters())
    assert params and all(isinstance(p, torch.nn.Parameter) for p in params)
    loss = module(*xs).square().sum()
    loss.backward()
    assert all(p.grad is not None for p in params)
    with torch.no_grad():
        for p in params:
            p.mul_(0.5)
    module.write_back()
    assert not torch.allclose(run_reference(graph, xs), model(*xs))
