"""optimize(): the public door, its report, and deployable artifacts that load without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import passes
from examples import zoo
from tests.helpers import assert_outputs_close

pytestmark = pytest.mark.tvm


def test_optimize_runs_no_pass_with_empty_list_and_reports():
    model, xs = zoo.make("resnet")
    opt = passes.optimize(model, passes=[], target="llvm", example_inputs=xs)
    report = opt.report.to_dict()
    assert report["passes"] == []
    assert report["flops"]["before"] == report["flops"]["after"] > 0
    assert report["params"]["before"] == sum(p.numel() for p in model.state_dict().values()
                                             if p.dtype.is_floating_point)
    assert report["latency_ms"] > 0 and report["accuracy"]["max_rel_error"] < 1e-4
    with torch.no_grad():
        assert_outputs_close(model(*xs), opt(*xs))


def test_save_and_load_in_a_process_without_torch(tmp_path):
    model, xs = zoo.make("gru_seq2seq")
    opt = passes.optimize(model, passes=[], example_inputs=xs, measure=False)
    opt.save(tmp_path / "model.art")
    np.savez(tmp_path / "inputs.npz", *[x.numpy() for x in xs])
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None          # any import of torch now fails
        import numpy as np, passes
        m = passes.load({str(tmp_path / "model.art")!r})
        inputs = np.load({str(tmp_path / "inputs.npz")!r})
        logits, hidden = m(*[inputs[k] for k in sorted(inputs.files)])
        np.savez({str(tmp_path / "out.npz")!r}, logits=logits, hidden=hidden)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    out = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        assert_outputs_close(model(*xs), (out["logits"], out["hidden"]))


def test_save_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path):
    model, xs = zoo.make("audio1d")
    opt = passes.optimize(model, passes=[], example_inputs=xs, measure=False)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        opt.save(tmp_path / "taken")

    class Boom(Exception):
        pass

    def explode(directory):
        raise Boom

    opt.compiled.export = explode
    with pytest.raises(Boom):
        opt.save(tmp_path / "new.art")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_optimize_needs_example_inputs_for_torch_models():
    with pytest.raises(ValueError, match="needs example_inputs"):
        passes.optimize(torch.nn.ReLU(), passes=[])


def test_wrong_shape_at_call_time_is_a_clear_error():
    model, xs = zoo.make("vgg")
    opt = passes.optimize(model, passes=[], example_inputs=xs, measure=False)
    with pytest.raises(ValueError, match=r"input 'x': expected shape \[1, 3, 32, 32\], got \[1, 3, 64, 64\]"):
        opt(torch.randn(1, 3, 64, 64))
