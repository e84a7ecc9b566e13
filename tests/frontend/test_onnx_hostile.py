"""Hostile ONNX files: each gets one line on stderr naming the problem, exit code 2, no traceback, no output.

Every case is driven through the real CLI (`python -m passes.cli compile FILE -o OUT` and `inspect FILE`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes.cli import main

F = TensorProto.FLOAT


def model_of(nodes, inputs, outputs, initializers=(), opset=17, domain_opsets=None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "hostile", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (domain_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def relu_model(**overrides) -> onnx.ModelProto:
    return model_of([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", [1, 4])], [vi("y", [1, 4])],
                    **overrides)


def conv_model(weight: np.ndarray, x_shape=(1, 3, 8, 8)) -> onnx.ModelProto:
    return model_of([helper.make_node("Conv", ["x", "w"], ["y"], name="conv1")], [vi("x", list(x_shape))],
                    [vi("y", None)], [numpy_helper.from_array(weight, "w")])


def write(path: Path, model: onnx.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def with_external(tmp: Path, location: str, length: int | None = None, create: bool = True) -> Path:
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entries = {"location": location}
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        weight.external_data.add(key=key, value=value)
    if create and not os.path.isabs(location) and ".." not in location:
        (tmp / location).write_bytes(np.ones((4, 4), np.float32).tobytes())
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", [1, 4])],
                     [vi("y", [1, 4])], [weight])
    return write(tmp / "model.onnx", model)


def _cyclic():
    return model_of([helper.make_node("Add", ["x", "b"], ["a"], name="first"),
                     helper.make_node("Relu", ["a"], ["b"], name="second")], [vi("x", [1, 4])], [vi("a", [1, 4])])


def _bad_raw_size():
    t = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    t.raw_data = t.raw_data[:-8]
    return model_of([helper.make_node("Conv", ["x", "w"], ["y"], name="conv1")], [vi("x", [1, 3, 8, 8])],
                    [vi("y", None)], [t])


def raw_tensor(name: str, dims: list[int], raw: bytes | None = None, floats: list[float] | None = None):
    """A TensorProto built field by field: helper.make_tensor refuses the inconsistent ones we need."""
    t = TensorProto(name=name, data_type=F)
    t.dims.extend(dims)
    if raw is not None:
        t.raw_data = raw
    if floats is not None:
        t.float_data.extend(floats)
    return t


def _bad_float_count():
    t = raw_tensor("w", [4, 3, 3, 3], floats=[1.0] * 10)
    return model_of([helper.make_node("Conv", ["x", "w"], ["y"], name="conv1")], [vi("x", [1, 3, 8, 8])],
                    [vi("y", None)], [t])


def _absurd_initializer():
    t = raw_tensor("w", [1 << 20, 1 << 20], raw=b"")
    return model_of([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", [1, 1 << 20])],
                    [vi("y", None)], [t])


def _negative_dims():
    t = raw_tensor("w", [-4, 4], raw=b"")
    return model_of([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", [1, 4])], [vi("y", None)],
                    [t])


def _constant_of_absurd_shape():
    shape = numpy_helper.from_array(np.array([1 << 20, 1 << 20], np.int64), "shape")
    return model_of([helper.make_node("ConstantOfShape", ["shape"], ["big"], name="boom"),
                     helper.make_node("Add", ["x", "big"], ["y"], name="add")], [vi("x", [1, 1])], [vi("y", None)],
                    [shape])


def _op(op_type, inputs, outputs, **attrs):
    return helper.make_node(op_type, inputs, outputs, name=f"{op_type.lower()}_node", **attrs)


CASES: dict[str, tuple] = {
    "empty file": (lambda tmp: (tmp / "e.onnx").write_bytes(b"") and tmp / "e.onnx" or tmp / "e.onnx", "is empty"),
    "truncated": (lambda tmp: _truncated(tmp), "not a valid ONNX model"),
    "garbage bytes": (lambda tmp: _garbage(tmp), "not a valid ONNX model"),
    "text file": (lambda tmp: _text(tmp), "not a valid ONNX model"),
    "folder": (lambda tmp: tmp, "is a folder"),
    "missing path": (lambda tmp: tmp / "nope.onnx", "does not exist"),
    "cycle": (lambda tmp: write(tmp / "m.onnx", _cyclic()), "cycle"),
    "unknown ops listed together": (lambda tmp: write(tmp / "m.onnx", model_of(
        [_op("Relu", ["x"], ["a"]), _op("Fancy", ["a"], ["b"]), _op("Wavelet", ["b"], ["y"])],
        [vi("x", [1, 4])], [vi("y", [1, 4])])), "2 unsupported construct(s): Fancy (node 'fancy_node') Wavelet"),
    "raw data shorter than dims": (lambda tmp: write(tmp / "m.onnx", _bad_raw_size()),
                                   "initializer 'w': holds 424 bytes of data but its dims"),
    "float_data count mismatch": (lambda tmp: write(tmp / "m.onnx", _bad_float_count()),
                                  "initializer 'w': holds 10 values"),
    "absurd initializer dims": (lambda tmp: write(tmp / "m.onnx", _absurd_initializer()), "refusing to allocate"),
    "negative initializer dims": (lambda tmp: write(tmp / "m.onnx", _negative_dims()), "negative dims"),
    "absurd input dims": (lambda tmp: write(tmp / "m.onnx", model_of([_op("Relu", ["x"], ["y"])],
                                                                     [vi("x", [1 << 30, 1 << 30])],
                                                                     [vi("y", None)])), "absurdly large"),
    "folding an absurd ConstantOfShape": (lambda tmp: write(tmp / "m.onnx", _constant_of_absurd_shape()),
                                          "refusing to allocate"),
    "external data absolute path": (lambda tmp: with_external(tmp, "/etc/passwd"), "must be a relative path"),
    "external data escapes folder": (lambda tmp: with_external(tmp, "../../secret.bin"), "escapes the model's folder"),
    "external data drive path": (lambda tmp: with_external(tmp, "C:weights.bin"), "must be a relative path"),
    "external data missing": (lambda tmp: with_external(tmp, "weights.bin", create=False), "not found"),
    "external data wrong length": (lambda tmp: with_external(tmp, "weights.bin", length=12), "does not match"),
    "undefined tensor": (lambda tmp: write(tmp / "m.onnx", model_of([_op("Add", ["x", "ghost"], ["y"])],
                                                                    [vi("x", [1, 4])], [vi("y", None)])),
                         "reads undefined tensor 'ghost'"),
    "output nobody produces": (lambda tmp: write(tmp / "m.onnx", model_of([_op("Relu", ["x"], ["y"])],
                                                                          [vi("x", [1, 4])], [vi("z", None)])),
                               "graph output 'z' is not produced"),
    "opset too old": (lambda tmp: write(tmp / "m.onnx", relu_model(opset=7)), "opset 7 is not supported"),
    "opset from the future": (lambda tmp: write(tmp / "m.onnx", relu_model(opset=999)),
                              "opset 999 is not supported"),
    "rank mismatch": (lambda tmp: write(tmp / "m.onnx", conv_model(np.ones((4, 3, 3, 3), np.float32),
                                                                  x_shape=(1, 3, 8))), "conv1"),
    "channel mismatch": (lambda tmp: write(tmp / "m.onnx", conv_model(np.ones((4, 5, 3, 3), np.float32))),
                         "node 'conv1' (Conv)"),
    "dynamic input dim": (lambda tmp: write(tmp / "m.onnx", model_of([_op("Relu", ["x"], ["y"])],
                                                                     [vi("x", ["N", 4])], [vi("y", None)])),
                          "input 'x' has dynamic dims [N, 4] (dim 0 is 'N')"),
    "input without shape": (lambda tmp: write(tmp / "m.onnx", model_of([_op("Relu", ["x"], ["y"])],
                                                                       [vi("x", None)], [vi("y", None)])),
                            "input 'x': no shape"),
    "string input": (lambda tmp: write(tmp / "m.onnx", model_of([_op("Identity", ["x"], ["y"])],
                                                                [vi("x", [2], TensorProto.STRING)],
                                                                [vi("y", None, TensorProto.STRING)])),
                     "unsupported element type STRING"),
    "tensor produced twice": (lambda tmp: write(tmp / "m.onnx", model_of(
        [_op("Relu", ["x"], ["y"]), helper.make_node("Sigmoid", ["x"], ["y"], name="again")],
        [vi("x", [1, 4])], [vi("y", None)])), "tensor 'y' is produced twice"),
    "custom domain op": (lambda tmp: write(tmp / "m.onnx", model_of(
        [helper.make_node("Magic", ["x"], ["y"], name="m", domain="com.example")], [vi("x", [1, 4])],
        [vi("y", None)], domain_opsets={"com.example": 1})), "com.example::Magic"),
    "bad reshape": (lambda tmp: write(tmp / "m.onnx", model_of(
        [_op("Reshape", ["x", "s"], ["y"])], [vi("x", [2, 3])], [vi("y", None)],
        [numpy_helper.from_array(np.array([4, 4], np.int64), "s")])), "cannot reshape (2, 3) to (4, 4)"),
    "run-time Gemm weight": (lambda tmp: write(tmp / "m.onnx", model_of(
        [_op("Gemm", ["x", "w"], ["y"])], [vi("x", [2, 3]), vi("w", [3, 4])], [vi("y", None)])),
        "Gemm B must be a constant"),
    "matmul shape mismatch": (lambda tmp: write(tmp / "m.onnx", model_of(
        [_op("MatMul", ["x", "w"], ["y"])], [vi("x", [2, 3]), vi("w", [5, 4])], [vi("y", None)])), "matmul_node"),
    "LSTM with sequence_lens": (lambda tmp: write(tmp / "m.onnx", _lstm_with_lengths()), "sequence_lens"),
    "no outputs": (lambda tmp: write(tmp / "m.onnx", model_of([], [vi("x", [1])], [])), "holds no ONNX graph"),
}


def _truncated(tmp: Path) -> Path:
    data = conv_model(np.ones((4, 3, 3, 3), np.float32)).SerializeToString()
    (tmp / "t.onnx").write_bytes(data[: len(data) // 2])
    return tmp / "t.onnx"


def _garbage(tmp: Path) -> Path:
    (tmp / "g.onnx").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return tmp / "g.onnx"


def _text(tmp: Path) -> Path:
    (tmp / "t.onnx").write_text("this is not a model\n" * 10)
    return tmp / "t.onnx"


def _lstm_with_lengths():
    w = numpy_helper.from_array(np.ones((1, 8, 3), np.float32), "W")
    r = numpy_helper.from_array(np.ones((1, 8, 2), np.float32), "R")
    return model_of([helper.make_node("LSTM", ["x", "W", "R", "", "lens"], ["y"], name="rnn", hidden_size=2)],
                    [vi("x", [4, 1, 3]), vi("lens", [1], TensorProto.INT32)], [vi("y", None)], [w, r])


def test_there_are_at_least_30_hostile_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_file_is_refused_cleanly(name, tmp_path, capsys):
    make, message = CASES[name]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = make(model_dir)
    out = tmp_path / "out"
    for argv in (["compile", str(path), "-o", str(out), "--no-measure"], ["inspect", str(path)]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert message in err, err
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left behind
