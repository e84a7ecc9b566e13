"""Latency benchmark: PyTorch eager vs ONNX Runtime vs ours, same run, interleaved, medians.

    python benchmarks/run.py [--models resnet,mobilenetv2,vgg,bilstm] [--rounds 20] [--torch-compile]

Batch 1, fp32, the zoo models at full size. Every runner is timed by wall clock around one call (inputs already in
the runner's format), rounds interleave the runners so machine noise hits all of them alike, and we report the
median. Also measures the conv+pool fusion (VGG-style compiled with and without ``fuse-conv-pool``) and channel
pruning (ResNet-18-like with and without ``prune-channels{ratio=0.5}``). Writes
``benchmarks/results/latest.md`` and ``latest.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORES = os.cpu_count() or 1
os.environ.setdefault("TVM_NUM_THREADS", str(CORES))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import passes  # noqa: E402
from examples import zoo  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NO_CONV_POOL = ["remove-identities", "fold-constants", "eliminate-common-subexpressions", "fold-batch-norm",
                "fuse-conv-activation", "eliminate-dead-nodes"]


def onnx_runtime_runner(model: torch.nn.Module, inputs: tuple) -> Callable[[], object]:

    buffer = io.BytesIO()
    names = [f"input_{i}" for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, buffer, input_names=names, dynamo=False, opset_version=17)
    session = onnx_runtime_session(buffer.getvalue())
    feed = {n: x.numpy() for n, x in zip(names, inputs)}
    return lambda: session.run(None, feed)


def onnx_runtime_session(model: bytes | str):
    """An ONNX Runtime CPU session on all cores, every graph optimization on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = CORES
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def onnx_runtime_quantized_session(model: torch.nn.Module, inputs: tuple, quantize: Callable[[str, str], object]):
    """``model`` exported to ONNX (one input, ``input_0``), quantized by ONNX Runtime's ``quantize(fp32_path,
    int8_path)``, in a session."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32, int8 = os.path.join(folder, "fp32.onnx"), os.path.join(folder, "int8.onnx")
        torch.onnx.export(model, inputs, fp32, input_names=["input_0"], dynamo=False, opset_version=17)
        quantize(fp32, int8)
        return onnx_runtime_session(int8)


def interleaved_medians(runners: dict[str, Callable[[], object]], rounds: int, block: int = 3
                        ) -> dict[str, float]:
    """Median ms per call. Each round gives every runner a short block of calls after a pause and one untimed
    warm-up call: each runtime keeps worker threads spinning after a call, and without the pause those threads
    would steal the cores from whichever runtime runs next."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            time.sleep(0.05)
            run()
            for _ in range(block):
                start = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_model(name: str, rounds: int, torch_compile: bool, tune_trials: int, database: str) -> dict[str, float]:
    model, inputs = zoo.make(name, full=True)
    numpy_inputs = [x.numpy() for x in inputs]
    start = time.perf_counter()
    ours = passes.optimize(model, target="llvm", example_inputs=inputs, measure=False)
    build_s = time.perf_counter() - start
    tuned, tune_report = None, {}
    if tune_trials:
        tuned = passes.optimize(model, target="llvm", example_inputs=inputs, measure=False,
                                tune=passes.Tune(trials=tune_trials, database=database))
        tune_report = tuned.report.tune
    with torch.no_grad():
        expected = model(*inputs)
    error = passes.api._accuracy(expected if isinstance(expected, tuple) else (expected,),
                                 ours(*numpy_inputs) if isinstance(expected, tuple) else (ours(*numpy_inputs),))
    runners = {"pytorch": lambda: model(*inputs), "onnxruntime": onnx_runtime_runner(model, inputs),
               "ours": lambda: ours(*numpy_inputs)}
    if tuned is not None:
        runners["ours tuned"] = lambda: tuned(*numpy_inputs)
    if torch_compile:
        compiled = torch.compile(model)
        runners["torch.compile"] = lambda: compiled(*inputs)
    with torch.no_grad():
        medians = interleaved_medians(runners, rounds)
    flops = ours.report.flops["before"]
    print(f"  {name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in medians.items())
          + f" (compile {build_s:.1f} s, max rel error {error['max_rel_error']:.1e})", flush=True)
    return {**medians, "gflop": flops / 1e9, "compile_s": build_s, "rel_error": error["max_rel_error"],
            "tune_trials": tune_report.get("new_trials", 0), "tune_s": tune_report.get("seconds", 0.0)}


