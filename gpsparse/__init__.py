"""gpsparse — Gaussian processes with sparse covariance or sparse precision matrices in GPyTorch.

Public API
----------
solve
    Sparse solve with sparse gradients (exact banded / CHOLMOD roads, else CG, MINRES, BiCGSTAB).
SparseLinearOperator
    A linear_operator ``LinearOperator`` backed by a sparse matrix.
SparsityPattern
    The shared, non-differentiable CSR structure of sparse operators.
SparsePrecisionLinearOperator, NoisySparsePrecisionLinearOperator
    Covariances ``W Q⁻¹ Wᵀ`` (+ noise) of Gaussian Markov random fields.
cg, minres, bicgstab, SolverInfo
    Krylov cores on a matvec closure.
logdet, inv_quad_logdet
    Log-determinants (and inverse quadratic forms): exact banded / CHOLMOD roads where they
    apply, else stochastic Lanczos quadrature with adjoint or Hutchinson gradients.
lanczos, funm
    Differentiable Lanczos decomposition and f(A)v (sqrt, inv_sqrt, log, exp, inv) with adjoint gradients.
JacobiPreconditioner, IncompleteCholeskyPreconditioner, Preconditioner
    Preconditioners with split factors and log-determinants.
settings
    Context managers for global settings.

Subpackages (loaded by ``import gpsparse``, as ``import gpytorch`` loads its own): ``kernels``,
and for non-Gaussian likelihoods by the Laplace approximation ``likelihoods``, ``models``
(``LaplaceGP``) and ``mlls`` (``LaplaceMarginalLogLikelihood``).
"""

from gpsparse import settings
from gpsparse.core.cholmod import CholeskyPreconditioner
from gpsparse.core.krylov import SolverInfo, bicgstab, cg, minres
from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.preconditioners import IncompleteCholeskyPreconditioner, JacobiPreconditioner, Preconditioner
from gpsparse.errors import (
    ConvergenceWarning,
    DenseSizeError,
    EstimatorAccuracyWarning,
    GPSparseError,
    NonConvergenceError,
    NotPositiveDefiniteError,
    SolverBreakdownError,
)
from gpsparse.linalg import funm, inv_quad_logdet, lanczos, logdet, solve
from gpsparse.operators.precision import NoisySparsePrecisionLinearOperator, SparsePrecisionLinearOperator
from gpsparse.operators.sparse import SparseLinearOperator

__version__ = "0.1.0"

__all__ = [
    "solve",
    "logdet",
    "inv_quad_logdet",
    "lanczos",
    "funm",
    "SparseLinearOperator",
    "SparsePrecisionLinearOperator",
    "NoisySparsePrecisionLinearOperator",
    "SparsityPattern",
    "cg",
    "minres",
    "bicgstab",
    "SolverInfo",
    "Preconditioner",
    "JacobiPreconditioner",
    "IncompleteCholeskyPreconditioner",
    "CholeskyPreconditioner",
    "settings",
    "GPSparseError",
    "NotPositiveDefiniteError",
    "SolverBreakdownError",
    "NonConvergenceError",
    "DenseSizeError",
    "ConvergenceWarning",
    "EstimatorAccuracyWarning",
]

# As `import gpytorch` loads gpytorch.kernels: `import gpsparse; gpsparse.kernels.LatticeMaternKernel` works.
from gpsparse import kernels  # noqa: E402, F401  (kernels import the operators above)

# isort: split
# Likelihoods, models and marginal likelihoods of the Laplace approximation (issue 14), as gpytorch has them.
from gpsparse import likelihoods, mlls, models  # noqa: E402, F401

# isort: split
# Probe-parallel estimators across processes (torch.distributed), issue 16.
from gpsparse import distributed  # noqa: E402, F401
