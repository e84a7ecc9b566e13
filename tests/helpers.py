"""Numeric comparison used across tests: tolerances are relative to each output's scale."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from passes.ir.graph import flatten_structure

RTOL, ATOL = 1e-4, 1e-5


def as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def assert_outputs_close(expected: Any, actual: Any, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Same structure, and every tensor within ``atol * scale + rtol * |expected|`` (scale = max |expected|).

    Scaling ``atol`` by the output's magnitude makes one tolerance meaningful for logits of size 1e-3 and 1e3.
    """
    flat_e, flat_a = flatten_structure(expected), flatten_structure(actual)
    assert len(flat_e) == len(flat_a), f"{len(flat_e)} expected outputs, got {len(flat_a)}"
    for i, (e, a) in enumerate(zip(flat_e, flat_a)):
        e, a = as_numpy(e).astype(np.float64), as_numpy(a).astype(np.float64)
        assert e.shape == a.shape, f"output {i}: shape {a.shape}, expected {e.shape}"
        scale = max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-6)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol * scale, err_msg=f"output {i}")


def structure_of(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return tuple(structure_of(i) for i in x)
    return "tensor"


def assert_nvcc_accepts(source: str, folder) -> str:
    """Compile generated CUDA source to PTX for sm_90 with nvcc (skips the test when nvcc is absent); the PTX."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA source generated but not compiled")
    (folder / "kernels.cu").write_text(source)
    result = subprocess.run(["nvcc", "-ptx", "-arch=sm_90", str(folder / "kernels.cu"), "-o",
                             str(folder / "kernels.ptx")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return (folder / "kernels.ptx").read_text()


def torchrun(ranks: int) -> list[str]:
    """The start of a ``torchrun --nproc-per-node ranks`` command on loopback, at a port free right now."""
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
            "127.0.0.1", "--master-port", str(port)]
