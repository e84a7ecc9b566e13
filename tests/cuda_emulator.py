"""Run generated CUDA C of one kernel on the CPU, to check a kernel's numerics on a machine without a GPU.

One ``std::thread`` per CUDA thread; blocks run one after another; ``__syncthreads()`` is a ``std::barrier`` over
the block's threads and ``__shared__`` arrays are ``static`` (so one copy is shared by the block's threads). Exact
for kernels whose threads communicate only through shared memory and barriers within a block (no warp intrinsics,
atomics or grid-wide synchronization); float math is the host's libm, so expect a few ulp against the GPU.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

SHIM = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>
using std::max;
using std::min;
struct dim { int x; };
thread_local dim threadIdx, blockIdx;
std::barrier<>* block_barrier;
#define __global__
#define __launch_bounds__(n)
#define __shared__ static
#define __syncthreads() block_barrier->arrive_and_wait()
"""


def available() -> bool:
    return shutil.which("g++") is not None


def emulate(source: str, arrays: dict[str, np.ndarray], blocks: int, threads: int, folder: Path) -> None:
    """Run the (only) kernel of ``source`` with ``blocks`` x ``threads``; float32 ``arrays`` by parameter name
    (``name`` for ``name_ptr``), written in place."""
    body = source[source.index('extern "C" __global__'):]
    body = body[body.index(";\n") + 2:].replace("alignas(64) ", "").replace('extern "C" ', "")  # drop the declaration
    name = re.search(r"void (?:__launch_bounds__\(\d+\) )?(\w+)\(", body).group(1)
    params = re.findall(r"float\* __restrict__ (\w+)_ptr", body[:body.index("{")])
    launch = f"""
extern "C" void launch({", ".join(f"float* {p}" for p in params)}, int blocks, int threads) {{
  for (int b = 0; b < blocks; ++b) {{
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([=] {{ blockIdx.x = b; threadIdx.x = t; {name}({", ".join(params)}); }});
    for (auto& thread : pool) thread.join();
  }}
}}
"""
    (folder / "emulated.cpp").write_text(SHIM + body + launch)
    library = folder / f"emulated_{name}_{len(list(folder.glob('emulated_*.so')))}.so"  # dlopen caches by path
    result = subprocess.run(["g++", "-O1", "-std=c++20", "-shared", "-fPIC", "-pthread", "-w",
                             str(folder / "emulated.cpp"), "-o", str(library)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for p in params:
        assert arrays[p].dtype == np.float32 and arrays[p].flags.c_contiguous, p
    ctypes.CDLL(str(library)).launch(*[arrays[p].ctypes.data_as(ctypes.c_void_p) for p in params],
                                     ctypes.c_int(blocks), ctypes.c_int(threads))
