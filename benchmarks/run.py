"""Latency on real architectures as users run them: ours vs PyTorch eager, ONNX Runtime and OpenVINO.

    pip install -c constraints.txt -e ".[dev,bench]"
    python benchmarks/run.py [--models resnet18,mobilenet_v2,...] [--rounds 7] [--tune-trials 60] [--int8]

Models: torchvision's resnet18, resnet50, mobilenet_v2, efficientnet_b0 and vgg11_bn at 224x224 (random seeded
weights, never downloaded), a 2-layer LSTM (hidden 256, 32 steps) and the zoo's BiLSTM classifier; batch 1, fp32.

How it measures, and why:
- Each runtime lives in its own worker process (``--worker``), prepared once: the thread pools of ONNX Runtime,
  OpenVINO, PyTorch and TVM spin after a call and would steal the cores of whichever runtime runs next in a shared
  process. Nothing sets ``TVM_NUM_THREADS`` or any other variable: every runtime runs with the threads it picks by
  itself (ours: one per physical core, configured by the library), except OpenVINO, given the settings a user
  follows from its documentation (CPU plugin, ``INFERENCE_PRECISION_HINT=f32``, one thread per core).
- Ours is called exactly as a user calls it: ``opt = passes.optimize(model, example_inputs=(x,))``, then ``opt(x)``
  with a torch tensor (conversion included); "ours tuned" adds ``tune=passes.Tune(trials=N)`` (budget in the table).
- Rounds alternate the runtimes (the order rotates each round), with a pause before each block so the previous
  runtime's spinning threads have stopped; every block starts with one untimed call. The table shows the median of
  all timed calls and the spread (lowest and highest per-round median).
- Each worker checks its outputs against PyTorch eager in its own process (max error relative to the output scale).
Writes ``benchmarks/results/latest.md`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROTOCOL = "@@ "  # worker lines that carry results start with this (libraries may print to stdout)

CNNS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "vgg11_bn")
RNNS = ("lstm", "bilstm")
RUNTIMES = ("pytorch", "onnxruntime", "openvino", "ours", "ours-tuned", "ours-direct")
INT8_RUNTIMES = ("onnxruntime-int8", "ours-int8")
LABELS = {"resnet18": "resnet18", "resnet50": "resnet50", "mobilenet_v2": "mobilenet_v2",
          "efficientnet_b0": "efficientnet_b0", "vgg11_bn": "vgg11_bn", "lstm": "LSTM 2x256, 32 steps",
          "bilstm": "BiLSTM classifier (zoo)"}


def make_model(name: str):
    """(eval-mode model, example inputs), seeded; torchvision models with random weights (no download)."""
    import torch

    torch.manual_seed(0)
    if name in CNNS:
        import torchvision

        return torchvision.models.get_model(name, weights=None).eval(), (torch.randn(1, 3, 224, 224),)
    if name == "lstm":
        class LSTM(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lstm = torch.nn.LSTM(256, 256, num_layers=2, batch_first=True)

            def forward(self, x):
                return self.lstm(x)[0]

        return LSTM().eval(), (torch.randn(1, 32, 256),)
    if name == "bilstm":
        sys.path.insert(0, str(ROOT))
        from examples import zoo

        return zoo.make("bilstm", seed=0, full=True)
    raise SystemExit(f"unknown model {name!r}: choose from {', '.join(CNNS + RNNS)}")


def _export_onnx(model, inputs, folder: str) -> str:
    import torch

    path = os.path.join(folder, "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, path, input_names=[f"input_{i}" for i in range(len(inputs))],
                          dynamo=False, opset_version=17)
    return path


def _calibration(inputs, batches: int = 8) -> list[tuple]:
    import torch

    generator = torch.Generator().manual_seed(1)
    return [tuple(torch.randn(x.shape, generator=generator) for x in inputs) for _ in range(batches)]


def prepare(runtime: str, model, inputs, folder: str, tune_trials: int, tuning_db: str
            ) -> tuple[Callable[[], object], dict]:
    """A zero-argument call of ``runtime`` on the example inputs, and facts for the table."""
    import torch

    feeds = {f"input_{i}": x.numpy() for i, x in enumerate(inputs)}
    if runtime == "pytorch":
        def run():
            with torch.no_grad():
                return model(*inputs)
        return run, {}
    if runtime in ("onnxruntime", "onnxruntime-int8"):
        import onnxruntime as ort

        path = _export_onnx(model, inputs, folder)
        if runtime == "onnxruntime-int8":  # ONNX Runtime's own int8: quantize_static, QDQ, per-channel, U8S8
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.items = iter([{f"input_{i}": x.numpy() for i, x in enumerate(b)}
                                       for b in _calibration(inputs)])

                def get_next(self):
                    return next(self.items, None)

            quantized = os.path.join(folder, "int8.onnx")
            quantize_static(path, quantized, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            path = quantized
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])  # ONNX Runtime's defaults
        return lambda: session.run(None, feeds), {}
    if runtime == "openvino":
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(_export_onnx(model, inputs, folder)), "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": _physical_cores()})
        request = compiled.create_infer_request()
        return lambda: request.infer(list(feeds.values())), {}
    if runtime.startswith("ours"):
        sys.path.insert(0, str(ROOT))
        import passes

        options = {}
        if runtime == "ours-tuned":
            options["tune"] = passes.Tune(trials=tune_trials, database=tuning_db, progress=False)
        if runtime == "ours-direct":  # Winograd off: every conv on the direct kernel (A/B for the Winograd choice)
            options["winograd"] = False
        if runtime == "ours-int8":
            options["passes"] = ["fold-batch-norm", "fuse-conv-activation", "quantize", "default"]
            options["data"] = _calibration(inputs)
        opt = passes.optimize(model, example_inputs=inputs, measure=False, **options)
        facts = {"tune_trials": opt.report.tune.get("new_trials", 0) if runtime == "ours-tuned" else 0,
                 "gflop": opt.report.flops["before"] / 1e9}
        if runtime == "ours-tuned":  # the budget spent and the guard's verdict, for the table's tuning line
            facts["tune"] = {k: opt.report.tune[k] for k in ("seconds", "tasks", "tuned_tasks", "failed_trials",
                                                             "remeasured_default_kept", "whole_model")
                             if k in opt.report.tune}
        return (lambda: opt(*inputs)), facts
    raise SystemExit(f"unknown runtime {runtime!r}")


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _max_rel_error(expected, actual) -> float:
    import numpy as np
    import torch

    def flat(value):
        if isinstance(value, (tuple, list)):
            return [a for v in value for a in flat(v)]
        if isinstance(value, dict):
            return flat(list(value.values()))
        if hasattr(value, "to_dict"):  # OpenVINO's result
            return flat(list(value.to_dict().values()))
        return [value.detach().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)]

    worst = 0.0
    for e, a in zip(flat(expected), flat(actual)):
        e, a = e.astype(np.float64), a.astype(np.float64)
        worst = max(worst, float(np.abs(e - a).max() / max(np.abs(e).max(), 1e-12)))
    return worst


def worker(args) -> int:
    """One runtime for one model: prepare, report, then time blocks of calls on request (stdin lines)."""
    import torch

    model, inputs = make_model(args.model)
    with torch.no_grad():
        expected = model(*inputs)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        try:
            run, facts = prepare(args.worker, model, inputs, folder, args.tune_trials, args.tuning_db)
            facts["rel_error"] = _max_rel_error(expected, run())
        except Exception as exc:  # reported in the table: a runtime that cannot take the model is a result
            print(PROTOCOL + json.dumps({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}),
                  flush=True)
            return 0
        facts["prepare_s"] = time.perf_counter() - start
        print(PROTOCOL + json.dumps(facts), flush=True)
        for line in sys.stdin:
            if not line.startswith("time"):
                break
            run()  # one untimed call: caches and thread pools warm after the pause
            samples = []
            for _ in range(int(line.split()[1])):
                begin = time.perf_counter()
                run()
                samples.append((time.perf_counter() - begin) * 1e3)
            print(PROTOCOL + json.dumps({"ms": samples}), flush=True)
    return 0


class Worker:
    def __init__(self, runtime: str, model: str, args):
        command = [sys.executable, __file__, "--worker", runtime, "--model", model,
                   "--tune-trials", str(args.tune_trials), "--tuning-db", args.tuning_db]
        self.runtime = runtime
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        stderr=subprocess.DEVNULL if not args.verbose else None)
        self.facts = self._read()

    def _read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        return {"error": f"worker exited with code {self.process.wait()}"}

    def time(self, calls: int) -> list[float]:
        self.process.stdin.write(f"time {calls}\n")
        self.process.stdin.flush()
        return self._read()["ms"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        self.process.wait()


def bench_model(name: str, runtimes: list[str], args) -> dict[str, dict]:
    """Prepare every runtime's worker one after another (compiles don't share the cores), then alternate them."""
    workers = []
    for runtime in runtimes:
        w = Worker(runtime, name, args)
        status = w.facts.get("error") or f"ready in {w.facts['prepare_s']:.1f} s"
        print(f"  {name} / {runtime}: {status}", flush=True)
        if "error" in w.facts:
            w.close()
        workers.append(w)
    live = [w for w in workers if "error" not in w.facts]
    samples: dict[str, list[list[float]]] = {w.runtime: [] for w in live}
    for r in range(args.rounds):
        for w in live[r % len(live):] + live[:r % len(live)] if live else []:
            time.sleep(args.pause)
            samples[w.runtime].append(w.time(args.calls))
    for w in live:
        w.close()
    result = {}
    for w in workers:
        if "error" in w.facts:
            result[w.runtime] = {"error": w.facts["error"]}
            continue
        rounds = samples[w.runtime]
        per_round = [statistics.median(s) for s in rounds]
        result[w.runtime] = {**w.facts, "ms": statistics.median([x for s in rounds for x in s]),
                             "low": min(per_round), "high": max(per_round)}
    return result


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if "error" in entry:
        return "fails"
    return f"{entry['ms']:.2f} ({entry['low']:.2f}-{entry['high']:.2f})"


def _tune_summary(tune: dict) -> str:
    """One line per tuned model: time spent, tasks, and what the whole-model guard kept."""
    guard = tune.get("whole_model")
    kept = (f"whole model tuned {guard['tuned_ms']} vs untuned {guard['untuned_ms']} ms: kept {guard['kept']}"
            if guard else "no whole-model comparison (nothing tuned)")
    return (f"tuning took {tune.get('seconds', '-')} s, {tune.get('tuned_tasks', '-')} of {tune.get('tasks', '-')} "
            f"tasks tuned, {tune.get('failed_trials', 0)} failed trials, {tune.get('remeasured_default_kept', 0)} "
            f"kept their default after the re-measure; {kept}")


def write_results(rows: dict[str, dict[str, dict]], runtimes: list[str], machine: str, args) -> str:
    def ms(row, key):
        entry = row.get(key)
        return entry["ms"] if entry and "ms" in entry else None

    int8 = any(r in INT8_RUNTIMES for r in runtimes)
    lines = [f"Machine: {machine}, load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())} at the end. "
             f"Batch 1, fp32; median ms of all timed calls (lowest-highest per-round median) "
             f"over {args.rounds} alternating rounds of {args.calls} calls, each runtime in its own process, no "
             "environment variables set. Ratios: ours (the faster of untuned and tuned) / the best of ONNX Runtime "
             "and OpenVINO, and / PyTorch eager. Errors: max |ours - PyTorch| / max |PyTorch|"
             + (" (int8 runtimes: against PyTorch's fp32 model; both calibrated on the same 8 seeded batches)"
                if int8 else "") + ".", "",
             "| model | GFLOP | " + " | ".join(runtimes) + " | ours / best(ORT, OpenVINO) | ours / PyTorch | "
             "ours error |" + (" ours-int8 / ORT-int8 | int8 error: ours, ORT |" if int8 else ""),
             "|---" * (len(runtimes) + 5 + 2 * int8) + "|"]
    failures = []
    for name, row in rows.items():
        ours = [v for v in (ms(row, "ours"), ms(row, "ours-tuned")) if v is not None]
        best_other = [v for v in (ms(row, "onnxruntime"), ms(row, "openvino")) if v is not None]
        ratio = f"{min(ours) / min(best_other):.2f}x" if ours and best_other else "-"
        vs_torch = f"{min(ours) / ms(row, 'pytorch'):.2f}x" if ours and ms(row, "pytorch") else "-"
        gflop = next((e["gflop"] for e in row.values() if "gflop" in e), None)
        error = row.get("ours", {}).get("rel_error")
        lines.append(f"| {LABELS.get(name, name)} | {gflop:.2f} | " if gflop is not None else f"| {name} | - | ")
        lines[-1] += " | ".join(_cell(row.get(r)) for r in runtimes) + f" | {ratio} | {vs_torch} | " + (
            f"{error:.1e} |" if error is not None else "- |")
        if int8:
            both = ms(row, "ours-int8"), ms(row, "onnxruntime-int8")
            errors = [row.get(r, {}).get("rel_error") for r in INT8_RUNTIMES[::-1]]
            lines[-1] += (f" {both[0] / both[1]:.2f}x |" if None not in both else " - |") + " " + ", ".join(
                f"{e:.1e}" if e is not None else "-" for e in errors) + " |"
        failures += [f"{name} / {r}: {e['error']}" for r, e in row.items() if "error" in e]
    tuned = {n: r["ours-tuned"] for n, r in rows.items() if "tune_trials" in r.get("ours-tuned", {})}
    if tuned:
        lines += ["", "Tuning: `passes.Tune(trials=" + str(args.tune_trials) + ")` per model, database "
                  f"`{args.tuning_db}` (trials measured in this run: "
                  + ", ".join(f"{n} {e['tune_trials']}" for n, e in tuned.items()) + ")."]
        lines += [f"- {n}: {_tune_summary(e.get('tune', {}))}" for n, e in tuned.items()]
    if failures:
        lines += ["", "Failures: " + "; ".join(failures) + "."]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.output).write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CNNS + RNNS))
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--int8", action="store_true", help="add ONNX Runtime int8 and ours int8 for the CNNs")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per runtime per round")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds of quiet before each block")
    parser.add_argument("--tune-trials", type=int, default=60, help="budget of 'ours-tuned' per model")
    parser.add_argument("--tuning-db", default=str(RESULTS / "tuning-db"))
    parser.add_argument("--output", default="latest.md")
    parser.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    runtimes = args.runtimes.split(",")
    machine = (f"{_cpu_name()}, {os.cpu_count()} logical / {_physical_cores()} physical cores, "
               f"{platform.python_implementation()} {platform.python_version()}")
    print(f"benchmarking on {machine}", flush=True)
    rows = {}
    for name in args.models.split(","):
        extra = list(INT8_RUNTIMES) if args.int8 and name in CNNS else []
        rows[name] = bench_model(name, runtimes + extra, args)
    print(write_results(rows, runtimes + (list(INT8_RUNTIMES) if args.int8 else []), machine, args))
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
