"""distill: trains the student toward the teacher, writes weights back, re-batches, and refuses bad data clearly.

Accuracy on real data (pruned CNN and LSTM on digits) is in tests/e2e/test_prune_distill_digits.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from frontend.torch_fx import from_torch
from passes.core.pass_base import PassContext, PassError
from passes.core.pipeline import Pipeline
from passes.ir.interpret import run_reference
from passes.transforms.calibrate import rebatched
from passes.transforms.distill import Distill
from passes.transforms.prune_channels import PruneChannels
from tests.cases import Fn
from tests.passes.helpers import run_pass

torch.manual_seed(0)
MODEL = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
X = (torch.randn(1, 3, 6, 6),)
DATA = [(torch.randn(16, 3, 6, 6),) for _ in range(4)]


def test_student_equal_to_teacher_has_zero_loss():
    """KL(t || t) = 0, and training from there keeps the student on the teacher (loss stays below 0.0005)."""
    graph = from_torch(MODEL, X)
    stats = run_pass(Distill(epochs=2), graph, PassContext(data=DATA, original=graph.copy_graph())).stats
    assert stats == {"steps": 8, "loss_start_milli": 0, "loss_end_milli": 0}


def test_pruned_student_moves_toward_the_teacher_at_another_batch_size():
    graph = from_torch(MODEL, X)
    lines = []
    ctx = PassContext(data=DATA, progress=lines.append)
    records = Pipeline([PruneChannels(ratio=0.5), Distill(epochs=5, lr=0.01)]).run(graph, ctx)
    stats = records[1].stats
    assert stats["steps"] == 20 and stats["loss_end_milli"] < stats["loss_start_milli"] / 2
    assert lines == []  # the epochs show as a tqdm bar on a terminal (tests run without one), not as messages
    teacher = run_reference(ctx.original, (DATA[0][0][:1],))  # the graph at batch 1 still runs, with trained weights
    assert run_reference(graph, (DATA[0][0][:1],)).shape == teacher.shape
    assert graph.nodes["n1"]["params"]["running_mean"].shape == (4,)


def test_labels_join_the_loss():
    graph = from_torch(MODEL, X)
    labelled = [(x, torch.randint(0, 5, (16,))) for (x,) in DATA]
    stats = run_pass(Distill(epochs=1, alpha=0.5), graph, PassContext(data=labelled, original=graph.copy_graph()))
    assert stats.stats["loss_start_milli"] > 0  # cross-entropy against labels is never zero


def test_rebatched_follows_the_batch_in_reshape_targets():
    model = Fn(lambda s, x: s.fc(s.conv(x).reshape(1, -1)), conv=nn.Conv2d(3, 2, 3), fc=nn.Linear(32, 4))
    graph = from_torch(model.eval(), X)
    batch8 = rebatched(graph, [(8, 3, 6, 6)])
    assert [t.shape for t in batch8.input_types()] == [(8, 3, 6, 6)]
    assert batch8.value_type(batch8.output_values()[0]).shape == (8, 4)


@pytest.mark.parametrize("data, message", [
    (None, "needs training data"),
    ([], "data is empty"),
    ([(torch.randn(1, 3, 6, 6), torch.zeros(1), torch.zeros(1))], "has 3 tensors"),
    ([(torch.randn(4, 3, 5, 5),)], "only the batch size may differ"),
])
def test_bad_data_is_refused_clearly(data, message):
    graph = from_torch(MODEL, X)
    with pytest.raises(PassError, match=message):
        Distill().run(graph, PassContext(data=data, original=graph.copy_graph()))


def test_options_are_checked():
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"temperature": -1.0}, {"alpha": 2.0}):
        with pytest.raises(PassError, match="distill"):
            Distill(**bad)
