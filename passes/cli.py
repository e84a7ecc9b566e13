"""Command line: ``python -m passes.cli COMMAND``. A thin layer of argument parsing over ``passes.api``.

Commands: ``compile MODEL -o OUTDIR``, ``run OUTDIR INPUTS.npz -o OUTPUTS.npz``, ``inspect MODEL``,
``explain PASS MODEL``, ``list-passes``, ``list-ops``.
MODEL is a path to an ``.onnx`` file or ``zoo:NAME`` for a bundled example model.

Data-parallel distill/quantize: ``torchrun --nproc-per-node N -m passes.cli compile ... --data train.npz -o out/``
(rank 0 writes the artifact and prints; see ``cmd_compile``).

Exit codes: 0 success; 2 bad input or usage (one clear line on stderr, no traceback); 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(Exception):
    """Bad input or usage: printed as one line, exit code 2."""


def _load_zoo(spec: str) -> tuple[Any, tuple]:
    name = spec.split(":", 1)[1]
    try:
        from examples import zoo
    except ImportError:
        raise UsageError("the bundled model zoo (examples/zoo.py) is not importable: run from the repository "
                         "root") from None
    if name not in zoo.ZOO:
        raise UsageError(f"unknown zoo model {name!r}; available: {', '.join(sorted(zoo.ZOO))}")
    return zoo.make(name)


def _model_and_inputs(spec: str) -> tuple[Any, tuple | None]:
    if spec.startswith("zoo:"):
        return _load_zoo(spec)
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"model file {spec!r} does not exist")
    if path.is_dir():
        raise UsageError(f"model path {spec!r} is a folder; give an .onnx file")
    return str(path), None


def _input_shapes(specs: list[str] | None, model: str) -> dict[str, tuple[int, ...]] | None:
    """``--input-shape NAME:1x3x224x224`` (repeatable) -> {NAME: (1, 3, 224, 224)}; the name may contain ':'."""
    if not specs:
        return None
    if model.startswith("zoo:"):
        raise UsageError("--input-shape is for ONNX files; zoo models have fixed example inputs")
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, _, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not name or not shape or min(shape) <= 0:
            raise UsageError(f"--input-shape {spec!r}: expected NAME:DIMS with positive dims joined by 'x', "
                             "e.g. x:1x3x224x224")
        if name in shapes:
            raise UsageError(f"--input-shape names input {name!r} twice")
        shapes[name] = shape
    return shapes


def _progress(message: str) -> None:
    """Step messages on stderr when it is a terminal (stdout stays clean for --json; errors stay one line)."""
    if sys.stderr.isatty():
        print(f"... {message}", file=sys.stderr, flush=True)


def _load_data(path: str | None, batch_size: int) -> list[tuple] | None:
    """``--data FILE.npz``: arrays in the model's input order (any names) and optionally ``labels``, cut into
    batches of ``batch_size`` along the first axis (for passes that calibrate or fine-tune: quantize, distill)."""

    if path is None:
        return None
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    arrays = _read_npz(path, "--data")
    labels = arrays.pop("labels", None)
    if not arrays:
        raise UsageError(f"--data {path!r} holds no input arrays")
    count = {len(a) for a in arrays.values()} | ({len(labels)} if labels is not None else set())
    if len(count) != 1:
        raise UsageError(f"--data {path!r}: arrays differ in length along axis 0 ({sorted(count)})")
    columns = list(arrays.values()) + ([labels] if labels is not None else [])
    return [tuple(c[i:i + batch_size] for c in columns) for i in range(0, count.pop(), batch_size)]


def _read_npz(path: str, what: str) -> dict:
    """The arrays of an .npz file; a missing, garbage, truncated or pickled file is one UsageError line."""
    import zipfile

    import numpy as np

    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with archive:
            return {k: archive[k] for k in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"{what} {path!r}: cannot read it as .npz ({' '.join(str(e).split())})") from None


def _check_output_folder(output: str) -> None:
    """Before compiling (minutes): the artifact folder must not exist and its parent must be writable."""
    import shutil
    import tempfile

    path = Path(output)
    if path.exists():
        raise UsageError(f"output {output!r} already exists; choose a new folder or remove it first")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tempfile.mkdtemp(prefix=f".{path.name}.check.", dir=parent))
    except OSError as e:
        raise UsageError(f"cannot write the output folder {output!r}: {e.strerror or e} (in {str(parent)!r})") \
            from None


def cmd_compile(args) -> int:
    """Under ``torchrun`` every rank runs the pipeline (distill and quantize work on their shards of ``--data``);
    rank 0 alone tunes, measures, shows progress and logs, and writes the artifact; the other ranks exit 0."""
    from passes.api import Tune, optimize
    from passes.core import distributed

    model, inputs = _model_and_inputs(args.model)
    _check_output_folder(args.output)
    data = _load_data(args.data, args.batch_size)
    world = distributed.world()
    if not world.main:
        logging.getLogger().setLevel(logging.ERROR)
    passes = [] if args.passes == "" else (None if args.passes is None else args.passes)
    tune = Tune(trials=args.tune_trials, database=args.tuning_db,
                progress=sys.stderr.isatty() and not args.json) if args.tune_trials and world.main else None
    instruments = ["verify-each", "timing"]
    instruments += ["numeric-check-each"] if args.numeric_check_each else []
    instruments += [f"dump-each={args.dump_each}"] if args.dump_each and world.main else []
    opt = optimize(model, passes=passes, target=args.target, example_inputs=inputs, data=data, tune=tune,
                   measure=not args.no_measure and world.main, instruments=instruments, threads=args.threads,
                   progress=_progress if world.main and not args.json else None,  # --json: only errors on stderr
                   input_shapes=_input_shapes(args.input_shape, args.model), winograd=not args.no_winograd)
    if not world.main:
        return EXIT_OK
    opt.save(args.output)
    print(opt.report.to_json() if args.json else opt.report.summary())
    if not args.json:
        print(f"wrote {args.output}")
    return EXIT_OK


def cmd_run(args) -> int:
    import numpy as np

    from passes.api import load

    model = load(args.artifact, threads=args.threads)
    arrays = _read_npz(args.inputs, "inputs")
    names = [spec.name for spec in model.compiled.inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UsageError(f"inputs file lacks {missing}; the model's inputs are {names}")
    flat = model.compiled.run_flat(*[arrays[n] for n in names])
    output = Path(args.output)
    tmp = output.with_name(output.name + ".partial.npz")
    np.savez(tmp, **{spec.name: a for spec, a in zip(model.compiled.outputs, flat)})
    tmp.replace(output)
    print(f"wrote {len(flat)} output(s) to {output}")
    return EXIT_OK


def cmd_inspect(args) -> int:
    from passes.api import import_model
    from passes.ir.cost import graph_flops, graph_params, op_histogram

    model, inputs = _model_and_inputs(args.model)
    graph = import_model(model, inputs, _input_shapes(args.input_shape, args.model))
    info = {"model": graph.name,
            "inputs": {n: str(graph.nodes[n]["out_types"][0]) for n in graph.inputs},
            "outputs": [str(graph.value_type(v)) for v in graph.output_values()],
            "nodes": graph.number_of_nodes(), "ops": op_histogram(graph), "params": graph_params(graph),
            "flops": graph_flops(graph)}
    if args.json:
        print(json.dumps(info, indent=1))
        return EXIT_OK
    print(f"model {info['model']}: {info['nodes']} nodes, {info['params']:,} params, {info['flops']:,} FLOPs")
    print("inputs:  " + ", ".join(f"{k}: {v}" for k, v in info["inputs"].items()))
    print("outputs: " + ", ".join(info["outputs"]))
    for op, count in info["ops"].items():
        print(f"  {op:<24} {count}")
    if args.graph:
        from passes.ir.text import graph_text

        print(graph_text(graph, with_origin=True))
    return EXIT_OK


def _host_context(inputs, **fields):
    """The PassContext optimize() gives on this host (``lanes``: the llvm target's, sizing alter-layout's blocks)."""
    from backends.tvm.target import resolve_target
    from passes.core.pass_base import PassContext

    return PassContext(example_inputs=tuple(inputs or ()), lanes=resolve_target("llvm").lanes, **fields)


def cmd_explain(args) -> int:
    """Run the pipeline up to PASS with decision recording; print every candidate PASS considered and why."""
    from passes.api import import_model
    from passes.core.pipeline import Pipeline, resolve
    from passes.core.registry import get_pass_class

    if args.pass_name == "winograd":
        return _explain_winograd(args)
    target = get_pass_class(args.pass_name).name
    model, inputs = _model_and_inputs(args.model)
    graph = import_model(model, inputs, _input_shapes(args.input_shape, args.model))
    if args.passes is not None:
        pipeline = resolve(args.passes)
    else:  # optimize()'s pipeline up to PASS (alter-layout's followers need it); a pass outside it after "default"
        from passes.api import DEFAULT_PIPELINE

        pipeline = resolve(DEFAULT_PIPELINE)
        if target not in [p.name for p in pipeline]:
            pipeline = resolve("default")
    names = [p.name for p in pipeline]
    if target not in names:
        pipeline.append(resolve(target)[0])
        names.append(target)
    pipeline = pipeline[: names.index(target) + 1]  # stop after the pass being explained
    ctx = _host_context(inputs, explanations=[])
    Pipeline(pipeline).run(graph, ctx)
    decisions = [e for e in ctx.explanations if e.pass_name == target]
    print(f"{target}: {len(decisions)} candidate(s) after {', '.join(names[: names.index(target)]) or 'no pass'}")
    for e in decisions:
        mark = "skipped" if e.outcome.startswith("skipped.") else "REWRITTEN"
        reason = e.outcome.removeprefix("skipped.")
        print(f"  {mark:<9} {e.node:<28} ({e.origin}) {reason}{': ' + e.detail if e.detail else ''}")
    return EXIT_OK


def _explain_winograd(args) -> int:
    """``explain winograd MODEL``: after the pipeline, which convs the CPU backend builds as Winograd and why not."""
    from passes.api import explain_winograd, import_model
    from passes.core.pipeline import Pipeline, resolve

    model, inputs = _model_and_inputs(args.model)
    graph = import_model(model, inputs, _input_shapes(args.input_shape, args.model))
    Pipeline(resolve(args.passes if args.passes is not None else "default")).run(
        graph, _host_context(inputs))
    rows = explain_winograd(graph, "llvm", winograd=not args.no_winograd)
    chosen = sum(why.startswith("F(") for _, why in rows)
    print(f"winograd: {chosen} of {len(rows)} conv(s) on llvm")
    for node, why in rows:
        mark = "WINOGRAD" if why.startswith("F(") else "direct"
        print(f"  {mark:<9} {node:<28} ({', '.join(graph.nodes[node]['origin'])}) {why}")
    return EXIT_OK


def cmd_list_passes(args) -> int:
    from passes.core.registry import get_pass_class, pass_names

    names = pass_names()
    if not names:
        print("no passes registered")
    for name in names:
        cls = get_pass_class(name)
        options = ", ".join(f"{f.name}={f.default!r}" for f in cls.options())
        print(f"{name:<28} {cls.summary}" + (f"  [{options}]" if options else ""))
    return EXIT_OK


def cmd_list_ops(args) -> int:
    from passes.ir.ops import OPS

    for name in sorted(OPS):
        print(f"{name:<24} {OPS[name].doc}".rstrip())
    return EXIT_OK


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _threads_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help=f"CPU threads for {what} (default: one per physical core; TVM_NUM_THREADS wins if set)")


def _add_input_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                   help="static shape for an ONNX input with dynamic dims, e.g. x:1x3x224x224 (repeatable)")


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line on stderr (``--help`` still prints the usage); subcommands inherit it."""

    def error(self, message: str):
        raise UsageError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m passes.cli",
                                     description="Optimize and compile CNN/RNN models with Apache TVM.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="optimize and compile a model into a deployable artifact folder")
    p.add_argument("model", help="path to an .onnx file, or zoo:NAME for a bundled example model")
    p.add_argument("--passes", default=None, help="pipeline spec, e.g. 'fold-batch-norm,prune-channels{ratio=0.5}'"
                   " ('' for none; default: the default pipeline)")
    p.add_argument("--target", default="llvm", choices=["llvm", "cuda"])
    p.add_argument("--tune-trials", type=_count, default=0, help="trials of our kernel tile search in total (0: none)")
    p.add_argument("--tuning-db", default="~/.cache/passes/tuning", help="tuning database folder")
    p.add_argument("--no-measure", action="store_true", help="skip the accuracy check and latency measurement")
    p.add_argument("--numeric-check-each", action="store_true",
                   help="run the reference before/after each pass and name the pass that changed the outputs")
    p.add_argument("--dump-each", metavar="DIR", help="write the IR after each pass into DIR")
    p.add_argument("--data", metavar="NPZ", help="calibration/training data for quantize and distill: arrays in the "
                   "model's input order along axis 0, optionally 'labels'")
    p.add_argument("--batch-size", type=int, default=32, help="batch size to cut --data into (default 32)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-winograd", action="store_true", help="keep every conv on the direct kernel (by default "
                   "3x3 stride-1 fp32 convs with enough channels run as Winograd; see: explain winograd MODEL)")
    p.add_argument("-o", "--output", required=True, help="artifact folder to create (must not exist)")
    _threads_argument(p, "the latency measurement")
    _add_input_shape(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run a compiled artifact on inputs from an .npz file")
    p.add_argument("artifact")
    p.add_argument("inputs", help=".npz whose keys are the model's input names")
    p.add_argument("-o", "--output", required=True, help=".npz to write, keys are output names in model order")
    _threads_argument(p, "the model")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="op histogram, params, FLOPs and shapes of a model (no compile)")
    p.add_argument("model")
    p.add_argument("--graph", action="store_true", help="also print the IR")
    p.add_argument("--json", action="store_true")
    _add_input_shape(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("explain", help="list every candidate a pass considers and why it was or was not rewritten"
                       " ('explain winograd MODEL': which convs the CPU backend builds as Winograd, and why not)")
    p.add_argument("pass_name", metavar="PASS", help="a pass name, or 'winograd' (a kernel choice, not a pass)")
    p.add_argument("model")
    p.add_argument("--passes", default=None, help="pipeline to run before PASS (default: optimize()'s default "
                   "pipeline up to PASS, or the 'default' preset for a pass outside it)")
    p.add_argument("--no-winograd", action="store_true", help="with 'explain winograd': as compile --no-winograd")
    _add_input_shape(p)
    p.set_defaults(func=cmd_explain)

    sub.add_parser("list-passes", help="registered passes and their options").set_defaults(func=cmd_list_passes)
    sub.add_parser("list-ops", help="IR ops").set_defaults(func=cmd_list_ops)
    return parser


def _is_bad_input(exc: BaseException) -> bool:
    """User-facing errors (bad model, bad spec, bad inputs) versus bugs."""
    return isinstance(exc, (UsageError, ValueError, FileExistsError, FileNotFoundError, NotADirectoryError))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERNAL
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (silence the flush at interpreter exit)
        return EXIT_OK
    except Exception as exc:  # the one place exceptions become exit codes
        if args.verbose:
            raise
        message = " ".join(str(exc).split()) if _is_bad_input(exc) else f"internal error: {type(exc).__name__}: {exc}"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT if _is_bad_input(exc) else EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
