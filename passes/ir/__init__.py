"""The intermediate representation: graph, op table, verifier, printer, serializer and reference interpreter."""

from passes.ir.graph import Graph, IRError, TensorType, Value
from passes.ir.interpret import GraphModule, interpret, run_reference
from passes.ir.ops import OPS, OpDef, get_op
from passes.ir.serialize import load_graph, save_graph
from passes.ir.text import graph_text
from passes.ir.verify import VerificationError, verify

__all__ = ["Graph", "GraphModule", "IRError", "OPS", "OpDef", "TensorType", "Value", "VerificationError",
           "get_op", "graph_text", "interpret", "load_graph", "run_reference", "save_graph", "verify"]
