"""Errors and warnings raised by gpsparse.

Cores (Krylov solvers, Lanczos) report slow convergence as data in their
``info`` record and raise only on a genuine breakdown; the public layer turns
non-convergence into a [`ConvergenceWarning`][gpsparse.errors.ConvergenceWarning] or, when the caller asks for
strictness, a [`NonConvergenceError`][gpsparse.errors.NonConvergenceError].
"""

from __future__ import annotations

from linear_operator.utils.warnings import NumericalWarning


class GPSparseError(Exception):
    """Base class of every exception raised by gpsparse."""


class NotPositiveDefiniteError(GPSparseError, ValueError):
    """A matrix required to be symmetric positive definite is not.

    Raised, e.g., by CG when a search direction gives ``pᵀAp ≤ 0``, or by an
    incomplete Cholesky factorisation meeting a non-positive pivot.
    """


class SolverBreakdownError(GPSparseError, RuntimeError):
    """A Krylov recurrence divided by (numerically) zero and cannot continue."""


class NonConvergenceError(GPSparseError, RuntimeError):
    """An iterative method stopped at ``max_iters`` above its tolerance and the
    caller asked for strictness."""


class DenseSizeError(GPSparseError, RuntimeError):
    """An operation would have to form a dense matrix larger than the limit in
    [`gpsparse.settings.max_dense_size`][]."""


class ConvergenceWarning(NumericalWarning):
    """An iterative method stopped at ``max_iters`` above its tolerance.

    A subclass of linear_operator's ``NumericalWarning`` (itself a
    ``RuntimeWarning``), so that ``warnings.filterwarnings("ignore",
    category=NumericalWarning)`` silences gpsparse's and linear_operator's
    numerical warnings together.
    """


class EstimatorAccuracyWarning(NumericalWarning):
    """A stochastic estimate is less accurate than stated: its estimated standard error exceeds the
    stated fraction of the value (e.g. ``logdet P − logdet Q`` of a noisy sparse-precision covariance,
    ``gpsparse.linalg.dispatch.logdet_difference``). More probes, an exact road or a closed-form
    log-determinant help. A ``NumericalWarning`` like ``ConvergenceWarning``."""


class DenseKernelWarning(UserWarning):
    """A kernel's sparse matrix stores a large share of all entries (e.g. a compact support radius
    that covers most of the data): sparse algebra then costs more than dense would."""


class DoubleBackwardError(GPSparseError, RuntimeError):
    """A second derivative was asked of an operation whose backward is differentiable only once."""
