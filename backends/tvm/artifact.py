"""Artifact folders checked before use: a manifest of sha256 digests, and a schema for every JSON file.

An artifact holds native code (``model.so`` is ``dlopen``-ed, which runs its constructors): load only artifacts you
trust. ``artifact.json`` records the sha256 of every other file; ``verify`` checks them all before anything is
parsed or loaded, so a truncated or swapped library (which would crash the process with SIGBUS or run another
model's code) is refused with a message. The digests guard against corruption and mix-ups, not against an attacker,
who can rewrite the manifest too.

Each JSON file is checked against its expected shape (``SIGNATURE``, ``MANIFEST``) and any fault is one
``ArtifactError`` naming the file and the field. Nothing here imports TVM.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMAT = "passes-artifact/1"
MANIFEST = "artifact.json"
REQUIRED = ("model.so", "signature.json")  # what running needs; report.json, ir/ and optimized.onnx are extras
DTYPES = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ArtifactError(ValueError):
    """An artifact folder that is missing, corrupt or inconsistent; the message names the file and the field."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, **fields: Any) -> dict:
    """Write ``artifact.json``: the format, ``fields`` and the sha256 of every file below ``folder``."""
    files = {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    manifest = {"format": FORMAT, **fields, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_json(path: Path) -> Any:
    """The parsed file, or an ``ArtifactError`` naming it (missing, unreadable, not UTF-8, not JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not readable as JSON ({e})") from None


# ------------------------------------------------------------------------------------------------ schemas
def _fail(path: Path, field: str, why: str) -> ArtifactError:
    return ArtifactError(f"{path}: field {field!r} {why}")


def _expect(path: Path, value: Any, field: str, kind: type | tuple[type, ...], check: Callable[[Any], bool] = None,
            why: str = "") -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _fail(path, field, f"must be a {name}, got {type(value).__name__}")
    if check is not None and not check(value):
        raise _fail(path, field, why)
    return value


def _object(path: Path, value: Any, field: str, keys: tuple[str, ...]) -> dict:
    _expect(path, value, field, dict)
    missing = [k for k in keys if k not in value]
    if missing:
        raise _fail(path, f"{field}.{missing[0]}" if field != "(top level)" else missing[0], "is missing")
    return value


def _tensors(path: Path, value: Any, field: str) -> list:
    _expect(path, value, field, list)
    for i, spec in enumerate(value):
        where = f"{field}[{i}]"
        _object(path, spec, where, ("name", "shape", "dtype"))
        _expect(path, spec["name"], f"{where}.name", str)
        _expect(path, spec["shape"], f"{where}.shape", list,
                lambda s: all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s),
                "must be a list of non-negative integers")
        _expect(path, spec["dtype"], f"{where}.dtype", str, lambda d: d in DTYPES, f"must be one of {DTYPES}")
    return value


def _leaves(structure: Any) -> list:
    if isinstance(structure, list):
        return [leaf for item in structure for leaf in _leaves(item)]
    return [structure]


def check_signature(path: Path, signature: Any) -> dict:
    """``signature.json``: target, inputs and outputs (name, shape, dtype), and an output structure whose leaves
    are the output indices, each once."""
    _object(path, signature, "(top level)", ("target", "inputs", "outputs", "structure"))
    _expect(path, signature["target"], "target", str, lambda t: t in ("llvm", "cuda"), "must be 'llvm' or 'cuda'")
    _tensors(path, signature["inputs"], "inputs")
    outputs = _tensors(path, signature["outputs"], "outputs")
    leaves = _leaves(signature["structure"])
    if not all(isinstance(leaf, int) and not isinstance(leaf, bool) for leaf in leaves) or \
            sorted(leaves) != list(range(len(outputs))):
        raise _fail(path, "structure", f"must hold each output index 0..{len(outputs) - 1} once, got "
                                       f"{json.dumps(signature['structure'])[:80]}")
    return signature


def check_manifest(path: Path, manifest: Any) -> dict:
    _object(path, manifest, "(top level)", ("format", "files"))
    _expect(path, manifest["format"], "format", str, lambda f: f == FORMAT,
            f"must be {FORMAT!r} (an artifact of another version or not one of ours)")
    files = _expect(path, manifest["files"], "files", dict)
    for name, digest in files.items():
        _expect(path, digest, f"files.{name}", str, lambda d: bool(_SHA256.fullmatch(d)), "must be a sha256 digest")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise _fail(path, f"files.{name}", "must be a path inside the artifact folder")
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise _fail(path, f"files.{missing[0]}", "is missing (the artifact cannot run without it)")
    return manifest


def verify(folder: str | Path) -> dict:
    """Check ``folder`` before anything in it is parsed or loaded: the manifest's schema, then every listed file's
    sha256. Returns the manifest."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir() or not path.is_file():
        raise ArtifactError(f"{folder} is not a passes artifact folder (no {MANIFEST})")
    manifest = check_manifest(path, read_json(path))
    for name, digest in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise ArtifactError(f"{file}: missing (listed in {MANIFEST})")
        if sha256(file) != digest:
            raise ArtifactError(f"{file}: sha256 differs from {MANIFEST} (the file is corrupt, truncated or from "
                                "another artifact); recompile the model")
    return manifest
