"""Autotuning: database round trip, keys that prevent stale reuse, resume after a kill, tuning over TVM RPC."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import passes
from backends.tvm.kernels import DenseSpec, default_dense_tile, default_tile
from backends.tvm.target import make_target
from backends.tvm.tune import Database, extract_tasks, keep_faster, plan, task_key
from frontend.torch_fx import from_torch
from tests.conftest import ROOT
from tests.helpers import assert_outputs_close

pytestmark = pytest.mark.tvm


def small_cnn() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32 * 6 * 6, 10)).eval()
    return model, (torch.randn(1, 3, 16, 16),)


def test_tuning_persists_and_a_second_compile_runs_zero_trials(tmp_path):
    model, xs = small_cnn()
    tune = passes.Tune(trials=8, database=str(tmp_path / "db"), progress=False)
    first = passes.optimize(model, example_inputs=xs, tune=tune, measure=False)
    report = first.report.to_dict()["tune"]
    assert report["new_trials"] >= 8 and report["tasks"] == 3 and report["tuned_tasks"] == 3
    assert 0 <= report["remeasured_default_kept"] <= 3  # winners re-timed against the default tile
    guard = report["whole_model"]  # the tuned build was timed against the untuned one in the model
    assert guard["kept"] in ("tuned", "untuned") and guard["tuned_ms"] > 0 and guard["untuned_ms"] > 0
    assert "tuning kept the" in first.report.summary()
    with torch.no_grad():
        assert_outputs_close(model(*xs), first(*xs))
    second = passes.optimize(model, example_inputs=xs, tune=tune, measure=False)
    assert second.report.to_dict()["tune"]["new_trials"] == 0
    records = Database(tmp_path / "db").records()
    assert len(records) == report["new_trials"] and all(r["ms"] is not None for r in records)


class _Timed:
    """A stand-in build whose model latency is known (the decision rule under test, not the timer)."""

    def __init__(self, ms: float):
        self.ms, self.calls = ms, 0

    def time_ms(self, *inputs, number: int, repeat: int) -> float:
        self.calls += 1
        return self.ms


@pytest.mark.parametrize("tuned_ms, kept", [(8.0, "tuned"), (10.0, "untuned"), (9.9, "untuned"), (12.0, "untuned")])
def test_the_tuned_build_is_kept_only_when_it_is_faster_in_the_model(tuned_ms, kept):
    tuned, untuned = _Timed(tuned_ms), _Timed(10.0)
    chosen, entry = keep_faster(tuned, untuned, (), rounds=3)
    assert entry["kept"] == kept and chosen is (tuned if kept == "tuned" else untuned)
    assert tuned.calls == untuned.calls == 3  # alternating rounds, both timed every round


def test_keys_include_target_and_tvm_version(monkeypatch):
    model, xs = small_cnn()
    graph = from_torch(model, xs)
    spec = extract_tasks(graph)[0].spec
    here = make_target("llvm")
    other = make_target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    assert task_key(spec, here) != task_key(spec, other)
    before = task_key(spec, here)
    monkeypatch.setattr("tvm.__version__", "0.0.0-other")
    assert task_key(spec, here) != before


@pytest.mark.parametrize("kernel, weight_shape, padding", [("blocked", (32, 16, 3, 3), (1, 1)),
                                                         ("flat_pixels", (128, 16, 1, 1), (0, 0))])
def test_keys_refuse_records_of_earlier_tile_meanings(monkeypatch, kernel, weight_shape, padding):
    """A database written before the blocked (NCHWc) conv holds tiles of other shapes for the same spec; a
    flat-pixel 1x1 conv reads ``Tile(rows, cols)`` as rows * cols consecutive pixels, where an earlier record meant a
    rows x cols window."""
    from backends.tvm.kernels import ConvSpec

    spec = ConvSpec(in_shape=(1, 16, 14, 14), weight_shape=weight_shape, stride=(1, 1), padding=padding,
                    dilation=(1, 1), groups=1, has_bias=True, lanes=8)
    here = make_target("llvm")
    assert getattr(spec, kernel)
    key = task_key(spec, here)
    monkeypatch.setattr(ConvSpec, kernel, property(lambda self: False))
    assert task_key(spec, here) != key


def test_hottest_tasks_get_the_most_trials():
    model, xs = small_cnn()
    work = plan(extract_tasks(from_torch(model, xs)), trials=20)
    flops = [task.flops for task, _ in work]
    assert flops == sorted(flops, reverse=True)
    assert len(work[0][1]) >= len(work[-1][1]) >= 1
    for task, tiles in work:  # the search starts from our default schedule
        default = default_dense_tile(task.spec) if isinstance(task.spec, DenseSpec) else default_tile(task.spec)
        assert tiles[0] == default


def test_the_winograd_rule_is_searched_and_a_tuned_algorithm_is_what_the_build_runs():
    """Where the cost rule sends a conv to Winograd, the tuner's first candidates are that Winograd tile, the direct
    kernel's default tile and the other Winograd tile; a tuned tile's algorithm decides the lowering, and each
    algorithm's build matches PyTorch."""
    import dataclasses

    from backends.tvm.module import build
    from backends.tvm.select import select_kernels
    from backends.tvm.target import resolve_target
    from backends.tvm.tune import candidates

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 32, 28, 28)
    graph = from_torch(model, (x,))
    target = resolve_target("llvm")
    (task,) = extract_tasks(graph, target)
    assert task.winograd == 4 and task.default.winograd == 4  # 28x28 output: F(4x4) by the rule
    first = candidates(task.spec, task.winograd)[:3]
    assert [t.winograd for t in first] == [4, 0, 2] and first[1] == default_tile(task.spec)
    assert all(t.winograd == 0 for t in candidates(task.spec, task.winograd)[3:])
    assert candidates(task.spec) == candidates(task.spec, 0) and candidates(task.spec)[0].winograd == 0
    (node,) = [n for n in graph.nodes if graph.nodes[n]["op"] == "conv2d"]
    direct, f2 = default_tile(task.spec), dataclasses.replace(default_tile(task.spec), winograd=2)
    for tile, kernel, m in ((None, "winograd", 4), (direct, "conv", None), (f2, "winograd", 2)):
        tiles = None if tile is None else {task.spec: tile}
        choice = select_kernels(graph, "llvm", target.lanes, tiles=tiles)[node]
        assert choice.kernel == kernel and getattr(choice.spec, "tile", None) == m
        with torch.no_grad():
            assert_outputs_close(model(x), build(graph, target, tiles=tiles)(x.numpy()))
    # optimize(winograd=False): no Winograd candidates at all
    (off,) = extract_tasks(graph, dataclasses.replace(target, winograd=False))
    assert off.winograd == 0 and off.spec == task.spec


