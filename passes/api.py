"""``optimize()``: frontend -> pass pipeline -> backend, returning a callable ``OptimizedModel``.

This is the only module of ``passes`` that imports ``frontend`` and ``backends`` (lazily, inside functions), so the
core stays independent of torch.fx, ONNX and TVM.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from passes.core.pass_base import Pass, PassContext
from passes.report import Report


@dataclass(frozen=True)
class Tune:
    """Autotuning request: ``trials`` trials of our kernel tile search in total (``backends/tvm/tune.py``, not
    meta-schedule), records kept in ``database`` (a folder), candidates measured locally or through a TVM RPC
    tracker ``rpc="host:port:key"``; ``progress``: a tqdm bar on a terminal."""

    trials: int = 0
    database: str = "~/.cache/passes/tuning"
    rpc: str | None = None
    timeout: float = 30.0
    progress: bool = True


class OptimizedModel:
    """The result of ``optimize``: call it like the original model; ``graph``, ``report``, ``save``."""

    def __init__(self, graph, compiled, report: Report):
        self.graph = graph
        self.compiled = compiled
        self.report = report

    def __call__(self, *inputs: Any) -> Any:
        return self.compiled(*inputs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a deployable artifact folder: TVM library, signature, IR (graph.json + params.npz), report.

        Written into a temporary sibling folder ``.NAME.PID.*`` and renamed at the end, so a failure leaves nothing
        behind; a folder left by a process that was killed midway (its PID gone) is removed on the next save.
        """
        from backends.tvm.artifact import write_manifest
        from passes.ir.serialize import save_graph

        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} already exists; choose a new folder or remove it first")
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(path)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", dir=path.parent))
        try:
            self.compiled.export(staging)
            save_graph(self.graph, staging / "ir")
            onnx = _export_onnx(self.graph, staging / "optimized.onnx")
            self.report.memory["artifact"] = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
            (staging / "report.json").write_text(self.report.to_json())
            write_manifest(staging, onnx=onnx)
            staging.rename(path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return path


def _remove_stale_staging(path: Path) -> None:
    """Remove ``.NAME.PID.*`` staging folders next to ``path`` whose process no longer exists (killed mid-save)."""
    for folder in path.parent.glob(f".{glob.escape(path.name)}.*.*"):
        pid = folder.name[len(path.name) + 2:].split(".", 1)[0]
        if folder.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _export_onnx(graph, path: Path) -> str:
    """The optimized graph as ONNX next to the TVM library, when every op has an ONNX form."""
    from backends.onnx import ExportError, export_onnx

    try:
        export_onnx(graph, path)
        return path.name
    except ExportError as exc:
        return f"not exported: {exc}"


class LoadedModel:
    """A saved artifact loaded with the TVM runtime only (no tracing, no torch)."""

    def __init__(self, compiled, report: Report, path: Path):
        self.compiled = compiled
        self.report = report
        self.path = path

    def __call__(self, *inputs: Any) -> Any:
        return self.compiled(*inputs)

    @property
    def graph(self):
        from passes.ir.serialize import load_graph

        return load_graph(self.path / "ir")


def load(path: str | os.PathLike, threads: int | None = None) -> LoadedModel:
    """Load an artifact written by ``OptimizedModel.save`` (or ``passes.cli compile``).

    An artifact contains native code: load only artifacts you trust. Every file's sha256 is checked against
    ``artifact.json`` before anything is parsed or loaded, and each JSON file against its schema: a fault is one
    ``ArtifactError`` (a ``ValueError``) naming the file and the field. A missing or broken ``report.json`` only
    costs the report (a warning): the model still runs. ``threads``: CPU threads it runs on (None: one per physical
    core; ``TVM_NUM_THREADS`` set in the environment wins).
    """
    from backends.tvm.artifact import verify
    from backends.tvm.module import CompiledModule

    path = Path(path)
    verify(path)
    compiled = CompiledModule.load(path, threads)
    return LoadedModel(compiled, _load_report(path / "report.json"), path)


def _load_report(path: Path) -> Report:
    """The saved report, or an empty one with a warning: the report is documentation, not needed to run."""
    from backends.tvm.artifact import ArtifactError, read_json

    try:
        return Report.from_dict(read_json(path))
    except (ArtifactError, KeyError, TypeError, ValueError, AttributeError) as e:
        logging.getLogger(__name__).warning("%s: report not loaded (%s); the model runs without it", path, e)
        return Report()


# ``alter-layout`` last: it rewrites convs into ``conv2d_nchwc``, which the passes of the "default" preset (and
# quantize, mixed-precision, prune-channels, often run after it) do not match; ``passes=["default"]`` leaves it out.
# ``fold-channel-scale`` and ``fuse-expand-depthwise`` work on the ``conv2d_nchwc`` it makes.
DEFAULT_PIPELINE: tuple[str, ...] = ("default", "alter-layout", "fold-channel-scale", "fuse-expand-depthwise")


def import_model(model: Any, example_inputs: Sequence[Any] | None = None,
                 input_shapes: dict[str, Sequence[int]] | None = None):
    """Frontend dispatch: an ``nn.Module`` goes through torch.fx, a path to ``.onnx`` through the ONNX frontend
    (``input_shapes``: static shapes for the file's inputs, replacing dynamic dims)."""
    if isinstance(model, (str, os.PathLike)):
        from frontend.onnx import from_onnx

        shapes = {name: tuple(shape) for name, shape in input_shapes.items()} if input_shapes else None
        return from_onnx(model, input_shapes=shapes)
    if input_shapes:
        raise ValueError("input_shapes is for ONNX files; a PyTorch model's shapes come from example_inputs")
    from frontend.torch_fx import from_torch

    if example_inputs is None:
        raise ValueError("optimize(nn.Module) needs example_inputs=(tensor, ...) to fix input shapes and dtypes")
    return from_torch(model, example_inputs)


def _accuracy(reference_outputs: Any, outputs: Any) -> dict[str, float]:
    """Worst absolute error and error relative to the output scale, over all output tensors."""
    import numpy as np

    from passes.ir.graph import flatten_structure

    worst_abs, worst_rel = 0.0, 0.0
    for ref, out in zip(flatten_structure(reference_outputs), flatten_structure(outputs)):
        ref, out = np.asarray(_to_numpy(ref), dtype=np.float64), np.asarray(_to_numpy(out), dtype=np.float64)
        if not ref.size:
            continue
        err = float(np.max(_nan_aware_error(ref, out)))
        scale = np.abs(ref[np.isfinite(ref)])
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / max(float(np.max(scale)) if scale.size else 0.0, 1e-12))
    return {"max_abs_error": worst_abs, "max_rel_error": worst_rel}


