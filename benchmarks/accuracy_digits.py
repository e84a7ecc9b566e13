"""Accuracy table on real data: the digits CNN and row-by-row LSTM (``tests/e2e/digits.py``, trained here on
scikit-learn's ``load_digits``) through the compiled TVM module, fp32 vs int8 vs bf16 vs fp16, on the held-out 30%.

    python benchmarks/accuracy_digits.py        # prints a Markdown table, writes benchmarks/results/accuracy.md

int8: the CNN static (calibrated on 8 batches of 64 training images, each observer), the LSTM dynamic (int8 LSTM
and linear weights, activations quantized at run time). The per-layer SQNR range comes from the quantize report.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import passes  # noqa: E402
from tests.e2e import digits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "accuracy.md"
CALIBRATION_BATCHES, BATCH = 8, 64


def compiled_accuracy(model, pipeline, x_test, y_test, data=None) -> tuple[float, dict]:
    opt = passes.optimize(model, passes=pipeline, example_inputs=(torch.from_numpy(x_test),), data=data,
                          measure=False)
    sqnr = opt.report.to_dict().get("sqnr_db", {})
    return digits.accuracy(opt, x_test, y_test), sqnr


def sqnr_range(sqnr: dict) -> str:
    return f"{min(sqnr.values()):.0f}-{max(sqnr.values()):.0f} dB" if sqnr else "-"


def main() -> int:
    x_train, x_test, _, y_test = digits.split()
    rows = []
    for name, model, images, train_images in (("CNN", digits.cnn(), x_test[:, None], x_train[:, None]),
                                              ("row LSTM", digits.lstm(), x_test, x_train)):
        fp32 = digits.accuracy(model, images, y_test)
        cells = [f"{fp32:.2f}%"]
        if name == "CNN":
            data = [(torch.from_numpy(train_images[i:i + BATCH]),)
                    for i in range(0, CALIBRATION_BATCHES * BATCH, BATCH)]
            results = {obs: compiled_accuracy(model, ["fold-batch-norm", "fuse-conv-activation",
                                                      f"quantize{{observer={obs}}}", "default"], images, y_test, data)
                       for obs in ("minmax", "percentile", "entropy")}
            cells.append(" / ".join(f"{acc:.2f}%" for acc, _ in results.values()) + " (minmax / percentile / entropy)")
            sqnr = results["minmax"][1]
        else:
            acc, sqnr = compiled_accuracy(model, ["quantize{mode=dynamic}", "default"], images, y_test,
                                          [(torch.from_numpy(images),)])
            cells.append(f"{acc:.2f}% (dynamic)")
        cells.append(sqnr_range(sqnr))
        for dtype in ("bf16", "fp16"):
            acc, _ = compiled_accuracy(model, ["default", f"mixed-precision{{dtype={dtype}}}"], images, y_test)
            cells.append(f"{acc:.2f}%")
        rows.append(f"| digits {name} | " + " | ".join(cells) + " |")
    header = ["| model | fp32 | int8 | int8 per-layer SQNR | bf16 | fp16 |", "|---|---|---|---|---|---|"]
    table = "\n".join(header + rows)
    text = (f"Held-out 30% of scikit-learn's digits ({len(y_test)} images), accuracy through the compiled TVM module "
            f"(`python benchmarks/accuracy_digits.py`).\n\n{table}\n")
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
