"""mixed-precision: run the model body in bfloat16 or float16, accumulating in float32.

Every float32 value and param of the graph body becomes ``dtype`` (half the bytes stored and moved). Convs and dense
layers still multiply-accumulate in fp32: our kernels widen each operand before the FMA (``backends/tvm/kernels.py``)
as PyTorch's CPU kernels do, so a layer's error is about one rounding of its output: relative 2^-9 for bf16 (8-bit
mantissa, fp32's range), 2^-12 for fp16 (11-bit mantissa, but values beyond +-65504 overflow — bf16 is the CPU
choice, fp16 the usual GPU one).

Biases of conv2d / conv2d_pool / linear stay float32 (``FLOAT32_BIAS``): the kernels add them to the fp32
accumulator, so they cost nothing in bytes moved, and a rounded bias is an error per channel that no later sum averages
out. After ``fold-batch-norm`` the bias carries the batch norm's shift ``beta - mean * gamma / sigma``, often far larger
than the conv's own output; rounded to bf16 it was off by up to 2^-9 of that shift in every pixel of the channel, and a
global pool feeding a ``Linear(.., 1)`` summed those offsets (fuzz seed 4112: median error 9.8e-4 with the bias
rounded, 4.1e-4 with it float32, PyTorch's own bf16 model 4.8e-4).

Kept in float32 (option ``keep``; counted as ``skipped.kept_fp32``): softmax/log_softmax and exp (exp of large
logits), mean/sum (long accumulations), batch_norm (``fold-batch-norm`` first folds it into the conv), lstm/gru/rnn
(the recurrent state feeds back for hundreds of steps), lrn, sqrt, erf. The model's signature stays float32: casts are
inserted after inputs, before outputs, and wherever a low-precision producer meets a float32 consumer (or the
reverse); one cast per value and direction. Integer tensors are untouched; quantize/dequantize keep their types.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from passes.core.pass_base import Decisions, Pass, PassContext, PassError, PassResult
from passes.ir.graph import Graph, Value
from passes.ir.ops import get_op

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}
KEEP_FP32 = ("softmax", "log_softmax", "exp", "mean", "sum", "batch_norm", "lstm", "gru", "rnn", "lrn", "sqrt",
             "erf", "qlstm_dynamic", "qgru_dynamic", "qrnn_dynamic")
NEVER = ("input", "constant", "cast", "quantize", "dequantize")
FLOAT32_BIAS = ("conv2d", "conv2d_pool", "linear")


def _low_array(value: np.ndarray, dtype: str) -> np.ndarray:
    import ml_dtypes  # numpy's own float16, ml_dtypes' bfloat16

    return np.asarray(value).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)


@dataclass(frozen=True)
class MixedPrecision(Pass):
    name = "mixed-precision"
    summary = "bfloat16/float16 values and weights, fp32 accumulation; precision-sensitive ops stay fp32"
    lossy = True
    dtype: str = "bf16"
    keep: tuple[str, ...] = KEEP_FP32

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise PassError(f"mixed-precision: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("converted", "casts"))
        low = DTYPES[self.dtype]
        order = graph.topo_order()
        lowered = set()
        for node in order:
            data = graph.nodes[node]
            if data["op"] in NEVER or not any(t.dtype in ("float32", low) for t in data["out_types"]):
                continue
            if data["op"] in self.keep:
                decide.skip(node, "kept_fp32", f"{data['op']} stays float32")
                continue
            lowered.add(node)
        casts: dict[tuple[Value, str], Value] = {}

        def cast(value: Value, dtype: str) -> Value:
            if (value, dtype) not in casts:
                name = f"{value.node}_to_{'f32' if dtype == 'float32' else self.dtype}"
                casts[value, dtype] = graph.add_op("cast", [value], attrs={"dtype": dtype},
                                                   origin=graph.nodes[value.node]["origin"], name=name)
                decide.done(value.node, "casts", f"to {dtype}")
            return casts[value, dtype]

        for node in order:
            data = graph.nodes[node]
            if data["op"] == "constant" and data["out_types"][0].dtype == "float32" and graph.users(Value(node)) \
                    and all(user in lowered for user, _ in graph.users(Value(node))):
                data["params"]["value"] = _low_array(data["params"]["value"], low)
                data["out_types"] = [type(data["out_types"][0])(data["out_types"][0].shape, low)]
                continue
            if data["op"] in ("input", "constant"):
                continue
            wanted = low if node in lowered else "float32"
            operands = graph.operands(node)
            retyped = [cast(v, wanted) if graph.value_type(v).dtype in ("float32", low)
                       and graph.value_type(v).dtype != wanted and data["op"] not in NEVER else v for v in operands]
            if retyped != operands:
                graph.set_operands(node, retyped)
            if node in lowered and any(t.dtype == "float32" for t in data["out_types"]):
                for key, value in data["params"].items():
                    if np.asarray(value).dtype == np.float32 and not (key == "bias" and data["op"] in FLOAT32_BIAS):
                        data["params"][key] = _low_array(value, low)
                decide.done(node, "converted", f"{data['op']} in {low}")
            in_types = [graph.value_type(v) for v in graph.operands(node)]
            data["out_types"] = list(get_op(data["op"]).infer(in_types, data["attrs"], data["params"],
                                                               graph.describe(node)))
        self._outputs_stay_fp32(graph, low, cast)
        return decide.result()

    @staticmethod
    def _outputs_stay_fp32(graph: Graph, low: str, cast) -> None:
        for value in graph.output_values():
            if graph.value_type(value).dtype == low:
                graph.replace_output(value, cast(value, "float32"))
