"""Accuracy-aware int8 on real data: the digits CNN (``tests/e2e/digits.py``) quantized with its accuracy as the
metric and a 0.5 point tolerance meets it on the calibration split and stays within 0.5 point of fp32 on the
held-out split through the compiled TVM module; the report lists every quantized layer's SQNR."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import passes
from passes.transforms.quantize import Quantize
from tests.e2e import digits

pytestmark = pytest.mark.tvm

BATCH = 60  # the compiled module's static batch; the held-out split is 9 batches


def percent_correct(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((outputs.argmax(1) == labels).float().mean())


def test_accuracy_aware_int8_keeps_the_digits_cnn_within_tolerance():
    x_train, x_test, y_train, y_test = digits.split()
    x_train, x_test = x_train[:, None], x_test[:, None]
    model = digits.cnn()
    data = [(torch.from_numpy(x_train[i:i + BATCH]), torch.from_numpy(y_train[i:i + BATCH]))
            for i in range(0, 20 * BATCH, BATCH)]
    opt = passes.optimize(model, passes=["fold-batch-norm", "fuse-conv-activation",
                                         Quantize(metric=percent_correct, tolerance=0.5)],
                          example_inputs=(data[0][0],), data=data, measure=False)
    stats = {p.name: p.stats for p in opt.report.passes}["quantize"]
    assert stats["metric_float_milli"] - stats["metric_final_milli"] <= 500
    assert stats["quantized"] + stats["kept_for_accuracy"] == 3
    fp32 = digits.accuracy(model, x_test, y_test)
    int8 = digits.accuracy(lambda x: np.concatenate([opt(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]),
                           x_test, y_test)
    print(f"digits CNN: fp32 {fp32:.2f}%, accuracy-aware int8 {int8:.2f}%, stats {stats}")
    assert int8 >= fp32 - 0.5, (fp32, int8)
    sqnr = opt.report.to_dict()["sqnr_db"]
    assert len(sqnr) == stats["quantized"] and min(sqnr.values()) == stats["sqnr_db.min"] >= 30
