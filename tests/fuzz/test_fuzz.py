"""CI's slice of the differential fuzzer: a fixed set of seeds through every pipeline, no crash and no mismatch.

The seeds cover dilated, grouped, depthwise, 'same' and asymmetric-padded convs, max and adaptive max pools,
residual, concat and squeeze-excite blocks, and an LSTM (``python -m tests.fuzz`` runs any number)."""

from __future__ import annotations

import pytest

from tests.fuzz.run import PIPELINES, fuzz

pytestmark = pytest.mark.tvm

CI_SEEDS = (1, 3, 6, 14)


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_fuzz_seed_has_no_crash_and_no_mismatch(seed, tmp_path):
    summary = fuzz([seed], list(PIPELINES), tmp_path)
    assert summary.count("crash") + summary.count("mismatch") == 0, summary.text()
    assert summary.count("ok") >= len(PIPELINES) - 1, summary.text()  # at most one clean refusal


def _features(spec: dict) -> set[str]:
    """What a spec exercises, in the terms of issue 14's list."""
    found = set()
    for layer in spec["layers"]:
        t = layer["type"]
        found.add(t)
        if t == "conv":
            found |= {f"kernel {layer['kernel']}", f"stride {layer['stride']}", f"dilation {layer['dilation']}"}
            found.add("padding same" if layer["padding"] == "same" else "padding asymmetric" if "pad" in layer
                      else "padding int" if layer["padding"] else "padding none")
            found.add("depthwise" if layer["groups"] == layer["in"] > 1 else "grouped" if layer["groups"] > 1
                      else "dense")
            found |= {f"pad module {layer['pad_module']}"} if "pad_module" in layer else set()
        if t in ("max", "avg"):
            found |= {f"{t} overlapping"} if layer["stride"] < layer["kernel"] else set()
            found |= {f"{t} ceil"} if layer["ceil"] else set()
            found |= {f"{t} padded"} if layer["padding"] else set()
        for key in ("name", "act"):  # activations: standalone and inside residual/concat blocks
            if key in layer and isinstance(layer[key], str):
                found.add(f"act {layer[key]}")
        if t in ("lstm", "gru", "rnn"):
            found |= {f"{t} layers {layer['layers']}", f"bidirectional {layer['bidirectional']}",
                      f"batch_first {layer['batch_first']}", f"bias {layer['bias']}"}
            found |= {f"rnn {layer['nonlinearity']}"} if t == "rnn" else set()
    return found


def test_generator_covers_every_listed_feature():
    """400 seeds (specs only, nothing compiled) reach everything issue 14 lists for the generator."""
    from tests.fuzz.models import ACTIVATIONS, PAD_MODULES, random_spec

    found = set().union(*(_features(random_spec(seed)) for seed in range(400)))
    wanted = {"conv", "bn", "residual", "concat", "se", "flatten", "linear", "adaptive_avg", "adaptive_max",
              "kernel 1", "kernel 3", "kernel 5", "stride 2", "dilation 2", "padding same", "padding asymmetric",
              "padding int", "depthwise", "grouped", "max overlapping", "max ceil", "max padded", "avg overlapping",
              "avg ceil", "avg padded", "lstm", "gru", "rnn", "lstm layers 2", "gru layers 2", "rnn layers 2",
              "bidirectional True", "batch_first True", "batch_first False", "bias False", "rnn relu", "rnn tanh"}
    wanted |= {f"act {name}" for name in ACTIVATIONS} | {f"pad module {name}" for name in PAD_MODULES}
    assert wanted <= found, sorted(wanted - found)
