"""Run generated CUDA C of one kernel on the CPU, to check a kernel's numerics on a machine without a GPU.

One ``std::thread`` per CUDA thread; blocks run one after another; ``__syncthreads()`` is a ``std::barrier`` over
the block's threads and ``__shared__`` arrays are ``static`` (so one copy is shared by the block's threads). Exact
for kernels whose threads communicate only through shared memory and barriers within a block (no warp shuffles,
atomics or grid-wide synchronization); float math is the host's libm, so expect a few ulp against the GPU.

Tensor cores: ``nvcuda::wmma`` is a warp-collective API whose fragments have an opaque layout, so it is emulated
exactly by giving every thread the WHOLE tile: ``load_matrix_sync`` reads all of it, ``mma_sync`` computes all of
D = A B + C (products exact, fp32 sums in k order), ``store_matrix_sync`` writes all of it. Each thread of a warp
does the warp's work redundantly; the stores write equal values to the same addresses (benign), and a kernel that
touches fragments only through the API sees the same results as on the GPU up to the order of the fp32 sums.
``half`` is the host's ``_Float16`` (IEEE binary16, round to nearest even), ``nv_bfloat16`` a 16-bit truncation
of float32 with round to nearest even, as ``__float2bfloat16_rn``.
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
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>
using std::max;
using std::min;
struct dim { int x, y, z; };
thread_local dim threadIdx, blockIdx;
std::barrier<>* block_barrier;
#define __global__
#define __launch_bounds__(n)
#define __shared__ static
#define __syncthreads() block_barrier->arrive_and_wait()

struct half {
  _Float16 v;
  half() = default;
  half(float f) : v(static_cast<_Float16>(f)) {}
  operator float() const { return static_cast<float>(v); }
};
inline half __float2half_rn(float f) { return half(f); }
inline float __half2float(half h) { return float(h); }
inline bool __hgt(half a, half b) { return float(a) > float(b); }
inline bool __hlt(half a, half b) { return float(a) < float(b); }
inline half max(half a, half b) { return float(a) > float(b) ? a : b; }
inline half min(half a, half b) { return float(a) < float(b) ? a : b; }

struct nv_bfloat16 {
  uint16_t bits;
  nv_bfloat16() = default;
  nv_bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = std::isnan(f) ? uint16_t((u >> 16) | 0x40) : uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  }
  operator float() const { uint32_t u = uint32_t(bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
inline nv_bfloat16 __float2bfloat16_rn(float f) { return nv_bfloat16(f); }
inline float __bfloat162float(nv_bfloat16 h) { return float(h); }

namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;   // A: M x K, B: K x N, C: M x N
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  float x[rows * cols];  // the whole tile, in every thread; T values are exact in float
};
template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  constexpr bool col = std::is_same_v<Layout, col_major>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = float(T(float(col ? p[c * ldm + r] : p[r * ldm + c])));
}
template <int M, int N, int K, typename T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, float v) { for (float& e : f.x) e = v; }
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}
template <int M, int N, int K, typename P>
void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = P(f.x[r * N + c]);
}
} }
"""

C_TYPES = {"float": np.float32, "half": np.float16, "nv_bfloat16": np.uint16}  # bf16 arrays: their bit patterns


def available() -> bool:
    return shutil.which("g++") is not None


def emulate(source: str, arrays: dict[str, np.ndarray], blocks: int | tuple[int, int], threads: int | tuple[int, int],
            folder: Path) -> None:
    """Run the (only) kernel of ``source`` with a grid of ``blocks`` (x or (x, y)) of ``threads`` (x or (x, y));
    ``arrays`` by parameter name (``name`` for ``name_ptr``): float32, float16, or uint16 bit patterns for
    nv_bfloat16, written in place."""
    blocks = (blocks, 1) if isinstance(blocks, int) else tuple(blocks)
    threads = (threads, 1) if isinstance(threads, int) else tuple(threads)
    body = source[source.index('extern "C" __global__'):]
    body = body[body.index(";\n") + 2:].replace("alignas(64) ", "").replace('extern "C" ', "")  # drop the declaration
    name = re.search(r"void (?:__launch_bounds__\(\d+\) )?(\w+)\(", body).group(1)
    params = re.findall(r"(float|half|nv_bfloat16)\* __restrict__ (\w+)_ptr", body[:body.index("{")])
    launch = f"""
extern "C" void launch({", ".join(f"{t}* {p}" for t, p in params)}) {{
  const int count = {threads[0] * threads[1]};
  for (int by = 0; by < {blocks[1]}; ++by)
    for (int bx = 0; bx < {blocks[0]}; ++bx) {{
      std::barrier<> barrier(count);
      block_barrier = &barrier;
      std::vector<std::thread> pool;
      for (int t = 0; t < count; ++t)
        pool.emplace_back([=] {{
          blockIdx = {{bx, by, 0}};
          threadIdx = {{t % {threads[0]}, t / {threads[0]}, 0}};
          {name}({", ".join(p for _, p in params)});
        }});
      for (auto& thread : pool) thread.join();
    }}
}}
"""
    (folder / "emulated.cpp").write_text(SHIM + body + launch)
    library = folder / f"emulated_{name}_{len(list(folder.glob('emulated_*.so')))}.so"  # dlopen caches by path
    result = subprocess.run(["g++", "-O1", "-std=c++20", "-shared", "-fPIC", "-pthread", "-w",
                             str(folder / "emulated.cpp"), "-o", str(library)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for c_type, p in params:
        assert arrays[p].dtype == C_TYPES[c_type] and arrays[p].flags.c_contiguous, (p, arrays[p].dtype, c_type)
    ctypes.CDLL(str(library)).launch(*[arrays[p].ctypes.data_as(ctypes.c_void_p) for _, p in params])
