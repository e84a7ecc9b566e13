"""The IR's leaf types: ``TensorType`` (static shape and dtype) and ``IRError``.

Why a module of their own: ``graph.py`` (the graph) and ``ops.py`` (the op table) both need them, and neither may
import the other at load time (``graph.py`` needs no torch; ``ops.py`` is torch semantics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class IRError(ValueError):
    """A malformed graph or a bad op application; the message names the node and its origin."""


@dataclass(frozen=True)
class TensorType:
    """Static shape and dtype of one tensor (dtype as a numpy-style name: ``float32``, ``int64``, ``int8``)."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
                 "int8": "i8", "uint8": "u8", "bool": "bool", "float64": "f64"}.get(self.dtype, self.dtype)
        return f"{short}[{','.join(map(str, self.shape))}]"
