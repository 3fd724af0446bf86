"""Operators: linear_operator ``LinearOperator`` subclasses over sparse matrices (layer 4, DESIGN.md §1).

Adapters: they validate, read the settings once into a frozen configuration
and call ``gpsparse.linalg`` (the one dispatcher); the linear_operator protocol
and nothing else.
"""
