"""passes: a compiler-style optimizer for PyTorch and ONNX CNNs and RNNs, lowering to Apache TVM.

Public names: ``optimize``, ``load``, ``Pass``, ``PassResult``, ``register_pass``, ``Pattern``, ``Tune``.
Imported lazily so that ``passes.load(...)`` of a compiled artifact needs only numpy, networkx and TVM.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "optimize": "passes.api", "load": "passes.api", "Tune": "passes.api", "OptimizedModel": "passes.api",
    "Pass": "passes.core.pass_base", "PassResult": "passes.core.pass_base", "PassContext": "passes.core.pass_base",
    "register_pass": "passes.core.registry", "Pattern": "passes.core.pattern",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'passes' has no attribute {name!r}")
