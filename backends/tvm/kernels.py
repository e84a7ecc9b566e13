"""Our own TIR kernels: conv2d [+bias] [+activation] [+pool] as ONE scheduled PrimFunc.

Why: TVM's untuned conv2d is a naive loop nest (~50x slower than a blocked kernel here), and TVM's FuseOps never
fuses a pool into a conv. The kernel is built from TE compute stages (pad -> conv -> epilogue -> pool) and then
scheduled with ``tvm.s_tir.Schedule``:

CPU (llvm), per output tile of ``oc_block`` channels x ``rows`` rows x ``width`` columns:

    for n, oc_outer, row (parallel over cores), col_outer:
        acc[oc_block][rows][width] = 0                  # local buffer: registers
        for ic, kh, kw:                                 # reduction
            for oc in oc_block, r in rows:              # broadcast one weight, FMA a vector of inputs
                acc[oc][r][0:width] += w[oc, ic, kh, kw] * x[ic, row*s + kh, col*s + kw : +width]
        out[...] = pool(act(acc + bias))                # epilogue straight from registers

With a pool fused, the tile covers whole pooling windows (non-overlapping, guaranteed by the pass), so each conv
output is computed exactly once and the full-size conv output never exists in memory: the only buffers are the
padded input (when padding > 0), the local accumulator tile and the pooled output.

CUDA: one thread per pooled output (or conv output), its conv window accumulated in local memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import s_tir, te, tirx
from tvm.s_tir import Schedule

F32 = "float32"


def _f(value: float):
    return tirx.const(value, F32)


# tanh as Eigen's rational approximation (a few ulp in float32). Why: LLVM scalarizes a vector exp into one libm
# call per lane, so exp-based tanh/sigmoid made activations and RNN gates the slowest part of their kernels; this
# form is pure multiply-adds and one division, all vectorized.
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def fast_tanh(x):
    x = tirx.max(tirx.min(x, _f(_TANH_CLAMP)), _f(-_TANH_CLAMP))
    x2 = x * x
    p = _f(_TANH_P[0])
    for c in _TANH_P[1:]:
        p = p * x2 + _f(c)
    q = _f(_TANH_Q[0])
    for c in _TANH_Q[1:]:
        q = q * x2 + _f(c)
    return x * p / q


def fast_sigmoid(x):
    """sigmoid(x) = (1 + tanh(x / 2)) / 2."""
    return _f(0.5) + _f(0.5) * fast_tanh(x * _f(0.5))


# Activation epilogues in TE: f(x, params) -> expr. Same names and meaning as passes.ir.ops.ACTIVATIONS.
def _sigmoid(x):
    return fast_sigmoid(x)


def _softplus(x):
    return tirx.Select(x > _f(20.0), x, tirx.log(_f(1.0) + tirx.exp(x)))


TE_ACTIVATIONS: dict[str, Callable] = {
    "none": lambda x, p: x,
    "relu": lambda x, p: tirx.max(x, _f(0.0)),
    "relu6": lambda x, p: tirx.min(tirx.max(x, _f(0.0)), _f(6.0)),
    "leaky_relu": lambda x, p: tirx.Select(x > _f(0.0), x, x * _f(p[0])),
    "elu": lambda x, p: tirx.Select(x > _f(0.0), x, _f(p[0]) * (tirx.exp(x) - _f(1.0))),
    "gelu": lambda x, p: _f(0.5) * x * (_f(1.0) + tirx.erf(x * _f(1.0 / math.sqrt(2.0)))),
    "gelu_tanh": lambda x, p: _f(0.5) * x * (_f(1.0) + fast_tanh(_f(math.sqrt(2.0 / math.pi))
                                                                 * (x + _f(0.044715) * x * x * x))),
    "silu": lambda x, p: x * _sigmoid(x),
    "mish": lambda x, p: x * fast_tanh(_softplus(x)),
    "sigmoid": lambda x, p: _sigmoid(x),
    "tanh": lambda x, p: fast_tanh(x),
    "hardswish": lambda x, p: x * tirx.min(tirx.max(x + _f(3.0), _f(0.0)), _f(6.0)) / _f(6.0),
    "hardsigmoid": lambda x, p: tirx.min(tirx.max(x + _f(3.0), _f(0.0)), _f(6.0)) / _f(6.0),
    "clamp": lambda x, p: tirx.min(tirx.max(x, _f(max(p[0], -3.4e38))), _f(min(p[1], 3.4e38))),
}


@dataclass(frozen=True)
class ConvSpec:
    """Static description of one conv2d [+pool] kernel."""

    in_shape: tuple[int, int, int, int]      # N, C, H, W
    weight_shape: tuple[int, int, int, int]  # OC, C/groups, KH, KW
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    has_bias: bool
    activation: str = "none"
    activation_params: tuple[float, ...] = ()
    residual: bool = False                   # a second input added before the activation (fuse-conv-add)
    pool: str | None = None                  # "max" | "avg" | None
    pool_kernel: tuple[int, int] = (1, 1)
    pool_stride: tuple[int, int] = (1, 1)
    dtype: str = F32                         # storage of data, weight, bias, residual, output; accumulation is fp32

    @property
    def channels_vectorized(self) -> bool:
        """Vectorize over output channels (weights packed (C/g, KH, KW, OC)) instead of output columns.

        Pays for ordinary (groups=1) convs whose output rows are too short to fill a vector, and for 1x1 convs,
        whose few FLOPs per loaded input column would otherwise leave the FMA units idle.
        """
        _, oc, _, ow = self.conv_shape
        one_by_one = self.weight_shape[2:] == (1, 1)
        return self.groups == 1 and oc % 8 == 0 and (ow < VECTOR_LANES or one_by_one)

    def pack_weight(self, weight):
        """The weight in the kernel's layout (done once, at compile time)."""
        import numpy as np

        return np.ascontiguousarray(np.transpose(weight, (1, 2, 3, 0))) if self.channels_vectorized else weight

    @property
    def conv_shape(self) -> tuple[int, int, int, int]:
        return conv_output_shape(self.in_shape, self.weight_shape, self.stride, self.padding, self.dilation)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        n, oc, oh, ow = self.conv_shape
        if self.pool is None:
            return n, oc, oh, ow
        (kh, kw), (sh, sw) = self.pool_kernel, self.pool_stride
        return n, oc, (oh - kh) // sh + 1, (ow - kw) // sw + 1


