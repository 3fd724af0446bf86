"""Base class of kernels whose covariance is ``W Q⁻¹ Wᵀ`` for a sparse precision ``Q``, and their sums."""

from __future__ import annotations

import gpytorch
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy
from linear_operator import to_linear_operator

from gpsparse.kernels.prediction import SparsePrecisionPredictionStrategy

__all__ = ["SparsePrecisionKernel", "SparsePrecisionAdditiveKernel", "is_sparse_precision_kernel"]


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

    ``k1 + k2`` returns a
    [`SparsePrecisionAdditiveKernel`][gpsparse.kernels.SparsePrecisionAdditiveKernel]
    (GPyTorch's ``AdditiveKernel`` with the same hook).
    """

    def prediction_strategy(self, train_inputs, train_prior_dist, train_labels, likelihood):
        return SparsePrecisionPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)

    def __add__(self, other: gpytorch.kernels.Kernel) -> gpytorch.kernels.Kernel:
        return SparsePrecisionAdditiveKernel(*_terms(self), *_terms(other))


class SparsePrecisionAdditiveKernel(gpytorch.kernels.AdditiveKernel):
    r"""``k_1 + k_2 + …`` of sparse-precision kernels, trained and predicted through one sparse posterior precision.

    A drop-in ``gpytorch.kernels.AdditiveKernel``. The covariance of
    independent fields ``K = Σ_i W_i Q_i⁻¹ W_iᵀ`` is ``W Q⁻¹ Wᵀ`` with
    ``W = [W_1 ⋯ W_k]`` and ``Q = blockdiag(Q_1, …, Q_k)``
    (``SparsePrecisionLinearOperator.__add__``, ``gpsparse.operators.block``),
    so the marginal likelihood goes through ``P = Q + WᵀD⁻¹W`` and the
    predictions through
    [`SparsePrecisionPredictionStrategy`][gpsparse.kernels.prediction.SparsePrecisionPredictionStrategy]
    (posterior means and variances of the total and, by
    [`component_predictions`][gpsparse.kernels.prediction.component_predictions],
    of each component), never a dense matrix.

    Components may be any sparse-precision kernel, each possibly inside
    ``ScaleKernel`` (``SparsePrecisionAdditiveKernel(ScaleKernel(k1), ScaleKernel(k2))``).
    ``k1 + k2`` of bare gpsparse kernels builds one; ``ScaleKernel(k1) + ScaleKernel(k2)``
    builds GPyTorch's own ``AdditiveKernel`` (``ScaleKernel.__add__`` is GPyTorch's):
    its training still goes through ``P`` (the operators add up as above),
    but GPyTorch asks the ``AdditiveKernel`` for its prediction strategy and
    gets the generic one (a dense cross-covariance) — wrap it,
    ``SparsePrecisionAdditiveKernel(*kernel.kernels)``, for sparse
    predictions. With a component that is not a sparse-precision kernel
    (``MarkovMaternKernel``, ``RBFKernel``) the sum is linear_operator's
    generic ``SumLinearOperator`` and the prediction GPyTorch's default
    (module ``gpsparse.kernels``).

    Constructed as ``AdditiveKernel(*kernels)``: the component kernels
    (nested additive kernels are flattened by ``+``).
    """

    def forward(self, x1, x2, diag: bool = False, **params):
        if diag:
            return super().forward(x1, x2, diag=True, **params)
        terms = [to_linear_operator(_evaluate(kernel(x1, x2, diag=False, **params))) for kernel in self.kernels]
        result = terms[0]
        for term in terms[1:]:
            result = result + term
        return result

    def prediction_strategy(self, train_inputs, train_prior_dist, train_labels, likelihood):
        if all(is_sparse_precision_kernel(k) for k in self.kernels):
            return SparsePrecisionPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)
        return DefaultPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)

    def __add__(self, other: gpytorch.kernels.Kernel) -> gpytorch.kernels.Kernel:
        return SparsePrecisionAdditiveKernel(*_terms(self), *_terms(other))


def is_sparse_precision_kernel(kernel: gpytorch.kernels.Kernel) -> bool:
    """Whether ``kernel`` is a ``SparsePrecisionKernel``, possibly in ``ScaleKernel`` and sums of such kernels."""
    while isinstance(kernel, gpytorch.kernels.ScaleKernel):
        kernel = kernel.base_kernel
    if isinstance(kernel, gpytorch.kernels.AdditiveKernel):
        return all(is_sparse_precision_kernel(k) for k in kernel.kernels)
    return isinstance(kernel, SparsePrecisionKernel)


def _terms(kernel) -> list:
    return list(kernel.kernels) if isinstance(kernel, gpytorch.kernels.AdditiveKernel) else [kernel]


def _evaluate(op):
    return op.evaluate_kernel() if hasattr(op, "evaluate_kernel") else op
