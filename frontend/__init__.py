"""Frontends: turn a user's model (PyTorch ``nn.Module`` or ONNX file) into verified IR, and nothing else."""

from frontend.errors import FrontendError, UnsupportedModelError

__all__ = ["FrontendError", "UnsupportedModelError"]
