"""Autotuning of our kernel templates, with a persistent database and measurement over TVM RPC.

What is tuned: the register tile of every conv / conv+pool / dense kernel (``kernels.Tile``), and for each conv
that the Winograd cost rule sends to Winograd, the algorithm itself: F(4x4), F(2x2) or the direct kernel with its
tiles (``Tile.winograd``), measured kernel against kernel, because the rule's thresholds were measured on one
machine's ResNet-18 layers and a direct kernel can win on another shape. Why not a generic
search from scratch: meta-schedule runs ~8-14 trials a minute here and reached 7 of ResNet-18's 28 tasks in 21
minutes; our templates start from a fast default and the space that matters is small, so every trial counts:

- tasks are tuned hottest first (by FLOPs) and the trial budget is split in proportion to FLOPs;
- each task's candidates are ordered default first, then by closeness to the default's accumulator count;
- a candidate is built locally and measured locally or on RPC servers behind a TVM tracker (``rpc=host:port:key``),
  several servers in parallel.

The database is a folder holding ``records.jsonl``: one JSON line per measured candidate, appended and flushed
(fsync) as soon as it is measured, so a run killed midway keeps every finished record, and a torn last line is
ignored. Each record is keyed by the task (kernel kind and shapes), the target and the TVM version, so stale
records can never be applied to another target or TVM. Re-tuning with the same budget finds every planned
candidate already measured and runs zero new trials.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import tirx

from backends.tvm import expand_depthwise
from backends.tvm.expand_depthwise import ExpandDepthwiseSpec
from backends.tvm.kernels import (
    ConvSpec,
    DenseSpec,
    Tile,
    accumulator_vectors,
    ceil_to,
    conv_kernel,
    default_dense_tile,
    default_tile,
    dense_kernel,
    pack_dense_weight,
    resident_rows_problem,
    with_resident_rows,
)
from backends.tvm.select import choose, select_kernels
from backends.tvm.target import Target, resolve_target
from backends.tvm.threads import configure_threads
from backends.tvm.winograd import TILES as WINOGRAD_TILES
from backends.tvm.winograd import choose as winograd_choose
from backends.tvm.winograd import winograd_kernel
from passes.core.progress import progress_bar
from passes.ir.graph import Graph

SCHEMA = 1
Spec = ConvSpec | DenseSpec | ExpandDepthwiseSpec


@dataclass(frozen=True)
class TuneTask:
    spec: Spec
    flops: int
    nodes: tuple[str, ...]
    winograd: int = 0  # the untuned build's Winograd tile for this conv (0: direct); else the algorithm is searched

    @property
    def default(self) -> Tile:
        """The tile the untuned build uses (the first candidate)."""
        return default_tile_of(self.spec, self.winograd)

    @property
    def kind(self) -> str:
        if isinstance(self.spec, ExpandDepthwiseSpec):
            return "conv2d_expand_dw"
        return "dense" if isinstance(self.spec, DenseSpec) else ("conv2d_pool" if self.spec.pool else "conv2d")


def task_key(spec: Spec, target: Target | tvm.target.Target) -> str:
    tvm_target = target.tvm if isinstance(target, Target) else target
    fields = dataclasses.asdict(spec)
    for layout in ("in_block", "out_block"):  # NCHW (0): left out, so records made before these fields still match
        if not fields.get(layout, 1):
            del fields[layout]
    doc = {"schema": SCHEMA, "kind": type(spec).__name__, "spec": fields, "target": str(tvm_target),
           "tvm": tvm.__version__}
    if isinstance(spec, ConvSpec) and spec.blocked:  # its tiles are whole channel vectors: records of the
        doc["schedule"] = "nchwc"                    # NCHW schedules of the same spec do not apply
    if isinstance(spec, ConvSpec) and spec.flat_pixels:  # a tile is rows * cols consecutive pixels of the flattened
        doc["tile_pixels"] = "flat"                       # map: records written when it was a rows x cols window
    return hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def extract_tasks(graph: Graph, target: Target | str = "llvm") -> list[TuneTask]:
    """One task per distinct conv/dense kernel spec that ``select.select_kernels`` chose on ``target``, hottest
    (most FLOPs, all its nodes together) first."""
    from passes.ir.cost import node_flops

    found: dict[Spec, list[str]] = {}
    winograd_tile: dict[Spec, int] = {}
    target = resolve_target(target)
    for node, choice in select_kernels(graph, target.kind, target.lanes, target.winograd).choices.items():
        if choice.kernel in ("conv", "blocked_conv_pool", "dense", "expand_dw"):
            found.setdefault(choice.spec, []).append(node)
        elif choice.kernel == "winograd" and graph.nodes[node]["op"] in ("conv2d", "conv2d_nchwc"):
            # keyed by the direct spec (what ``select.choose`` looks up); a conv2d_pool's Winograd keeps its rule:
            # the direct alternative there is the fused conv+pool kernel, which a lone Winograd kernel cannot be
            # timed against
            direct = choose(graph, node, target.kind, target.lanes, allow_winograd=False).spec
            found.setdefault(direct, []).append(node)
            winograd_tile[direct] = choice.spec.tile
    tasks = [TuneTask(spec, sum(node_flops(graph, n) for n in nodes), tuple(nodes), winograd_tile.get(spec, 0))
             for spec, nodes in found.items()]
    return sorted(tasks, key=lambda t: -t.flops)


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def default_tile_of(spec: Spec, winograd: int = 0) -> Tile:
    """The tile a build uses when nothing is tuned (the tuner's first candidate); ``winograd``: the Winograd tile
    the cost rule picked for this conv (0: none)."""
    if isinstance(spec, DenseSpec):
        return default_dense_tile(spec)
    if isinstance(spec, ExpandDepthwiseSpec):
        return expand_depthwise.default_tile(spec)
    return dataclasses.replace(default_tile(spec), winograd=winograd)


def candidates(spec: Spec, winograd: int = 0) -> list[Tile]:
    """Valid tiles for ``spec``: default first, then by accumulator count closest to the default's. Where the
    untuned build runs Winograd F(``winograd``), that comes first, then the direct kernel's default tile, then
    the other Winograd tile, then the other direct tiles: the first trials answer whether Winograd pays here."""
    direct = _direct_candidates(spec)
    if not winograd:
        return direct
    other = [dataclasses.replace(direct[0], winograd=m) for m in WINOGRAD_TILES if m != winograd]
    return [default_tile_of(spec, winograd), direct[0], *other, *direct[1:]]


def _direct_candidates(spec: Spec) -> list[Tile]:
    if isinstance(spec, ExpandDepthwiseSpec):
        return expand_depthwise.candidate_tiles(spec)
    default = default_tile_of(spec)
    if isinstance(spec, ConvSpec) and spec.blocked:  # resident weights (a default's task_rows) or not: the second
        # candidate answers which pays here
        others = [with_resident_rows(spec, t) for t in _blocked_candidates(spec, default)]
        streamed = [dataclasses.replace(default, task_rows=0)] if default.task_rows else []
        return [default, *streamed, *(t for t in others if t != default)]  # (default's tile streamed: resident again)
    if isinstance(spec, DenseSpec):
        lanes, limit = spec.lanes, 3 * accumulator_vectors(spec.lanes) // 2
        tiles = [Tile(1, r, c) for r in _divisors(spec.m, 8) for c in _divisors(spec.n, 4 * lanes)
                 if r * -(-c // lanes) <= limit]
    else:
        _, oc, oh, ow = spec.out_shape
        row_scale, col_scale = spec.pool_stride if spec.pool else (1, 1)
        tiles = []
        lanes, limit = spec.lanes, 7 * accumulator_vectors(spec.lanes) // 4  # 28 on AVX-512, 21 on AVX2
        for ob in _divisors(oc, 2 * lanes):
            for rows in _divisors(oh, 4):
                for cols in _divisors(ow, 2 * lanes // col_scale):
                    if spec.channels_vectorized:
                        vectors = rows * row_scale * cols * col_scale * -(-ob // lanes)
                    else:
                        vectors = ob * rows * row_scale * -(-(cols * col_scale) // lanes)
                    if 2 <= vectors <= limit:
                        tiles.append(Tile(ob, rows, cols))

    def accumulators(t: Tile) -> int:
        return t.oc_block * t.rows * t.cols

    ordered = sorted(set(tiles) - {default}, key=lambda t: (abs(np.log2(accumulators(t) / accumulators(default))),
                                                             -t.cols, -t.oc_block, t.rows))
    return [default, *ordered]


def _blocked_candidates(spec: ConvSpec, default: Tile) -> list[Tile]:
    """The blocked (NCHWc) kernel's register tiles other than ``default``: 1-3 channel vectors x ``rows`` x
    ``cols`` pixels (pooled pixels with a pool epilogue, whose register tile is one conv row of their windows).

    The accumulators stay within ``accumulator_vectors`` (12 of AVX2's 16 ymm: two weight vectors and a broadcast
    take the rest; one vector alone at most ``budget - 4`` pixels, as ``kernels._blocked_tile``: LLVM hoists that
    many broadcasts ahead of their FMAs and spills), rows divide the output height, and columns need not divide
    the width: the kernel pads its row to a multiple of ``cols`` (an unpadded 1x1 conv then copies its input; the
    measurement says whether the wider tile pays for it). Ordered most useful accumulators first (those on the
    padding columns do not count), then the fewest wasted columns."""
    v, budget = spec.oc_vector, accumulator_vectors(spec.lanes)
    _, oc, oh, ow = spec.out_shape
    window = spec.pool_kernel[1] if spec.pool else 1
    tiles = []
    for vectors in (1,) if spec.depthwise and spec.pool else (1, 2, 3):
        if (oc // v) % vectors:
            continue
        pixels = budget // vectors if vectors > 1 else budget - 4
        for rows in _divisors(oh, 1 if spec.pool else 4):
            for cols in range(1, pixels // (rows * window) + 1):
                tiles.append(Tile(oc_block=vectors * v, rows=rows, cols=cols))

    def merit(t: Tile):
        computed = ceil_to(ow, t.cols)
        return -round(t.oc_block // v * t.rows * t.cols * ow / computed, 3), computed - ow, -t.oc_block, t.rows

    return sorted(set(tiles) - {default}, key=merit)


def build_candidate(task: TuneTask, tile: Tile, target: Target) -> tuple[tvm.runtime.Executable, tirx.PrimFunc]:
    """(the built library, its PrimFunc ``main``) of ``task``'s kernel with ``tile``."""
    if isinstance(task.spec, DenseSpec):
        func = dense_kernel(task.spec, target.cores, tile)
    elif isinstance(task.spec, ExpandDepthwiseSpec):
        func = expand_depthwise.expand_depthwise_kernel(task.spec, tile)
    elif tile.winograd:
        func = winograd_kernel(winograd_choose(task.spec, tile.winograd))
    else:
        func = conv_kernel(task.spec, target.kind, tile)
    func = func.with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=target.tvm), func


