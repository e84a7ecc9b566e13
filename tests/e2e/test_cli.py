"""The command line: exit codes, one-line errors, compile -> run round trip, nothing left behind on failure."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from examples import zoo
from passes.cli import main
from tests.conftest import ROOT
from tests.helpers import assert_outputs_close


def test_list_commands(capsys):
    assert main(["list-ops"]) == 0
    out = capsys.readouterr().out
    assert "conv2d" in out and "lstm" in out
    assert main(["list-passes"]) == 0


def test_inspect_zoo_model(capsys):
    assert main(["inspect", "zoo:bilstm", "--json"]) == 0
    info = __import__("json").loads(capsys.readouterr().out)
    assert info["ops"]["lstm"] == 1 and info["inputs"] == {"x": "f32[1,16,8]"} and info["flops"] > 0


@pytest.mark.tvm
def test_compile_then_run_matches_pytorch(tmp_path, capsys):
    artifact = tmp_path / "art"
    assert main(["compile", "zoo:gru_seq2seq", "--passes", "", "-o", str(artifact), "--no-measure"]) == 0
    model, xs = zoo.make("gru_seq2seq")
    np.savez(tmp_path / "in.npz", src=xs[0].numpy(), tgt=xs[1].numpy())
    assert main(["run", str(artifact), str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")]) == 0
    out = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        assert_outputs_close(model(*xs), (out["output_0"], out["output_1"]))


@pytest.mark.parametrize("argv, message", [
    (["compile", "missing.onnx", "-o", "OUT"], "does not exist"),
    (["compile", "zoo:nope", "-o", "OUT"], "unknown zoo model 'nope'"),
    (["compile", ".", "-o", "OUT"], "is a folder"),
    (["compile", "zoo:vgg", "--passes", "no-such-pass", "-o", "OUT"], "unknown pass 'no-such-pass'"),
    (["run", "NOT_AN_ARTIFACT", "in.npz", "-o", "o.npz"], "not a passes artifact"),
])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "OUT").exists()


def test_real_entry_point_exit_code():
    result = subprocess.run([sys.executable, "-m", "passes.cli", "compile", "zoo:missing", "-o", "x"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown zoo model")


@pytest.mark.tvm
def test_compile_a_multi_hundred_node_onnx_cnn_and_run_it(tmp_path, capsys):
    """A 374-node ONNX ShuffleNet-style graph (torch's exporter) through the CLI, checked against ONNX Runtime."""
    import json
    import warnings

    import onnx
    import onnxruntime as ort

    model, xs = zoo.make("shufflenet", full=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, xs, str(tmp_path / "m.onnx"), dynamo=False, opset_version=17,
                          input_names=["image.in"])
    assert len(onnx.load(str(tmp_path / "m.onnx")).graph.node) > 300
    assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "art"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"]["reference"] == "onnxruntime" and report["accuracy"]["max_rel_error"] < 1e-4
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.savez(tmp_path / "in.npz", **{"image.in": x})
    assert main(["run", str(tmp_path / "art"), str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")]) == 0
    expected = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image.in": x})[0]
    output_name = onnx.load(str(tmp_path / "m.onnx")).graph.output[0].name  # npz keys: the model's output names
    assert_outputs_close(expected, np.load(tmp_path / "out.npz")[output_name])