def _nan_aware_error(ref, out):
    """|ref - out| elementwise, 0 where both are the same NaN or infinity, inf where only one side is NaN or they
    are different infinities. Why: Python's ``max`` and ``np.abs(ref - out)`` let a NaN output pass as error 0."""
    import numpy as np

    with np.errstate(invalid="ignore"):
        err = np.abs(ref - out)
    same = (ref == out) | (np.isnan(ref) & np.isnan(out))
    return np.where(same, 0.0, np.where(np.isnan(err), np.inf, err))


def optimize(model: Any, passes: Sequence[str | Pass] | str | None = None, target: str = "llvm",
             example_inputs: Sequence[Any] | None = None, data: Iterable | None = None,
             tune: Tune | None = None, measure: bool = True,
             instruments: Sequence[Any] = ("verify-each",),
             progress: Callable[[str], None] | None = None, threads: int | None = None,
             input_shapes: dict[str, Sequence[int]] | None = None, winograd: bool = True) -> OptimizedModel:
    """Optimize and compile ``model`` for ``target``.

    Example::

        import passes, torch
        opt = passes.optimize(model, passes=["fold-batch-norm"], target="llvm",
                              example_inputs=(torch.randn(1, 3, 224, 224),))
        y = opt(x)                       # same signature and output structure as model(x)
        print(opt.report.to_dict()["flops"])
        opt.save("model.art")            # later: passes.load("model.art")(x)

    ``passes``: names, text specs or ``Pass`` instances; ``None`` runs the default pipeline, ``[]`` runs none.
    ``data``: iterable of input tuples for passes that calibrate or fine-tune. ``measure``: time the compiled
    model on the example inputs and check it against the original (PyTorch or ONNX Runtime) for the report.
    ``instruments``: ``"verify-each"`` (default), ``"numeric-check-each"``, ``"timing"``, ``"dump-each=DIR"``.
    ``progress``: called with a short message as each step starts (the CLI prints them).
    ``threads``: CPU threads the compiled model runs on (None: one per physical core the process may use; a
    ``TVM_NUM_THREADS`` set by the user wins). No environment set-up is needed for full speed.
    ``input_shapes``: for an ONNX file, static shapes by input name that replace its declared (e.g. dynamic batch)
    dims, as onnxsim's ``--overwrite-input-shape``: ``optimize("m.onnx", input_shapes={"x": (1, 3, 224, 224)})``.
    ``winograd``: False keeps every conv on the direct kernel (by default 3x3 stride-1 float32 convs with enough
    channels run as Winograd F(4x4,3x3) or F(2x2,3x3) on CPU; ``python -m passes.cli explain winograd MODEL``
    lists which).
    """
    step = progress or (lambda message: None)
    if _is_tensor(example_inputs):  # a bare tensor is the one input, not a sequence of its rows
        example_inputs = (example_inputs,)
    from backends.tvm.module import build
    from backends.tvm.target import resolve_target
    from passes.core.pipeline import Pipeline, make_instruments, resolve
    from passes.ir.cost import graph_flops, graph_params, graph_weight_bytes, peak_activation_bytes

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    step("importing the model")
    graph = import_model(model, example_inputs, input_shapes)
    seconds["import"] = time.perf_counter() - start
    if example_inputs is None:
        example_inputs = tuple(_random_inputs(graph))
    example_inputs = tuple(example_inputs)
    _refuse_empty_inputs(graph, example_inputs)
    report = Report(model=graph.name, target=str(target))
    report.flops["before"], report.params["before"] = graph_flops(graph), graph_params(graph)
    report.nodes["before"] = graph.number_of_nodes()
    report.memory["weights_before"] = graph_weight_bytes(graph)
    report.memory["activations_before"] = peak_activation_bytes(graph)

    pipeline = Pipeline(resolve(DEFAULT_PIPELINE if passes is None else passes),
                        make_instruments(instruments, example_inputs))
    if data is not None and iter(data) is data:  # a generator: several passes may read the data
        data = list(data)
    backend_target = resolve_target(target, winograd=winograd)  # once: the passes, tuning and the build read it
    ctx = PassContext(example_inputs=example_inputs, data=data, target=str(target), lanes=backend_target.lanes,
                      original=graph, progress=progress)
    optimized = graph.copy_graph()
    start = time.perf_counter()
    step(f"running {len(pipeline.passes)} passes")
    report.passes = pipeline.run(optimized, ctx)
    seconds["passes"] = time.perf_counter() - start
    report.flops["after"], report.params["after"] = graph_flops(optimized), graph_params(optimized)
    report.nodes["after"] = optimized.number_of_nodes()
    report.memory["weights_after"] = graph_weight_bytes(optimized)
    report.memory["activations_after"] = peak_activation_bytes(optimized)

    tiles = None
    if tune is not None:
        start = time.perf_counter()
        step(f"tuning ({tune.trials} trials)")
        tiles, report.tune = _tune(optimized, backend_target, tune)
        seconds["tune"] = time.perf_counter() - start
    start = time.perf_counter()
    step(f"building for {target} with TVM")
    compiled = build(optimized, backend_target, tiles, threads)
    if tiles and tune.rpc is None and compiled.target_kind == "llvm":
        from backends.tvm.tune import keep_faster

        step("timing the tuned build against the untuned one")
        untuned = build(optimized, backend_target, None, threads)
        compiled, report.tune["whole_model"] = keep_faster(compiled, untuned, example_inputs)
    seconds["build"] = time.perf_counter() - start
    if compiled.activation_bytes is not None:
        report.memory["activations_compiled"] = compiled.activation_bytes
    if measure and compiled.target_kind != "cuda":
        step("checking accuracy and measuring latency")
        original = _original_runner(model, graph, example_inputs)
        outputs = compiled(*[_to_numpy(x) for x in example_inputs])
        if original is None:  # an ONNX file without ONNX Runtime installed: the imported graph is the reference
            from passes.ir.interpret import run_reference

            report.accuracy = _accuracy(run_reference(graph, example_inputs), outputs)
            report.accuracy["reference"] = "interpreter"
        else:
            name, run = original
            report.accuracy = _accuracy(run(), outputs)
            report.accuracy["reference"] = "onnxruntime" if name == "onnxruntime" else "pytorch"
            report.baselines_ms[name] = _median_ms(run)
        report.latency_ms = compiled.time_ms(*example_inputs, number=1, repeat=7)
    report.seconds = seconds
    return OptimizedModel(optimized, compiled, report)


