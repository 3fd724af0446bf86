r"""GPyTorch prediction for constrained (intrinsic) GMRF kernels, through the constrained posterior.

For a latent field ``x`` with the constrained prior ``N(0, Σ_Q)`` (``A x = 0``;
``Σ_Q = Q⁺`` for an intrinsic ``Q``), observations ``y = W x + ε`` with
``ε ~ N(0, D)`` and test rows ``W*``, the posterior is again constrained,
with the sparse precision ``P = Q + WᵀD⁻¹W`` on the constraint subspace:

    x̂      = Σ_P Wᵀ D⁻¹ (y − μ)              (A x̂ = 0 to rounding; cached)
    mean*  = μ* + W* x̂
    covar* = W* Σ_P W*ᵀ                        (a ConstrainedPrecisionLinearOperator with precision P)

``Σ_P`` is applied through the completion ``H = P + EEᵀ`` (one solve call
with ``2k`` + 1 right-hand sides) and its rank-``2k`` correction
(``gpsparse.operators.constrained``). The variances — ``diag(W* H⁻¹ W*ᵀ)``
plus exact low-rank terms — are exact whenever ``H`` has a selected inverse (the banded road: random walks; CHOLMOD
for graphs), else by solves or Monte Carlo as in
[`covariance_diagonal`][gpsparse.operators.gmrf.covariance_diagonal]. The
posterior mean ``x̂`` is projected once more onto ``A x = 0``
(``x̂ ← x̂ − V Vᵀ x̂``), so the constraints hold to rounding (≤ 1e-10 in
float64) whatever the accuracy of the solves.

Stacked fields (BYM2's unstructured and structured parts; ``components``
offsets) get per-component posterior means and variances from
[`ConstrainedPredictionStrategy.component_predictions`][gpsparse.kernels.constrained_prediction.ConstrainedPredictionStrategy.component_predictions],
and the latent posterior mean from
[`ConstrainedPredictionStrategy.latent_mean`][gpsparse.kernels.constrained_prediction.ConstrainedPredictionStrategy.latent_mean].
The latent nodes are fixed by the kernel (knots, graph nodes), so the test
cross-covariance must live on the training nodes.
"""

from __future__ import annotations

import gpytorch
import torch
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy
from linear_operator.operators import LinearOperator, ZeroLinearOperator
from torch import Tensor

from gpsparse.operators.block import restrict_columns
from gpsparse.operators.constrained import ConstrainedPrecisionLinearOperator, NoisyConstrainedPrecisionLinearOperator

__all__ = ["ConstrainedPredictionStrategy"]


