"""The persistent CUDA RNN kernel (``backends/tvm/cuda_rnn.py``): one launch per layer, nvcc-clean, numerics."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from backends.tvm import build, cuda_source
from backends.tvm.cuda_rnn import cuda_recurrent_kernel, fits
from frontend.torch_fx import from_torch
from tests.helpers import assert_nvcc_accepts, assert_outputs_close

pytestmark = [pytest.mark.tvm, pytest.mark.cuda]


class Recurrent(nn.Module):
    """An nn.LSTM/GRU/RNN returning every output, so y, h_n (and c_n) are all checked."""

    def __init__(self, kind: str, hidden: int, layers: int = 2, **kwargs):
        super().__init__()
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](8, hidden, layers, bidirectional=True,
                                                                       **kwargs)

    def forward(self, x):
        return self.rnn(x)


def _build(kind: str, hidden: int, steps: int, **kwargs):
    torch.manual_seed(0)
    model = Recurrent(kind, hidden, **kwargs).eval()
    x = torch.randn(1, steps, 8) if kwargs.get("batch_first") else torch.randn(steps, 2, 8)
    return model, x, build(from_torch(model, (x,)), "cuda")


def _kernels(source: str) -> list[str]:
    return re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", source)


@pytest.mark.parametrize("kind,kwargs", [("lstm", {}), ("gru", {"batch_first": True}),
                                         ("rnn", {"nonlinearity": "relu"})])
def test_one_launch_per_layer_whatever_the_sequence_length(kind, kwargs, tmp_path):
    """The kernel count does not grow with the steps: one recurrent kernel per layer, both directions inside."""
    counts = []
    for steps in (6, 12):
        _, _, compiled = _build(kind, 16, steps, **kwargs)
        source = cuda_source(compiled)
        names = _kernels(source)
        assert len({n for n in names if n.startswith(f"{kind}_")}) == 2, names  # two layers
        counts.append(len(set(names)))
    assert counts[0] == counts[1]
    assert_nvcc_accepts(source, tmp_path)


def test_bilstm_hidden_128_kernel_keeps_weights_in_registers_without_spills(tmp_path):
    """The zoo BiLSTM's layer (G = 512 threads): half of W_hh^T in registers, no local-memory spills."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    import tvm

    from backends.tvm.target import make_target

    func = cuda_recurrent_kernel("lstm", 100, 1, 128, 2).with_attr("global_symbol", "lstm")
    source = tvm.tirx.build(tvm.IRModule({"lstm": func}), target=make_target("cuda")).imports[0].inspect_source()
    assert "__syncthreads()" in source and "wr[63]" in source.replace("_ptr", "")
    (tmp_path / "k.cu").write_text(source)
    result = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-Xptxas", "-v", str(tmp_path / "k.cu"), "-o",
                             str(tmp_path / "k.cubin")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "0 bytes spill stores" in result.stderr and "0 bytes stack frame" in result.stderr, result.stderr


def test_a_layer_wider_than_one_block_is_refused_and_falls_back_to_the_unrolled_graph():
    assert fits("gru", 341) and not fits("lstm", 257)
    with pytest.raises(ValueError, match="lstm with hidden size 300: 4 x 300 gate rows exceed"):
        cuda_recurrent_kernel("lstm", 4, 1, 300, 1)
    torch.manual_seed(0)
    model = nn.LSTM(8, 300).eval()
    names = _kernels(cuda_source(build(from_torch(model, (torch.randn(3, 1, 8),)), "cuda")))
    assert not any(n.startswith("lstm_") for n in names), names


@pytest.mark.parametrize("kind,kwargs", [("lstm", {}), ("gru", {"batch_first": True}), ("rnn", {})])
def test_numerics_match_pytorch_on_a_gpu(kind, kwargs):
    import tvm

    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU here (benchmarks/gpu_check.py checks the zoo's RNNs on one)")
    model, x, compiled = _build(kind, 64, 20, **kwargs)
    with torch.no_grad():
        assert_outputs_close(model(x), compiled(x))


@pytest.mark.parametrize("kind,hidden,steps,batch,directions,nonlinearity", [
    ("lstm", 16, 7, 2, 2, "tanh"), ("gru", 16, 7, 2, 2, "tanh"), ("rnn", 16, 5, 3, 2, "relu"),
    ("rnn", 12, 5, 1, 1, "tanh"), ("lstm", 128, 12, 1, 2, "tanh")])  # 128: weights split registers / L1
def test_generated_cuda_matches_pytorch_on_cpu_threads(kind, hidden, steps, batch, directions, nonlinearity,
                                                       tmp_path):
    """The kernel's CUDA C, run by ``tests/cuda_emulator.py`` (a std::thread per CUDA thread, barriers for
    ``__syncthreads``), against nn.LSTM/GRU/RNN with random h0/c0; outputs poisoned with NaN first."""
    import tvm

    from backends.tvm.recurrent import GATES
    from backends.tvm.target import make_target
    from tests import cuda_emulator

    if not cuda_emulator.available():
        pytest.skip("g++ not installed")
    torch.manual_seed(0)
    extra = {"nonlinearity": nonlinearity} if kind == "rnn" else {}
    model = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](8, hidden, bidirectional=directions == 2,
                                                                  **extra).eval()
    x, h0, c0 = torch.randn(steps, batch, 8), torch.randn(directions, batch, hidden), torch.randn(directions, batch,
                                                                                                  hidden)
    with torch.no_grad():
        y, state = model(x, (h0, c0)) if kind == "lstm" else model(x, h0)
    gates, suffixes = GATES[kind] * hidden, ["_l0", "_l0_reverse"][:directions]
    p = {k: v.numpy() for k, v in model.state_dict().items()}
    b_ih, b_hh = ([p[f"bias_{w}" + s] for s in suffixes] for w in ("ih", "hh"))
    if kind != "gru":
        b_ih, b_hh = [i + h for i, h in zip(b_ih, b_hh)], [np.zeros(gates, np.float32)] * directions
    w_ih = np.concatenate([p["weight_ih" + s] for s in suffixes])
    xp = x.numpy().reshape(-1, 8) @ w_ih.T + np.concatenate(b_ih)
    poison = lambda *shape: np.full(shape, np.nan, np.float32)  # noqa: E731
    arrays = {"xp": np.ascontiguousarray(xp.reshape(steps, batch, -1), np.float32),
              "w": np.ascontiguousarray(np.stack([p["weight_hh" + s].T for s in suffixes]), np.float32),
              "b_hh": np.ascontiguousarray(np.tile(np.concatenate(b_hh), (1, batch, 1)), np.float32),
              "h0": h0.numpy(), "c0": c0.numpy(), "y": poison(steps, batch, directions * hidden),
              "h_n": poison(directions, batch, hidden), "c_n": poison(directions, batch, hidden)}
    func = cuda_recurrent_kernel(kind, steps, batch, hidden, directions, nonlinearity).with_attr("global_symbol", "k")
    source = tvm.tirx.build(tvm.IRModule({"k": func}), target=make_target("cuda")).imports[0].inspect_source()
    cuda_emulator.emulate(source, arrays, directions * batch, gates, tmp_path)
    expected = (y, state[0], state[1]) if kind == "lstm" else (y, state)
    assert_outputs_close(expected, tuple(arrays[k] for k in ("y", "h_n", "c_n")[:len(expected)]))
