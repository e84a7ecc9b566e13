"""torch.fx frontend: every construct imports to the expected ops and interprets to PyTorch's numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frontend.errors import FrontendError, UnsupportedModelError
from frontend.torch_fx import from_torch, module_handler, symbolic_trace
from passes.ir.interpret import run_reference
from passes.ir.verify import verify
from tests.cases import CASES, Fn, _affine, _bn
from tests.helpers import assert_outputs_close, structure_of


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_imports_and_matches_pytorch(case):
    model = case.make().eval()
    xs = case.example_inputs()
    if module_handler(model) is None:  # these cases need no torch.export fallback
        symbolic_trace(model)
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
    """Python control flow on a traced shape: symbolic tracing fails, torch.export specializes it. In-place
    ReLU and batch norm come out of export as ``aten.relu_`` / ``_native_batch_norm_legit_no_training``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = _bn(nn.BatchNorm2d(4))
        self.act = nn.ReLU(inplace=True)
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = self.act(self.bn(self.conv(x)))
            x += 1.0
        seq = x.mean(2).transpose(1, 2)
        out, _ = self.rnn(seq)
        return F.hardtanh_(self.fc(out[:, -1]), -0.5, 0.5)


def test_falls_back_to_torch_export_on_control_flow():
    model = ShapeControlFlow().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    graph = verify(from_torch(model, (x,)))
    ops = sorted(d["op"] for _, d in graph.nodes(data=True))
    assert {"conv2d", "batch_norm", "relu", "lstm", "linear", "clamp"} <= set(ops)
    origins = {d["op"]: d["origin"][0] for _, d in graph.nodes(data=True)}
    assert origins["conv2d"].startswith("conv") and origins["lstm"].startswith("rnn")
    assert origins["batch_norm"].startswith("bn") and origins["relu"].startswith("act")
    with torch.no_grad():
        assert_outputs_close(model(x), run_reference(graph, (x,)), rtol=1e-6, atol=1e-6)


class ExportOnlyOps(nn.Module):
    """Every op new to this frontend, behind shape control flow so only the torch.export path can take it."""

    def __init__(self):
        super().__init__()
        self.ln = _affine(nn.LayerNorm(6))
        self.gn = _affine(nn.GroupNorm(3, 6))
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.act = nn.Hardswish(inplace=True)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = self.act(self.conv(x))
        y = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = F.silu(self.gn(y)) + F.mish(self.inorm(y)) + F.gelu(y, approximate="tanh") + F.gelu(y)
        y = F.hardsigmoid(y) + F.relu6(y) + F.hardtanh(y)
        y = F.interpolate(y, scale_factor=2, mode="bilinear") + F.interpolate(y, size=(10, 10), mode="nearest")
        y = F.pad(y, (1, 1, 2, 0), mode="reflect") + F.pad(y, (1, 1, 2, 0), mode="replicate") + F.pad(y, (1, 1, 2, 0))
        return F.interpolate(y, size=(6, 5), mode="bilinear", align_corners=True)


def test_torch_export_path_converts_the_new_ops():
    model, x = ExportOnlyOps().eval(), torch.randn(1, 6, 5, 5)
    with pytest.raises(torch.fx.proxy.TraceError):
        symbolic_trace(model)
    graph = verify(from_torch(model, (x,)))
    ops = {d["op"] for _, d in graph.nodes(data=True)}
    assert {"layer_norm", "group_norm", "silu", "mish", "gelu", "hardswish", "hardsigmoid", "interpolate",
            "pad"} <= ops, sorted(ops)
    with torch.no_grad():
        assert_outputs_close(model(x), run_reference(graph, (x,)), rtol=1e-6, atol=1e-6)


def test_unconvertible_fx_graph_falls_back_to_torch_export():
    """Symbolic tracing succeeds, but an in-place method on an intermediate (``y.add_``) has no faithful FX
    conversion (FX keeps using ``y``'s node): the frontend converts torch.export's functionalized graph instead."""
    model = Fn(lambda s, x: s.fc(x).mul_(2.0).add_(x.sum(-1, keepdim=True)), fc=nn.Linear(4, 4)).eval()
    x = torch.randn(2, 4)
    symbolic_trace(model)
    graph = verify(from_torch(model, (x,)))
    assert {"linear", "mul", "add", "sum"} <= {d["op"] for _, d in graph.nodes(data=True)}
    with torch.no_grad():
        assert_outputs_close(model(x), run_reference(graph, (x,)), rtol=1e-6, atol=1e-6)


def test_inplace_module_whose_input_is_read_again_goes_through_torch_export():
    """``y + relu_(y)`` reads the mutated ``y``: 2 * relu(y) in PyTorch, y + relu(y) if FX's graph were taken as is."""
    model = Fn(lambda s, x: (lambda y: y + s.act(y) + F.relu(y, inplace=True))(s.fc(x)),
               fc=nn.Linear(4, 4), act=nn.ReLU(inplace=True)).eval()
    x = torch.randn(3, 4)
    graph = verify(from_torch(model, (x,)))
    with torch.no_grad():
        assert_outputs_close(model(x), run_reference(graph, (x,)), rtol=1e-6, atol=1e-6)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's pattern: a BatchNorm2d subclass whose forward also applies an activation."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return F.relu(x)


class TaggedConv(nn.Conv2d):
    """A subclass that adds nothing to forward: converted as its parent, one node."""

    tag = "mine"


