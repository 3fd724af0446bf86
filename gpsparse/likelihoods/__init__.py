"""Likelihoods for the Laplace approximation (GPyTorch ``Likelihood`` subclasses), issue 14.

PoissonLikelihood
:   ``y ~ Poisson(E e^f)``: log link, optional exposures ``E``.

BernoulliLikelihood
:   ``y ∈ {0, 1}``: logit (default) or probit link.

NegativeBinomialLikelihood
:   ``y ~ NB(mean E e^f, dispersion r)``, ``r`` learnable (``Positive`` constraint).

Each exposes ``log_prob(f, y)`` and ``log_prob_derivatives(f, y) -> (ℓ', ℓ'', ℓ''')``
in closed form (used by [`LaplaceMarginalLogLikelihood`][gpsparse.mlls.LaplaceMarginalLogLikelihood]),
and ``likelihood(mvn)`` gives the predictive distribution by Gauss–Hermite quadrature.
"""

from gpsparse.likelihoods.base import LaplaceLikelihood
from gpsparse.likelihoods.bernoulli import BernoulliLikelihood
from gpsparse.likelihoods.count import NegativeBinomialLikelihood, PoissonLikelihood
from gpsparse.likelihoods.quadrature import CountQuadratureMixture

__all__ = [
    "LaplaceLikelihood",
    "PoissonLikelihood",
    "BernoulliLikelihood",
    "NegativeBinomialLikelihood",
    "CountQuadratureMixture",
]
