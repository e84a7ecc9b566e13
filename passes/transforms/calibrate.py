"""Calibration for post-training quantization: observe tensors on real inputs, choose each one's clipping range.

``observe(graph, values, batches, observer)`` runs the reference interpreter on a copy of the graph whose outputs
are the observed values, so every intermediate tensor is seen exactly as the float model computes it. Observers:

- ``minmax``: the observed [min, max]. Never clips; one outlier stretches the step size for every other value.
- ``percentile``: the [(100 - p)-th, p-th] percentile of a 2048-bin histogram over the min-max range; clips the
  rare tails (p = 99.99 by default).
- ``entropy``: TensorRT's KL-divergence calibration. For a candidate threshold T (a histogram bin edge), P is the
  histogram clipped at T (the tail folded into the last bin) and Q is P merged into the number of quantization
  levels and expanded back (each merged level spread evenly over its non-empty bins); the chosen T minimizes
  KL(P || Q), the information lost by representing the distribution with that many levels. The zero bin is
  discounted (see ``entropy_threshold``). Non-negative tensors
  (after ReLU) get 255 levels over [0, T]; signed tensors use |x| and 128 levels per side over [-T, T]. A tensor
  whose histogram has no more non-empty bins than levels (discrete data such as pixels) keeps its full range.

Ranges always include 0, so real zero is exactly representable (zero padding, ReLU's floor).

Data items (``split_items``, shared with ``distill``): the model's inputs, optionally followed by labels.
``evaluate`` averages a metric over them through the reference interpreter (accuracy-aware quantization).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from passes.core import distributed
from passes.core.pass_base import PassContext, PassError
from passes.core.progress import progress_bar
from passes.ir.graph import Graph, IRError, TensorType, Value
from passes.ir.interpret import GraphModule, interpret
from passes.transforms.infer_shapes import InferShapes

OBSERVERS = ("minmax", "percentile", "entropy")
HISTOGRAM_BINS = 2048


@dataclass
class TensorObservation:
    """What calibration saw of one tensor: its range and, for percentile/entropy, a histogram over it."""

    low: float = np.inf
    high: float = -np.inf
    histogram: np.ndarray | None = None
    edges: np.ndarray | None = field(default=None, repr=False)

    @property
    def signed(self) -> bool:
        return self.low < 0

    def update_range(self, x: np.ndarray) -> None:
        self.low, self.high = min(self.low, float(x.min())), max(self.high, float(x.max()))

    def update_histogram(self, x: np.ndarray, low: float, high: float) -> None:
        counts, edges = np.histogram(x, bins=HISTOGRAM_BINS, range=(low, max(high, low + 1e-12)))
        self.histogram = counts if self.histogram is None else self.histogram + counts
        self.edges = edges


def rebatched(graph: Graph, shapes: list[tuple[int, ...]], pass_name: str = "distill") -> Graph:
    """A copy of ``graph`` whose inputs have ``shapes``; a batch entry in reshape targets follows the new batch."""
    copy = graph.copy_graph()
    batch = {}
    for node, shape in zip(copy.inputs, shapes):
        old = copy.nodes[node]["out_types"][0]
        changed = [i for i, (a, b) in enumerate(zip(old.shape, shape)) if a != b]
        if len(shape) != old.rank or len(changed) > 1:
            raise PassError(f"{pass_name}: data for input {node!r} has shape {list(shape)}, the model takes "
                            f"{list(old.shape)}; only the batch size may differ")
        if changed:
            batch[old.shape[changed[0]]] = shape[changed[0]]
        copy.nodes[node]["out_types"] = [TensorType(shape, old.dtype)]
    for node in copy.op_nodes("reshape"):
        target = list(copy.nodes[node]["attrs"]["shape"])
        if target and target[0] in batch:
            copy.nodes[node]["attrs"]["shape"] = (batch[target[0]], *target[1:])
    try:
        InferShapes().run(copy, PassContext())
    except IRError as e:
        raise PassError(f"{pass_name}: the model does not run at the data's batch size ({e}); give batches of the "
                        "example inputs' size") from e
    return copy


class BatchedInterpreter:
    """Runs ``graph`` through the reference interpreter at whatever batch size the data has: one re-batched graph
    per input shape (cached), every one sharing the parameters of ``module`` (so training one trains them all).
    Data batches need not match the example inputs the model is compiled for."""

    def __init__(self, graph: Graph, module: GraphModule | None = None, pass_name: str = "quantize"):
        self.graph, self.module, self.pass_name = graph, module or interpret(graph), pass_name
        self.shapes = tuple(t.shape for t in graph.input_types())
        self.modules: dict[tuple, GraphModule] = {self.shapes: self.module}

    def __call__(self, *inputs):
        shapes = tuple(tuple(x.shape) for x in inputs)
        if shapes not in self.modules:
            module = GraphModule(rebatched(self.graph, list(shapes), self.pass_name)).train(self.module.training)
            module.node_params = self.module.node_params
            self.modules[shapes] = module
        return self.modules[shapes](*inputs)


def run_probe(graph: Graph, values: Sequence[Value], batches: Sequence[tuple]):
    """The observed values, one list per batch, as float numpy arrays."""
    import torch

    probe = graph.copy_graph()
    probe.set_outputs(tuple(values))
    module = BatchedInterpreter(probe)
    for batch in batches:
        with torch.no_grad():  # never across a yield: grad mode is global, and a generator may be left suspended
            outs = module(*batch)
        yield [np.asarray(t.numpy(), np.float64) for t in outs]


def observe(graph: Graph, values: Sequence[Value], batches: Sequence[tuple], observer: str, progress: bool = False
            ) -> dict[Value, TensorObservation]:
    """Observe ``values`` over ``batches``: one pass for ranges, a second for histograms when the observer needs
    them (the histogram range must be known before the first count). ``progress``: a bar per pass (tqdm). Under
    ``torchrun`` each rank observes its shard and the ranges (min/max) and histograms (sums) are reduced over the
    ranks: the same result as one process observing all of them (exactly: ranges are min/max, counts are integers
    over the same bins)."""

    def probe(desc: str):
        bar = progress_bar(batches, enabled=progress, desc=desc, total=len(batches), unit="batch")
        return run_probe(graph, values, bar)

    seen = {v: TensorObservation() for v in values}
    for outs in probe("calibrate (ranges)"):
        for v, x in zip(values, outs):
            seen[v].update_range(x)
    world = distributed.world()
    lows = distributed.all_reduce([seen[v].low for v in values], "min", world)
    highs = distributed.all_reduce([seen[v].high for v in values], "max", world)
    for v, low, high in zip(values, lows, highs):
        seen[v].low, seen[v].high = float(low), float(high)
    if observer == "minmax":
        return seen
    magnitude = {v: observer == "entropy" and seen[v].signed for v in values}  # entropy bins |x| of signed x
    for v in values:  # zero counts over the final bins first: a rank whose shard is empty has the same edges
        obs = seen[v]
        obs.update_histogram(np.empty(0), *((0.0, max(-obs.low, obs.high)) if magnitude[v] else (obs.low, obs.high)))
    for outs in probe("calibrate (histograms)"):
        for v, x in zip(values, outs):
            obs = seen[v]
            obs.update_histogram(np.abs(x) if magnitude[v] else x, obs.edges[0], obs.edges[-1])
    counts = distributed.all_reduce([seen[v].histogram for v in values], "sum", world)
    for v, histogram in zip(values, counts):
        seen[v].histogram = histogram
    return seen


def percentile_range(obs: TensorObservation, percentile: float) -> tuple[float, float]:
    cdf = np.cumsum(obs.histogram) / max(obs.histogram.sum(), 1)
    tail = (100.0 - percentile) / 100.0
    low_bin = int(np.searchsorted(cdf, tail, side="right"))
    high_bin = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
    return float(obs.edges[low_bin]), float(obs.edges[min(high_bin + 1, len(obs.edges) - 1)])


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / p.sum(), q / max(q.sum(), 1e-300)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


def entropy_threshold(histogram: np.ndarray, edges: np.ndarray, levels: int) -> float:
    """The bin edge T minimizing KL(P || Q) over thresholds from ``levels`` bins to the whole histogram."""
    histogram = histogram.astype(np.float64)
    # exact zeros (ReLU's spike, often half the tensor) are represented exactly whatever T is, but spread over
    # their merged level they would dominate the divergence and push T down: bin 0 takes its neighbour's count
    # (as NVIDIA's pytorch-quantization does)
    histogram[0] = histogram[1]
    best_kl, best = np.inf, len(histogram)
    for end in range(levels, len(histogram) + 1):
        p = histogram[:end].copy()
        p[-1] += histogram[end:].sum()  # values beyond T clip to T
        if p.sum() == 0:
            continue
        # merge the `end` bins into `levels` groups, then spread each group's mass over its non-empty bins
        group = (np.arange(end) * levels) // end
        nonzero = (histogram[:end] > 0).astype(np.float64)
        mass = np.bincount(group, weights=histogram[:end], minlength=levels)
        counts = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero > 0, mass[group] / np.maximum(counts[group], 1), 0.0)
        kl = _kl_divergence(p, q)
        if kl < best_kl:
            best_kl, best = kl, end
    return float(edges[best])


def clipping_range(obs: TensorObservation, observer: str, percentile: float) -> tuple[float, float]:
    """The [low, high] to quantize this tensor over (always containing 0)."""
    if observer == "minmax" or obs.histogram is None or obs.histogram.sum() == 0:
        low, high = obs.low, obs.high
    elif observer == "percentile":
        low, high = percentile_range(obs, percentile)
    elif np.count_nonzero(obs.histogram) <= (128 if obs.signed else 255):
        # already discrete with no more values than levels (image pixels): KL's premise, a continuous density to
        # discretize, does not hold (it picks thresholds between the spikes), and the full range loses nothing
        low, high = obs.low, obs.high
    elif obs.signed:
        threshold = entropy_threshold(obs.histogram, obs.edges, levels=128)
        low, high = -threshold, threshold
    else:
        low, high = 0.0, entropy_threshold(obs.histogram, obs.edges, levels=255)
    return min(low, 0.0), max(high, 0.0)


def affine_params(low: float, high: float, qmin: int = 0, qmax: int = 255) -> tuple[float, int]:
    """(scale, zero_point) with real = (q - zero_point) * scale covering [low, high]; 0 maps exactly to the zero
    point. An all-zero tensor gets scale 1 (any scale represents it)."""
    scale = (high - low) / (qmax - qmin)
    if scale <= 0 or not np.isfinite(scale):
        return 1.0, qmin if low >= 0 else (qmin + qmax + 1) // 2
    zero_point = int(np.clip(np.round(qmin - low / scale), qmin, qmax))
    return float(np.float32(scale)), zero_point


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum ref^2 / sum (ref - quantized)^2), in dB (noise floored
    at 1e-30 so an exact layer reports a large finite number)."""
    return float(10.0 * np.log10(max(signal_power, 1e-30) / max(noise_power, 1e-30)))


