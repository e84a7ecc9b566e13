"""PyTorch frontend: ``nn.Module`` -> verified IR through torch.fx.

How: ``torch.fx`` symbolic tracing with the layers we know kept as leaf modules (so ``nn.LSTM`` stays one
``lstm`` node and every node's ``origin`` is its module path). When symbolic tracing meets Python control flow
on traced values (``if x.shape[-1] > 8``), we fall back to ``torch.export``'s FX graph (ATen ops, shapes
specialized to the example inputs). Both graphs are walked by one abstract interpreter: tensors become IR
``Value``s with static types; shape arithmetic (``x.size(0)``, ``x.shape``) is evaluated to Python ints;
computations on constants only are evaluated in torch and become constants.

Every unsupported construct is collected during the walk and reported together in one ``UnsupportedModelError``.
"""

from __future__ import annotations

import inspect
import logging
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from frontend.errors import FrontendError, UnsupportedConstruct, UnsupportedModelError
from passes.ir.graph import Graph, IRError, TensorType, Value
from passes.ir.ops import numpy_dtype
from passes.ir.verify import verify

log = logging.getLogger(__name__)
aten = torch.ops.aten


class _Unknown:
    """Result of an unsupported node: its users are still scanned for support, not converted."""


UNKNOWN = _Unknown()

# ------------------------------------------------------------------------------------------------ tracing
def module_handler(module: nn.Module) -> Callable | None:
    """The conversion of ``module``: by exact type, or the nearest known base class whose ``forward`` it inherits.

    A subclass that overrides ``forward`` (timm's ``BatchNormAct2d`` = batch norm then an activation,
    torchvision's ``LayerNorm2d`` = permute, layer norm, permute back) has no handler: converting it as its parent
    would silently drop what its ``forward`` adds, so it is traced into and its body becomes IR ops.
    """
    for cls in type(module).__mro__:
        handler = MODULE_HANDLERS.get(cls)
        if handler is not None:
            return handler if type(module).forward is cls.forward else None
    return None


def _wrap_leaf_root(model: nn.Module, arity: int) -> nn.Module:
    """A root that is itself a leaf layer (a bare ``nn.LSTM``) is wrapped so tracing keeps it as one call.

    The wrapper's ``forward`` has exactly ``arity`` positional parameters, as symbolic tracing needs.
    """
    args = ", ".join(f"x{i}" for i in range(arity))
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {args}):\n    return self.{_root_name(model)}({args})\n", namespace)  # noqa: S102
    wrapper_cls = type(type(model).__name__, (nn.Module,), {"forward": namespace["forward"]})
    wrapper = wrapper_cls()
    setattr(wrapper, _root_name(model), model)
    return wrapper


def _root_name(model: nn.Module) -> str:
    return type(model).__name__.lower()


