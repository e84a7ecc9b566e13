"""The command line: exit codes, one-line errors, compile -> run round trip, nothing left behind on failure."""

from __future__ import annotations

import os
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
    (["compile", "zoo:vgg", "--target", "foo", "-o", "OUT"], "argument --target: invalid choice: 'foo'"),
    (["compile", "zoo:vgg", "--no-such-flag", "-o", "OUT"], "unrecognized arguments: --no-such-flag"),
    (["compile", "zoo:vgg"], "the following arguments are required: -o/--output"),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
    (["compile", "zoo:vgg", "-o", "a_file/OUT"], "cannot write the output folder 'a_file/OUT'"),
    (["compile", "zoo:vgg", "-o", "taken"], "output 'taken' already exists"),
    (["compile", "zoo:vgg", "--passes", "quantize", "--data", "zip.npz", "-o", "OUT"],
     "--data 'zip.npz': cannot read it as .npz"),
    (["compile", "zoo:vgg", "--passes", "quantize", "--data", "one.npy", "-o", "OUT"],
     "--data 'one.npy': cannot read it as .npz (a single .npy array"),
])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, capsys, monkeypatch, argv, message):
    """Each refused before anything is compiled (``optimize`` would raise if called)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    (tmp_path / "a_file").write_text("a file where a folder is needed")
    (tmp_path / "taken").mkdir()
    (tmp_path / "zip.npz").write_bytes(b"PK\x03\x04" + b"\0" * 20)  # a truncated zip: BadZipFile
    np.save(tmp_path / "one.npy", np.zeros(3))
    if "unknown pass" not in message:  # (pass specs are resolved by optimize, before any compile)
        monkeypatch.setattr("passes.api.optimize", lambda *a, **k: pytest.fail("compiled before checking"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "OUT").exists()


def test_save_removes_staging_folders_of_killed_processes(tmp_path):
    """``compile`` killed during save leaves ``.NAME.PID.*``; the next save removes it unless its process lives."""
    import passes

    opt = passes.optimize(torch.nn.ReLU(), passes=[], example_inputs=(torch.randn(2, 3),), measure=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.{dead.stdout.strip()}.abc123"
    (stale / "ir").mkdir(parents=True)
    alive = tmp_path / f".out.{os.getpid()}.def456"  # another save in progress: kept
    alive.mkdir()
    opt.save(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "out"]


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


@pytest.mark.tvm
def test_prune_and_distill_an_onnx_cnn_from_the_cli_and_export_it(tmp_path):
    """ONNX in -> prune-channels + distill (on --data) + default passes -> a smaller optimized.onnx that ONNX
    Runtime runs equal to the compiled artifact."""
    import onnx
    import onnxruntime as ort

    from passes.api import load

    model, (x,) = zoo.make("resnet")
    path = tmp_path / "resnet.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["image"], dynamo=False, opset_version=17)
    np.savez(tmp_path / "data.npz", image=torch.randn(64, *x.shape[1:]).numpy())
    artifact = tmp_path / "art"
    assert main(["compile", str(path), "--passes", "prune-channels{ratio=0.5},distill{epochs=2},default",
                 "--data", str(tmp_path / "data.npz"), "--batch-size", "16", "-o", str(artifact),
                 "--no-measure"]) == 0

    def weights(onnx_path):
        return sum(np.prod(t.dims) for t in onnx.load(str(onnx_path)).graph.initializer)

    assert weights(artifact / "optimized.onnx") < 0.4 * weights(path)
    session = ort.InferenceSession(str(artifact / "optimized.onnx"), providers=["CPUExecutionProvider"])
    exported = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert_outputs_close(exported, load(artifact)(x.numpy()))
    report = __import__("json").loads((artifact / "report.json").read_text())
    assert report["params"]["after"] < 0.4 * report["params"]["before"]


def test_bad_data_file_exits_2(tmp_path, capsys):
    (tmp_path / "data.npz").write_text("not an npz")
    assert main(["compile", "zoo:vgg", "--passes", "distill", "--data", str(tmp_path / "data.npz"),
                 "-o", str(tmp_path / "out")]) == 2
    assert "cannot read it as .npz" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
