"""Integer conv2d / linear kernels for ``qconv2d`` and ``qlinear``: uint8 (or int8) x int8 -> int32 -> requantized
uint8 (or int8).

One TIR kernel serves both ops (a linear over rows ``x[M, K]`` is a 1x1 conv on ``(M, K, 1, 1)``). Stages:

    pad:  A[n, y, x, c] = data[n, c, y - ph, x - pw] inside, else z_x        # NHWC, C padded to a multiple of 4
    acc:  acc[n, oh, ow, oo, oi] = sum_{ry, rx, rco, rci} A[n, oh*sh + ry*dh, ow*sw + rx*dw, 4 rco + rci]
                                                          * W[oo, ry, rx, rco, oi, rci]          (int32)
    out:  out[n, o, oh, ow] = requantize(acc[n, oh, ow, o / 16, o % 16] + b'[o])                (uint8, NCHW)

The weight is packed at compile time to ``(OC/16, KH, KW, C/4, 16, 4)`` (zero padded): for one output pixel,
the 16 output channels x 4 input channels of one step are 64 contiguous bytes, exactly the operand of AVX-512
VNNI's ``vpdpbusd``, which adds four u8 x s8 products into each of 16 int32 lanes. Where C is not a multiple of
4 (an RGB stem), a kernel row's columns x channels are one packed reduction instead (``QConvSpec.packs_width``:
A is unpadded NHWC, a step reads 4 consecutive bytes of ``(rx, c)``), so no step multiplies padding channels.
Padding with ``z_x`` makes the kernel's plain sum ``sum x w`` equal ``sum (x - z_x) w + z_x sum w`` everywhere,
so the zero-point correction is a constant folded into the bias at compile time: ``b' = q_b - z_x sum q_w``.

Requantization is integer only: ``clamp(z_y + ((acc * M + 2^(shift-1)) >> shift), out_min, out_max)`` in int64
(``passes.ir.ops.requantize``), so the compiled result equals the torch reference bit for bit.

Schedule (CPU): per (n, oh) in parallel (per 16-channel block where there are few rows: ``loop_order``), tiles
of ``cols`` output columns x 16 channels held in ``cols`` int32 vector registers; the reduction loops (ry, rx,
rco) run outside the tile, the tile's inner 16 x 4 step is tensorized to ``vpdpbusd`` when the target has VNNI
(``vnni_intrinsic``), otherwise vectorized over the 16 lanes. The tile's requantization runs right after it, 16
channels at a time in vector registers (columns unrolled); with a fused residual (``fuse-qconv-add``) it runs
along the columns instead, where the residual's NCHW bytes are contiguous.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from tvm import te, tirx
from tvm.s_tir import Schedule
from tvm.script import tirx as T
from tvm.target.codegen import llvm_version_major

from backends.tvm.kernels import ceil_to, conv_output_shape, largest_divisor

LANES = 16  # output channels per weight block and per tensorized step (one AVX-512 or two AVX2 int32 registers)
DEPTH = 4   # bytes multiplied into each int32 lane per vpdpbusd = input channels per step
MAX_COLS = 8  # register tile: 8 accumulators + the weight block + broadcast input
VNNI_INTRINSIC = "passes_dot_16x4_u8i8i32_vpdpbusd"
AVX2_INTRINSIC = "passes_dot_16x2_i16i16i32_vpmaddwd"
# The integer dot-product instruction a kernel is built around: ``vpdpbusd`` (AVX-512 VNNI, 4 u8 x s8 per lane),
# ``vpmaddwd`` (AVX2, 2 s16 x s16 per lane, operands widened to int16 at packing time), ``generic`` (LLVM's
# widening multiply-add vectorized over the 16 lanes: any other CPU).
INSTRUCTIONS = ("vpdpbusd", "vpmaddwd", "generic")
AVX2_MAX_COLS = 6  # 6 columns x 2 ymm accumulators + 2 weight registers + 1 broadcast = 15 of AVX2's 16 registers
BYTE_OPERANDS = "int8x64" if llvm_version_major() >= 22 else "int32x16"  # the intrinsic's operand type


def vpdpbusd(acc, quad, weights):
    """``acc`` (int32x16) + per lane the dot product of 4 u8 (``quad``, a uint8x4 broadcast to every lane) and the
    lane's 4 s8 of ``weights`` (int8x64): AVX-512 VNNI's ``vpdpbusd``, callable inside TVMScript."""
    return T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), acc,
        T.reinterpret(T.broadcast(T.reinterpret(quad, dtype="int32"), LANES), dtype=BYTE_OPERANDS),
        T.reinterpret(weights, dtype=BYTE_OPERANDS), dtype="int32x16")


def _dot_desc(depth: int, a_dtype: str, b_dtype: str):
    """The semantics both integer intrinsics implement: ``C[0:16] += sum_{k < depth} A[k] * B[0:16, k]`` in int32."""

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((depth,), a_dtype, offset_factor=1), B: T.Buffer((16, depth), b_dtype, offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:depth], B[0:16, 0:depth])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, depth):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


@functools.cache
def vnni_intrinsic() -> str:
    """Register (once) and name the tensor intrinsic ``C[0:16] += sum_k A[k] * B[0:16, k]`` (u8 x s8 -> i32) as
    one ``vpdpbusd``.

    Ours rather than TVM's ``dot_16x4_vnni``: LLVM 22 declares the intrinsic's operands as <64 x i8> and rejects
    TVM's <16 x i32> call. Defined on first use, not at import: importing ``tvm.s_tir.tensor_intrin`` parses
    ~500 TVMScript functions (minutes under a deep call stack such as pytest's).
    """
    from tvm.s_tir import TensorIntrin

    @T.prim_func(s_tir=True)
    def implementation(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
                       C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = vpdpbusd(C.vload([0], dtype="int32x16"), A.vload([0], "uint8x4"),
                                                    B.vload([0, 0], dtype="int8x64"))

    TensorIntrin.register(VNNI_INTRINSIC, _dot_desc(4, "uint8", "int8"), implementation, override=True)
    return VNNI_INTRINSIC


def vpmaddwd(acc, pair, weights):
    """``acc`` (int32x8) + per lane ``pair[0] * weights[2i] + pair[1] * weights[2i+1]`` (s16 x s16 -> s32, exact:
    no saturation unless both products are (-32768)^2): AVX2's ``vpmaddwd`` then ``vpaddd``; ``pair`` (int16x2) is
    broadcast to every lane as one int32."""
    pairs = T.reinterpret(T.broadcast(T.reinterpret(pair, dtype="int32"), 8), dtype="int16x16")
    return acc + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, weights,
                                         dtype="int32x8")


@functools.cache
def avx2_intrinsic() -> str:
    """Register (once) and name the tensor intrinsic ``C[0:16] += sum_k A[k] * B[0:16, k]`` over k < 2 (int16
    operands, int32 sums) as two ``vpmaddwd`` (8 lanes each). Exact where ``vpmaddubsw`` (u8 x s8 -> saturating
    s16) is not: 255 x 127 x 2 = 64770 overflows int16."""
    from tvm.s_tir import TensorIntrin

    @T.prim_func(s_tir=True)
    def implementation(A: T.Buffer((2,), "int16", offset_factor=1), B: T.Buffer((16, 2), "int16", offset_factor=1),
                       C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 8)] = vpmaddwd(C.vload([0], dtype="int32x8"), A.vload([0], "int16x2"),
                                                   B.vload([0, 0], dtype="int16x16"))
            C[T.ramp(T.int32(8), 1, 8)] = vpmaddwd(C.vload([8], dtype="int32x8"), A.vload([0], "int16x2"),
                                                   B.vload([8, 0], dtype="int16x16"))

    TensorIntrin.register(AVX2_INTRINSIC, _dot_desc(2, "int16", "int16"), implementation, override=True)
    return AVX2_INTRINSIC


def instruction_for(target) -> str:
    """The integer dot product of a ``target.Target``: vpdpbusd with VNNI, vpmaddwd with AVX2, else generic."""
    return "vpdpbusd" if target.vnni else "vpmaddwd" if "avx2" in target.features else "generic"


@dataclass(frozen=True)
class QConvSpec:
    """Static description of one integer conv or linear (as a 1x1 conv on (M, K, 1, 1)). Grouped convs
    (``groups > 1``, ``groups_fit``) reduce each 16-channel output block over the input channels of its own
    groups only (``block_channels``, ``channel_base``)."""

    in_shape: tuple[int, int, int, int]      # N, C, H, W
    weight_shape: tuple[int, int, int, int]  # OC, C, KH, KW
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    input_zero_point: int
    output_zero_point: int
    out_min: int
    out_max: int
    in_dtype: str = "uint8"   # int8 inputs are shifted to uint8 while padding (x + 128, z_x + 128): same x - z_x
    instruction: str = "generic"  # INSTRUCTIONS: what the inner step is built around (``instruction_for``)
    out_dtype: str = "uint8"
    residual_zero_point: int | None = None  # a residual operand joins the requantization (None: no residual)
    residual_dtype: str = "uint8"
    wide_shift: bool = False  # every channel's shift >= 32: requantize in int32 after the product (requantize_expr)
    in_layout: str = "NCHW"  # NHWC between two of our kernels (``select.nhwc_values``): no transposes
    out_layout: str = "NCHW"
    residual_layout: str = "NCHW"
    groups: int = 1

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        """The logical (NCHW) output shape."""
        return conv_output_shape(self.in_shape, self.weight_shape, self.stride, self.padding, self.dilation)

    def physical(self, layout: str, shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """An NCHW shape as stored in ``layout``."""
        n, c, h, w = shape
        return (n, h, w, c) if layout == "NHWC" else (n, c, h, w)

    @property
    def depth(self) -> int:
        """Reduction elements per lane per step: 4 bytes for vpdpbusd (and the generic kernel), 2 int16 for
        vpmaddwd."""
        return 2 if self.instruction == "vpmaddwd" else DEPTH

    @property
    def operand_dtypes(self) -> tuple[str, str]:
        """(padded input, packed weight) element types: vpmaddwd multiplies int16, so both are widened once (the
        input while padding, the weight at compile time) rather than per step in the inner loop."""
        return ("int16", "int16") if self.instruction == "vpmaddwd" else ("uint8", "int8")

    @property
    def padded_channels(self) -> tuple[int, int]:
        """(input channels padded to ``depth``, output channels padded to LANES)."""
        return ceil_to(self.in_shape[1], self.depth), ceil_to(self.weight_shape[0], LANES)

    @property
    def block_channels(self) -> int:
        """Input channels one 16-channel output block reduces over: all C for groups = 1; for a grouped conv with
        C_g inputs and OC_g outputs per group, C_g when OC_g is a multiple of 16 (a block lies in one group), or
        (16 / OC_g) C_g when 16 / OC_g groups share a block (ResNeXt's 4-channel groups): their weights are packed
        block-diagonally, zeros between groups, so every block is one dense reduction (16 / OC_g times the MACs of
        the grouped conv, against a Relax grouped conv that is not vectorized at all)."""
        if self.groups == 1:
            return self.in_shape[1]
        return self.in_shape[1] // self.groups * max(1, LANES // (self.weight_shape[0] // self.groups))

    def channel_base(self, block):
        """The first input channel of output block ``block`` (an int or a TIR expression): block b holds output
        channels 16 b.., of group 16 b // OC_g, whose inputs start at channel (16 b // OC_g) C_g."""
        if self.groups == 1:
            return 0
        c_g, oc_g = self.in_shape[1] // self.groups, self.weight_shape[0] // self.groups
        return block * (LANES // oc_g) * c_g if oc_g < LANES else block // (oc_g // LANES) * c_g

    @property
    def packs_width(self) -> bool:
        """Whether the kernel's columns and input channels form one reduction axis (``rx * C + c``, padded to
        ``depth`` once per kernel row) instead of each column's channels being padded to ``depth``. Pays where C is
        not a multiple of ``depth``: ResNet's RGB stem (7x7, C = 3) takes 7 x 6 instead of 7 x 7 vpdpbusd steps per
        output pixel (7 x 11 instead of 7 x 14 vpmaddwd steps), a 1-channel 3x3 conv 3 x 1 instead of 3 x 3. Needs
        unit column dilation (the packed columns are adjacent in memory)."""
        c, kw, dw, depth = self.in_shape[1], self.weight_shape[3], self.dilation[1], self.depth
        return self.groups == 1 and dw == 1 and ceil_to(kw * c, depth) // depth < kw * (ceil_to(c, depth) // depth)

    @property
    def reduction(self) -> tuple[int, int, int]:
        """(pixel stride P of the padded NHWC rows, kernel columns reduced one by one, ``depth``-element steps per
        column): a reduction step of output block b reads elements ``(x*sw + rx*dw) * P + channel_base(b) +
        depth rco + [0, depth)`` of the padded row. A grouped conv's P leaves room for the last block's window."""
        c, kw = self.in_shape[1], self.weight_shape[3]
        if self.packs_width:
            return c, 1, ceil_to(kw * c, self.depth) // self.depth
        steps = ceil_to(self.block_channels, self.depth) // self.depth
        last_block = self.padded_channels[1] // LANES - 1
        return max(self.padded_channels[0], self.channel_base(last_block) + steps * self.depth), kw, steps

    @property
    def padded_row(self) -> int:
        """Bytes per padded input row: the padded image's width x P, or further where the last packed step
        reads past it (into bytes that meet zero weights)."""
        w, pw, sw = self.in_shape[3], self.padding[1], self.stride[1]
        pixel, cols, steps = self.reduction
        last_read = ((self.acc_width - 1) * sw + (cols - 1) * self.dilation[1]) * pixel + steps * self.depth
        return ceil_to(max((w + 2 * pw) * pixel, last_read), pixel)  # whole pixels: the pad loop splits by P

    def pack_weight(self, weight: np.ndarray) -> np.ndarray:
        """(OC, C, KH, KW) int8 -> (OCp/16, KH, cols, steps, 16, depth) (``reduction``), zero padded, as
        ``operand_dtypes[1]``: per step, 16 output channels x ``depth`` reduction elements (channels, or packed
        columns x channels) contiguous, in the order the inner step reads them."""
        oc, c, kh, kw = weight.shape
        ocp, depth, dtype = self.padded_channels[1], self.depth, self.operand_dtypes[1]
        _, cols, steps = self.reduction
        if self.packs_width:  # reduction element rx * C + c of kernel row ry
            flat = np.zeros((ocp, kh, steps * depth), dtype)
            flat[:oc, :, :kw * c] = weight.transpose(0, 2, 3, 1).reshape(oc, kh, kw * c)
            blocks = flat.reshape(ocp // LANES, LANES, kh, 1, steps, depth)
            return np.ascontiguousarray(blocks.transpose(0, 2, 3, 4, 1, 5))
        padded = np.zeros((ocp, steps * depth, kh, kw), dtype)
        if self.groups == 1:
            padded[:oc, :c] = weight
        oc_g = oc // self.groups
        for o in range(oc if self.groups > 1 else 0):  # each output's group, at its offset in its block's window
            start = o // oc_g * c - self.channel_base(o // LANES)
            padded[o, start:start + c] = weight[o]
        blocks = padded.reshape(ocp // LANES, LANES, steps, depth, kh, kw)
        return np.ascontiguousarray(blocks.transpose(0, 4, 5, 2, 1, 3))

    @property
    def padded_zero_point(self) -> int:
        """z_x of the uint8 padded input: int8 inputs are stored + 128 there (vpdpbusd reads unsigned bytes), which
        leaves every ``x - z_x`` unchanged."""
        return self.input_zero_point + (128 if self.in_dtype == "int8" else 0)

    def fold_bias(self, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """b' = q_b - z_x * sum_k q_w: the kernel sums x * w with x padded by z_x (see the module docstring)."""
        weight_sums = weight.reshape(weight.shape[0], -1).astype(np.int64).sum(axis=1)
        return (bias.astype(np.int64) - self.padded_zero_point * weight_sums).astype(np.int32)

    @property
    def uses_wide_shift(self) -> bool:
        """Requantize in int32 after the 64-bit product (``requantize_expr``): every shift >= 32, no residual."""
        return self.wide_shift and self.residual_zero_point is None

    def kernel_shift(self, shift: np.ndarray) -> np.ndarray:
        """The kernel's per-channel shift argument: ``s - 32`` when ``uses_wide_shift``, else ``s``."""
        return (shift - 32 if self.uses_wide_shift else shift).astype(np.int32)

    @property
    def cols(self) -> int:
        """Output columns per register tile. vpdpbusd: the largest divisor of the width up to 8 (one zmm
        accumulator each). vpmaddwd: up to 6 (two ymm accumulators each), the row padded to a multiple of it
        (``acc_width``), chosen by the cost of a row, tiles x (columns + 1) (the +1: each step's weight loads,
        shared by the tile's columns): ResNet's 7 wide rows take 2 tiles of 4, not 7 tiles of 1. A residual read
        along NCHW columns needs whole tiles (its epilogue vectorizes the columns)."""
        width = self.out_shape[3]
        if self.instruction != "vpmaddwd" or (self.residual_zero_point is not None
                                              and self.residual_layout == "NCHW"):
            return largest_divisor(width, MAX_COLS if self.instruction != "vpmaddwd" else AVX2_MAX_COLS)
        return min(range(min(width, AVX2_MAX_COLS), 0, -1), key=lambda c: -(-width // c) * (c + 1))

    @property
    def acc_width(self) -> int:
        """The accumulator's row width: the output width rounded up to whole tiles (the extra columns are computed
        from padding and never stored)."""
        return ceil_to(self.out_shape[3], self.cols)


def requantize_expr(acc, multiplier, shift, spec: QConvSpec, residual_term=None):
    """clamp(z_y + ((acc * M + 2^(shift-1) [+ (r - z_r) R]) >> shift), out_min, out_max) as the output dtype, in
    int64 arithmetic (``residual_term`` is the int64 ``(r - z_r) R``).

    With ``spec.wide_shift`` (every shift >= 32, no residual) only the product and rounding stay 64-bit: floor
    shifts compose, ``t >> s = (t >> 32) >> (s - 32)``, and ``|t| < 2^62`` (|acc| < 2^31, M < 2^31) makes
    ``t >> 32`` an int32 (|.| <= 2^30), so the shift, zero point and clamp run on 8 int32 lanes per AVX2 register
    instead of emulated 4-lane int64 shifts and min/max (AVX2 has neither); bit for bit the same result. The
    kernel's ``shift`` argument is then ``s - 32`` (``kernel_shift``): TVM's bound analysis folded ``x >> (s - 32)``
    with a clamp to a constant."""
    shift64 = shift.astype("int64")
    if spec.uses_wide_shift:
        rounding = tirx.const(1, "int64") << (shift64 + tirx.const(31, "int64"))
        total = acc.astype("int64") * multiplier.astype("int64") + rounding
        scaled = (total >> tirx.const(32, "int64")).astype("int32") >> shift
        clamped = tirx.max(tirx.min(scaled + tirx.const(spec.output_zero_point, "int32"),
                                    tirx.const(spec.out_max, "int32")), tirx.const(spec.out_min, "int32"))
        return clamped.astype(spec.out_dtype)
    rounding = tirx.const(1, "int64") << (shift64 - tirx.const(1, "int64"))
    total = acc.astype("int64") * multiplier.astype("int64") + rounding
    scaled = (total if residual_term is None else total + residual_term) >> shift64
    clamped = tirx.max(tirx.min(scaled + tirx.const(spec.output_zero_point, "int64"),
                                tirx.const(spec.out_max, "int64")), tirx.const(spec.out_min, "int64"))
    return clamped.astype(spec.out_dtype)


def requantize_stage(spec: QConvSpec, output) -> te.Tensor:
    """The output stage ``output(b, o, y, x)`` (logical NCHW indices), stored in ``spec.out_layout``."""
    if spec.out_layout == "NHWC":
        return te.compute(spec.physical("NHWC", spec.out_shape), lambda b, y, x, o: output(b, o, y, x),
                          name="requantize")
    return te.compute(spec.out_shape, output, name="requantize")


def qconv_compute(spec: QConvSpec) -> list[te.Tensor]:
    """TE stages; the PrimFunc arguments are [data, packed weight, folded bias, multiplier, shift, (residual,
    residual multiplier,) out]."""
    n, c, h, w = spec.in_shape
    oc, _, kh, _ = spec.weight_shape
    (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    ocp = spec.padded_channels[1]
    pixel, cols, steps = spec.reduction
    _, _, oh, ow = spec.out_shape
    data = te.placeholder(spec.physical(spec.in_layout, spec.in_shape), spec.in_dtype, name="data")

    def read(tensor, layout, b, ch, y, x):
        return tensor[b, y, x, ch] if layout == "NHWC" else tensor[b, ch, y, x]

    depth, (operand, weight_dtype) = spec.depth, spec.operand_dtypes
    weight = te.placeholder((ocp // LANES, kh, cols, steps, LANES, depth), weight_dtype, name="weight")
    bias = te.placeholder((oc,), "int32", name="bias")
    multiplier = te.placeholder((oc,), "int32", name="multiplier")
    shift = te.placeholder((oc,), "int32", name="shift")
    zero = tirx.const(spec.padded_zero_point, operand)

    def padded_value(b, y, i):  # element i of padded row y: pixel i // P, channel i % P
        px, ch = i // pixel, i % pixel
        inside = tirx.all(y >= ph, y < h + ph, px >= pw, px < w + pw, ch < c)
        value = read(data, spec.in_layout, b, tirx.min(ch, c - 1), tirx.max(tirx.min(y - ph, h - 1), 0),
                     tirx.max(tirx.min(px - pw, w - 1), 0))
        if spec.in_dtype == "int8":  # to uint8 by flipping the sign bit: x + 128
            value = (value.astype("int32") + 128).astype("uint8")
        return tirx.if_then_else(inside, value.astype(operand), zero)

    padded = te.compute((n, h + 2 * ph, spec.padded_row), padded_value, name="pad")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, cols), "rx")
    rco = te.reduce_axis((0, steps), "rco")
    rci = te.reduce_axis((0, depth), "rci")
    acc = te.compute(
        (n, oh, spec.acc_width, ocp // LANES, LANES),
        lambda b, y, x, oo, oi: te.sum(
            padded[b, y * sh + ry * dh, (x * sw + rx * dw) * pixel + spec.channel_base(oo) + rco * depth + rci]
            .astype("int32")
            * weight[oo, ry, rx, rco, oi, rci].astype("int32"), axis=[ry, rx, rco, rci]), name="acc")
    inputs = [data, weight, bias, multiplier, shift]
    residual_of = None
    if spec.residual_zero_point is not None:  # fused residual add: (r - z_r) * R joins the rounding
        residual = te.placeholder(spec.physical(spec.residual_layout, spec.out_shape), spec.residual_dtype,
                                  name="residual")
        residual_multiplier = te.placeholder((oc,), "int64", name="residual_multiplier")
        inputs += [residual, residual_multiplier]
        residual_zero = tirx.const(spec.residual_zero_point, "int64")

        def residual_of(b, o, y, x):
            return (read(residual, spec.residual_layout, b, o, y, x).astype("int64") - residual_zero) \
                * residual_multiplier[o]

    def output(b, o, y, x):
        return requantize_expr(acc[b, y, x, o // LANES, o % LANES] + bias[o], multiplier[o], shift[o], spec,
                               None if residual_of is None else residual_of(b, o, y, x))

    out = requantize_stage(spec, output)
    return [*inputs, out]


def groups_fit(channels: int, out_channels: int, groups: int) -> bool:
    """Whether ``qconv_kernel`` takes a conv with ``groups``: 1, or output channels per group a multiple or a
    divisor of 16 (``QConvSpec.block_channels``)."""
    per_group = out_channels // groups
    return groups == 1 or (channels % groups == 0 and (per_group % LANES == 0 or LANES % per_group == 0))


def loop_order(spec: QConvSpec, cores: int) -> str:
    """``rows``: (n, output row) in parallel, every 16-channel weight block streamed once per row; ``channels``
    (weight-stationary): 16-channel blocks in parallel, each block reused for every output pixel. Rows unless
    there are fewer than 4 output rows per core (ResNet's 7x7 stage): rows balance badly there (7 rows on 2
    cores) and the weights (up to 2.4 MB for 512 x 512 x 3 x 3) no longer stay in cache from row to row."""
    return "channels" if spec.out_shape[0] * spec.out_shape[2] < 4 * cores else "rows"


def qconv_kernel(spec: QConvSpec, cores: int = 1, order: str | None = None) -> tirx.PrimFunc:
    """The scheduled kernel; ``order`` as in ``loop_order`` (its choice when None)."""
    order = order or loop_order(spec, cores)
    sch = Schedule(te.create_prim_func(qconv_compute(spec)))
    acc = sch.get_sblock("acc")
    b, y, x, oo, oi, ry, rx, rco, rci = sch.get_loops(acc)
    x_outer, x_inner = sch.split(x, [None, spec.cols])
    tensorized = spec.instruction != "generic"
    inner = (oi, rci) if tensorized else (rci, oi)  # the tensorized 16 lanes x depth step
    if order == "channels":  # weight-stationary: one 16-channel weight block stays in cache for every pixel
        sch.reorder(oo, b, y, x_outer, ry, rx, rco, x_inner, *inner)
        outer, tile = (oo, b), x_outer
    else:
        sch.reorder(b, y, x_outer, oo, ry, rx, rco, x_inner, *inner)
        outer, tile = (b, y), oo
    if not tensorized:  # one widening multiply-add per reduction byte, vectorized over the 16 lanes
        sch.vectorize(oi)
    requantize = sch.get_sblock("requantize")
    sch.reverse_compute_at(requantize, tile)
    epilogue = sch.get_loops(requantize)[4:]  # the loops under ``tile``, the 4th loop in either order
    if len(epilogue) == 2 and spec.weight_shape[0] % LANES == 0:
        channel, column = epilogue if spec.out_layout == "NCHW" else epilogue[::-1]
        if spec.residual_zero_point is not None and spec.residual_layout == "NCHW":
            sch.reorder(channel, column)  # along the columns: an NCHW residual's bytes are contiguous there;
            sch.unroll(channel)           # across channels they would be a 16-byte gather (+20% time)
            sch.vectorize(column)
        else:  # 16 channels x cols: vectorize the channels (per-channel multiplier and shift as vectors)
            sch.reorder(column, channel)
            sch.vectorize(channel)
            sch.unroll(column)
    sch.unroll(x_inner)
    pad_loops = sch.get_loops(sch.get_sblock("pad"))
    _, channel = sch.split(pad_loops[-1], [None, spec.reduction[0]])  # (pixel, channel): i // P, i % P simplify
    sch.unroll(channel) if spec.packs_width else sch.vectorize(channel)
    if cores > 1:
        sch.parallel(sch.fuse(*outer))
        sch.parallel(sch.fuse(*pad_loops[:2]))
    # decompose and tensorize last (loop primitives need the reduction block whole), then move the accumulator
    # to registers (the intrinsic declares its operands in global scope, so not before tensorize)
    init = sch.decompose_reduction(acc, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    if tensorized:
        sch.tensorize(oi, vnni_intrinsic() if spec.instruction == "vpdpbusd" else avx2_intrinsic())
    sch.set_scope(init, 0, "local")
    return sch.mod["main"].with_attrs({"tir.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})


def depthwise_compute(spec: QConvSpec) -> list[te.Tensor]:
    """Depthwise (groups = C = OC) integer conv, NHWC inside: ``acc[n, y, x, c] = sum_{ry, rx} A[n, y*sh + ry*dh,
    x*sw + rx*dw, c] W[ry, rx, c]`` (int32) with A the padded uint8 input (int8 shifted by 128, padding z_x, as in
    ``qconv_compute``), then the same requantization with the folded bias ``q_b - z_x sum W``. No reduction over
    channels, so nothing for ``vpdpbusd``: the kernel is a widening multiply-add vectorized over channels (depthwise
    layers are memory-bound: a few MACs per byte). PrimFunc arguments: [data, weight (KH, KW, C) int8, folded bias,
    multiplier, shift, out]."""
    n, c, h, w = spec.in_shape
    _, _, kh, kw = spec.weight_shape
    (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    _, _, oh, ow = spec.out_shape
    data = te.placeholder(spec.physical(spec.in_layout, spec.in_shape), spec.in_dtype, name="data")
    weight = te.placeholder((kh, kw, c), "int8", name="weight")
    bias, multiplier, shift = (te.placeholder((c,), "int32", name=name) for name in ("bias", "multiplier", "shift"))
    zero = tirx.const(spec.padded_zero_point, "uint8")

    def padded_value(b, y, x, ch):
        inside = tirx.all(y >= ph, y < h + ph, x >= pw, x < w + pw)
        yy, xx = tirx.max(tirx.min(y - ph, h - 1), 0), tirx.max(tirx.min(x - pw, w - 1), 0)
        value = data[b, yy, xx, ch] if spec.in_layout == "NHWC" else data[b, ch, yy, xx]
        if spec.in_dtype == "int8":
            value = (value.astype("int32") + 128).astype("uint8")
        return tirx.if_then_else(inside, value, zero)

    padded = te.compute((n, h + 2 * ph, w + 2 * pw, c), padded_value, name="pad")
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    acc = te.compute((n, oh, ow, c), lambda b, y, x, ch: te.sum(
        padded[b, y * sh + ry * dh, x * sw + rx * dw, ch].astype("int32") * weight[ry, rx, ch].astype("int32"),
        axis=[ry, rx]), name="acc")

    def output(b, o, y, x):
        return requantize_expr(acc[b, y, x, o] + bias[o], multiplier[o], shift[o], spec)

    out = requantize_stage(spec, output)
    return [data, weight, bias, multiplier, shift, out]


def pack_depthwise_weight(weight: np.ndarray) -> np.ndarray:
    """(C, 1, KH, KW) int8 -> (KH, KW, C): one tap's weights for consecutive channels are one vector."""
    return np.ascontiguousarray(weight[:, 0].transpose(1, 2, 0))


def depthwise_kernel(spec: QConvSpec, cores: int = 1) -> tirx.PrimFunc:
    """Per (n, output row) in parallel; tiles of up to 8 output columns x ``lanes`` channels of int32 accumulators
    in registers, the KH x KW taps outside the tile; requantization right after each tile."""
    c, cols = spec.in_shape[1], spec.cols
    lanes = max(d for d in (16, 8, 4, 2, 1) if c % d == 0)
    sch = Schedule(te.create_prim_func(depthwise_compute(spec)))
    acc = sch.get_sblock("acc")
    b, y, x, ch, ry, rx = sch.get_loops(acc)
    x_outer, x_inner = sch.split(x, [None, cols])
    c_outer, c_inner = sch.split(ch, [None, lanes])
    sch.reorder(b, y, x_outer, c_outer, ry, rx, x_inner, c_inner)
    sch.vectorize(c_inner)
    sch.unroll(x_inner)
    requantize = sch.get_sblock("requantize")
    sch.reverse_compute_at(requantize, c_outer)
    epilogue = sch.get_loops(requantize)[4:]  # channel and column loops; TVM drops a unit one (lanes or cols 1)
    if len(epilogue) == 2:
        channel, column = epilogue if spec.out_layout == "NCHW" else epilogue[::-1]
        sch.reorder(column, channel)
        sch.vectorize(channel)
        sch.unroll(column)
    elif epilogue:  # one loop left: the columns when no channel count but 1 divides C (odd C), else the channels
        (sch.unroll if lanes == 1 else sch.vectorize)(epilogue[0])
    pad_loops = sch.get_loops(sch.get_sblock("pad"))
    sch.vectorize(pad_loops[-1])
    if cores > 1:
        sch.parallel(sch.fuse(b, y))
        sch.parallel(sch.fuse(*pad_loops[:2]))
    init = sch.decompose_reduction(acc, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.set_scope(init, 0, "local")
    return sch.mod["main"].with_attrs({"tir.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})


def integer_max_pool2d_kernel(in_shape: tuple[int, int, int, int], out_shape: tuple[int, int, int, int],
                              dtype: str, kernel: tuple[int, int], stride: tuple[int, int],
                              padding: tuple[int, int], dilation: tuple[int, int], cores: int = 1) -> tirx.PrimFunc:
    """Max pool on 8-bit integers (NCHW) as two separable passes per output row, vectorized:

        rows[x]     = max_ky  in[oh*sh + ky*dh - ph, x - pw]        (contiguous in x)
        out[oh, ow] = max_kx  rows[ow*sw + kx*dw]

    Padding (and ``ceil_mode``'s overhang, already in ``out_shape``) reads the dtype's minimum, which never wins
    (every window holds at least one real element). Why ours: TVM's max pool on uint8 scalarizes under LLVM, and
    the exact detour through float (cast, pool, cast) costs two full passes over the tensor; this is ~20x faster
    than that detour on ResNet's stem pool (64 x 112 x 112)."""
    n, c, h, w = in_shape
    oh, ow = out_shape[2:]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    lowest = tirx.const(int(np.iinfo(dtype).min), dtype)
    row_width = (ow - 1) * sw + (kw - 1) * dw + 1
    data = te.placeholder(in_shape, dtype, name="data")

    def at(b, ch, y, x):
        inside = tirx.all(y >= 0, y < h, x >= 0, x < w)
        return tirx.if_then_else(inside, data[b, ch, tirx.max(tirx.min(y, h - 1), 0),
                                              tirx.max(tirx.min(x, w - 1), 0)], lowest)

    def maximum(terms):
        return functools.reduce(tirx.max, terms)

    rows = te.compute((n, c, oh, row_width), lambda b, ch, y, x: maximum(
        [at(b, ch, y * sh + ky * dh - ph, x - pw) for ky in range(kh)]), name="rows")
    out = te.compute(out_shape, lambda b, ch, y, x: maximum(
        [rows[b, ch, y, x * sw + kx * dw] for kx in range(kw)]), name="pool")
    sch = Schedule(te.create_prim_func([data, out]))
    pool = sch.get_sblock("pool")
    b, ch, y, x = sch.get_loops(pool)
    row_block = sch.get_sblock("rows")
    sch.compute_at(row_block, y)
    sch.vectorize(sch.get_loops(row_block)[-1])
    sch.vectorize(x)
    if cores > 1:
        sch.parallel(sch.fuse(b, ch))
    return sch.mod["main"].with_attrs({"tir.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})