def random_args(func, device) -> list:
    rng = np.random.default_rng(0)
    args = []
    for param in func.params:  # TVM 0.27: each param is a Var of buffer type, with shape and dtype
        shape = tuple(int(d) for d in param.shape)
        args.append(tvm.runtime.tensor(rng.standard_normal(shape).astype(str(param.dtype)), device))
    return args


# ------------------------------------------------------------------------------------------------ database
RECORD_FIELDS = {"key": (str,), "tile": (dict,), "ms": (int, float, type(None)), "task": (str,),
                 "runner": (str,), "error": (str, type(None))}  # the first three required


def record_problem(record: Any) -> str | None:
    """Why ``record`` is not a valid database record (None when it is one)."""
    if not isinstance(record, dict):
        return f"not an object ({type(record).__name__})"
    missing = [f for f in ("key", "tile", "ms") if f not in record]
    if missing:
        return f"missing field {missing[0]!r}"
    unknown = sorted(set(record) - set(RECORD_FIELDS))
    if unknown:
        return f"unknown field {unknown[0]!r}"
    for name, value in record.items():
        if not isinstance(value, RECORD_FIELDS[name]) or isinstance(value, bool):
            return f"field {name!r} of type {type(value).__name__}"
    tile = record["tile"]
    sizes = {k: v for k, v in tile.items() if k not in ("winograd", "task_rows")}
    if set(sizes) != {"oc_block", "rows", "cols"} or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes.values()):
        return "field 'tile' is not a tile (oc_block, rows, cols: positive integers)"
    if tile.get("winograd", 0) not in (0, *WINOGRAD_TILES) or isinstance(tile.get("winograd"), bool):
        return f"field 'tile' has winograd {tile['winograd']!r} (0 or one of {WINOGRAD_TILES})"
    rows = tile.get("task_rows", 0)
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        return f"field 'tile' has task_rows {rows!r} (a count of rows, 0: none)"
    return None


