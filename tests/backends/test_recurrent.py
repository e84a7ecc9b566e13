"""The CPU recurrent layer kernel (``backends/tvm/recurrent.py``): the input projection and the whole time loop in
one kernel per layer, weights packed in read order, a lone direction's units split over the cores.

Structure: the part rule, the packed layouts (index by index), the split kernel's single parallel region with a
barrier per step. Numerics: LSTM/GRU/RNN against PyTorch (layers 1-3, bidirectional, batch_first, no bias, hidden
1/7/128/256, sequence lengths 1 and odd, batch 1 and 3, initial states), split (a two-core target, whatever this
machine has) and not, and the split kernel run on one thread and on two. Negative: sizes that are not split.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from backends.tvm.module import build
from backends.tvm.recurrent import float_block, pack_float_weights, parts_for, recurrent_kernel
from backends.tvm.target import resolve_target
from frontend.torch_fx import from_torch
from tests.helpers import assert_outputs_close

pytestmark = pytest.mark.tvm

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class WithState(nn.Module):
    """An RNN taking its initial state and returning every output (y, h_n and c_n are all checked)."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, *state):
        return self.rnn(x, state if len(state) > 1 else state[0])


def check_against_torch(kind: str, hidden: int, steps: int, batch: int, threads: tuple = (None,), **kwargs):
    """Seeded model and inputs (initial states included), built for a two-core llvm target, vs PyTorch, run on
    each of ``threads`` (None: every physical core)."""
    torch.manual_seed(0)
    rnn = CELLS[kind](12, hidden, **kwargs)
    model = WithState(rnn).eval()
    generator = torch.Generator().manual_seed(1)
    shape = (batch, steps, 12) if rnn.batch_first else (steps, batch, 12)
    x = torch.randn(*shape, generator=generator)
    state_shape = (rnn.num_layers * (2 if rnn.bidirectional else 1), batch, hidden)
    states = [torch.randn(*state_shape, generator=generator) * 0.5 for _ in range(2 if kind == "lstm" else 1)]
    compiled = build(from_torch(model, (x, *states)), resolve_target("llvm", cores=2))
    with torch.no_grad():
        expected = model(x, *states)
    for count in threads:
        compiled.threads = count
        assert_outputs_close(expected, compiled(x, *states))


def test_part_rule():
    assert parts_for(256, 1, 2, lanes=8) == 2  # the benchmark's LSTM 2x256 on two cores
    assert parts_for(128, 1, 2, lanes=8) == 2  # 64 units a part: the smallest split
    assert parts_for(256, 2, 2, lanes=8) == 1  # two directions: a core each already
    assert parts_for(256, 1, 1, lanes=8) == 1  # one core
    assert parts_for(192, 1, 4, lanes=16) == 3  # the most parts of >= 64 units, whole vectors, dividing H


@pytest.mark.parametrize("hidden, directions, cores", [(96, 1, 2), (7, 1, 2), (130, 1, 2), (256, 2, 2)],
                         ids=["too_few_units", "tiny", "odd_half", "bidirectional"])
def test_layers_not_worth_splitting_keep_one_part(hidden, directions, cores):
    """48 units a part would cost a barrier per step for little work; 65 is not whole vectors; two directions
    already fill two cores."""
    assert parts_for(hidden, directions, cores, lanes=8) == 1


def test_kernel_refuses_parts_that_do_not_divide_the_hidden_size():
    with pytest.raises(ValueError, match="hidden size 130 does not split into 4 parts"):
        recurrent_kernel("lstm", 3, 1, 8, 130, 1, lanes=8, parts=4)


@pytest.mark.parametrize("kind, parts", [("lstm", 2), ("gru", 1), ("rnn", 2)])
def test_packed_weights_are_blocks_of_each_parts_gate_rows_in_read_order(kind, parts):
    """packed[d, p, blk, k, g] = W[d][row, k] with row = q H + p HP + u for the blk-th block of GB of part p's
    (gate q, unit u) rows, gate-major."""
    hidden, inputs, lanes = 128, 5, 8
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((gates * hidden, inputs)).astype(np.float32) for _ in range(2)]
    packed = pack_float_weights(kind, weights, parts, lanes)
    block, units = float_block(kind, hidden, parts, lanes), hidden // parts
    assert packed.shape == (2, parts, gates * units // block, inputs, block)
    blocks = packed.shape[2]
    for d, p, blk, k, g in [(0, 0, 0, 0, 0), (1, parts - 1, blocks // 2, 4, block - 1), (1, 0, blocks - 1, 2, 3)]:
        local = blk * block + g  # part p's row, gate-major: (q, u)
        row = local // units * hidden + p * units + local % units
        assert packed[d, p, blk, k, g] == weights[d][row, k]


def test_split_kernel_is_one_parallel_region_with_a_barrier_per_step():
    """Split: one launch point around the whole sequence, the parallel tasks inside the step loop ended by a
    barrier (no fork/join per step). Not split: the directions' loop is parallel outside the time loop."""
    split = recurrent_kernel("lstm", 4, 1, 16, 256, 1, lanes=8, parts=2).script()
    assert split.count("pragma_parallel_launch_point") == 1
    assert split.index("pragma_parallel_launch_point") < split.index("for step in range(4)") < split.rindex(
        "pragma_parallel_barrier_when_finish") < split.rindex("T.parallel(2)")
    whole = recurrent_kernel("lstm", 4, 1, 16, 256, 2, lanes=8).script()
    assert "pragma_parallel" not in whole
    assert whole.index("T.parallel(2)") < whole.index("for step in range(4)")


@pytest.mark.parametrize("kind, hidden, steps, batch, kwargs", [
    ("gru", 128, 7, 3, {"batch_first": True}),                              # split, GRU's b_hh and n gate
    ("rnn", 128, 1, 3, {"num_layers": 3, "nonlinearity": "relu", "bias": False}),  # split, one step, no bias
    ("lstm", 7, 5, 3, {"num_layers": 2, "bidirectional": True, "bias": False, "batch_first": True}),
    ("gru", 1, 3, 1, {"bidirectional": True}),
    ("rnn", 128, 5, 1, {"bidirectional": True}),
], ids=["gru128_split", "rnn_relu_split_3layers_1step", "bilstm7_nobias", "bigru1", "birnn128"])
def test_recurrent_kernel_matches_pytorch(kind, hidden, steps, batch, kwargs):
    check_against_torch(kind, hidden, steps, batch, **kwargs)


def test_split_kernel_is_right_on_any_thread_count():
    """The benchmark's layers (2 x 256, split in two): one thread runs both parts of every step in turn; two meet
    at the barrier after each step (a missing or misplaced barrier reads a half-written h)."""
    check_against_torch("lstm", 256, 9, 1, threads=(1, 2, None), num_layers=2)
