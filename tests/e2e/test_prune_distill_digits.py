"""Pruning + distillation on real data: scikit-learn's handwritten digits, compiled with TVM.

A small CNN and a row-by-row LSTM are trained here (seeded, seconds), then ``optimize`` prunes them
(``prune-channels``), fine-tunes the pruned student against the unpruned teacher (``distill``) and compiles it.
Accuracy is measured on a held-out split through the compiled module and must stay within 1 point of the unpruned
model, while params and FLOPs shrink.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import passes

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    return train_test_split(x, data.target.astype(np.int64), test_size=0.3, random_state=0, stratify=data.target)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def accuracy(predict, x: np.ndarray, y: np.ndarray) -> float:
    return float((np.argmax(np.asarray(predict(x)), axis=1) == y).mean() * 100)


def prune_and_distill(model, x_train, y_train, x_test, ratio):
    batches = [(x_train[i:i + 64], y_train[i:i + 64]) for i in range(0, len(x_train), 64)]
    pipeline = [f"prune-channels{{ratio={ratio}}}", "distill{epochs=30,lr=0.003,temperature=2}"]
    return passes.optimize(model, passes=pipeline, example_inputs=(torch.from_numpy(x_test),), data=batches,
                           measure=False)


def report_row(opt) -> dict:
    report = opt.report
    return {"params": report.params["after"] / report.params["before"],
            "flops": report.flops["after"] / report.flops["before"]}


def test_cnn_pruned_by_half_recovers_with_distillation(digits):
    x_train, x_test, y_train, y_test = digits
    x_train, x_test = x_train[:, None], x_test[:, None]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    train(model, torch.from_numpy(x_train), torch.from_numpy(y_train), epochs=15)
    with torch.no_grad():
        fp32 = accuracy(lambda x: model(torch.from_numpy(x)).numpy(), x_test, y_test)
    opt = prune_and_distill(model, x_train, y_train, x_test, ratio=0.5)
    pruned = accuracy(opt, x_test, y_test)
    shrink = report_row(opt)
    print(f"CNN digits: unpruned {fp32:.2f}%, pruned 50% + distilled {pruned:.2f}%, {shrink}")
    assert fp32 > 95
    assert pruned >= fp32 - 1.0
    assert shrink["params"] < 0.4 and shrink["flops"] < 0.3  # the 10-class head keeps its outputs
    stats = {p.name: p.stats for p in opt.report.passes}
    assert stats["prune-channels"]["removed_channels"] == 8 + 16
    assert stats["distill"]["loss_end_milli"] < stats["distill"]["loss_start_milli"]


def test_lstm_hidden_pruned_by_a_quarter_recovers_with_distillation(digits):
    x_train, x_test, y_train, y_test = digits  # each image read row by row: 8 steps of 8 pixels

    class RowLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(8, 64, batch_first=True), nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    model = train(RowLSTM(), torch.from_numpy(x_train), torch.from_numpy(y_train), epochs=30)
    with torch.no_grad():
        fp32 = accuracy(lambda x: model(torch.from_numpy(x)).numpy(), x_test, y_test)
    opt = prune_and_distill(model, x_train, y_train, x_test, ratio=0.25)
    pruned = accuracy(opt, x_test, y_test)
    shrink = report_row(opt)
    print(f"LSTM digits: unpruned {fp32:.2f}%, hidden pruned 25% + distilled {pruned:.2f}%, {shrink}")
    assert opt.graph.nodes["lstm"]["attrs"]["hidden_size"] == 48
    assert fp32 > 94
    assert pruned >= fp32 - 1.0
    assert shrink["params"] < 0.62
