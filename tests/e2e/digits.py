"""Real data for accuracy tests: scikit-learn's handwritten digits (8x8), and two small models trained on it here.

Seeded and cached per test session: the CNN trains in seconds, the row-by-row LSTM (each image read as 8 steps of
8 pixels) likewise. ``accuracy`` takes any callable (PyTorch model, compiled module) on numpy batches.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn


@functools.cache
def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x_train, x_test, y_train, y_test: images scaled to [0, 1], 30% held out, stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    return train_test_split(x, data.target.astype(np.int64), test_size=0.3, random_state=0, stratify=data.target)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def accuracy(predict, x: np.ndarray, y: np.ndarray) -> float:
    """Percent of ``x`` classified as ``y``; ``predict`` maps a numpy batch to logits (torch or numpy)."""
    with torch.no_grad():
        logits = predict(torch.from_numpy(x)) if isinstance(predict, nn.Module) else predict(x)
    logits = logits.float().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits, np.float32)
    return float((np.argmax(logits, axis=1) == y).mean() * 100)


class RowLSTM(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.lstm, self.head = nn.LSTM(8, hidden, batch_first=True), nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


@functools.cache
def cnn() -> nn.Module:
    """Two 3x3 conv + BN + ReLU layers, a 2x2 max pool and a linear head (input: (N, 1, 8, 8))."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    x_train, _, y_train, _ = split()
    return train(model, x_train[:, None], y_train, epochs=15)


@functools.cache
def lstm() -> nn.Module:
    torch.manual_seed(0)
    x_train, _, y_train, _ = split()
    return train(RowLSTM(), x_train, y_train, epochs=30)
