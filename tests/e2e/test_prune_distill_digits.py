"""Pruning + distillation on real data: scikit-learn's handwritten digits, compiled with TVM.

A small CNN and a row-by-row LSTM (``tests/e2e/digits.py``) are pruned by ``optimize`` (``prune-channels``),
fine-tuned against the unpruned teacher (``distill``) and compiled. Accuracy is measured on the held-out split
through the compiled module and must stay within 1 point of the unpruned model, while params and FLOPs shrink.
"""

from __future__ import annotations

import pytest
import torch

import passes
from tests.e2e import digits

pytestmark = pytest.mark.tvm


def prune_and_distill(model, x_train, y_train, x_test, ratio):
    batches = [(x_train[i:i + 64], y_train[i:i + 64]) for i in range(0, len(x_train), 64)]
    pipeline = [f"prune-channels{{ratio={ratio}}}", "distill{epochs=30,lr=0.003,temperature=2}"]
    return passes.optimize(model, passes=pipeline, example_inputs=(torch.from_numpy(x_test),), data=batches,
                           measure=False)


def shrink(opt) -> dict:
    report = opt.report
    return {"params": report.params["after"] / report.params["before"],
            "flops": report.flops["after"] / report.flops["before"]}


def test_cnn_pruned_by_half_recovers_with_distillation():
    x_train, x_test, y_train, y_test = digits.split()
    x_train, x_test = x_train[:, None], x_test[:, None]
    fp32 = digits.accuracy(digits.cnn(), x_test, y_test)
    opt = prune_and_distill(digits.cnn(), x_train, y_train, x_test, ratio=0.5)
    pruned = digits.accuracy(opt, x_test, y_test)
    print(f"CNN digits: unpruned {fp32:.2f}%, pruned 50% + distilled {pruned:.2f}%, {shrink(opt)}")
    assert fp32 > 95
    assert pruned >= fp32 - 1.0
    assert shrink(opt)["params"] < 0.4 and shrink(opt)["flops"] < 0.3  # the 10-class head keeps its outputs
    stats = {p.name: p.stats for p in opt.report.passes}
    assert stats["prune-channels"]["removed_channels"] == 8 + 16
    assert stats["distill"]["loss_end_milli"] < stats["distill"]["loss_start_milli"]


def test_lstm_hidden_pruned_by_a_quarter_recovers_with_distillation():
    x_train, x_test, y_train, y_test = digits.split()
    fp32 = digits.accuracy(digits.lstm(), x_test, y_test)
    opt = prune_and_distill(digits.lstm(), x_train, y_train, x_test, ratio=0.25)
    pruned = digits.accuracy(opt, x_test, y_test)
    print(f"LSTM digits: unpruned {fp32:.2f}%, hidden pruned 25% + distilled {pruned:.2f}%, {shrink(opt)}")
    assert opt.graph.nodes["lstm"]["attrs"]["hidden_size"] == 48
    assert fp32 > 94
    assert pruned >= fp32 - 1.0
    assert shrink(opt)["params"] < 0.62
