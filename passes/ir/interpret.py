"""Reference interpreter: turn a graph into a torch ``nn.Module`` that evaluates it op by op.

It is the numerical oracle of the project: every pass test compares the interpreter's outputs before and after
the pass, and backends are checked against it and against PyTorch. Float params become ``nn.Parameter``s (other
dtypes become buffers), so the module is trainable (``distill`` fine-tunes it) and ``write_back`` copies the
trained values into the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from passes.ir.graph import Graph, IRError, Value, map_structure
from passes.ir.ops import get_op, torch_dtype


def _as_tensor(x: Any, dtype: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return to_torch(np.asarray(x)).to(torch_dtype(dtype))


def to_torch(array: np.ndarray) -> torch.Tensor:
    """numpy -> torch, bfloat16 (ml_dtypes) included: torch cannot read it, so go through its bit pattern."""
    array = np.array(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.as_tensor(array)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.numpy().copy()


class _NodeParams(nn.Module):
    """The params of one node: ``nn.Parameter`` for floating point tensors, buffers for the rest."""

    def __init__(self, params: dict[str, np.ndarray]):
        super().__init__()
        for key, value in params.items():
            tensor = to_torch(value)
            if tensor.is_floating_point():
                setattr(self, key, nn.Parameter(tensor))
            else:
                self.register_buffer(key, tensor)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters(recurse=False)) | dict(self.named_buffers(recurse=False))


class GraphModule(nn.Module):
    """``nn.Module`` running ``graph`` in topological order with each op's torch reference semantics."""

    def __init__(self, graph: Graph):
        super().__init__()
        self.graph = graph
        self.order = [n for n in graph.topo_order() if graph.nodes[n]["op"] != "input"]
        self.operands = {n: graph.operands(n) for n in self.order}
        # nn.ModuleDict keys cannot contain '.', node names never do (Graph.unique_name).
        self.node_params = nn.ModuleDict({n: _NodeParams(graph.nodes[n]["params"]) for n in self.order
                                          if graph.nodes[n]["params"]})

    def forward(self, *inputs: Any) -> Any:
        graph = self.graph
        if len(inputs) != len(graph.inputs):
            raise IRError(f"graph {graph.name!r} takes {len(graph.inputs)} inputs "
                          f"({', '.join(graph.inputs)}), got {len(inputs)}")
        env: dict[Value, torch.Tensor] = {}
        for name, x in zip(graph.inputs, inputs):
            expected = graph.nodes[name]["out_types"][0]
            tensor = _as_tensor(x, expected.dtype)
            if tuple(tensor.shape) != expected.shape:
                raise IRError(f"input {name!r}: expected shape {expected.shape}, got {tuple(tensor.shape)}")
            env[Value(name, 0)] = tensor
        for node in self.order:
            data = graph.nodes[node]
            params = self.node_params[node].as_dict() if node in self.node_params else {}
            xs = [env[v] for v in self.operands[node]]
            out = get_op(data["op"]).reference(xs, data["attrs"], params)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for i, tensor in enumerate(outs):
                env[Value(node, i)] = tensor
        return map_structure(lambda v: env[v], graph.outputs)

    def write_back(self, graph: Graph | None = None) -> Graph:
        """Copy the (possibly trained) parameter values into ``graph`` (default: the interpreted graph)."""
        graph = graph if graph is not None else self.graph
        for node, module in self.node_params.items():
            for key, tensor in module.as_dict().items():
                graph.nodes[node]["params"][key] = to_numpy(tensor)
        return graph


def interpret(graph: Graph) -> GraphModule:
    """The graph as an eval-mode ``nn.Module``."""
    return GraphModule(graph).eval()


def run_reference(graph: Graph, inputs: Sequence[Any]) -> Any:
    """Evaluate ``graph`` on ``inputs`` without gradients; returns the output structure of torch tensors."""
    with torch.no_grad():
        return interpret(graph)(*inputs)
