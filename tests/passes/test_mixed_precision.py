"""mixed-precision: structure (casts only at the fp32 borders), numerics within bf16/fp16 rounding, kept ops,
refusals, compiled kernels that store bf16 and accumulate fp32, and artifacts that save and load.

Accuracy on real data is in tests/e2e/test_mixed_precision_digits.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import passes
from examples import zoo
from frontend.torch_fx import from_torch
from passes.core.pass_base import PassError
from passes.ir.interpret import run_reference
from passes.transforms.mixed_precision import MixedPrecision
from tests.helpers import assert_nvcc_accepts, assert_outputs_close
from tests.passes.helpers import assert_graph_text, run_pass

torch.manual_seed(0)
MODEL = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5),
                      nn.Softmax(1)).eval()
X = (torch.randn(2, 3, 8, 8),)
# one rounding to the low dtype per layer, fp32 accumulation: a few units of its epsilon relative to the output
TOLERANCE = {"bf16": dict(rtol=3e-2, atol=3e-2), "fp16": dict(rtol=4e-3, atol=4e-3)}


def test_structure_casts_only_at_fp32_borders():
    graph = from_torch(MODEL, X)
    stats = run_pass(MixedPrecision(), graph).stats
    assert stats == {"converted": 5, "casts": 2, "skipped.kept_fp32": 1}
    assert_graph_text(graph, """
graph Sequential(%input_1: f32[2,3,8,8]) {
  %input_1_to_bf16 = cast(%input_1) {dtype='bfloat16'} -> bf16[2,3,8,8]
  %n0 = conv2d(%input_1_to_bf16) {activation='none', activation_params=(), dilation=(1, 1), groups=1, padding=(0, 0), stride=(1, 1)} [bias: f32[4], weight: bf16[4,3,3,3]] -> bf16[2,4,6,6]
  %n1 = relu(%n0) -> bf16[2,4,6,6]
  %n2 = max_pool2d(%n1) {ceil_mode=False, dilation=(1, 1), kernel_size=(2, 2), padding=(0, 0), stride=(2, 2)} -> bf16[2,4,3,3]
  %n3 = flatten(%n2) {end_dim=3, start_dim=1} -> bf16[2,36]
  %n4 = linear(%n3) {activation='none', activation_params=()} [bias: f32[5], weight: bf16[5,36]] -> bf16[2,5]
  %n4_to_f32 = cast(%n4) {dtype='float32'} -> f32[2,5]
  %n5 = softmax(%n4_to_f32) {dim=1} -> f32[2,5]
  return %n5
}""")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "bilstm", "gru_seq2seq"])
def test_numerics_within_low_precision_rounding(name, dtype):
    model, inputs = zoo.make(name)
    graph = from_torch(model, inputs)
    run_pass(MixedPrecision(dtype=dtype), graph)
    with torch.no_grad():
        assert_outputs_close(model(*inputs), run_reference(graph, inputs), **TOLERANCE[dtype])
    assert all(graph.value_type(v).dtype == "float32" for v in graph.output_values())


def test_kept_ops_and_integer_tensors_stay():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LSTM(8, 6, batch_first=True)).eval()
    graph = from_torch(model, (torch.randint(0, 10, (1, 5)),))
    stats = run_pass(MixedPrecision(), graph).stats
    assert stats == {"converted": 1, "casts": 1, "skipped.kept_fp32": 1}
    assert graph.input_types()[0].dtype == "int64"
    assert graph.nodes["n0"]["params"]["weight"].dtype.name == "bfloat16"
    assert graph.nodes["n1"]["params"]["weight_ih_l0"].dtype == np.float32


def test_options_are_checked_and_keep_is_configurable():
    with pytest.raises(PassError, match="mixed-precision: dtype"):
        MixedPrecision(dtype="int8")
    graph = from_torch(MODEL, X)
    # the linear stays fp32 (two casts around it), the softmax is no longer kept (converted, cast back at the end)
    assert run_pass(MixedPrecision(keep=("linear",)), graph).stats == {"converted": 5, "casts": 4,
                                                                      "skipped.kept_fp32": 1}


def test_idempotent():
    graph = from_torch(MODEL, X)
    run_pass(MixedPrecision(), graph)
    again = run_pass(MixedPrecision(), graph)
    assert again.stats == {"converted": 0, "casts": 0, "skipped.kept_fp32": 1}


@pytest.mark.tvm
def test_biases_stay_float32_so_a_folded_batch_norm_shift_is_not_rounded():
    """A conv whose output sits near 50 and a batch norm that centres it: the folded bias is -50.125, halfway between
    two bf16 values (ulp 0.25), while the layer's output is O(1). Rounded to bf16, that bias is 0.125 off in every
    pixel of the channel and the global pool keeps it (the two channels' biases round to -50.25 and -50.0 here);
    kept float32, only the O(1) outputs are rounded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(2, 1)).eval()
    x = 1 + 0.1 * torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        model[0].weight.fill_(1.859375)  # exact in bf16: 27 taps x ~1 = ~50 per pixel
        model[1].running_mean.copy_(model[0].bias + 50.125 * torch.sqrt(1 + torch.tensor(model[1].eps)))
        model[4].weight.copy_(torch.tensor([[1.0, -1.0]]))  # the channels' equal pixels cancel, their biases do not
        reference = model(x)
    opt = passes.optimize(model, passes=["default", "mixed-precision"], example_inputs=(x,), measure=False)
    conv = next(n for n in opt.graph.nodes if opt.graph.nodes[n]["op"] == "conv2d")
    bias = opt.graph.nodes[conv]["params"]["bias"]
    assert bias.dtype == np.float32
    np.testing.assert_allclose(bias, -50.125, rtol=1e-6)
    rounded = opt.graph.copy()
    rounded.nodes[conv]["params"]["bias"] = bias.astype(opt.graph.nodes[conv]["params"]["weight"].dtype)
    error_rounded = float((run_reference(rounded, (x,)).float() - reference).abs().max())
    ours = float((opt(x) - reference).abs().max())
    assert error_rounded > 0.2 and ours <= 2.0 ** -8, (ours, error_rounded)  # one bf16 ulp of the output (~0.5)


