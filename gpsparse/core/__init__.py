"""Cores: pure numerics on tensors and ``matvec`` closures (the lowest layer, DESIGN.md §1).

Imports torch, numpy, scipy, numba, other core modules and ``gpsparse.errors``
only — never gpytorch, linear_operator, torch's autograd machinery or
``gpsparse.settings`` (``tests/test_layers.py`` checks it). Every setting
arrives as an argument or a frozen configuration (``gpsparse.core.config``),
with the defaults of ``gpsparse.core.defaults``; structure derived from a
sparsity pattern is cached on the pattern (``SparsityPattern.derived``).
"""
