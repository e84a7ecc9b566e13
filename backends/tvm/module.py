"""Build a lowered graph with TVM and wrap the executable as a callable, exportable module.

``CompiledModule`` takes torch tensors or numpy arrays (positionally, like the original model) and returns the
model's output structure (tensor, tuple, nested tuple): torch tensors when the inputs were torch tensors, numpy
arrays otherwise. It never imports torch itself, so an exported artifact loads and runs without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine  # runtime only: artifacts load without TVM's compiler library

from backends.tvm.target import resolve_target
from backends.tvm.threads import check_threads, configure_threads
from passes.ir.graph import Graph, map_structure, rebuild_structure


@contextlib.contextmanager
def _quiet_native_stderr():
    """Capture C++-level stderr (TVM logs a 'Scope Saving' warning per function on export); replay it on error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _register_cuda_compiler() -> None:
    """Let a runtime-only TVM load cuda artifacts.

    TVM 0.27 stores CUDA kernels in the artifact as CUDA C source and compiles them when the module is loaded, through
    the global ``tvm_callback_cuda_compile``. The full TVM registers one (NVRTC) that needs TVM's compiler library;
    a deployment machine with only the runtime library gets ours instead: ``nvcc --cubin`` for the GPU's own
    architecture (the kernels are compiled once per load).
    """
    import tvm_ffi
    from tvm import base

    if not getattr(base, "_RUNTIME_ONLY", False):
        return
    if shutil.which("nvcc") is None:
        raise RuntimeError("loading a cuda artifact with TVM's runtime library alone needs nvcc on PATH to compile "
                           "its kernels for this GPU (or install the full apache-tvm package)")

    def compile_cuda(code: str, *_unused) -> bytes:
        arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
        with tempfile.TemporaryDirectory() as folder:
            source, binary = Path(folder, "kernels.cu"), Path(folder, "kernels.cubin")
            source.write_text(code)
            subprocess.run(["nvcc", "--cubin", "-O3", f"-arch={arch}", "-o", str(binary), str(source)],
                           check=True, capture_output=True)
            return binary.read_bytes()

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


