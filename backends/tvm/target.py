"""Targets: ``"llvm"`` (this host's CPU, all cores) and ``"cuda"`` (default sm_90), as TVM JSON-dict targets."""

from __future__ import annotations

import os
from typing import Any

import tvm

DEFAULT_CUDA_ARCH = "sm_90"


def host_cpu() -> str:
    get = tvm.get_global_func("target.llvm_get_system_cpu", True)
    return get() if get is not None else "generic"


def make_target(target: str | dict | tvm.target.Target) -> tvm.target.Target:
    """``"llvm"`` -> {"kind": "llvm", "mcpu": <host>, "num-cores": <cores>}; ``"cuda"`` -> sm_90 + generic x86-64 host.

    A cuda build's host code is only the VM glue, so it is compiled for generic x86-64: the artifact then runs on the
    GPU machine it is deployed to, whatever that machine's CPU (this one's may have instructions that one lacks)."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if target == "llvm":
        return tvm.target.Target({"kind": "llvm", "mcpu": host_cpu(), "num-cores": os.cpu_count() or 1})
    if target == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": DEFAULT_CUDA_ARCH, "max_shared_memory_per_block": 49152,
                                  "max_threads_per_block": 1024}, host={"kind": "llvm"})
    raise ValueError(f"unknown target {target!r}: use 'llvm' (CPU) or 'cuda' (NVIDIA GPU), or a TVM target dict")


def target_kind(target: Any) -> str:
    return make_target(target).kind.name


def cpu_has(feature: str, target: Any = "llvm") -> bool:
    """Whether an llvm ``target`` (default: this host) has a CPU feature such as ``avx512vnni``."""
    from tvm.target.codegen import target_has_features

    tvm_target = make_target(target)
    return tvm_target.kind.name == "llvm" and bool(target_has_features([feature], tvm_target))


def vector_lanes(target: Any = "llvm") -> int:
    """fp32 lanes of the target's widest vector registers: 16 with AVX-512, 8 with AVX2 (e.g. AMD Zen 3), else 4.
    Our kernels' register tiles are sized in these vectors (``kernels.accumulator_vectors``)."""
    tvm_target = make_target(target)
    if tvm_target.kind.name != "llvm":
        return 16
    return 16 if cpu_has("avx512f", tvm_target) else 8 if cpu_has("avx2", tvm_target) else 4
