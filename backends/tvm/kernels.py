"""Our own TIR kernels: conv2d [+bias] [+activation] [+pool] as ONE scheduled PrimFunc.

Why: TVM's untuned conv2d is a naive loop nest (~50x slower than a blocked kernel here), and TVM's FuseOps never
fuses a pool into a conv. The kernel is built from TE compute stages (pad -> conv -> epilogue -> pool) and then
scheduled with ``tvm.s_tir.Schedule``:

CPU (llvm), ordinary (groups=1) and depthwise convs without a fused pool whose output channels fill vectors:
the blocked (NCHWc) direct conv (``_blocked_compute``, ``_schedule_cpu_blocked``): input packed to NCHW[b]c with
its zero border in one vectorized copy, weights packed at compile time to [OC/8][C/icb][KH][KW][icb][8], a register
tile of 1-3 output-channel vectors x up to 6-8 pixels of a row (12 accumulators of AVX2's 16 ymm, 24 of AVX-512's
32 zmm: ``accumulator_vectors``), one broadcast
input scalar per pixel and tap FMA'd into every channel vector, the output stored NCHW. ``conv2d_nchwc`` (from the
``alter-layout`` pass) reads its input already in NCHW[b]c (each task copies only the rows it reads into a small
zero-bordered buffer, or nothing for an unpadded 1x1 conv) and/or stores NCHW[b]c: one vector store per
accumulator, the residual read the same way. An unpadded stride-1 1x1 conv is a GEMM over the flattened H * W pixels
(``ConvSpec.flat_pixels``: its register tile is consecutive pixels of the map, not of a row, so 7x7 and 14x14 maps
get 2-3 channel vectors x 4-6 pixels); a depthwise conv on NCHW[b]c input computes up to 8 output rows per task,
its padded input rows copied once for all of them. A fused pool whose windows tile the conv output (2x2/2, 3x3/3:
``ConvSpec.pool_epilogue``, chosen by ``select``; NCHW in and out) is its epilogue: the register tile is one conv row
of a few whole windows, max'ed (or summed) into a local tile of pooled channel vectors row by row, and only the
pooled output is stored (``_blocked_pool``).

Otherwise (fused pools, grouped convs, channel counts that fill no vector), per output tile of ``oc_block``
channels x ``rows`` rows x ``width`` columns:

    for n, oc_outer, row (parallel over cores), col_outer:
        acc[oc_block][rows][width] = 0                  # local buffer: registers
        for ic, kh, kw:                                 # reduction
            for oc in oc_block, r in rows:              # broadcast one weight, FMA a vector of inputs
                acc[oc][r][0:width] += w[oc, ic, kh, kw] * x[ic, row*s + kh, col*s + kw : +width]
        out[...] = pool(act(acc + bias))                # epilogue straight from registers

With a pool fused whose windows tile the conv output (kernel == stride, no padding), the register tile covers
whole pooling windows, so each conv output is computed exactly once and the full-size conv output never exists in
memory: the only buffers are the padded input (when padding > 0), the local accumulator tile and the pooled output.
Overlapping or padded windows (ResNet's 3x3/2 max pool with padding 1, ceil mode) are ``banded``: per task a band
of pooled rows, whose conv rows are computed once into a cache-resident band buffer (channels-last when the
channels fill vectors), register tile by register tile, then pooled; only the kernel - stride rows shared with
the next band are computed twice. Max-pool padding is -inf (see ``conv_compute``); bias and an activation that
commutes with max (``passes.ir.ops.commutes_with_max``) are applied after the pool, on k^2/s^2 fewer values.

CUDA: one thread per pooled output (or conv output), its conv window accumulated in local memory (overlapping
windows recompute their shared conv outputs there; fuse-conv-pool stays off on cuda by default).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import s_tir, te, tirx
from tvm.s_tir import Schedule

from passes.ir.ops import commutes_with_max

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
    pool_padding: tuple[int, int] = (0, 0)   # max pools: -inf padding
    pool_ceil_mode: bool = False
    dtype: str = F32                         # storage of data, weight, residual, output; bias and accumulation fp32
    lanes: int = 16                          # fp32 lanes of the target's vector registers (``Target.lanes``)
    in_block: int = 0                        # data in NCHW[in_block]c (``conv2d_nchwc``); 0: NCHW
    out_block: int = 0                       # output (and residual) in NCHW[out_block]c; 0: NCHW
    pool_epilogue: bool = False              # the pool is the blocked kernel's epilogue (CPU; ``blocked_pool_fits``)

    @property
    def channels_vectorized(self) -> bool:
        """Vectorize over output channels (weights packed (C/g, KH, KW, OC)) instead of output columns.

        Pays for ordinary (groups=1) convs whose output rows are too short to fill a vector, for 1x1 convs,
        whose few FLOPs per loaded input column would otherwise leave the FMA units idle, and under overlapping
        pooling windows: the band is then channels-last, so a window's max is a max of channel vectors (no
        strided column gathers, in the conv of a strided stem either).
        """
        _, oc, _, ow = self.conv_shape
        one_by_one = self.weight_shape[2:] == (1, 1)
        return self.groups == 1 and oc % 8 == 0 and (ow < self.lanes or one_by_one or self.banded)

    @property
    def oc_vector(self) -> int:
        """Output channels per vector of the blocked (NCHWc) kernel: the target's lanes, else 8; 0: not blocked.
        A blocked output (``conv2d_nchwc``) fixes it to its block, and a depthwise conv's to its input's (its output
        vector is a block of its input channels)."""
        if self.out_block or (self.in_block and self.depthwise):
            return self.out_block or self.in_block
        return next((b for b in (self.lanes, 8) if self.weight_shape[0] % b == 0), 0)

    @property
    def ic_block(self) -> int:
        """Input channels per block of the blocked kernel's packed input and weight (a whole vector's worth; the
        layout's block when an ordinary conv's input comes blocked; a depthwise weight has one input channel)."""
        if self.in_block and not self.depthwise:
            return self.in_block
        return largest_divisor(self.weight_shape[1], self.lanes)

    @property
    def depthwise(self) -> bool:
        """One group per channel (groups = C = OC)."""
        return self.groups == self.in_shape[1] == self.weight_shape[0] > 1

    @property
    def blocked(self) -> bool:
        """The NCHWc direct conv (``_blocked_compute``): ordinary (groups=1) and depthwise convs without a fused pool
        whose output channels fill vectors, or with a pool in its epilogue (``pool_epilogue``); every
        ``conv2d_nchwc``."""
        return ((self.groups == 1 or self.depthwise) and (self.pool is None or self.pool_epilogue)
                and self.oc_vector > 0)

    @property
    def blocked_pool_fits(self) -> str | None:
        """Why the pool cannot be the blocked kernel's epilogue (None: it can). The register tile holds one conv
        row of whole pooling windows (for 1-3 channel vectors), so the windows must tile the conv output (kernel ==
        stride, no padding, no partial ceil-mode window: ``banded`` ones share conv outputs) and one window row must
        fit the accumulator registers (``_blocked_pool_tile``)."""
        if self.pool is None or self.residual:
            return "no pool" if self.pool is None else "a residual operand"
        if self.groups != 1 and not self.depthwise:
            return f"groups {self.groups}: the blocked (NCHWc) conv takes dense and depthwise convs"
        if self.oc_vector == 0:
            return f"{self.weight_shape[0]} output channels fill no vector of 8: not a blocked (NCHWc) conv"
        pixels = accumulator_vectors(self.lanes) - 4
        if not self.banded and self.pool_kernel[1] > pixels:  # a band's register tile holds conv pixels
            return f"a window row of {self.pool_kernel[1]} pixels exceeds the register tile's {pixels}"
        return None

    @property
    def flat_pixels(self) -> bool:
        """A blocked unpadded stride-1 1x1 conv is a GEMM over the flattened pixels (p = y * W + x, contiguous in
        NCHW and NCHW[c]c alike): its register tile is ``rows * cols`` consecutive pixels of the flattened map, not
        of one row, so a 7x7 or 14x14 map takes 3 channel vectors x 4 pixels (12 accumulators, 7 loads per 12 FMAs)
        instead of the 1 vector x 7 pixels that divide a row of 7 (8 loads per 7 FMAs)."""
        return (self.blocked and not self.depthwise and self.pool is None and self.weight_shape[2:] == (1, 1)
                and self.stride == (1, 1) and self.padding == (0, 0))

    @property
    def packs_input(self) -> bool:
        """The blocked kernel copies its input into padded NCHW[c]c; an unpadded 1x1 conv reads NCHW as is (its
        broadcasts walk each input plane in order, and the copy would cost as much as a thin conv). Input already in
        NCHW[b]c: copied only to add the zero border."""
        if self.in_block:
            return self.padding != (0, 0)
        return self.padding != (0, 0) or self.weight_shape[2:] != (1, 1) or self.depthwise

    def without_pool(self) -> ConvSpec:
        """The conv alone (its bias and activation included)."""
        return dataclasses.replace(self, pool=None, pool_kernel=(1, 1), pool_stride=(1, 1), pool_padding=(0, 0),
                                   pool_ceil_mode=False)

    def pack_weight(self, weight):
        """The weight in the kernel's layout (done once, at compile time). Blocked: [OC/v][C/icb][KH][KW][icb][v],
        so the reduction streams it contiguously, one vector of output channels per input channel and tap."""
        import numpy as np

        if self.blocked:
            oc, c, kh, kw = self.weight_shape
            v, icb = self.oc_vector, self.ic_block
            blocks = np.reshape(weight, (oc // v, v, c // icb, icb, kh, kw))
            return np.ascontiguousarray(np.transpose(blocks, (0, 2, 4, 5, 3, 1)))
        return np.ascontiguousarray(np.transpose(weight, (1, 2, 3, 0))) if self.channels_vectorized else weight

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The data argument as stored: ``in_shape``, or NCHW[in_block]c."""
        return blocked_shape(self.in_shape, self.in_block)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The output (and residual) as stored: ``out_shape``, or NCHW[out_block]c."""
        return blocked_shape(self.out_shape, self.out_block)

    @property
    def conv_shape(self) -> tuple[int, int, int, int]:
        return conv_output_shape(self.in_shape, self.weight_shape, self.stride, self.padding, self.dilation)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        n, oc, oh, ow = self.conv_shape
        if self.pool is None:
            return n, oc, oh, ow
        return n, oc, *(pool_output_size(size, k, s, p, self.pool_ceil_mode) for size, k, s, p in
                        zip((oh, ow), self.pool_kernel, self.pool_stride, self.pool_padding))

    @property
    def window_extent(self) -> tuple[int, int]:
        """Rows/columns the pooling windows span, from ``pool_padding`` before conv output 0."""
        if self.pool is None:
            return self.conv_shape[2:]
        return tuple((o - 1) * s + k for o, s, k in zip(self.out_shape[2:], self.pool_stride, self.pool_kernel))

    @property
    def banded(self) -> bool:
        """Pooling windows overlap or reach outside the conv output: the kernel computes a band of whole conv
        rows per tile (neighbouring windows share them) instead of one register tile per set of windows."""
        return self.pool is not None and (self.pool_kernel != self.pool_stride or any(self.pool_padding)
                                          or self.window_extent[0] > self.conv_shape[2]
                                          or self.window_extent[1] > self.conv_shape[3])

    @property
    def pool_commutes(self) -> bool:
        """A max pool whose bias and activation are applied after it: max(f(v) + b) == f(max(v) + b)."""
        return self.pool == "max" and commutes_with_max(self.activation, self.activation_params)

    @property
    def pool_staged(self) -> bool:
        """The pooled tile sits in a local buffer and a ``post`` stage writes the output: a commuting max pool (bias
        and activation after it), or any pool of bf16/fp16 values, pooled in fp32 and rounded once (a running sum in
        the storage dtype loses ~log2(window) bits; a max is the same either way, rounding being monotonic; and TVM's
        bf16 legalization rejects the vector store of a bf16 reduction: fuzzer seeds 3004, 3242)."""
        return self.pool_commutes or (self.pool is not None and self.dtype != F32)


def blocked_shape(shape: tuple[int, int, int, int], block: int) -> tuple[int, ...]:
    """(N, C, H, W) stored as NCHW[block]c: (N, C / block, H, W, block); block 0: NCHW as is."""
    n, c, h, w = shape
    return (n, c // block, h, w, block) if block else tuple(shape)


def layout_reader(tensor: te.Tensor, block: int) -> Callable:
    """(b, c, y, x) -> the element of ``tensor`` stored NCHW (block 0) or NCHW[block]c."""
    if block:
        return lambda b, c, y, x: tensor[b, c // block, y, x, c % block]
    return lambda b, c, y, x: tensor[b, c, y, x]


def layout_compute(shape: tuple[int, int, int, int], block: int, value: Callable, name: str) -> te.Tensor:
    """``value(b, c, y, x)`` over the NCHW ``shape``, stored NCHW (block 0) or NCHW[block]c (c = cb * block + ci:
    the indices simplify back to cb, ci)."""
    if block:
        return te.compute(blocked_shape(shape, block), lambda b, cb, y, x, ci: value(b, cb * block + ci, y, x),
                          name=name)
    return te.compute(shape, value, name=name)


def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """torch's pooled size: with ceil_mode a last partial window counts unless it starts in the right padding."""
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    return out - 1 if ceil_mode and (out - 1) * stride >= size + padding else out


