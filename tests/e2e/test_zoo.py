"""The model zoo end to end: traced, interpreted, compiled for llvm (matching PyTorch) and built for cuda."""

from __future__ import annotations

import pytest
import torch

import passes
from backends.tvm import build, cuda_source
from examples import zoo
from frontend.torch_fx import from_torch
from passes.api import DEFAULT_PIPELINE
from passes.core.pass_base import PassContext
from passes.core.pipeline import Pipeline, resolve
from passes.core.registry import PRESETS
from passes.ir.interpret import run_reference
from passes.ir.verify import verify
from tests.helpers import assert_nvcc_accepts, assert_outputs_close, structure_of

NAMES = sorted(zoo.ZOO)


@pytest.fixture(scope="module")
def imported():
    cache = {}

    def get(name):
        if name not in cache:
            model, xs = zoo.make(name)
            with torch.no_grad():
                expected = model(*xs)
            cache[name] = (verify(from_torch(model, xs)), xs, expected)
        return cache[name]
    return get


@pytest.mark.parametrize("name", NAMES)
def test_zoo_interpreter_matches_pytorch(imported, name):
    graph, xs, expected = imported(name)
    assert_outputs_close(expected, run_reference(graph, xs))


@pytest.mark.tvm
@pytest.mark.parametrize("name", NAMES)
def test_zoo_llvm_matches_pytorch(imported, name):
    graph, xs, expected = imported(name)
    actual = build(graph, "llvm")(*xs)
    assert structure_of(actual) == structure_of(expected)
    assert_outputs_close(expected, actual)


@pytest.mark.tvm
@pytest.mark.parametrize("name", NAMES)
def test_zoo_default_pipeline_matches_pytorch(name):
    model, xs = zoo.make(name)
    opt = passes.optimize(model, target="llvm", example_inputs=xs, measure=False,
                          instruments=("verify-each", "numeric-check-each"))
    with torch.no_grad():
        assert_outputs_close(model(*xs), opt(*xs))
    report = opt.report.to_dict()
    assert [p["name"] for p in report["passes"]] == [*PRESETS["default"], *DEFAULT_PIPELINE[1:]]
    assert report["flops"]["after"] <= report["flops"]["before"]


@pytest.mark.tvm
@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_zoo_builds_for_cuda_and_nvcc_accepts_the_source(imported, name, tmp_path):
    """After the default pipeline, so fused convs (activation, residual, conv2d_pool kernel) are covered too."""
    graph, _, _ = imported(name)
    graph = graph.copy_graph()
    Pipeline(resolve("default")).run(graph, PassContext())
    compiled = build(graph, "cuda")
    source = cuda_source(compiled)
    assert source.count("__global__") >= 1 and "threadIdx" in source
    assert ".entry" in assert_nvcc_accepts(source, tmp_path)
    compiled.export(tmp_path / "artifact")
    assert (tmp_path / "artifact" / "model.so").stat().st_size > 0
