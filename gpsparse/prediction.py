r"""GPyTorch prediction for sparse-precision models, hooked through ``Kernel.prediction_strategy``.

For a GMRF prior ``f ~ N(μ, Q⁻¹)`` on N nodes, training observations
``y = W f + ε`` (``ε ~ N(0, D)``) and test rows ``W*``, the posterior of the
latent field has the sparse precision ``P = Q + Wᵀ D⁻¹ W``, so

    mean*  = μ* + W* P⁻¹ Wᵀ D⁻¹ (y − μ)          (one solve in P, cached across calls)
    covar* = W* P⁻¹ W*ᵀ                            (a SparsePrecisionLinearOperator with precision P)

— the posterior is again a sparse-precision covariance. Its variances
``diag(W* P⁻¹ W*ᵀ)`` come from :func:`gpsparse.precision.covariance_diagonal`
(exact up to 1024 test points, a stochastic diagonal estimator beyond or
under ``gpytorch.settings.fast_pred_var()``; see there for its error).

``gpytorch.settings.skip_posterior_variances()`` returns a zero covariance.
Samples (``rsample``) are ``W* P^{-1/2} z`` by Lanczos ``f(P)v``. Solves use
:func:`gpsparse.settings.solver_defaults` (``rtol = 1e-6``), not GPyTorch's
``eval_cg_tolerance``.
"""

from __future__ import annotations

import gpytorch
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy
from linear_operator.operators import LinearOperator, ZeroLinearOperator
from torch import Tensor

from gpsparse.precision import NoisySparsePrecisionLinearOperator, SparsePrecisionLinearOperator

__all__ = ["SparsePrecisionPredictionStrategy"]


class SparsePrecisionPredictionStrategy(DefaultPredictionStrategy):
    """Exact GP prediction through the posterior precision (module docstring).

    Returned by :meth:`gpsparse.kernels.SparsePrecisionKernel.prediction_strategy`;
    ``model.eval(); likelihood(model(x_test))`` then never forms a dense
    matrix.
    """

    def __init__(self, train_inputs, train_prior_dist, train_labels, likelihood, root=None, inv_root=None):
        super().__init__(train_inputs, train_prior_dist, train_labels, likelihood, root=root, inv_root=inv_root)
        self._alpha: Tensor | None = None

    def _train_operator(self) -> NoisySparsePrecisionLinearOperator:
        op = self.lik_train_train_covar
        op = op.evaluate_kernel() if hasattr(op, "evaluate_kernel") else op
        if not isinstance(op, NoisySparsePrecisionLinearOperator):
            raise TypeError(
                "SparsePrecisionPredictionStrategy needs a Gaussian likelihood on a sparse-precision kernel "
                f"(got a training covariance of type {type(op).__name__})"
            )
        return op

    def posterior_weights(self) -> Tensor:
        """``α = P⁻¹ Wᵀ D⁻¹ (y − μ)``, shape ``(*batch, N)`` — the mean cache (one solve)."""
        if self._alpha is None:
            op = self._train_operator()
            residual = (self.train_labels - self.train_prior_dist.mean).unsqueeze(-1)
            scaled = residual / op.noise.unsqueeze(-1)
            rhs = scaled if op.interp is None else op.interp._transpose_nonbatch()._matmul(scaled)
            self._alpha = op.posterior_precision().solve(rhs).squeeze(-1)
        return self._alpha

    def exact_prediction(self, test_mean: Tensor, test_test_covar, test_train_covar):
        test_train = _evaluate(test_train_covar)
        test_test = _evaluate(test_test_covar)
        if not isinstance(test_train, SparsePrecisionLinearOperator):
            raise TypeError(f"expected a sparse-precision cross-covariance, got {type(test_train).__name__}")
        w_test = test_train.interp
        mean = test_mean + _apply(w_test, self.posterior_weights().unsqueeze(-1)).squeeze(-1)
        return mean, self._posterior_covariance(test_test, w_test)

    def exact_predictive_mean(self, test_mean: Tensor, test_train_covar) -> Tensor:
        w_test = _evaluate(test_train_covar).interp
        return test_mean + _apply(w_test, self.posterior_weights().unsqueeze(-1)).squeeze(-1)

    def exact_predictive_covar(self, test_test_covar, test_train_covar) -> LinearOperator:
        return self._posterior_covariance(_evaluate(test_test_covar), _evaluate(test_train_covar).interp)

    def _posterior_covariance(self, test_test: LinearOperator, w_test) -> LinearOperator:
        if gpytorch.settings.skip_posterior_variances.on():
            return ZeroLinearOperator(*test_test.shape, dtype=test_test.dtype, device=test_test.device)
        P = self._train_operator().posterior_precision()
        return SparsePrecisionLinearOperator(P, interp=w_test)


def _evaluate(op):
    return op.evaluate_kernel() if hasattr(op, "evaluate_kernel") else op


def _apply(W, x: Tensor) -> Tensor:
    return x if W is None else W._matmul(x)