def test_records_of_unknown_algorithms_are_skipped(tmp_path):
    """A database line whose tile names a Winograd tile we do not build is skipped and counted, never applied."""
    db = tmp_path / "db"
    db.mkdir()
    good = {"key": "k", "tile": {"oc_block": 8, "rows": 1, "cols": 6}, "ms": 1.0}  # written before the field
    bad = {"key": "k", "tile": {"oc_block": 8, "rows": 1, "cols": 6, "winograd": 3}, "ms": 0.5}
    (db / "records.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    database = Database(db)
    assert [r["tile"] for r in database.records()] == [good["tile"]]
    assert database.skipped == {"field 'tile' has winograd 3 (0 or one of (2, 4))": 1}
    assert database.best_tile("k").winograd == 0


def test_resume_after_kill_keeps_finished_records(tmp_path):
    db = tmp_path / "db"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from tests.backends.test_tune import small_cnn
        import passes
        model, xs = small_cnn()
        passes.optimize(model, example_inputs=xs, measure=False,
                        tune=passes.Tune(trials=40, database={str(db)!r}, progress=False))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    records = db / "records.jsonl"
    deadline = time.time() + 300  # the child imports TVM and compiles before its first record: slow on a busy machine
    while (time.time() < deadline and proc.poll() is None
           and (not records.exists() or len(records.read_text().splitlines()) < 3)):
        time.sleep(0.05)
    assert proc.poll() is None, "the tuning process ended before it could be killed"
    proc.kill()
    proc.wait()
    finished = len(Database(db).records())
    assert finished >= 3
    with open(records, "a") as f:  # a record torn by the kill
        f.write('{"key": "abc", "tile": {"oc_blo')
    model, xs = small_cnn()
    resumed = passes.optimize(model, example_inputs=xs, measure=False,
                              tune=passes.Tune(trials=40, database=str(db), progress=False))
    report = resumed.report.to_dict()["tune"]
    total = len(Database(db).records())
    assert report["new_trials"] == total - finished > 0  # nothing measured twice, nothing lost
    assert len({(r["key"], json.dumps(r["tile"], sort_keys=True)) for r in Database(db).records()}) == total
    with torch.no_grad():
        assert_outputs_close(model(*xs), resumed(*xs))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tuning_through_an_rpc_tracker_and_two_servers(tmp_path):
    port = _free_port()
    # Each in its own process group: the tracker and servers fork workers that must die with them.
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                               str(port), "--port-end", str(port + 1)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        time.sleep(1.5)
        for _ in range(2):
            server_port = _free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", "loopback",
                 "--host", "127.0.0.1", "--port", str(server_port), "--port-end", str(server_port + 1)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        import tvm

        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                queue = tvm.rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"]
                if queue.get("loopback", {}).get("free", 0) == 2:
                    break
            except (RuntimeError, OSError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail("RPC servers did not register with the tracker")
        model, xs = small_cnn()
        opt = passes.optimize(model, example_inputs=xs, measure=False, tune=passes.Tune(
            trials=6, database=str(tmp_path / "db"), rpc=f"127.0.0.1:{port}:loopback", progress=False))
        report = opt.report.to_dict()["tune"]
        assert report["runner"] == f"rpc:loopback@127.0.0.1:{port}" and report["failed_trials"] == 0
        records = Database(tmp_path / "db").records()
        assert records and all(r["runner"].startswith("rpc:") and r["ms"] > 0 for r in records)
        with torch.no_grad():
            assert_outputs_close(model(*xs), opt(*xs))
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=10)


def test_bad_database_lines_are_skipped_and_counted(tmp_path):
    """Undecodable bytes, wrong types, unknown fields and non-objects are skipped (the database is a cache), the
    valid records still apply, and the report counts what was skipped."""
    model, xs = small_cnn()
    key = task_key(extract_tasks(from_torch(model, xs))[0].spec, make_target("llvm"))
    good = {"key": key, "tile": {"oc_block": 8, "rows": 1, "cols": 4}, "ms": 0.01, "task": "conv", "runner": "local",
            "error": None}
    lines = [json.dumps(good).encode(), b"\xff\xfe\x00garbage", json.dumps(dict(good, tile="8x1x4")).encode(),
             json.dumps(dict(good, ms="fast")).encode(), json.dumps(dict(good, extra=1)).encode(), b"[1, 2]",
             json.dumps(dict(good, tile={"oc_block": 0, "rows": 1, "cols": 4})).encode(), b'{"key": "abc", "ti',
             json.dumps(dict(good, tile={"oc_block": 8, "rows": 1, "cols": 4, "task_rows": -2})).encode()]
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "records.jsonl").write_bytes(b"\n".join(lines))
    db = Database(tmp_path / "db")
    assert db.records() == [good]
    assert db.skipped == {"undecodable bytes": 1, "field 'tile' of type str": 1, "field 'ms' of type str": 1,
                          "unknown field 'extra'": 1, "not an object (list)": 1, "not JSON": 1,
                          "field 'tile' is not a tile (oc_block, rows, cols: positive integers)": 1,
                          "field 'tile' has task_rows -2 (a count of rows, 0: none)": 1}
    opt = passes.optimize(model, passes=[], example_inputs=xs, measure=False,  # the graph the key was taken from
                          tune=passes.Tune(trials=0, database=str(tmp_path / "db"), progress=False))
    report = opt.report.to_dict()["tune"]
    assert report["tuned_tasks"] == 1 and sum(report["skipped_lines"].values()) == 8
    db.append(dict(good, tile={"oc_block": 8, "rows": 2, "cols": 4}))  # appending after garbage starts a new line
    db.append(dict(good, tile={"oc_block": 8, "rows": 1, "cols": 4, "task_rows": 2}))  # resident weights
    assert len(Database(tmp_path / "db").records()) == 3
    with torch.no_grad():
        assert_outputs_close(model(*xs), opt(*xs))


