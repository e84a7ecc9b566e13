"""bf16 / fp16 on real data: the digits CNN and LSTM (``tests/e2e/digits.py``) compiled with ``mixed-precision``
keep their fp32 accuracy within 0.5 point on the held-out split (measured through the compiled TVM module)."""

from __future__ import annotations

import pytest
import torch

import passes
from tests.e2e import digits

pytestmark = pytest.mark.tvm


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["cnn", "lstm"])
def test_low_precision_keeps_accuracy(name, dtype):
    _, x_test, _, y_test = digits.split()
    x_test = x_test[:, None] if name == "cnn" else x_test
    model = getattr(digits, name)()
    fp32 = digits.accuracy(model, x_test, y_test)
    opt = passes.optimize(model, passes=["default", f"mixed-precision{{dtype={dtype}}}"],
                          example_inputs=(torch.from_numpy(x_test),), measure=False)
    low = digits.accuracy(opt, x_test, y_test)
    print(f"{name} digits: fp32 {fp32:.2f}%, {dtype} {low:.2f}%")
    assert abs(low - fp32) <= 0.5
    assert {p.name: p.stats for p in opt.report.passes}["mixed-precision"]["converted"] >= 2
