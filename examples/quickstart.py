"""Quick start: optimize and compile the bundled ResNet-style model end to end, then print the report.

    python examples/quickstart.py [zoo-name] [--target llvm|cuda]

The report shows what each pass did, FLOPs and params before/after, the worst error of the compiled model
against PyTorch on a seeded input, and the compiled latency next to PyTorch eager (medians, same run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import passes  # noqa: E402
from examples import zoo  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet", choices=sorted(zoo.ZOO))
    parser.add_argument("--target", default="llvm", choices=["llvm", "cuda"])
    args = parser.parse_args()

    model, example_inputs = zoo.make(args.model, seed=0)
    opt = passes.optimize(model, target=args.target, example_inputs=example_inputs)
    print(opt.report.summary())
    accuracy = opt.report.accuracy
    if accuracy:
        ok = accuracy["max_rel_error"] < 1e-4
        print(f"accuracy check vs PyTorch: {'PASS' if ok else 'FAIL'} "
              f"(max relative error {accuracy['max_rel_error']:.2e}, budget 1e-4)")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