def mobilenet_block() -> tuple[nn.Module, tuple]:
    """An inverted residual (1x1 expand, 3x3 depthwise, 1x1 project, residual) that alter-layout makes blocked."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6())
            self.expand = nn.Sequential(nn.Conv2d(16, 48, 1), nn.ReLU6())
            self.depthwise = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.ReLU6())
            self.project = nn.Conv2d(48, 16, 1)

        def forward(self, x):
            y = self.stem(x)
            return y + self.project(self.depthwise(self.expand(y)))

    return Block().eval(), (torch.randn(1, 3, 14, 14),)


ZEN3 = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}  # AVX2: NCHW8c blocks and 8-lane tiles on any host


def _default_pipeline_graph(model, xs, fuse_any_size: bool = False, target: dict = ZEN3):
    """``fuse_any_size``: fuse-expand-depthwise also on these small maps. Laid out for ``target`` (alter-layout's
    block follows its vector width)."""
    from backends.tvm.target import resolve_target
    from passes.api import DEFAULT_PIPELINE
    from passes.core.pass_base import PassContext
    from passes.core.pipeline import Pipeline, resolve

    graph = from_torch(model, xs)
    pipeline = [*DEFAULT_PIPELINE[:-1], "fuse-expand-depthwise{min_size=1}"] if fuse_any_size else DEFAULT_PIPELINE
    Pipeline(resolve(pipeline), []).run(graph, PassContext(example_inputs=xs, lanes=resolve_target(target).lanes))
    return graph


def test_tasks_are_the_blocked_convs_of_the_default_pipeline_with_their_tile_spaces():
    """The tasks are the conv2d_nchwc kernels alter-layout produces (dense 3x3, 1x1, depthwise), and their tiles
    are whole channel vectors within AVX2's 12 accumulators, columns not only divisors of the width."""
    from backends.tvm.target import resolve_target
    from backends.tvm.tune import candidates

    graph = _default_pipeline_graph(*mobilenet_block())
    assert sorted(graph.nodes[n]["op"] for n in graph.op_nodes("conv2d_nchwc")) == ["conv2d_nchwc"] * 4
    tasks = extract_tasks(graph, resolve_target(ZEN3))
    specs = [t.spec for t in tasks]
    assert len(tasks) == 4 and all(s.blocked and (s.in_block or s.out_block) == 8 for s in specs)
    kinds = {(s.weight_shape[2:], s.depthwise) for s in specs}
    assert kinds == {((3, 3), False), ((1, 1), False), ((3, 3), True)}
    for task in tasks:
        tiles = candidates(task.spec)
        assert tiles[0] == default_tile(task.spec) and len(set(tiles)) == len(tiles) > 3
        for t in tiles:
            vectors = t.oc_block // 8
            assert t.oc_block % 8 == 0 and vectors * t.rows * t.cols <= (12 if vectors > 1 else 8)
        assert any(14 % t.cols for t in tiles)  # padded rows: 14 columns in tiles of 3, 4, 5, 6 ...
    expand = next(t for t in tasks if t.spec.weight_shape == (48, 16, 1, 1))
    assert {t.oc_block for t in candidates(expand.spec)} == {8, 16, 24}  # 3 vectors: 24-channel tiles
    # the stem's 3x3 (3 input channels: its weight panel stays in L1): streamed only
    stem = next(t for t in tasks if t.spec.weight_shape == (16, 3, 3, 3))
    assert not any(t.task_rows for t in candidates(stem.spec))


