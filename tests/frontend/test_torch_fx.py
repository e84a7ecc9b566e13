"""torch.fx frontend: every construct imports to the expected ops and interprets to PyTorch's numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from frontend.errors import FrontendError, UnsupportedModelError
from frontend.torch_fx import LEAF_MODULES, from_torch, trace_model
from passes.ir.interpret import run_reference
from passes.ir.verify import verify
from tests.cases import CASES, Fn
from tests.helpers import assert_outputs_close, structure_of


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_imports_and_matches_pytorch(case):
    model = case.make().eval()
    xs = case.example_inputs()
    if not isinstance(model, LEAF_MODULES):  # these cases need no torch.export fallback
        assert trace_model(model, xs)[1] == "symbolic_trace"
    graph = verify(from_torch(model, xs))
    ops = {d["op"] for _, d in graph.nodes(data=True)}
    assert set(case.ops) <= ops, f"missing ops {set(case.ops) - ops} in {sorted(ops)}"
    with torch.no_grad():
        expected = model(*xs)
    actual = run_reference(graph, xs)
    assert structure_of(actual) == structure_of(expected)
    assert_outputs_close(expected, actual, rtol=1e-6, atol=1e-6)


def test_origin_is_module_path_and_rnn_is_one_node():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 2))
    graph = from_torch(model, (torch.randn(1, 3, 9, 9),))
    origins = {d["op"]: d["origin"] for _, d in graph.nodes(data=True)}
    assert origins["conv2d"] == ("0",) and origins["linear"] == ("3",)

    rnn = Fn(lambda s, x: s.encoder.lstm(x)[0], encoder=nn.Module())
    rnn.encoder.lstm = nn.LSTM(4, 5, num_layers=3, bidirectional=True)
    graph = from_torch(rnn, (torch.randn(6, 1, 4),))
    lstm = [d for _, d in graph.nodes(data=True) if d["op"] == "lstm"]
    assert len(lstm) == 1 and lstm[0]["origin"] == ("encoder.lstm",)
    assert lstm[0]["attrs"]["num_layers"] == 3 and len(lstm[0]["params"]) == 3 * 2 * 4


def test_params_are_copied_not_aliased():
    model = nn.Linear(3, 2)
    graph = from_torch(model, (torch.randn(1, 3),))
    with torch.no_grad():
        model.weight.add_(1.0)
    (node,) = [d for _, d in graph.nodes(data=True) if d["op"] == "linear"]
    assert not torch.allclose(torch.from_numpy(node["params"]["weight"]), model.weight)


class ShapeControlFlow(nn.Module):
    """Python control flow on a traced shape: symbolic tracing fails, torch.export specializes it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = torch.relu(self.bn(self.conv(x)))
        seq = x.mean(2).transpose(1, 2)
        out, _ = self.rnn(seq)
        return self.fc(out[:, -1])


def test_falls_back_to_torch_export_on_control_flow():
    model = ShapeControlFlow().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    graph = verify(from_torch(model, (x,)))
    ops = sorted(d["op"] for _, d in graph.nodes(data=True))
    assert {"conv2d", "batch_norm", "relu", "lstm", "linear"} <= set(ops)
    origins = {d["op"]: d["origin"][0] for _, d in graph.nodes(data=True)}
    assert origins["conv2d"].startswith("conv") and origins["lstm"].startswith("rnn")
    with torch.no_grad():
        assert_outputs_close(model(x), run_reference(graph, (x,)), rtol=1e-6, atol=1e-6)


class ManyUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4))
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        y = self.up(self.block(x))
        return torch.cumsum(y, dim=1).sort(dim=1).values


def test_unsupported_constructs_listed_together_with_module_paths():
    with pytest.raises(UnsupportedModelError) as info:
        from_torch(ManyUnsupported(), (torch.randn(1, 3, 8, 8),))
    listed = info.value.unsupported
    assert len(listed) == 4, listed
    text = str(info.value)
    for fragment in ("InstanceNorm2d (at block.1)", "Upsample (at up)", "cumsum", "Tensor.sort"):
        assert fragment in text, text


def test_wrong_number_of_example_inputs():
    with pytest.raises(FrontendError, match="forward takes 2 inputs"):
        from_torch(Fn(lambda s, a, b: a + b), (torch.randn(2),))


def test_non_module_and_missing_inputs_are_refused():
    with pytest.raises(FrontendError, match="expected a torch.nn.Module"):
        from_torch(lambda x: x, (torch.randn(2),))
    with pytest.raises(FrontendError, match="example_inputs are required"):
        from_torch(nn.ReLU(), ())


def test_unsupported_usage_of_supported_module_is_explained():
    model = nn.LSTM(4, 5, proj_size=2)
    with pytest.raises(UnsupportedModelError, match="proj_size"):
        from_torch(model, (torch.randn(3, 1, 4),))
    bn = nn.BatchNorm2d(3, track_running_stats=False)
    with pytest.raises(UnsupportedModelError, match="running statistics"):
        from_torch(bn, (torch.randn(1, 3, 4, 4),))
