"""TVM backend: every op has a lowering, and every frontend case compiles for llvm and matches PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.tvm import LOWERINGS, InputError, build
from frontend.torch_fx import from_torch
from passes.ir.graph import Graph, TensorType
from passes.ir.ops import OPS
from tests.cases import CASES, Fn
from tests.helpers import assert_outputs_close, structure_of

pytestmark = pytest.mark.tvm


def test_every_op_has_a_lowering():
    missing = sorted(set(OPS) - set(LOWERINGS) - {"input"})
    assert not missing, f"ops without a TVM lowering: {missing}"
    assert not set(LOWERINGS) - set(OPS), "lowerings for ops the op table does not define"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_compiles_for_llvm_and_matches_pytorch(case):
    model = case.make().eval()
    xs = case.example_inputs()
    compiled = build(from_torch(model, xs), "llvm")
    with torch.no_grad():
        expected = model(*xs)
    actual = compiled(*xs)
    assert structure_of(actual) == structure_of(expected)
    assert_outputs_close(expected, actual)


def test_numpy_in_numpy_out_and_torch_in_torch_out():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(2, 4)
    compiled = build(from_torch(model, (x,)), "llvm")
    out_np = compiled(x.numpy())
    out_torch = compiled(x)
    assert isinstance(out_np, np.ndarray) and isinstance(out_torch, torch.Tensor)
    np.testing.assert_array_equal(out_np, out_torch.numpy())


def test_reused_input_buffers_never_leak_one_call_into_the_next():
    """Inputs are copied into device tensors kept from call to call: every call (also from several threads at
    once, also an identity model whose output is its input buffer) must see only its own inputs."""
    import concurrent.futures

    model = Fn(lambda s, x, y: (s.lin(x) * y.sum(), x), lin=torch.nn.Linear(4, 3)).eval()
    compiled = build(from_torch(model, (torch.randn(2, 4), torch.randn(5))), "llvm")
    generator = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(2, 4, generator=generator), torch.randn(5, generator=generator)) for _ in range(8)]
    with torch.no_grad():
        expected = [model(*xs) for xs in inputs]
    first = compiled(*inputs[0])
    compiled(*inputs[1])
    assert_outputs_close(expected[0], first)  # a returned result is not overwritten by the next call
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda xs: compiled(*xs), inputs * 4))
    for got, want in zip(results, expected * 4):
        assert_outputs_close(want, got)


def test_wrong_input_shape_count_and_dtype_give_clear_errors():
    model = Fn(lambda s, a, b: a * b)
    compiled = build(from_torch(model, (torch.randn(2, 3), torch.randn(2, 3))), "llvm")
    with pytest.raises(InputError, match=r"input 'y': expected shape \[2, 3\], got \[3, 3\]"):
        compiled(torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(InputError, match=r"takes 2 input\(s\) \(x: float32\[2, 3\], y: float32\[2, 3\]\), got 1"):
        compiled(torch.randn(2, 3))
    with pytest.raises(InputError, match="expected dtype float32, got complex64"):
        compiled(np.ones((2, 3), np.complex64), np.ones((2, 3), np.float32))


def test_a_bfloat16_torch_input_runs_as_its_float32_value():
    """numpy has no bfloat16: a bf16 tensor is widened (exactly) before the usual dtype check."""
    model = Fn(lambda s, a, b: a * b)
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    compiled = build(from_torch(model, (a, b)), "llvm")
    low = a.to(torch.bfloat16)
    torch.testing.assert_close(compiled(low, b), low.float() * b, rtol=0, atol=0)


def test_export_and_load_round_trip(tmp_path):
    model = torch.nn.GRU(3, 4, batch_first=True).eval()
    x = torch.randn(1, 5, 3)
    compiled = build(from_torch(model, (x,)), "llvm")
    compiled.export(tmp_path / "m")
    loaded = type(compiled).load(tmp_path / "m")
    for a, b in zip(compiled(x), loaded(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_lowering_refusal_names_the_node():
    g = Graph(name="uneven")
    x = g.add_input("x", TensorType((1, 2, 7, 7)))
    g.set_outputs(g.add_op("adaptive_max_pool2d", [x], attrs={"output_size": (3, 3)}, origin=("head.pool",)))
    with pytest.raises(Exception, match=r"adaptive_max_pool2d.*head\.pool.*uneven windows"):
        build(g, "llvm")


def test_inputs_are_cast_and_gathered_and_outputs_are_the_callers_own():
    """The CPU path copies inputs through numpy views of the device buffers (``np.copyto``: a strided float64 input
    is cast and gathered in one pass) and outputs out of numpy views: what a caller gets is its own writable copy,
    also when the output is a constant of the model or its input buffer."""
    model = Fn(lambda s, x: (x * 2, s.lin.bias + 0, x), lin=torch.nn.Linear(3, 3)).eval()
    x = torch.randn(3, 3)
    compiled = build(from_torch(model, (x,)), "llvm")
    strided = np.asfortranarray(x.numpy().astype(np.float64))
    for got, want in zip(compiled(strided), model(x)):
        np.testing.assert_array_equal(got, want.detach().numpy())
    first = compiled(x.numpy())
    assert all(a.flags.writeable and a.flags.owndata for a in first)
    for a in first:
        a[...] = 7
    for got, want in zip(compiled(x.numpy()), model(x)):
        np.testing.assert_array_equal(got, want.detach().numpy())


def test_aligned_inputs_are_read_in_place_and_left_as_they_were():
    """A C-contiguous input of the model's dtype at a 64-byte boundary (torch allocates so) is handed to TVM as is,
    no copy into the module's buffers (~1% of mobilenet_v2's call); an unaligned one is still copied. Both give the
    same outputs, and the caller's array is not written."""
    model = Fn(lambda s, x: (torch.relu(s.conv(x)), x), conv=torch.nn.Conv2d(3, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    compiled = build(from_torch(model, (x,)), "llvm")
    assert x.data_ptr() % 64 == 0
    before = x.clone()
    in_place = compiled(x)
    assert compiled._input_buffers is None and torch.equal(x, before)
    assert not np.shares_memory(in_place[1].numpy(), x.numpy())  # the identity output is the caller's own copy

    def placed(offset: int, writeable: bool = True) -> np.ndarray:  # x's values, ``offset`` floats past 64 bytes
        storage = np.empty(x.numel() + 32, np.float32)
        start = (-storage.ctypes.data % 64) // 4 + offset
        array = storage[start:start + x.numel()].reshape(x.shape)
        array[...] = x.numpy()
        array.flags.writeable = writeable
        return array

    for array in (placed(1), placed(0, writeable=False)):  # unaligned; read-only (numpy exports no such DLPack)
        copied = compiled(array)
        assert compiled._input_buffers is not None
        for a, b in zip(in_place, copied):
            np.testing.assert_array_equal(a.numpy(), b)
    assert placed(0).ctypes.data % 64 == 0


def test_torch_inputs_tvm_can_read_skip_numpy_and_the_others_are_copied():
    """A torch CPU tensor of the model's dtype and shape, contiguous, 64-byte aligned and without autograd history
    goes to TVM through DLPack directly (``_torch_in_place``); one that requires grad, a transposed view, an
    unaligned view or float64 takes the copying path. All give the model's outputs, as torch tensors."""
    from backends.tvm.module import _torch_in_place

    model = Fn(lambda s, x: torch.relu(s.conv(x)), conv=torch.nn.Conv2d(3, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    compiled = build(from_torch(model, (x,)), "llvm")
    spec = compiled.inputs[0]
    with torch.no_grad():
        want = model(x)
    storage = torch.empty(x.numel() + 16)
    unaligned = storage[1:1 + x.numel()].view(x.shape)
    unaligned.copy_(x)
    others = [x.clone().requires_grad_(), x.transpose(2, 3).contiguous().transpose(2, 3), unaligned, x.double()]
    assert _torch_in_place(x, spec) and not any(_torch_in_place(t, spec) for t in others)
    assert not _torch_in_place(x.numpy(), spec) and not _torch_in_place(torch.randn(1, 3, 16, 15), spec)
    for t in (x, *others):
        got = compiled(t)
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert compiled._input_buffers is not None  # the others were copied