def test_resident_weights_are_searched_beside_the_same_tile_streamed():
    """A 3x3 conv whose weight panel per task overflows L1 (2 vectors x 64 channels x 9 taps: 36 KB): resident
    weights by default, the same register tile streamed second (which pays is measured there), every other tile
    whose panel overflows L1 with its own resident rows (a divisor of the height, a multiple of its register rows);
    one-vector tiles (an 18 KB panel) streamed."""
    from backends.tvm.kernels import RESIDENT_BYTES, ConvSpec
    from backends.tvm.tune import candidates

    spec = ConvSpec(in_shape=(1, 64, 14, 14), weight_shape=(64, 64, 3, 3), stride=(1, 1), padding=(1, 1),
                    dilation=(1, 1), groups=1, has_bias=True, lanes=8, in_block=8, out_block=8)
    first, second, *rest = candidates(spec)
    assert first.task_rows and second == dataclasses.replace(first, task_rows=0)
    assert all(bool(t.task_rows) == (4 * t.oc_block * 64 * 9 > RESIDENT_BYTES) for t in rest)
    assert all(14 % t.task_rows == 0 and t.task_rows % t.rows == 0 for t in rest if t.task_rows)
    assert {t.oc_block for t in rest if not t.task_rows} == {8}


def test_a_record_whose_resident_rows_the_kernel_refuses_is_not_built(tmp_path):
    """The database is a cache anyone can edit: a record whose ``task_rows`` do not divide the map (5 of 14 rows)
    is passed over (the default tile builds), a valid one (7) is what the build runs; the model matches PyTorch."""
    from backends.tvm.tune import tuned_tiles

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU()).eval()
    xs = (torch.randn(1, 64, 28, 28),)
    target = make_target("llvm")
    (task,) = extract_tasks(from_torch(model, xs), target)
    assert task.default.task_rows  # a 3x3 conv over 64 channels: resident weights by default
    db = Database(tmp_path / "db")
    record = {"key": task_key(task.spec, target), "ms": 0.001, "task": "conv2d", "runner": "local", "error": None}
    tile = dataclasses.asdict(task.default)
    db.append(dict(record, tile=dict(tile, task_rows=5)))
    assert tuned_tiles(from_torch(model, xs), target, tmp_path / "db") == {}
    opt = passes.optimize(model, passes=[], example_inputs=xs, measure=False,
                          tune=passes.Tune(trials=0, database=str(tmp_path / "db"), progress=False))
    with torch.no_grad():
        assert_outputs_close(model(*xs), opt(*xs))
    db.append(dict(record, ms=0.0005, tile=dict(tile, task_rows=7)))
    assert tuned_tiles(from_torch(model, xs), target, tmp_path / "db") == {
        task.spec: dataclasses.replace(task.default, task_rows=7)}


