"""Linear algebra on sparse matrices: the public functions and the one dispatcher that chooses their road.

Layer: above ``gpsparse.core`` and ``gpsparse.autograd``, below the operators.
``gpsparse.linalg.functional`` holds ``solve``, ``logdet``,
``inv_quad_logdet``, ``lanczos`` and ``funm``; ``gpsparse.linalg.dispatch``
chooses between the banded, CHOLMOD, dense and Krylov/SLQ roads for them and
for every operator; ``gpsparse.linalg.config`` reads the settings into a
frozen configuration once per call.
"""

from gpsparse.linalg.functional import funm, inv_quad_logdet, lanczos, logdet, matrix_parts, solve

__all__ = ["solve", "logdet", "inv_quad_logdet", "lanczos", "funm", "matrix_parts"]