def test_subclass_overriding_forward_is_traced_into():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _bn(BatchNormAct2d(4))).eval()
    x = torch.randn(1, 3, 8, 8)
    assert module_handler(model[1]) is None
    graph = verify(from_torch(model, (x,)))
    ops = [d["op"] for _, d in graph.nodes(data=True) if d["op"] not in ("input", "constant")]
    assert ops == ["conv2d", "batch_norm", "relu"]
    with torch.no_grad():
        assert_outputs_close(model(x), run_reference(graph, (x,)), rtol=1e-6, atol=1e-6)


def test_subclass_inheriting_forward_is_converted_as_its_parent():
    model = nn.Sequential(TaggedConv(3, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    assert module_handler(model[0]) is module_handler(nn.Conv2d(3, 4, 3))
    graph = from_torch(model, (x,))
    (conv,) = [d for _, d in graph.nodes(data=True) if d["op"] == "conv2d"]
    assert conv["origin"] == ("0",)
    with torch.no_grad():
        assert_outputs_close(model(x), run_reference(graph, (x,)), rtol=1e-6, atol=1e-6)


@torch.fx.wrap
def _shifted_pad(x, pad, shift=1.0):
    """A library helper registered with ``torch.fx.wrap``: opaque to symbolic tracing."""
    if len(pad) != 4:
        raise ValueError("pad needs 4 numbers")
    return F.pad(x, pad, value=shift) * 2.0


def test_wrapped_function_is_traced_through():
    model = Fn(lambda s, x: _shifted_pad(s.conv(x), (1, 0, 0, 1), shift=0.5), conv=nn.Conv2d(3, 4, 1)).eval()
    x = torch.randn(1, 3, 5, 5)
    targets = [n.target for n in symbolic_trace(model).graph.nodes]
    assert _shifted_pad in targets  # one opaque call in the FX graph...
    graph = verify(from_torch(model, (x,)))
    by_op = {d["op"]: d for _, d in graph.nodes(data=True)}
    assert by_op["pad"]["attrs"]["value"] == 0.5 and "mul" in by_op  # ...whose body became IR ops
    with torch.no_grad():
        assert_outputs_close(model(x), run_reference(graph, (x,)), rtol=1e-6, atol=1e-6)


def test_training_mode_model_is_converted_with_eval_semantics_and_left_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _bn(nn.BatchNorm2d(4)), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    model.train()
    model[2].eval()  # a mixed state must be restored module by module
    before = {name: m.training for name, m in model.named_modules()}
    x = torch.randn(1, 3, 8, 8)
    graph = from_torch(model, (x,))
    assert {name: m.training for name, m in model.named_modules()} == before
    model.eval()
    with torch.no_grad():
        assert_outputs_close(model(x), run_reference(graph, (x,)), rtol=1e-6, atol=1e-6)


class ManyUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU())
        self.head = Fn(lambda s, x: torch.cumsum(x, dim=1))

    def forward(self, x):
        return self.head(self.block(x)).sort(dim=1).values


def test_unsupported_constructs_listed_together_with_module_paths():
    with pytest.raises(UnsupportedModelError) as info:
        from_torch(ManyUnsupported(), (torch.randn(1, 3, 8, 8),))
    listed = info.value.unsupported
    assert len(listed) == 3, listed
    text = str(info.value)
    for fragment in ("prelu (at block.1.", "cumsum (at head.", "Tensor.sort", "torch.export's core-ATen graph"):
        assert fragment in text, text


REFUSALS = {
    "antialias": (Fn(lambda s, x: F.interpolate(x, size=(6, 6), mode="bilinear", antialias=True)), "antialias"),
    "bicubic": (Fn(lambda s, x: F.interpolate(x, scale_factor=2, mode="bicubic")), "bicubic"),
    "runtime_layer_norm_weight": (Fn(lambda s, x: F.layer_norm(x, (4,), x[0, 0, 0])), "layer norm with run-time"),
    "runtime_group_norm_weight": (Fn(lambda s, x: F.group_norm(x, 2, x[0, :, 0, 0])), "group norm with run-time"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusal_names_the_construct(name):
    model, message = REFUSALS[name]
    with pytest.raises(UnsupportedModelError, match=message):
        from_torch(model, (torch.randn(1, 4, 4, 4),))


def test_wrong_number_of_example_inputs():
    with pytest.raises(FrontendError, match="forward takes 2 inputs"):
        from_torch(Fn(lambda s, a, b: a + b), (torch.randn(2),))


def test_non_module_and_missing_inputs_are_refused():
    with pytest.raises(FrontendError, match="expected a torch.nn.Module"):
        from_torch(lambda x: x, (torch.randn(2),))
    with pytest.raises(FrontendError, match="example_inputs are required"):
        from_torch(nn.ReLU(), ())


def test_bfloat16_weights_are_refused_with_what_to_do():
    model = nn.Sequential(nn.Linear(4, 3)).to(torch.bfloat16)
    with pytest.raises(FrontendError, match=r"0: parameter 'weight' is bfloat16; import the float32 model"):
        from_torch(model, (torch.randn(2, 4, dtype=torch.bfloat16),))


def test_unsupported_usage_of_supported_module_is_explained():
    model = nn.LSTM(4, 5, proj_size=2)
    with pytest.raises(UnsupportedModelError, match="proj_size"):
        from_torch(model, (torch.randn(3, 1, 4),))
    bn = nn.BatchNorm2d(3, track_running_stats=False)
    with pytest.raises(UnsupportedModelError, match="running statistics"):
        from_torch(bn, (torch.randn(1, 3, 4, 4),))