@pytest.mark.tvm
def test_conv_kernel_stores_bf16_and_accumulates_fp32():
    from backends.tvm.kernels import ConvSpec, conv_kernel

    spec = ConvSpec(in_shape=(1, 8, 16, 16), weight_shape=(16, 8, 3, 3), stride=(1, 1), padding=(1, 1),
                    dilation=(1, 1), groups=1, has_bias=True, activation="relu", dtype="bfloat16")
    text = conv_kernel(spec, "llvm").script()
    assert 'T.Buffer((1, 8, 16, 16), "bfloat16")' in text and 'T.Buffer((1, 16, 16, 16), "bfloat16")' in text
    assert 'pad = T.sblock_alloc_buffer((1, 1, 18, 18, 8), "bfloat16")' in text  # packed NCHW[8]c, bf16
    assert 'conv_local = T.sblock_alloc_buffer((1, 1, 16, 16, 16), scope="local")' in text  # fp32 accumulator tile
    assert 'T.Cast("float32", pad[' in text and 'T.Cast("float32", weight[' in text  # widened before the FMA
    assert 'T.Cast("bfloat16", T.max(conv_local[' in text  # one rounding, after bias and activation


@pytest.mark.tvm
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_compiled_matches_the_interpreter_and_the_artifact_round_trips(dtype, tmp_path):
    model, inputs = zoo.make("resnet")
    opt = passes.optimize(model, passes=["default", f"mixed-precision{{dtype={dtype}}}"], example_inputs=inputs,
                          measure=False)
    compiled = opt(*inputs)
    assert_outputs_close(run_reference(opt.graph, inputs).float(), compiled, **TOLERANCE[dtype])
    with torch.no_grad():
        assert_outputs_close(model(*inputs), compiled, **TOLERANCE[dtype])
    opt.save(tmp_path / "art")
    np.testing.assert_array_equal(passes.load(tmp_path / "art")(inputs[0].numpy()), compiled.numpy())
    manifest = (tmp_path / "art" / "artifact.json").read_text()
    assert ("not exported" in manifest) == (dtype == "bf16")  # ONNX types bf16 only for casts


@pytest.mark.cuda
def test_fp16_builds_for_cuda_and_nvcc_accepts_it(tmp_path):
    from backends.tvm.module import build, cuda_source
    from passes.core.pass_base import PassContext
    from passes.core.pipeline import Pipeline, resolve

    model, inputs = zoo.make("vgg")
    graph = from_torch(model, inputs)
    spec = "default,fuse-conv-pool{on_cuda=true},mixed-precision{dtype=fp16}"
    Pipeline(resolve(spec)).run(graph, PassContext(target="cuda"))
    source = cuda_source(build(graph, "cuda"))
    assert "half" in source and "conv2d_pool_" in source
    assert_nvcc_accepts(source, tmp_path)
