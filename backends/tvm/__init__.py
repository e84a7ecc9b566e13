"""Apache TVM backend: IR -> Relax (``lower``) -> executable for llvm/cuda (``build``) -> ``CompiledModule``.

Names resolve lazily: loading a compiled artifact (``backends.tvm.module``) must not import torch, which the
lowering (through the op table) does.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"LOWERINGS": "backends.tvm.lower", "LoweringError": "backends.tvm.lower", "lower": "backends.tvm.lower",
            "CompiledModule": "backends.tvm.module", "InputError": "backends.tvm.module",
            "build": "backends.tvm.module", "cuda_source": "backends.tvm.module",
            "make_target": "backends.tvm.target"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'backends.tvm' has no attribute {name!r}")