def bench_conv_pool(rounds: int) -> dict[str, float]:
    model, inputs = zoo.make("vgg", full=True)
    x = inputs[0].numpy()
    unfused = passes.optimize(model, passes=NO_CONV_POOL, example_inputs=inputs, measure=False)
    fused = passes.optimize(model, passes="default", example_inputs=inputs, measure=False)
    fusions = {p.name: p.stats for p in fused.report.passes}["fuse-conv-pool"]["fused"]
    medians = interleaved_medians({"unfused": lambda: unfused(x), "fused": lambda: fused(x)}, rounds)
    print(f"  conv+pool on vgg: unfused {medians['unfused']:.2f} ms, fused {medians['fused']:.2f} ms "
          f"({fusions} fusions), ratio {medians['fused'] / medians['unfused']:.3f}", flush=True)
    return {**medians, "fusions": fusions}


def bench_pruning(rounds: int) -> dict[str, float]:
    """ResNet-18-like with half of every prunable channel group removed (prune-channels{ratio=0.5}) vs unpruned,
    both through the default pipeline; latency and FLOPs ratios from the same run."""
    model, inputs = zoo.make("resnet", full=True)
    x = inputs[0].numpy()
    unpruned = passes.optimize(model, example_inputs=inputs, measure=False)
    pruned = passes.optimize(model, passes=["prune-channels{ratio=0.5}", "default"], example_inputs=inputs,
                             measure=False)
    medians = interleaved_medians({"unpruned": lambda: unpruned(x), "pruned": lambda: pruned(x)}, rounds)
    result = {**medians, "flops": pruned.report.flops["after"] / unpruned.report.flops["after"],
              "params": pruned.report.params["after"] / unpruned.report.params["after"]}
    print(f"  prune-channels 50% on resnet: unpruned {medians['unpruned']:.2f} ms, pruned {medians['pruned']:.2f} ms, "
          f"latency ratio {medians['pruned'] / medians['unpruned']:.3f}, FLOPs ratio {result['flops']:.3f}, "
          f"params ratio {result['params']:.3f}", flush=True)
    return result


# batch norms folded and activations fused first (quantize then folds them into the integer layers' clamps),
# then our static int8 (per-channel weights), then the usual fusions on what stays float
INT8_PIPELINE = ["fold-batch-norm", "fuse-conv-activation", "quantize", "default"]


