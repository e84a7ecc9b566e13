"""An ``onnx.backend`` Backend over our ONNX frontend and the TVM llvm backend, for ONNX's backend test suite.

ONNX's node tests feed *everything* as graph inputs (weights, shapes, axes, clip bounds). Deployed models carry
those as initializers, and our frontend requires them constant (static shapes, packed weights). So the backend
first imports the model as given; if the import needs constants, it binds every input after the first to the
values of the test run, as initializers, and imports again. Data inputs stay run-time inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.backend.base import Backend, BackendRep

from backends.tvm import build
from frontend.errors import FrontendError
from frontend.onnx import from_onnx


def bind_inputs(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    keep = [i for i in bound.graph.input if i.name not in values]
    del bound.graph.input[:]
    bound.graph.input.extend(keep)
    bound.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in values.items())
    return bound


class PassesRep(BackendRep):
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        self.compiled = None
        self.error: Exception | None = None
        try:
            self.compiled = build(from_onnx(model), "llvm")
        except FrontendError as exc:
            self.error = exc

    def run(self, inputs, **kwargs):
        inputs = [np.asarray(x) for x in inputs]
        compiled, data = self.compiled, inputs
        if compiled is None:  # the import needed constants: bind all but the first input
            bound = bind_inputs(self.model, dict(zip(self.names[1:], inputs[1:])))
            compiled, data = build(from_onnx(bound), "llvm"), inputs[:1]
        return tuple(compiled.run_flat(*data))


class PassesBackend(Backend):
    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs) -> PassesRep:
        super().prepare(model, device, **kwargs)
        return PassesRep(model)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"
