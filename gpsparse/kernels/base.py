"""Base class of kernels whose covariance is ``W Q⁻¹ Wᵀ`` for a sparse precision ``Q``."""

from __future__ import annotations

import gpytorch

from gpsparse.kernels.prediction import SparsePrecisionPredictionStrategy

__all__ = ["SparsePrecisionKernel"]


class SparsePrecisionKernel(gpytorch.kernels.Kernel):
    """A GPyTorch kernel returning ``SparsePrecisionLinearOperator`` covariances.

    Subclasses implement ``forward(x1, x2, diag=False, **params)`` returning
    ``SparsePrecisionLinearOperator(Q, interp=W(x1), right_interp=W(x2))``
    (and the variances ``gpsparse.operators.precision.covariance_diagonal(Q, W(x1))``
    for ``diag=True``). This base class hooks GPyTorch's prediction: through
    ``Kernel.prediction_strategy`` (which ``ScaleKernel`` forwards to its base
    kernel), ``model.eval(); likelihood(model(x_test))`` uses
    ``SparsePrecisionPredictionStrategy`` — means
    and variances through the sparse posterior precision, never a dense
    matrix.
    """

    def prediction_strategy(self, train_inputs, train_prior_dist, train_labels, likelihood):
        return SparsePrecisionPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)
