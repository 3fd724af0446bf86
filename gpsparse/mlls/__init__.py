"""Marginal likelihoods for the gpsparse models (issue 14).

LaplaceMarginalLogLikelihood
:   The Laplace approximation of ``log p(y | θ)`` for a [`LaplaceGP`][gpsparse.models.LaplaceGP],
    with its exact gradient by implicit differentiation through the mode.
"""

from gpsparse.mlls.laplace import LaplaceMarginalLogLikelihood

__all__ = ["LaplaceMarginalLogLikelihood"]
