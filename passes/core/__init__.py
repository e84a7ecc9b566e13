"""Pass infrastructure: base class, registry, pipelines and instruments, patterns, statistics."""
