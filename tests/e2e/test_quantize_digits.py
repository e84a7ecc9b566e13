"""Static int8 on real data: a small CNN trained here on scikit-learn's digits (8x8 images), quantized with
calibration batches from its training split, keeps its held-out accuracy within 1 point through the compiled
TVM module, whose integer layers agree with the reference interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import passes

pytestmark = pytest.mark.tvm

BATCH = 60  # the compiled module's static batch; the held-out split is 9 batches


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU6(), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def trained():
    """(model, train images, test images, test labels): seeded, about 2 s of training on 2 cores."""
    digits = load_digits()
    images = (digits.images / 16.0 - 0.5).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=BATCH * 9,
                                                        random_state=0, stratify=digits.target)
    torch.manual_seed(0)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(12):
        for idx in torch.randperm(len(xt)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return model.eval(), x_train, x_test, y_test


def accuracy(predict, x_test: np.ndarray, y_test: np.ndarray) -> float:
    predictions = np.concatenate([np.argmax(np.asarray(predict(x_test[i:i + BATCH])), axis=1)
                                  for i in range(0, len(x_test), BATCH)])
    return float(np.mean(predictions == y_test) * 100)


@pytest.mark.parametrize("observer", ["minmax", "percentile", "entropy"])
def test_int8_accuracy_within_one_point_of_fp32(trained, observer):
    model, x_train, x_test, y_test = trained
    with torch.no_grad():
        fp32 = accuracy(lambda x: model(torch.from_numpy(x)), x_test, y_test)
    calibration = [(torch.from_numpy(x_train[i:i + BATCH]),) for i in range(0, 8 * BATCH, BATCH)]
    opt = passes.optimize(model, passes=["fold-batch-norm", "fuse-conv-activation", f"quantize{{observer={observer}}}"],
                          example_inputs=calibration[0], data=calibration, measure=False)
    int8 = accuracy(opt, x_test, y_test)
    ops = [d["op"] for _, d in opt.graph.nodes(data=True)]
    assert ops.count("qconv2d") == 3 and ops.count("qlinear") == 2 and "conv2d" not in ops
    assert fp32 > 95.0, fp32  # the model learned the task: the comparison below means something
    assert int8 >= fp32 - 1.0, (fp32, int8)
    stats = next(p for p in opt.report.to_dict()["passes"] if p["name"] == "quantize")["stats"]
    assert stats["quantized"] == 5 and stats["sqnr_db.min"] >= 35  # measured 40-46 dB per layer


def test_compiled_integer_layers_agree_with_the_interpreter(trained):
    model, x_train, x_test, _ = trained
    calibration = [(torch.from_numpy(x_train[i:i + BATCH]),) for i in range(0, 4 * BATCH, BATCH)]
    opt = passes.optimize(model, passes=["fold-batch-norm", "fuse-conv-activation", "quantize"],
                          example_inputs=calibration[0], data=calibration, measure=False)
    from passes.ir.interpret import run_reference

    for i in range(0, len(x_test), BATCH):
        x = x_test[i:i + BATCH]
        expected = run_reference(opt.graph, (torch.from_numpy(x),)).numpy()
        np.testing.assert_array_equal(opt(x), expected)


def test_dynamic_int8_lstm_accuracy_within_one_point_of_fp32(tmp_path):
    """The row-by-row digits LSTM (``digits.lstm``) with ``quantize{mode=dynamic}`` (int8 LSTM and head weights,
    integer kernels), held-out accuracy through the compiled module; the same model exported to ONNX and
    imported quantizes to the same ops."""
    from tests.e2e import digits

    model = digits.lstm()
    _, x_test, _, y_test = digits.split()
    fp32 = digits.accuracy(model, x_test, y_test)
    example = (torch.from_numpy(x_test),)
    opt = passes.optimize(model, passes=["quantize{mode=dynamic}"], example_inputs=example, measure=False)
    ops = [d["op"] for _, d in opt.graph.nodes(data=True)]
    assert "qlstm_dynamic" in ops and "qlinear_dynamic" in ops and "lstm" not in ops
    int8 = digits.accuracy(opt, x_test, y_test)
    assert fp32 > 95.0, fp32
    assert int8 >= fp32 - 1.0, (fp32, int8)

    path = tmp_path / "lstm.onnx"
    torch.onnx.export(model, example, str(path), input_names=["x"], dynamo=False, opset_version=17)
    from_onnx = passes.optimize(str(path), passes=["quantize{mode=dynamic}"], measure=False)
    assert "qlstm_dynamic" in [d["op"] for _, d in from_onnx.graph.nodes(data=True)]
    assert digits.accuracy(from_onnx, x_test, y_test) >= fp32 - 1.0
