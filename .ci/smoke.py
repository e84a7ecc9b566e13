"""Smoke test of an installed ``passes`` (no test suite, no constraints file): int8 and tuning end to end.

Why: ``pip install`` picks the newest releases our ranges allow, not the pins of ``constraints.txt``; a dependency
release that breaks us (apache-tvm-ffi 0.1.15.post2 segfaulted in ``quantize``) must show up in CI. ``.ci/run`` runs
this in a fresh virtual environment, from outside the repository, so the installed package is what is imported.

Checks, on a seeded conv-bn-relu-pool-linear model: the tuned fp32 build matches PyTorch (rtol 1e-4), the tuner ran
trials and wrote its database, and the int8 build (static ``quantize``, tiles from the same database) keeps an SQNR
of at least 25 dB against PyTorch fp32. 30-55 s on 2 shared cores. Exit code 0 on success.
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

import passes


def main() -> int:
    start = time.perf_counter()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(4)]
    with torch.no_grad():
        expected = model(x).numpy()

    with tempfile.TemporaryDirectory() as database:
        tune = passes.Tune(trials=6, database=database, progress=False)
        fp32 = passes.optimize(model, target="llvm", example_inputs=(x,), tune=tune)
        np.testing.assert_allclose(np.asarray(fp32(x)), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
        tuned = fp32.report.to_dict()["tune"]
        assert tuned["new_trials"] > 0, f"the tuner ran no trials: {tuned}"

        int8 = passes.optimize(model, passes=["fold-batch-norm", "fuse-conv-activation", "quantize", "default"],
                               target="llvm", example_inputs=(x,),
                               data=calibration, tune=passes.Tune(trials=0, database=database, progress=False))
        got = np.asarray(int8(x))
    sqnr = 10 * np.log10(np.sum(expected ** 2) / max(np.sum((got - expected) ** 2), 1e-30))
    assert sqnr >= 25, f"int8 SQNR {sqnr:.1f} dB against PyTorch fp32 (want >= 25 dB)"
    versions = {name: __import__(name).__version__ for name in ("torch", "tvm", "tvm_ffi", "onnx")}
    print(f"smoke ok in {time.perf_counter() - start:.1f} s: {tuned['new_trials']} tuning trials, int8 SQNR "
          f"{sqnr:.1f} dB; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
