"""Apache TVM backend: IR -> Relax (``lower``) -> executable for llvm or cuda (``build``) -> ``CompiledModule``."""

from backends.tvm.lower import LOWERINGS, LoweringError, lower
from backends.tvm.module import CompiledModule, InputError, build, cuda_source
from backends.tvm.target import make_target

__all__ = ["LOWERINGS", "CompiledModule", "InputError", "LoweringError", "build", "cuda_source", "lower",
           "make_target"]
