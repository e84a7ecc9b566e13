"""Autotuning: database round trip, keys that prevent stale reuse, resume after a kill, tuning over TVM RPC."""

from __future__ import annotations

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


def test_keys_of_blocked_convs_refuse_records_of_the_nchw_schedules(monkeypatch):
    """A database written before the blocked (NCHWc) conv holds tiles of other shapes for the same spec."""
    from backends.tvm.kernels import ConvSpec

    spec = ConvSpec(in_shape=(1, 16, 14, 14), weight_shape=(32, 16, 3, 3), stride=(1, 1), padding=(1, 1),
                    dilation=(1, 1), groups=1, has_bias=True, lanes=8)
    here = make_target("llvm")
    assert spec.blocked
    blocked = task_key(spec, here)
    monkeypatch.setattr(ConvSpec, "blocked", property(lambda self: False))
    assert task_key(spec, here) != blocked


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
    deadline = time.time() + 120
    while time.time() < deadline and (not records.exists() or len(records.read_text().splitlines()) < 3):
        time.sleep(0.2)
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
             json.dumps(dict(good, tile={"oc_block": 0, "rows": 1, "cols": 4})).encode(), b'{"key": "abc", "ti']
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "records.jsonl").write_bytes(b"\n".join(lines))
    db = Database(tmp_path / "db")
    assert db.records() == [good]
    assert db.skipped == {"undecodable bytes": 1, "field 'tile' of type str": 1, "field 'ms' of type str": 1,
                          "unknown field 'extra'": 1, "not an object (list)": 1, "not JSON": 1,
                          "field 'tile' is not a tile (oc_block, rows, cols: positive integers)": 1}
    opt = passes.optimize(model, passes=[], example_inputs=xs, measure=False,  # the graph the key was taken from
                          tune=passes.Tune(trials=0, database=str(tmp_path / "db"), progress=False))
    report = opt.report.to_dict()["tune"]
    assert report["tuned_tasks"] == 1 and sum(report["skipped_lines"].values()) == 7
    db.append(dict(good, tile={"oc_block": 8, "rows": 2, "cols": 4}))  # appending after garbage starts a new line
    assert len(Database(tmp_path / "db").records()) == 2
    with torch.no_grad():
        assert_outputs_close(model(*xs), opt(*xs))
