"""Data parallelism for the passes that read data (``distill`` trains, ``quantize`` calibrates), on PyTorch's own
``torch.distributed``: launch the same program on N processes with ``torchrun`` and every rank works on its shard.

``world()`` is the process group: the one the program already initialized, else one initialized here from the
environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1``,
else a single process. The collectives here run on CPU tensors (the reference interpreter trains and calibrates on
CPU), so they use gloo: the default group when it is gloo, a gloo group beside it when the program chose nccl.

- ``shard``: rank r takes items r, r + N, r + 2N... of the data (``DistributedSampler``'s split, without its
  shuffle: passes shuffle themselves, with their seed). For training the shards are padded by wrapping around to
  the start, as ``DistributedSampler`` does, so every rank takes the same number of optimizer steps.
- ``data_parallel``: the student wrapped in ``DistributedDataParallel``, which averages the gradients of every
  step over the ranks. With a per-rank mean loss on equal-sized items that is the gradient of the mean loss over
  the global batch (the N items of one step together), so N ranks train as one process on global batches would.
- ``all_reduce``: sums, minima and maxima of numpy arrays over the ranks (calibration ranges, histogram counts,
  metric totals), so every rank takes the same decisions and ends with the same graph.

Nothing here is per-pass state: the process group is torch.distributed's own, global by design.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class World:
    """This process's ``rank`` among ``size`` processes; ``group`` is the gloo group for CPU collectives."""

    rank: int = 0
    size: int = 1
    group: Any = None

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints progress and writes files."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


SINGLE = World()


def launched() -> bool:
    """Whether the environment (``torchrun``) asks for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """The process group this program runs in (initialized from torchrun's environment on first use)."""
    import torch.distributed as dist

    if not dist.is_available():
        return SINGLE
    if not dist.is_initialized():
        if not launched():
            return SINGLE
        missing = [key for key in ("RANK", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for data-parallel passes, but "
                             f"{', '.join(missing)} is not set: start the program with torchrun --nproc-per-node N, "
                             "or unset WORLD_SIZE")
        dist.init_process_group("gloo", init_method="env://")
    if dist.get_world_size() == 1:
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), _cpu_group(dist.get_backend()))


@functools.cache
def _cpu_group(backend: str):
    """The default group when it runs gloo (``gloo`` or ``cpu:gloo,cuda:nccl``); else a gloo group over the same
    ranks (created once, by every rank, as ``new_group`` requires)."""
    import torch.distributed as dist

    return None if "gloo" in backend else dist.new_group(backend="gloo")


def shard(items: Sequence, world: World, pad: bool = False) -> list:
    """Rank ``world.rank``'s items: every ``world.size``-th from its rank. ``pad``: wrap around to the start so
    that every rank has ``ceil(len / size)`` items (training needs the same step count on every rank)."""
    if not world.parallel:
        return list(items)
    indices = list(range(len(items)))
    if pad and indices:
        missing = -len(indices) % world.size
        indices += (indices * (missing // len(indices) + 1))[:missing]
    return [items[i] for i in indices[world.rank::world.size]]


def all_reduce(array: Any, op: str, world: World) -> np.ndarray:
    """``array`` (numpy or a number) reduced over the ranks: ``op`` is ``sum``, ``min`` or ``max``; float64 or
    int64 (histogram counts) kept exact."""
    array = np.asarray(array)
    if not world.parallel:
        return array
    import torch
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    tensor = torch.from_numpy(np.array(array, np.int64 if array.dtype.kind in "iub" else np.float64))
    dist.all_reduce(tensor, op=ops[op], group=world.group)
    return tensor.numpy()


def data_parallel(module, world: World):
    """``module`` (an ``nn.Module``) wrapped in ``DistributedDataParallel`` over the CPU group, or as it is in a
    single process. Its buffers never change in training (integer params): synced once at the start, not before
    every forward."""
    if not world.parallel:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, process_group=world.group, forward_sync_buffers=False)


def broadcast_parameters(module, world: World) -> None:
    """Every rank's parameters become rank 0's (bit for bit, whatever the ranks' rounding did)."""
    if not world.parallel:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0, group=world.group)