def split_items(data: Iterable, graph: Graph, pass_name: str) -> list[tuple[tuple, Any]]:
    """``(inputs, labels or None)`` per data item, inputs as tensors of the graph's input dtypes. An item is a
    tuple of the model's inputs, optionally followed by labels (a bare tensor is a one-input item); labels are
    passed on as given (``torch.as_tensor``). Read once: every pass that calibrates or trains reuses the list."""

    from passes.ir.ops import torch_dtype

    n, dtypes = len(graph.inputs), [torch_dtype(t.dtype) for t in graph.input_types()]
    items = []
    for index, item in enumerate(data):
        item = tuple(item) if isinstance(item, (tuple, list)) else (item,)
        if len(item) not in (n, n + 1):
            raise PassError(f"{pass_name}: a data item has {len(item)} tensors; the model takes {n} input(s) "
                            "(optionally followed by labels)")
        inputs = tuple(_finite(_tensor(x, pass_name, f"data item {index}, input {i}"), pass_name,
                               f"data item {index}, input {i}").to(dtype)
                       for i, (x, dtype) in enumerate(zip(item[:n], dtypes)))
        items.append((inputs, _tensor(item[n], pass_name, f"data item {index}, labels") if len(item) > n else None))
    return items


def _tensor(x: Any, pass_name: str, what: str):
    """``torch.as_tensor(x)`` for numbers and arrays; anything else (a string, a file name) is a clear error."""
    import torch

    if isinstance(x, (str, bytes)):
        raise PassError(f"{pass_name}: {what} is a {type(x).__name__} ({str(x)[:40]!r}); data items must be "
                        "tensors or numpy arrays in the model's input order")
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise PassError(f"{pass_name}: {what} is not a tensor ({type(x).__name__}: {e}); data items must be "
                        "tensors or numpy arrays in the model's input order") from None


def _finite(x, pass_name: str, what: str):
    """Calibration ranges and training losses of NaN/inf inputs are NaN/inf: refused here, naming the item."""
    import torch

    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise PassError(f"{pass_name}: {what} holds {int((~torch.isfinite(x)).sum())} NaN/inf value(s); "
                        "calibration and training data must be finite")
    return x


def evaluate(graph: Graph, metric: Callable[..., float], items: list[tuple]) -> float:
    """``metric(outputs, labels or None)`` per data item through the reference interpreter, averaged weighted
    by batch size (so a per-batch accuracy averages to the accuracy over all items; over every rank's items
    under ``torchrun``)."""
    import torch

    module, total, count = BatchedInterpreter(graph), 0.0, 0
    for inputs, labels in items:
        with torch.no_grad():
            outputs = module(*inputs)
        first = labels if labels is not None else inputs[0]
        size = int(first.shape[0]) if first.ndim else 1
        total += size * float(metric(outputs, labels))
        count += size
    total, count = distributed.all_reduce([total, count], "sum", distributed.world())
    return float(total) / max(float(count), 1)
