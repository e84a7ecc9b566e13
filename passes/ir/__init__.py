"""The intermediate representation: graph, op table, verifier, printer, serializer and reference interpreter.

Submodules are imported on use (``from passes.ir.graph import Graph``); ``passes.ir.graph`` needs no torch.
"""
