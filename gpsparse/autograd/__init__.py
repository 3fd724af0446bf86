"""Autograd Functions: one ``torch.autograd.Function`` per primitive (layer 2, DESIGN.md §1).

Each ``forward`` runs a core without a graph; each ``backward`` is short and
calls a named core adjoint, returning value gradients ``(B, nnz)`` aligned
with the values — never anything ``n × n``. Imports ``gpsparse.core`` and
``gpsparse.errors`` only.
"""
