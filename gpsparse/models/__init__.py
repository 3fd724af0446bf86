"""GPyTorch models with non-Gaussian likelihoods on sparse-precision kernels (issue 14).

LaplaceGP
:   A latent GMRF (any gpsparse sparse-precision kernel) with a
    [`gpsparse.likelihoods`][gpsparse.likelihoods] likelihood, inferred by the Laplace approximation on the
    sparse posterior precision ``P = Q + Wᵀ H W``; train with
    [`LaplaceMarginalLogLikelihood`][gpsparse.mlls.LaplaceMarginalLogLikelihood].
"""

from gpsparse.models.laplace import LaplaceGP

__all__ = ["LaplaceGP"]
