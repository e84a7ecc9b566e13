"""The ``Pass`` base class, its result and the per-run context.

A pass is a frozen dataclass: its fields are its typed options (parsed from text specs such as
``prune-channels{ratio=0.5}``), so a pass object is an immutable, printable configuration. Per-run state lives in
locals or in the ``PassContext``, never on ``self``.

``requires`` / ``preserves`` name graph properties (``shapes``: out_types are current; ``inference``: no
training-only semantics; ``float``: no quantized ops). The pipeline checks ``requires`` before a pass runs and
drops properties a pass does not preserve.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from passes.ir.graph import Graph

ALL_PROPERTIES = ("shapes", "inference", "float")


@dataclass(frozen=True)
class PassResult:
    """``changed``: the graph was modified. ``stats``: counts of work (``folded``) and refusals (``skipped.x``)."""

    changed: bool
    stats: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def from_stats(stats: dict[str, int]) -> PassResult:
        """``changed`` is true exactly when some work count (a key not starting with ``skipped.``) is non-zero."""
        work = any(v for k, v in stats.items() if not k.startswith("skipped."))
        return PassResult(bool(work), dict(stats))


@dataclass
class PassContext:
    """What a pass may use besides the graph: example and calibration/training inputs, the target, a seed, notes,
    the graph as the pipeline received it (``original``: the teacher of ``distill``) and a progress callback."""

    example_inputs: tuple = ()
    data: Iterable | None = None
    target: str = "llvm"
    lanes: int = 8  # fp32 lanes of the CPU target's vectors (16 AVX-512, 8 AVX2): optimize() sets the target's
    seed: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    explanations: list[Explanation] | None = None  # set to [] to collect every pass decision (``explain``)
    original: Graph | None = None  # set by Pipeline.run when not given
    progress: Callable[[str], None] | None = None


@dataclass(frozen=True)
class Explanation:
    """One decision of a pass about one candidate: ``outcome`` is a work name (``folded``) or ``skipped.x``."""

    pass_name: str
    node: str
    origin: str
    outcome: str
    detail: str = ""


class Decisions:
    """Counts a pass's work and refusals into ``stats`` and, when asked, records them for ``explain``.

    Usage inside ``run``::

        decide = Decisions(self, graph, ctx)
        decide.skip(node, "shared_weight", "the conv weight feeds two convs")
        decide.done(node, "folded")
        return decide.result()
    """

    def __init__(self, p: Pass, graph: Graph, ctx: PassContext, work: Sequence[str] = ()):
        self.name, self.graph, self.ctx = p.name, graph, ctx
        self.stats: Counter[str] = Counter({w: 0 for w in work})

    def _record(self, node: str, outcome: str, detail: str) -> None:
        if self.ctx.explanations is not None:
            self.ctx.explanations.append(Explanation(self.name, node, self.graph.origin(node), outcome, detail))

    def done(self, node: str, work: str, detail: str = "", count: int = 1) -> None:
        self.stats[work] += count
        self._record(node, work, detail)

    def skip(self, node: str, reason: str, detail: str = "") -> None:
        self.stats[f"skipped.{reason}"] += 1
        self._record(node, f"skipped.{reason}", detail)

    def result(self) -> PassResult:
        return PassResult.from_stats(dict(self.stats))


class PassError(ValueError):
    """A pass cannot run on this graph; the message names the pass and the model element."""


@dataclass(frozen=True)
class Pass:
    """Base class. Subclasses set ``name`` (kebab-case), declare options as fields, and implement ``run``."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    preserves: ClassVar[tuple[str, ...]] = ALL_PROPERTIES
    summary: ClassVar[str] = ""
    lossy: ClassVar[bool] = False  # changes the outputs on purpose (prune, quantize): numeric-check-each skips it

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> PassResult:
        return self.run(graph, ctx or PassContext())

    @classmethod
    def options(cls) -> Sequence[dataclasses.Field]:
        return dataclasses.fields(cls)

    def spec(self) -> str:
        """Text spec that rebuilds this pass: ``name{opt=value,...}`` listing options that differ from defaults."""
        changed = [f"{f.name}={getattr(self, f.name)}" for f in self.options()
                   if getattr(self, f.name) != f.default]
        return self.name + ("{" + ",".join(changed) + "}" if changed else "")
