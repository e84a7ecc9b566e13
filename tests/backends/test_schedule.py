"""Default CPU schedules (``backends/tvm/schedule.py``) for the kernels TVM generates from Relax ops."""

from __future__ import annotations

import pytest
import torch

from backends.tvm import build
from backends.tvm.lower import lower
from backends.tvm.schedule import optimize_relax_cpu
from frontend.torch_fx import from_torch
from tests.cases import Fn
from tests.helpers import assert_outputs_close

pytestmark = pytest.mark.tvm


def scheduled_reductions(model, x) -> list[str]:
    """TVMScript of every scheduled PrimFunc that reduces (holds a ``T.init``)."""
    mod = optimize_relax_cpu(lower(from_torch(model, (x,)), "llvm", cores=2), 2)
    return [f.script() for f in mod.functions.values() if hasattr(f, "body") and "T.init()" in f.script()]


@pytest.mark.parametrize("reduce", [lambda x: x.mean(dim=(2, 3)), lambda x: torch.softmax(x, dim=-1)],
                         ids=["global_average_pool", "softmax"])
def test_inner_reductions_become_vectorized_partial_sums(reduce):
    """A reduction over the innermost axis is split into partial sums in one vector (``rfactor``), instead of
    one dependent scalar add per element; results stay within float32 rounding of PyTorch."""
    model = Fn(lambda s, x: reduce(x))
    x = torch.randn(1, 64, 28, 28)
    scripts = scheduled_reductions(model, x)
    assert scripts and all("_rf" in s and "T.vectorized(T.int64(14))" in s for s in scripts)
    with torch.no_grad():
        assert_outputs_close(model(x), build(from_torch(model, (x,)), "llvm")(x), rtol=1e-5, atol=1e-6)


def test_reductions_over_an_outer_axis_are_left_as_they_are():
    model = Fn(lambda s, x: x.sum(dim=1))  # the innermost loop is spatial: no partial sums to vectorize
    x = torch.randn(1, 64, 28, 28)
    scripts = scheduled_reductions(model, x)
    assert scripts and not any("_rf" in s for s in scripts)
    with torch.no_grad():
        assert_outputs_close(model(x), build(from_torch(model, (x,)), "llvm")(x), rtol=1e-5, atol=1e-5)