class Database:
    """Append-only JSON-lines records in ``<folder>/records.jsonl``; safe against kills and concurrent appends.

    The file is read once, when the database is opened; later records are kept in memory as they are appended,
    indexed by task key, so looking up a task during tuning costs nothing per trial.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(os.path.expanduser(str(folder)))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "records.jsonl"
        self._lock = threading.Lock()
        self.skipped: dict[str, int] = {}  # lines not read, by reason (``_read``)
        self._records = self._read()
        self._by_key: dict[str, dict[Tile, float | None]] = {}
        for record in self._records:
            self._by_key.setdefault(record["key"], {})[Tile(**record["tile"])] = record["ms"]

    def records(self) -> list[dict]:
        return list(self._records)

    def _read(self) -> list[dict]:
        """The valid records; every other line (torn by a kill, undecodable bytes, not JSON, wrong field types,
        unknown fields) is skipped and counted in ``skipped`` by reason, never fatal: the database is a cache."""
        if not self.path.exists():
            return []
        found = []
        for raw in self.path.read_bytes().splitlines():
            reason = None
            try:
                record = json.loads(raw.decode("utf-8"))
                reason = record_problem(record)
            except UnicodeDecodeError:
                reason = "undecodable bytes"
            except json.JSONDecodeError:  # e.g. a line torn by a kill
                reason = "not JSON"
            if reason is None:
                found.append(record)
            elif raw.strip():
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
        return found

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock, open(self.path, "a") as f:
            if f.tell() and not self._ends_with_newline():
                f.write("\n")  # after a torn line, start a fresh one
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
            self._records.append(record)
            self._by_key.setdefault(record["key"], {})[Tile(**record["tile"])] = record["ms"]

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def measured(self, key: str) -> dict[Tile, float | None]:
        return dict(self._by_key.get(key, {}))

    def best_tile(self, key: str) -> Tile | None:
        valid = [(ms, tile) for tile, ms in self.measured(key).items() if ms is not None]
        return min(valid, key=lambda v: v[0])[1] if valid else None


# ------------------------------------------------------------------------------------------------ runners
class LocalRunner:
    name = "local"
    workers = 1

    def __init__(self, number: int = 5, repeat: int = 3):
        self.number, self.repeat = number, repeat

    def measure(self, lib, func) -> float:
        configure_threads()  # measured with the threads the compiled model will use (the pool is per thread)
        device = tvm.cpu(0)
        timer = lib.mod.time_evaluator("main", device, number=self.number, repeat=self.repeat)
        return float(np.median(timer(*random_args(func, device)).results) * 1e3)


class RPCRunner:
    """Measure on RPC servers registered with a TVM tracker under ``key``; one session per worker thread."""

    def __init__(self, spec: str, timeout: float = 30.0, number: int = 5, repeat: int = 3):
        try:
            host, port, key = spec.rsplit(":", 2)
            port = int(port)
        except ValueError:
            raise ValueError(f"rpc must be 'host:port:key', got {spec!r}") from None
        self.host, self.port, self.key, self.timeout = host, port, key, timeout
        self.number, self.repeat = number, repeat
        self.name = f"rpc:{key}@{host}:{port}"
        tracker = tvm.rpc.connect_tracker(host, port)
        free = [q for q in tracker.summary()["queue_info"].items() if q[0] == key]
        self.workers = max(1, int(free[0][1].get("free", 1)) if free else 1)
        self._local = threading.local()
        self._tmp = tempfile.mkdtemp(prefix="passes-rpc-")

    def _session(self):
        if getattr(self._local, "session", None) is None:
            tracker = tvm.rpc.connect_tracker(self.host, self.port)
            self._local.session = tracker.request(self.key, session_timeout=self.timeout)
        return self._local.session

    def measure(self, lib, func) -> float:
        session = self._session()
        name = f"cand_{threading.get_ident()}_{time.monotonic_ns()}.so"
        path = os.path.join(self._tmp, name)
        lib.export_library(path)
        session.upload(path)
        remote = session.load_module(name)
        device = session.cpu(0)
        timer = remote.time_evaluator("main", device, number=self.number, repeat=self.repeat)
        return float(np.median(timer(*random_args(func, device)).results) * 1e3)


def make_runner(rpc: str | None, timeout: float) -> LocalRunner | RPCRunner:
    return RPCRunner(rpc, timeout) if rpc else LocalRunner()


# ------------------------------------------------------------------------------------------------ tuning loop
def allocate(weights: list[float], capacities: list[int], trials: int) -> list[int]:
    """Trials per task: in proportion to its weight (its time in the model), never more than its candidates, the
    spare of a task with fewer candidates than its share handed to the others (water-filling), and one each,
    heaviest first, when the budget left is too small to split."""
    counts = [0] * len(weights)
    left = trials
    while left > 0:
        open_ = [i for i in range(len(weights)) if counts[i] < capacities[i]]
        if not open_:
            break
        total = sum(weights[i] for i in open_) or 1.0
        shares = {i: min(capacities[i] - counts[i], int(left * weights[i] / total)) for i in open_}
        if not any(shares.values()):  # too few left to split: one each, heaviest first
            for i in sorted(open_, key=lambda i: -weights[i])[:left]:
                shares[i] = 1
        for i, share in shares.items():
            counts[i] += share
            left -= share
    return counts


def plan(tasks: list[TuneTask], trials: int, times: dict[Spec, float] | None = None
         ) -> list[tuple[TuneTask, list[Tile]]]:
    """Each task's first candidates (its default first), heaviest task first, ``trials`` in all (``allocate``).

    A task's weight is its measured time in the model (``times``: ms of its default tile, times its node count)
    where known, else its FLOPs scaled by the measured tasks' ms per FLOP (all FLOPs when nothing is measured):
    a depthwise or 1x1 conv takes far more time per FLOP than a 3x3 one, so FLOPs alone misplace the budget."""
    times = times or {}
    timed = [t for t in tasks if t.spec in times]
    per_flop = (sum(times[t.spec] for t in timed) / (sum(t.flops for t in timed) or 1)) if timed else 1.0
    weights = [times.get(t.spec, t.flops * per_flop) for t in tasks]
    lists = [candidates(t.spec, t.winograd) for t in tasks]
    counts = allocate(weights, [len(c) for c in lists], trials)
    order = sorted(range(len(tasks)), key=lambda i: -weights[i])
    return [(tasks[i], lists[i][:counts[i]]) for i in order if counts[i]]


def check_args(task: TuneTask, tile: Tile, func: tirx.PrimFunc, device) -> list:
    """Seeded arguments of ``func`` (``task`` with ``tile``) that give every candidate of the task the same
    logical inputs: the same data, bias and residual, and one logical weight packed in the candidate's own layout
    (the Winograd kernel's U = G g G^T; the direct kernels share theirs; a dense kernel's panels are its tile's
    columns wide), scaled 1/sqrt(fan-in)."""
    rng = np.random.default_rng(0)
    args = []
    for index, param in enumerate(func.params):
        shape, dtype = tuple(int(d) for d in param.shape), str(param.dtype)
        if index == 1 and isinstance(task.spec, ConvSpec):
            weight = rng.standard_normal(task.spec.weight_shape) / np.sqrt(np.prod(task.spec.weight_shape[1:]))
            packer = winograd_choose(task.spec, tile.winograd) if tile.winograd else task.spec
            value = packer.pack_weight(weight)
        elif index == 1 and isinstance(task.spec, DenseSpec):  # panels as wide as the candidate's columns
            weight = rng.standard_normal((task.spec.n, task.spec.k)) / np.sqrt(task.spec.k)
            value = pack_dense_weight(weight, tile.cols)
        else:
            value = rng.standard_normal(shape)
        args.append(tvm.runtime.tensor(np.asarray(value).astype(dtype), device))
    return args


NUMERIC_TOLERANCE = {"float32": 1e-4}  # of the output scale; low-precision storage: 1e-2


def numeric_error(task: TuneTask, tile: Tile, lib, func, reference: np.ndarray | None) -> tuple[np.ndarray, str | None]:
    """(the candidate's output on ``check_args``, why it is numerically off or None) against ``reference``, the
    default tile's output (None: this is the reference). Max |out - reference| / max |reference| must stay within
    ``NUMERIC_TOLERANCE`` (the project's fp32 tolerance: Winograd's per-layer error is 1e-6..6e-6)."""
    device = tvm.cpu(0)
    args = check_args(task, tile, func, device)
    lib.mod["main"](*args)
    out = args[-1].numpy().astype(np.float64)
    if reference is None:
        return out, None
    if not np.isfinite(out).all():
        return out, "numerics: non-finite output"
    error = float(np.abs(out - reference).max() / max(np.abs(reference).max(), 1e-30))
    dtype = str(func.params[-1].dtype)
    if error > NUMERIC_TOLERANCE.get(dtype, 1e-2):
        return out, f"numerics: max error {error:.1e} of the output scale against the default tile"
    return out, None


def tune_graph(graph: Graph, target: Target, trials: int, database: str | os.PathLike,
               rpc: str | None = None, timeout: float = 30.0, progress: bool = True,
               on_record: Callable[[dict], None] | None = None) -> tuple[dict[Spec, Tile], dict[str, Any]]:
    """Tune the graph's kernels; returns (best tile per spec from the database, report dict).

    Two phases: every task's default tile is measured first (by FLOPs, as far as ``trials`` reach), then the rest
    of the budget goes to the other candidates in proportion to each task's measured time in the model
    (``plan``), heaviest first. Locally, each candidate's output is checked against the default tile's on the same
    inputs (``numeric_error``) before it is timed. A candidate that fails to build, is numerically off or fails
    to run is recorded with its error (never retried, never chosen) and counted, never fatal."""
    start = time.perf_counter()
    db = Database(database)
    tasks = extract_tasks(graph, target)
    state = {"runner": None, "new": 0, "build": 0, "numerics": 0, "run": 0}
    references: dict[Spec, np.ndarray | None] = {}
    bar = progress_bar(enabled=progress, desc="tune", total=trials, unit="trial")

    def reference(task: TuneTask) -> np.ndarray | None:
        """The default tile's output on ``check_args`` (None where it cannot be computed: nothing is compared)."""
        if task.spec not in references:
            try:
                lib, func = build_candidate(task, task.default, target)
                references[task.spec] = numeric_error(task, task.default, lib, func, None)[0]
            except Exception:  # the default itself is measured (and its failure recorded) as a trial
                references[task.spec] = None
        return references[task.spec]

    def run(work: list[tuple[TuneTask, list[Tile]]]) -> None:
        for index, (task, tiles) in enumerate(work, 1):
            key = task_key(task.spec, target)
            tiles = [t for t in tiles if t not in db.measured(key)]
            if not tiles:
                continue
            state["runner"] = state["runner"] or make_runner(rpc, timeout)
            runner = state["runner"]
            built = []
            for tile in tiles:
                try:
                    built.append((tile, *build_candidate(task, tile, target)))
                except Exception as exc:  # an invalid tile for this shape: record it so it is never retried
                    _record(db, on_record, key, task, tile, None, f"build: {str(exc)[:200]}", runner.name)
                    state["build"] += 1
                    _advance(bar, task, index, len(work), _best_ms(db, key))
            for tile, lib, func in built:  # the default just built here is the reference: no second build
                if tile == task.default and rpc is None and task.spec not in references:
                    try:
                        references[task.spec] = numeric_error(task, tile, lib, func, None)[0]
                    except Exception:  # its failed run is recorded by its trial below
                        references[task.spec] = None
            expected = reference(task) if rpc is None and any(t != task.default for t, *_ in built) else None

            measure = functools.partial(_trial, task, runner, expected)
            with concurrent.futures.ThreadPoolExecutor(max_workers=runner.workers) as pool:
                for tile, ms, error in pool.map(measure, built):
                    _record(db, on_record, key, task, tile, ms, error, runner.name)
                    state["new"] += 1
                    if error:
                        state["numerics" if error.startswith("numerics") else "run"] += 1
                    _advance(bar, task, index, len(work), _best_ms(db, key))

    run([(task, [task.default]) for task in tasks[:trials]])  # phase 1: where the time is
    times = {}
    for task in tasks:
        ms = db.measured(task_key(task.spec, target)).get(task.default)
        if ms is not None:
            times[task.spec] = ms * len(task.nodes)
    work = plan(tasks, trials, times)
    run(work)  # phase 2: the budget where the time is
    bar.close()
    best = {}
    for task in tasks:
        tile = db.best_tile(task_key(task.spec, target))
        if tile is not None:
            best[task.spec] = tile
    tuned_tasks = len(best)
    remeasured = _remeasure(tasks, best, target) if rpc is None else 0
    runner = state["runner"]
    failed = state["build"] + state["numerics"] + state["run"]
    report = {"new_trials": state["new"] + state["build"], "failed_trials": failed, "trials_budget": trials,
              "failed_builds": state["build"], "numerically_off": state["numerics"], "failed_runs": state["run"],
              "numerics_checked": rpc is None,
              "tasks": len(tasks), "tuned_tasks": tuned_tasks, "database": str(db.folder),
              "hottest": [_describe(task, times.get(task.spec)) for task, _ in work[:3]],
              "runner": runner.name if runner else "none (all planned trials already in the database)",
              "skipped_lines": dict(db.skipped), "remeasured_default_kept": remeasured,
              "seconds": round(time.perf_counter() - start, 2)}
    return best, report


def _trial(task: TuneTask, runner, expected: np.ndarray | None, item) -> tuple[Tile, float | None, str | None]:
    """(tile, ms, error) of one built candidate: checked against ``expected`` (the default tile's output; None:
    unchecked), then timed by ``runner``."""
    tile, lib, func = item
    try:
        if expected is not None and tile != task.default:
            problem = numeric_error(task, tile, lib, func, expected)[1]
            if problem:
                return tile, None, problem
        return tile, runner.measure(lib, func), None
    except Exception as exc:  # a failed run is a result too (e.g. a remote timeout)
        return tile, None, f"run: {str(exc)[:200]}"


def _record(db: Database, on_record, key: str, task: TuneTask, tile: Tile, ms: float | None, error: str | None,
            runner: str) -> None:
    record = {"key": key, "tile": dataclasses.asdict(tile), "ms": ms, "task": task.kind, "runner": runner,
              "error": error}
    db.append(record)
    if on_record:
        on_record(record)


def _describe(task: TuneTask, ms: float | None) -> str:
    """A task in one line for the report: kind, shapes, its default's time in the model."""
    spec = task.spec
    if isinstance(spec, ExpandDepthwiseSpec):
        shape = f"{spec.in_shape}->{spec.expanded}, {spec.kernel[0]}x{spec.kernel[1]}/{spec.stride[0]}"
    else:
        shape = f"{spec.in_shape}x{spec.weight_shape}" if isinstance(spec, ConvSpec) else f"{spec.m}x{spec.k}x{spec.n}"
    return f"{task.kind} {shape}: {'-' if ms is None else f'{ms:.3f}'} ms"


def _remeasure(tasks: list[TuneTask], best: dict[Spec, Tile], target: Target, rounds: int = 3) -> int:
    """Re-time each task's best tile against its default tile, alternating, with more repeats than a trial.

    A trial is one short timing on a shared machine; the best of many such timings is biased low (the minimum of
    noisy samples), so a tile can win by luck. Here the winner and the default are built again and timed in
    ``rounds`` alternating rounds; the default is kept (``best`` drops the task) unless the winner's median is
    lower. Returns how many tasks kept their default."""
    runner, kept_default = LocalRunner(number=10, repeat=3), 0
    for task in tasks:
        tile = best.get(task.spec)
        default = task.default
        if tile is None or tile == default:
            continue
        builds = [build_candidate(task, t, target) for t in (tile, default)]
        times: list[list[float]] = [[], []]
        for _ in range(rounds):
            for samples, (lib, func) in zip(times, builds):
                samples.append(runner.measure(lib, func))
        if np.median(times[0]) >= np.median(times[1]):
            del best[task.spec]
            kept_default += 1
    return kept_default


def _advance(bar, task: TuneTask, index: int, count: int, best: float | None) -> None:
    """One trial done: the bar shows the current task and the best latency so far."""
    shape = getattr(task.spec, "out_shape", "")
    bar.set_postfix_str(f"task {index}/{count} {task.kind} {shape} | best {'-' if best is None else f'{best:.3f} ms'}",
                        refresh=False)
    bar.update()


def _best_ms(db: Database, key: str) -> float | None:
    measured = [v for v in db.measured(key).values() if v is not None]
    return min(measured) if measured else None


def tuned_tiles(graph: Graph, target: Target, database: str | os.PathLike,
                skipped: dict[str, int] | None = None) -> dict[Spec, Tile]:
    """Best known tiles for the graph's kernels, from the database only (no measurement); the database's skipped
    lines are counted into ``skipped`` (by reason) when given."""
    db = Database(database)
    if skipped is not None:
        skipped.update(db.skipped)
    best = {}
    for task in extract_tasks(graph, target):
        tile = db.best_tile(task_key(task.spec, target))
        if tile is not None and not (isinstance(task.spec, ConvSpec) and resident_rows_problem(task.spec, tile)):
            best[task.spec] = tile  # (a record whose rows the kernel refuses, written by hand: the default instead)
    return best


# ------------------------------------------------------------------------------------------ whole-model guard
def keep_faster(tuned, untuned, inputs: tuple, rounds: int = 5, margin: float = 0.02) -> tuple[Any, dict[str, Any]]:
    """The faster of two builds of one model (``CompiledModule``: tuned tiles, default tiles), timed in the model.

    Why: a tile is chosen from its kernel timed alone (its weights and input hot in cache, the other kernels
    absent), and such timings are noisy on a shared machine; in the model a tile that won alone can lose. So both
    builds run ``rounds`` alternating rounds on the example inputs (TVM's time evaluator, no Python overhead) and
    the tuned build is kept only when its median is below the untuned median by more than ``margin``: tuning is
    then never slower than not tuning, as far as this machine can tell. Returns (the build kept, a report entry).
    """
    tuned_ms, untuned_ms = [], []
    for _ in range(rounds):
        tuned_ms.append(tuned.time_ms(*inputs, number=3, repeat=3))
        untuned_ms.append(untuned.time_ms(*inputs, number=3, repeat=3))
    t, u = float(np.median(tuned_ms)), float(np.median(untuned_ms))
    kept = "tuned" if t < u * (1 - margin) else "untuned"
    entry = {"tuned_ms": round(t, 3), "untuned_ms": round(u, 3), "rounds": rounds, "kept": kept}
    return (tuned if kept == "tuned" else untuned), entry
