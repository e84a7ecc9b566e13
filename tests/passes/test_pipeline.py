"""Pass infrastructure: specs, registry, presets, instruments, patterns, plug-ins."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

import passes
from frontend.torch_fx import from_torch
from passes.core.pass_base import Decisions, Pass, PassContext, PassError, PassResult
from passes.core.pattern import Pattern
from passes.core.pipeline import DumpEach, NumericCheckEach, Pipeline, VerifyEach, parse_spec, resolve, split_specs
from passes.core.registry import BUILTIN_PASSES, PRESETS, get_pass_class, register_pass
from passes.ir.graph import Graph, TensorType
from tests.conftest import ROOT
from tests.ir.test_graph import tiny


def test_every_builtin_key_equals_its_class_name_and_module():
    for key, target in BUILTIN_PASSES.items():
        cls = get_pass_class(key)
        assert cls.name == key
        assert target.split(":")[0].rsplit(".", 1)[1] == key.replace("-", "_")
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        assert cls.summary and cls.__module__ and sys.modules[cls.__module__].__doc__


def test_presets_only_name_builtins():
    for names in PRESETS.values():
        assert all(n in BUILTIN_PASSES for n in names)
    assert [p.name for p in resolve("default")] == list(PRESETS["default"])


def test_spec_parsing_with_typed_options():
    assert split_specs("a,b{x=1,y=2},c") == ["a", "b{x=1,y=2}", "c"]
    p = parse_spec("fold-constants{max_elements=10}")
    assert p.max_elements == 10 and p.spec() == "fold-constants{max_elements=10}"
    assert [q.name for q in resolve(["fold-batch-norm", "fuse-conv-activation,fuse-conv-pool"])] == [
        "fold-batch-norm", "fuse-conv-activation", "fuse-conv-pool"]


@pytest.mark.parametrize("spec, message", [
    ("no-such-pass", "unknown pass 'no-such-pass'; available: .*fold-batch-norm"),
    ("fold-constants{size=3}", "has no option 'size'; options: max_elements: int"),
    ("fold-constants{max_elements=many}", "expected int, got 'many'"),
    ("fold-constants{max_elements=3", "unbalanced"),
    ("fold-constants{max_elements}", "must be key=value"),
])
def test_bad_specs_give_one_clear_error(spec, message):
    with pytest.raises(PassError, match=message):
        resolve(spec)


@dataclasses.dataclass(frozen=True)
class ScaleOutputs(Pass):
    """A deliberately wrong pass: multiplies every relu output by 2 (for the numeric-check instrument)."""

    name = "test-scale-outputs"
    summary = "breaks numerics on purpose"

    def run(self, graph, ctx):
        decide = Decisions(self, graph, ctx, work=("broken",))
        for node in graph.op_nodes("relu"):
            graph.nodes[node]["op"] = "leaky_relu"
            graph.nodes[node]["attrs"] = {"negative_slope": 2.0}
            decide.done(node, "broken")
        return decide.result()


def test_register_pass_and_duplicates():
    register_pass(ScaleOutputs)
    register_pass(ScaleOutputs)  # the same class again is harmless
    clash = dataclasses.make_dataclass("Clash", [], bases=(Pass,), frozen=True, namespace={"name": "fold-batch-norm"})
    with pytest.raises(PassError, match="already registered"):
        register_pass(clash)
    with pytest.raises(PassError, match="kebab-case"):
        register_pass(dataclasses.make_dataclass("Bad", [], bases=(Pass,), frozen=True, namespace={"name": "Bad_Name"}))


def test_numeric_check_each_names_the_pass_that_changed_outputs():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    graph = from_torch(model, (torch.randn(2, 4),))
    pipeline = Pipeline(resolve(["remove-identities", ScaleOutputs()]), [VerifyEach(), NumericCheckEach()])
    with pytest.raises(PassError, match="pass 'test-scale-outputs' changed output 0 beyond tolerance.*"
                                        "passes run: remove-identities, test-scale-outputs"):
        pipeline.run(graph, PassContext())


def test_verify_each_names_the_pass_that_broke_the_graph():
    @dataclasses.dataclass(frozen=True)
    class Vandal(Pass):
        name = "test-vandal"

        def run(self, graph, ctx):
            graph.nodes["features_1"]["attrs"]["bogus"] = 1
            return PassResult(True, {"vandalized": 1})

    g, _, _ = tiny()
    with pytest.raises(PassError, match="(?s)pass .test-vandal. left an invalid graph.*unknown attribute .bogus."):
        Pipeline([Vandal()]).run(g, PassContext())


def test_dump_each_writes_numbered_files(tmp_path):
    g, _, _ = tiny()
    records = Pipeline(resolve("fuse-conv-activation,eliminate-dead-nodes"), [DumpEach(tmp_path)]).run(
        g, PassContext())
    assert [r.name for r in records] == ["fuse-conv-activation", "eliminate-dead-nodes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-input.txt", "01-fuse-conv-activation.txt",
                                                         "02-eliminate-dead-nodes.txt"]
    assert "relu" in (tmp_path / "00-input.txt").read_text()
    assert "activation='relu'" in (tmp_path / "01-fuse-conv-activation.txt").read_text()


def test_requires_is_checked():
    @dataclasses.dataclass(frozen=True)
    class Needs(Pass):
        name = "test-needs"
        requires = ("float",)

        def run(self, graph, ctx):
            return PassResult(False)

    @dataclasses.dataclass(frozen=True)
    class Quantizes(Pass):
        name = "test-quantizes"
        preserves = ("shapes", "inference")

        def run(self, graph, ctx):
            return PassResult(True, {"quantized": 1})

    g, _, _ = tiny()
    with pytest.raises(PassError, match="requires \\['float'\\].*test-quantizes"):
        Pipeline([Quantizes(), Needs()]).run(g, PassContext())


def test_pattern_matches_on_slots_and_privacy():
    g = Graph(name="p")
    x = g.add_input("x", TensorType((2, 3)))
    y = g.add_input("y", TensorType((2, 3)))
    r = g.add_op("relu", [x], name="r")
    s = g.add_op("sub", [y, r], name="s")  # relu feeds slot 1
    g.set_outputs(s)
    slot0 = Pattern(roles={"act": "relu", "op": "sub"}, edges=(("act", "op", 0),), anchor="op")
    slot1 = Pattern(roles={"act": "relu", "op": "sub"}, edges=(("act", "op", 1),), anchor="op", private=("act",))
    assert slot0.find(g) == [] and slot1.find(g) == [{"act": "r", "op": "s"}]
    g.set_outputs((s, r))
    assert slot1.find(g) == []  # relu output escapes through the graph outputs
    with pytest.raises(ValueError, match="does not declare"):
        Pattern(roles={"a": "relu"}, edges=(("a", "b", 0),), anchor="a")


def test_optimize_records_every_pass_in_the_report():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4).eval(), torch.nn.ReLU())
    from passes.api import import_model

    graph = import_model(model, (torch.randn(1, 3, 8, 8),))
    ctx = PassContext()
    records = Pipeline(resolve("default")).run(graph, ctx)
    assert {r.name: r.stats.get("folded", r.stats.get("fused")) for r in records}["fold-batch-norm"] == 1
    assert all(r.seconds >= 0 for r in records)


@pytest.fixture(scope="module")
def plugin_installed():
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                             "-e", str(ROOT / "examples" / "plugin")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return True


def test_plugin_through_entry_point_in_list_passes_and_optimize(plugin_installed):
    listed = subprocess.run([sys.executable, "-m", "passes.cli", "list-passes"], capture_output=True, text=True,
                            cwd=ROOT, check=True).stdout
    assert "relu6-to-clamp" in listed and "example plug-in" in listed
    script = (
        "import torch, passes\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU6()).eval()\n"
        "x = torch.randn(1, 3, 8, 8)\n"
        "opt = passes.optimize(m, passes=['relu6-to-clamp'], example_inputs=(x,))\n"
        "assert opt.report.to_dict()['passes'][0]['stats'] == {'rewritten': 1}, opt.report.to_dict()\n"
        "assert [d['op'] for _, d in opt.graph.nodes(data=True)] == ['input', 'conv2d', 'clamp']\n"
        "torch.testing.assert_close(opt(x), m(x), rtol=1e-4, atol=1e-5)\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_public_names():
    for name in ("optimize", "load", "Pass", "PassResult", "register_pass", "Pattern", "Tune"):
        assert getattr(passes, name) is not None
    assert np  # numpy used by helpers in this module's fixtures
