"""Pipelines: parse pass specs, instantiate passes with typed options, run them with instruments.

Spec grammar (CLI and Python strings): ``name`` or ``name{key=value,key=value}``, comma-separated at top level,
e.g. ``fold-batch-norm,prune-channels{ratio=0.5,round_to=8}``. Values are converted to the option's declared
type (int, float, bool, str, tuple of those).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from passes.core.pass_base import ALL_PROPERTIES, Pass, PassContext, PassError, PassResult
from passes.core.registry import get_pass_class, preset
from passes.ir.graph import Graph
from passes.ir.verify import verify
from passes.report import PassRecord

log = logging.getLogger(__name__)


def split_specs(text: str) -> list[str]:
    """Split on commas outside braces: ``a,b{x=1,y=2}`` -> ``["a", "b{x=1,y=2}"]``."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PassError(f"unbalanced '}}' in pass spec {text!r}")
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if depth:
        raise PassError(f"unbalanced '{{' in pass spec {text!r}")
    parts.append(current.strip())
    return [p for p in parts if p]


def _convert(value: str, annotation: Any, where: str) -> Any:
    """``value`` as the option's type; ``annotation`` is resolved (``typing.get_type_hints``), never a string."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis} or {str}
        return tuple(_convert(v, item, where) for v in value.split(";") if v.strip())
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise PassError(f"{where}: expected true/false, got {value!r}")
    try:
        return annotation(value)
    except (TypeError, ValueError):
        raise PassError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}") from None


def parse_spec(spec: str) -> Pass:
    """One pass from ``name`` or ``name{key=value,...}``."""
    spec = spec.strip()
    name, _, rest = spec.partition("{")
    name = name.strip()
    cls = get_pass_class(name)
    options: dict[str, Any] = {}
    if rest:
        if not rest.endswith("}"):
            raise PassError(f"pass spec {spec!r}: missing closing '}}'")
        body = rest[:-1].strip()
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for item in filter(None, (s.strip() for s in body.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq:
                raise PassError(f"pass {name!r}: option {item!r} must be key=value")
            if key not in fields:
                known = ", ".join(f"{k}: {getattr(hints.get(k), '__name__', hints.get(k))}" for k in fields)
                raise PassError(f"pass {name!r} has no option {key!r}; options: {known or 'none'}")
            options[key] = _convert(value.strip(), hints.get(key, str), f"pass {name!r} option {key!r}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise PassError(f"pass {name!r}: {exc}") from None


def resolve(passes: Sequence[str | Pass | type[Pass]] | str) -> list[Pass]:
    """Pass instances from a spec string, names/specs, classes, or instances."""
    if isinstance(passes, str):
        passes = split_specs(passes)
    resolved = []
    for item in passes:
        if isinstance(item, Pass):
            resolved.append(item)
        elif isinstance(item, type) and issubclass(item, Pass):
            resolved.append(item())
        elif isinstance(item, str):
            for spec in split_specs(item):
                expansion = preset(spec.strip())
                resolved.extend(resolve(list(expansion)) if expansion else [parse_spec(spec)])
        else:
            raise PassError(f"cannot use {item!r} as a pass: give a name, a spec string or a Pass instance")
    return resolved


class Instrument:
    """Hooks around every pass. Subclasses override what they need."""

    def before(self, p: Pass, graph: Graph, ctx: PassContext) -> None:
        pass

    def after(self, p: Pass, graph: Graph, ctx: PassContext, result: PassResult, history: list[str]) -> None:
        pass


class VerifyEach(Instrument):
    """Verified IR in, verified IR out: re-verify after every pass and name the pass that broke an invariant."""

    def after(self, p, graph, ctx, result, history):
        try:
            verify(graph)
        except Exception as exc:
            raise PassError(f"pass {p.name!r} left an invalid graph (passes run: {', '.join(history)}): "
                            f"{exc}") from None


class NumericCheckEach(Instrument):
    """Run the reference interpreter before and after every pass on seeded inputs; name the first pass whose
    outputs moved beyond ``rtol``/``atol`` (atol relative to the output scale).

    Exact rewrites (folds, fusions) must pass this with float32 rounding tolerances; lossy passes (``Pass.lossy``:
    quantize, prune, distill) are exempt, and so are the names listed in ``lossy``.
    """

    def __init__(self, inputs: tuple = (), rtol: float = 1e-4, atol: float = 1e-5, lossy: tuple[str, ...] = ()):
        self.inputs, self.rtol, self.atol, self.lossy = tuple(inputs), rtol, atol, tuple(lossy)
        self._before = None

    def _run(self, graph: Graph, ctx: PassContext):
        from passes.ir.interpret import run_reference

        if not self.inputs:
            self.inputs = tuple(ctx.example_inputs) or tuple(seeded_inputs(graph, ctx.seed))
        return run_reference(graph, self.inputs)

    def before(self, p, graph, ctx):
        self._before = self._run(graph, ctx)

    def after(self, p, graph, ctx, result, history):
        if not result.changed or p.lossy or p.name in self.lossy:
            return
        import numpy as np

        from passes.ir.graph import flatten_structure

        after = self._run(graph, ctx)
        for i, (a, b) in enumerate(zip(flatten_structure(self._before), flatten_structure(after))):
            a, b = a.detach().double().numpy(), b.detach().double().numpy()
            scale = max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-12)
            if a.shape != b.shape or not np.allclose(b, a, rtol=self.rtol, atol=self.atol * scale):
                worst = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("nan")
                raise PassError(f"pass {p.name!r} changed output {i} beyond tolerance (max abs error {worst:.3g}, "
                                f"output scale {scale:.3g}); passes run: {', '.join(history)}")


class Timing(Instrument):
    """Wall time of every pass, accumulated by name (``seconds`` is also in each ``PassRecord``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = 0.0

    def before(self, p, graph, ctx):
        self._start = time.perf_counter()

    def after(self, p, graph, ctx, result, history):
        self.seconds[p.name] = self.seconds.get(p.name, 0.0) + time.perf_counter() - self._start


class DumpEach(Instrument):
    """Write the graph text before the first pass (``00-input.txt``) and after each pass (``NN-<name>.txt``)."""

    def __init__(self, directory: str):
        from pathlib import Path

        self.directory = Path(directory)
        self.count = 0

    def _dump(self, graph: Graph, label: str) -> None:
        from passes.ir.text import graph_text

        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"{self.count:02d}-{label}.txt").write_text(graph_text(graph, with_origin=True) + "\n")
        self.count += 1

    def before(self, p, graph, ctx):
        if self.count == 0:
            self._dump(graph, "input")

    def after(self, p, graph, ctx, result, history):
        self._dump(graph, p.name)


