"""ONNX frontend: an ``.onnx`` file (untrusted input) -> verified IR.

Safety first: the file is size-checked and parsed without external data; external-data locations must be relative
paths that stay inside the model's folder (the CVE-2022-25882 family is refused) and their sizes must match the
declared dims; every initializer's dims are bounded before any array is built; the graph is topologically sorted
by us (cycles, undefined tensors and doubly-produced tensors are errors, naming the node). Every unsupported op
is collected and reported in one error.

Conversion: initializers and ``Constant`` outputs are numpy constants; any node whose inputs are all constants
(shape arithmetic: Shape, Gather, Concat, Unsqueeze...) is evaluated at import by ONNX's reference evaluator, so
static shapes fold away. The remaining nodes map onto IR ops with torch semantics; where ONNX differs (gate order
of LSTM/GRU weights, asymmetric pads, HardSigmoid's alpha, opset<13 Softmax), the handler converts explicitly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from frontend.errors import FrontendError, UnsupportedConstruct, UnsupportedModelError
from passes.ir.graph import OUTPUT_NAMES, Graph, IRError, TensorType, Value
from passes.ir.verify import verify

MIN_OPSET = 9
MAX_FILE_BYTES = 4 << 30
MAX_TENSOR_BYTES = 2 << 30
MAX_FOLD_ELEMENTS = 1 << 22  # inputs of one folded node
MAX_FOLD_OUTPUT_ELEMENTS = MAX_TENSOR_BYTES // 8  # what ConstantOfShape/Expand/Tile/Range may create: an initializer's
                                                 # limit (the light model zoo builds VGG's 100M-weight layer this way)

DTYPES = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64", TensorProto.INT32: "int32",
          TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.BOOL: "bool",
          TensorProto.DOUBLE: "float64", TensorProto.FLOAT16: "float16"}


# ------------------------------------------------------------------------------------------------ loading
def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse ``path`` safely; every failure is a ``FrontendError`` naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise FrontendError(f"model file '{path}' does not exist")
    if path.is_dir():
        raise FrontendError(f"model path '{path}' is a folder; give an .onnx file")
    size = path.stat().st_size
    if size == 0:
        raise FrontendError(f"model file '{path}' is empty")
    if size > MAX_FILE_BYTES:
        raise FrontendError(f"model file '{path}' is {size} bytes, over the {MAX_FILE_BYTES}-byte limit")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: the file is not an ONNX model
        raise FrontendError(f"'{path}' is not a valid ONNX model (truncated or not protobuf): "
                            f"{type(exc).__name__}") from None
    if not model.HasField("graph") or not model.graph.node and not model.graph.output:
        raise FrontendError(f"'{path}' holds no ONNX graph")
    _load_external_data(model, path.parent)
    return model


def _load_external_data(model: onnx.ModelProto, base: Path) -> None:
    base = base.resolve()
    for tensor in _all_initializers(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f"initializer '{tensor.name}'"
        if not location or os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
            raise FrontendError(f"{where}: external data location {location!r} must be a relative path inside "
                                "the model's folder")
        target = (base / location).resolve()
        if base not in target.parents and target != base:
            raise FrontendError(f"{where}: external data location {location!r} escapes the model's folder")
        if not target.is_file():
            raise FrontendError(f"{where}: external data file {location!r} not found next to the model")
        expected = _expected_bytes(tensor, where)
        offset, length = int(info.get("offset", 0)), int(info.get("length", expected))
        if length != expected or offset < 0 or offset + length > target.stat().st_size:
            raise FrontendError(f"{where}: external data ({length} bytes at offset {offset}) does not match its "
                                f"dims {list(tensor.dims)} ({expected} bytes)")
        with open(target, "rb") as f:
            f.seek(offset)
            tensor.raw_data = f.read(length)
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def _expected_bytes(tensor: TensorProto, where: str) -> int:
    if any(d < 0 for d in tensor.dims):
        raise FrontendError(f"{where}: negative dims {list(tensor.dims)}")
    dtype = DTYPES.get(tensor.data_type)
    if dtype is None:
        raise FrontendError(f"{where}: unsupported data type {TensorProto.DataType.Name(tensor.data_type)}")
    count = math.prod(tensor.dims)
    nbytes = count * np.dtype(dtype if dtype != "bool" else "bool").itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise FrontendError(f"{where}: dims {list(tensor.dims)} would need {nbytes} bytes (limit "
                            f"{MAX_TENSOR_BYTES}); refusing to allocate")
    return nbytes


def tensor_to_numpy(tensor: TensorProto, where: str) -> np.ndarray:
    """Validate sizes before numpy builds anything: data that does not match its dims is an error."""
    nbytes = _expected_bytes(tensor, where)
    count = math.prod(tensor.dims)
    if tensor.HasField("raw_data"):
        if len(tensor.raw_data) != nbytes:
            raise FrontendError(f"{where}: holds {len(tensor.raw_data)} bytes of data but its dims "
                                f"{list(tensor.dims)} need {nbytes}")
    else:
        fields = [tensor.float_data, tensor.int64_data, tensor.int32_data, tensor.double_data]
        stored = max(len(f) for f in fields)
        if stored != count and not (tensor.data_type in (TensorProto.FLOAT16,) and len(tensor.int32_data) == count):
            raise FrontendError(f"{where}: holds {stored} values but its dims {list(tensor.dims)} need {count}")
    try:
        return np.array(numpy_helper.to_array(tensor))
    except Exception as exc:
        raise FrontendError(f"{where}: cannot decode tensor data: {exc}") from None


# ------------------------------------------------------------------------------------------------ converter
class _Converter:
    def __init__(self, model: onnx.ModelProto, name: str, input_shapes: dict[str, tuple[int, ...]] | None = None):
        self.model = model
        self.input_shapes = dict(input_shapes or {})
        self.graph = Graph(name=name)
        self.opset = _default_opset(model)
        self.env: dict[str, Value | np.ndarray] = {}
        self.unsupported: list[str] = []
        self.node: onnx.NodeProto | None = None

    # -------------------------------------------------------------------------------- helpers
    @property
    def where(self) -> str:
        return f"node '{self.node.name or self.node.output[0]}' ({self.node.op_type})"

    def origin(self) -> tuple[str, ...]:
        return (self.node.name or self.node.output[0],)

    def emit(self, op: str, operands: list, attrs: dict | None = None, params: dict | None = None):
        values = [self.value(x) for x in operands]
        params = {k: np.asarray(v) if np.asarray(v).dtype in (np.float64, np.float32) or np.asarray(v).dtype.kind != "f"
                  else np.asarray(v, np.float32) for k, v in (params or {}).items() if v is not None}
        return self.graph.add_op(op, values, attrs=attrs or {}, params=params, origin=self.origin(),
                                 name=_safe_name(self.node.name or self.node.output[0]))

    def value(self, x) -> Value:
        if isinstance(x, Value):
            return x
        array = np.asarray(x)
        return self.graph.add_op("constant", [], params={"value": array}, origin=self.origin(), name="const")

    def shape(self, x) -> tuple[int, ...]:
        return self.graph.value_type(x).shape if isinstance(x, Value) else tuple(np.shape(x))

    def const(self, x, what: str) -> np.ndarray:
        if isinstance(x, Value):
            raise UnsupportedConstruct(f"{what} must be a constant (an initializer or computable at import)")
        return np.asarray(x)

    def attr(self, name: str, default: Any = None) -> Any:
        for a in self.node.attribute:
            if a.name == name:
                value = helper.get_attribute_value(a)
                return value.decode() if isinstance(value, bytes) else value
        return default

    # -------------------------------------------------------------------------------- walk
    def run(self) -> Graph:
        g = self.model.graph
        initializers = {}
        for tensor in g.initializer:
            initializers[tensor.name] = tensor_to_numpy(tensor, f"initializer '{tensor.name}'")
        self.env.update(initializers)
        inputs = [inp for inp in g.input if inp.name not in initializers]  # others: constants (ONNX < IR 4 style)
        unknown = sorted(set(self.input_shapes) - {inp.name for inp in inputs})
        if unknown:
            raise FrontendError(f"input_shapes names {', '.join(map(repr, unknown))}, but the model's inputs are "
                                f"{[inp.name for inp in inputs]}")
        for inp in inputs:
            kind = _input_type(inp, self.input_shapes.get(inp.name))
            self.env[inp.name] = self.graph.add_input(_safe_name(inp.name), kind, origin=(inp.name,))
        for node in _topological(g):
            self.node = node
            self.convert(node)
        if self.unsupported:
            raise UnsupportedModelError(self.graph.name, self.unsupported)
        outputs = []
        for out in g.output:
            if out.name not in self.env:
                raise FrontendError(f"graph output '{out.name}' is not produced by any node")
            value = self.value(self.env[out.name])
            if value in outputs or self.graph.nodes[value.node]["op"] in ("input", "constant"):
                value = self.graph.add_op("identity", [value], origin=(out.name,), name=_safe_name(out.name))
            # the model's output names, kept for the compiled signature (npz keys of `passes.cli run`)
            names = self.graph.nodes[value.node]["meta"].setdefault(OUTPUT_NAMES, {})
            names[str(value.index)] = out.name
            outputs.append(value)
        if not outputs:
            raise FrontendError("the graph has no outputs")
        self.graph.set_outputs(outputs[0] if len(outputs) == 1 else tuple(outputs))
        return verify(self.graph)

    def convert(self, node: onnx.NodeProto) -> None:
        if node.domain not in ("", "ai.onnx"):
            self.unsupported.append(f"{node.domain}::{node.op_type} (node '{node.name}')")
            self._mark_unknown(node)
            return
        handler = HANDLERS.get(node.op_type)
        if handler is None:
            self.unsupported.append(f"{node.op_type} (node '{node.name or node.output[0]}')")
            self._mark_unknown(node)
            return
        inputs = [self.env.get(name) if name else None for name in node.input]
        if any(name and name not in self.env for name in node.input):  # downstream of an unsupported node
            self._mark_unknown(node)
            return
        live = [x for x in inputs if x is not None]
        try:
            if live and all(not isinstance(x, Value) for x in live) and node.op_type not in NO_FOLD:
                try:
                    results = self.fold(node, inputs)
                except (FrontendError, UnsupportedConstruct):
                    raise
                except Exception as exc:  # the reference evaluator refused the node's constant inputs
                    raise FrontendError(f"{self.where}: invalid constant inputs: {str(exc).splitlines()[0]}") from None
            else:
                results = handler(self, inputs)
        except UnsupportedConstruct as exc:
            self.unsupported.append(f"{node.op_type}: {exc} (node '{node.name or node.output[0]}')")
            self._mark_unknown(node)
            return
        except FrontendError:
            raise
        except (IRError, ValueError, IndexError, KeyError, TypeError) as exc:
            raise FrontendError(f"{self.where}: {exc}") from None
        results = results if isinstance(results, (tuple, list)) else (results,)
        for name, result in zip(node.output, results):
            if name:
                self.env[name] = result

    def _mark_unknown(self, node: onnx.NodeProto) -> None:
        for name in node.output:  # users of an unsupported node are still scanned for support, not converted
            self.env.pop(name, None)

    def fold(self, node: onnx.NodeProto, inputs: list) -> list[np.ndarray]:
        """Evaluate a node whose inputs are all constants with ONNX's reference implementation."""
        from onnx.reference import ReferenceEvaluator

        if sum(np.asarray(x).size for x in inputs if x is not None) > MAX_FOLD_ELEMENTS:
            raise UnsupportedConstruct("constant folding of a very large tensor")
        self._check_fold_output_size(node, inputs)
        names = [n if n else "" for n in node.input]
        values = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.asarray(x).dtype),
                                                np.shape(x)) for n, x in zip(names, inputs) if n]
        outs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in node.output if n]
        graph = helper.make_graph([node], "fold", values, outs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        feeds = {n: np.asarray(x) for n, x in zip(names, inputs) if n}
        return [np.asarray(r) for r in ReferenceEvaluator(model).run(None, feeds)]

    def _check_fold_output_size(self, node: onnx.NodeProto, inputs: list) -> None:
        """Ops whose output size is data-dependent must not allocate absurd tensors while folding."""
        size = None
        if node.op_type in ("ConstantOfShape", "Expand") and len(inputs) >= 1:
            shape = np.asarray(inputs[0 if node.op_type == "ConstantOfShape" else 1]).reshape(-1)
            size = math.prod(int(max(d, 1)) for d in shape.tolist())
        elif node.op_type == "Tile" and len(inputs) == 2:
            size = np.asarray(inputs[0]).size * math.prod(int(max(r, 1)) for r in np.asarray(inputs[1]).tolist())
        elif node.op_type == "Range" and len(inputs) == 3:
            start, limit, delta = (float(np.asarray(v)) for v in inputs)
            size = math.ceil((limit - start) / delta) if delta else math.inf
        if size is not None and size > MAX_FOLD_OUTPUT_ELEMENTS:
            raise FrontendError(f"{self.where}: would create a tensor of {size} elements; refusing to allocate")


def _default_opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise FrontendError("the model imports no ONNX opset")
    version = versions[0]
    newest = onnx.defs.onnx_opset_version()
    if version < MIN_OPSET or version > newest:
        raise FrontendError(f"opset {version} is not supported (supported: {MIN_OPSET}..{newest}); convert the "
                            "model with onnx.version_converter")
    return version


def _input_type(inp: onnx.ValueInfoProto, override: tuple[int, ...] | None = None) -> TensorType:
    """The input's static type; ``override`` (from ``input_shapes``) replaces its declared dims, as onnxsim's
    ``--overwrite-input-shape`` does: the only way to import a model exported with dynamic (symbolic) dims."""
    t = inp.type.tensor_type
    dtype = DTYPES.get(t.elem_type)
    if dtype is None:
        raise FrontendError(f"input '{inp.name}': unsupported element type "
                            f"{TensorProto.DataType.Name(t.elem_type) if t.elem_type else 'none'}")
    declared = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                for d in t.shape.dim] if t.HasField("shape") else None
    if override is not None:
        dims = list(override)
        if declared is not None and len(dims) != len(declared):
            raise FrontendError(f"input '{inp.name}' has rank {len(declared)} (dims {_dims_text(declared)}), but "
                                f"input_shapes gives {len(dims)} dims {_dims_text(dims)}")
        if any(not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d <= 0 for d in dims):
            raise FrontendError(f"input_shapes['{inp.name}'] = {tuple(override)}: dims must be positive integers")
    elif declared is None:
        raise FrontendError(f"input '{inp.name}': no shape; give one with {_shape_hint(inp.name, None)}")
    elif any(isinstance(d, str) for d in declared):
        dynamic = ", ".join(f"dim {i} is {d!r}" for i, d in enumerate(declared) if isinstance(d, str))
        raise FrontendError(f"input '{inp.name}' has dynamic dims {_dims_text(declared)} ({dynamic}); give it a "
                            f"static shape with {_shape_hint(inp.name, declared)}")
    else:
        dims = declared
    for i, d in enumerate(dims):
        if d > 1 << 24:
            raise FrontendError(f"input '{inp.name}': dim {i} = {d} is absurdly large")
    if math.prod(dims) * 4 > MAX_TENSOR_BYTES:
        raise FrontendError(f"input '{inp.name}': shape {dims} is too large")
    return TensorType(tuple(int(d) for d in dims), dtype)