class ConstrainedPredictionStrategy(DefaultPredictionStrategy):
    """Exact GP prediction for constrained GMRF kernels (module docstring).

    Returned by the intrinsic kernels' ``prediction_strategy`` (which
    ``ScaleKernel`` forwards), so ``model.eval(); likelihood(model(x_test))``
    never forms a dense matrix.
    """

    def __init__(self, train_inputs, train_prior_dist, train_labels, likelihood, root=None, inv_root=None):
        super().__init__(train_inputs, train_prior_dist, train_labels, likelihood, root=root, inv_root=inv_root)
        self._train_op: NoisyConstrainedPrecisionLinearOperator | None = None
        self._mean: Tensor | None = None
        self._precision = None
        self._last_cross: ConstrainedPrecisionLinearOperator | None = None

    def _train_operator(self) -> NoisyConstrainedPrecisionLinearOperator:
        if self._train_op is not None:
            return self._train_op
        op = self.lik_train_train_covar
        op = op.evaluate_kernel() if hasattr(op, "evaluate_kernel") else op
        if not isinstance(op, NoisyConstrainedPrecisionLinearOperator):
            raise TypeError(
                "ConstrainedPredictionStrategy needs a Gaussian likelihood on a constrained (intrinsic) kernel "
                f"(got a training covariance of type {type(op).__name__})"
            )
        self._train_op = op
        return op

    def posterior_precision(self):
        """``P = Q + WᵀD⁻¹W`` (cached under ``torch.no_grad()``; rebuilt per call with gradients on)."""
        if torch.is_grad_enabled():
            return self._train_operator().posterior_precision()
        if self._precision is None:
            self._precision = self._train_operator().posterior_precision()
        return self._precision

    def latent_mean(self) -> Tensor:
        """The constrained posterior mean ``x̂`` ``(*batch, N)`` of the latent field (``A x̂ = 0`` to rounding)."""
        if self._mean is not None and not torch.is_grad_enabled():
            return self._mean
        op = self._train_operator()
        mean = op.posterior_mean(self.train_labels - self.train_prior_dist.mean)
        if not torch.is_grad_enabled():
            self._mean = mean
        return mean

    def exact_prediction(self, test_mean: Tensor, test_test_covar, test_train_covar):
        self._last_cross = cross = self._cross(test_train_covar)
        mean = test_mean + _apply(cross.interp, self.latent_mean().unsqueeze(-1)).squeeze(-1)
        return mean, self._posterior_covariance(_evaluate(test_test_covar), cross)

    def exact_predictive_mean(self, test_mean: Tensor, test_train_covar) -> Tensor:
        cross = self._cross(test_train_covar)
        return test_mean + _apply(cross.interp, self.latent_mean().unsqueeze(-1)).squeeze(-1)

    def exact_predictive_covar(self, test_test_covar, test_train_covar) -> LinearOperator:
        return self._posterior_covariance(_evaluate(test_test_covar), self._cross(test_train_covar))

    def component_predictions(self, test_train_covar=None) -> list[tuple[Tensor, Tensor]]:
        r"""Posterior ``(mean, variance)`` of each stacked component ``f_i(x*) = W*_i x_i`` (one pair for one field).

        Parameters
        ----------
        test_train_covar : ConstrainedPrecisionLinearOperator, optional
            ``k(x*, x)``; by default that of the last prediction call.

        Returns
        -------
        list of (Tensor, Tensor)
            ``(*batch, n*)`` each; the means exclude the prior mean and add up
            to the predictive mean less ``μ*``.
        """
        cross = self._last_cross if test_train_covar is None else self._cross(test_train_covar)
        if cross is None:
            raise RuntimeError("no prediction yet: call model(x_test) in eval mode first, or pass test_train_covar")
        weights = self.latent_mean().unsqueeze(-1)
        posterior = ConstrainedPrecisionLinearOperator(self.posterior_precision(), cross.constraints)
        offsets = cross.components if cross.components is not None else (0, cross.Q.shape[-1])
        rows = cross.shape[-2]
        result = []
        for start, stop in zip(offsets, offsets[1:]):
            w_i = restrict_columns(cross.interp, start, stop, rows, cross.dtype, cross.device)
            mean = w_i._matmul(weights).squeeze(-1)
            variance = posterior._with(interp=w_i)._diagonal()
            result.append((mean, variance))
        return result

    def _cross(self, test_train_covar) -> ConstrainedPrecisionLinearOperator:
        cross = _evaluate(test_train_covar)
        if not isinstance(cross, ConstrainedPrecisionLinearOperator):
            raise TypeError(f"expected a constrained sparse-precision cross-covariance, got {type(cross).__name__}")
        op = self._train_operator()
        if cross.Q.shape != op.Q.shape or not cross.constraints.same_as(op.constraints):
            raise ValueError(
                "the test cross-covariance lives on other latent nodes or constraints than the training covariance"
            )
        return cross

    def _posterior_covariance(self, test_test: LinearOperator, cross: ConstrainedPrecisionLinearOperator):
        if gpytorch.settings.skip_posterior_variances.on():
            return ZeroLinearOperator(*test_test.shape, dtype=test_test.dtype, device=test_test.device)
        return ConstrainedPrecisionLinearOperator(
            self.posterior_precision(), cross.constraints, interp=cross.interp, components=cross.components
        )


def _evaluate(op):
    return op.evaluate_kernel() if hasattr(op, "evaluate_kernel") else op


def _apply(W, x: Tensor) -> Tensor:
    return x if W is None else W._matmul(x)
