"""Compiled CPU models size TVM's thread pool themselves: every physical core by default, ``threads=`` for fewer,
the user's ``TVM_NUM_THREADS`` wins. Checked through TVM's own count (``tvm.runtime.num_threads``), never by timing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import tvm

import passes
from backends.tvm.threads import default_threads, usable_cpus

pytestmark = pytest.mark.tvm
ROOT = Path(__file__).resolve().parents[2]


def _small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()).eval()
    return model, (torch.randn(1, 3, 16, 16),)


@pytest.fixture(scope="module")
def compiled():
    model, inputs = _small_model()
    return passes.optimize(model, passes=[], example_inputs=inputs, measure=False), inputs


def _threads_after_call(opt, inputs) -> int:
    opt(*inputs)
    return tvm.runtime.num_threads()


def test_default_is_one_thread_per_physical_core(compiled):
    opt, inputs = compiled
    assert "TVM_NUM_THREADS" not in os.environ  # no file of ours sets it
    assert default_threads() >= 1
    assert default_threads() <= len(usable_cpus())
    assert _threads_after_call(opt, inputs) == default_threads()


def test_threads_option_and_back_to_default(compiled):
    opt, inputs = compiled
    opt.compiled.threads = 1
    try:
        assert _threads_after_call(opt, inputs) == 1
    finally:
        opt.compiled.threads = None
    assert _threads_after_call(opt, inputs) == default_threads()


def test_every_calling_thread_gets_the_configured_pool(compiled):
    """TVM's pool is thread-local: a model called from a fresh thread (a server's worker) is configured there too."""
    opt, inputs = compiled
    seen = []
    worker = threading.Thread(target=lambda: seen.append(_threads_after_call(opt, inputs)))
    worker.start()
    worker.join()
    assert seen == [default_threads()]


def test_more_threads_than_cpus_are_capped(compiled):
    opt, inputs = compiled
    seen = []

    def call():
        opt.compiled.threads = len(usable_cpus()) + 3
        seen.append(_threads_after_call(opt, inputs))

    worker = threading.Thread(target=call)
    worker.start()
    worker.join()
    opt.compiled.threads = None
    assert seen == [len(usable_cpus())]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_thread_counts_are_refused(bad):
    model, inputs = _small_model()
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        passes.optimize(model, passes=[], example_inputs=inputs, measure=False, threads=bad)


def test_saved_artifact_loads_with_threads(compiled, tmp_path):
    opt, inputs = compiled
    opt.save(tmp_path / "art")
    loaded = passes.load(tmp_path / "art", threads=1)
    assert loaded.compiled.threads == 1
    seen = []
    worker = threading.Thread(target=lambda: seen.append(_threads_after_call(loaded, inputs)))
    worker.start()
    worker.join()
    assert seen == [1]


_CHILD = """
import torch, tvm, passes
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
opt = passes.optimize(model, passes=[], example_inputs=(torch.randn(2, 8),), measure=False, threads={threads})
opt(torch.randn(2, 8))
print(tvm.runtime.num_threads())
"""


@pytest.mark.parametrize("threads", [None, 2])
def test_user_environment_variable_wins(threads):
    env = {**os.environ, "TVM_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _CHILD.format(threads=threads)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "1"


def test_cli_threads_flag_is_checked(tmp_path):
    result = subprocess.run([sys.executable, "-m", "passes.cli", "compile", "zoo:resnet", "--threads", "0",
                             "-o", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "--threads" in result.stderr and "positive integer" in result.stderr
    assert not (tmp_path / "out").exists()
