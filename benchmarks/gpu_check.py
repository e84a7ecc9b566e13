"""CUDA check for a GPU machine: build here, run there with TVM's runtime only, compare with PyTorch on that GPU.

    python benchmarks/gpu_check.py prepare DIR [--models resnet,tv-resnet18-fp16,bilstm,...] [--small]
    TVM_USE_RUNTIME_LIB=1 python benchmarks/gpu_check.py run DIR                               # on the GPU machine

Models: the zoo's names, ``tv-resnet18``, ``tv-mobilenet_v2``, ``tv-vgg11`` (torchvision architectures with random
seeded weights, no download, 224x224 batch 1), and any of them with ``-fp16`` (``mixed-precision{dtype=fp16}``
after the default pipeline; PyTorch's column is then the model ``.half()``). fp16 builds run their ordinary (groups=1,
unpooled) convs on tensor cores (``backends/tvm/cuda_conv.py``, WMMA implicit GEMM); ``prepare`` records how many
convs took that kernel and ``run`` prints it (``tc N``), so a row says which conv path it timed.

``prepare`` compiles each zoo model for ``cuda`` (sm_90) with the default pipeline and exports the artifact, with
the example inputs, the PyTorch CPU reference outputs and a checksum of the seeded weights. ``run`` loads each
artifact with TVM's runtime library alone (the deployment case: no compiler on the GPU machine), rebuilds the same
seeded PyTorch model there (the checksum proves the weights are the same), checks our outputs against PyTorch on
the GPU (TF32 off) and against the CPU reference, then times both on the GPU: wall clock around ``number`` calls
plus a device synchronize, median of ``repeat`` runs, for ours, PyTorch eager and PyTorch eager with
``cudnn.benchmark``. Energy: NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ, the whole
board) read around a separate loop of at least ``ENERGY_SECONDS`` of back-to-back calls gives joules per inference
(idle power included; the idle board power measured first is printed so it can be subtracted). The reference
column for ratios is PyTorch eager with ``cudnn.benchmark`` on (fp16 rows: the ``.half()`` model). Prints one table;
writes ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from examples import zoo  # noqa: E402

TORCHVISION = {"tv-resnet18": "resnet18", "tv-mobilenet_v2": "mobilenet_v2", "tv-vgg11": "vgg11"}
ENERGY_SECONDS = 1.0
# The default pipeline refuses fuse-conv-pool on cuda (measured slower there); "vgg-fused" forces it for comparison.
VARIANTS = {"vgg-fused": ("vgg", ["remove-identities", "fold-constants", "eliminate-common-subexpressions",
                                  "fold-batch-norm", "fuse-conv-activation", "fuse-conv-add",
                                  "fuse-conv-pool{on_cuda=true}", "eliminate-dead-nodes"]),
            "resnet-pruned50": ("resnet", ["prune-channels{ratio=0.5}", "default"]),
            }


def _base(entry: str) -> tuple[str, list[str] | None, bool]:
    """(model name, pipeline or None for the default, fp16?) of a table entry."""
    if entry.endswith("-fp16"):
        return VARIANTS.get(entry[:-5], (entry[:-5], None))[0], ["default", "mixed-precision{dtype=fp16}"], True
    name, pipeline = VARIANTS.get(entry, (entry, None))
    return name, pipeline, False


def _checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().abs().sum() for p in model.state_dict().values() if p.is_floating_point()))


def _make(entry: str, small: bool):
    name = _base(entry)[0]
    if name in TORCHVISION:
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, TORCHVISION[name])(weights=None).eval()
        return model, (torch.randn((1, 3, 224, 224), generator=torch.Generator().manual_seed(0)),)
    return zoo.make(name, seed=0, full=not small)


def prepare(directory: Path, entries: list[str], small: bool) -> None:
    import passes

    for entry in entries:
        model, inputs = _make(entry, small)
        pipeline = _base(entry)[1]
        start = time.perf_counter()
        opt = passes.optimize(model, passes=pipeline, target="cuda", example_inputs=inputs, measure=False)
        tensor_core = _tensor_core_convs(opt.graph)
        folder = directory / entry
        opt.compiled.export(folder)
        with torch.no_grad():
            expected = model(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        np.savez(folder / "data.npz", **{f"input_{i}": x.numpy() for i, x in enumerate(inputs)},
                 **{f"expected_{i}": y.numpy() for i, y in enumerate(expected)})
        (folder / "meta.json").write_text(json.dumps({"checksum": _checksum(model), "small": small,
                                                      "tensor_core_convs": tensor_core}))
        print(f"{entry}: built for cuda in {time.perf_counter() - start:.1f} s, {tensor_core} conv(s) on tensor cores",
              flush=True)


def _tensor_core_convs(graph) -> int:
    """How many convs of the optimized graph the cuda build runs on the tensor-core kernel."""
    from backends.tvm.select import select_kernels

    return sum(choice.kernel == "tensor_core" for choice in select_kernels(graph, "cuda").choices.values())


def _caller(model, inputs):
    return lambda: model(*inputs)


def _energy_mj() -> float:
    import pynvml

    return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(0)))


def _idle_watts(seconds: float = 1.0) -> float:
    start_mj, start = _energy_mj(), time.perf_counter()
    time.sleep(seconds)
    return (_energy_mj() - start_mj) / 1e3 / (time.perf_counter() - start)


def _measure(call, sync, number: int, repeat: int) -> tuple[float, float]:
    """(median ms per call over ``repeat`` runs of ``number`` calls, joules per call over >= ENERGY_SECONDS)."""
    for _ in range(3):
        call()
    sync()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            call()
        sync()
        runs.append((time.perf_counter() - start) * 1e3 / number)
    ms = statistics.median(runs)
    calls = max(number, math.ceil(ENERGY_SECONDS * 1e3 / ms))
    start_mj = _energy_mj()
    for _ in range(calls):
        call()
    sync()
    return ms, (_energy_mj() - start_mj) / 1e3 / calls


def _max_rel_error(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    return max(float(np.abs(g - e).max() / max(np.abs(e).max(), 1e-12)) for g, e in zip(got, expected))


def _load_cuda_runtime() -> None:
    """TVM's runtime-only mode may skip the CUDA runtime sidecar library; load it ourselves if so."""
    import ctypes

    import tvm
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" not in _LOADED_LIBS:
        library = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
        _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(library), ctypes.RTLD_GLOBAL)
    if not tvm.cuda(0).exist:
        raise RuntimeError("TVM sees no CUDA device")


