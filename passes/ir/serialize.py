"""Save and load graphs as ``graph.json`` (structure) + ``params.npz`` (tensors). No pickle anywhere.

Loading re-validates every node against the op table (``verify``), so a hand-edited or corrupted file is
refused with the list of its problems rather than producing a graph that fails later.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from passes.ir.graph import Graph, IRError, TensorType, Value
from passes.ir.ops import get_op
from passes.ir.verify import verify

FORMAT = "passes-ir/1"


def _encode_structure(structure: Any) -> Any:
    if isinstance(structure, Value):
        return {"node": structure.node, "index": structure.index}
    return [_encode_structure(s) for s in structure]


def _decode_structure(data: Any) -> Any:
    if isinstance(data, dict):
        return Value(str(data["node"]), int(data["index"]))
    return tuple(_decode_structure(s) for s in data)


def graph_to_json(graph: Graph) -> tuple[dict, dict[str, np.ndarray]]:
    """JSON-able structure and the flat ``{"node/param": array}`` dict that goes into the npz."""
    nodes, arrays = [], {}
    for n in graph.topo_order():
        d = graph.nodes[n]
        nodes.append({
            "name": n, "op": d["op"], "attrs": d["attrs"], "origin": list(d["origin"]), "meta": d["meta"],
            "out_types": [{"shape": list(t.shape), "dtype": t.dtype} for t in d["out_types"]],
            "operands": [[v.node, v.index] for v in graph.operands(n)],
            "params": sorted(d["params"]),
        })
        for key, value in d["params"].items():
            arrays[f"{n}/{key}"] = np.asarray(value)
    doc = {"format": FORMAT, "name": graph.name, "inputs": list(graph.inputs),
           "outputs": _encode_structure(graph.outputs), "nodes": nodes}
    return doc, arrays


def graph_from_json(doc: dict, arrays: dict[str, np.ndarray]) -> Graph:
    if doc.get("format") != FORMAT:
        raise IRError(f"not a {FORMAT} graph file (format={doc.get('format')!r})")
    graph = Graph(name=doc["name"])
    for item in doc["nodes"]:
        name = item["name"]
        where = f"node {name!r}"
        opdef = get_op(item["op"])
        attrs = opdef.check_attrs(item["attrs"], where)
        try:
            params = {k: arrays[f"{name}/{k}"] for k in item["params"]}
        except KeyError as exc:
            raise IRError(f"{where}: param {exc} missing from params.npz") from None
        graph.add_node(name, op=item["op"], attrs=attrs, params=params,
                       out_types=[TensorType(tuple(t["shape"]), t["dtype"]) for t in item["out_types"]],
                       origin=tuple(item["origin"]), meta=dict(item["meta"]))
    for item in doc["nodes"]:
        for slot, (src, index) in enumerate(item["operands"]):
            if src not in graph:
                raise IRError(f"node {item['name']!r}: operand {slot} reads unknown node {src!r}")
            graph.add_edge(src, item["name"], src_out=int(index), dst_in=slot)
    graph.graph["inputs"] = list(doc["inputs"])
    graph.graph["outputs"] = _decode_structure(doc["outputs"])
    return verify(graph)


def save_graph(graph: Graph, directory: str | os.PathLike) -> Path:
    """Write ``graph.json`` and ``params.npz`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    doc, arrays = graph_to_json(graph)
    # npz has no bfloat16: such params are stored as their uint16 bit patterns and listed in the JSON
    doc["bfloat16_params"] = sorted(k for k, a in arrays.items() if a.dtype.name == "bfloat16")
    arrays = {k: a.view(np.uint16) if k in doc["bfloat16_params"] else a for k, a in arrays.items()}
    (directory / "graph.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    np.savez(directory / "params.npz", **arrays)
    return directory


def load_graph(directory: str | os.PathLike) -> Graph:
    directory = Path(directory)
    try:
        doc = json.loads((directory / "graph.json").read_text())
        with np.load(directory / "params.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise IRError(f"cannot read a saved graph from {str(directory)!r}: {exc}") from None
    if doc.get("bfloat16_params"):
        import ml_dtypes

        for key in doc["bfloat16_params"]:
            arrays[key] = arrays[key].view(ml_dtypes.bfloat16)
    return graph_from_json(doc, arrays)