def _task(flops: int, name: str):
    from backends.tvm.kernels import ConvSpec
    from backends.tvm.tune import TuneTask

    spec = ConvSpec(in_shape=(1, 16, 14, 14), weight_shape=(16 * flops, 16, 1, 1), stride=(1, 1), padding=(0, 0),
                    dilation=(1, 1), groups=1, has_bias=True, lanes=8)
    return TuneTask(spec, flops, (name,))


def test_the_task_that_takes_the_most_time_comes_first_and_gets_the_most_trials():
    """Measured time, not FLOPs, orders the tasks and splits the budget."""
    light_but_slow, heavy_but_fast = _task(1, "a"), _task(4, "b")
    work = plan([heavy_but_fast, light_but_slow], trials=12,
                times={light_but_slow.spec: 3.0, heavy_but_fast.spec: 1.0})
    assert [task for task, _ in work] == [light_but_slow, heavy_but_fast]
    assert len(work[0][1]) > len(work[1][1]) >= 1 and sum(len(tiles) for _, tiles in work) == 12


def test_spare_trials_of_a_task_with_few_candidates_go_to_the_others():
    from backends.tvm.tune import allocate

    assert allocate([9.0, 1.0], [3, 50], 20) == [3, 17]  # 18 would go to the first: it has 3 candidates
    assert allocate([1.0, 2.0, 3.0], [5, 5, 5], 2) == [0, 0, 2]  # too few to split: the heaviest first
    assert allocate([1.0, 1.0], [2, 2], 100) == [2, 2]


def test_a_tuned_record_is_the_tile_the_build_runs():
    """The lowering builds each conv with the tile the tuner chose for its spec (``lower_graph(tiles=...)``)."""
    from backends.tvm.kernels import conv_kernel
    from backends.tvm.lower import lower_graph
    from backends.tvm.module import build
    from backends.tvm.target import resolve_target
    from backends.tvm.tune import candidates

    model, xs = mobilenet_block()
    graph = _default_pipeline_graph(model, xs)
    target = resolve_target(ZEN3)
    task = next(t for t in extract_tasks(graph, target) if t.spec.depthwise)
    tuned = candidates(task.spec)[1]
    (node,) = task.nodes
    mod = lower_graph(graph, target, tiles={task.spec: tuned})
    built = next(f for gv, f in mod.functions.items() if gv.name_hint == f"conv2d_{node}")
    for tile, same in ((tuned, True), (task.default, False)):
        expected = conv_kernel(task.spec, "llvm", tile)
        assert tvm_structural_equal(built.body, expected.body) is same
    with torch.no_grad():
        assert_outputs_close(model(*xs), build(graph, target, tiles={task.spec: tuned})(xs[0].numpy()))


