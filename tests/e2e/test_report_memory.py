"""The report counts bytes, not only FLOPs: weights at their stored dtype before/after, activation peaks, the
compiled plan's storage, and the saved artifact's size; shown by ``summary()``, ``to_dict()`` and the CLI's JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import passes
from passes.ir.cost import graph_weight_bytes

pytestmark = pytest.mark.tvm
ROOT = Path(__file__).resolve().parents[2]


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 8 * 8, 10)).eval()
    return model, (torch.randn(1, 3, 8, 8),)


def test_fp32_report_counts_weights_activations_and_artifact(tmp_path):
    model, inputs = _model()
    opt = passes.optimize(model, example_inputs=inputs, measure=False)
    memory = opt.report.memory
    fp32_weights = 4 * sum(p.numel() for p in model.parameters()) + 4 * 16 * 2  # + BN running mean/var
    assert memory["weights_before"] == fp32_weights
    assert memory["weights_after"] == graph_weight_bytes(opt.graph) < fp32_weights  # BN folded away
    one_map = 16 * 8 * 8 * 4
    assert memory["activations_before"] >= 2 * one_map and memory["activations_after"] >= 2 * one_map
    # the compiled plan holds at least the output and one feature map, at most every intermediate at once
    every_intermediate = sum(t.numel * 4 for n in opt.graph.topo_order() if opt.graph.nodes[n]["op"] != "input"
                             for t in opt.graph.nodes[n]["out_types"])
    assert 40 + one_map <= memory["activations_compiled"] <= every_intermediate
    assert "artifact" not in memory
    opt.save(tmp_path / "art")
    files = [f for f in (tmp_path / "art").rglob("*") if f.is_file() and f.name not in ("report.json", "artifact.json")]
    assert opt.report.memory["artifact"] == sum(f.stat().st_size for f in files)
    saved = json.loads((tmp_path / "art" / "report.json").read_text())
    assert saved["memory"] == opt.report.memory
    assert passes.load(tmp_path / "art").report.memory == opt.report.memory
    summary = opt.report.summary()
    assert "weights" in summary and "activations peak" in summary and "artifact" in summary


def test_int8_and_bf16_weights_shrink_by_their_storage_width():
    model, inputs = _model()
    fp32 = passes.optimize(model, passes=["fold-batch-norm"], example_inputs=inputs, measure=False)
    int8 = passes.optimize(model, passes=["fold-batch-norm", "quantize"], example_inputs=inputs,
                           data=[inputs], measure=False)
    bf16 = passes.optimize(model, passes=["fold-batch-norm", "mixed-precision{dtype=bf16}"], example_inputs=inputs,
                           measure=False)
    before = fp32.report.memory["weights_after"]
    # int8 weights + int32 biases + per-channel float scales: a little over a quarter
    assert before / 4 < int8.report.memory["weights_after"] < before / 3
    assert bf16.report.memory["weights_after"] == pytest.approx(before / 2, rel=0.01)


def test_cli_json_shows_memory(tmp_path):
    result = subprocess.run([sys.executable, "-m", "passes.cli", "compile", "zoo:resnet", "--no-measure", "--json",
                             "-o", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    memory = json.loads(result.stdout)["memory"]
    assert set(memory) == {"weights_before", "weights_after", "activations_before", "activations_after",
                           "activations_compiled", "artifact"}
    assert all(isinstance(v, int) and v > 0 for v in memory.values())
