"""ONNX's own backend test suite (``onnx.backend.test``) over our frontend + TVM llvm, for every declared op.

Included: the node tests of every ONNX op our frontend declares. Excluded: the cases below, one reason each.
"""

from __future__ import annotations

import onnx.backend.test
import pytest

from tests.conformance.backend import PassesBackend

DECLARED_OPS = [
    "conv", "convtranspose", "batchnorm", "gemm", "matmul", "relu", "clip", "leakyrelu", "elu", "sigmoid", "tanh",
    "hardsigmoid", "hardswish", "softmax", "logsoftmax", "maxpool", "averagepool", "globalaveragepool",
    "globalmaxpool", "flatten", "reshape", "transpose", "concat", "split", "slice", "squeeze", "unsqueeze", "shape",
    "gather", "constant", "constantofshape", "identity", "dropout", "pad", "add", "sub", "mul", "div", "sum", "mean",
    "max", "min", "reduce_mean", "reduce_sum", "lrn", "lstm", "gru", "rnn", "simple_rnn", "exp", "sqrt", "neg",
    "abs", "erf", "expand", "quantizelinear", "dequantizelinear", "qlinearconv", "qlinearmatmul",
    "convinteger", "matmulinteger",
]

EXCLUDED = {
    r"_expanded": "function-expanded variants are built from ops outside our set (Where, CastLike, Greater...)",
    r"_(int16|uint16|uint32|uint64)_": "16-bit and unsigned 32/64-bit integer tensors are not IR dtypes",
    r"test_div_(u?int8|int32_trunc)_": "integer Div truncates; the IR's div is true division",
    r"test_clip_default_int8_": "integer Clip",
    r"_3d": "3-d convolution and pooling (the op set has 1-d and 2-d)",
    r"_(blocked|e4m3fn|e5m2|float4e2m1|int2|uint2|int4|uint4)": "blocked quantization and float8/float4/2-bit/4-bit "
                                                                "types are not IR dtypes",
    r"test_averagepool_2d_dilations_": "dilated average pooling (no torch equivalent)",
    r"training_mode": "training-mode BatchNormalization",
    r"test_constant_pad_(negative_)?axes_": "Pad's axes input",
    r"test_constantofshape_": "a shape given at run time",
    r"test_convtranspose_(autopad_same|kernel_shape|output_shape)_": "ConvTranspose output_shape / auto_pad",
    r"test_gather_elements": "GatherElements is a different op (not declared)",
    r"test_gru_": "ONNX GRU defaults to linear_before_reset=0; torch GRU semantics need 1 (refused with a message)",
    r"test_identity_(opt|sequence)_": "optional and sequence types",
    r"test_(lstm|simple_rnn)_reverse_": "direction='reverse' alone",
    r"test_lstm_with_peepholes_": "LSTM peepholes",
    r"test_maxpool_with_argmax": "MaxPool's Indices output",
    r"test_reduce_sum_square": "ReduceSumSquare is a different op (not declared)",
    r"(empty_set|zero_size|allowzero_reordered)": "zero-sized or dynamic shapes",
    r"test_slice_neg_steps_": "negative slice steps",
    r"test_split_to_sequence": "SplitToSequence (sequence type)",
    r"test_softmax_(lastdim|functional_dim3)_": "opset 6 models (supported: opset 9 and newer)",
}

INCLUDE = r"^test_(" + "|".join(DECLARED_OPS) + r")(_.*)?_cpu$"
backend_test = onnx.backend.test.BackendTest(PassesBackend, __name__)
backend_test.include(INCLUDE)
for pattern in EXCLUDED:
    backend_test.exclude(pattern)

for name, case in backend_test.test_cases.items():
    globals()[name] = pytest.mark.tvm(pytest.mark.conformance(case))