def test_the_fused_expand_depthwise_kernel_is_tuned_and_its_tuned_tile_is_what_the_build_runs():
    """A conv2d_expand_dw is a task of its own: its tiles (channel vectors per task, register tile, band height)
    are searched, default first, and the build runs the tuned one."""
    from backends.tvm.expand_depthwise import expand_depthwise_kernel
    from backends.tvm.lower import lower_graph
    from backends.tvm.module import build
    from backends.tvm.target import resolve_target
    from backends.tvm.tune import candidates

    model, xs = mobilenet_block()
    graph = _default_pipeline_graph(model, xs, fuse_any_size=True)
    target = resolve_target(ZEN3)
    task = next(t for t in extract_tasks(graph, target) if t.kind == "conv2d_expand_dw")
    tiles = candidates(task.spec)
    assert tiles[0] == task.default and len(set(tiles)) == len(tiles) > 10
    assert {t.oc_block for t in tiles} == {8, 16, 24} and len({t.rows for t in tiles}) > 2
    tuned = next(t for t in tiles if t.rows != task.default.rows)
    (node,) = task.nodes
    mod = lower_graph(graph, target, tiles={task.spec: tuned})
    built = next(f for gv, f in mod.functions.items() if gv.name_hint == f"conv2d_expand_dw_{node}")
    for tile, same in ((tuned, True), (task.default, False)):
        assert tvm_structural_equal(built.body, expand_depthwise_kernel(task.spec, tile).body) is same
    with torch.no_grad():
        assert_outputs_close(model(*xs), build(graph, target, tiles={task.spec: tuned})(xs[0].numpy()))


def tvm_structural_equal(a, b) -> bool:
    return str(a) == str(b)  # the printed TIR: same loops, splits and buffers


def test_a_candidate_that_fails_to_build_is_recorded_and_counted(tmp_path, monkeypatch):
    from backends.tvm import tune as tuning

    real = tuning.build_candidate

    def broken(task, tile, target):
        if tile != task.default:
            raise RuntimeError("LLVM ERROR: out of registers")
        return real(task, tile, target)

    monkeypatch.setattr(tuning, "build_candidate", broken)
    model, xs = small_cnn()
    opt = passes.optimize(model, example_inputs=xs, measure=False,
                          tune=passes.Tune(trials=6, database=str(tmp_path / "db"), progress=False))
    report = opt.report.to_dict()["tune"]
    assert report["failed_builds"] == report["failed_trials"] >= 3 and report["numerically_off"] == 0
    failed = [r for r in Database(tmp_path / "db").records() if r["ms"] is None]
    assert len(failed) == report["failed_builds"] and all(r["error"].startswith("build: LLVM ERROR") for r in failed)
    # only the default tiles were measured: no other tile to re-time against them
    assert report["tuned_tasks"] == 3 and report["remeasured_default_kept"] == 0
    with torch.no_grad():
        assert_outputs_close(model(*xs), opt(*xs))


def test_a_numerically_wrong_candidate_is_never_chosen(tmp_path, monkeypatch):
    """A candidate whose output differs from the default tile's (here: built for a spec without its ReLU) is
    recorded with its error and never applied, however fast."""
    import dataclasses

    from backends.tvm import tune as tuning

    real = tuning.build_candidate

    def wrong(task, tile, target):
        if tile != task.default and getattr(task.spec, "activation", "none") == "relu":
            task = dataclasses.replace(task, spec=dataclasses.replace(task.spec, activation="none"))
        return real(task, tile, target)

    monkeypatch.setattr(tuning, "build_candidate", wrong)
    model, xs = small_cnn()
    opt = passes.optimize(model, example_inputs=xs, measure=False,
                          tune=passes.Tune(trials=8, database=str(tmp_path / "db"), progress=False))
    report = opt.report.to_dict()["tune"]
    assert report["numerically_off"] >= 1 and report["failed_trials"] == report["numerically_off"]
    off = [r for r in Database(tmp_path / "db").records() if r["error"]]
    assert all(r["error"].startswith("numerics: max error") and r["ms"] is None for r in off)
    with torch.no_grad():
        assert_outputs_close(model(*xs), opt(*xs))


def test_dense_candidates_pass_the_numeric_check_in_their_own_packing():
    """A dense kernel's weight is packed in panels as wide as its tile's columns (``kernels.pack_dense_weight``), so
    each candidate gets the one logical weight packed its own way (``check_args``): every candidate of a classifier
    matches the default tile (a shared random array in the default's packing made them all 'numerically off')."""
    from backends.tvm.target import resolve_target
    from backends.tvm.tune import build_candidate, candidates, numeric_error

    model = nn.Sequential(nn.Flatten(), nn.Linear(96, 1000)).eval()
    graph = _default_pipeline_graph(model, (torch.randn(1, 96, 1, 1),))
    target = resolve_target(ZEN3)
    (task,) = [t for t in extract_tasks(graph, target) if isinstance(t.spec, DenseSpec)]
    tiles = candidates(task.spec)
    assert len({t.cols for t in tiles}) > 3
    reference = numeric_error(task, task.default, *build_candidate(task, task.default, target), None)[0]
    for tile in tiles[1:6]:
        assert numeric_error(task, tile, *build_candidate(task, tile, target), reference)[1] is None, tile