def explain_winograd(graph, target: str = "llvm", winograd: bool = True) -> list[tuple[str, str]]:
    """(node, decision) for each conv of an optimized ``graph``: the Winograd tile the backend builds it with on
    ``target``, or why it keeps the direct kernel (``backends.tvm.select.explain_winograd``)."""
    from backends.tvm.select import explain_winograd as explain
    from backends.tvm.target import resolve_target

    resolved = resolve_target(target, winograd=winograd)
    return explain(graph, resolved.kind, resolved.lanes, resolved.winograd)


def _tune(graph, target, tune: Tune) -> tuple[dict, dict]:
    """Tune (``trials > 0``) or just apply what the database knows (``trials == 0``); CPU targets only.
    ``target``: the backend's ``Target`` (``backends.tvm.target.resolve_target``)."""
    from backends.tvm.tune import tune_graph, tuned_tiles

    if target.kind != "llvm":
        return {}, {"new_trials": 0, "note": f"tuning is implemented for llvm targets, not {target.kind}"}
    if tune.trials <= 0:
        skipped: dict[str, int] = {}
        tiles = tuned_tiles(graph, target, tune.database, skipped)
        return tiles, {"new_trials": 0, "tuned_tasks": len(tiles), "database": str(tune.database),
                       "skipped_lines": skipped}
    return tune_graph(graph, target, tune.trials, tune.database, tune.rpc, tune.timeout, progress=tune.progress)