def seeded_inputs(graph: Graph, seed: int = 0) -> list:
    """Deterministic inputs matching the graph signature (normal floats, zeros for integer inputs)."""
    import torch

    from passes.ir.ops import torch_dtype

    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=gen).to(torch_dtype(t.dtype)) if t.dtype.startswith(("float", "bfloat"))
            else torch.zeros(t.shape, dtype=torch_dtype(t.dtype)) for t in graph.input_types()]


def make_instruments(names: Sequence[str | Instrument], inputs: tuple = ()) -> list[Instrument]:
    """Instruments from names: ``verify-each``, ``numeric-check-each``, ``timing``, ``dump-each=DIR``."""
    made: list[Instrument] = []
    for item in names:
        if isinstance(item, Instrument):
            made.append(item)
            continue
        name, _, arg = item.partition("=")
        if name == "verify-each":
            made.append(VerifyEach())
        elif name == "numeric-check-each":
            made.append(NumericCheckEach(inputs))
        elif name == "timing":
            made.append(Timing())
        elif name == "dump-each" and arg:
            made.append(DumpEach(arg))
        else:
            raise PassError(f"unknown instrument {item!r}; available: verify-each, numeric-check-each, timing, "
                            "dump-each=DIR")
    return made


@dataclass
class Pipeline:
    passes: list[Pass]
    instruments: list[Instrument] = field(default_factory=lambda: [VerifyEach()])

    def run(self, graph: Graph, ctx: PassContext) -> list[PassRecord]:
        """Run every pass in order on ``graph`` (in place); returns one record per pass."""
        properties = set(ALL_PROPERTIES)
        records, history = [], []
        if ctx.original is None:
            ctx.original = graph.copy_graph()
        for p in self.passes:
            missing = [r for r in p.requires if r not in properties]
            if missing:
                raise PassError(f"pass {p.name!r} requires {missing}, which earlier passes "
                                f"({', '.join(history) or 'none'}) did not preserve")
            for instrument in self.instruments:
                instrument.before(p, graph, ctx)
            start = time.perf_counter()
            result = p.run(graph, ctx)
            seconds = time.perf_counter() - start
            history.append(p.name)
            for instrument in self.instruments:
                instrument.after(p, graph, ctx, result, history)
            if result.changed:
                properties &= set(p.preserves)
            log.debug("pass %s: changed=%s stats=%s (%.3fs)", p.name, result.changed, result.stats, seconds)
            records.append(PassRecord(p.name, p.spec(), result.changed, dict(result.stats), seconds))
        return records