def onnx_runtime_int8_runner(model: torch.nn.Module, inputs: tuple, calibration: list[tuple]
                             ) -> Callable[[], object]:
    """ONNX Runtime's own int8: quantize_static, QDQ format, per-channel int8 weights, calibrated on the same
    batches as ours (min-max)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input_0": x[0].numpy()} for x in calibration])

        def get_next(self):
            return next(self.items, None)

    session = onnx_runtime_quantized_session(model, inputs, lambda fp32, int8: quantize_static(
        fp32, int8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8))
    feed = {"input_0": inputs[0].numpy()}
    return lambda: session.run(None, feed)


INT8_MODELS = {"resnet": "ResNet-18-like", "mobilenetv2": "MobileNetV2-like"}


def bench_int8(rounds: int, name: str = "resnet", calibration_batches: int = 8) -> dict[str, float]:
    """A zoo CNN: ours int8 vs ours fp32 vs ONNX Runtime int8 and fp32, same run, same calibration inputs."""
    model, inputs = zoo.make(name, full=True)
    x = inputs[0].numpy()
    gen = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(inputs[0].shape, generator=gen),) for _ in range(calibration_batches)]
    ours_fp32 = passes.optimize(model, example_inputs=inputs, measure=False)
    ours_int8 = passes.optimize(model, passes=INT8_PIPELINE, example_inputs=inputs, data=calibration,
                                measure=False)
    runners = {"ours fp32": lambda: ours_fp32(x), "ours int8": lambda: ours_int8(x),
               "onnxruntime fp32": onnx_runtime_runner(model, inputs),
               "onnxruntime int8": onnx_runtime_int8_runner(model, inputs, calibration)}
    with torch.no_grad():
        medians = interleaved_medians(runners, rounds)
        expected = model(*inputs).numpy()
    medians["int8_rel_error"] = float(np.abs(ours_int8(x) - expected).max() / np.abs(expected).max())
    print(f"  int8 on {name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in medians.items() if k.endswith(("32", "8")))
          + f"; ours int8 / ONNX Runtime int8 {medians['ours int8'] / medians['onnxruntime int8']:.3f}", flush=True)
    return medians


def bench_lstm_int8(rounds: int) -> dict[str, float]:
    """BiLSTM classifier (zoo, full size) with dynamic int8 weights: ours (``quantize{mode=dynamic}``) vs ours fp32
    vs PyTorch ``quantize_dynamic`` (nn.LSTM + nn.Linear, qint8, fbgemm) vs ONNX Runtime ``quantize_dynamic``
    (DynamicQuantizeLSTM + MatMulInteger), same run; max error of each int8 model vs PyTorch fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, inputs = zoo.make("bilstm", full=True)
    x = inputs[0].numpy()
    ours_fp32 = passes.optimize(model, example_inputs=inputs, measure=False)
    ours_int8 = passes.optimize(model, passes=["quantize{mode=dynamic}", "default"], example_inputs=inputs,
                                measure=False)
    torch_int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.LSTM, torch.nn.Linear}, dtype=torch.qint8)
    session = onnx_runtime_quantized_session(model, inputs, lambda fp32, int8: quantize_dynamic(
        fp32, int8, weight_type=QuantType.QInt8))
    runners = {"ours fp32": lambda: ours_fp32(x), "ours int8": lambda: ours_int8(x),
               "pytorch int8": lambda: torch_int8(*inputs),
               "onnxruntime int8": lambda: session.run(None, {"input_0": x})}
    with torch.no_grad():
        medians = interleaved_medians(runners, rounds)
        expected = model(*inputs).numpy()
        outputs = {"ours int8": ours_int8(x), "pytorch int8": torch_int8(*inputs).numpy(),
                   "onnxruntime int8": session.run(None, {"input_0": x})[0]}
    scale = float(np.abs(expected).max())
    errors = {f"{k} error": float(np.abs(v - expected).max()) / scale for k, v in outputs.items()}
    print("  dynamic int8 on bilstm: " + ", ".join(f"{k} {v:.2f} ms" for k, v in medians.items())
          + "; max rel error vs PyTorch fp32: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
    return {**medians, **errors}


def write_results(rows: dict[str, dict[str, float]], conv_pool: dict[str, float] | None, machine: str,
                  pruning: dict[str, float] | None = None, int8: dict[str, dict[str, float]] | None = None,
                  lstm_int8: dict[str, float] | None = None) -> str:
    columns = [c for c in ("pytorch", "onnxruntime", "torch.compile", "ours", "ours tuned")
               if any(c in r for r in rows.values())]
    lines = [f"Machine: {machine}. Batch 1, fp32, median ms of interleaved rounds; ours = default pipeline with our "
             "default schedules, ours tuned = the same after tile autotuning. Each runner uses all cores.", "",
             "| model | GFLOP | " + " | ".join(columns) + " | ours / ONNX Runtime | ours / PyTorch |",
             "|---" * (len(columns) + 4) + "|"]
    for name, r in rows.items():
        cells = " | ".join(f"{r[c]:.2f}" for c in columns)
        best = min(r["ours"], r.get("ours tuned", r["ours"]))
        lines.append(f"| {name} | {r['gflop']:.2f} | {cells} | {best / r['onnxruntime']:.2f}x | "
                     f"{best / r['pytorch']:.2f}x |")
    tuned = {n: r for n, r in rows.items() if "ours tuned" in r}
    if tuned:
        lines += ["", "Tuning (trials measured this run / tuning wall time): " + ", ".join(
            f"{n} {r['tune_trials']} / {r['tune_s']:.0f} s" for n, r in tuned.items())
            + ". Ratios use the faster of ours and ours tuned."]
    if conv_pool:
        lines += ["", f"Conv+pool fusion (VGG-style, 224x224, {conv_pool['fusions']} fused layers): unfused "
                      f"{conv_pool['unfused']:.2f} ms, fused {conv_pool['fused']:.2f} ms, fused/unfused "
                      f"{conv_pool['fused'] / conv_pool['unfused']:.3f}."]
    if pruning:
        lines += ["", f"Channel pruning (ResNet-18-like, prune-channels{{ratio=0.5}} + default pipeline, same run): "
                      f"unpruned {pruning['unpruned']:.2f} ms, pruned {pruning['pruned']:.2f} ms, latency ratio "
                      f"{pruning['pruned'] / pruning['unpruned']:.3f}, FLOPs ratio {pruning['flops']:.3f}, params "
                      f"ratio {pruning['params']:.3f}."]
    for name, medians in (int8 or {}).items():
        times = ", ".join(f"{k} {medians[k]:.2f} ms" for k in ("ours fp32", "ours int8", "onnxruntime fp32",
                                                                "onnxruntime int8"))
        ratio = medians["ours int8"] / medians["onnxruntime int8"]
        lines += ["", f"Int8 ({INT8_MODELS[name]}, static, per-channel weights, same run and calibration inputs): "
                  + times + f"; ours int8 / ONNX Runtime int8 {ratio:.2f}x; ours int8 max relative error vs PyTorch "
                  f"fp32 {medians['int8_rel_error']:.3f}."]
    if lstm_int8:
        lines += ["", "Dynamic int8 (BiLSTM classifier, int8 LSTM and linear weights, same run): " + ", ".join(
            f"{k} {v:.2f} ms" for k, v in lstm_int8.items() if not k.endswith("error")) + "; max relative error vs "
            "PyTorch fp32: " + ", ".join(f"{k[:-6]} {v:.1e}" for k, v in lstm_int8.items() if k.endswith("error"))
            + "."]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.md").write_text(text)
    _plot(rows, columns)
    return text


def _plot(rows: dict[str, dict[str, float]], columns: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(columns)
    for i, column in enumerate(columns):
        ratios = [rows[m][column] / rows[m]["onnxruntime"] for m in rows]
        ax.bar(np.arange(len(rows)) + i * width, ratios, width, label=column)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(np.arange(len(rows)) + width * (len(columns) - 1) / 2, list(rows))
    ax.set_ylabel("latency / ONNX Runtime (lower is better)")
    ax.set_title("Batch-1 fp32 latency relative to ONNX Runtime")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "latest.png", dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,mobilenetv2,vgg,bilstm")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--torch-compile", action="store_true", help="add a torch.compile column (slow to build)")
    parser.add_argument("--skip-conv-pool", action="store_true")
    parser.add_argument("--skip-pruning", action="store_true")
    parser.add_argument("--skip-int8", action="store_true")
    parser.add_argument("--skip-lstm-int8", action="store_true")
    parser.add_argument("--tune-trials", type=int, default=0, help="add an 'ours tuned' column with this budget")
    parser.add_argument("--tuning-db", default=str(RESULTS / "tuning-db"))
    args = parser.parse_args()
    torch.set_num_threads(CORES)
    machine = f"{platform.processor() or platform.machine()}, {CORES} cores, torch {torch.__version__}"
    print(f"benchmarking on {machine}", flush=True)
    rows = {name: bench_model(name, args.rounds, args.torch_compile, args.tune_trials, args.tuning_db)
            for name in args.models.split(",")}
    conv_pool = None if args.skip_conv_pool else bench_conv_pool(args.rounds)
    pruning = None if args.skip_pruning else bench_pruning(args.rounds)
    int8 = None if args.skip_int8 else {name: bench_int8(args.rounds, name) for name in INT8_MODELS}
    lstm_int8 = None if args.skip_lstm_int8 else bench_lstm_int8(args.rounds)
    print(write_results(rows, conv_pool, machine, pruning, int8, lstm_int8))
    return 0


if __name__ == "__main__":
    sys.exit(main())
