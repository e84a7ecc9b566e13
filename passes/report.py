"""The optimization report: what each pass did, FLOPs and params before/after, tuning and latency."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PassRecord:
    name: str
    spec: str
    changed: bool
    stats: dict[str, int]
    seconds: float

    def to_dict(self) -> dict:
        return {"name": self.name, "spec": self.spec, "changed": self.changed, "stats": dict(self.stats),
                "seconds": round(self.seconds, 6)}


MEMORY_FIELDS = {
    "weights_before": "parameters and constants at their stored dtype, imported model",
    "weights_after": "the same after the passes (int8 weights count 1 byte, bf16/fp16 2)",
    "activations_before": "peak live intermediates running the imported graph in topological order",
    "activations_after": "the same for the optimized graph",
    "activations_compiled": "storage the compiled plan allocates after TVM's static memory planning",
    "artifact": "the saved artifact folder (library, IR, ONNX), once saved",
}


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@dataclass
class Report:
    model: str = ""
    target: str = "llvm"
    passes: list[PassRecord] = field(default_factory=list)
    flops: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)  # bytes: see ``MEMORY_FIELDS``
    tune: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    baselines_ms: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def layer_sqnr_db(self) -> dict[str, int]:
        """Per-layer SQNR (dB, floored) of the quantized layers, from the ``layer_sqnr_db.<node>`` pass stats."""
        prefix = "layer_sqnr_db."
        return {k[len(prefix):]: v for p in self.passes for k, v in p.stats.items() if k.startswith(prefix)}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "target": self.target, "passes": [p.to_dict() for p in self.passes],
                "sqnr_db": self.layer_sqnr_db(),
                "flops": dict(self.flops), "params": dict(self.params), "nodes": dict(self.nodes),
                "memory": dict(self.memory),
                "tune": dict(self.tune), "latency_ms": self.latency_ms,
                "baselines_ms": dict(self.baselines_ms), "accuracy": dict(self.accuracy),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Report:
        passes = [PassRecord(p["name"], p.get("spec", p["name"]), p["changed"], p["stats"], p["seconds"])
                  for p in d.get("passes", [])]
        return Report(d.get("model", ""), d.get("target", "llvm"), passes, d.get("flops", {}),
                      d.get("params", {}), d.get("nodes", {}), d.get("memory", {}), d.get("tune", {}),
                      d.get("latency_ms"),
                      d.get("baselines_ms", {}), d.get("accuracy", {}), d.get("seconds", {}))

    def summary(self) -> str:
        """Human-readable lines for the CLI and examples."""
        lines = [f"model {self.model} -> target {self.target}"]
        for p in self.passes:
            stats = ", ".join(f"{k}={v}" for k, v in sorted(p.stats.items())
                              if not k.startswith("layer_sqnr_db.")) or "-"
            lines.append(f"  pass {p.spec:<32} changed={str(p.changed):<5} {stats}  ({p.seconds * 1e3:.1f} ms)")
        if sqnr := self.layer_sqnr_db():
            lines.append("  SQNR dB per quantized layer: " + ", ".join(f"{k}={v}" for k, v in sqnr.items()))
        if self.flops:
            lines.append(f"  FLOPs   {self.flops['before']:,} -> {self.flops['after']:,}")
            lines.append(f"  params  {self.params['before']:,} -> {self.params['after']:,}")
        memory = self.memory
        if "weights_before" in memory:
            lines.append(f"  weights {_megabytes(memory['weights_before'])} -> {_megabytes(memory['weights_after'])}"
                         " (stored dtypes)")
            lines.append(f"  activations peak {_megabytes(memory['activations_before'])} -> "
                         f"{_megabytes(memory['activations_after'])} (graph order)"
                         + (f", compiled plan {_megabytes(memory['activations_compiled'])}"
                            if "activations_compiled" in memory else ""))
        if "artifact" in memory:
            lines.append(f"  artifact {_megabytes(memory['artifact'])}")
        if self.accuracy:
            numbers = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in self.accuracy.items() if k != "reference")
            lines.append(f"  accuracy vs {self.accuracy.get('reference', 'reference')}: {numbers}")
        if guard := self.tune.get("whole_model"):
            lines.append(f"  tuning kept the {guard['kept']} build: tuned {guard['tuned_ms']:.3f} ms, untuned "
                         f"{guard['untuned_ms']:.3f} ms in the model ({guard['rounds']} alternating rounds)")
        if self.latency_ms is not None:
            lines.append(f"  latency {self.latency_ms:.3f} ms (median, compiled)")
        for name, ms in self.baselines_ms.items():
            if ms is None:
                continue
            ratio = f"  -> compiled/{name} = {self.latency_ms / ms:.2f}x" if self.latency_ms and ms else ""
            lines.append(f"  latency {ms:.3f} ms (median, {name}){ratio}")
        for k, v in self.seconds.items():
            lines.append(f"  time {k}: {v:.2f} s")
        return "\n".join(lines)
