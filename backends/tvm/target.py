"""Targets: ``"llvm"`` (this host's CPU, all cores) and ``"cuda"`` (default sm_90), as TVM JSON-dict targets.

``resolve_target`` makes the backend's one ``Target`` object (kind, cpu, cores, CPU features, the TVM target) once
per build; lowering, kernel selection and tuning read it instead of re-deriving pieces of it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import tvm

DEFAULT_CUDA_ARCH = "sm_90"
# CPU features our kernels choose by (vector width, FMA, the int8 dot product vpdpbusd).
FEATURES = ("avx2", "fma", "avx512f", "avx512vnni")


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


@dataclass(frozen=True)
class Target:
    """What the backend builds for, resolved once: ``kind`` ("llvm" | "cuda"), ``cpu`` (LLVM's mcpu, "" for cuda),
    ``cores`` (threads our CPU kernels are split for; 1 for cuda), ``features`` (those of ``FEATURES`` the CPU has)
    and ``tvm``, the ``tvm.target.Target`` that ``tvm.compile`` takes. ``winograd``: whether 3x3 stride-1 convs may
    use the Winograd kernel where its cost rule picks it (``optimize(..., winograd=False)`` turns it off); on the
    target so that kernel selection, tuning and the build all read the one decision."""

    tvm: tvm.target.Target
    kind: str
    cpu: str
    cores: int
    features: frozenset[str]
    winograd: bool = True

    @property
    def vnni(self) -> bool:
        """AVX-512 VNNI: our integer kernels use vpdpbusd."""
        return "avx512vnni" in self.features

    @property
    def lanes(self) -> int:
        """fp32 lanes of the widest vector registers: 16 with AVX-512, 8 with AVX2 (e.g. AMD Zen 3), else 4. Our
        kernels' register tiles are sized in these vectors (``kernels.accumulator_vectors``); on AVX2 the AVX-512
        tiles spilled (torchvision resnet18 1.9-3.6x slower)."""
        if self.kind != "llvm":
            return 16
        return 16 if "avx512f" in self.features else 8 if "avx2" in self.features else 4


def resolve_target(target: str | dict | tvm.target.Target | Target = "llvm", cores: int | None = None,
                   winograd: bool | None = None) -> Target:
    """The ``Target`` for a name (``"llvm"``, ``"cuda"``), a TVM target dict or object; ``cores`` overrides the
    llvm target's ``num-cores`` (our kernels' thread split), ``winograd`` the Winograd switch (default on)."""
    if winograd is None:
        winograd = target.winograd if isinstance(target, Target) else True
    if isinstance(target, Target) and cores is None:
        return target if target.winograd == winograd else dataclasses.replace(target, winograd=winograd)
    tvm_target = make_target(target.tvm if isinstance(target, Target) else target)
    kind = tvm_target.kind.name
    if kind != "llvm":
        return Target(tvm_target, kind, "", 1, frozenset(), winograd)
    from tvm.target.codegen import target_has_features

    found = frozenset(f for f in FEATURES if target_has_features([f], tvm_target))
    cores = cores if cores is not None else int(tvm_target.attrs.get("num-cores", 1))
    return Target(tvm_target, kind, str(tvm_target.attrs.get("mcpu", "")), cores, found, winograd)