class _LeafTracer(torch.fx.Tracer):
    """Layers with a conversion stay one ``call_module`` node; every other module (``torch.nn`` ones included,
    e.g. ``nn.Upsample`` -> ``F.interpolate``) is traced into."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return module_handler(m) is not None


def symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph)


def _decompositions() -> Any:
    """torch.export's core-ATen decomposition table minus every op we convert as a whole.

    Deleting an entry keeps that op in the exported graph (``aten.linear``, ``aten.hardswish``,
    ``aten.layer_norm``, ``aten.upsample_bilinear2d`` stay one node instead of becoming matmuls, clamps and index
    arithmetic); the rest is decomposed and functionalized (``aten.relu_`` -> ``aten.relu``).
    """
    table = torch.export.default_decompositions()
    for op in list(table.keys()):
        if isinstance(op, torch._ops.OpOverload) and op.overloadpacket in FUNCTION_HANDLERS:
            del table[op]
    return table


def export_model(model: nn.Module, example_inputs: tuple) -> tuple[torch.fx.GraphModule, Any]:
    """torch.export's graph of ``model`` (ATen ops, shapes specialized to ``example_inputs``), decomposed by
    ``_decompositions``, and the pytree spec of its outputs (the graph returns a flat list)."""
    with warnings.catch_warnings():  # export warns about RNN flat-weight attributes; harmless here
        warnings.simplefilter("ignore", UserWarning)
        exported = torch.export.export(model, example_inputs, strict=False).run_decompositions(_decompositions())
    return exported.module(), exported.call_spec.out_spec


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ------------------------------------------------------------------------------------------------ helpers
def _tuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        return tuple(int(x) for x in v) if len(v) == n else tuple(int(v[0]) for _ in range(n))
    return (int(v),) * n


def _arg(args: Sequence, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


class _Converter:
    """Walks an FX graph, emitting IR; one instance per conversion (all state is per run)."""

    def __init__(self, gm: torch.fx.GraphModule, name: str, mode: str, out_spec: Any = None,
                 graph: Graph | None = None):
        self.gm = gm
        self.mode = mode
        self.out_spec = out_spec
        self.modules = dict(gm.named_modules())
        self.graph = Graph(name=name) if graph is None else graph
        self.fixed_origin: tuple[str, ...] | None = None
        self.order: dict[torch.fx.Node, int] | None = None  # node positions, for mutation_seen_later
        self.env: dict[torch.fx.Node, Any] = {}
        self.unsupported: list[str] = []
        self.node: torch.fx.Node | None = None

    # -------------------------------------------------------------------------------------- values
    def origin(self) -> tuple[str, ...]:
        if self.fixed_origin is not None:
            return self.fixed_origin
        node = self.node
        if node.op == "call_module":
            return (str(node.target),)
        stack = node.meta.get("nn_module_stack")
        path = list(stack.values())[-1][0] if stack else ""
        path = path if isinstance(path, str) else ""
        if path.startswith("L['self']"):  # dynamo-style paths from torch.export
            path = path.replace("L['self'].", "")
        return (f"{path}.{node.name}" if path else node.name,)

    def where(self) -> str:
        return f"{self.node.format_node() if self.node.op == 'placeholder' else self.origin()[0]}"

    def emit(self, op: str, operands: Sequence[Any], attrs: dict | None = None, params: dict | None = None):
        values = [self.value(x) for x in operands]
        low = [k for k, v in (params or {}).items() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16]
        if low:  # numpy has no bfloat16; the IR's bf16 comes from the mixed-precision pass
            raise FrontendError(f"{self.where()}: parameter {low[0]!r} is bfloat16; import the float32 model "
                                "(model.float()) and add the 'mixed-precision{dtype=bf16}' pass")
        # Copies, not views: later changes to the torch model must not leak into the IR (and vice versa).
        params = {k: (v.detach().cpu().numpy().copy() if isinstance(v, torch.Tensor) else np.array(v))
                  for k, v in (params or {}).items() if v is not None}
        return self.graph.add_op(op, values, attrs=attrs or {}, params=params, origin=self.origin())

    def value(self, x: Any, like: Value | None = None) -> Value:
        """An IR value for ``x``: a traced tensor as is, a constant tensor or Python number as a ``constant``."""
        if isinstance(x, Value):
            return x
        if isinstance(x, torch.Tensor):
            array = x.detach().cpu().numpy().copy()
        elif isinstance(x, (bool, int, float)):
            dtype = self.type(like).dtype if like is not None else "float32"
            array = np.asarray(x, dtype=dtype)
        else:
            raise FrontendError(f"{self.where()}: expected a tensor, got {type(x).__name__}")
        return self.graph.add_op("constant", [], params={"value": array}, origin=self.origin(), name="const")

    def type(self, v: Value) -> TensorType:
        return self.graph.value_type(v)

    def shape(self, v: Any) -> tuple[int, ...]:
        return self.type(v).shape if isinstance(v, Value) else tuple(v.shape)

    def dim(self, v: Any, d: int) -> int:
        rank = len(self.shape(v))
        if not -rank <= d < max(rank, 1):
            raise FrontendError(f"{self.where()}: dim {d} out of range for a rank-{rank} tensor")
        return d % rank if rank else 0

    def param(self, module: nn.Module, name: str) -> torch.Tensor | None:
        t = getattr(module, name, None)
        return None if t is None else t.detach()

    # -------------------------------------------------------------------------------------- walk
    def run(self, example_inputs: Sequence[torch.Tensor]) -> Graph:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            raise FrontendError(f"{self.graph.name}: forward takes {len(placeholders)} inputs "
                                f"({', '.join(p.name for p in placeholders)}), example_inputs has "
                                f"{len(example_inputs)}")
        inputs = {}
        for node, x in zip(placeholders, example_inputs):
            if not isinstance(x, torch.Tensor):
                raise FrontendError(f"input {node.name!r}: example input must be a tensor, got {type(x).__name__}")
            inputs[node] = self.graph.add_input(node.name, TensorType(tuple(x.shape), numpy_dtype(x.dtype)))
        self.output(self.walk(inputs))
        if self.unsupported:
            raise UnsupportedModelError(self.graph.name, self.unsupported, f"via {self.mode}")
        return verify(self.graph)

    def walk(self, inputs: dict[torch.fx.Node, Any], origin: tuple[str, ...] | None = None) -> Any:
        """Convert every node, placeholders bound to ``inputs``; the converted operand of the output node.

        ``origin`` overrides every emitted node's origin (a traced-through function's body keeps its call site).
        """
        self.fixed_origin = origin
        result = None
        for node in self.gm.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                self.env[node] = inputs[node]
            elif node.op == "output":
                result = torch.fx.node.map_arg(node.args[0], self.env.__getitem__)
            else:
                self.env[node] = self.convert(node)
        return result

    def convert(self, node: torch.fx.Node) -> Any:
        args = torch.fx.node.map_arg(node.args, self.env.__getitem__)
        kwargs = torch.fx.node.map_arg(node.kwargs, self.env.__getitem__)
        handler, what = self.handler(node)
        if handler is _aten_constant and not (_is_const(args) and _is_const(list(kwargs.values()))):
            handler = None  # an ATen op we cannot convert: listed even when its inputs are unknown already
        if handler is None:
            self.unsupported.append(f"{what} (at {self.origin()[0]})")
            return UNKNOWN
        if _contains_unknown(args) or _contains_unknown(kwargs):
            return UNKNOWN
        if self.mode == "symbolic_trace" and self.mutation_seen_later(node):
            self.unsupported.append(f"{what}: in place on a tensor used again afterwards (at {self.origin()[0]})")
            return UNKNOWN
        try:
            return handler(self, args, kwargs, node)
        except UnsupportedConstruct as exc:
            self.unsupported.append(f"{what}: {exc} (at {self.origin()[0]})")
            return UNKNOWN
        except IRError as exc:
            raise FrontendError(f"{what} at {self.origin()[0]}: {exc}") from None

    def mutation_seen_later(self, node: torch.fx.Node) -> bool:
        """An in-place op (``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``) whose input is read again after
        it: FX keeps the later reads on the unmutated node, so converting it as a pure op would be wrong. Such a
        graph is left to torch.export, which functionalizes the mutation."""
        inplace = node.kwargs.get("inplace") is True or (
            node.op == "call_module" and getattr(self.modules[node.target], "inplace", False) is True)
        target = node.args[0] if node.args else None
        if not inplace or not isinstance(target, torch.fx.Node):
            return False
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)} if self.order is None else self.order
        self.order = order
        return any(order[user] > order[node] for user in target.users)

    def handler(self, node: torch.fx.Node) -> tuple[Callable | None, str]:
        if node.op == "get_attr":
            return _get_attr, f"attribute {node.target}"
        if node.op == "call_module":
            module = self.modules[node.target]
            if getattr(node.target, "startswith", None) and node.target.startswith("_guards"):
                return _skip, "export guard"
            return module_handler(module), f"module {type(module).__module__}.{type(module).__name__}"
        if node.op == "call_method":
            return METHOD_HANDLERS.get(node.target), f"method Tensor.{node.target}"
        target = node.target
        handler = FUNCTION_HANDLERS.get(target)
        if handler is None and isinstance(target, torch._ops.OpOverload):
            handler = FUNCTION_HANDLERS.get(target.overloadpacket, _aten_constant)
        if handler is None and _is_python_function(target):
            handler = _trace_through
        name = getattr(target, "__name__", str(target))
        module = getattr(target, "__module__", "") or ""
        return handler, f"function {module + '.' if module and not module.startswith('torch._ops') else ''}{name}"

    def output(self, result: Any) -> None:
        if _contains_unknown(result):
            return
        if self.out_spec is not None:
            result = torch.utils._pytree.tree_unflatten(list(result), self.out_spec)
        if isinstance(result, dict):
            self.unsupported.append("dict outputs (return a tensor or a tuple of tensors)")
            return

        def to_value(x):
            if isinstance(x, (tuple, list)):
                return tuple(to_value(i) for i in x)
            return self.value(x)

        self.graph.set_outputs(to_value(result))


def _contains_unknown(x: Any) -> bool:
    if x is UNKNOWN:
        return True
    if isinstance(x, (tuple, list)):
        return any(_contains_unknown(i) for i in x)
    if isinstance(x, dict):
        return any(_contains_unknown(i) for i in x.values())
    return False


def _is_const(x: Any) -> bool:
    if isinstance(x, (tuple, list)):
        return all(_is_const(i) for i in x)
    return not isinstance(x, (Value, _Unknown))


def _is_python_function(target: Any) -> bool:
    """A plain Python function called from ``forward`` that tracing kept opaque (``torch.fx.wrap``-ed)."""
    module = (getattr(target, "__module__", None) or "").split(".")[0]
    return callable(target) and hasattr(target, "__code__") and module not in ("torch", "math", "operator")


def _aten_constant(cv: _Converter, args, kwargs, node):
    """An ATen op without a conversion, on constants only (weight reshapes in an exported graph): evaluated now."""
    return node.target(*args, **kwargs)


def _trace_through(cv: _Converter, args, kwargs, node):
    """An opaque Python function (``torch.fx.wrap``-ed, e.g. a library's helper): trace its body with the
    arguments that are not tensors fixed, then convert that sub-graph in place; its nodes keep this call's origin."""
    fn = node.target
    signature = inspect.signature(fn)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise UnsupportedConstruct(f"cannot bind its arguments ({exc})") from None
    bound.apply_defaults()
    tensors = {k: v for k, v in bound.arguments.items() if isinstance(v, Value)}
    if any(_contains_value(v) for k, v in bound.arguments.items() if k not in tensors):
        raise UnsupportedConstruct("tensors inside containers passed to a wrapped function")
    concrete = {k: v for k, v in bound.arguments.items() if k not in tensors}
    try:
        gm = torch.fx.GraphModule(torch.nn.Module(), _LeafTracer().trace(fn, concrete_args=concrete))
    except Exception as exc:
        raise UnsupportedConstruct(f"cannot trace its body ({_first_line(exc)})") from None
    sub = _Converter(gm, cv.graph.name, cv.mode, graph=cv.graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    result = sub.walk({p: tensors[p.target] if p.target in tensors else (p.args[0] if p.args else None)
                       for p in placeholders}, origin=cv.origin())
    cv.unsupported.extend(sub.unsupported)
    return UNKNOWN if sub.unsupported else result


def _contains_value(x: Any) -> bool:
    if isinstance(x, (tuple, list)):
        return any(_contains_value(i) for i in x)
    if isinstance(x, dict):
        return any(_contains_value(i) for i in x.values())
    return isinstance(x, Value)


def _skip(cv, args, kwargs, node):
    return None


def _get_attr(cv: _Converter, args, kwargs, node):
    obj: Any = cv.gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj.detach() if isinstance(obj, torch.Tensor) else obj


# ------------------------------------------------------------------------------------------------ op helpers
def _conv(cv: _Converter, x, weight, bias, stride, padding, dilation, groups, nd: int, padding_mode="zeros"):
    if isinstance(weight, Value) or isinstance(bias, Value):
        raise UnsupportedConstruct("weights computed at run time (weights must be parameters or constants)")
    kernel = tuple(weight.shape[2:])
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * nd
        else:  # 'same': total padding d*(k-1), extra on the high side as torch does
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads = [(t // 2, t - t // 2) for t in totals]
    else:
        pads = [(p, p) for p in _tuple(padding, nd)]
    if padding_mode != "zeros" or any(lo != hi for lo, hi in pads):
        mode = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}
        flat = [p for lo_hi in reversed(pads) for p in lo_hi]
        x = cv.emit("pad", [x], {"pad": tuple(flat), "mode": mode[padding_mode], "value": 0.0})
        pads = [(0, 0)] * nd
    return cv.emit(f"conv{nd}d", [x], {"stride": stride, "padding": tuple(lo for lo, _ in pads),
                                       "dilation": dilation, "groups": int(groups)},
                   {"weight": weight, "bias": bias})


def _binary(op: str, fn: Callable):
    def handler(cv: _Converter, args, kwargs, node):
        a, b = args[0], args[1]
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if _is_const(a) and _is_const(b):
            return fn(a, b) if alpha == 1 else fn(a, b * alpha)
        if alpha != 1:
            b = b * alpha if _is_const(b) else cv.emit("mul", [b, cv.value(alpha, b)])
        like = a if isinstance(a, Value) else b
        return cv.emit(op, [cv.value(a, like), cv.value(b, like)])
    return handler


def _unary(op: str, **fixed):
    def handler(cv: _Converter, args, kwargs, node):
        return cv.emit(op, [args[0]], dict(fixed))
    return handler


def _unary_attrs(op: str, spec: Sequence[tuple[str, Any]], torch_names: dict[str, str] | None = None):
    """Handler for ``F.op(x, a=.., b=..)``: positional/keyword args after x map onto IR attrs in ``spec``."""
    names = torch_names or {}

    def handler(cv: _Converter, args, kwargs, node):
        attrs = {}
        for i, (name, default) in enumerate(spec):
            attrs[name] = _arg(args, kwargs, i + 1, names.get(name, name), default)
        return cv.emit(op, [args[0]], attrs)
    return handler


def _module_unary(op: str, attr_map: dict[str, str] | None = None):
    def handler(cv: _Converter, args, kwargs, node):
        module = cv.modules[node.target]
        attrs = {ir: getattr(module, torch_name) for ir, torch_name in (attr_map or {}).items()}
        return cv.emit(op, [args[0]], attrs)
    return handler


def _softmax(op: str):
    def handler(cv: _Converter, args, kwargs, node):
        dim = _arg(args, kwargs, 1, "dim")
        if dim is None:
            raise UnsupportedConstruct("implicit softmax dim (pass dim=...)")
        return cv.emit(op, [args[0]], {"dim": cv.dim(args[0], dim)})
    return handler


def _clamp(cv, x, lo, hi):
    if isinstance(lo, Value) or isinstance(hi, Value):
        raise UnsupportedConstruct("tensor-valued clamp bounds")
    return cv.emit("clamp", [x], {"min": None if lo is None else float(lo), "max": None if hi is None
                                  else float(hi)})


def _pool(cv, kind: str, nd: int, x, kernel, stride, padding, dilation=1, ceil_mode=False,
          count_include_pad=True, divisor_override=None, return_indices=False):
    if return_indices:
        raise UnsupportedConstruct("return_indices=True")
    if divisor_override:
        raise UnsupportedConstruct("divisor_override")
    kernel = _tuple(kernel, nd)
    stride = _tuple(stride, nd) if stride not in (None, [], ()) else kernel
    attrs = {"kernel_size": kernel, "stride": stride, "padding": _tuple(padding, nd), "ceil_mode": bool(ceil_mode)}
    if kind == "max":
        attrs["dilation"] = _tuple(dilation, nd)
    else:
        attrs["count_include_pad"] = bool(count_include_pad)
    return cv.emit(f"{kind}_pool{nd}d", [x], attrs)


def _adaptive(cv, kind: str, nd: int, x, output_size):
    spatial = cv.shape(x)[-nd:]
    size = tuple(s if o is None else int(o) for s, o in zip(spatial, _tuple_or_none(output_size, nd)))
    return cv.emit(f"adaptive_{kind}_pool{nd}d", [x], {"output_size": size})


def _tuple_or_none(v, n):
    if isinstance(v, (tuple, list)):
        return tuple(v)
    return (v,) * n


def _reshape(cv: _Converter, x, shape) -> Value:
    shape = [int(s) for s in shape]
    numel = int(np.prod(cv.shape(x)))
    if shape.count(-1) == 1:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = numel // known if known else 0
    if int(np.prod(shape)) != numel:
        raise FrontendError(f"{cv.where()}: cannot reshape {cv.shape(x)} to {tuple(shape)}")
    if tuple(shape) == cv.shape(x):
        return x
    return cv.emit("reshape", [x], {"shape": tuple(shape)})


def _shape_args(args: Sequence) -> list[int]:
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return list(args[0])
    return list(args)


def _permute(cv, x, dims):
    dims = tuple(cv.dim(x, d) for d in dims)
    if dims == tuple(range(len(dims))):
        return x
    return cv.emit("permute", [x], {"dims": dims})


def _transpose(cv, x, d0, d1):
    rank = len(cv.shape(x))
    dims = list(range(rank))
    a, b = cv.dim(x, d0), cv.dim(x, d1)
    dims[a], dims[b] = dims[b], dims[a]
    return _permute(cv, x, dims)


def _split_sizes(cv, x, size_or_sections, dim, chunks: int | None = None) -> tuple[int, ...]:
    length = cv.shape(x)[dim]
    if chunks is not None:
        step = math.ceil(length / chunks)
        return tuple(min(step, length - i) for i in range(0, length, step))
    if isinstance(size_or_sections, int):
        return tuple(min(size_or_sections, length - i) for i in range(0, length, size_or_sections))
    return tuple(int(s) for s in size_or_sections)


def _split(cv, x, sizes: tuple[int, ...], dim: int):
    if len(sizes) == 1:
        return (x,)
    outs = cv.emit("split", [x], {"split_sizes": sizes, "dim": dim})
    return tuple(outs)


def _reduce(op: str):
    def handler(cv: _Converter, args, kwargs, node):
        x = args[0]
        dim = _arg(args, kwargs, 1, "dim")
        keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
        if kwargs.get("dtype") is not None:
            raise UnsupportedConstruct("dtype= on reductions")
        rank = len(cv.shape(x))
        dims = tuple(range(rank)) if dim is None or dim == [] else tuple(
            sorted(cv.dim(x, d) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))))
        return cv.emit(op, [x], {"dim": dims, "keepdim": keepdim})
    return handler


def _getitem(cv: _Converter, args, kwargs, node):
    obj, index = args
    if not isinstance(obj, Value):
        if _is_const(index):
            return obj[index]
        raise UnsupportedConstruct("indexing a constant with a tensor")
    return _index_tensor(cv, obj, index)


def _index_tensor(cv: _Converter, x: Value, index) -> Value:
    """Basic indexing ``x[i, a:b, None, ...]`` as select / slice / reshape ops (advanced indexing refused)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (Value, torch.Tensor, list)) for i in items):
        raise UnsupportedConstruct("advanced (tensor or list) indexing")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(cv.shape(x)) - explicit)
    dim, new_axes = 0, []
    for item in items:
        shape = cv.shape(x)
        if item is None:
            new_axes.append(dim)
            continue
        if isinstance(item, bool) or not isinstance(item, (int, slice)):
            raise UnsupportedConstruct(f"index of type {type(item).__name__}")
        if isinstance(item, int):
            if not -shape[dim] <= item < shape[dim]:
                raise FrontendError(f"{cv.where()}: index {item} out of range for dim {dim} of size {shape[dim]}")
            x = cv.emit("select", [x], {"dim": dim, "index": item % shape[dim]})
            continue
        start, stop, step = item.indices(shape[dim])
        if step <= 0:
            raise UnsupportedConstruct("negative slice steps")
        if (start, stop, step) != (0, shape[dim], 1):
            x = cv.emit("slice", [x], {"dim": dim, "start": start, "end": max(stop, start), "step": step})
        dim += 1
    if new_axes:
        shape = list(cv.shape(x))
        for offset, axis in enumerate(new_axes):
            shape.insert(axis + offset, 1)
        x = _reshape(cv, x, shape)
    return x


def _rnn_module(kind: str):
    def handler(cv: _Converter, args, kwargs, node):
        module = cv.modules[node.target]
        if getattr(module, "proj_size", 0):
            raise UnsupportedConstruct("LSTM proj_size > 0")
        x = args[0]
        hx = _arg(args, kwargs, 1, "hx")
        if isinstance(x, Value) and len(cv.shape(x)) != 3:
            raise UnsupportedConstruct("unbatched (2-d) RNN input; add a batch dimension")
        attrs = {"hidden_size": module.hidden_size, "num_layers": module.num_layers,
                 "bidirectional": module.bidirectional, "batch_first": module.batch_first, "bias": module.bias}
        if kind == "rnn":
            attrs["nonlinearity"] = module.nonlinearity
        params = {name: p.detach() for name, p in module.named_parameters()}  # copied by emit
        return _emit_rnn(cv, kind, x, hx, attrs, params)
    return handler


def _emit_rnn(cv: _Converter, kind: str, x, hx, attrs: dict, params: dict):
    states = [] if hx is None else (list(hx) if kind == "lstm" else [hx])
    if states and all(_is_const(s) and not torch.as_tensor(s).any() for s in states):
        states = []  # explicit zero initial state == no initial state
    outs = cv.emit(kind, [x, *states], attrs, params)
    return (outs[0], (outs[1], outs[2])) if kind == "lstm" else (outs[0], outs[1])


# ------------------------------------------------------------------------------------------------ module handlers
def _m_conv(nd: int):
    def handler(cv, args, kwargs, node):
        m = cv.modules[node.target]
        return _conv(cv, args[0], cv.param(m, "weight"), cv.param(m, "bias"), m.stride, m.padding, m.dilation,
                     m.groups, nd, m.padding_mode)
    return handler


def _m_conv_transpose(nd: int):
    def handler(cv, args, kwargs, node):
        m = cv.modules[node.target]
        if len(args) > 1 or kwargs.get("output_size") is not None:
            raise UnsupportedConstruct("output_size argument")
        if m.padding_mode != "zeros":
            raise UnsupportedConstruct(f"padding_mode={m.padding_mode!r}")
        return cv.emit(f"conv_transpose{nd}d", [args[0]],
                       {"stride": _tuple(m.stride, nd), "padding": _tuple(m.padding, nd),
                        "output_padding": _tuple(m.output_padding, nd), "groups": m.groups,
                        "dilation": _tuple(m.dilation, nd)},
                       {"weight": cv.param(m, "weight"), "bias": cv.param(m, "bias")})
    return handler


def _m_batch_norm(cv, args, kwargs, node):
    m = cv.modules[node.target]
    if m.running_mean is None:
        raise UnsupportedConstruct("BatchNorm without running statistics (track_running_stats=False)")
    return cv.emit("batch_norm", [args[0]], {"eps": float(m.eps)},
                   {"running_mean": m.running_mean, "running_var": m.running_var,
                    "weight": cv.param(m, "weight"), "bias": cv.param(m, "bias")})


def _m_linear(cv, args, kwargs, node):
    m = cv.modules[node.target]
    return cv.emit("linear", [args[0]], {}, {"weight": cv.param(m, "weight"), "bias": cv.param(m, "bias")})


def _m_pool(kind: str, nd: int):
    def handler(cv, args, kwargs, node):
        m = cv.modules[node.target]
        extra = {"dilation": m.dilation, "return_indices": m.return_indices} if kind == "max" else {
            "count_include_pad": m.count_include_pad, "divisor_override": getattr(m, "divisor_override", None)}
        return _pool(cv, kind, nd, args[0], m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode, **extra)
    return handler


def _m_adaptive(kind: str, nd: int):
    def handler(cv, args, kwargs, node):
        m = cv.modules[node.target]
        if getattr(m, "return_indices", False):
            raise UnsupportedConstruct("return_indices=True")
        return _adaptive(cv, kind, nd, args[0], m.output_size)
    return handler


def _m_flatten(cv, args, kwargs, node):
    m = cv.modules[node.target]
    return _flatten(cv, args[0], m.start_dim, m.end_dim)


def _flatten(cv, x, start_dim=0, end_dim=-1):
    rank = len(cv.shape(x))
    if rank == 0:
        return _reshape(cv, x, [1])
    start, end = cv.dim(x, start_dim), cv.dim(x, end_dim)
    if start >= end:
        return x
    return cv.emit("flatten", [x], {"start_dim": start, "end_dim": end})


def _m_softmax(op: str):
    def handler(cv, args, kwargs, node):
        m = cv.modules[node.target]
        if m.dim is None:
            raise UnsupportedConstruct("implicit softmax dim (set dim=...)")
        return cv.emit(op, [args[0]], {"dim": cv.dim(args[0], m.dim)})
    return handler


def _m_hardtanh(cv, args, kwargs, node):
    m = cv.modules[node.target]
    return _clamp(cv, args[0], m.min_val, m.max_val)


def _m_embedding(cv, args, kwargs, node):
    m = cv.modules[node.target]
    if m.max_norm is not None:
        raise UnsupportedConstruct("Embedding max_norm (it renormalizes weights during the forward pass)")
    return cv.emit("embedding", [args[0]], {}, {"weight": cv.param(m, "weight")})


def _m_dropout(cv, args, kwargs, node):
    return cv.emit("dropout", [args[0]], {"p": float(cv.modules[node.target].p)})


def _m_layer_norm(cv, args, kwargs, node):
    m = cv.modules[node.target]
    return _layer_norm(cv, args[0], m.normalized_shape, cv.param(m, "weight"), cv.param(m, "bias"), m.eps)


def _m_group_norm(cv, args, kwargs, node):
    m = cv.modules[node.target]
    return _group_norm(cv, args[0], m.num_groups, cv.param(m, "weight"), cv.param(m, "bias"), m.eps)


def _m_instance_norm(cv, args, kwargs, node):
    m = cv.modules[node.target]
    return _instance_norm(cv, args[0], m.running_mean, m.running_var, cv.param(m, "weight"), cv.param(m, "bias"),
                          m.running_mean is None, m.eps)


MODULE_HANDLERS: dict[type, Callable] = {
    nn.Conv1d: _m_conv(1), nn.Conv2d: _m_conv(2),
    nn.ConvTranspose1d: _m_conv_transpose(1), nn.ConvTranspose2d: _m_conv_transpose(2),
    nn.BatchNorm1d: _m_batch_norm, nn.BatchNorm2d: _m_batch_norm, nn.Linear: _m_linear,
    nn.ReLU: _unary("relu"), nn.ReLU6: _unary("relu6"), nn.SiLU: _unary("silu"), nn.Mish: _unary("mish"),
    nn.Sigmoid: _unary("sigmoid"), nn.Tanh: _unary("tanh"), nn.Hardswish: _unary("hardswish"),
    nn.Hardsigmoid: _unary("hardsigmoid"),
    nn.LeakyReLU: _module_unary("leaky_relu", {"negative_slope": "negative_slope"}),
    nn.ELU: _module_unary("elu", {"alpha": "alpha"}),
    nn.GELU: _module_unary("gelu", {"approximate": "approximate"}),
    nn.Hardtanh: _m_hardtanh, nn.Softmax: _m_softmax("softmax"), nn.LogSoftmax: _m_softmax("log_softmax"),
    nn.MaxPool1d: _m_pool("max", 1), nn.MaxPool2d: _m_pool("max", 2),
    nn.AvgPool1d: _m_pool("avg", 1), nn.AvgPool2d: _m_pool("avg", 2),
    nn.AdaptiveAvgPool1d: _m_adaptive("avg", 1), nn.AdaptiveAvgPool2d: _m_adaptive("avg", 2),
    nn.AdaptiveMaxPool1d: _m_adaptive("max", 1), nn.AdaptiveMaxPool2d: _m_adaptive("max", 2),
    nn.Flatten: _m_flatten, nn.Dropout: _m_dropout, nn.Dropout1d: _m_dropout, nn.Dropout2d: _m_dropout,
    nn.Dropout3d: _m_dropout, nn.AlphaDropout: _m_dropout, nn.FeatureAlphaDropout: _m_dropout,
    nn.LayerNorm: _m_layer_norm, nn.GroupNorm: _m_group_norm, nn.InstanceNorm1d: _m_instance_norm,
    nn.InstanceNorm2d: _m_instance_norm,
    nn.Identity: _unary("identity"), nn.Embedding: _m_embedding,
    nn.LocalResponseNorm: _module_unary("lrn", {"size": "size", "alpha": "alpha", "beta": "beta", "k": "k"}),
    nn.LSTM: _rnn_module("lstm"), nn.GRU: _rnn_module("gru"), nn.RNN: _rnn_module("rnn"),
}


# ------------------------------------------------------------------------------------------------ functions
def _f_conv(nd: int):
    def handler(cv, args, kwargs, node):
        get = lambda i, n, d=None: _arg(args, kwargs, i, n, d)  # noqa: E731
        return _conv(cv, args[0], get(1, "weight"), get(2, "bias"), get(3, "stride", 1), get(4, "padding", 0),
                     get(5, "dilation", 1), get(6, "groups", 1), nd)
    return handler


def _f_linear(cv, args, kwargs, node):
    weight, bias = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if isinstance(weight, Value) or isinstance(bias, Value):
        if bias is None:  # x @ w.T with a computed weight: a plain matmul
            return cv.emit("matmul", [args[0], _transpose(cv, weight, -1, -2)])
        raise UnsupportedConstruct("linear with weights computed at run time")
    return cv.emit("linear", [args[0]], {}, {"weight": weight, "bias": bias})


def _f_pool(kind: str, nd: int):
    def handler(cv, args, kwargs, node):
        get = lambda i, n, d=None: _arg(args, kwargs, i, n, d)  # noqa: E731
        if kind == "max":
            return _pool(cv, kind, nd, args[0], get(1, "kernel_size"), get(2, "stride"), get(3, "padding", 0),
                         get(4, "dilation", 1), get(5, "ceil_mode", False),
                         return_indices=get(6, "return_indices", False))
        return _pool(cv, kind, nd, args[0], get(1, "kernel_size"), get(2, "stride"), get(3, "padding", 0),
                     ceil_mode=get(4, "ceil_mode", False), count_include_pad=get(5, "count_include_pad", True),
                     divisor_override=get(6, "divisor_override"))
    return handler


def _f_adaptive(kind: str, nd: int):
    def handler(cv, args, kwargs, node):
        if _arg(args, kwargs, 2, "return_indices", False):
            raise UnsupportedConstruct("return_indices=True")
        return _adaptive(cv, kind, nd, args[0], _arg(args, kwargs, 1, "output_size"))
    return handler


def _f_dropout(cv, args, kwargs, node):
    """Every dropout variant is the identity in inference. A functional call with ``training=True`` written out
    (``F.dropout(x, 0.5)``, whose default is True) is random even in eval mode; we convert it as inference."""
    return cv.emit("dropout", [args[0]], {"p": float(_arg(args, kwargs, 1, "p", 0.5))})


def _f_clamp(cv, args, kwargs, node):
    return _clamp(cv, args[0], _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max"))


def _f_hardtanh(cv, args, kwargs, node):
    return _clamp(cv, args[0], _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0))


def _f_cat(op: str):
    def handler(cv, args, kwargs, node):
        tensors = list(_arg(args, kwargs, 0, "tensors"))
        dim = _arg(args, kwargs, 1, "dim", 0)
        if all(_is_const(t) for t in tensors):
            return (torch.cat if op == "concat" else torch.stack)(tensors, dim)
        ref = next(t for t in tensors if isinstance(t, Value))
        rank = len(cv.shape(ref)) + (1 if op == "stack" else 0)
        return cv.emit(op, tensors, {"dim": dim % rank})
    return handler


def _f_flatten(cv, args, kwargs, node):
    return _flatten(cv, args[0], _arg(args, kwargs, 1, "start_dim", 0), _arg(args, kwargs, 2, "end_dim", -1))


def _f_reshape(cv, args, kwargs, node):
    return _reshape(cv, args[0], _shape_args(args[1:]) or list(kwargs.get("shape", ())))


def _f_permute(cv, args, kwargs, node):
    return _permute(cv, args[0], _shape_args(args[1:]) or list(kwargs.get("dims", ())))


def _f_transpose(cv, args, kwargs, node):
    return _transpose(cv, args[0], _arg(args, kwargs, 1, "dim0"), _arg(args, kwargs, 2, "dim1"))


def _f_t(cv, args, kwargs, node):
    return _transpose(cv, args[0], 0, 1) if len(cv.shape(args[0])) == 2 else args[0]


def _f_chunk(cv, args, kwargs, node):
    x, chunks, dim = args[0], _arg(args, kwargs, 1, "chunks"), cv.dim(args[0], _arg(args, kwargs, 2, "dim", 0))
    return _split(cv, x, _split_sizes(cv, x, None, dim, chunks=int(chunks)), dim)


def _f_split(cv, args, kwargs, node):
    x = args[0]
    size = _arg(args, kwargs, 1, "split_size_or_sections", kwargs.get("split_size"))
    dim = cv.dim(x, _arg(args, kwargs, 2, "dim", 0))
    return _split(cv, x, _split_sizes(cv, x, size, dim), dim)


def _f_squeeze(cv, args, kwargs, node):
    x, dim = args[0], _arg(args, kwargs, 1, "dim")
    shape = list(cv.shape(x))
    dims = range(len(shape)) if dim is None else [cv.dim(x, d) for d in (dim if isinstance(dim, (tuple, list))
                                                                          else (dim,))]
    keep = [s for i, s in enumerate(shape) if not (i in dims and s == 1)]
    return _reshape(cv, x, keep)


def _f_unsqueeze(cv, args, kwargs, node):
    x, dim = args[0], _arg(args, kwargs, 1, "dim")
    shape = list(cv.shape(x))
    shape.insert(dim % (len(shape) + 1), 1)
    return _reshape(cv, x, shape)


def _f_size(cv, args, kwargs, node):
    shape = torch.Size(cv.shape(args[0]))
    dim = _arg(args, kwargs, 1, "dim")
    return shape if dim is None else shape[dim]


def _f_getattr(cv, args, kwargs, node):
    obj, name = args[0], args[1]
    if isinstance(obj, Value):
        if name == "shape":
            return torch.Size(cv.shape(obj))
        if name == "ndim":
            return len(cv.shape(obj))
        if name == "dtype":
            return getattr(torch, cv.type(obj).dtype)
        raise UnsupportedConstruct(f"tensor attribute .{name}")
    return getattr(obj, name)


def _f_passthrough(cv, args, kwargs, node):
    return args[0]


def _f_to(cv, args, kwargs, node):
    """``x.to(dtype)`` / ``x.float()``: free when the dtype already matches; otherwise a ``cast``."""
    x = args[0]
    target = node.target
    if target in ("float", "double", "half", "long", "int"):
        dtype = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32"}[target]
    else:
        dtypes = [a for a in list(args[1:]) + list(kwargs.values()) if isinstance(a, torch.dtype)]
        if not dtypes:
            return x  # device moves are no-ops for the IR
        dtype = numpy_dtype(dtypes[0])
    if not isinstance(x, Value):
        return x.to(getattr(torch, dtype))
    return x if cv.type(x).dtype == dtype else cv.emit("cast", [x], {"dtype": dtype})


def _f_embedding(cv, args, kwargs, node):
    weight = _arg(args, kwargs, 1, "weight")
    if isinstance(weight, Value):
        raise UnsupportedConstruct("embedding with a computed weight")
    return cv.emit("embedding", [args[0]], {}, {"weight": weight})


def _f_pad(cv, args, kwargs, node):
    mode = _arg(args, kwargs, 2, "mode", "constant")
    value = _arg(args, kwargs, 3, "value", None)
    return cv.emit("pad", [args[0]], {"pad": tuple(_arg(args, kwargs, 1, "pad")), "mode": mode,
                                      "value": float(value or 0.0)})


def _f_max(cv, args, kwargs, node):
    """``torch.max(x, dim)`` returns (values, indices): only the values path is supported."""
    if len(args) >= 2 and isinstance(args[1], (Value, torch.Tensor)):
        return cv.emit("maximum", [args[0], args[1]])
    dim = _arg(args, kwargs, 1, "dim")
    if dim is None:
        return cv.emit("amax", [args[0]], {"dim": tuple(range(len(cv.shape(args[0])))), "keepdim": False})
    raise UnsupportedConstruct("max over a dim (returns indices); use amax")


def _f_matmul(cv, args, kwargs, node):
    a, b = args[0], args[1]
    if isinstance(b, torch.Tensor) and isinstance(a, Value) and b.dim() == 2:
        return cv.emit("linear", [a], {}, {"weight": b.t().contiguous()})
    return cv.emit("matmul", [cv.value(a), cv.value(b)])


def _f_neg(cv, args, kwargs, node):
    return -args[0] if _is_const(args[0]) else cv.emit("neg", [args[0]])


def _f_const_only(fn: Callable):
    """Tensor factories (``torch.zeros(...)``): evaluated at import, they become constants."""
    def handler(cv, args, kwargs, node):
        if not (_is_const(args) and _is_const(list(kwargs.values()))):
            raise UnsupportedConstruct("used on run-time values")
        return fn(*args, **kwargs)
    return handler


# ---- ATen forms seen in torch.export graphs (only where they differ from the functional forms) ----
def _a_batch_norm(cv, args, kwargs, node):
    x, weight, bias, mean, var = args[:5]
    training, eps = (args[5], args[7]) if node.target.overloadpacket == aten.batch_norm else (False, args[6])
    if training:
        raise UnsupportedConstruct("BatchNorm in training mode (call model.eval())")
    out = cv.emit("batch_norm", [x], {"eps": float(eps)},
                  {"running_mean": mean, "running_var": var, "weight": weight, "bias": bias})
    return out if node.target.overloadpacket == aten.batch_norm else (out, None, None)


def _a_rnn(kind: str):
    def handler(cv, args, kwargs, node):
        x, hx, flat, has_biases, num_layers, _dropout, training, bidirectional, batch_first = args[:9]
        if training:
            raise UnsupportedConstruct("RNN in training mode (call model.eval())")
        directions = ("", "_reverse")[: 2 if bidirectional else 1]
        names = [f"{w}_l{layer}{d}" for layer in range(num_layers) for d in directions
                 for w in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if has_biases else ())]
        if len(flat) != len(names):  # an LSTM with proj_size > 0 has a weight_hr per layer and direction
            raise UnsupportedConstruct("LSTM proj_size > 0")
        attrs = {"hidden_size": int(flat[1].shape[1]), "num_layers": num_layers, "bidirectional": bidirectional,
                 "batch_first": batch_first, "bias": has_biases}
        if kind.startswith("rnn_"):
            attrs["nonlinearity"] = "tanh" if kind == "rnn_tanh" else "relu"
        out = _emit_rnn(cv, "lstm" if kind == "lstm" else ("gru" if kind == "gru" else "rnn"), x,
                        list(hx) if kind == "lstm" else hx, attrs, dict(zip(names, flat)))
        return (out[0], *out[1]) if kind == "lstm" else out
    return handler


def _a_slice(cv, args, kwargs, node):
    x, dim = args[0], _arg(args, kwargs, 1, "dim", 0)
    start, end, step = _arg(args, kwargs, 2, "start"), _arg(args, kwargs, 3, "end"), _arg(args, kwargs, 4, "step", 1)
    index = [slice(None)] * cv.dim(x, dim) + [slice(start, end, step)]
    return _index_tensor(cv, x, tuple(index))


def _a_select(cv, args, kwargs, node):
    x, dim, index = args[0], args[1], args[2]
    return _index_tensor(cv, x, tuple([slice(None)] * cv.dim(x, dim) + [index]))


def _a_convolution(cv, args, kwargs, node):
    x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args[:9]
    nd = len(cv.shape(x)) - 2
    if not transposed:
        return _conv(cv, x, weight, bias, stride, padding, dilation, groups, nd)
    if isinstance(weight, Value) or isinstance(bias, Value):
        raise UnsupportedConstruct("weights computed at run time (weights must be parameters or constants)")
    return cv.emit(f"conv_transpose{nd}d", [x], {"stride": _tuple(stride, nd), "padding": _tuple(padding, nd),
                                                 "output_padding": _tuple(output_padding, nd), "groups": int(groups),
                                                 "dilation": _tuple(dilation, nd)}, {"weight": weight, "bias": bias})


def _a_addmm(cv, args, kwargs, node):
    """``beta * bias + alpha * (x @ w)``: a ``linear`` when w is constant (export writes Linear as addmm(b, x, w.T))."""
    bias, x, w = args[:3]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if isinstance(w, Value) or isinstance(bias, Value):
        raise UnsupportedConstruct("addmm with run-time weights")
    return cv.emit("linear", [x], {}, {"weight": (w * alpha).t().contiguous(), "bias": bias * beta})


def _a_expand(cv, args, kwargs, node):
    """``x.expand(*sizes)``: a broadcast, written as x + zeros(sizes) (the identity when no dim grows)."""
    x, sizes = args[0], _shape_args(args[1:]) or list(kwargs.get("size", ()))
    shape = cv.shape(x)
    sizes = [s if s != -1 else shape[i - len(sizes) + len(shape)] for i, s in enumerate(sizes)]
    if tuple(sizes) == tuple(shape):
        return x
    return cv.emit("add", [x, cv.value(torch.zeros(sizes, dtype=getattr(torch, cv.type(x).dtype)))])


def _a_pool_with_indices(cv, args, kwargs, node):
    """``aten.max_pool2d_with_indices``: (values, indices); only the values may be used."""
    get = lambda i, n, d=None: _arg(args, kwargs, i, n, d)  # noqa: E731
    nd = len(cv.shape(args[0])) - 2
    out = _pool(cv, "max", nd, args[0], get(1, "kernel_size"), get(2, "stride"), get(3, "padding", 0),
                get(4, "dilation", 1), get(5, "ceil_mode", False))
    return out, None


def _f_identity_in_inference(cv, args, kwargs, node):
    """Stochastic depth, DropBlock, ``torch._assert``-free regularizers: identities with eval semantics (the
    frontend always converts a model as in eval mode, whatever its ``training`` flags say)."""
    return _arg(args, kwargs, 0, "input")


def _layer_norm(cv, x, normalized_shape, weight, bias, eps):
    if isinstance(weight, Value) or isinstance(bias, Value):
        raise UnsupportedConstruct("layer norm with run-time weights")
    shape = tuple(int(s) for s in normalized_shape)
    if cv.shape(x)[len(cv.shape(x)) - len(shape):] != shape:
        raise FrontendError(f"{cv.where()}: normalized_shape {shape} is not the trailing shape of {cv.shape(x)}")
    return cv.emit("layer_norm", [x], {"normalized_shape": shape, "eps": float(eps)},
                   {"weight": weight, "bias": bias})


def _group_norm(cv, x, num_groups, weight, bias, eps):
    if isinstance(weight, Value) or isinstance(bias, Value):
        raise UnsupportedConstruct("group norm with run-time weights")
    return cv.emit("group_norm", [x], {"num_groups": int(num_groups), "eps": float(eps)},
                   {"weight": weight, "bias": bias})


def _instance_norm(cv, x, running_mean, running_var, weight, bias, use_input_stats, eps):
    """Instance norm = group norm with one group per channel; with running statistics (``use_input_stats`` false:
    ``track_running_stats`` in eval mode) it is a batch norm."""
    if any(isinstance(t, Value) for t in (running_mean, running_var, weight, bias)):
        raise UnsupportedConstruct("instance norm with run-time weights")
    if not use_input_stats and running_mean is not None:
        return cv.emit("batch_norm", [x], {"eps": float(eps)}, {"running_mean": running_mean,
                                                               "running_var": running_var, "weight": weight,
                                                               "bias": bias})
    return _group_norm(cv, x, cv.shape(x)[1], weight, bias, eps)


def _f_instance_norm(cv, args, kwargs, node):
    names = ("running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
    get = {n: _arg(args, kwargs, i + 1, n, {"use_input_stats": True, "eps": 1e-5}.get(n))
           for i, n in enumerate(names)}
    return _instance_norm(cv, args[0], get["running_mean"], get["running_var"], get["weight"], get["bias"],
                          get["use_input_stats"], get["eps"])


def _f_layer_norm(cv, args, kwargs, node):
    get = lambda i, n, d=None: _arg(args, kwargs, i, n, d)  # noqa: E731
    return _layer_norm(cv, args[0], get(1, "normalized_shape"), get(2, "weight"), get(3, "bias"), get(4, "eps", 1e-5))


def _f_group_norm(cv, args, kwargs, node):
    get = lambda i, n, d=None: _arg(args, kwargs, i, n, d)  # noqa: E731
    return _group_norm(cv, args[0], get(1, "num_groups"), get(2, "weight"), get(3, "bias"), get(4, "eps", 1e-5))


def _a_native_layer_norm(cv, args, kwargs, node):
    """``aten.native_layer_norm``: (y, mean, rstd); only y may be used."""
    return _layer_norm(cv, *args[:5]), None, None


def _a_native_group_norm(cv, args, kwargs, node):
    """``aten.native_group_norm(x, weight, bias, N, C, HxW, group, eps)``: (y, mean, rstd); only y may be used."""
    x, weight, bias, _n, _c, _hw, groups, eps = args[:8]
    return _group_norm(cv, x, groups, weight, bias, eps), None, None


def _interpolate(cv, x, size=None, scale_factor=None, mode="nearest", align_corners=None,
                 recompute_scale_factor=None, antialias=False):
    """``F.interpolate`` onto the ``interpolate`` op. A ``scale_factor`` is kept only where it maps coordinates
    differently from in/out (torch uses 1/scale unless recompute_scale_factor); otherwise the sizes say it all."""
    if antialias:
        raise UnsupportedConstruct("antialias=True")
    if mode not in ("nearest", "nearest-exact", "bilinear"):
        raise UnsupportedConstruct(f"mode={mode!r} (supported: nearest, nearest-exact, bilinear)")
    spatial = cv.shape(x)[2:]
    if size is not None:
        size, scales = _tuple(size, len(spatial)), None
    elif scale_factor is None:
        raise FrontendError(f"{cv.where()}: interpolate needs size or scale_factor")
    else:
        scales = tuple(float(f) for f in (scale_factor if isinstance(scale_factor, (tuple, list))
                                          else [scale_factor] * len(spatial)))
        size = tuple(int(math.floor(i * f)) for i, f in zip(spatial, scales))
        if recompute_scale_factor or all(abs(1 / f - i / o) < 1e-12 for f, i, o in zip(scales, spatial, size)):
            scales = None
    return cv.emit("interpolate", [x], {"size": size, "mode": mode, "align_corners": bool(align_corners),
                                        "scale_factor": scales})


def _f_interpolate(cv, args, kwargs, node):
    names = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
    return _interpolate(cv, args[0], **{n: _arg(args, kwargs, i + 1, n) for i, n in enumerate(names)
                                        if _arg(args, kwargs, i + 1, n) is not None})


def _a_upsample(mode: str):
    """``aten.upsample_{nearest,bilinear}2d[.vec]``: (x, output_size, [align_corners,] scales...)."""
    def handler(cv, args, kwargs, node):
        x, rest = args[0], list(args[1:])
        size = rest.pop(0) if rest else kwargs.get("output_size")
        align = bool(rest.pop(0)) if mode == "bilinear" else False
        if node.target._overloadname == "vec":
            scales = rest[0] if rest else kwargs.get("scale_factors")
        else:  # .default: scales_h, scales_w (None when the size was given)
            scales = None if size is not None or not rest or rest[0] is None else list(rest)
        return _interpolate(cv, x, size=size if size else None, scale_factor=scales, mode=mode, align_corners=align)
    return handler


def _a_pad(mode: str):
    """``aten.constant_pad_nd(x, pad, value)``, ``aten.reflection_pad2d(x, pad)``, ...: the ``pad`` op."""
    def handler(cv, args, kwargs, node):
        value = _arg(args, kwargs, 2, "value", 0.0) if mode == "constant" else 0.0
        return cv.emit("pad", [args[0]], {"pad": tuple(int(p) for p in args[1]), "mode": mode, "value": float(value)})
    return handler


def _a_rsqrt(cv, args, kwargs, node):
    return cv.emit("div", [cv.value(1.0, args[0]), cv.emit("sqrt", [args[0]])])


def _a_reciprocal(cv, args, kwargs, node):
    return cv.emit("div", [cv.value(1.0, args[0]), args[0]])


FUNCTION_HANDLERS: dict[Any, Callable] = {}


def _register(handler: Callable, *targets: Any) -> None:
    for target in targets:
        FUNCTION_HANDLERS[target] = handler


_register(_f_conv(1), F.conv1d, torch.conv1d, aten.conv1d)
_register(_f_conv(2), F.conv2d, torch.conv2d, aten.conv2d)
_register(_f_linear, F.linear, aten.linear)
for _kind in ("max", "avg"):
    for _nd in (1, 2):
        _register(_f_pool(_kind, _nd), getattr(F, f"{_kind}_pool{_nd}d"), getattr(aten, f"{_kind}_pool{_nd}d"))
        _register(_f_adaptive(_kind, _nd), getattr(F, f"adaptive_{_kind}_pool{_nd}d"),
                  getattr(aten, f"adaptive_{_kind}_pool{_nd}d"))
_register(_binary("add", operator.add), operator.add, torch.add, aten.add)
_register(_binary("sub", operator.sub), operator.sub, torch.sub, aten.sub)
_register(_binary("mul", operator.mul), operator.mul, torch.mul, aten.mul)
_register(_binary("div", operator.truediv), operator.truediv, torch.div, aten.div)
_register(_f_matmul, operator.matmul, torch.matmul, aten.matmul, torch.mm, aten.mm, torch.bmm, aten.bmm)
_register(_unary("relu"), F.relu, torch.relu, aten.relu)
_register(_unary("relu6"), F.relu6, aten.relu6)
_register(_unary("silu"), F.silu, aten.silu)
_register(_unary("mish"), F.mish, aten.mish)
_register(_unary("sigmoid"), torch.sigmoid, F.sigmoid, aten.sigmoid)
_register(_unary("tanh"), torch.tanh, F.tanh, aten.tanh)
_register(_unary("hardswish"), F.hardswish, aten.hardswish)
_register(_unary("hardsigmoid"), F.hardsigmoid, aten.hardsigmoid)
_register(_unary("exp"), torch.exp, aten.exp)
_register(_unary("sqrt"), torch.sqrt, aten.sqrt)
_register(_unary("abs"), torch.abs, aten.abs)
_register(_unary("erf"), torch.erf, torch.special.erf, aten.erf)
_register(_unary_attrs("leaky_relu", [("negative_slope", 0.01)]), F.leaky_relu, aten.leaky_relu)
_register(_unary_attrs("elu", [("alpha", 1.0)]), F.elu, aten.elu)
_register(_unary_attrs("gelu", [("approximate", "none")]), F.gelu, aten.gelu)
_register(_softmax("softmax"), F.softmax, torch.softmax, aten.softmax, aten._softmax)
_register(_softmax("log_softmax"), F.log_softmax, torch.log_softmax, aten.log_softmax, aten._log_softmax)
_register(_f_hardtanh, F.hardtanh, aten.hardtanh)
_register(_f_clamp, torch.clamp, torch.clip, aten.clamp, aten.clip)
_register(_f_dropout, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
          torch.dropout, torch.feature_dropout, torch.alpha_dropout, torch.feature_alpha_dropout, aten.dropout,
          aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout)
_register(_skip, torch._assert, aten._assert_async, aten._assert_scalar, aten.sym_constrain_range_for_size)
_register(_f_layer_norm, F.layer_norm, aten.layer_norm)
_register(_f_group_norm, F.group_norm, aten.group_norm)
_register(_f_instance_norm, F.instance_norm, aten.instance_norm)
_register(_a_native_layer_norm, aten.native_layer_norm)
_register(_a_native_group_norm, aten.native_group_norm)
_register(_f_interpolate, F.interpolate, F.upsample)
_register(_a_upsample("nearest"), aten.upsample_nearest1d, aten.upsample_nearest2d)
_register(_a_upsample("nearest-exact"), aten._upsample_nearest_exact1d, aten._upsample_nearest_exact2d)
_register(_a_upsample("bilinear"), aten.upsample_bilinear2d)
_register(_a_pad("constant"), aten.constant_pad_nd)
_register(_a_pad("reflect"), aten.reflection_pad1d, aten.reflection_pad2d)
_register(_a_pad("replicate"), aten.replication_pad1d, aten.replication_pad2d)
_register(_a_convolution, aten.convolution)
_register(_a_addmm, aten.addmm)
_register(_a_expand, aten.expand)
_register(_a_pool_with_indices, aten.max_pool1d_with_indices, aten.max_pool2d_with_indices)
_register(_f_adaptive("avg", 2), aten._adaptive_avg_pool2d)
_register(_a_rsqrt, aten.rsqrt)
_register(_a_reciprocal, aten.reciprocal)
try:  # torchvision's fx-wrapped regularizers: identities in inference
    from torchvision.ops import drop_block2d, drop_block3d, stochastic_depth
    _register(_f_identity_in_inference, stochastic_depth, drop_block2d, drop_block3d)
except ImportError:  # without torchvision, traced through like any wrapped function
    pass
_register(_f_cat("concat"), torch.cat, torch.concat, aten.cat, aten.concat)
_register(_f_cat("stack"), torch.stack, aten.stack)
_register(_f_flatten, torch.flatten, aten.flatten)
_register(_f_reshape, torch.reshape, aten.reshape, aten.view, aten._unsafe_view)
_register(_f_permute, torch.permute, aten.permute)
_register(_f_transpose, torch.transpose, aten.transpose, torch.swapaxes)
_register(_f_t, torch.t, aten.t)
_register(_f_chunk, torch.chunk, aten.chunk)
_register(_f_split, torch.split, aten.split, aten.split_with_sizes)
_register(_f_squeeze, torch.squeeze, aten.squeeze)
_register(_f_unsqueeze, torch.unsqueeze, aten.unsqueeze)
_register(_reduce("mean"), torch.mean, aten.mean)
_register(_reduce("sum"), torch.sum, aten.sum)
_register(_reduce("amax"), torch.amax, aten.amax)
_register(_f_max, torch.max, torch.maximum, aten.maximum)
_register(_getitem, operator.getitem)
_register(_f_getattr, getattr)
_register(_f_embedding, F.embedding, aten.embedding)
_register(_f_pad, F.pad, aten.pad)
_register(_f_neg, operator.neg, torch.neg, aten.neg)
_register(_f_passthrough, aten.contiguous, aten.clone, aten.alias, aten.lift_fresh_copy, aten.detach)
_register(_f_to, aten.to, aten._to_copy)
_register(_a_batch_norm, aten.batch_norm, aten._native_batch_norm_legit_no_training)
_register(_a_rnn("lstm"), aten.lstm)
_register(_a_rnn("gru"), aten.gru)
_register(_a_rnn("rnn_tanh"), aten.rnn_tanh)
_register(_a_rnn("rnn_relu"), aten.rnn_relu)
_register(_a_slice, aten.slice)
_register(_a_select, aten.select)
_register(_f_const_only(torch.zeros), torch.zeros, aten.zeros)
for _op in (operator.floordiv, operator.mod, operator.pow, operator.eq, operator.ne, operator.lt, operator.le,
            operator.gt, operator.ge, operator.and_, operator.or_, math.ceil, math.floor, int, float, len):
    _register(_f_const_only(_op), _op)
_register(_f_const_only(torch.ones), torch.ones, aten.ones)
_register(_f_const_only(torch.arange), torch.arange, aten.arange)
_register(_f_const_only(torch.tensor), torch.tensor)
_register(_f_const_only(torch.full), torch.full, aten.full)


METHOD_HANDLERS: dict[str, Callable] = {
    "view": _f_reshape, "reshape": _f_reshape, "permute": _f_permute, "transpose": _f_transpose, "t": _f_t,
    "contiguous": _f_passthrough, "clone": _f_passthrough, "detach": _f_passthrough, "chunk": _f_chunk,
    "split": _f_split, "flatten": _f_flatten, "mean": _reduce("mean"), "sum": _reduce("sum"),
    "amax": _reduce("amax"), "size": _f_size, "relu": _unary("relu"), "sigmoid": _unary("sigmoid"),
    "tanh": _unary("tanh"), "exp": _unary("exp"), "sqrt": _unary("sqrt"), "abs": _unary("abs"),
    "softmax": _softmax("softmax"),
    "log_softmax": _softmax("log_softmax"), "clamp": _f_clamp, "clip": _f_clamp, "squeeze": _f_squeeze,
    "unsqueeze": _f_unsqueeze, "add": _binary("add", operator.add), "sub": _binary("sub", operator.sub),
    "mul": _binary("mul", operator.mul), "div": _binary("div", operator.truediv), "matmul": _f_matmul,
    "neg": _f_neg, "to": _f_to, "float": _f_to, "type_as": _f_passthrough,
    "dim": lambda cv, args, kwargs, node: len(cv.shape(args[0])),
    "numel": lambda cv, args, kwargs, node: int(np.prod(cv.shape(args[0]))),
}


# ------------------------------------------------------------------------------------------------ entry point
def from_torch(model: nn.Module, example_inputs: Sequence[torch.Tensor], name: str | None = None) -> Graph:
    """Import ``model`` with inference (eval-mode) semantics as a verified IR graph with static shapes.

    Example::

        graph = from_torch(torchvision.models.efficientnet_b0(), (torch.randn(1, 3, 224, 224),))

    The model is converted in eval mode (dropout and stochastic depth are identities, batch norm uses its running
    statistics) whatever its current mode; every submodule's ``training`` flag is restored afterwards, so the
    caller's model is left as it was. Paths, in order: torch.fx symbolic tracing (one IR node per known layer,
    origins are module paths); when that tracing fails (Python control flow on tensors) or meets a construct we
    cannot convert, ``torch.export`` decomposed to core ATen (``export_model``). Raises ``UnsupportedModelError``
    listing every construct still unsupported with its module path, or ``FrontendError`` for anything else that
    cannot be imported.
    """
    if not isinstance(model, nn.Module):
        raise FrontendError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not example_inputs:
        raise FrontendError(f"{type(model).__name__}: example_inputs are required to fix input shapes and dtypes")
    example_inputs = tuple(example_inputs)
    name = name or type(model).__name__
    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        root = _wrap_leaf_root(model, len(example_inputs)) if module_handler(model) is not None else model
        return _import(root, example_inputs, name)
    finally:
        for module, flag in training.items():
            module.training = flag


def _import(model: nn.Module, example_inputs: tuple, name: str) -> Graph:
    """Symbolic tracing first; torch.export when tracing fails or its graph has unsupported constructs."""
    try:
        gm = symbolic_trace(model)
    except Exception as exc:  # TraceError, or user code that probes proxies
        fx_failure: Exception = exc
    else:
        try:
            return _Converter(gm, name, "symbolic_trace").run(example_inputs)
        except UnsupportedModelError as exc:
            fx_failure = exc
    log.debug("%s: torch.fx path failed (%s); trying torch.export", name, _first_line(fx_failure))
    try:
        gm, out_spec = export_model(model, example_inputs)
    except Exception as export_exc:
        if isinstance(fx_failure, UnsupportedModelError):  # the fx path's list is the best account we have
            raise UnsupportedModelError(name, fx_failure.unsupported,
                                        f"the torch.export fallback failed: {_first_line(export_exc)}") from None
        raise FrontendError(
            f"{name}: cannot trace the model. torch.fx symbolic tracing failed with '{_first_line(fx_failure)}' "
            f"and torch.export with '{_first_line(export_exc)}'. Make control flow independent of tensor values, "
            "or export the model to ONNX.") from None
    try:
        graph = _Converter(gm, name, "torch.export", out_spec).run(example_inputs)
    except UnsupportedModelError as export_failure:
        if not isinstance(fx_failure, UnsupportedModelError):
            raise
        # The fx list names what the user wrote (``F.interpolate: mode='bicubic'``); export's decomposed ATen
        # ops (``aten.index``) say less, so they are summarized in the note.
        aten_ops = sorted({item.split(" (at ")[0].removeprefix("function ") for item in export_failure.unsupported})
        raise UnsupportedModelError(name, fx_failure.unsupported, "torch.export's core-ATen graph has unsupported "
                                    f"ops too: {', '.join(aten_ops)}") from None
    log.debug("imported %s via torch.export: %d nodes", name, graph.number_of_nodes())
    return graph