def _ours_caller(ours, inputs: list[np.ndarray]):
    """A call of our VM on device-resident inputs (as PyTorch's calls get), and the device synchronize."""
    import tvm

    device = tvm.cuda(0)
    buffers = [tvm.runtime.empty(x.shape, x.dtype.name, device) for x in inputs]
    for buffer, x in zip(buffers, inputs):
        buffer.copyfrom(x)
    main = ours.vm["main"]
    return (lambda: main(*buffers)), device.sync


def run(directory: Path, number: int, repeat: int) -> None:
    import pynvml
    import tvm

    from backends.tvm.module import CompiledModule

    _load_cuda_runtime()
    pynvml.nvmlInit()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    idle = _idle_watts()
    print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, TVM runtime-only "
          f"{getattr(tvm.base, '_RUNTIME_ONLY', '?')}, driver {pynvml.nvmlSystemGetDriverVersion()}, idle board "
          f"power {idle:.0f} W", flush=True)
    results = {"_idle_watts": idle}
    for folder in sorted(p for p in directory.iterdir() if (p / "meta.json").exists()):
        entry = folder.name
        fp16 = _base(entry)[2]
        meta = json.loads((folder / "meta.json").read_text())
        data = np.load(folder / "data.npz")
        inputs = [data[k] for k in sorted(data) if k.startswith("input_")]
        expected = [data[k] for k in sorted(data) if k.startswith("expected_")]
        model, _ = _make(entry, meta["small"])
        same_weights = abs(_checksum(model) - meta["checksum"]) <= 1e-9 * max(1.0, meta["checksum"])
        try:
            ours = CompiledModule.load(folder)
            got = ours.run_flat(*inputs)
        except Exception as error:  # one broken artifact must not cost the rest of the run
            print(f"{entry}: FAILED to load or run: {type(error).__name__}: {error}", flush=True)
            continue
        row = {"rel_error_vs_cpu_reference": _max_rel_error(got, expected), "same_weights": same_weights,
               "fp16": fp16, "tensor_core_convs": meta.get("tensor_core_convs", 0)}
        model = model.to(device)
        torch_inputs = [torch.from_numpy(x).to(device) for x in inputs]
        with torch.no_grad():
            reference = model(*torch_inputs)
            reference = reference if isinstance(reference, tuple) else (reference,)
            row["rel_error_vs_torch_gpu"] = _max_rel_error(got, [r.cpu().numpy() for r in reference])
            row["torch_gpu_vs_cpu_reference"] = _max_rel_error([r.cpu().numpy() for r in reference], expected)
            if fp16:
                model, torch_inputs = copy.deepcopy(model).half(), [x.half() for x in torch_inputs]
            sync, call = torch.cuda.synchronize, _caller(model, torch_inputs)
            row["torch_eager_ms"], row["torch_eager_j"] = _measure(call, sync, number, repeat)
            torch.backends.cudnn.benchmark = True
            row["torch_cudnn_benchmark_ms"], row["torch_cudnn_benchmark_j"] = _measure(call, sync, number, repeat)
            torch.backends.cudnn.benchmark = False
        row["ours_ms"], row["ours_j"] = _measure(*_ours_caller(ours, inputs), number, repeat)
        row["ours_evaluator_ms"] = ours.time_ms(*inputs, number=number, repeat=repeat)
        row["ours_vs_reference"] = row["ours_ms"] / row["torch_cudnn_benchmark_ms"]
        row["ours_j_vs_reference"] = row["ours_j"] / row["torch_cudnn_benchmark_j"]
        results[entry] = row
        print(f"{entry} (tc {row['tensor_core_convs']}): ours {row['ours_ms']:.3f} ms {row['ours_j'] * 1e3:.2f} mJ "
              f"(evaluator "
              f"{row['ours_evaluator_ms']:.3f} ms); torch{' fp16' if fp16 else ''} eager {row['torch_eager_ms']:.3f} "
              f"ms {row['torch_eager_j'] * 1e3:.2f} mJ, cudnn.benchmark {row['torch_cudnn_benchmark_ms']:.3f} ms "
              f"{row['torch_cudnn_benchmark_j'] * 1e3:.2f} mJ; ratio {row['ours_vs_reference']:.2f} (energy "
              f"{row['ours_j_vs_reference']:.2f}); max rel error vs torch GPU fp32 {row['rel_error_vs_torch_gpu']:.1e},"
              f" vs CPU reference {row['rel_error_vs_cpu_reference']:.1e} (same weights: {same_weights})", flush=True)
        (directory / "results.json").write_text(json.dumps(results, indent=1))
        del model, ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["prepare", "run"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--models", default="resnet,mobilenetv2,bilstm")
    parser.add_argument("--small", action="store_true", help="the zoo's test-size models instead of full size")
    parser.add_argument("--number", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    if args.mode == "prepare":
        prepare(args.directory, args.models.split(","), args.small)
    else:
        run(args.directory, args.number, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