def conv_output_shape(in_shape: tuple, weight_shape: tuple, stride: tuple, padding: tuple, dilation: tuple
                      ) -> tuple[int, int, int, int]:
    """NCHW output shape of a 2-d convolution (symmetric padding)."""
    n, _, h, w = in_shape
    oc, _, kh, kw = weight_shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return n, oc, oh, ow


def conv_compute(spec: ConvSpec) -> list[te.Tensor]:
    """TE stages; returns the PrimFunc arguments [data, weight, (bias,) output]."""
    n, c, h, w = spec.in_shape
    oc, cg, kh, kw = spec.weight_shape
    (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    dtype = spec.dtype
    data = te.placeholder(spec.in_shape, dtype, name="data")
    packed = spec.channels_vectorized
    weight = te.placeholder((cg, kh, kw, oc) if packed else spec.weight_shape, dtype, name="weight")
    args = [data, weight]
    source = data
    if ph or pw:
        source = te.compute(
            (n, c, h + 2 * ph, w + 2 * pw),
            lambda b, ch, y, x: tirx.if_then_else(tirx.all(y >= ph, y < h + ph, x >= pw, x < w + pw),
                                                  data[b, ch, y - ph, x - pw], tirx.const(0.0, dtype)), name="pad")
    rc = te.reduce_axis((0, cg), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    per_group = oc // spec.groups
    n_, oc_, oh, ow = spec.conv_shape

    def dot(b, o, y, x):
        w = weight[rc, ry, rx, o] if packed else weight[o, rc, ry, rx]
        return te.sum(_wide(source[b, (o // per_group) * cg + rc, y * sh + ry * dh, x * sw + rx * dw]) * _wide(w),
                      axis=[rc, ry, rx])

    if packed:  # accumulate channels-last so a tile's channel vector is contiguous in registers
        conv = te.compute((n_, oh, ow, oc_), lambda b, y, x, o: dot(b, o, y, x), name="conv")
        value = lambda b, o, y, x: conv[b, y, x, o]  # noqa: E731
    else:
        conv = te.compute(spec.conv_shape, dot, name="conv")
        value = lambda b, o, y, x: conv[b, o, y, x]  # noqa: E731
    act_fn = TE_ACTIVATIONS[spec.activation]
    bias = te.placeholder((oc,), dtype, name="bias") if spec.has_bias else None
    residual = te.placeholder(spec.conv_shape, dtype, name="residual") if spec.residual else None
    args += [t for t in (bias, residual) if t is not None]

    def pre_activation(b, o, y, x):
        v = value(b, o, y, x)
        v = v + _wide(bias[o]) if bias is not None else v
        return v + _wide(residual[b, o, y, x]) if residual is not None else v

    epilogue = te.compute(spec.conv_shape, lambda b, o, y, x: _narrow(act_fn(pre_activation(b, o, y, x),
                                                                             spec.activation_params), dtype),
                          name="epilogue")
    if spec.pool is None:
        return [*args, epilogue]
    (pkh, pkw), (psh, psw) = spec.pool_kernel, spec.pool_stride
    wy = te.reduce_axis((0, pkh), "wy")
    wx = te.reduce_axis((0, pkw), "wx")
    if spec.pool == "max":
        pooled = te.compute(spec.out_shape, lambda b, o, y, x: te.max(epilogue[b, o, y * psh + wy, x * psw + wx],
                                                                      axis=[wy, wx]), name="pool")
    else:  # mean of the window, as a sum of pre-scaled values (one reduction stage, no window-sum buffer)
        scale = tirx.const(1.0 / (pkh * pkw), dtype)
        pooled = te.compute(spec.out_shape, lambda b, o, y, x: te.sum(
            epilogue[b, o, y * psh + wy, x * psw + wx] * scale, axis=[wy, wx]), name="pool")
    return [*args, pooled]


def _wide(x):
    """Low-precision storage (bf16/fp16) is widened to fp32 before it is multiplied and accumulated."""
    return x if x.dtype == F32 else x.astype(F32)


def _narrow(x, dtype: str):
    return x if dtype == F32 else x.astype(dtype)


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (tile sizes that divide a loop exactly)."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


VECTOR_LANES = 16  # fp32 lanes of an AVX-512 register


@dataclass(frozen=True)
class Tile:
    """Output tile computed per inner iteration: ``oc_block`` channels x ``rows`` x ``cols`` (output units)."""

    oc_block: int
    rows: int
    cols: int


def default_tile(spec: ConvSpec) -> Tile:
    """Heuristic register tile: about 16 accumulator vectors, the conv tile row a whole vector when possible."""
    _, oc, oh, ow = spec.out_shape
    if spec.channels_vectorized:  # 1-2 vectors of channels x up to 14 pixels: about 14 accumulator vectors
        oc_block = next(b for b in (2 * VECTOR_LANES, VECTOR_LANES, 8) if oc % b == 0)
        max_pixels = 7 if oc_block > VECTOR_LANES else 14
        col_scale = spec.pool_stride[1] if spec.pool else 1
        cols = largest_divisor(ow, max(1, max_pixels // col_scale))
        rows = largest_divisor(oh, max(1, max_pixels // (cols * col_scale)))
        return Tile(oc_block=oc_block, rows=rows, cols=cols)
    if spec.pool:  # measured on Zen 4: 4 channels x 2 pooled rows x one vector of conv columns
        cols = largest_divisor(ow, max(1, VECTOR_LANES // spec.pool_stride[1]))
        return Tile(oc_block=largest_divisor(oc, 4), rows=largest_divisor(oh, 2), cols=cols)
    # measured on Zen 4 over VGG/ResNet shapes: 4 channels x 4 rows x one vector beats 8 x 2 by 5-45% for stride 1;
    # strided convs (ResNet's 7x7/2 stem) read rows far apart and prefer 8 x 2
    cols = largest_divisor(ow, VECTOR_LANES)
    if spec.stride == (1, 1):
        return Tile(oc_block=largest_divisor(oc, 4), rows=largest_divisor(oh, 4), cols=cols)
    return Tile(oc_block=largest_divisor(oc, 8), rows=largest_divisor(oh, 2), cols=cols)


def schedule_cpu(spec: ConvSpec, func: tirx.PrimFunc, tile: Tile | None = None) -> tirx.PrimFunc:
    tile = tile or default_tile(spec)
    sch = Schedule(func)
    conv = sch.get_sblock("conv")
    epilogue = sch.get_sblock("epilogue")
    pooled = spec.pool is not None
    out = sch.get_sblock("pool") if pooled else epilogue
    loops = sch.get_loops(out)
    n, o, y, x = loops[:4]
    o_outer, o_inner = sch.split(o, [None, tile.oc_block])
    y_outer, y_inner = sch.split(y, [None, tile.rows])
    x_outer, x_inner = sch.split(x, [None, tile.cols])
    by_channel = spec.channels_vectorized
    sch.reorder(n, o_outer, y_outer, x_outer, o_inner, y_inner, x_inner)
    if pooled:
        sch.compute_at(epilogue, x_outer)
    sch.compute_at(conv, x_outer)
    # Under x_outer: the tile's spatial loops in the conv's own order ((o, y, x), or (y, x, o) when channels are
    # vectorized), unit extents omitted, then the reductions. The last spatial loop becomes the vector.
    # compute_at drops unit-extent loops, reductions included (1x1 kernels, depthwise channels).
    tile_loops = sch.get_loops(conv)[4:]
    reductions = sum(extent > 1 for extent in spec.weight_shape[1:])
    split_at = len(tile_loops) - reductions
    spatial, reduction = tile_loops[:split_at], tile_loops[split_at:]
    sch.reorder(*reduction, *spatial)
    if spatial:
        sch.vectorize(spatial[-1])
    sch.set_scope(conv, 0, "local")
    if pooled:
        sch.compute_inline(epilogue)
    elif not by_channel:
        sch.vectorize(x_inner)
    sch.parallel(sch.fuse(n, o_outer, y_outer))
    if reduction:
        sch.decompose_reduction(conv, reduction[0])
    if spec.padding != (0, 0):
        pad = sch.get_sblock("pad")
        pad_loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*pad_loops[:2]))
        if spec.in_shape[3] + 2 * spec.padding[1] <= 4 * VECTOR_LANES:
            sch.vectorize(pad_loops[-1])
    return sch.mod["main"]


def schedule_gpu(spec: ConvSpec, func: tirx.PrimFunc, threads: int = 128) -> tirx.PrimFunc:
    sch = Schedule(func)
    pooled = spec.pool is not None
    out = sch.get_sblock("pool" if pooled else "epilogue")
    conv = sch.get_sblock("conv")
    n, o, y, x = sch.get_loops(out)[:4]
    fused = sch.fuse(n, o, y, x)
    block_x, thread_x = sch.split(fused, [None, threads])
    sch.bind(block_x, "blockIdx.x")
    sch.bind(thread_x, "threadIdx.x")
    if pooled:
        sch.compute_at(sch.get_sblock("epilogue"), thread_x)
    sch.compute_at(conv, thread_x)
    sch.set_scope(conv, 0, "local")
    if pooled:
        sch.compute_inline(sch.get_sblock("epilogue"))
    if spec.padding != (0, 0):
        pad = sch.get_sblock("pad")
        fused_pad = sch.fuse(*sch.get_loops(pad))
        bx, tx = sch.split(fused_pad, [None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return sch.mod["main"]


def conv_kernel(spec: ConvSpec, target_kind: str, tile: Tile | None = None) -> tirx.PrimFunc:
    """The scheduled PrimFunc ``(data, weight[, bias], out)`` for ``spec`` on ``target_kind`` ("llvm"/"cuda")."""
    func = te.create_prim_func(conv_compute(spec))
    func = schedule_gpu(spec, func) if target_kind == "cuda" else schedule_cpu(spec, func, tile)
    # Scheduled and opaque: TVM's default schedules leave it alone and FuseOps does not merge it into neighbours.
    return func.with_attrs({"tir.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})


def supports(spec: ConvSpec) -> bool:
    return spec.activation in TE_ACTIVATIONS and spec.pool in (None, "max", "avg")




_ALLOC = re.compile(r"(\w+) = T\.(?:sblock_)?alloc_buffer\(\(([\d, ]*)\)(?:, [^)]*?scope=\"(\w+)\")?")


def compacted_buffers(func: tirx.PrimFunc) -> list[tuple[str, tuple[int, ...], str]]:
    """Intermediate buffers of ``func`` after TVM compacts each to the region it really uses: (name, shape, scope).

    This is what proves a fusion: for conv2d_pool no buffer has the conv output's full shape.
    """
    seq = tvm.transform.Sequential([s_tir.transform.LowerInitBlock(),
                                    s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
                                    s_tir.transform.ConvertBlocksToOpaque(),
                                    s_tir.transform.CompactBufferAllocation()])
    lowered = seq(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))
    return [(name, tuple(int(d) for d in shape.replace(" ", "").split(",") if d), scope or "global")
            for name, shape, scope in _ALLOC.findall(lowered["main"].script())]


@dataclass(frozen=True)
class DenseSpec:
    """out[m, n] = act(sum_k x[m, k] * w_t[k, n] + bias[n]): linear layers and RNN input projections."""

    m: int
    k: int
    n: int
    has_bias: bool
    activation: str = "none"
    activation_params: tuple[float, ...] = ()
    dtype: str = F32  # storage; accumulation is fp32


def dense_spec(in_shape: tuple[int, ...], weight_shape: tuple[int, int], has_bias: bool, activation: str = "none",
               activation_params: tuple = (), dtype: str = F32) -> DenseSpec:
    """The dense kernel for ``x @ W^T`` with ``x`` of ``in_shape``: leading dims of ``x`` become rows."""
    n, k = weight_shape
    return DenseSpec(int(math.prod(in_shape[:-1])), k, n, has_bias, activation, tuple(activation_params), dtype)


def dense_compute(spec: DenseSpec) -> list[te.Tensor]:
    x = te.placeholder((spec.m, spec.k), spec.dtype, name="x")
    w_t = te.placeholder((spec.k, spec.n), spec.dtype, name="w_t")  # packed at compile time: rows of the output
    rk = te.reduce_axis((0, spec.k), "rk")
    acc = te.compute((spec.m, spec.n), lambda i, j: te.sum(_wide(x[i, rk]) * _wide(w_t[rk, j]), axis=rk),
                     name="acc")
    act_fn = TE_ACTIVATIONS[spec.activation]
    args = [x, w_t]
    if spec.has_bias:
        bias = te.placeholder((spec.n,), spec.dtype, name="bias")
        args.append(bias)
        out = te.compute((spec.m, spec.n), lambda i, j: _narrow(act_fn(acc[i, j] + _wide(bias[j]),
                                                                       spec.activation_params), spec.dtype),
                         name="epilogue")
    else:
        out = te.compute((spec.m, spec.n), lambda i, j: _narrow(act_fn(acc[i, j], spec.activation_params),
                                                                spec.dtype), name="epilogue")
    return [*args, out]


def default_dense_tile(spec: DenseSpec) -> Tile:
    return Tile(oc_block=1, rows=largest_divisor(spec.m, 4), cols=largest_divisor(spec.n, 2 * VECTOR_LANES))


def dense_kernel(spec: DenseSpec, cores: int = 1, tile: Tile | None = None) -> tirx.PrimFunc:
    """CPU: tiles of rows x (one or two vectors of) columns accumulated in registers over k; parallel over tiles."""
    sch = Schedule(te.create_prim_func(dense_compute(spec)))
    acc, out = sch.get_sblock("acc"), sch.get_sblock("epilogue")
    i, j = sch.get_loops(out)
    tile = tile or default_dense_tile(spec)
    rows, cols = tile.rows, tile.cols
    i_outer, i_inner = sch.split(i, [None, rows])
    j_outer, j_inner = sch.split(j, [None, cols])
    sch.reorder(i_outer, j_outer, i_inner, j_inner)
    sch.compute_at(acc, j_outer, preserve_unit_loops=True)  # rows, cols, k: a unit one would vanish (Linear(1, 1))
    tile = sch.get_loops(acc)[2:]
    spatial, reduction = tile[:-1], tile[-1]
    sch.reorder(reduction, *spatial)
    if spatial:
        sch.vectorize(spatial[-1])
    sch.set_scope(acc, 0, "local")
    sch.vectorize(j_inner)
    if spec.m * spec.n * spec.k >= 1 << 16 and cores > 1:
        sch.parallel(sch.fuse(i_outer, j_outer))
    sch.decompose_reduction(acc, reduction)
    return sch.mod["main"].with_attrs({"tir.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})