def _is_tensor(x: Any) -> bool:
    import numpy as np

    return isinstance(x, np.ndarray) or type(x).__module__.startswith("torch")


def _refuse_empty_inputs(graph, example_inputs: tuple) -> None:
    """A zero-size example input (batch 0) fixes zero-size shapes the kernels cannot be scheduled for."""
    for node, t in zip(graph.inputs, graph.input_types()):
        if 0 in t.shape:
            raise ValueError(f"input {graph.describe(node)} has a zero-size shape {list(t.shape)}; give example "
                          "inputs with at least one element along every axis (e.g. batch 1)")


def _to_numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if type(x).__module__.startswith("torch") else x


def _original_runner(model: Any, graph, example_inputs: tuple) -> tuple[str, Callable[[], Any]] | None:
    """(baseline name, a zero-argument call of the original model on the example inputs), built once and used for
    both the accuracy reference and the latency baseline: PyTorch eager for an ``nn.Module``, ONNX Runtime for an
    ONNX file (None when ONNX Runtime is not installed)."""
    if isinstance(model, (str, os.PathLike)):
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        feeds = {graph.nodes[n]["origin"][0]: _to_numpy(x) for n, x in zip(graph.inputs, example_inputs)}
        return "onnxruntime", lambda: tuple(session.run(None, feeds))
    import torch

    def run():
        with torch.no_grad():
            return model(*example_inputs)
    return "pytorch-eager", run


def _median_ms(run: Callable[[], Any], repeat: int = 7) -> float:
    """Median wall time of ``run`` after one warm-up call."""
    import statistics

    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _random_inputs(graph) -> list:
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = []
    for t in graph.input_types():
        if t.dtype.startswith("float"):
            arrays.append(rng.standard_normal(t.shape).astype(t.dtype))
        else:
            arrays.append(np.zeros(t.shape, dtype=t.dtype))
    return arrays
