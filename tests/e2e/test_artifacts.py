"""Artifact folders are verified before use: sha256 of every file, JSON schemas, signature against library; every
fault one ``ArtifactError`` naming the file and the field (the CLI: exit 2, one line)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import passes
from backends.tvm.artifact import FORMAT, ArtifactError, check_manifest, check_signature, sha256, write_manifest

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two small artifacts (a conv net with one input, a linear net) saved once for the module."""
    root = tmp_path_factory.mktemp("artifacts")
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    passes.optimize(conv, passes=[], example_inputs=(torch.randn(1, 3, 8, 8),), measure=False).save(root / "conv")
    linear = nn.Linear(3, 2).eval()
    passes.optimize(linear, passes=[], example_inputs=(torch.randn(2, 3),), measure=False).save(root / "linear")
    return root


@pytest.fixture
def art(saved, tmp_path):
    shutil.copytree(saved / "conv", tmp_path / "conv")
    return tmp_path / "conv"


def test_manifest_records_the_sha256_of_every_file(art):
    manifest = json.loads((art / "artifact.json").read_text())
    files = sorted(p.relative_to(art).as_posix() for p in art.rglob("*") if p.is_file() and p.name != "artifact.json")
    assert manifest["format"] == FORMAT and sorted(manifest["files"]) == files
    assert {"model.so", "signature.json", "report.json", "ir/graph.json"} <= set(files)
    assert all(manifest["files"][name] == sha256(art / name) for name in files)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert passes.load(art)(x).shape == (1, 4, 6, 6)


def test_truncated_library_is_refused_before_it_is_loaded(art):
    data = (art / "model.so").read_bytes()
    (art / "model.so").write_bytes(data[: len(data) // 2])  # dlopen of this would die with SIGBUS
    with pytest.raises(ArtifactError, match=r"model.so: sha256 differs from artifact.json .*recompile"):
        passes.load(art)


def test_another_models_library_is_refused(art, saved):
    shutil.copy(saved / "linear" / "model.so", art / "model.so")
    with pytest.raises(ArtifactError, match="model.so: sha256 differs"):
        passes.load(art)


def test_library_and_signature_of_different_models_are_refused_even_with_a_rewritten_manifest(art, saved):
    shutil.copy(saved / "linear" / "model.so", art / "model.so")
    write_manifest(art)  # the digests now agree: only the signature check is left to catch it
    with pytest.raises(ArtifactError, match=r"signature.json does not describe .*model.so .*different models"):
        passes.load(art)


def test_extra_output_in_the_signature_is_refused(art):
    signature = json.loads((art / "signature.json").read_text())
    signature["outputs"].append(dict(signature["outputs"][0], name="extra"))
    signature["structure"] = [0, 1]
    (art / "signature.json").write_text(json.dumps(signature))
    write_manifest(art)
    with pytest.raises(ArtifactError, match=r"field 'outputs' lists .* the library returns"):
        passes.load(art)


def test_truncated_json_names_the_file(art):
    (art / "signature.json").write_text('{"target": "llvm", "inp')
    write_manifest(art)
    with pytest.raises(ArtifactError, match=r"signature.json: not readable as JSON"):
        passes.load(art)


def test_manifest_that_is_a_list_is_refused(art):
    (art / "artifact.json").write_text("[]")
    with pytest.raises(ArtifactError, match=r"artifact.json: field '\(top level\)' must be a dict, got list"):
        passes.load(art)


def test_missing_manifest_is_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="is not a passes artifact folder"):
        passes.load(tmp_path)


@pytest.mark.parametrize("broken", ["{not json", None], ids=["broken", "missing"])
def test_report_json_broken_or_missing_does_not_block_running(art, broken, caplog):
    if broken is None:
        (art / "report.json").unlink()
    else:
        (art / "report.json").write_text(broken)
    write_manifest(art)
    model = passes.load(art)
    assert model(np.zeros((1, 3, 8, 8), np.float32)).shape == (1, 4, 6, 6)
    assert model.report.passes == [] and "report not loaded" in caplog.text


def test_cli_run_on_a_corrupt_artifact_is_exit_2_and_one_line(art, tmp_path):
    (art / "model.so").write_bytes(b"\0" * 100)
    np.savez(tmp_path / "in.npz", x0=np.zeros((1, 3, 8, 8), np.float32))
    result = subprocess.run([sys.executable, "-m", "passes.cli", "run", str(art), str(tmp_path / "in.npz"), "-o",
                             str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "model.so: sha256 differs" in result.stderr


# ------------------------------------------------------------------------------------------------ schemas (no TVM)
SIGNATURE = {"target": "llvm", "inputs": [{"name": "x", "shape": [1, 3], "dtype": "float32"}],
             "outputs": [{"name": "y", "shape": [1, 2], "dtype": "float32"},
                         {"name": "h", "shape": [2], "dtype": "float32"}], "structure": [0, [1]]}


def edited(path: tuple, value) -> dict:
    signature = json.loads(json.dumps(SIGNATURE))
    holder = signature
    for key in path[:-1]:
        holder = holder[key]
    if value is KeyError:
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    return signature


@pytest.mark.parametrize("path, value, message", [
    (("inputs",), KeyError, r"field 'inputs' is missing"),
    (("target",), "tpu", r"field 'target' must be 'llvm' or 'cuda'"),
    (("inputs", 0, "dtype"), "float128", r"field 'inputs\[0\].dtype' must be one of"),
    (("inputs", 0, "shape"), [1, -3], r"field 'inputs\[0\].shape' must be a list of non-negative integers"),
    (("inputs", 0, "shape"), "1x3", r"field 'inputs\[0\].shape' must be a list, got str"),
    (("outputs", 1), {"name": "h"}, r"field 'outputs\[1\].shape' is missing"),
    (("outputs",), {"y": 1}, r"field 'outputs' must be a list, got dict"),
    (("structure",), [0, [0]], r"field 'structure' must hold each output index 0..1 once"),
    (("structure",), [0, [1, 2]], r"field 'structure' must hold each output index"),
    (("structure",), [0, ["1"]], r"field 'structure' must hold each output index"),
], ids=lambda v: str(v)[:24])
def test_signature_schema_names_the_field(tmp_path, path, value, message):
    check_signature(tmp_path / "signature.json", SIGNATURE)
    with pytest.raises(ArtifactError, match=r"signature.json: " + message):
        check_signature(tmp_path / "signature.json", edited(path, value))


@pytest.mark.parametrize("manifest, message", [
    ({"format": "other/2", "files": {}}, r"field 'format' must be 'passes-artifact/1'"),
    ({"format": FORMAT}, r"field 'files' is missing"),
    ({"format": FORMAT, "files": {"model.so": "abc"}}, r"field 'files.model.so' must be a sha256 digest"),
    ({"format": FORMAT, "files": {"model.so": "0" * 64}}, r"field 'files.signature.json' is missing"),
    ({"format": FORMAT, "files": {"../x": "0" * 64}}, r"field 'files.../x' must be a path inside"),
])
def test_manifest_schema_names_the_field(tmp_path, manifest, message):
    with pytest.raises(ArtifactError, match=r"artifact.json: " + message):
        check_manifest(tmp_path / "artifact.json", manifest)
