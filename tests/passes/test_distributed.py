"""Data-parallel distill and calibration on torch.distributed: two real processes on loopback (gloo, 127.0.0.1, a
free port) against one process on the same data.

The ranks get torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and run
``tests/passes/distributed_worker.py``. Checked: both ranks end with the same weights, equal (to float rounding:
gradients are summed in another order) to one process trained on the global batches (the two items of each step
concatenated); calibration scales equal one process's exactly; rank 1 prints nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from passes.core.distributed import SINGLE, World, all_reduce, shard, world
from passes.core.pass_base import PassContext
from passes.transforms.prune_channels import PruneChannels
from tests.conftest import ROOT
from tests.helpers import torchrun
from tests.passes import distributed_worker as worker

LAUNCH_TIMEOUT_S = 150  # each rank: start, distill, three calibrations; ~15 s on 2 idle cores


def launch(module: str, *args: str, ranks: int = 2) -> list[subprocess.CompletedProcess]:
    """``python -m module args`` as ``ranks`` processes with the environment torchrun would give them (started
    here rather than by torchrun, to read each rank's output apart)."""
    port = torchrun(ranks)[-1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}  # torchrun's default with several ranks per host
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(ranks)]
    try:
        results = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=LAUNCH_TIMEOUT_S)) for p in procs]
    finally:
        for p in procs:
            p.kill()  # after a timeout, the other rank would wait for its peer forever
    for result, p in zip(results, procs):
        result.returncode = p.wait()
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    results = launch("tests.passes.distributed_worker", str(out))
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-3000:]}"
    return out, results


def global_batches(items: list, ranks: int = 2) -> list[tuple]:
    """What one step of ``ranks`` ranks sees together: items r, r + 1... of each step concatenated."""
    return [tuple(torch.cat(parts) for parts in zip(*items[i:i + ranks])) for i in range(0, len(items), ranks)]


def test_both_ranks_end_with_the_same_weights(two_ranks):
    out, _ = two_ranks
    rank0, rank1 = np.load(out / "rank0.npz"), np.load(out / "rank1.npz")
    assert sorted(rank0.files) == sorted(rank1.files)
    for key in rank0.files:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)


def test_two_ranks_train_as_one_process_on_the_global_batches(two_ranks):
    out, _ = two_ranks
    single = worker.distilled(global_batches(worker.ITEMS))
    ranked = np.load(out / "rank0.npz")
    assert sorted(single) == sorted(ranked.files)
    for key, expected in single.items():
        torch.testing.assert_close(torch.from_numpy(ranked[key]), torch.from_numpy(expected), rtol=1e-5,
                                   atol=1e-6, msg=key)
    pruned = worker.from_torch(worker.MODEL, worker.X)
    PruneChannels(ratio=0.5).run(pruned, PassContext())
    moved = [key for key in single if not np.allclose(single[key], pruned.nodes[key.split(".")[0]]["params"][
        key.split(".")[1]], rtol=1e-3)]
    assert {"n0.weight", "n4.weight"} <= set(moved)  # training moved the conv and linear weights


def test_calibration_scales_equal_one_process_on_all_the_data(two_ranks):
    out, _ = two_ranks
    single = worker.scales(worker.ITEMS)
    assert len(single) == 2 * len(worker.OBSERVERS)  # the conv and the linear, per observer
    for rank in (0, 1):
        assert json.loads((out / f"rank{rank}.json").read_text())["scales"] == json.loads(json.dumps(single))


def test_accuracy_aware_quantize_decides_as_one_process(two_ranks):
    """The metric totals and SQNR sums are reduced: the same metric, kept layers and per-layer SQNR."""
    out, _ = two_ranks
    single = worker.accuracy_aware_stats(worker.ITEMS)
    assert {"metric_float_milli", "kept_for_accuracy", "layer_sqnr_db.n0"} <= set(single)
    for rank in (0, 1):
        assert json.loads((out / f"rank{rank}.json").read_text())["stats"] == single


def test_only_rank_zero_prints(two_ranks):
    _, (rank0, rank1) = two_ranks
    assert rank1.stdout == "" and rank1.stderr == ""
    # progress is a tqdm bar on rank 0's stderr, drawn only on a terminal: nothing in these pipes either
    assert rank0.stdout == "" and "Traceback" not in rank0.stderr


def test_shards_split_items_round_robin_and_pad_by_wrapping():
    items = list("abcde")
    assert [shard(items, World(r, 2)) for r in (0, 1)] == [list("ace"), list("bd")]
    assert [shard(items, World(r, 2), pad=True) for r in (0, 1)] == [list("ace"), list("bda")]
    assert [shard(["a"], World(r, 3), pad=True) for r in range(3)] == [["a"], ["a"], ["a"]]
    assert shard(items, SINGLE, pad=True) == items


def test_a_single_process_reduces_nothing():
    assert world() == SINGLE  # no torchrun environment: no process group is started
    np.testing.assert_array_equal(all_reduce([1.5, -2.0], "min", SINGLE), [1.5, -2.0])


@pytest.mark.tvm
def test_torchrun_cli_writes_one_artifact_from_rank_zero(tmp_path):
    """``torchrun --nproc-per-node 2 -m passes.cli compile ...``: one artifact, rank 1 silent, both exit 0."""
    from passes.api import load

    x = worker.X[0]
    torch.onnx.export(worker.MODEL, (x,), str(tmp_path / "m.onnx"), input_names=["x"], dynamo=False,
                      opset_version=17)
    np.savez(tmp_path / "train.npz", x=torch.randn(32, *x.shape[1:]).numpy())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [*torchrun(2), "--redirects", "3", "--log-dir", str(tmp_path / "logs"), "-m", "passes.cli", "compile", str(tmp_path / "m.onnx"), "--passes",
               "prune-channels{ratio=0.5},distill{epochs=2},default", "--data", str(tmp_path / "train.npz"),
               "--batch-size", "8", "-o", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = {p.parent.name + "/" + p.name: p.read_text() for p in (tmp_path / "logs").rglob("*.log")}
    assert logs["1/stdout.log"] == "" and logs["1/stderr.log"] == ""
    assert f"wrote {tmp_path / 'out'}" in logs["0/stdout.log"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))] == ["out"]
    stats = {p["name"]: p["stats"] for p in json.loads((tmp_path / "out" / "report.json").read_text())["passes"]}
    assert stats["distill"]["steps"] == 2 * 2  # 4 items of 8 over 2 ranks: 2 steps per epoch
    y = load(tmp_path / "out")(x.numpy())
    assert np.asarray(y).shape == (1, 5)


def test_a_partial_torchrun_environment_is_refused_clearly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="RANK, MASTER_ADDR, MASTER_PORT is not set: start the program with torchrun"):
        world()
