"""The inverted-residual kernel: a 1x1 expand conv (bias, activation) and the depthwise conv that reads it, as ONE
scheduled PrimFunc on NCHW[v]c (``conv2d_expand_dw``, from fuse-expand-depthwise).

Why: MobileNetV2 / EfficientNet blocks expand their input 4-6x by a 1x1 conv and at once filter it depthwise. Run
as two kernels, the expanded tensor (96x112x112: 4.8 MB in mobilenet_v2) is written to memory by one and read back
by the other, which then copies its rows again to add the zero border. Fused, channel block c of the expand feeds
only channel block c of the depthwise conv, so each task owns ``oc_block`` expanded channels x a band of output
rows and never needs another task's values:

    band[E/v, rows, BW, v]  = act1(sum over C of x[.., clamp(y - ph), clamp(x - pw), ..] * W1 + b1), 0 outside the
                              map (the depthwise conv's zero padding comes AFTER the expand's activation)
    out[n, E/v, OH, OW, v]  = act2(sum over (ry, rx) of band[.., y*s + ry, x*s + rx, ..] * W2[.., ry, rx, ..] + b2)

The band is ((R - 1) * s + KH) expanded rows for R output rows, computed once per task into a buffer that stays in
L2 (``BAND_BYTES``), register tile by register tile (the blocked 1x1 conv's: channel vectors x ``cols`` pixels, one
broadcast input scalar FMA'd into every channel vector); then each output row's depthwise window is a few vector
FMAs per tap from that buffer, stored as NCHW[v]c. Only the KH - s rows a band shares with the next are expanded
twice (R = 8 output rows, stride 2: 1/16 of the expand). The border columns are expanded from clamped reads and
then zeroed (2 of W + 2 columns), which is why small maps, where that and the halo weigh more and the expanded
tensor fits in cache anyway, are left unfused (the pass's ``small_map`` refusal).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx
from tvm.s_tir import Schedule

from backends.tvm.kernels import (
    BAND_BYTES,
    F32,
    TE_ACTIVATIONS,
    Tile,
    _f,
    accumulator_vectors,
    ceil_to,
    conv_output_shape,
    fill_band,
    largest_divisor,
    tallest_band,
)


@dataclass(frozen=True)
class ExpandDepthwiseSpec:
    """Static description of one expand 1x1 conv -> depthwise conv kernel; input NCHW[in_block]c, output
    NCHW[block]c, fp32."""

    in_shape: tuple[int, int, int, int]  # N, C, H, W (logical)
    expanded: int                        # E: the expand conv's output channels (= the depthwise conv's)
    kernel: tuple[int, int]              # the depthwise window KH, KW
    stride: tuple[int, int]
    padding: tuple[int, int]
    block: int                           # v: channels per block of the output (and of the expanded band)
    has_bias: bool = True                # the expand conv's bias
    dw_has_bias: bool = True
    activation: str = "none"             # the expand conv's
    activation_params: tuple[float, ...] = ()
    dw_activation: str = "none"
    dw_activation_params: tuple[float, ...] = ()
    in_block: int = 0                    # u: channels per block of the input; 0: ``block`` (alter-layout's
                                         # ``block_for``: a 24-channel input is NCHW8c, its 144 expanded NCHW16c)

    @property
    def input_block(self) -> int:
        return self.in_block or self.block

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return conv_output_shape(self.in_shape, (self.expanded, 1, *self.kernel), self.stride, self.padding, (1, 1))

    @property
    def stored_shape(self) -> tuple[int, ...]:
        n, e, oh, ow = self.out_shape
        return n, e // self.block, oh, ow, self.block

    def band_rows(self, rows: int) -> int:
        """Expanded rows a band of ``rows`` output rows reads."""
        return (rows - 1) * self.stride[0] + self.kernel[0]

    @property
    def band_width(self) -> int:
        """Expanded columns the depthwise windows read (padding included)."""
        return (self.out_shape[3] - 1) * self.stride[1] + self.kernel[1]

    def pack_weights(self, weight: np.ndarray, dw_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(expand (E, C, 1, 1) -> [E/v][C/u][ci][ei], depthwise (E, 1, KH, KW) -> [E/v][KH][KW][ei]): per input
        channel one contiguous vector of ``v`` expanded channels, per tap one vector of depthwise weights."""
        v, u = self.block, self.input_block
        e, c = weight.shape[:2]
        expand = np.transpose(np.reshape(weight, (e // v, v, c // u, u)), (0, 2, 3, 1))
        depthwise = np.transpose(np.reshape(dw_weight, (e // v, v, *self.kernel)), (0, 2, 3, 1))
        return np.ascontiguousarray(expand), np.ascontiguousarray(depthwise)


def _band_bytes(spec: ExpandDepthwiseSpec, tile: Tile) -> int:
    """A task's band buffer: ``oc_block`` channels x the band's expanded rows x its columns (whole register tiles)."""
    return 4 * tile.oc_block * spec.band_rows(tile.rows) * ceil_to(spec.band_width, tile.cols)


def default_tile(spec: ExpandDepthwiseSpec) -> Tile:
    """``oc_block`` expanded channels per task (2 vectors: the expand's register tile is 2 vectors x 6 pixels, the
    12 accumulators of AVX2), ``cols`` pixels per register tile, and ``rows`` output rows per band: the tallest
    divisor of the output height whose band buffer fits ``BAND_BYTES`` while leaving ``BAND_TASKS`` tasks.
    Measured on Zen 3 (2 cores), every tile of 1-3 vectors x 4-12 pixels x 1-56 rows on mobilenet_v2's 112x112,
    56x56 and 28x28 blocks: the default within 4% of the best (0.93 ms the worst). AVX-512 (24 accumulators of its 32
    registers): 3 vectors x 6 pixels where the channels allow; tuned on a 2-core AVX-512 Xeon, mobilenet_v2's fused
    kernels were fastest at 3 vectors x 5-7 pixels (1.10-1.28x faster than 2 x 12 or 1 x 20)."""
    v, budget = spec.block, accumulator_vectors(spec.block)
    n, e, oh, _ = spec.out_shape
    vectors = next(k for k in ((3, 2, 1) if budget >= 24 else (2, 1)) if (e // v) % k == 0)
    cols = 6 if vectors > 1 else budget - 4
    rows = tallest_band(oh, lambda r: _band_bytes(spec, Tile(vectors * v, r, cols)), n * e // (vectors * v))
    return Tile(oc_block=vectors * v, rows=rows, cols=cols)


def candidate_tiles(spec: ExpandDepthwiseSpec) -> list[Tile]:
    """The tuner's choices, default first: 1-3 channel vectors per task, the expand's register tile within the
    accumulator budget (as ``kernels._blocked_tile``), any band height dividing the output's whose buffer stays
    within twice ``BAND_BYTES``; ordered by how far their accumulator count and band height are from the
    default's."""
    v, budget = spec.block, accumulator_vectors(spec.block)
    default, oh = default_tile(spec), spec.out_shape[2]
    tiles = set()
    for vectors in (1, 2, 3):
        if (spec.expanded // v) % vectors:
            continue
        for cols in range(2, (budget // vectors if vectors > 1 else budget - 4) + 1):
            for rows in (r for r in range(1, oh + 1) if oh % r == 0):
                tile = Tile(vectors * v, rows, cols)
                if _band_bytes(spec, tile) <= 2 * BAND_BYTES:
                    tiles.add(tile)

    def distance(t: Tile):
        return (abs(np.log2(t.oc_block * t.cols / (default.oc_block * default.cols))),
                abs(np.log2(t.rows / default.rows)), -t.cols)

    return [default, *sorted(tiles - {default}, key=distance)]


def expand_depthwise_compute(spec: ExpandDepthwiseSpec, tile: Tile) -> list[te.Tensor]:
    """(data, expand weight[, bias], depthwise weight[, dw bias], out): the stages the module docstring gives."""
    n, c, h, w = spec.in_shape
    e, v, u = spec.expanded, spec.block, spec.input_block
    (kh, kw), (sh, sw), (ph, pw) = spec.kernel, spec.stride, spec.padding
    _, _, oh, ow = spec.out_shape
    data = te.placeholder((n, c // u, h, w, u), F32, name="data")
    weight = te.placeholder((e // v, c // u, u, v), F32, name="weight")
    bias = te.placeholder((e,), F32, name="bias") if spec.has_bias else None
    dw_weight = te.placeholder((e // v, kh, kw, v), F32, name="dw_weight")
    dw_bias = te.placeholder((e,), F32, name="dw_bias") if spec.dw_has_bias else None
    rco = te.reduce_axis((0, c // u), "rco")
    rci = te.reduce_axis((0, u), "rci")
    rows, width = spec.band_rows(oh), ceil_to(spec.band_width, tile.cols)

    def clamp(i, size):
        return tirx.max(tirx.min(i, size - 1), 0)

    expand = te.compute((n, e // v, rows, width, v), lambda b, eo, y, x, ei: te.sum(
        data[b, rco, clamp(y - ph, h), clamp(x - pw, w), rci] * weight[eo, rco, rci, ei], axis=[rco, rci]),
        name="expand")
    act1, act2 = TE_ACTIVATIONS[spec.activation], TE_ACTIVATIONS[spec.dw_activation]

    def banded(b, eo, y, x, ei):
        value = expand[b, eo, y, x, ei] + (bias[eo * v + ei] if bias is not None else _f(0.0))
        inside = tirx.all(y >= ph, y < h + ph, x >= pw, x < w + pw)
        return tirx.Select(inside, act1(value, spec.activation_params), _f(0.0))

    band = te.compute(expand.shape, banded, name="band")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    dw = te.compute((n, e // v, oh, ow, v), lambda b, eo, y, x, ei: te.sum(
        band[b, eo, y * sh + ry, x * sw + rx, ei] * dw_weight[eo, ry, rx, ei], axis=[ry, rx]), name="dw")

    def store(b, eo, y, x, ei):
        value = dw[b, eo, y, x, ei] + (dw_bias[eo * v + ei] if dw_bias is not None else _f(0.0))
        return act2(value, spec.dw_activation_params)

    out = te.compute(dw.shape, store, name="out")
    return [t for t in (data, weight, bias, dw_weight, dw_bias, out) if t is not None]


def schedule_expand_depthwise(spec: ExpandDepthwiseSpec, func: tirx.PrimFunc, tile: Tile) -> tirx.PrimFunc:
    """Per task (parallel, bands outer): ``oc_block`` expanded channels x a band of ``rows`` output rows. The band
    buffer is filled register tile by register tile (``cols`` pixels x the channel vectors, reductions outside,
    pixels and vectors unrolled), then each output row is computed in register tiles of up to 8 pixels (taps
    outside, unrolled) and stored through the epilogue."""
    v = spec.block
    ow = spec.out_shape[3]
    sch = Schedule(func)
    out, dw, band, expand = (sch.get_sblock(name) for name in ("out", "dw", "band", "expand"))
    n, eo, y, x, ei = sch.get_loops(out)
    eo_outer, eo_inner = sch.split(eo, [None, tile.oc_block // v])
    y_outer, y_inner = sch.split(y, [None, tile.rows])
    x_outer, x_inner = sch.split(x, [None, largest_divisor(ow, 8)])
    # tasks by band before channel tile (``kernels.rows_first``: each core reads and writes its own rows; measured
    # on the 2-core Xeon, whole models in one process: mobilenet_v2 0.984x, efficientnet_b0 0.989x)
    sch.reorder(n, y_outer, eo_outer, y_inner, eo_inner, x_outer, x_inner, ei)
    sch.vectorize(ei)
    sch.compute_at(dw, x_outer, preserve_unit_loops=True)
    dw_loops = sch.get_loops(dw)
    *_, d_eo, d_y, d_x, d_ei, d_ry, d_rx = dw_loops
    sch.reorder(d_ry, d_rx, d_eo, d_y, d_x, d_ei)
    sch.vectorize(d_ei)
    for loop in (d_ry, d_rx, d_x):
        sch.unroll(loop)
    sch.set_scope(dw, 0, "local")
    rco, _ = fill_band(sch, band, expand, eo_outer, tile.cols, reductions=2)
    sch.parallel(sch.fuse(n, y_outer, eo_outer))
    sch.decompose_reduction(expand, rco)
    sch.decompose_reduction(dw, d_ry)
    return sch.mod["main"]


def expand_depthwise_kernel(spec: ExpandDepthwiseSpec, tile: Tile | None = None) -> tirx.PrimFunc:
    """The scheduled PrimFunc ``(data, weight[, bias], dw_weight[, dw_bias], out)`` for ``spec`` (CPU)."""
    tile = tile or default_tile(spec)
    func = te.create_prim_func(expand_depthwise_compute(spec, tile))
    func = schedule_expand_depthwise(spec, func, tile)
    return func.with_attrs({"tir.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})