def _dims_text(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _shape_hint(name: str, declared: list | None) -> str:
    """How to give ``name`` a static shape, in both doors: symbolic dims stay as their names (to fill in), except a
    dynamic leading (batch) dim, shown as 1."""
    dims = [1 if i == 0 and isinstance(d, str) else d for i, d in enumerate(declared)] if declared else ["d0", "d1",
                                                                                                        "..."]
    return (f"optimize(path, input_shapes={{'{name}': ({', '.join(map(str, dims))}{',' if len(dims) == 1 else ''})}}) "
            f"or `python -m passes.cli compile ... --input-shape {name}:{'x'.join(map(str, dims))}`")


def _topological(g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes in dependency order; errors for undefined tensors, tensors produced twice, and cycles."""
    available = {t.name for t in g.initializer} | {i.name for i in g.input}
    producer: dict[str, int] = {}
    for index, node in enumerate(g.node):
        for name in node.output:
            if not name:
                continue
            if name in producer or name in available:
                raise FrontendError(f"tensor '{name}' is produced twice (node '{node.name}')")
            producer[name] = index
    for node in g.node:
        for name in node.input:
            if name and name not in producer and name not in available:
                raise FrontendError(f"node '{node.name or node.op_type}' reads undefined tensor '{name}'")
    # Edges from each node to the producers of its inputs, in input order: the depth-first post-order from node 0
    # upwards then lists every producer before its users and otherwise keeps the file's order.
    deps = nx.DiGraph()
    deps.add_nodes_from(range(len(g.node)))
    deps.add_edges_from((index, producer[name]) for index, node in enumerate(g.node) for name in node.input
                        if name in producer)
    try:
        cycle = nx.find_cycle(deps)
    except nx.NetworkXNoCycle:
        return [g.node[index] for index in nx.dfs_postorder_nodes(deps)]
    node = g.node[cycle[0][0]]
    raise FrontendError(f"the graph has a cycle through node '{node.name or node.output[0]}'")


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "node"


# ------------------------------------------------------------------------------------------------ handlers
Handler = Callable[[_Converter, list], Any]
HANDLERS: dict[str, Handler] = {}
NO_FOLD = {"LSTM", "GRU", "RNN", "Dropout", "DequantizeLinear"}  # DequantizeLinear: see _dequantize_linear


def handles(*names: str):
    def register(fn: Handler) -> Handler:
        for name in names:
            HANDLERS[name] = fn
        return fn
    return register


def _spatial_pads(cv: _Converter, nd: int, kernel, strides, dilations, in_spatial) -> list[tuple[int, int]]:
    auto = cv.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for n, k, s, d in zip(in_spatial, kernel, strides, dilations):
            out = -(-n // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return pads
    if auto == "VALID":
        return [(0, 0)] * nd
    flat = list(cv.attr("pads", [0] * (2 * nd)))
    return [(flat[i], flat[i + nd]) for i in range(nd)]


def _pad_first(cv: _Converter, x, pads: list[tuple[int, int]], value: float = 0.0):
    """Asymmetric padding as an explicit ``pad`` op; returns (x, symmetric per-dim padding)."""
    if all(lo == hi for lo, hi in pads):
        return x, tuple(lo for lo, _ in pads)
    flat = tuple(p for lo_hi in reversed(pads) for p in lo_hi)
    return cv.emit("pad", [x], {"pad": flat, "mode": "constant", "value": value}), (0,) * len(pads)


@handles("Conv")
def _conv(cv, xs):
    x, w = xs[0], cv.const(xs[1], "Conv weight")
    b = cv.const(xs[2], "Conv bias") if len(xs) > 2 and xs[2] is not None else None
    nd = w.ndim - 2
    if nd not in (1, 2):
        raise UnsupportedConstruct(f"{nd}-d convolution")
    kernel = tuple(cv.attr("kernel_shape", w.shape[2:]))
    strides = tuple(cv.attr("strides", [1] * nd))
    dilations = tuple(cv.attr("dilations", [1] * nd))
    pads = _spatial_pads(cv, nd, kernel, strides, dilations, cv.shape(x)[2:])
    x, padding = _pad_first(cv, x, pads)
    return cv.emit(f"conv{nd}d", [x], {"stride": strides, "padding": padding, "dilation": dilations,
                                       "groups": int(cv.attr("group", 1))}, {"weight": w, "bias": b})


@handles("ConvTranspose")
def _conv_transpose(cv, xs):
    x, w = xs[0], cv.const(xs[1], "ConvTranspose weight")
    b = cv.const(xs[2], "ConvTranspose bias") if len(xs) > 2 and xs[2] is not None else None
    nd = w.ndim - 2
    if nd not in (1, 2) or cv.attr("output_shape") is not None or cv.attr("auto_pad", "NOTSET") != "NOTSET":
        raise UnsupportedConstruct("output_shape/auto_pad or 3-d transposed convolution")
    pads = list(cv.attr("pads", [0] * (2 * nd)))
    if pads[:nd] != pads[nd:]:
        raise UnsupportedConstruct("asymmetric pads on a transposed convolution")
    return cv.emit(f"conv_transpose{nd}d", [x], {
        "stride": tuple(cv.attr("strides", [1] * nd)), "padding": tuple(pads[:nd]),
        "output_padding": tuple(cv.attr("output_padding", [0] * nd)), "groups": int(cv.attr("group", 1)),
        "dilation": tuple(cv.attr("dilations", [1] * nd))}, {"weight": w, "bias": b})


@handles("BatchNormalization")
def _batch_norm(cv, xs):
    if cv.attr("training_mode", 0):
        raise UnsupportedConstruct("training_mode=1")
    scale, bias, mean, var = (cv.const(v, "BatchNormalization statistics") for v in xs[1:5])
    return cv.emit("batch_norm", [xs[0]], {"eps": float(cv.attr("epsilon", 1e-5))},
                   {"weight": scale, "bias": bias, "running_mean": mean, "running_var": var})


@handles("Gemm")
def _gemm(cv, xs):
    a, b = xs[0], xs[1]
    c = xs[2] if len(xs) > 2 else None
    alpha, beta = float(cv.attr("alpha", 1.0)), float(cv.attr("beta", 1.0))
    if cv.attr("transA", 0):
        a = cv.emit("permute", [a], {"dims": (1, 0)})
    b = cv.const(b, "Gemm B")
    weight = (b if cv.attr("transB", 0) else b.T) * alpha
    bias = None
    if c is not None:
        c = cv.const(c, "Gemm C")
        if c.size == weight.shape[0] or c.size == 1:
            bias = np.broadcast_to(c.reshape(-1), (weight.shape[0],)) * beta
        else:
            y = cv.emit("linear", [a], {}, {"weight": weight})
            return cv.emit("add", [y, c * beta])
    return cv.emit("linear", [a], {}, {"weight": weight, "bias": bias})


@handles("MatMul")
def _matmul(cv, xs):
    a, b = xs
    if not isinstance(b, Value) and np.ndim(b) == 2:
        return cv.emit("linear", [a], {}, {"weight": np.asarray(b).T})
    return cv.emit("matmul", [a, b])


def _simple(op: str, **attrs_from_onnx):
    def handler(cv, xs):
        attrs = {ir: type(default)(cv.attr(onnx_name, default)) for ir, (onnx_name, default) in attrs_from_onnx.items()}
        return cv.emit(op, [xs[0]], attrs)
    return handler


for _onnx, _ir in (("Relu", "relu"), ("Sigmoid", "sigmoid"), ("Tanh", "tanh"), ("HardSwish", "hardswish"),
                   ("Exp", "exp"), ("Sqrt", "sqrt"), ("Neg", "neg"), ("Abs", "abs"), ("Erf", "erf")):
    HANDLERS[_onnx] = _simple(_ir)
HANDLERS["LeakyRelu"] = _simple("leaky_relu", negative_slope=("alpha", 0.01))
HANDLERS["Elu"] = _simple("elu", alpha=("alpha", 1.0))
HANDLERS["Identity"] = _simple("identity")


@handles("Dropout")
def _dropout(cv, xs):
    """Inference dropout is the identity. Its optional mask output is all ones ("kept"): bool from opset 10, the
    input's dtype before. A constant ``training_mode`` of true asks for random dropout, which inference cannot give."""
    if len(xs) > 2 and xs[2] is not None and bool(cv.const(xs[2], "Dropout training_mode")):
        raise UnsupportedConstruct("training_mode=true (random dropout); export the model in eval mode")
    ratio = cv.attr("ratio", 0.5)
    if cv.opset >= 12 and len(xs) > 1 and xs[1] is not None and not isinstance(xs[1], Value):
        ratio = float(np.asarray(xs[1]))
    y = cv.emit("dropout", [xs[0]], {"p": float(ratio)})
    if len(cv.node.output) < 2 or not cv.node.output[1]:
        return y
    dtype = "bool" if cv.opset >= 10 else cv.graph.value_type(y).dtype
    return y, np.ones(cv.shape(y), dtype)


@handles("HardSigmoid")
def _hard_sigmoid(cv, xs):
    alpha, beta = float(cv.attr("alpha", 0.2)), float(cv.attr("beta", 0.5))
    if abs(alpha - 1 / 6) < 1e-7 and abs(beta - 0.5) < 1e-7:
        return cv.emit("hardsigmoid", [xs[0]])
    scaled = cv.emit("add", [cv.emit("mul", [xs[0], np.float32(alpha)]), np.float32(beta)])
    return cv.emit("clamp", [scaled], {"min": 0.0, "max": 1.0})


@handles("Clip")
def _clip(cv, xs):
    lo, hi = cv.attr("min"), cv.attr("max")
    if len(xs) > 1 and xs[1] is not None:
        lo = float(cv.const(xs[1], "Clip min"))
    if len(xs) > 2 and xs[2] is not None:
        hi = float(cv.const(xs[2], "Clip max"))
    if lo is None and hi is None:
        return cv.emit("identity", [xs[0]])
    if cv.graph.value_type(cv.value(xs[0])).dtype != "float32":
        raise UnsupportedConstruct("integer Clip")
    return cv.emit("clamp", [xs[0]], {"min": None if lo is None else float(lo),
                                      "max": None if hi is None else float(hi)})


def _softmax(op: str):
    def handler(cv, xs):
        x = xs[0]
        shape = cv.shape(x)
        rank = len(shape)
        axis = int(cv.attr("axis", -1 if cv.opset >= 13 else 1)) % rank
        if cv.opset >= 13 or axis == rank - 1:
            return cv.emit(op, [x], {"dim": axis})
        # opset < 13: softmax over the flattened trailing dims [axis:]
        flat = cv.emit("reshape", [x], {"shape": (math.prod(shape[:axis]), math.prod(shape[axis:]))})
        return cv.emit("reshape", [cv.emit(op, [flat], {"dim": 1})], {"shape": shape})
    return handler


HANDLERS["Softmax"] = _softmax("softmax")
HANDLERS["LogSoftmax"] = _softmax("log_softmax")


def _onnx_pool_size(size: int, kernel: int, stride: int, pad: tuple[int, int], ceil_mode: bool) -> int:
    """ONNX Runtime's output length: in ceil mode a last window that would start in the end padding is dropped
    (torch's rule too, but torch applies it to its own symmetric padding, not to a pad op in front of the pool)."""
    span = size + pad[0] + pad[1] - kernel
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    return out - 1 if (out - 1) * stride >= size + pad[0] else out


def _pool(kind: str):
    """MaxPool / AveragePool. Torch pools pad symmetrically by at most half a kernel; other ``pads`` become an
    explicit ``pad`` op (-3.4e38 for max, 0 for average) and a pool without padding. For an average that must not
    count the padding (``count_include_pad=0``), the zero-padded average ``sum/D`` is multiplied by the constant
    ``D/count`` (the reciprocal of the same pool over padded ones), so each window is divided by its real elements.
    In ceil mode the padded input can yield one more window than ONNX's rule allows: it is sliced off."""
    def handler(cv, xs):
        x = xs[0]
        if len(cv.node.output) > 1 and cv.node.output[1]:
            raise UnsupportedConstruct("the Indices output")
        kernel = tuple(cv.attr("kernel_shape"))
        nd = len(kernel)
        if nd not in (1, 2):
            raise UnsupportedConstruct(f"{nd}-d pooling")
        strides = tuple(cv.attr("strides", [1] * nd))
        dilations = tuple(cv.attr("dilations", [1] * nd))
        if kind == "avg" and any(d != 1 for d in dilations):
            raise UnsupportedConstruct("dilated average pooling")
        spatial = cv.shape(x)[2:]
        pads = _spatial_pads(cv, nd, kernel, strides, dilations, spatial)
        include_pad = bool(cv.attr("count_include_pad", 0))
        ceil_mode = bool(cv.attr("ceil_mode", 0))
        attrs = {"kernel_size": kernel, "stride": strides, "ceil_mode": ceil_mode}
        attrs.update({"dilation": dilations} if kind == "max" else {"count_include_pad": include_pad})
        if all(lo == hi and 2 * lo <= k for (lo, hi), k in zip(pads, kernel)):
            return cv.emit(f"{kind}_pool{nd}d", [x], {**attrs, "padding": tuple(lo for lo, _ in pads)})
        flat = tuple(p for lo_hi in reversed(pads) for p in lo_hi)
        padded = cv.emit("pad", [x], {"pad": flat, "mode": "constant", "value": -3.4e38 if kind == "max" else 0.0})
        y = cv.emit(f"{kind}_pool{nd}d", [padded], {**attrs, "padding": (0,) * nd, "count_include_pad": True}
                    if kind == "avg" else {**attrs, "padding": (0,) * nd})
        sizes = [_onnx_pool_size(n, (k - 1) * d + 1, s, p, ceil_mode)
                 for n, k, d, s, p in zip(spatial, kernel, dilations, strides, pads)]
        for dim, size in enumerate(sizes, start=2):
            if cv.shape(y)[dim] > size:
                y = cv.emit("slice", [y], {"dim": dim, "start": 0, "end": size, "step": 1})
        if kind == "avg" and not include_pad:
            ones = F.pad(torch.ones((1, 1, *spatial)), flat)
            real = getattr(F, f"avg_pool{nd}d")(ones, kernel, strides, 0, ceil_mode, True).numpy()
            real = real[(..., *(slice(0, size) for size in sizes))]
            if not np.all(real > 0):
                raise UnsupportedConstruct("pads so large that a window holds only padding")
            y = cv.emit("mul", [y, (1.0 / real).astype(np.float32)])
        return y
    return handler


HANDLERS["MaxPool"] = _pool("max")
HANDLERS["AveragePool"] = _pool("avg")


def _global_pool(kind: str):
    def handler(cv, xs):
        nd = len(cv.shape(xs[0])) - 2
        if nd not in (1, 2):
            raise UnsupportedConstruct(f"{nd}-d global pooling")
        return cv.emit(f"adaptive_{kind}_pool{nd}d", [xs[0]], {"output_size": (1,) * nd})
    return handler


HANDLERS["GlobalAveragePool"] = _global_pool("avg")
HANDLERS["GlobalMaxPool"] = _global_pool("max")


@handles("LayerNormalization")
def _layer_norm(cv, xs):
    """Normalize over the dims from ``axis`` on; Scale and B (optional) broadcast to those dims become the
    ``layer_norm`` op's weight and bias (torch's F.layer_norm with ``normalized_shape = X.shape[axis:]``)."""
    x, shape = xs[0], cv.shape(xs[0])
    if any(cv.node.output[1:]):
        raise UnsupportedConstruct("the Mean/InvStdDev outputs (training statistics)")
    if int(cv.attr("stash_type", 1)) != 1:
        raise UnsupportedConstruct(f"stash_type={cv.attr('stash_type')} (statistics in another precision than "
                                   "float32)")
    normalized = tuple(shape[int(cv.attr("axis", -1)) % len(shape):])
    weight = np.broadcast_to(cv.const(xs[1], "LayerNormalization Scale"), normalized).astype(np.float32)
    bias = (np.broadcast_to(cv.const(xs[2], "LayerNormalization B"), normalized).astype(np.float32)
            if len(xs) > 2 and xs[2] is not None else None)
    return cv.emit("layer_norm", [x], {"normalized_shape": normalized, "eps": float(cv.attr("epsilon", 1e-5))},
                   {"weight": weight, "bias": bias})


@handles("GroupNormalization")
def _group_norm(cv, xs):
    """GroupNormalization-18 gives scale and bias one value per group (ONNX deprecated that: torch's GroupNorm
    has one per channel), repeated here over the group's channels; GroupNormalization-21 gives one per channel."""
    x = xs[0]
    channels, groups = cv.shape(x)[1], int(cv.attr("num_groups"))
    if groups <= 0 or channels % groups:
        raise FrontendError(f"{cv.where}: num_groups={groups} does not divide the {channels} channels")
    if int(cv.attr("stash_type", 1)) != 1:
        raise UnsupportedConstruct(f"stash_type={cv.attr('stash_type')} (statistics in another precision than "
                                   "float32)")
    per_group = cv.opset < 21
    expected = groups if per_group else channels
    params = {}
    for slot, name in ((1, "scale"), (2, "bias")):
        value = cv.const(xs[slot], f"GroupNormalization {name}").astype(np.float32).reshape(-1)
        if value.size != expected:
            raise FrontendError(f"{cv.where}: {name} has {value.size} values; GroupNormalization-"
                                f"{18 if per_group else 21} expects one per {'group' if per_group else 'channel'} "
                                f"({expected})")
        params["weight" if slot == 1 else "bias"] = np.repeat(value, channels // groups) if per_group else value
    return cv.emit("group_norm", [x], {"num_groups": groups, "eps": float(cv.attr("epsilon", 1e-5))}, params)


# ONNX Resize's source coordinate of output index x (float32, as ONNX Runtime computes it), per
# coordinate_transformation_mode; s = scale (out/in, or the given scale), n = input length, m = output length
_RESIZE_COORDINATES: dict[str, Callable] = {
    "half_pixel": lambda x, s, n, m: (x + np.float32(0.5)) / s - np.float32(0.5),
    "pytorch_half_pixel": lambda x, s, n, m: (x + np.float32(0.5)) / s - np.float32(0.5) if m > 1 else x * 0,
    "align_corners": lambda x, s, n, m: x * np.float32((n - 1) / (m - 1)) if m > 1 else x * 0,
    "asymmetric": lambda x, s, n, m: x / s,
    "tf_half_pixel_for_nn": lambda x, s, n, m: (x + np.float32(0.5)) / s,
}

_NEAREST_ROUNDING: dict[str, Callable] = {
    "round_prefer_floor": lambda c: np.where(c - np.floor(c) == 0.5, np.floor(c), np.round(c)),
    "round_prefer_ceil": lambda c: np.where(c - np.floor(c) == 0.5, np.ceil(c), np.round(c)),
    "floor": np.floor,
    "ceil": np.ceil,
}

# torch's coordinate map for bilinear (align_corners False: half pixel, clamped at 0; True: corners)
_LINEAR_MODES = {"half_pixel": False, "pytorch_half_pixel": False, "align_corners": True}


def _nearest_sources(coordinate: str, rounding: str, scale: float, n: int, m: int) -> np.ndarray:
    """The input index each output index reads under ONNX's nearest rule (Resize-10 and Upsample round like
    ONNX Runtime's "simple" mode: down when enlarging, up when shrinking)."""
    c = _RESIZE_COORDINATES[coordinate](np.arange(m, dtype=np.float32), np.float32(scale), n, m)
    if rounding == "simple":
        rounding = "ceil" if scale < 1 else "floor"
    return np.clip(_NEAREST_ROUNDING[rounding](c), 0, n - 1).astype(np.int64)


def _torch_nearest_sources(mode: str, scale: float | None, n: int, m: int) -> np.ndarray:
    """The input index each output index reads in ``F.interpolate`` (nearest modes are separable per axis)."""
    line = torch.arange(n, dtype=torch.float32).view(1, 1, n)
    if scale is None:
        y = F.interpolate(line, size=m, mode=mode)
    else:
        y = F.interpolate(line, scale_factor=scale, mode=mode, recompute_scale_factor=False)
    return y.view(-1).numpy().astype(np.int64) if y.shape[-1] == m else np.full(m, -1)


def _resize_request(cv, xs) -> tuple[list[int], list[float], bool, str, str]:
    """(output spatial sizes, spatial scales, scales given?, coordinate mode, nearest rounding) of Resize/Upsample;
    ONNX's defaults per opset: Upsample and Resize-10 map asymmetrically, Resize-11+ by half pixels."""
    shape = cv.shape(xs[0])
    rank = len(shape)
    if cv.node.op_type == "Upsample" or cv.opset < 11:
        scales = cv.attr("scales") if cv.node.op_type == "Upsample" and cv.opset < 9 else cv.const(
            xs[1], f"{cv.node.op_type} scales").tolist()
        sizes, coordinate, rounding = None, "asymmetric", "simple"
    else:
        scales = xs[2] if len(xs) > 2 and xs[2] is not None else None
        sizes = xs[3] if len(xs) > 3 and xs[3] is not None else None
        scales = cv.const(scales, "Resize scales").tolist() if scales is not None else None
        sizes = cv.const(sizes, "Resize sizes").tolist() if sizes is not None else None
        scales = scales or None  # an empty scales input means "use sizes"
        coordinate = cv.attr("coordinate_transformation_mode", "half_pixel")
        rounding = cv.attr("nearest_mode", "round_prefer_floor")
        if cv.attr("keep_aspect_ratio_policy", "stretch") != "stretch" and sizes is not None:
            raise UnsupportedConstruct(f"keep_aspect_ratio_policy={cv.attr('keep_aspect_ratio_policy')!r}")
        axes = cv.attr("axes")
        if axes is not None:  # values for the listed axes only; the others keep their size
            axes = [int(a) % rank for a in axes]
            full_scales, full_sizes = [1.0] * rank, list(shape)
            for i, axis in enumerate(axes):
                if scales is not None:
                    full_scales[axis] = scales[i]
                if sizes is not None:
                    full_sizes[axis] = sizes[i]
            scales, sizes = (full_scales if scales is not None else None), (full_sizes if sizes is not None else None)
    if sizes is not None:
        if len(sizes) != rank:
            raise FrontendError(f"{cv.where}: sizes {sizes} do not match the input's rank {rank}")
        out = [int(s) for s in sizes]
        used = [o / n for o, n in zip(out, shape)]
    elif scales is not None:
        if len(scales) != rank:
            raise FrontendError(f"{cv.where}: scales {scales} do not match the input's rank {rank}")
        used = [float(s) for s in scales]
        out = [int(math.floor(n * s)) for n, s in zip(shape, used)]
    else:
        raise FrontendError(f"{cv.where}: neither scales nor sizes is given")
    if out[:2] != list(shape[:2]):
        raise UnsupportedConstruct("resizing the batch or channel axis (scales/sizes must keep dims 0 and 1)")
    if min(out) <= 0:
        raise FrontendError(f"{cv.where}: output shape {out} is empty")
    return out[2:], used[2:], sizes is None, coordinate, rounding


@handles("Resize", "Upsample")
def _resize(cv, xs):
    """Resize/Upsample onto ``interpolate`` when the maps agree exactly: nearest (any coordinate mode and
    rounding whose index map equals torch's "nearest" or "nearest-exact" on these sizes: the maps are compared
    index by index) and linear on 2-d images with half_pixel / pytorch_half_pixel (torch's align_corners=False)
    or align_corners. Everything else is refused, naming the attribute."""
    x = xs[0]
    spatial = cv.shape(x)[2:]
    out, scales, by_scale, coordinate, rounding = _resize_request(cv, xs)
    mode = cv.attr("mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise UnsupportedConstruct(f"mode={mode!r} (nearest and linear map onto interpolate)")
    if cv.attr("antialias", 0) and any(o < n for o, n in zip(out, spatial)):
        raise UnsupportedConstruct("antialias=1 when downscaling")
    if coordinate not in _RESIZE_COORDINATES:
        raise UnsupportedConstruct(f"coordinate_transformation_mode={coordinate!r}")
    if list(out) == list(spatial) and all(s == 1 for s in scales):
        return cv.emit("identity", [x])
    if mode == "linear":
        if len(spatial) != 2:
            raise UnsupportedConstruct(f"linear resize of {len(spatial)}-d data (bilinear images only)")
        if coordinate not in _LINEAR_MODES:
            raise UnsupportedConstruct(f"coordinate_transformation_mode={coordinate!r} with mode='linear' "
                                       "(torch's bilinear maps half_pixel, pytorch_half_pixel or align_corners)")
        if coordinate == "pytorch_half_pixel" and any(o == 1 < n for o, n in zip(out, spatial)):
            raise UnsupportedConstruct("coordinate_transformation_mode='pytorch_half_pixel' with an output "
                                       "length of 1 (ONNX reads index 0, torch the centre)")
        align = _LINEAR_MODES[coordinate]
        return cv.emit("interpolate", [x], {"size": tuple(out), "mode": "bilinear", "align_corners": align,
                                            "scale_factor": tuple(scales) if by_scale and not align else None})
    if len(spatial) not in (1, 2):
        raise UnsupportedConstruct(f"nearest resize of {len(spatial)}-d data")
    if rounding not in _NEAREST_ROUNDING and rounding != "simple":
        raise UnsupportedConstruct(f"nearest_mode={rounding!r}")
    wanted = [_nearest_sources(coordinate, rounding, s, n, m) for s, n, m in zip(scales, spatial, out)]
    for torch_mode in ("nearest", "nearest-exact"):
        for scale_factor in ((tuple(scales), None) if by_scale else (None,)):
            maps = [_torch_nearest_sources(torch_mode, None if scale_factor is None else s, n, m)
                    for s, n, m in zip(scales, spatial, out)]
            if all(np.array_equal(a, b) for a, b in zip(maps, wanted)):
                return cv.emit("interpolate", [x], {"size": tuple(out), "mode": torch_mode, "align_corners": False,
                                                    "scale_factor": scale_factor})
    raise UnsupportedConstruct(f"coordinate_transformation_mode={coordinate!r} with nearest_mode="
                               f"{'floor (opset < 11)' if rounding == 'simple' else repr(rounding)}: on these sizes "
                               "its index map matches neither torch's 'nearest' nor 'nearest-exact'")


@handles("LRN")
def _lrn(cv, xs):
    return cv.emit("lrn", [xs[0]], {"size": int(cv.attr("size")), "alpha": float(cv.attr("alpha", 1e-4)),
                                    "beta": float(cv.attr("beta", 0.75)), "k": float(cv.attr("bias", 1.0))})


@handles("Flatten")
def _flatten(cv, xs):
    shape = cv.shape(xs[0])
    axis = int(cv.attr("axis", 1))
    axis = axis + len(shape) if axis < 0 else axis
    return _reshape_to(cv, xs[0], (math.prod(shape[:axis]), math.prod(shape[axis:])))


def _reshape_to(cv, x, shape):
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) != math.prod(cv.shape(x)):
        raise ValueError(f"cannot reshape {cv.shape(x)} to {shape}")
    return x if shape == cv.shape(x) else cv.emit("reshape", [x], {"shape": shape})


@handles("Reshape")
def _reshape(cv, xs):
    x = xs[0]
    target = [int(s) for s in (cv.const(xs[1], "Reshape shape") if len(xs) > 1 else cv.attr("shape"))]
    in_shape = cv.shape(x)
    allow_zero = int(cv.attr("allowzero", 0))
    shape = [in_shape[i] if s == 0 and not allow_zero else s for i, s in enumerate(target)]
    if shape.count(-1) > 1:
        raise ValueError(f"reshape target {target} has more than one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = math.prod(in_shape) // known if known else 0
    return _reshape_to(cv, x, shape)


@handles("Transpose")
def _transpose(cv, xs):
    rank = len(cv.shape(xs[0]))
    perm = tuple(cv.attr("perm", list(range(rank))[::-1]))
    return xs[0] if perm == tuple(range(rank)) else cv.emit("permute", [xs[0]], {"dims": perm})


@handles("Concat")
def _concat(cv, xs):
    rank = len(cv.shape(next(x for x in xs if x is not None)))
    return cv.emit("concat", [x for x in xs if x is not None], {"dim": int(cv.attr("axis")) % rank})


@handles("Split")
def _split(cv, xs):
    x = xs[0]
    shape = cv.shape(x)
    axis = int(cv.attr("axis", 0)) % len(shape)
    split = cv.attr("split")
    if len(xs) > 1 and xs[1] is not None:
        split = cv.const(xs[1], "Split sizes").tolist()
    if split is None:
        parts = int(cv.attr("num_outputs", len(cv.node.output)))
        step = -(-shape[axis] // parts)
        split = [min(step, shape[axis] - i * step) for i in range(parts)]
    outs = cv.emit("split", [x], {"split_sizes": tuple(int(s) for s in split), "dim": axis})
    return outs if isinstance(outs, tuple) else (outs,)


@handles("Slice")
def _slice(cv, xs):
    x = xs[0]
    shape = cv.shape(x)
    if cv.opset < 10:
        starts, ends = cv.attr("starts"), cv.attr("ends")
        axes, steps = cv.attr("axes", list(range(len(starts)))), [1] * len(starts)
    else:
        starts, ends = cv.const(xs[1], "Slice starts").tolist(), cv.const(xs[2], "Slice ends").tolist()
        axes = cv.const(xs[3], "Slice axes").tolist() if len(xs) > 3 and xs[3] is not None else list(
            range(len(starts)))
        steps = cv.const(xs[4], "Slice steps").tolist() if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % len(shape)
        if step <= 0:
            raise UnsupportedConstruct("negative slice steps")
        s, e, st = slice(int(start), int(min(end, 1 << 62)), int(step)).indices(cv.shape(x)[axis])
        if (s, e, st) != (0, cv.shape(x)[axis], 1):
            x = cv.emit("slice", [x], {"dim": axis, "start": s, "end": max(e, s), "step": st})
    return x


def _axes(cv, xs, rank: int) -> list[int]:
    axes = cv.attr("axes")
    if len(xs) > 1 and xs[1] is not None:
        axes = cv.const(xs[1], "axes").tolist()
    return [int(a) % rank for a in (axes or [])]


@handles("Squeeze")
def _squeeze(cv, xs):
    shape = cv.shape(xs[0])
    axes = _axes(cv, xs, len(shape)) or [i for i, s in enumerate(shape) if s == 1]
    return _reshape_to(cv, xs[0], [s for i, s in enumerate(shape) if i not in axes])


@handles("Unsqueeze")
def _unsqueeze(cv, xs):
    shape = list(cv.shape(xs[0]))
    axes = cv.attr("axes")
    if len(xs) > 1 and xs[1] is not None:
        axes = cv.const(xs[1], "Unsqueeze axes").tolist()
    rank = len(shape) + len(axes or [])
    for axis in sorted(int(a) % rank for a in axes or []):
        shape.insert(axis, 1)
    return _reshape_to(cv, xs[0], shape)


@handles("Shape")
def _shape(cv, xs):
    shape = cv.shape(xs[0])
    start, end = cv.attr("start", 0), cv.attr("end")
    return np.array(shape[slice(start, end)], dtype=np.int64)


@handles("Gather")
def _gather(cv, xs):
    data, indices = xs
    axis = int(cv.attr("axis", 0)) % len(cv.shape(data))
    if isinstance(indices, Value):
        if isinstance(data, Value) or axis != 0 or np.ndim(data) != 2:
            raise UnsupportedConstruct("gathering with run-time indices other than an embedding lookup")
        return cv.emit("embedding", [indices], {}, {"weight": np.asarray(data, np.float32)})
    idx = np.asarray(indices)
    size = cv.shape(data)[axis]
    if idx.ndim == 0:
        return cv.emit("select", [data], {"dim": axis, "index": int(idx) % size})
    if idx.ndim == 1 and len(idx) and np.all(np.diff(idx % size) == 1):
        start = int(idx[0]) % size
        return cv.emit("slice", [data], {"dim": axis, "start": start, "end": start + len(idx), "step": 1})
    if np.any(idx < -size) or np.any(idx >= size):
        raise FrontendError(f"{cv.where}: gather indices out of range for a dim of size {size}")
    return cv.emit("gather", [data], {"dim": axis}, {"indices": (idx % size).astype(np.int64)})


@handles("Expand")
def _expand(cv, xs):
    """Broadcast to a constant shape: ``x + zeros(shape)`` (numpy broadcasting rules, as ONNX's)."""
    shape = tuple(int(d) for d in cv.const(xs[1], "Expand shape"))
    target = np.broadcast_shapes(cv.shape(xs[0]), shape)
    if target == cv.shape(xs[0]):
        return xs[0]
    return cv.emit("add", [xs[0], np.zeros(target, dtype=cv.graph.value_type(xs[0]).dtype)])


@handles("Constant")
def _constant(cv, xs):
    for a in cv.node.attribute:
        if a.name == "value":
            return tensor_to_numpy(a.t, cv.where)
        if a.name in ("value_float", "value_int"):
            return np.asarray(helper.get_attribute_value(a), np.float32 if a.name == "value_float" else np.int64)
        if a.name in ("value_floats", "value_ints"):
            return np.asarray(helper.get_attribute_value(a), np.float32 if a.name == "value_floats" else np.int64)
    raise UnsupportedConstruct("a Constant without a supported value attribute")


@handles("ConstantOfShape")
def _constant_of_shape(cv, xs):  # constant shapes were folded before reaching here
    raise UnsupportedConstruct("a shape computed at run time")


@handles("Pad")
def _pad(cv, xs):
    x = xs[0]
    rank = len(cv.shape(x))
    pads = cv.attr("pads") if cv.opset < 11 else cv.const(xs[1], "Pad pads").tolist()
    value = cv.attr("value", 0.0) if cv.opset < 11 else (
        float(cv.const(xs[2], "Pad value")) if len(xs) > 2 and xs[2] is not None else 0.0)
    if cv.opset >= 18 and len(xs) > 3 and xs[3] is not None:
        raise UnsupportedConstruct("the axes input")
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(cv.attr("mode", "constant"))
    if mode is None:
        raise UnsupportedConstruct(f"mode {cv.attr('mode')!r}")
    pairs = [(int(pads[i]), int(pads[i + rank])) for i in range(rank)]
    if any(lo < 0 or hi < 0 for lo, hi in pairs):
        raise UnsupportedConstruct("negative pads")
    while pairs and pairs[0] == (0, 0):
        pairs.pop(0)
    flat = tuple(p for lo_hi in reversed(pairs) for p in lo_hi)
    return cv.emit("pad", [x], {"pad": flat, "mode": mode, "value": float(value)}) if flat else x


def _binary(op: str):
    def handler(cv, xs):
        a, b = xs
        like = a if isinstance(a, Value) else b
        dtype = cv.graph.value_type(like).dtype
        a = a if isinstance(a, Value) else np.asarray(a).astype(dtype)
        b = b if isinstance(b, Value) else np.asarray(b).astype(dtype)
        return cv.emit(op, [a, b])
    return handler


for _onnx, _ir in (("Add", "add"), ("Sub", "sub"), ("Mul", "mul"), ("Div", "div")):
    HANDLERS[_onnx] = _binary(_ir)


def _variadic(op: str, mean: bool = False):
    def handler(cv, xs):
        result = xs[0]
        for x in xs[1:]:
            result = _binary(op)(cv, [result, x])
        if mean:
            result = cv.emit("mul", [result, np.float32(1.0 / len(xs))])
        return result if isinstance(result, Value) else cv.emit("identity", [result])
    return handler


HANDLERS["Sum"] = _variadic("add")
HANDLERS["Mean"] = _variadic("add", mean=True)
HANDLERS["Max"] = _variadic("maximum")
HANDLERS["Min"] = _variadic("minimum")


def _reduce(op: str):
    def handler(cv, xs):
        rank = len(cv.shape(xs[0]))
        axes = _axes(cv, xs, rank)
        if not axes:
            if cv.attr("noop_with_empty_axes", 0):
                return xs[0]
            axes = list(range(rank))
        return cv.emit(op, [xs[0]], {"dim": tuple(sorted(axes)), "keepdim": bool(cv.attr("keepdims", 1))})
    return handler


HANDLERS["ReduceMean"] = _reduce("mean")
HANDLERS["ReduceSum"] = _reduce("sum")
HANDLERS["ReduceMax"] = _reduce("amax")


def _qparams(cv, xs, scale_slot: int, zero_slot: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    scale = cv.const(xs[scale_slot], f"{what} scale").astype(np.float32)
    zero = (cv.const(xs[zero_slot], f"{what} zero point") if len(xs) > zero_slot and xs[zero_slot] is not None
            else np.zeros(scale.shape, np.uint8))
    return scale, zero


def _axis_of(cv, x, scale: np.ndarray) -> int | None:
    return None if scale.ndim == 0 or scale.size == 1 else int(cv.attr("axis", 1)) % len(cv.shape(x))


def _quantize(cv, x, scale, zero):
    dtype = np.asarray(zero).dtype.name
    if dtype not in ("int8", "uint8"):
        raise UnsupportedConstruct(f"quantization to {dtype}")
    axis = _axis_of(cv, x, scale)
    return cv.emit("quantize", [x], {"dtype": dtype, "axis": axis},
                   {"scale": scale.reshape(-1) if axis is not None else scale.reshape(()),
                    "zero_point": np.asarray(zero).reshape(-1) if axis is not None else np.asarray(zero).reshape(())})


def _dequantize(cv, x, scale, zero):
    axis = _axis_of(cv, x, scale)
    return cv.emit("dequantize", [x], {"axis": axis},
                   {"scale": scale.reshape(-1) if axis is not None else scale.reshape(()),
                    "zero_point": np.asarray(zero).reshape(-1) if axis is not None else np.asarray(zero).reshape(())})


@handles("QuantizeLinear")
def _quantize_linear(cv, xs):
    scale, zero = _qparams(cv, xs, 1, 2, "QuantizeLinear")
    return _quantize(cv, xs[0], scale, zero)


@handles("DequantizeLinear")
def _dequantize_linear(cv, xs):
    """A constant (a QDQ model's int8 weight or int32 bias) is dequantized here in float32, as ONNX defines it:
    ONNX's reference evaluator has no DequantizeLinear for every opset, and ``fold-qdq`` recovers the integers."""
    scale, zero = _qparams(cv, xs, 1, 2, "DequantizeLinear")
    if isinstance(xs[0], Value):
        return _dequantize(cv, xs[0], scale, zero)
    q = np.asarray(xs[0])
    shape = (-1,) + (1,) * (q.ndim - 1 - _axis_of(cv, q, scale)) if scale.size > 1 else ()
    return (q.astype(np.float32) - np.asarray(zero, np.float32).reshape(shape)) * scale.reshape(shape)


@handles("QLinearConv")
def _qlinear_conv(cv, xs):
    """dequantize(x), dequantize(w), conv in float, quantize(y): QLinearConv's meaning with float arithmetic.

    The passes of the quantization issue turn such dequantize-op-quantize chains into integer kernels."""
    x_scale, x_zero = _qparams(cv, xs, 1, 2, "QLinearConv x")
    w_scale, w_zero = _qparams(cv, xs, 4, 5, "QLinearConv w")
    y_scale, y_zero = _qparams(cv, xs, 6, 7, "QLinearConv y")
    w = cv.const(xs[3], "QLinearConv w").astype(np.float32)
    w_shape = [-1] + [1] * (w.ndim - 1)
    weight = (w - np.asarray(w_zero, np.float32).reshape(w_shape if w_zero.size > 1 else ())) * w_scale.reshape(
        w_shape if w_scale.size > 1 else ())
    bias = None
    if len(xs) > 8 and xs[8] is not None:
        bias = cv.const(xs[8], "QLinearConv bias").astype(np.float32) * (x_scale * w_scale).reshape(-1)
    x = _dequantize(cv, xs[0], x_scale, x_zero)
    y = _conv(cv, [x, weight] + ([bias] if bias is not None else []))
    return _quantize(cv, y, y_scale, y_zero)


@handles("QLinearMatMul")
def _qlinear_matmul(cv, xs):
    a_scale, a_zero = _qparams(cv, xs, 1, 2, "QLinearMatMul a")
    b_scale, b_zero = _qparams(cv, xs, 4, 5, "QLinearMatMul b")
    y_scale, y_zero = _qparams(cv, xs, 6, 7, "QLinearMatMul y")
    a = _dequantize(cv, xs[0], a_scale, a_zero)
    b = xs[3]
    if isinstance(b, Value):
        b = _dequantize(cv, b, b_scale, b_zero)
    else:
        b = (np.asarray(b, np.float32) - np.asarray(b_zero, np.float32)) * b_scale
    return _quantize(cv, _matmul(cv, [a, b]), y_scale, y_zero)


def _integer_operand(cv, x, zero):
    """(x - zero_point) as float64: exact for 8-bit integers, and float64 sums of their products are exact up to
    2^53, so the int32 results of ConvInteger/MatMulInteger come out exactly."""
    if isinstance(x, Value):
        centered = cv.emit("cast", [x], {"dtype": "float64"})
        if zero is not None and np.any(np.asarray(zero) != 0):
            centered = cv.emit("sub", [centered, np.asarray(zero, np.float64)])
        return centered
    return np.asarray(x, np.float64) - (0.0 if zero is None else np.asarray(zero, np.float64))


def _zero_point(cv, xs, slot: int, what: str):
    return cv.const(xs[slot], f"{what} zero point") if len(xs) > slot and xs[slot] is not None else None


@handles("ConvInteger")
def _conv_integer(cv, xs):
    x = _integer_operand(cv, xs[0], _zero_point(cv, xs, 2, "ConvInteger x"))
    w_zero = _zero_point(cv, xs, 3, "ConvInteger w")
    w = cv.const(xs[1], "ConvInteger w").astype(np.float64)
    if w_zero is not None:
        w = w - np.asarray(w_zero, np.float64).reshape([-1] + [1] * (w.ndim - 1) if np.size(w_zero) > 1 else ())
    y = _conv(cv, [x, w])
    return cv.emit("cast", [y], {"dtype": "int32"})


@handles("MatMulInteger")
def _matmul_integer(cv, xs):
    a = _integer_operand(cv, xs[0], _zero_point(cv, xs, 2, "MatMulInteger a"))
    b = _integer_operand(cv, xs[1], _zero_point(cv, xs, 3, "MatMulInteger b"))
    y = cv.emit("matmul", [a, b]) if isinstance(b, Value) else cv.emit("linear", [a], {}, {"weight": b.T})
    return cv.emit("cast", [y], {"dtype": "int32"})


# ONNX gate order -> torch gate order, as row blocks of the weights
_GATE_ORDER = {"LSTM": [0, 2, 3, 1], "GRU": [1, 0, 2], "RNN": [0]}  # iofc -> ifgo(c=g); zrh -> rzn


def _recurrent(kind: str):
    def handler(cv, xs):
        x = xs[0]
        w, r = cv.const(xs[1], f"{kind} W"), cv.const(xs[2], f"{kind} R")
        b = cv.const(xs[3], f"{kind} B") if len(xs) > 3 and xs[3] is not None else None
        if len(xs) > 4 and xs[4] is not None:
            raise UnsupportedConstruct("sequence_lens (variable-length sequences)")
        if kind == "LSTM" and len(xs) > 7 and xs[7] is not None:
            raise UnsupportedConstruct("peephole weights P")
        if cv.attr("clip") is not None or cv.attr("activations") is not None:
            defaults = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}[kind]
            acts = cv.attr("activations")
            if cv.attr("clip") is not None or (acts and [a.capitalize() for a in acts] not in (
                    defaults, defaults * 2, ["Relu"], ["Relu", "Relu"])):
                raise UnsupportedConstruct(f"non-default activations {acts} or clip")
        if kind == "GRU" and not cv.attr("linear_before_reset", 0):
            raise UnsupportedConstruct("linear_before_reset=0 (torch GRUs apply the reset gate after the matmul)")
        if kind == "LSTM" and cv.attr("input_forget", 0):
            raise UnsupportedConstruct("input_forget=1")
        direction = cv.attr("direction", "forward")
        if direction == "reverse":
            raise UnsupportedConstruct("direction='reverse' alone")
        layout = int(cv.attr("layout", 0))
        hidden = int(cv.attr("hidden_size", r.shape[-1]))
        gates = len(_GATE_ORDER[kind])
        params = {}
        for d, suffix in enumerate(("", "_reverse")[: w.shape[0]]):
            order = np.concatenate([np.arange(g * hidden, (g + 1) * hidden) for g in _GATE_ORDER[kind]])
            params[f"weight_ih_l0{suffix}"] = w[d][order]
            params[f"weight_hh_l0{suffix}"] = r[d][order]
            bias = b[d] if b is not None else np.zeros(2 * gates * hidden, np.float32)
            params[f"bias_ih_l0{suffix}"] = bias[: gates * hidden][order]
            params[f"bias_hh_l0{suffix}"] = bias[gates * hidden:][order]
        acts = cv.attr("activations")
        attrs = {"hidden_size": hidden, "num_layers": 1, "bidirectional": direction == "bidirectional",
                 "batch_first": layout == 1, "bias": True}
        if kind == "RNN":
            attrs["nonlinearity"] = "relu" if acts and acts[0].lower() == "relu" else "tanh"
        states = []
        for slot in (5, 6) if kind == "LSTM" else (5,):
            state = xs[slot] if len(xs) > slot else None
            if state is not None and layout == 1:
                state = cv.emit("permute", [state], {"dims": (1, 0, 2)})
            states.append(state)
        op = kind.lower()
        if any(s is None for s in states):
            if any(s is not None for s in states):  # only one of h0/c0 given: the other is zeros
                shape = (w.shape[0], cv.shape(x)[0 if layout else 1], hidden)
                states = [np.zeros(shape, np.float32) if s is None else s for s in states]
            else:
                states = []
        outs = cv.emit(op, [x, *states], attrs, params)
        y, h = outs[0], outs[1]
        steps, batch = cv.shape(x)[:2] if layout == 0 else cv.shape(x)[:2][::-1]
        dirs = w.shape[0]
        # ONNX Y is (T, D, B, H) (layout 0) or (B, T, D, H) (layout 1); torch's is (T, B, D*H) / (B, T, D*H)
        if layout == 0:
            y = cv.emit("permute", [cv.emit("reshape", [y], {"shape": (steps, batch, dirs, hidden)})],
                        {"dims": (0, 2, 1, 3)})
        else:
            y = cv.emit("reshape", [y], {"shape": (batch, steps, dirs, hidden)})
            h = cv.emit("permute", [h], {"dims": (1, 0, 2)})
        results = [y, h]
        if kind == "LSTM":
            c = outs[2] if layout == 0 else cv.emit("permute", [outs[2]], {"dims": (1, 0, 2)})
            results.append(c)
        return tuple(results)
    return handler


HANDLERS["LSTM"] = _recurrent("LSTM")
HANDLERS["GRU"] = _recurrent("GRU")
HANDLERS["RNN"] = _recurrent("RNN")


def from_onnx(model: str | os.PathLike | onnx.ModelProto, name: str | None = None,
              input_shapes: dict[str, tuple[int, ...]] | None = None) -> Graph:
    """Import an ONNX model (path or ``ModelProto``) as a verified IR graph.

    ``input_shapes`` maps input names to static shapes that replace the declared ones (dynamic batch or spatial
    dims must be fixed this way), e.g. ``from_onnx("m.onnx", input_shapes={"x": (1, 3, 224, 224)})``.
    Raises ``FrontendError`` (one message naming the problem and the model element) or ``UnsupportedModelError``
    (every unsupported op at once).
    """
    if isinstance(model, onnx.ModelProto):
        proto = model
        default_name = proto.graph.name or "onnx_model"
    else:
        proto = load_model(model)
        default_name = Path(model).stem
        return _Converter(proto, name or _safe_name(default_name), input_shapes).run()
    return _Converter(proto, name or _safe_name(proto.graph.name or default_name), input_shapes).run()
