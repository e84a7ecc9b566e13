"""The CPU recurrent kernel (``backends/tvm/recurrent.py``): a lone direction split over the cores by hidden units.

Structure: the part rule and the part-major gate order. Numerics: LSTM/GRU/RNN with the split (forced by a
two-core target, whatever this machine has) against PyTorch, with initial states, batch 2 and two layers, so every
offset of the double-buffered h, the per-part c and the reordered weights and biases is exercised. Negative: two
directions and small hidden sizes are not split.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backends.tvm.module import build
from backends.tvm.recurrent import GATES, part_major_rows, parts_for, recurrent_kernel
from backends.tvm.target import resolve_target
from frontend.torch_fx import from_torch
from tests.helpers import assert_outputs_close

pytestmark = pytest.mark.tvm


class WithState(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, *state):
        return self.rnn(x, state if len(state) > 1 else state[0])


def test_part_rule():
    assert parts_for(256, 1, 2) == 2  # the benchmark's LSTM 2x256 on two cores
    assert parts_for(256, 2, 2) == 1  # two directions: one core each already
    assert parts_for(96, 1, 2) == 1   # 48 units per part: a per-step launch would cost more than it saves
    assert parts_for(192, 1, 4) == 3  # the most parts of >= 64 units that divide the hidden size
    assert parts_for(256, 1, 1) == 1


def test_part_major_rows_group_each_parts_units_of_every_gate():
    rows = part_major_rows("lstm", 4, 2)  # gates i f g o of 4 units each; part 0 holds units 0-1, part 1 units 2-3
    assert rows.tolist() == [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]
    assert sorted(part_major_rows("gru", 192, 3).tolist()) == list(range(GATES["gru"] * 192))


@pytest.mark.parametrize("cell, kwargs",
                         [(nn.LSTM, {}), (nn.GRU, {}), (nn.RNN, {}), (nn.RNN, {"nonlinearity": "relu"})],
                         ids=["lstm", "gru", "rnn", "rnn_relu"])
def test_split_recurrence_matches_pytorch(cell, kwargs):
    torch.manual_seed(0)
    model = WithState(cell(12, 128, num_layers=2, **kwargs)).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(7, 2, 12, generator=generator)
    states = [torch.randn(2, 2, 128, generator=generator) * 0.5 for _ in range(2 if cell is nn.LSTM else 1)]
    graph = from_torch(model, (x, *states))
    compiled = build(graph, resolve_target("llvm", cores=2))
    assert parts_for(128, 1, 2) == 2
    with torch.no_grad():
        assert_outputs_close(model(x, *states), compiled(x, *states))


def test_bidirectional_and_small_layers_keep_one_thread_per_direction():
    """Not split (a direction per core, or too little work per part), and still right."""
    torch.manual_seed(0)
    model = nn.LSTM(8, 128, bidirectional=True).eval()
    x = torch.randn(5, 1, 8)
    compiled = build(from_torch(model, (x,)), resolve_target("llvm", cores=2))
    with torch.no_grad():
        assert_outputs_close(model(x), compiled(x))


def test_split_kernel_is_parallel_per_step_over_parts():
    """Split: the parts' loop is parallel inside the time loop (its end is each step's barrier). Not split: the
    directions' loop is parallel outside it (no per-step launches)."""
    split = recurrent_kernel("lstm", 4, 1, 256, 1, lanes=8, parts=2).script()
    whole = recurrent_kernel("lstm", 4, 1, 256, 2, lanes=8).script()
    assert split.index("for step in range(4)") < split.index("T.parallel(2)")
    assert whole.index("T.parallel(2)") < whole.index("for step in range(4)")