def conv_output_shape(in_shape: tuple, weight_shape: tuple, stride: tuple, padding: tuple, dilation: tuple
                      ) -> tuple[int, int, int, int]:
    """NCHW output shape of a 2-d convolution (symmetric padding)."""
    n, _, h, w = in_shape
    oc, _, kh, kw = weight_shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return n, oc, oh, ow


def conv_compute(spec: ConvSpec, tile: Tile | None = None) -> list[te.Tensor]:
    """TE stages; returns the PrimFunc arguments [data, weight, (bias,) (residual,) output].

    A max pool's windows may reach outside the conv output (pool padding, a ceil-mode window); torch guarantees each
    holds a real element. Rows: the conv stage spans the rows the windows read (``window_extent``, from
    ``pool_padding`` rows before conv row 0; the input gets ``pool_padding * stride`` more zero rows) and the
    rows outside the conv output are -inf, never selected; so a band of pooled rows needs a constant number of conv
    rows. Columns: a window reads the nearest conv column inside itself instead (the index clamped to the conv
    output): a repeated element never changes a max, so this too is -inf padding, and a band's columns are exactly
    the conv output's (a whole number of vectors).
    """
    if spec.blocked:
        tile = tile or default_tile(spec)  # a flat-pixel tile counts pixels of H*W, a banded one conv pixels
        if spec.flat_pixels:
            return _blocked_compute(spec, tile.rows * tile.cols)
        return _blocked_compute(spec, tile.cols if spec.banded else tile.cols * spec.pool_stride[1])
    n, c, h, w = spec.in_shape
    oc, cg, kh, kw = spec.weight_shape
    (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    dtype = spec.dtype
    data = te.placeholder(spec.in_shape, dtype, name="data")
    packed = spec.channels_vectorized
    weight = te.placeholder((cg, kh, kw, oc) if packed else spec.weight_shape, dtype, name="weight")
    args = [data, weight]
    source = data
    n_, oc_, oh, ow = spec.conv_shape
    row_pad = spec.pool_padding[0] if spec.pool else 0  # conv rows computed before conv row 0 (masked)
    rows = spec.window_extent[0] if spec.pool else oh   # conv rows computed (from -row_pad)
    low = ph + row_pad * sh                              # zero rows before the input
    padded_h = max((rows - 1) * sh + (kh - 1) * dh + 1, h + 2 * ph + row_pad * sh)
    if (padded_h, pw, low) != (h, 0, 0):
        source = te.compute(
            (n, c, padded_h, w + 2 * pw),
            lambda b, ch, y, x: tirx.if_then_else(tirx.all(y >= low, y < h + low, x >= pw, x < w + pw),
                                                  data[b, ch, y - low, x - pw], tirx.const(0.0, dtype)), name="pad")
    rc = te.reduce_axis((0, cg), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    per_group = oc // spec.groups

    def dot(b, o, y, x):
        w = weight[rc, ry, rx, o] if packed else weight[o, rc, ry, rx]
        return te.sum(_wide(source[b, (o // per_group) * cg + rc, y * sh + ry * dh, x * sw + rx * dw]) * _wide(w),
                      axis=[rc, ry, rx])

    if packed:  # accumulate channels-last so a tile's channel vector is contiguous in registers
        conv = te.compute((n_, rows, ow, oc_), lambda b, y, x, o: dot(b, o, y, x), name="conv")
        value = lambda b, o, y, x: conv[b, y, x, o]  # noqa: E731
    else:
        conv = te.compute((n_, oc_, rows, ow), dot, name="conv")
        value = lambda b, o, y, x: conv[b, o, y, x]  # noqa: E731
    finish, extra = _epilogue_inputs(spec)
    args += extra

    commutes = spec.pool_commutes  # bias and activation after the max: on the pooled tile only
    staged = spec.pool_staged  # the window values stay fp32 up to the pooled tile
    masked = row_pad > 0 or rows > oh

    def windowed(b, o, y, x):
        v = value(b, o, y, x) if commutes else finish(value(b, o, y, x), b, o, y, x, narrow=not staged)
        if not masked:
            return v
        return tirx.Select(tirx.all(y >= row_pad, y < oh + row_pad), v, tirx.min_value(F32 if staged else dtype))

    epilogue = te.compute((n_, oc_, rows, ow), windowed, name="epilogue")
    if spec.pool is None:
        return [*args, epilogue]
    (pkh, pkw), (psh, psw), ppw = spec.pool_kernel, spec.pool_stride, spec.pool_padding[1]
    wy = te.reduce_axis((0, pkh), "wy")
    wx = te.reduce_axis((0, pkw), "wx")
    clamp = ppw > 0 or spec.window_extent[1] > ow

    def window(b, o, y, x):
        column = tirx.max(tirx.min(x * psw + wx - ppw, ow - 1), 0) if clamp else x * psw + wx
        return epilogue[b, o, y * psh + wy, column]

    if spec.pool == "max":
        pooled = te.compute(spec.out_shape, lambda b, o, y, x: te.max(window(b, o, y, x), axis=[wy, wx]),
                            name="pool")
    else:  # mean of the window, as a sum of pre-scaled values (one reduction stage, no window-sum buffer)
        scale = tirx.const(1.0 / (pkh * pkw), epilogue.dtype)
        pooled = te.compute(spec.out_shape, lambda b, o, y, x: te.sum(window(b, o, y, x) * scale, axis=[wy, wx]),
                            name="pool")
    if not staged:
        return [*args, pooled]
    post = te.compute(spec.out_shape, lambda b, o, y, x: finish(pooled[b, o, y, x], b, o, y, x) if commutes
                      else _narrow(pooled[b, o, y, x], dtype), name="post")
    return [*args, post]


def _epilogue_inputs(spec: ConvSpec) -> tuple[Callable, list[te.Tensor]]:
    """``finish(v, b, o, y, x)`` = act(v + bias [+ residual]) narrowed to the storage dtype (``narrow=False``: kept
    fp32, for a pool staged in fp32), and the placeholders it reads (bias, residual)."""
    # The bias is fp32 at any storage dtype: it is added to the fp32 accumulator (mixed-precision keeps it fp32).
    bias = te.placeholder((spec.weight_shape[0],), F32, name="bias") if spec.has_bias else None
    block = spec.out_block
    residual = (te.placeholder(blocked_shape(spec.conv_shape, block), spec.dtype, name="residual") if spec.residual
                else None)
    act_fn = TE_ACTIVATIONS[spec.activation]

    def finish(v, b, o, y, x, narrow: bool = True):
        v = v + _wide(bias[o]) if bias is not None else v
        if residual is not None:  # (o = oo * block + oi in a blocked store: the indices simplify back to oo, oi)
            v = v + _wide(layout_reader(residual, block)(b, o, y, x))
        v = act_fn(v, spec.activation_params)
        return _narrow(v, spec.dtype) if narrow else v

    return finish, [t for t in (bias, residual) if t is not None]


def _blocked_compute(spec: ConvSpec, cols: int) -> list[te.Tensor]:
    """NCHWc direct conv, NCHW in and out (or NCHW[v]c: ``in_block`` / ``out_block``, below): oneDNN's jit_avx2 /
    TVM's conv2d_NCHWc loop nest.

        pad[n, C/icb, H + 2ph, W + 2pw, icb] = zero-padded input, ``ic_block`` channels innermost (one copy;
                                               none for an unpadded 1x1 conv, which reads NCHW)
        conv[n, OC/v, OH, OW, v] = sum over (C/icb, KH, KW, icb) of pad[.., y*s + kh*d, x*s + kw*d, ci]
                                                                    * weight[oc/v, c/icb, kh, kw, ci, 0:v]
        out[n, oc, y, x] = act(conv[n, oc/v, y, x, oc%v] + bias [+ residual])

    A vector of ``v`` output channels accumulates one broadcast input scalar times one contiguous weight vector per
    (input channel, tap), for a register tile of pixels x channel vectors (``schedule_cpu``); the output store is
    1/(C*KH*KW) of the work. Depthwise: the input is packed in blocks of ``v`` channels too and each output vector
    is a vector of its own input channels times the tap's weight vector (C/icb = icb = 1 in the weight).
    The conv stage is ``cols``-padded in width (the register tile's pixel count need not divide the output width:
    a 56-wide row takes 2 channel vectors x 6 pixels, 12 accumulators, computing 60 columns of which 56 are stored).
    Blocked layouts: data[n, C/v, H, W, v] is read as is (``pad`` only adds the zero border and spare columns), and
    out[n, OC/v, OH, OW, v] = act(conv[n, oc/v, y, x, oc%v] + bias [+ residual, also blocked]).
    """
    n, c, h, w = spec.in_shape
    oc, cg, kh, kw = spec.weight_shape
    (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    v, icb, dtype = spec.oc_vector, spec.ic_block, spec.dtype
    data = te.placeholder(spec.data_shape, dtype, name="data")
    weight = te.placeholder((oc // v, cg // icb, kh, kw, icb, v), dtype, name="weight")
    if spec.depthwise:
        icb = v  # the input's channel block: each output vector reads its own channels
    n_, oh, ow = spec.in_shape[0], *spec.window_extent  # with a pool: the conv rows/columns its windows read
    top = ph  # zero rows above the input
    if spec.banded:  # conv rows from -pool_padding (``_blocked_pool`` masks them), the conv's own columns (clamped)
        ow, top = spec.conv_shape[3], ph + spec.pool_padding[0] * sh
    wide = ow if spec.flat_pixels else ceil_to(ow, cols)
    tall = max(h + top + ph, (oh - 1) * sh + (kh - 1) * dh + 1)  # the padded input's rows
    if spec.in_block:  # already NCHW[icb]c: a copy only adds the zero border (contiguous channel vectors)
        read = lambda b, co, y, x, ci: data[b, co, y, x, ci]  # noqa: E731
    else:
        read = lambda b, co, y, x, ci: data[b, co * icb + ci, y, x]  # noqa: E731
    if spec.packs_input or wide > ow or tall > h:  # (the zero columns past the input feed the conv's spare ones)
        pad = te.compute((n, c // icb, tall, max(w + 2 * pw, (wide - 1) * sw + (kw - 1) * dw + 1), icb),
                         lambda b, co, y, x, ci: tirx.if_then_else(
                             tirx.all(y >= top, y < h + top, x >= pw, x < w + pw),
                             read(b, co, y - top, x - pw, ci), tirx.const(0.0, dtype)), name="pad")
        source = lambda b, co, y, x, ci: pad[b, co, y, x, ci]  # noqa: E731
    else:
        source = read
    rco = te.reduce_axis((0, cg // spec.ic_block), "rco")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    rci = te.reduce_axis((0, spec.ic_block), "rci")

    # flat pixels: one row of H * W pixels, padded to whole tiles; the spare ones re-read the last pixel
    conv_hw = (1, ceil_to(oh * ow, cols)) if spec.flat_pixels else (oh, wide)

    def tap(b, oo, y, x, oi):
        if spec.flat_pixels:  # y = 0, x = p
            p = tirx.min(x, oh * ow - 1) if conv_hw[1] > oh * ow else x
            return read(b, rco, p // ow, p % ow, rci)
        if spec.depthwise:  # rco = rci = 0
            return source(b, oo + rco, y * sh + ry * dh, x * sw + rx * dw, oi + rci)
        return source(b, rco, y * sh + ry * dh, x * sw + rx * dw, rci)

    conv = te.compute((n_, oc // v, *conv_hw, v), lambda b, oo, y, x, oi: te.sum(
        _wide(tap(b, oo, y, x, oi)) * _wide(weight[oo, rco, ry, rx, rci, oi]), axis=[rco, ry, rx, rci]),
        name="conv")

    finish, extra = _epilogue_inputs(spec)
    if spec.pool is not None:  # NCHW in and out (select sets pool_epilogue only there)
        return [data, weight, *extra, _blocked_pool(spec, conv, finish)]
    # flat pixels: the output is written as (.., 1, H * W, ..) too (``_schedule_cpu_blocked`` restores its shape)
    stored, out_hw = spec.stored_shape, (1, oh * ow) if spec.flat_pixels else (oh, ow)

    def store(b, o, y, x):  # finish the accumulated conv at (y, x) of the stored output; channel o
        at = (y, x) if not spec.flat_pixels else (x // ow, x % ow)
        return finish(conv[b, o // v, y, x, o % v], b, o, *at)

    if spec.out_block:  # stored NCHW[v]c: each accumulator vector is one contiguous store
        out = te.compute((*stored[:2], *out_hw, v), lambda b, oo, y, x, oi: store(b, oo * v + oi, y, x),
                         name="epilogue")
    else:
        out = te.compute((*stored[:2], *out_hw), store, name="epilogue")
    return [data, weight, *extra, out]


def _is_nan(x):
    """``x`` (float32) is a NaN, from its bits: exponent all ones and a nonzero mantissa. Why not ``isnan``: TVM's
    vectorizer scalarizes ``Select(isnan(a), a, b)`` when ``b`` is a load (a compare and a branch per lane), and
    ``a != a`` is folded to false under the fast-math flags of TVM's LLVM code (integer compares are exact)."""
    return tirx.reinterpret("int32", x) & tirx.const(0x7FFFFFFF, "int32") > tirx.const(0x7F800000, "int32")


def _nan_max(a, b):
    """max(a, b) that is NaN when either operand is NaN (PyTorch's max pool), vectorized: the ordered ``a > b``
    only where neither is NaN (fast-math may assume that of a float compare)."""
    return tirx.Select(_is_nan(a), a, tirx.Select(_is_nan(b), b, tirx.Select(a > b, a, b)))


def _window_reduce(combine: Callable, values: list) -> tirx.PrimExpr:
    """``combine`` folded over ``values``, each partial result bound once (a ``Let``: written as a nested
    expression, every level would copy the one below, 2^k copies for k values)."""
    result = values[0]
    for i, value in enumerate(values[1:]):
        partial = tirx.Var(f"partial{i}", F32)
        result = tirx.Let(partial, result, combine(partial, value))
    return result


def _blocked_pool(spec: ConvSpec, conv: te.Tensor, finish: Callable) -> te.Tensor:
    """The pool as the blocked conv's epilogue; windows that tile the conv output (k x k / k):

        pool[n, OC/v, PH, PW', v] = max (or mean) over (wy, wx) of conv[n, oc/v, y*k + wy, x*k + wx, 0:v]
        post[n, oc, y, x] = act(pool[n, oc/v, y, x, oc%v] + bias)       (narrowed to the storage dtype)

    A max of channel vectors (one vector max per window element, no shuffles), in fp32. A max pool takes bias and
    an activation that commutes with max after it (on 1/k^2 of the values); the other activations, and every
    average pool, apply bias and activation per conv output first. ``PW'`` is the pooled width padded to whole
    register tiles (the conv stage's ``wide`` / k): only ``post`` is written to memory, and only the PW real
    columns. ``banded`` windows (overlapping, padded: ResNet's 3x3/2 padding 1; ceil mode) pool the task's band of
    conv rows separably (``_band_pool``)."""
    v, dtype = spec.oc_vector, spec.dtype
    (pkh, pkw), commutes = spec.pool_kernel, spec.pool_commutes
    n, _, ph, _ = spec.out_shape
    wy = te.reduce_axis((0, pkh), "wy")
    wx = te.reduce_axis((0, pkw), "wx")

    def value(b, oo, y, x, oi):
        cy, cx = y * pkh + wy, x * pkw + wx
        raw = conv[b, oo, cy, cx, oi]
        return raw if commutes else finish(raw, b, oo * v + oi, cy, cx, narrow=False)

    shape = (n, spec.weight_shape[0] // v, ph, conv.shape[3] // pkw, v)
    if spec.banded:
        pooled = _band_pool(spec, conv, finish)
    elif spec.pool == "max":
        pooled = te.compute(shape, lambda *i: te.max(value(*i), axis=[wy, wx]), name="pool")
    else:
        scale = tirx.const(1.0 / (pkh * pkw), F32)
        pooled = te.compute(shape, lambda *i: te.sum(value(*i) * scale, axis=[wy, wx]), name="pool")

    def store(b, o, y, x):
        p = pooled[b, o // v, y, x, o % v]
        return finish(p, b, o, y, x) if commutes else _narrow(p, dtype)

    # stored NCHW[v]c where alter-layout blocked the conv2d_pool: a vector of channels per pixel
    return layout_compute(spec.out_shape, spec.out_block, store, "post")


def _band_pool(spec: ConvSpec, conv: te.Tensor, finish: Callable) -> te.Tensor:
    """Overlapping or padded windows (``banded``): the conv rows from ``p`` rows before conv row 0, through a band
    buffer (the task's rows: ``_schedule_cpu_blocked_band``), pooled separably, each pooled row through a small
    row buffer:

        band[n, OC/v, R, OW', v] = conv (bias and activation first unless they commute with max), -inf outside
                                   the conv output's rows
        rows[n, OC/v, PH, OW, v] = max (or sum) over wy of band[n, oc/v, y*s + wy, x, 0:v]
        pool[n, OC/v, PH, PW, v] = max (or mean) over wx of rows[n, oc/v, y, clamp(x*s + wx - p), 0:v]

    A 3x3/2 window costs 6 vector maxes per pooled pixel instead of 8 (its rows are shared by the two pooled
    columns that overlap them), each NaN-propagating and vectorized (``_nan_max``), written out (no running
    accumulator). A column outside the conv output reads the nearest one inside the window instead (a repeated
    element never changes a max), so the band spans the conv's own columns; the rows outside it are -inf, so a
    band needs a constant number of conv rows."""
    v = spec.oc_vector
    (pkh, pkw), (psh, psw), (pph, ppw) = spec.pool_kernel, spec.pool_stride, spec.pool_padding
    n, _, ph, pw = spec.out_shape
    oh, ow = spec.conv_shape[2:]
    masked = pph > 0 or spec.window_extent[0] > oh
    clamped = ppw > 0 or spec.window_extent[1] > ow

    def banded(b, oo, y, x, oi):
        value = conv[b, oo, y, x, oi]
        value = value if spec.pool_commutes else finish(value, b, oo * v + oi, y - pph, x, narrow=False)
        return tirx.Select(tirx.all(y >= pph, y < oh + pph), value, _f(-math.inf)) if masked else value

    band = te.compute(conv.shape, banded, name="band")
    combine = _nan_max if spec.pool == "max" else (lambda a, b: a + b)

    def rows(b, oo, y, x, oi):
        return _window_reduce(combine, [band[b, oo, y * psh + i, x, oi] for i in range(pkh)])

    row_max = te.compute((n, spec.weight_shape[0] // v, ph, ow, v), rows, name="pool_rows")

    def pooled(b, oo, y, x, oi):
        columns = [x * psw + j - ppw for j in range(pkw)]
        if clamped:
            columns = [tirx.max(tirx.min(c, ow - 1), 0) for c in columns]
        value = _window_reduce(combine, [row_max[b, oo, y, c, oi] for c in columns])
        return value if spec.pool == "max" else value * _f(1.0 / (pkh * pkw))

    return te.compute((n, spec.weight_shape[0] // v, ph, pw, v), pooled, name="pool")


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


VECTOR_LANES = 16  # fp32 lanes of an AVX-512 register (the spec default; AVX2 targets use 8: ``Target.lanes``)


def accumulator_vectors(lanes: int) -> int:
    """How many accumulator vectors a register tile may hold: AVX-512 has 32 vector registers, AVX2 16; the rest
    hold the broadcast weights and input vectors. More accumulators than that spill in the innermost loop (measured
    on Zen 3 with the AVX-512 tiles: torchvision resnet18 3.6x slower than with AVX2-sized ones). AVX-512: 24
    (measured on a 2-core Xeon with AVX-512, whole models in one process against 16: mobilenet_v2 0.961x,
    resnet50 0.991x, resnet18 0.998x; 28: mobilenet_v2 no better than 16)."""
    return 24 if lanes >= 16 else 12


STREAM_EXTRA = 4  # accumulators past ``accumulator_vectors`` a weight-streaming 4-vector tile takes (``default_tile``)


@dataclass(frozen=True)
class Tile:
    """Output tile computed per inner iteration: ``oc_block`` channels x ``rows`` x ``cols`` (output units).
    ``winograd``: 0 for the direct kernel, else the output tile m of Winograd F(m x m, 3 x 3) (``winograd.py``, its
    own blocking; the other fields are then unused): the tuner searches the algorithm too.
    ``task_rows``: the blocked direct conv's output rows per parallel task when its weights stay resident
    (``_schedule_cpu_blocked_resident``); 0: each register tile accumulates its whole reduction at once (records
    written before this field read as 0, the schedule they measured)."""

    oc_block: int
    rows: int
    cols: int
    winograd: int = 0
    task_rows: int = 0


def default_tile(spec: ConvSpec) -> Tile:
    """Heuristic register tile: about ``accumulator_vectors`` accumulators, the conv tile row a whole vector when
    possible."""
    _, oc, oh, ow = spec.out_shape
    lanes, budget = spec.lanes, accumulator_vectors(spec.lanes)
    if spec.banded and spec.blocked:
        return _blocked_band_tile(spec, budget)
    if spec.banded:  # a band of 8 pooled rows: the halo costs (kernel - stride) / (8 * stride) of the conv
        conv_w = spec.conv_shape[3]
        if spec.channels_vectorized:
            # register tile: 16 channels x 4 pixels of a conv row. Measured on Zen 3 (AVX2: 16 floats are two
            # registers) on the ResNet stem, fused/unfused: 0.46 with 4 pixels (8 accumulator registers), 0.89
            # with 7 (14 accumulators + weights + broadcast > 16 registers: spills), 0.70 with 2
            return Tile(oc_block=next(b for b in (VECTOR_LANES, 8) if oc % b == 0), rows=largest_divisor(oh, 8),
                        cols=largest_divisor(conv_w, 4))
        return Tile(oc_block=largest_divisor(oc, 8), rows=largest_divisor(oh, 8),
                    cols=largest_divisor(conv_w, lanes))
    if spec.blocked and spec.pool:
        return _blocked_pool_tile(spec, budget)
    if spec.depthwise and spec.blocked:  # one channel vector x a row of pixels: memory-bound, taps unrolled
        return Tile(oc_block=spec.oc_vector, rows=1, cols=largest_divisor(ow, budget - 4))
    if spec.flat_pixels:  # any pixel count: the flattened map is padded to whole tiles
        return _blocked_tile(spec, oh * ow, budget, padded=True)
    if spec.blocked:
        tile = with_resident_rows(spec, _blocked_tile(spec, ow, budget, padded=spec.packs_input))
        if lanes >= 16 and tile.task_rows and not rows_first(spec) and (oc // spec.oc_vector) % 4 == 0:
            # streams its weights: 4 of them per task (below), up to 7 pixels (28 accumulators: the 4 weight
            # vectors take the other registers, the broadcasts are memory operands), so 7- and 14-wide rows take
            # whole tiles of 7 (4 x 4 computed 8 of 7). Kernels alone on the 2-core Xeon: resnet18's 512-channel
            # 3x3 at 7x7 0.822 -> 0.756 ms, its 256 -> 512 stride-2 0.427 -> 0.398; whole models in one process
            # resnet18 0.993x, resnet50 0.991x, vgg11_bn 0.986x
            tile = with_resident_rows(spec, _blocked_tile(spec, ow, budget + STREAM_EXTRA, padded=True,
                                                          vector_counts=(4,)))
        return tile
    if spec.channels_vectorized:  # 1-2 vectors of channels x a few pixels (about 14 accumulator
        # vectors on AVX-512, 8-12 on AVX2)
        col_scale = spec.pool_stride[1] if spec.pool else 1

        def tile_for(oc_block: int) -> Tile:
            max_pixels = (budget - 2) // -(-oc_block // lanes)
            cols = largest_divisor(ow, max(1, max_pixels // col_scale))
            rows = largest_divisor(oh, max(1, max_pixels // (cols * col_scale)))
            return Tile(oc_block=oc_block, rows=rows, cols=cols)

        # the most accumulator vectors within budget: pixel counts must divide the output (a 7x7 map with a
        # 5-pixel budget gets 1 pixel), so one vector of channels x 7 pixels can beat two vectors x 1 pixel
        blocks = [b for b in (2 * lanes, lanes, 8) if oc % b == 0 and (not spec.blocked or b % spec.oc_vector == 0)]
        tiles = [tile_for(b) for b in blocks][:2]
        return max(tiles, key=lambda t: (-(-t.oc_block // lanes) * t.rows * t.cols, t.oc_block))
    if spec.pool:  # 4 channels x 1 pooled row x one vector of conv columns: measured on Zen 3 (AVX2) on a
        # conv-ReLU-maxpool stack, fused/unfused 0.47 against 0.85 with 2 pooled rows (32 accumulator registers)
        cols = largest_divisor(ow, max(1, lanes // spec.pool_stride[1]))
        return Tile(oc_block=largest_divisor(oc, 4), rows=1, cols=cols)
    # measured on Zen 4 over VGG/ResNet shapes: 4 channels x 4 rows x one vector beats 8 x 2 by 5-45% for stride 1;
    # strided convs (ResNet's 7x7/2 stem) read rows far apart and prefer 8 x 2
    cols = largest_divisor(ow, lanes)
    if spec.stride == (1, 1):
        return Tile(oc_block=largest_divisor(oc, 4), rows=largest_divisor(oh, budget // 4), cols=cols)
    return Tile(oc_block=largest_divisor(oc, 8), rows=largest_divisor(oh, budget // 8), cols=cols)


def _blocked_tile(spec: ConvSpec, ow: int, budget: int, padded: bool, vector_counts: tuple = (3, 2, 1)) -> Tile:
    """1-3 (``vector_counts``) channel vectors x ``cols`` pixels of a row, the most accumulators per stored pixel
    within ``budget``.

    The row is padded to a multiple of ``cols`` (``_blocked_compute``), so 2 vectors x 6 pixels (12 accumulators,
    the most that stay in registers on AVX2: 16 ymm minus 2 weight vectors and a broadcast) serve any width at a
    few wasted columns: a 56-wide row computes 60, a 7-wide one takes one vector x 7. One vector alone gets at most
    ``budget - 4`` pixels: LLVM hoists that many broadcasts ahead of their FMAs (1 x 12 spilled on Zen 3).
    ``padded``: the row may be padded (an input copy, or a flat-pixel 1x1 conv, whose ``ow`` is H * W: 49 pixels
    take 3 vectors x 4, 52 computed); otherwise ``cols`` divides it."""
    v = spec.oc_vector
    options = []
    for vectors in vector_counts:
        if (spec.weight_shape[0] // v) % vectors:
            continue
        for cols in range(1, (budget // vectors if vectors > 1 else budget - 4) + 1):
            if padded or ow % cols == 0:  # an unpadded input is read as is: no spare columns
                options.append(Tile(oc_block=vectors * v, rows=1, cols=cols))

    def merit(t: Tile):
        computed = ceil_to(ow, t.cols)
        return round(t.oc_block // v * t.cols * ow / computed, 3), -(computed - ow), t.oc_block

    def flat_merit(t: Tile):  # useful FMAs per FMA and load (a weight vector per channel vector, a broadcast per
        # pixel): measured on Zen 3 at 7x7 (49 pixels), 2 vectors x 5 pixels (50 computed) 0.80x the time of 2 x 6
        # (54); at 14x14 (196) 2 x 6 (198) 0.78x 2 x 5 (200)
        vectors, computed = t.oc_block // v, ceil_to(ow, t.cols)
        return round(vectors * t.cols * ow / computed / (vectors * t.cols + vectors + t.cols), 4), t.oc_block

    return max(options, key=flat_merit if spec.flat_pixels else merit)


def _blocked_pool_tile(spec: ConvSpec, budget: int) -> Tile:
    """The blocked kernel with its pool (``_blocked_pool``): 1-3 channel vectors x ``cols`` pooled pixels of one
    pooled row, the register tile one conv row of those windows (``cols`` x k pixels): the most accumulators within
    ``budget`` (one vector alone: ``budget - 4`` pixels, as in ``_blocked_tile``), the fewest wasted columns of the
    padded row next. 2x2/2 windows on AVX2: 2 vectors x 3 pooled pixels (12 accumulators), 1 vector x 4."""
    v, kw, pw = spec.oc_vector, spec.pool_kernel[1], spec.out_shape[3]
    options = []
    for vectors in (1,) if spec.depthwise else (3, 2, 1):
        if (spec.weight_shape[0] // v) % vectors == 0:
            pixels = budget // vectors if vectors > 1 else budget - 4
            options += [Tile(oc_block=vectors * v, rows=1, cols=cols) for cols in range(1, pixels // kw + 1)]

    def merit(t: Tile):
        computed = ceil_to(pw, t.cols)
        return round(t.oc_block // v * t.cols * kw * pw / computed, 3), -(computed - pw), t.oc_block

    return max(options, key=merit)


BAND_BYTES = 448 << 10  # a task's band buffer stays within a 512 KB L2 (Zen 3's) beside the input rows it reads
BAND_TASKS = 8  # at least this many tasks where the shape allows: whole bands spread over the cores


def _blocked_band_tile(spec: ConvSpec, budget: int) -> Tile:
    """The blocked conv's register tile over the conv width (``_blocked_tile``) and the tallest band of pooled rows
    (a divisor of the pooled height) whose band buffer fits ``BAND_BYTES`` while leaving ``BAND_TASKS`` tasks: the
    halo is (kernel - stride) / (rows * stride) of the conv. Measured on Zen 3 (AVX2, 2 cores) on the ResNet stem,
    kernel time over the blocked conv's alone: 1.06 with 8 pooled rows per band, 1.04 with 14, 1.02 with 28.
    On AVX-512 the register tile may take 4 channel vectors: ResNet's stem (3 -> 64, 7x7/2 + 3x3/2 max pool) gets
    4 x 6 pixels (4 weight loads and 6 broadcasts per 24 FMAs; 112 columns computed as 114) instead of 2 x 12 (14
    loads, 120 columns): alone on the 2-core Xeon 0.896 -> 0.841 ms; resnet18 0.986x, resnet50 0.992x in one
    process."""
    vectors = (4, 3, 2, 1) if spec.lanes >= 16 else (3, 2, 1)
    register = _blocked_tile(spec, spec.conv_shape[3], budget, padded=spec.packs_input, vector_counts=vectors)
    n, oc, ph, _ = spec.out_shape
    width = ceil_to(spec.conv_shape[3], register.cols)

    def band_bytes(rows: int) -> int:
        return 4 * register.oc_block * ((rows - 1) * spec.pool_stride[0] + spec.pool_kernel[0]) * width

    return Tile(oc_block=register.oc_block, rows=tallest_band(ph, band_bytes, n * oc // register.oc_block),
                cols=register.cols)


def tallest_band(height: int, band_bytes: Callable[[int], int], other_tasks: int, limit: int = BAND_BYTES) -> int:
    """Output rows per band (a divisor of ``height``): the most whose band buffer (``band_bytes(rows)``) fits
    ``limit`` while the bands times ``other_tasks`` (batch x channel tiles) still give ``BAND_TASKS`` tasks;
    the fewest that fit where none leaves that many, one row where none fits."""
    fits = [r for r in range(1, height + 1) if height % r == 0 and band_bytes(r) <= limit] or [1]
    spread = [r for r in fits if other_tasks * (height // r) >= BAND_TASKS] or [min(fits)]
    return max(spread)


RESIDENT_BYTES = 32 << 10  # a resident task's fp32 accumulators: within L1 (48 KB on the Xeon, 32 KB on Zen 3);
# also the weight panel per task (oc_block x C x KH x KW) above which its weights pay for staying resident


def resident_weights(spec: ConvSpec) -> bool:
    """Whether the blocked direct conv can run with resident weights (``_schedule_cpu_blocked_resident``):
    ordinary convs whose register tile is a piece of an output row (not flat-pixel 1x1 convs, whose per-block
    weight slice is a few KB: measured on resnet50's, no gain), without a pool or a depthwise window."""
    return spec.blocked and not (spec.depthwise or spec.pool or spec.flat_pixels or spec.banded)


# Weight streams. A resident conv whose weights outweigh its input (``rows_first`` false: resnet's 7x7 and
# stride-2 layers) streams them from L3 or memory, each channel vector's panel its own sequential stream. On
# AVX-512 its default tile then takes 4 channel vectors (x 4-6 pixels), not 2 x 7: twice the streams
# in flight per core. Measured on the 2-core Xeon: resnet18's 512-channel 3x3 at 7x7 alone with its weights evicted
# to memory 0.946-0.970 -> 0.894-0.946 ms with 4 x 4-6 pixels (hot caches: even); whole models in one process:
# resnet18 0.965-0.986x, resnet50 0.997x, vgg11_bn 0.998x. Not measured on AVX2 (12 accumulators: 4 vectors x 3
# pixels), left as it was.


def resident_rows_problem(spec: ConvSpec, tile: Tile) -> str | None:
    """Why ``tile``'s ``task_rows`` do not fit ``spec`` (None: they do, or the tile has none)."""
    if tile.task_rows and (not resident_weights(spec) or spec.out_shape[2] % tile.task_rows
                           or tile.task_rows % tile.rows):
        return (f"task_rows {tile.task_rows} with register rows {tile.rows}: the resident-weight schedule takes "
                f"blocked convs without pool whose output height {spec.out_shape[2]} it divides")
    return None


def with_resident_rows(spec: ConvSpec, tile: Tile) -> Tile:
    """``tile`` with the rows per task of the resident-weight schedule where the spec takes it and its task's
    weight panel overflows L1 (``RESIDENT_BYTES``; streamed, every register tile re-reads it from L2): the tallest
    multiple of the register tile's rows (dividing the output height) whose accumulators fit ``RESIDENT_BYTES``
    while leaving ``BAND_TASKS`` tasks. A smaller panel stays in L1 anyway: measured on mobilenet_v2's stem (3
    input channels, a 3.4 KB panel), resident 0.149 ms against streamed 0.117."""
    panel = 4 * tile.oc_block * math.prod(spec.weight_shape[1:])
    if not resident_weights(spec) or panel <= RESIDENT_BYTES:
        return tile
    n, oc, oh, ow = spec.out_shape
    row_bytes = 4 * tile.oc_block * tile.rows * ceil_to(ow, tile.cols)
    groups = tallest_band(oh // tile.rows, lambda g: g * row_bytes, n * oc // tile.oc_block, RESIDENT_BYTES)
    return dataclasses.replace(tile, task_rows=groups * tile.rows)


def _output_block(spec: ConvSpec) -> str:
    """The stage that writes the kernel's output: the one whose loops are tiled."""
    return "post" if spec.pool_staged else "pool" if spec.pool else "epilogue"


def schedule_cpu(spec: ConvSpec, func: tirx.PrimFunc, tile: Tile | None = None) -> tirx.PrimFunc:
    tile = tile or default_tile(spec)
    if spec.blocked and spec.banded:
        return _schedule_cpu_blocked_band(spec, func, tile)
    if spec.blocked:
        return _schedule_cpu_blocked(spec, func, tile)
    if spec.banded:
        return _schedule_cpu_banded(spec, func, tile)
    sch = Schedule(func)
    conv = sch.get_sblock("conv")
    epilogue = sch.get_sblock("epilogue")
    pooled = spec.pool is not None
    out = sch.get_sblock(_output_block(spec))
    loops = sch.get_loops(out)
    n, o, y, x = loops[:4]
    o_outer, o_inner = sch.split(o, [None, tile.oc_block])
    y_outer, y_inner = sch.split(y, [None, tile.rows])
    x_outer, x_inner = sch.split(x, [None, tile.cols])
    by_channel = spec.channels_vectorized
    sch.reorder(n, o_outer, y_outer, x_outer, o_inner, y_inner, x_inner)
    if spec.pool_staged:  # the pooled tile, then bias and activation (or the narrowing) on it
        sch.compute_at(sch.get_sblock("pool"), x_outer)
        sch.set_scope(sch.get_sblock("pool"), 0, "local")
    if pooled:
        sch.compute_at(epilogue, x_outer)
    sch.compute_at(conv, x_outer)
    reduction = _register_tile(sch, conv, spec, 4)  # under n, o_outer, y_outer, x_outer
    if pooled:
        sch.compute_inline(epilogue)
    elif not by_channel:
        sch.vectorize(x_inner)
    sch.parallel(sch.fuse(n, o_outer, y_outer))
    if reduction is not None:
        sch.decompose_reduction(conv, reduction)
    _vectorize_pool(sch, spec, shared=2)  # the parallel loop, x_outer
    _schedule_pad(sch, spec)
    return sch.mod["main"]


def rows_first(spec: ConvSpec) -> bool:
    """Order the blocked conv's parallel tasks by row band before channel tile where its weights are smaller than
    its input. TVM's pool gives each core a contiguous range of tasks: rows first, each core reads its own band of
    input rows (which the previous kernel, ordered so too, wrote on the same core) and all of the small weights;
    channel tiles first, each core reads half of the weights but all of the input, half of it from the other core's
    cache. Measured on the 2-core Xeon, whole models in one process against channel tiles first: resnet50 0.955x,
    mobilenet_v2 0.971x, resnet18 0.97-0.98x (its 1x1 stride-2 downsample conv at 56x56: 190 -> 114 us in the
    model), efficientnet_b0 0.997x. Depthwise and pooled convs keep channel tiles first (not measured)."""
    return (not (spec.depthwise or spec.pool) and math.prod(spec.weight_shape) < math.prod(spec.in_shape))


def _split_channels(sch: Schedule, spec: ConvSpec, out, oc_block: int) -> tuple:
    """The blocked kernel's output stage ``out`` split into tiles of ``oc_block`` channels: (n, o_outer, o_inner,
    y, x, lanes). Stored NCHW[v]c: tiles of whole channel blocks, the block (``lanes``) one vector store; stored NCHW:
    tiles of channels, ``lanes`` None."""
    if spec.out_block:
        n, o, y, x, lanes = sch.get_loops(out)
        o_outer, o_inner = sch.split(o, [None, oc_block // spec.oc_vector])
    else:
        (n, o, y, x), lanes = sch.get_loops(out), None
        o_outer, o_inner = sch.split(o, [None, oc_block])
    return n, o_outer, o_inner, y, x, lanes


def _task_order(spec: ConvSpec, channel_tiles, row_tiles) -> tuple:
    """The two task loops, outer first (``rows_first``)."""
    return (row_tiles, channel_tiles) if rows_first(spec) else (channel_tiles, row_tiles)


def _schedule_cpu_blocked(spec: ConvSpec, func: tirx.PrimFunc, tile: Tile) -> tirx.PrimFunc:
    """Per task (parallel over output-channel tiles x row tiles): for each tile of ``cols`` columns, a register tile
    of ``oc_block / v`` channel vectors x ``rows`` x ``cols`` pixels accumulated over (C/icb, KH, KW, icb), then
    stored through the epilogue into NCHW."""
    if tile.task_rows:
        return _schedule_cpu_blocked_resident(spec, func, tile)
    sch = Schedule(func)
    conv, out = sch.get_sblock("conv"), sch.get_sblock("post" if spec.pool else "epilogue")
    n, o_outer, o_inner, y, x, lanes = _split_channels(sch, spec, out, tile.oc_block)
    if spec.flat_pixels:  # y: the unit row of the flattened map; tiles of rows * cols pixels, a few per task
        x_task, x_outer, x_inner = sch.split(x, [None, _flat_tiles_per_task(spec, tile), tile.rows * tile.cols])
        y_outer, y_inner = sch.fuse(y, x_task), None
    else:
        y_outer, y_inner = sch.split(y, [None, tile.rows])
        x_outer, x_inner = sch.split(x, [None, tile.cols])
    y_serial = None
    if spec.depthwise and spec.in_block and spec.packs_input:  # a few rows per task: its padded input rows are
        # copied once for all of them (stride 1: R + 2 rows, not 3 R)
        y_outer, y_serial = sch.split(y_outer, [None, largest_divisor(-(-spec.out_shape[2] // tile.rows), 8)])
    first, second = _task_order(spec, o_outer, y_outer)
    loops = (n, first, second, y_serial, x_outer, o_inner, y_inner, x_inner, lanes)
    sch.reorder(*[loop for loop in loops if loop is not None])
    if lanes is not None:
        sch.vectorize(lanes)
    # with a pool: its tile of pooled vectors, from one conv row of the tile's windows at a time
    sch.compute_at(conv, _schedule_blocked_pool(sch, x_outer) if spec.pool else x_outer, preserve_unit_loops=True)
    oo, yy, xx, oi, rco, ry, rx, rci = sch.get_loops(conv)[-8:]
    sch.reorder(rco, ry, rx, rci, yy, xx, oo, oi)  # per pixel: one broadcast, FMA'd into every channel vector
    sch.vectorize(oi)
    for loop in (yy, xx, oo, *((ry, rx) if spec.depthwise else ())):  # depthwise: taps unrolled, so neighbouring
        sch.unroll(loop)                                               # pixels share their input loads
    sch.set_scope(conv, 0, "local")
    task = sch.fuse(n, first, second)
    sch.parallel(task)
    sch.decompose_reduction(conv, rco)
    if spec.flat_pixels:  # the output as stored: flat pixel p is (p / W, p % W)
        ow = spec.out_shape[3]
        sch.transform_layout(out, ("write", 0), lambda *i: (*i[:2], i[3] // ow, i[3] % ow, *i[4:]))
    if spec.pool:
        _unroll_blocked_pool(sch)
    _schedule_blocked_input(sch, spec, task)
    return sch.mod["main"]


def _schedule_blocked_input(sch: Schedule, spec: ConvSpec, task) -> None:
    """The blocked kernel's padded input. NCHW[b]c input: each task copies only the rows its tile reads (with their
    zero border) into a small, cache-resident buffer, instead of a padded copy of the whole tensor that round-trips
    through memory. NCHW input: ``_schedule_packed_input``."""
    if spec.in_block and spec.packs_input:
        pad = sch.get_sblock("pad")
        sch.compute_at(pad, task)
        sch.vectorize(sch.get_loops(pad)[-1])
    else:
        _schedule_packed_input(sch)


def _schedule_cpu_blocked_resident(spec: ConvSpec, func: tirx.PrimFunc, tile: Tile) -> tirx.PrimFunc:
    """The blocked direct conv with resident weights: per task (parallel over output-channel tiles x bands of
    ``task_rows`` rows) the input-channel blocks are the outermost loop, and under each block every register tile
    of the band (``oc_block / v`` vectors x ``rows`` x ``cols`` pixels) adds that block's contribution to the task's
    accumulator buffer (oc_block x task_rows x width, fp32, in L1). The block's weight slice (oc_block x icb x KH x
    KW: 18 KB for 2 vectors of a 3x3 conv) is then read from L2 once per task and from L1 by every tile after the
    first, where the schedule above streams the task's whole weight panel (C x KH x KW x oc_block: 590 KB at 512
    input channels) from L2 once per tile. The accumulators cost one load and store per tile and input block
    (1/(icb x KH x KW) of its FMAs). Same sums in the same order: the output is bit-identical.
    Measured on the 2-core Xeon (AVX-512), kernels alone: resnet18's 512-channel 3x3 convs at 7x7 0.95 -> 0.83 ms,
    its 128-channel ones at 28x28 0.83 -> 0.75 ms; whole models in one process: resnet18 0.944x, resnet50 0.983x,
    vgg11_bn 1.00x."""
    problem = resident_rows_problem(spec, tile)
    if problem:
        raise ValueError(problem)
    sch = Schedule(func)
    conv, out = sch.get_sblock("conv"), sch.get_sblock("epilogue")
    n, o_outer, o_inner, y, x, lanes = _split_channels(sch, spec, out, tile.oc_block)
    y_outer, y_inner = sch.split(y, [None, tile.task_rows])
    first, second = _task_order(spec, o_outer, y_outer)
    sch.reorder(*[loop for loop in (n, first, second, o_inner, y_inner, x, lanes) if loop is not None])
    if lanes is not None:
        sch.vectorize(lanes)
    task = sch.fuse(n, first, second)
    sch.compute_at(conv, task, preserve_unit_loops=True)  # the task's accumulator buffer
    oo, yy, xx, oi, rco, ry, rx, rci = sch.get_loops(conv)[-8:]
    y_tile, y_reg = sch.split(yy, [None, tile.rows])
    x_tile, x_reg = sch.split(xx, [None, tile.cols])
    sch.reorder(rco, y_tile, x_tile, ry, rx, rci, y_reg, x_reg, oo, oi)  # input block, then register tiles
    sch.vectorize(oi)
    for loop in (y_reg, x_reg, oo):
        sch.unroll(loop)
    sch.parallel(task)
    sch.decompose_reduction(conv, rco)
    _schedule_blocked_input(sch, spec, task)  # (a blocked input: the band's padded rows, per task)
    return sch.mod["main"]


def _schedule_packed_input(sch: Schedule) -> None:
    """The blocked kernel's padded NCHW[c]c copy of an NCHW input, if it has one, parallel over rows: a vector of
    channels per pixel (8 strided reads, one store): 2.5-3x a scalar copy."""
    if "pad" in (sch.get(block).name_hint for block in sch.get_child_blocks(sch.get_sblock("root"))):
        pad = sch.get_sblock("pad")
        pad_loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*pad_loops[:3]))
        sch.vectorize(pad_loops[-1])


def _schedule_cpu_blocked_band(spec: ConvSpec, func: tirx.PrimFunc, tile: Tile) -> tirx.PrimFunc:
    """Overlapping or padded windows on the blocked conv (``_blocked_pool``, ``banded``): per task ``tile.oc_block``
    channels x a band of ``tile.rows`` pooled rows. The band's conv rows ((rows - 1) * stride + kernel of them) are
    computed once, register tile by register tile (the blocked conv's: channel vectors x ``tile.cols`` pixels), into
    a per-task band buffer [oc_block/v][rows][width][v] that stays in cache; then each pooled row is reduced from it
    into a local row of pooled channel vectors and stored through ``post``. Only the kernel - stride conv rows
    shared with the next band are computed twice (the halo: 1/(2 * rows) of the conv for ResNet's 3x3/2)."""
    sch = Schedule(func)
    conv, band = sch.get_sblock("conv"), sch.get_sblock("band")  # a register tile; the task's band buffer
    n, o_outer, o_inner, y, x, lanes = _split_channels(sch, spec, sch.get_sblock("post"), tile.oc_block)
    y_outer, y_inner = sch.split(y, [None, tile.rows])
    sch.reorder(*[loop for loop in (n, o_outer, y_outer, y_inner, o_inner, x, lanes) if loop is not None])
    if lanes is not None:
        sch.vectorize(lanes)
    pool = sch.get_sblock("pool")
    rows = sch.get_sblock("pool_rows")
    for stage in (pool, rows):  # one pooled row at a time, in local buffers
        sch.compute_at(stage, y_inner, preserve_unit_loops=True)
        sch.set_scope(stage, 0, "local")
    rco, ry, rx, _ = fill_band(sch, band, conv, y_outer, tile.cols, reductions=4)
    if spec.depthwise:
        sch.unroll(ry)
        sch.unroll(rx)
    task = sch.fuse(n, o_outer, y_outer)
    sch.parallel(task)
    sch.decompose_reduction(conv, rco)
    for stage in (rows, pool):  # one pooled row: a vector of channels per column
        sch.vectorize(sch.get_loops(stage)[-1])
    _schedule_packed_input(sch)  # (NCHW in: select puts a pool in the epilogue only there)
    return sch.mod["main"]


def fill_band(sch: Schedule, band, acc, at, cols: int, reductions: int) -> list:
    """A per-task band buffer [channel vectors][rows][width][v] (``band``) computed under loop ``at``, one register
    tile at a time: ``cols`` pixels of a row x the task's channel vectors, accumulated by ``acc`` in registers with
    its ``reductions`` loops outside (per pixel one broadcast, FMA'd into every channel vector), the tile's pixels
    and vectors unrolled, the lanes vectorized. Returns ``acc``'s reduction loops (to unroll or decompose)."""
    sch.compute_at(band, at, preserve_unit_loops=True)
    vectors, rows, columns, lanes = sch.get_loops(band)[-4:]
    col_outer, col_inner = sch.split(columns, [None, cols])
    sch.reorder(rows, col_outer, vectors, col_inner, lanes)
    sch.vectorize(lanes)
    sch.compute_at(acc, col_outer, preserve_unit_loops=True)
    vectors, rows, columns, lanes, *reduction = sch.get_loops(acc)[-4 - reductions:]
    sch.reorder(*reduction, rows, columns, vectors, lanes)
    sch.vectorize(lanes)
    for loop in (rows, columns, vectors):
        sch.unroll(loop)
    sch.set_scope(acc, 0, "local")
    return reduction


FLAT_TASKS = 32  # parallel tasks of a flat-pixel conv, at least (where its shape allows): a few per core


def _flat_tiles_per_task(spec: ConvSpec, tile: Tile) -> int:
    """Pixel tiles of a flat-pixel conv (``ConvSpec.flat_pixels``) per parallel task: the most (a divisor of the
    tile count) that still leave ``FLAT_TASKS`` tasks with the channel tiles, so a task reuses its weight panel
    over many pixels. Measured on Zen 3 (2 cores), kernel alone: 14x14 expand convs (64-96 -> 384-576 channels,
    49 tiles of 4 pixels), one tile per task 1.08-1.12x the time of 7 or 49; 7x7 160 -> 960 1.08x; on 28-112 maps
    within noise of the earlier one-output-row-per-task rule (which took 1.2-1.4x less than a task per tile)."""
    pixels = tile.rows * tile.cols
    tiles = ceil_to(spec.out_shape[2] * spec.out_shape[3], pixels) // pixels
    channel_tiles = spec.out_shape[1] // tile.oc_block
    return max(d for d in range(1, tiles + 1)
               if tiles % d == 0 and (d == 1 or channel_tiles * tiles // d >= FLAT_TASKS))


def _schedule_blocked_pool(sch: Schedule, x_outer):
    """The pooled tile (``_blocked_pool``) in a local buffer under the output tile's loop, reduced one window row at
    a time (vector max/add per channel vector and pooled pixel): returns the window-row loop, under which the conv's
    register tile (one conv row of the tile's windows) is computed."""
    pool = sch.get_sblock("pool")
    sch.compute_at(pool, x_outer, preserve_unit_loops=True)
    sch.set_scope(pool, 0, "local")
    oo, yy, xx, oi, wy, wx = sch.get_loops(pool)[-6:]
    sch.reorder(yy, wy, oo, xx, wx, oi)
    sch.vectorize(oi)
    return wy


def _unroll_blocked_pool(sch: Schedule) -> None:
    """The pooled tile's initialization and reduction unrolled (its vectors stay in registers); after ``parallel``,
    which needs the reduction whole."""
    pool = sch.get_sblock("pool")
    above = len(sch.get_loops(pool)) - 5  # ..., yy | wy, oo, xx, wx, oi
    init = sch.decompose_reduction(pool, sch.get_loops(pool)[above])
    *init_loops, init_lanes = sch.get_loops(init)[above:]
    sch.vectorize(init_lanes)
    for loop in (*sch.get_loops(pool)[above + 1:-1], *init_loops):
        sch.unroll(loop)


def _register_tile(sch: Schedule, conv, spec: ConvSpec, outer: int):
    """The conv block computed under ``outer`` loops: reductions outside, the tile's spatial loops inside (in the
    conv's own order: (o, y, x), or (y, x, o) when channels are vectorized), the last one the vector; the
    accumulator tile in registers. compute_at drops unit-extent loops, reductions included (1x1 kernels,
    depthwise channels). Returns the outer reduction loop, to decompose once the rest is scheduled."""
    tile_loops = sch.get_loops(conv)[outer:]
    reductions = sum(extent > 1 for extent in spec.weight_shape[1:])
    split_at = len(tile_loops) - reductions
    spatial, reduction = tile_loops[:split_at], tile_loops[split_at:]
    sch.reorder(*reduction, *spatial)
    if spatial:
        sch.vectorize(spatial[-1])
    sch.set_scope(conv, 0, "local")
    return reduction[0] if reduction else None


def _vectorize_pool(sch: Schedule, spec: ConvSpec, shared: int) -> None:
    """The window reduction outside, a vector of pooled columns inside (then bias and activation on it).

    ``shared``: loops the pool shares with the tile (the parallel one, ...). A pool placed by compute_at (before
    bias and activation) lost its unit-extent loops; one that writes the output kept them."""
    if spec.pool is None:
        return
    pool = sch.get_sblock("pool")
    own = sch.get_loops(pool)[shared:]
    windows = sum(k > 1 for k in spec.pool_kernel) if spec.pool_staged else 2
    if windows == 0 or len(own) <= windows:
        return
    # a channels-last band: a vector of channels (the first own loop); otherwise a vector of pooled columns,
    # except in a column-vectorized band, where the columns are strided gathers and scalar code was faster
    if spec.banded and not spec.channels_vectorized:
        return
    lanes = own[0] if spec.banded else own[-windows - 1]
    sch.reorder(*own[-windows:], lanes)
    sch.vectorize(lanes)
    sch.decompose_reduction(pool, own[-windows])
    if spec.pool_staged:
        sch.vectorize(sch.get_loops(sch.get_sblock("post"))[-1])


def _schedule_pad(sch: Schedule, spec: ConvSpec) -> None:
    if spec.padding != (0, 0):
        pad = sch.get_sblock("pad")
        pad_loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*pad_loops[:2]))
        if spec.in_shape[3] + 2 * spec.padding[1] <= 4 * spec.lanes:
            sch.vectorize(pad_loops[-1])


def _schedule_cpu_banded(spec: ConvSpec, func: tirx.PrimFunc, tile: Tile) -> tirx.PrimFunc:
    """Overlapping or padded pooling windows: per task, ``tile.oc_block`` channels x a band of ``tile.rows``
    pooled rows x the whole width. The conv rows the band's windows read are computed once into a band buffer
    (cache-resident: oc_block x ((rows - 1) * stride + kernel) x conv width), register tile by register tile
    (``tile.cols`` columns or pixels), then pooled from it; only the kernel - stride rows shared with the next band
    are computed twice (a halo), never once per window."""
    sch = Schedule(func)
    conv = sch.get_sblock("conv")
    band = sch.cache_write(conv, 0, "global")  # `conv` now fills a register tile; `band` stores it in the band
    out = sch.get_sblock(_output_block(spec))
    n, o, y, x = sch.get_loops(out)[:4]
    o_outer, o_inner = sch.split(o, [None, tile.oc_block])
    y_outer, y_inner = sch.split(y, [None, tile.rows])
    sch.reorder(n, o_outer, y_outer, o_inner, y_inner, x)
    if spec.pool_staged:
        sch.compute_at(sch.get_sblock("pool"), y_outer)
        sch.set_scope(sch.get_sblock("pool"), 0, "local")
    epilogue = sch.get_sblock("epilogue")
    sch.compute_at(epilogue, y_outer)
    sch.compute_at(band, y_outer)
    band_loops = sch.get_loops(band)[3:]  # (o, y, x) or, channels vectorized, (y, x, o); unit extents dropped
    if spec.channels_vectorized:
        *rows, cols, channels = band_loops
        col_outer, col_inner = sch.split(cols, [None, tile.cols])
        sch.reorder(*rows, col_outer, col_inner, channels)
        sch.vectorize(channels)
    else:
        *lead, cols = band_loops
        col_outer, col_inner = sch.split(cols, [None, tile.cols])
        sch.reorder(*lead[1:], col_outer, *lead[:1], col_inner)
        sch.vectorize(col_inner)
    depth = [sch.get(loop) for loop in sch.get_loops(band)].index(sch.get(col_outer)) + 1
    sch.compute_at(conv, col_outer)
    reduction = _register_tile(sch, conv, spec, depth)
    sch.compute_inline(epilogue)
    sch.parallel(sch.fuse(n, o_outer, y_outer))
    if reduction is not None:
        sch.decompose_reduction(conv, reduction)
    _vectorize_pool(sch, spec, shared=1)  # the parallel loop
    _schedule_pad(sch, spec)
    return sch.mod["main"]


def schedule_gpu(spec: ConvSpec, func: tirx.PrimFunc, threads: int = 128) -> tirx.PrimFunc:
    sch = Schedule(func)
    pooled = spec.pool is not None
    out = sch.get_sblock(_output_block(spec))
    conv = sch.get_sblock("conv")
    n, o, y, x = sch.get_loops(out)[:4]
    fused = sch.fuse(n, o, y, x)
    block_x, thread_x = sch.split(fused, [None, threads])
    sch.bind(block_x, "blockIdx.x")
    sch.bind(thread_x, "threadIdx.x")
    if spec.pool_staged:
        sch.compute_at(sch.get_sblock("pool"), thread_x)
        sch.set_scope(sch.get_sblock("pool"), 0, "local")
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
    func = te.create_prim_func(conv_compute(spec, tile))
    func = schedule_gpu(spec, func) if target_kind == "cuda" else schedule_cpu(spec, func, tile)
    # Scheduled and opaque: TVM's default schedules leave it alone and FuseOps does not merge it into neighbours.
    return func.with_attrs({"tir.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})


def supports(spec: ConvSpec) -> bool:
    """Average pools only over whole windows inside the conv output (no padding, no partial ceil-mode window)."""
    if spec.pool is not None and spec.residual:
        return False
    if spec.pool == "avg" and (any(spec.pool_padding) or spec.window_extent[0] > spec.conv_shape[2]
                               or spec.window_extent[1] > spec.conv_shape[3]):
        return False
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
    """out[m, n] = act(sum_k x[m, k] * w[n, k] + bias[n]): linear layers and RNN input projections."""

    m: int
    k: int
    n: int
    has_bias: bool
    activation: str = "none"
    activation_params: tuple[float, ...] = ()
    dtype: str = F32  # storage; accumulation is fp32
    lanes: int = 16   # fp32 lanes of the target's vector registers


def dense_spec(in_shape: tuple[int, ...], weight_shape: tuple[int, int], has_bias: bool, activation: str = "none",
               activation_params: tuple = (), dtype: str = F32, lanes: int = VECTOR_LANES) -> DenseSpec:
    """The dense kernel for ``x @ W^T`` with ``x`` of ``in_shape``: leading dims of ``x`` become rows."""
    n, k = weight_shape
    return DenseSpec(int(math.prod(in_shape[:-1])), k, n, has_bias, activation, tuple(activation_params), dtype,
                     lanes)


def pack_dense_weight(weight, cols: int):
    """W (N, K) -> (N / cols, K, cols): each tile's ``cols`` output columns as one contiguous (K, cols) panel, the
    order the kernel reads it. Read from a (K, N) W^T instead, a tile's k-th row of weights sits N floats after
    its (k-1)-th: at batch 1 (a GEMV: every weight read once, memory-bound) such a stride crosses a 4 KB page every
    row or few, where hardware prefetchers stop, and the layer runs at the memory latency, not its bandwidth
    (VGG's 25088x4096 classifier: 411 MB per call)."""
    import numpy as np

    n, k = weight.shape
    return np.ascontiguousarray(np.reshape(weight, (n // cols, cols, k)).transpose(0, 2, 1))


def dense_compute(spec: DenseSpec, cols: int) -> list[te.Tensor]:
    x = te.placeholder((spec.m, spec.k), spec.dtype, name="x")
    w_p = te.placeholder((spec.n // cols, spec.k, cols), spec.dtype, name="w_p")  # ``pack_dense_weight``
    rk = te.reduce_axis((0, spec.k), "rk")
    acc = te.compute((spec.m, spec.n), lambda i, j: te.sum(_wide(x[i, rk]) * _wide(w_p[j // cols, rk, j % cols]),
                                                           axis=rk), name="acc")
    act_fn = TE_ACTIVATIONS[spec.activation]
    args = [x, w_p]
    if spec.has_bias:
        bias = te.placeholder((spec.n,), F32, name="bias")  # fp32 at any storage dtype, as in the conv kernel
        args.append(bias)
        out = te.compute((spec.m, spec.n), lambda i, j: _narrow(act_fn(acc[i, j] + _wide(bias[j]),
                                                                       spec.activation_params), spec.dtype),
                         name="epilogue")
    else:
        out = te.compute((spec.m, spec.n), lambda i, j: _narrow(act_fn(acc[i, j], spec.activation_params),
                                                                spec.dtype), name="epilogue")
    return [*args, out]


def default_dense_tile(spec: DenseSpec) -> Tile:
    """Up to 4 rows x the widest column tile (a divisor of N, at most 2 vectors) made of whole 8-lane vectors where
    N has one: a remainder lane count is computed lane by lane. Measured on the 2-core Xeon (AVX-512), batch 1,
    N = 1000 (torchvision classifiers): 25 columns (16 + 9) 2x the time of 8 on resnet18's fc (K = 512), 1.13x on
    mobilenet_v2's (K = 1280)."""
    whole = [c for c in range(8, 2 * spec.lanes + 1, 8) if spec.n % c == 0]
    return Tile(oc_block=1, rows=largest_divisor(spec.m, 4),
                cols=max(whole) if whole else largest_divisor(spec.n, 2 * spec.lanes))


def dense_kernel(spec: DenseSpec, cores: int = 1, tile: Tile | None = None) -> tirx.PrimFunc:
    """CPU: tiles of rows x (one or two vectors of) columns accumulated in registers over k; parallel over tiles.
    The weight comes packed by ``pack_dense_weight(weight, tile.cols)``."""
    tile = tile or default_dense_tile(spec)
    sch = Schedule(te.create_prim_func(dense_compute(spec, tile.cols)))
    acc, out = sch.get_sblock("acc"), sch.get_sblock("epilogue")
    i, j = sch.get_loops(out)
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
