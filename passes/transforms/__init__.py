"""Built-in passes, one per file. Each is registered lazily in ``passes.core.registry.BUILTIN_PASSES``."""
