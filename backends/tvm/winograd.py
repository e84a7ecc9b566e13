"""Winograd convolution F(m x m, 3 x 3) for 3x3 stride-1 fp32 convs, m in {2, 4}, as ONE scheduled PrimFunc.

Why: a direct 3x3 conv does 9 multiply-adds per output per input channel; Winograd's minimal filtering
(Lavin & Gray 2015, arXiv 1509.09308) computes an m x m output tile from an alpha x alpha input tile (alpha = m + 2)
with alpha^2 multiplies per channel pair: F(2x2,3x3) 16 instead of 36 (2.25x fewer), F(4x4,3x3) 36 instead of 144
(4x fewer). For each tile d (alpha x alpha, per input channel c) and each output channel k:

    U[k, c] = G g[k, c] G^T                 (alpha x alpha, weights: done once, at compile time, in numpy)
    V[c, p] = B^T d[c, p] B                 (input transform of tile p)
    M[k, p] = sum_c U[k, c] (.) V[c, p]     (alpha^2 independent GEMMs over c: where the time goes)
    Y[k, p] = A^T M[k, p] A                 (m x m outputs of tile p, then bias, residual and activation)

A, B, G come from TVM's Cook-Toom construction with the interpolation points of Barabasz et al. 2018 (arXiv
1803.10986: 0, -1, 1 for F(2); 0, -1, 1, 1/2, -2 for F(4)), chosen for fp32 accuracy. The error grows with m
(F(4) has coefficients up to 8 in A and 1/15 in G); ``tests/backends/test_winograd.py`` measures it per layer.

CPU schedule (llvm; batch x tiles flattened into P tiles, padded to a multiple of the register tile's rows):

    pad:   x[n, y, x, c]            channels-last zero-padded copy: each tile element is one vector of channels
                                    (from NCHW[b]c, alter-layout's layout, vector copies; from NCHW a gather)
    V:     for p (parallel), c-vector:  V[e, v, p, c:c+lanes] = (B^T d B)[e, v]   (unrolled, zero coefficients gone)
    M:     for (e, v) (parallel), oc-block, p-block:                               (the batched GEMM)
               acc[pb tiles][ob channels] = 0                     # <= 12 ymm accumulators on AVX2
               for c: acc[i][:] += V[e, v, p_i, c] * U[e, v, ob-block, c, :]     # broadcast x vector FMA
    out:   for (n, oc-block, row of tiles) (parallel):
               Y[tiles of the row, a, b, oc-block] = (A^T M A)[a, b]     (unrolled, vectors of channels; in cache)
               out[n, k, y, x] = act(Y + bias [+ residual])              (NCHW[b]c: a vector per pixel; or NCHW)

Each transform computes its first half (B^T d, A^T M) into alpha x alpha local vectors, then the second half from
them: 2 alpha^3 terms per tile and vector instead of alpha^4, the zero coefficients dropped at trace time.
Not yet done: the input transform fused into the GEMM's tile loop (V is written to memory once and read by the
GEMM: 36 P C floats, L2/L3-resident at ResNet sizes) and tuning of the blocking (``tune.py`` skips Winograd nodes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from tvm import te, tirx
from tvm.s_tir import Schedule

from backends.tvm import prefetch
from backends.tvm.kernels import (
    TE_ACTIVATIONS,
    ConvSpec,
    accumulator_vectors,
    blocked_shape,
    ceil_to,
    largest_divisor,
    layout_compute,
    layout_reader,
)

F32 = "float32"
TILES = (2, 4)  # output tile sizes m of F(m x m, 3 x 3)


@cache
def transform_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T (m x alpha), B^T (alpha x alpha), G (alpha x 3)) of F(m, 3), float64: Y = A^T [(G g G^T) . (B^T d B)] A."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    if m not in TILES:
        raise ValueError(f"Winograd tile {m}: only F(2x2,3x3) and F(4x4,3x3) are built")
    a, b, g = _cook_toom_convolution(_interpolation_points(m + 1), m, 3)
    return np.asarray(a, np.float64).T, np.asarray(b, np.float64).T, np.asarray(g, np.float64)


@dataclass(frozen=True)
class WinogradSpec:
    """One 3x3 stride-1 dilation-1 groups-1 fp32 conv [+bias] [+residual] [+activation] as F(tile x tile, 3x3)."""

    in_shape: tuple[int, int, int, int]      # N, C, H, W
    weight_shape: tuple[int, int, int, int]  # OC, C, 3, 3
    padding: tuple[int, int]
    has_bias: bool
    activation: str = "none"
    activation_params: tuple[float, ...] = ()
    residual: bool = False                   # a second input added before the activation (fuse-conv-add)
    tile: int = 4                            # m: output tile m x m
    lanes: int = 16                          # fp32 lanes of the target's vector registers (``Target.lanes``)
    in_block: int = 0                        # data in NCHW[in_block]c (a ``conv2d_nchwc``); 0: NCHW
    out_block: int = 0                       # output (and residual) in NCHW[out_block]c; 0: NCHW

    @property
    def alpha(self) -> int:
        return self.tile + 2

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        n, _, h, w = self.in_shape
        return n, self.weight_shape[0], h + 2 * self.padding[0] - 2, w + 2 * self.padding[1] - 2

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The output (and residual) as stored: ``out_shape``, or NCHW[out_block]c."""
        return blocked_shape(self.out_shape, self.out_block)

    @property
    def store_block(self) -> int:
        """Output channels per task of the output stage: up to two vectors, whole blocks when stored blocked."""
        oc, block = self.weight_shape[0], self.out_block or 1
        return block * largest_divisor(oc // block, max(2 * self.lanes // block, 1))

    @property
    def tile_grid(self) -> tuple[int, int]:
        """Tiles per image along rows and columns (the last ones may reach past the output: computed, not stored)."""
        _, _, oh, ow = self.out_shape
        return -(-oh // self.tile), -(-ow // self.tile)

    @property
    def tiles(self) -> int:
        th, tw = self.tile_grid
        return self.in_shape[0] * th * tw

    @property
    def oc_block(self) -> int:
        """Output channels of a GEMM register tile: two vectors when the channels fill them, else one; on AVX-512
        all four of a 64-channel layer (one pass over the transformed input V per (e, v), not two). Measured on a
        2-core AVX-512 Xeon, whole models in one process: resnet18 0.992x, resnet50 0.993x (its 64-channel 3x3s at
        56x56: alone 0.373 -> 0.358 ms)."""
        oc = self.weight_shape[0]
        if self.lanes >= 16 and oc == 4 * self.lanes:
            return oc
        return 2 * self.lanes if oc >= 2 * self.lanes else self.lanes

    @property
    def tile_block(self) -> int:
        """Tiles of a GEMM register tile: accumulators = tile_block x oc_block / lanes vectors, within the
        register budget (12 of AVX2's 16 ymm, 24 of AVX-512's 32: the rest hold the weight vectors and the
        broadcast input). The tile axis is padded to a multiple of it, so among the blocks from half the budget
        (or the tile count) to all of it the one that pads least wins (ties: the larger): ResNet's 7x7 grids of
        tiles (49) take 7, not 12 (60 computed tiles). Measured alone on a 2-core AVX-512 Xeon, 12 -> 7: 128
        channels F(4) at 28x28 0.369 -> 0.313 ms, 256 channels F(2) at 14x14 0.511 -> 0.434, 64 channels F(4) at
        56x56 (196 tiles) 0.432 -> 0.405; whole models in one process resnet18 0.933x, vgg11_bn 0.955x, resnet50
        0.979x."""
        budget = accumulator_vectors(self.lanes) // (self.oc_block // self.lanes)
        smallest = max(min(budget // 2, self.tiles), 1)
        return min(range(budget, smallest - 1, -1), key=lambda block: ceil_to(self.tiles, block))

    @property
    def padded_channels(self) -> int:
        return ceil_to(self.weight_shape[0], self.oc_block)

    @property
    def padded_tiles(self) -> int:
        return ceil_to(self.tiles, self.tile_block)

    @property
    def multiplies(self) -> int:
        """Multiplies of the GEMM (the transforms are O(alpha^2 (C + OC) P), small next to it for wide layers)."""
        return self.alpha ** 2 * self.tiles * self.weight_shape[0] * self.weight_shape[1]

    def pack_weight(self, weight: np.ndarray) -> np.ndarray:
        """U = G g G^T per (k, c), laid out (alpha, alpha, OC / oc_block, C, oc_block), zero channels appended:
        the GEMM loads a contiguous vector of output channels per (e, v, c). Computed in float64, stored fp32."""
        _, _, g = transform_matrices(self.tile)
        oc, c = self.weight_shape[:2]
        u = np.transpose(g @ np.asarray(weight, np.float64) @ g.T, (2, 3, 0, 1))  # (e, v, k, c)
        u = np.pad(u, ((0, 0), (0, 0), (0, self.padded_channels - oc), (0, 0)))
        u = u.reshape(self.alpha, self.alpha, self.padded_channels // self.oc_block, self.oc_block, c)
        return np.ascontiguousarray(u.transpose(0, 1, 2, 4, 3)).astype(np.float32)


def _combination(coefficients, values):
    """sum_i coefficients[i] * values[i] without the zero terms (and without multiplying by +-1)."""
    total = None
    for coefficient, value in zip(coefficients, values):
        if coefficient == 0:
            continue
        if coefficient in (1, -1):
            term = value if coefficient == 1 else -value
        else:
            term = tirx.const(float(coefficient), F32) * value
        total = term if total is None else total + term
    return total if total is not None else tirx.const(0.0, F32)


def _pick(index, expressions):
    """expressions[index] for a loop variable ``index``: a Select chain that the unrolled loop folds away."""
    chosen = expressions[-1]
    for i in range(len(expressions) - 2, -1, -1):
        chosen = tirx.Select(index == i, expressions[i], chosen)
    return chosen


def _half_transform(matrix: np.ndarray, element, row):
    """sum_i matrix[row, i] * element(i) for a loop variable ``row``: one side of a tile transform
    (X -> matrix X, then -> (matrix X) matrix^T), a few terms per row once the unrolled loop fixes ``row``."""
    size, inner = matrix.shape
    return _pick(row, [_combination(matrix[r], [element(i) for i in range(inner)]) for r in range(size)])


def winograd_compute(spec: WinogradSpec) -> list[te.Tensor]:
    """TE stages; returns the PrimFunc arguments [data, packed U, (bias,) (residual,) output]."""
    n, c, h, w = spec.in_shape
    oc = spec.weight_shape[0]
    m, alpha, ob = spec.tile, spec.alpha, spec.oc_block
    th, tw = spec.tile_grid
    (ph, pw), tiles = spec.padding, spec.tiles
    a_t, b_t, _ = transform_matrices(m)
    data = te.placeholder(blocked_shape(spec.in_shape, spec.in_block), F32, name="data")
    read = layout_reader(data, spec.in_block)
    weight = te.placeholder((alpha, alpha, spec.padded_channels // ob, c, ob), F32, name="weight")
    pad = te.compute((n, th * m + 2, tw * m + 2, c),
                     lambda b, y, x, ch: tirx.if_then_else(tirx.all(y >= ph, y < h + ph, x >= pw, x < w + pw),
                                                           read(b, ch, y - ph, x - pw), tirx.const(0.0, F32)),
                     name="pad")

    def input_rows(e, j, p, ch):  # (B^T d)[e, j]
        p = tirx.min(p, tiles - 1)  # the padded tail of the tile axis repeats the last tile (never stored)
        b, t = p // (th * tw), p % (th * tw)
        y0, x0 = (t // tw) * m, (t % tw) * m
        return _half_transform(b_t, lambda i: pad[b, y0 + i, x0 + j, ch], e)

    rows_v = te.compute((alpha, alpha, spec.padded_tiles, c), input_rows, name="BtD")
    tiles_v = te.compute((alpha, alpha, spec.padded_tiles, c),
                         lambda e, v, p, ch: _half_transform(b_t, lambda j: rows_v[e, j, p, ch], v), name="V")
    rc = te.reduce_axis((0, c), "rc")
    gemm = te.compute((alpha, alpha, spec.padded_tiles, spec.padded_channels),
                      lambda e, v, p, k: te.sum(tiles_v[e, v, p, rc] * weight[e, v, k // ob, rc, k % ob], axis=rc),
                      name="M")
    rows_y = te.compute((m, alpha, tiles, oc), lambda i, v, p, k: _half_transform(
        a_t, lambda e: gemm[e, v, p, k], i), name="AtM")
    out_tiles = te.compute((tiles, m, m, oc), lambda p, i, j, k: _half_transform(
        a_t, lambda v: rows_y[i, v, p, k], j), name="Y")
    args = [data, weight]
    bias = te.placeholder((oc,), F32, name="bias") if spec.has_bias else None
    residual = te.placeholder(spec.stored_shape, F32, name="residual") if spec.residual else None
    args += [t for t in (bias, residual) if t is not None]
    act = TE_ACTIVATIONS[spec.activation]

    def finish(b, k, y, x):
        v = out_tiles[(b * th + y // m) * tw + x // m, y % m, x % m, k]
        v = v + bias[k] if bias is not None else v
        v = v + layout_reader(residual, spec.out_block)(b, k, y, x) if residual is not None else v
        return act(v, spec.activation_params)

    return [*args, layout_compute(spec.out_shape, spec.out_block, finish, "out")]


def schedule_cpu(spec: WinogradSpec, func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = Schedule(func)
    lanes, ob, pb = spec.lanes, spec.oc_block, spec.tile_block
    c = spec.weight_shape[1]
    # pad: parallel over image rows, channels innermost (contiguous stores)
    pad = sch.get_sblock("pad")
    b, y, x, ch = sch.get_loops(pad)
    sch.parallel(sch.fuse(b, y))
    if spec.in_block:  # a pixel's channels are contiguous blocks: vector copies
        sch.vectorize(sch.split(ch, [None, spec.in_block])[1])
    # V: per tile, a vector of channels through the unrolled transform
    tv = sch.get_sblock("V")
    e, v, p, ch = sch.get_loops(tv)
    _tile_transform(sch, "BtD", p, (e, v), ch, largest_divisor(c, lanes))
    sch.parallel(p)
    # M: the batched GEMM, accumulators in registers
    gemm = sch.get_sblock("M")
    store = sch.cache_write(gemm, 0, "global")  # gemm now accumulates into a local tile; store writes it back
    sch.set_scope(gemm, 0, "local")
    e, v, p, k = sch.get_loops(store)
    p_outer, p_inner = sch.split(p, [None, pb])
    k_outer, k_inner = sch.split(k, [None, ob])
    sch.reorder(e, v, k_outer, p_outer, p_inner, k_inner)
    sch.vectorize(k_inner)
    sch.compute_at(gemm, p_outer)
    p_tile, k_tile, rc = sch.get_loops(gemm)[-3:]
    sch.reorder(rc, p_tile, k_tile)
    sch.unroll(p_tile)
    sch.vectorize(k_tile)
    panel = sch.fuse(e, v)
    sch.parallel(panel)
    sch.decompose_reduction(gemm, rc)
    prefetch.mark(sch, p_outer, panel=panel, channels=k_outer, tiles=p_outer)
    # out: per image, row of tiles and block of output channels (parallel), the tiles' outputs Y computed into
    # a cache-resident buffer (a row of tiles x m x m x the channel block), then stored row by row in NCHW
    out = sch.get_sblock("out")
    k_block = spec.store_block
    b, k, y, x, *k_vector = sch.get_loops(out)  # k_vector: the block's lanes when stored NCHW[b]c
    k_outer, k_inner = sch.split(k, [None, k_block // (spec.out_block or 1)])
    y_tiles, y_inner = sch.split(y, [None, spec.tile])
    if k_vector:  # stored blocked: per (block, row, column) one vector of channels
        sch.reorder(b, y_tiles, k_outer, k_inner, y_inner, x, *k_vector)
        sch.vectorize(*k_vector)
    else:  # stored NCHW: per row, column and channel a scalar
        sch.reorder(b, y_tiles, k_outer, y_inner, x, k_inner)
        sch.unroll(k_inner)
    # rows of tiles before channel blocks: each core writes its own rows, which the next kernel reads there
    # (``kernels.rows_first``; resnet18 0.981x, resnet50 0.994x)
    task = sch.fuse(b, y_tiles, k_outer)
    sch.parallel(task)
    out_tiles = sch.get_sblock("Y")
    sch.compute_at(out_tiles, task)
    sch.set_scope(out_tiles, 0, "local")
    p, i, j, k = sch.get_loops(out_tiles)[-4:]
    _tile_transform(sch, "AtM", p, (i, j), k, largest_divisor(k_block, lanes))
    return sch.mod["main"]


def _tile_transform(sch: Schedule, half: str, tile, elements: tuple, channels, lanes: int) -> None:
    """A tile transform's loops: per ``tile``, per vector of ``lanes`` channels, the tile's two ``elements`` loops
    unrolled (their coefficients become constants, zero terms vanish) around the vector. Its first ``half``
    (B^T d or A^T M) is computed there too, into a local buffer of alpha x alpha vectors."""
    outer, inner = sch.split(channels, [None, lanes])
    sch.reorder(tile, outer, *elements, inner)
    block = sch.get_sblock(half)
    sch.compute_at(block, outer)
    sch.set_scope(block, 0, "local")
    *half_elements, vector = sch.get_loops(block)[-3:]
    for loop in (*half_elements, *elements):
        sch.unroll(loop)
    sch.vectorize(vector)
    sch.vectorize(inner)


def _prefetch_next_panel(spec: WinogradSpec, weight: tirx.Var):
    """The GEMM's prefetches: each pass over a block of tiles (loop ``tiles``) prefetches its share of the next
    weight panel (U[e, v, the next block of ``oc_block`` channels, all C, :]: the panels are contiguous in
    (e, v, channel block) order, the last one's successor clamped to itself), so that panel is in L2 when its first
    pass starts. Measured on a 2-core AVX-512 Xeon, torchvision resnet18 in one process: 0.967-0.976x the time
    without (the kernel alone, hot caches: even to 4% slower at 256 channels on 14x14)."""
    alpha, block = spec.alpha, spec.oc_block
    blocks, channels = spec.padded_channels // block, spec.weight_shape[1]
    floats = 64 // 4  # per cache line
    lines = -(-channels * block // floats)
    chunk = -(-lines // (spec.padded_tiles // spec.tile_block))

    def build(roles):
        panel, k, tiles = roles["panel"], roles["channels"], roles["tiles"]
        dtype = panel.ty.dtype
        const = lambda v: tirx.const(v, dtype)  # noqa: E731
        q = tirx.Var("q", dtype)
        following = tirx.min(panel * const(blocks) + k + const(1), const(alpha * alpha * blocks - 1))
        offset = tirx.min(tiles * const(chunk) + q, const(lines - 1)) * const(floats)
        indices = [following // const(alpha * blocks), following // const(blocks) % const(alpha),
                   following % const(blocks), offset // const(block), offset % const(block)]
        return tirx.For(q, const(0), const(chunk), tirx.ForKind.SERIAL, prefetch.prefetch(weight, indices))

    return build


def winograd_kernel(spec: WinogradSpec) -> tirx.PrimFunc:
    """The scheduled PrimFunc ``(data, U[, bias][, residual], out)`` for ``spec`` (CPU)."""
    func = schedule_cpu(spec, te.create_prim_func(winograd_compute(spec)))
    func = prefetch.insert_prefetch(func, _prefetch_next_panel(spec, func.params[1]))
    return func.with_attrs({"tir.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})


# The cost rule (``choose``). Measured on Zen 3 (AVX2, 2 cores), direct kernel vs F(2)/F(4) per layer
# (benchmarks/winograd_layers.py): see the README numbers; below these sizes the transforms and the padded tiles
# cost more than the multiplies saved. A 7x7 output is 16 tiles of F(2): each transformed weight (16/9 the direct
# kernel's bytes: 16.8 MB at 512 -> 512) is reused 16 times against the direct kernel's 49, and in a whole model,
# where the weights come from memory, not a warm cache, its GEMM waits on them. Kernel alone (hot caches, a 2-core
# AVX-512 Xeon) F(2) and direct are even at 512 -> 512 on 7x7 (0.89 vs 0.86 ms); in torchvision resnet18 the
# three such layers direct make the model 0.91x the time (13.20 -> 11.98 ms, one process), resnet50 0.98x.
MIN_CHANNELS = 32  # input and output channels
MIN_OUTPUT = 8     # output rows and columns: at 7x7 the direct kernel (below)
MIN_WORK = 64 * 64 * 7 * 7  # C x OC x OH x OW: below it (32 -> 32 channels on 7x7: 0.042 vs 0.037 ms) direct wins
MIN_F4_OUTPUT = 28  # output rows and columns from which F(4x4) beats F(2x2) (``choose_tile``)


def refusal(spec: ConvSpec) -> str | None:
    """Why the conv ``spec`` does not run as Winograd (None: it does). One reason per refusal, for ``explain``."""
    n, c, _, _ = spec.in_shape
    oc, _, kh, kw = spec.weight_shape
    _, _, oh, ow = spec.conv_shape
    if spec.dtype != F32:
        return f"dtype {spec.dtype}: Winograd is built for float32 only"
    if (kh, kw) != (3, 3):
        return f"kernel {kh}x{kw}: Winograd F(m, 3) needs 3x3"
    if spec.stride != (1, 1):
        return f"stride {spec.stride}: Winograd needs stride 1"
    if spec.dilation != (1, 1):
        return f"dilation {spec.dilation}: Winograd needs dilation 1"
    if spec.groups != 1:
        return f"groups {spec.groups}: Winograd is built for dense convs"
    if spec.activation not in TE_ACTIVATIONS:
        return f"activation {spec.activation!r} has no fused epilogue"
    if min(c, oc) < MIN_CHANNELS:
        return f"{c} -> {oc} channels: Winograd pays from {MIN_CHANNELS} in and out"
    if min(oh, ow) < MIN_OUTPUT:
        return f"output {oh}x{ow}: Winograd pays from {MIN_OUTPUT}x{MIN_OUTPUT}"
    if c * oc * oh * ow < MIN_WORK:
        return f"{c} -> {oc} channels on {oh}x{ow}: too little work for the transforms to pay"
    return None


def choose_tile(spec: ConvSpec) -> int:
    """F(4x4) on large maps: 4x fewer multiplies than direct against F(2x2)'s 2.25x. On small maps F(2x2) wins:
    F(4)'s weights are 36/16 larger and each is reused by fewer tiles (a 14x14 map: 16 tiles of 4x4, 31% of them
    past the edge, against 49 exact 2x2 tiles), so its GEMM waits on memory. Measured on Zen 3 over ResNet-18's
    layers (``benchmarks/winograd_layers.py``): F(4) faster at 56x56 and 28x28, F(2) at 14x14 and 7x7."""
    _, _, oh, ow = spec.conv_shape
    return 4 if min(oh, ow) >= MIN_F4_OUTPUT else 2


def choose(spec: ConvSpec, tile: int | None = None) -> WinogradSpec | None:
    """The Winograd kernel for the conv ``spec`` (output tile ``tile``, default ``choose_tile``: a tuned choice
    overrides it), or None where the cost rule keeps the direct kernel. A fused pool (conv2d_pool) is not part of
    it: the conv runs as Winograd and the pool after it (``lower.py``), which beats the fused direct kernel where
    Winograd pays (VGG's convs are mostly conv + pool)."""
    if refusal(spec) is not None:
        return None
    return WinogradSpec(spec.in_shape, spec.weight_shape, spec.padding, spec.has_bias, spec.activation,
                        spec.activation_params, spec.residual, tile or choose_tile(spec), spec.lanes, spec.in_block,
                        spec.out_block)
