"""CUDA check for a GPU machine: build here, run there with TVM's runtime only, compare with PyTorch on that GPU.

    python benchmarks/gpu_check.py prepare DIR [--models resnet,mobilenetv2,bilstm,vgg,vgg-fused] [--small]
    TVM_USE_RUNTIME_LIB=1 python benchmarks/gpu_check.py run DIR                               # on the GPU machine

``prepare`` compiles each zoo model for ``cuda`` (sm_90) with the default pipeline and exports the artifact, with
the example inputs, the PyTorch CPU reference outputs and a checksum of the seeded weights. ``run`` loads each
artifact with TVM's runtime library alone (the deployment case: no compiler on the GPU machine), rebuilds the same
seeded PyTorch model there (the checksum proves the weights are the same), checks our outputs against PyTorch on
the GPU (TF32 off) and against the CPU reference, then times both on the GPU: wall clock around ``number`` calls
plus a device synchronize, median of ``repeat`` runs, for ours, PyTorch eager and PyTorch eager with
``cudnn.benchmark``. Prints one table; writes ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from examples import zoo  # noqa: E402

# The default pipeline refuses fuse-conv-pool on cuda (measured slower there); "vgg-fused" forces it for comparison.
VARIANTS = {"vgg-fused": ("vgg", ["remove-identities", "fold-constants", "eliminate-common-subexpressions",
                                  "fold-batch-norm", "fuse-conv-activation", "fuse-conv-add",
                                  "fuse-conv-pool{on_cuda=true}", "eliminate-dead-nodes"]),
            "resnet-pruned50": ("resnet", ["prune-channels{ratio=0.5}", "default"]),
            **{f"{m}-fp16": (m, ["default", "mixed-precision{dtype=fp16}"]) for m in ("resnet", "mobilenetv2", "vgg")}}


def _checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().abs().sum() for p in model.state_dict().values() if p.is_floating_point()))


def _make(entry: str, small: bool):
    name = VARIANTS.get(entry, (entry, None))[0]
    return zoo.make(name, seed=0, full=not small)


def prepare(directory: Path, entries: list[str], small: bool) -> None:
    import passes

    for entry in entries:
        model, inputs = _make(entry, small)
        pipeline = VARIANTS.get(entry, (entry, None))[1]
        start = time.perf_counter()
        opt = passes.optimize(model, passes=pipeline, target="cuda", example_inputs=inputs, measure=False)
        folder = directory / entry
        opt.compiled.export(folder)
        with torch.no_grad():
            expected = model(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        np.savez(folder / "data.npz", **{f"input_{i}": x.numpy() for i, x in enumerate(inputs)},
                 **{f"expected_{i}": y.numpy() for i, y in enumerate(expected)})
        (folder / "meta.json").write_text(json.dumps({"checksum": _checksum(model), "small": small}))
        print(f"{entry}: built for cuda in {time.perf_counter() - start:.1f} s", flush=True)


def _caller(model, inputs):
    return lambda: model(*inputs)


def _wall_ms(call, sync, number: int, repeat: int) -> float:
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
    return statistics.median(runs)


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


def run(directory: Path, number: int, repeat: int) -> None:
    import tvm

    from backends.tvm.module import CompiledModule

    _load_cuda_runtime()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, TVM runtime-only "
          f"{getattr(tvm.base, '_RUNTIME_ONLY', '?')}", flush=True)
    results = {}
    for folder in sorted(p for p in directory.iterdir() if (p / "meta.json").exists()):
        entry = folder.name
        meta = json.loads((folder / "meta.json").read_text())
        data = np.load(folder / "data.npz")
        inputs = [data[k] for k in sorted(data) if k.startswith("input_")]
        expected = [data[k] for k in sorted(data) if k.startswith("expected_")]
        model, _ = _make(entry, meta["small"])
        same_weights = abs(_checksum(model) - meta["checksum"]) <= 1e-9 * max(1.0, meta["checksum"])
        ours = CompiledModule.load(folder)
        got = ours.run_flat(*inputs)
        row = {"rel_error_vs_cpu_reference": _max_rel_error(got, expected), "same_weights": same_weights}
        model = model.to(device)
        torch_inputs = [torch.from_numpy(x).to(device) for x in inputs]
        with torch.no_grad():
            reference = model(*torch_inputs)
            reference = reference if isinstance(reference, tuple) else (reference,)
            row["rel_error_vs_torch_gpu"] = _max_rel_error(got, [r.cpu().numpy() for r in reference])
            row["torch_gpu_vs_cpu_reference"] = _max_rel_error([r.cpu().numpy() for r in reference], expected)
            sync, call = torch.cuda.synchronize, _caller(model, torch_inputs)
            row["torch_eager_ms"] = _wall_ms(call, sync, number, repeat)
            torch.backends.cudnn.benchmark = True
            row["torch_cudnn_benchmark_ms"] = _wall_ms(call, sync, number, repeat)
            torch.backends.cudnn.benchmark = False
            half = _caller(copy.deepcopy(model).half(), [x.half() for x in torch_inputs])
            row["torch_fp16_eager_ms"] = _wall_ms(half, sync, number, repeat)
        row["ours_ms"] = ours.time_ms(*inputs, number=number, repeat=repeat)
        row["ours_vs_torch_eager"] = row["ours_ms"] / row["torch_eager_ms"]
        results[entry] = row
        print(f"{entry}: ours {row['ours_ms']:.3f} ms, torch eager {row['torch_eager_ms']:.3f} ms, cudnn.benchmark "
              f"{row['torch_cudnn_benchmark_ms']:.3f} ms, torch fp16 {row['torch_fp16_eager_ms']:.3f} ms, ratio "
              f"{row['ours_vs_torch_eager']:.2f}; max rel error vs "
              f"torch GPU {row['rel_error_vs_torch_gpu']:.1e}, vs CPU reference {row['rel_error_vs_cpu_reference']:.1e}"
              f" (same weights: {same_weights})", flush=True)
    (directory / "results.json").write_text(json.dumps(results, indent=1))


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
