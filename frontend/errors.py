"""Errors a frontend raises: every message names the model element (module path or ONNX node) involved."""

from __future__ import annotations


class FrontendError(ValueError):
    """The model cannot be imported; the message says which element and what to do."""


class UnsupportedModelError(FrontendError):
    """One or more constructs have no IR equivalent. ``unsupported`` lists each as 'what (where)'."""

    def __init__(self, model_name: str, unsupported: list[str], note: str = ""):
        self.unsupported = unsupported
        lines = "\n  ".join(unsupported)
        super().__init__(f"{model_name}: {len(unsupported)} unsupported construct(s):\n  {lines}\n"
                         + (f"({note})\n" if note else "")
                         + "Replace them with supported ops (`python -m passes.cli list-ops`) "
                         "or register a conversion.")


class UnsupportedConstruct(Exception):
    """Raised inside a converter for an op used in a way we cannot import; the frontend collects each one into
    the single ``UnsupportedModelError`` it raises at the end."""