class InputError(ValueError):
    """Inputs given to a compiled model do not match its signature; the message names the input."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(d: dict) -> TensorSpec:
        return TensorSpec(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))


_DLPACK_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                            "uint32", "uint64"})  # what numpy >= 1.24 reads through DLPack (not bfloat16, nor bool)


def _to_numpy(tensor: Any, spec: TensorSpec, on_cpu: bool) -> np.ndarray:
    """A numpy copy of a VM output (an output may alias a constant or the next call's storage). A CPU tensor is
    copied through a zero-copy numpy view: TVM's ``numpy()`` costs ~20 us of call overhead per output."""
    return np.from_dlpack(tensor).copy() if on_cpu and spec.dtype in _DLPACK_DTYPES else tensor.numpy()


def _structure_indices(graph: Graph) -> Any:
    """The output structure with each leaf replaced by its index in the flat output tuple."""
    counter = iter(range(len(graph.output_values())))
    return map_structure(lambda _: next(counter), graph.outputs)


def _to_json_structure(structure: Any) -> Any:
    return list(map(_to_json_structure, structure)) if isinstance(structure, (tuple, list)) else structure


def _from_json_structure(structure: Any) -> Any:
    return tuple(map(_from_json_structure, structure)) if isinstance(structure, list) else int(structure)


def _in_place(array: np.ndarray, spec: TensorSpec) -> bool:
    """Whether TVM can read the caller's array itself: its exact dtype, C-contiguous, 64-byte aligned (TVM's
    requirement; torch's CPU allocations are, numpy's large ones usually only to 16)."""
    return (array.dtype == spec.dtype and array.flags.c_contiguous and array.flags.writeable  # numpy exports no
            and array.ctypes.data % 64 == 0 and spec.dtype in _DLPACK_DTYPES)              # read-only DLPack


def _torch_in_place(x: Any, spec: TensorSpec) -> bool:
    """Whether ``x`` is a torch CPU tensor TVM can read as it is (``_in_place``'s conditions, asked of the tensor:
    its exact dtype and shape, contiguous, 64-byte aligned, no autograd history to detach from). Such inputs go to
    TVM through DLPack without the numpy conversion and its checks: each Python or torch call here costs 5-10x its
    hot-cache time, because the model's run has just evicted the interpreter's working set from L1/L2 (measured on
    mobilenet_v2 in one process, alternating: the conversion 0.16-0.24 ms per ``opt(x)`` over the bare VM call,
    this path 0.02 ms)."""
    if not type(x).__module__.startswith("torch") or spec.dtype not in _DLPACK_DTYPES:
        return False
    torch = sys.modules["torch"]
    return (x.dtype is getattr(torch, spec.dtype) and x.is_cpu and not x.requires_grad and x.shape == spec.shape
            and x.is_contiguous() and x.data_ptr() % 64 == 0)


class CompiledModule:
    """A TVM executable with the model's signature. ``module(x)`` runs it; ``export(dir)`` saves it.

    CPU models run on ``threads`` threads (None: one per physical core the process may use), configured in each
    calling thread before it runs (``threads.py``); ``TVM_NUM_THREADS`` set by the user overrides it.
    """

    LIBRARY = "model.so"
    SIGNATURE = "signature.json"

    def __init__(self, executable: Any, target_kind: str, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], structure: Any, threads: int | None = None):
        self.executable = executable
        self.threads = check_threads(threads)
        self.activation_bytes: int | None = None  # the compiled plan's storage (set by build, not by load)
        self.target_kind = target_kind
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.structure = structure
        self._vm = None
        self._main = None  # the VM's ``main`` function
        self._input_buffers: list | None = None  # device tensors the inputs are copied into, reused every call
        self._input_views: list | None = None  # numpy views of those tensors (CPU)
        self._lock = threading.Lock()  # one VM and one set of input buffers: calls run one at a time

    @property
    def device(self):
        return tvm.cuda(0) if self.target_kind == "cuda" else tvm.cpu(0)

    @property
    def vm(self) -> VirtualMachine:
        if self._vm is None:
            with _quiet_native_stderr():
                self._vm = VirtualMachine(self.executable, self.device)
        return self._vm

    def _convert_inputs(self, inputs: Sequence[Any]) -> tuple[list, bool]:
        if len(inputs) != len(self.inputs):
            names = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in self.inputs)
            raise InputError(f"the model takes {len(self.inputs)} input(s) ({names}), got {len(inputs)}")
        if self.target_kind != "cuda" and all(map(_torch_in_place, inputs, self.inputs)):
            return [tvm.runtime.from_dlpack(x) for x in inputs], True
        arrays, any_torch = [], False
        for spec, x in zip(self.inputs, inputs):
            if type(x).__module__.startswith("torch"):
                any_torch = True
                x = x.detach().cpu()
                x = (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()  # numpy has no bfloat16: widen
            array = np.asarray(x)
            if array.shape != spec.shape:
                raise InputError(f"input {spec.name!r}: expected shape {list(spec.shape)}, got "
                                 f"{list(array.shape)} (the model was compiled for fixed shapes; recompile with "
                                 "example inputs of the new shape)")
            if array.dtype != spec.dtype and not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
                raise InputError(f"input {spec.name!r}: expected dtype {spec.dtype}, got {array.dtype.name}")
            arrays.append(array)
        return self._to_device(arrays), any_torch

    def _to_device(self, arrays: list[np.ndarray]) -> list:
        """The inputs as device tensors. On the CPU, arrays TVM can read as they are (``_in_place``: a torch tensor
        of the model's dtype) are passed in place, as ONNX Runtime reads a caller's memory: no copy (in one process,
        alternating: mobilenet_v2 0.988x, resnet18 0.994x the time per ``opt(x)``). Others are copied into device
        tensors kept from call to call. Why: a fresh tensor per call costs its allocation and first-touch page faults
        (~0.1-0.25 ms for a 224x224 image here, 2-5% of an int8
        ResNet-18); ONNX Runtime reads the caller's numpy memory in place. On the CPU the copy goes through a numpy
        view of each tensor (``np.copyto`` casts and gathers a strided array in the same pass): TVM's own
        ``copyfrom`` costs ~10 us of call overhead per input, 1% of an LSTM call."""
        if self.target_kind != "cuda" and all(_in_place(a, s) for a, s in zip(arrays, self.inputs)):
            return [tvm.runtime.from_dlpack(a) for a in arrays]
        if self._input_buffers is None:
            self._input_buffers = [tvm.runtime.empty(s.shape, s.dtype, self.device) for s in self.inputs]
            self._input_views = ([np.from_dlpack(b) for b in self._input_buffers]
                                 if self.target_kind != "cuda" and all(s.dtype in _DLPACK_DTYPES for s in self.inputs)
                                 else None)
        if self._input_views is not None:
            for view, array in zip(self._input_views, arrays):
                np.copyto(view, array, casting="same_kind")
        else:
            for buffer, spec, array in zip(self._input_buffers, self.inputs, arrays):
                buffer.copyfrom(array.astype(spec.dtype, order="C", copy=False))
        return self._input_buffers

    def _configure_threads(self) -> None:
        if self.target_kind != "cuda":
            configure_threads(self.threads)

    def _run(self, inputs: Sequence[Any]) -> tuple[list[np.ndarray], bool]:
        with self._lock:
            self._configure_threads()
            converted, any_torch = self._convert_inputs(inputs)
            if self._main is None:  # looked up once: a lookup per call costs ~20 us after the model's run
                self._main = self.vm["main"]
            result = self._main(*converted)
            on_cpu = self.target_kind != "cuda"
            return [_to_numpy(result[i], spec, on_cpu) for i, spec in enumerate(self.outputs)], any_torch

    def run_flat(self, *inputs: Any) -> list[np.ndarray]:
        """Outputs as a flat list of numpy arrays (depth-first order of the output structure)."""
        return self._run(inputs)[0]

    def __call__(self, *inputs: Any) -> Any:
        flat, any_torch = self._run(inputs)
        if any_torch:
            import torch  # only when the caller already uses torch

            flat = [torch.from_numpy(a) for a in flat]
        return rebuild_structure(self.structure, iter(flat)) if isinstance(self.structure, tuple) else flat[0]

    def time_ms(self, *inputs: Any, number: int = 10, repeat: int = 5) -> float:
        """Median latency in ms of ``main`` measured by TVM's time evaluator (no Python conversion overhead)."""
        with self._lock:
            self._configure_threads()
            converted, _ = self._convert_inputs(inputs)
            timer = self.vm.time_evaluator("main", self.device, number=number, repeat=repeat)
            return float(np.median(timer(*converted).results) * 1e3)

    def export(self, directory: str | os.PathLike) -> Path:
        """Write ``model.so`` (the TVM library) and ``signature.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with _quiet_native_stderr():
            self.executable.export_library(str(directory / self.LIBRARY))
        signature = {"target": self.target_kind, "inputs": [s.to_json() for s in self.inputs],
                     "outputs": [s.to_json() for s in self.outputs],
                     "structure": _to_json_structure(self.structure)}
        (directory / self.SIGNATURE).write_text(json.dumps(signature, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, threads: int | None = None) -> CompiledModule:
        """Load ``export``'s files; ``signature.json`` is checked against its schema first and against the
        library's ``main`` after (``artifact.ArtifactError`` on a mismatch). ``passes.load`` verifies the files'
        digests before this runs: this alone does not protect against a corrupt library."""
        from backends.tvm.artifact import ArtifactError, check_signature, read_json

        directory = Path(directory)
        signature = check_signature(directory / cls.SIGNATURE, read_json(directory / cls.SIGNATURE))
        if signature["target"] == "cuda":
            _register_cuda_compiler()
        try:
            with _quiet_native_stderr():
                library = tvm.runtime.load_module(str(directory / cls.LIBRARY))
        except (RuntimeError, OSError) as e:
            raise ArtifactError(f"{directory / cls.LIBRARY}: not a loadable TVM library ({e})") from None
        module = cls(library, signature["target"], [TensorSpec.from_json(s) for s in signature["inputs"]],
                     [TensorSpec.from_json(s) for s in signature["outputs"]],
                     _from_json_structure(signature["structure"]), threads)
        if module.target_kind == "llvm":  # a cuda library is checked on its first call (it needs the GPU)
            module._check_against_library(directory / cls.SIGNATURE)
        return module

    def _check_against_library(self, signature_path: Path) -> None:
        """Refuse a signature that is not the library's: ``main``'s arity, then one call on zeros of the signature's
        input shapes (the VM checks every input's shape and dtype) whose outputs must have the signature's count,
        shapes and dtypes. Costs one inference at load."""
        from backends.tvm.artifact import ArtifactError

        library = signature_path.parent / self.LIBRARY
        mismatch = f"{signature_path} does not describe {library} (the two files come from different models)"
        try:
            arity = self.vm._get_function_arity("main")
            if arity != len(self.inputs):
                raise ArtifactError(f"{mismatch}: field 'inputs' lists {len(self.inputs)} input(s), main takes {arity}")
            result = self.vm["main"](*self._to_device([np.zeros(s.shape, s.dtype) for s in self.inputs]))
            outputs = list(result)  # main returns a flat tuple (``lower``)
        except (RuntimeError, ValueError, TypeError, AttributeError) as e:
            if isinstance(e, ArtifactError):
                raise
            raise ArtifactError(f"{mismatch}: {' '.join(str(e).split())[:300]}") from None
        got = [(tuple(o.shape), str(o.dtype)) for o in outputs]
        expected = [(s.shape, s.dtype) for s in self.outputs]
        if got != expected:
            raise ArtifactError(f"{mismatch}: field 'outputs' lists {expected}, the library returns {got}")


def _relax_pipeline(mod: tvm.IRModule, tvm_target: Any) -> tvm.IRModule:
    """TVM's default Relax pipeline (what ``tvm.compile`` picks for the target), then NaN-propagating max/min in
    every kernel (``nan.propagate_nan``: relu, clip and max pooling keep NaN as in PyTorch)."""
    from tvm import relax

    from backends.tvm.nan import propagate_nan

    gpu = "gpu" in tvm_target.keys
    pipeline = relax.get_default_pipeline(tvm_target) if gpu else relax.get_pipeline("default")
    with tvm_target:
        return propagate_nan(pipeline(mod))


def build(graph: Graph, target: Any = "llvm", tiles: dict | None = None, threads: int | None = None) -> CompiledModule:
    """Lower ``graph`` to Relax and build it for ``target``; ``tiles`` are tuned kernel tiles (``tune.py``);
    ``threads`` the CPU threads it runs on (None: every physical core)."""
    from backends.tvm.lower import lower
    from backends.tvm.nan import TIR_PIPELINE
    from backends.tvm.schedule import optimize_relax_cpu

    target = resolve_target(target)
    mod = lower(graph, target, tiles=tiles)
    if target.kind == "llvm":
        with target.tvm:
            mod = optimize_relax_cpu(mod, target.cores)
    mod = _relax_pipeline(mod, target.tvm)  # what tvm.compile would run, applied here to read the memory plan
    activation_bytes = planned_storage_bytes(mod["main"])
    # TIR_PIPELINE: TVM's own, then NaN-propagating max/min in the bf16 kernels (``nan``'s docstring says why).
    executable = tvm.compile(mod, target=target.tvm, relax_pipeline=None, tir_pipeline=TIR_PIPELINE)
    # Signature names are the model's own input names (an ONNX input "input.1" keeps its dot).
    inputs = [TensorSpec(graph.nodes[n]["origin"][0] if graph.nodes[n]["origin"] else n, t.shape, t.dtype)
              for n, t in zip(graph.inputs, graph.input_types())]
    outputs = [TensorSpec(graph.output_name(v, f"output_{i}"), graph.value_type(v).shape, graph.value_type(v).dtype)
               for i, v in enumerate(graph.output_values())]
    structure = _structure_indices(graph)
    compiled = CompiledModule(executable, target.kind, inputs, outputs, structure, threads)
    compiled.activation_bytes = activation_bytes
    return compiled


def planned_storage_bytes(main: Any) -> int:
    """Bytes of every storage block ``main`` allocates after Relax's static memory planning
    (``R.vm.alloc_storage``): intermediates with disjoint lifetimes already share a block, so this is the
    activation memory of the compiled plan (outputs included, inputs and weights not)."""
    from tvm import relax

    alloc_storage = tvm.ir.Op.get("relax.vm.alloc_storage")
    sizes = []

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(alloc_storage):
            shape = expr.args[0]
            if isinstance(shape, relax.ShapeExpr) and all(isinstance(d, tvm.tirx.IntImm) for d in shape.values):
                sizes.append(int(np.prod([int(d) for d in shape.values], dtype=np.int64)))

    relax.analysis.post_order_visit(main, visit)
    return int(sum(sizes))


def cuda_source(module: CompiledModule) -> str:
    """The generated CUDA C source of a cuda build (for inspection and ``nvcc`` checks)."""
    sources = []

    def walk(mod):
        if mod.kind == "cuda":
            sources.append(mod.inspect_source())
        for sub in mod.imports:
            walk(sub)

    walk(module.executable.mod if hasattr(module.executable, "mod") else module.executable)
    if not sources:
        raise ValueError("module has no CUDA code (was it built for target 'cuda'?)")
    return "\n".join(sources)
