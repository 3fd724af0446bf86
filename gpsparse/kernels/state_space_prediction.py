r"""GPyTorch prediction for the state-space (1-D Markov) kernels: Kalman filter and RTS smoother.

GPyTorch evaluates the cross-covariance ``k(x*, x)`` of a state-space kernel
as a [`StateSpaceCovarianceLinearOperator`][gpsparse.operators.state_space.StateSpaceCovarianceLinearOperator]
on the steps of the *joint* sorted inputs (every test and training input its
own step; equal inputs are steps with a zero gap). With
``α = (K + D)⁻¹(y − μ)`` from the training operator's Kalman solve,

    mean*  = μ* + K*ₓ α                                  (one covariance product on the joint steps)
    covar* = K** − K*ₓ (K + D)⁻¹ Kₓ*                     (a lazy operator: products by two covariance
                                                          products and one Kalman solve)
    diag(covar*)                                         (the RTS smoother on the joint steps, training
                                                          steps observed and test steps not)

— exact for any inputs, ``O((n + m) s³)``. The variances of the smoother are
values without a graph; where a gradient is needed (gradients enabled and the
hyperparameters requiring grad) they are computed differentiably as
``k** − rowsum(K*ₓ ⊙ ((K + D)⁻¹ Kₓ*)ᵀ)`` by Kalman solves with the test
columns, in blocks, up to ``_DIFFERENTIABLE_VARIANCE_LIMIT`` test points, and
above that raise (wrap the prediction in ``torch.no_grad()``).
"""

from __future__ import annotations

import gpytorch
import torch
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy
from linear_operator.operators import LinearOperator, ZeroLinearOperator
from torch import Tensor

from gpsparse.autograd.kalman import smoothed_moments
from gpsparse.operators.state_space import (
    NoisyStateSpaceCovarianceLinearOperator,
    StateSpaceCovarianceLinearOperator,
)

__all__ = ["StateSpacePredictionStrategy", "StateSpacePosteriorCovariance"]

#: Most test points whose variances are computed with a graph (Kalman solves with that many columns).
_DIFFERENTIABLE_VARIANCE_LIMIT = 4096
_BLOCK = 256


class StateSpacePredictionStrategy(DefaultPredictionStrategy):
    """Exact GP prediction for state-space kernels (module docstring)."""

    def __init__(self, train_inputs, train_prior_dist, train_labels, likelihood, root=None, inv_root=None):
        super().__init__(train_inputs, train_prior_dist, train_labels, likelihood, root=root, inv_root=inv_root)
        self._alpha: Tensor | None = None
        self._train_op: NoisyStateSpaceCovarianceLinearOperator | None = None

    def _train_operator(self) -> NoisyStateSpaceCovarianceLinearOperator:
        if self._train_op is None or torch.is_grad_enabled():
            op = self.lik_train_train_covar
            op = op.evaluate_kernel() if hasattr(op, "evaluate_kernel") else op
            if not isinstance(op, NoisyStateSpaceCovarianceLinearOperator):
                raise TypeError(
                    "StateSpacePredictionStrategy needs a Gaussian likelihood on a state-space kernel "
                    f"(got a training covariance of type {type(op).__name__})"
                )
            if torch.is_grad_enabled():
                return op
            self._train_op = op
        return self._train_op

    def posterior_weights(self) -> Tensor:
        """``α = (K + D)⁻¹ (y − μ)``, ``(*batch, n)``; cached without gradients, recomputed with them."""
        if self._alpha is not None and not torch.is_grad_enabled():
            return self._alpha
        residual = self.train_labels - self.train_prior_dist.mean
        alpha = self._train_operator().solve(residual.unsqueeze(-1)).squeeze(-1)
        if not torch.is_grad_enabled():
            self._alpha = alpha
        return alpha

    def exact_prediction(self, test_mean: Tensor, test_test_covar, test_train_covar):
        cross = _evaluate(test_train_covar)
        return self.exact_predictive_mean(test_mean, cross), self.exact_predictive_covar(test_test_covar, cross)

    def exact_predictive_mean(self, test_mean: Tensor, test_train_covar) -> Tensor:
        cross = _cross(test_train_covar)
        return test_mean + cross._matmul(self.posterior_weights().unsqueeze(-1)).squeeze(-1)

    def exact_predictive_covar(self, test_test_covar, test_train_covar) -> LinearOperator:
        test_test = _evaluate(test_test_covar)
        if gpytorch.settings.skip_posterior_variances.on():
            return ZeroLinearOperator(*test_test.shape, dtype=test_test.dtype, device=test_test.device)
        return StateSpacePosteriorCovariance(test_test, _cross(test_train_covar), self._train_operator())


class StateSpacePosteriorCovariance(LinearOperator):
    r"""``K** − K*ₓ (K + D)⁻¹ Kₓ*`` (module docstring), never formed.

    Parameters
    ----------
    test_test : LinearOperator
        ``K** (*batch, m, m)``.
    cross : StateSpaceCovarianceLinearOperator
        ``K*ₓ (*batch, m, n)`` on the joint steps.
    train : NoisyStateSpaceCovarianceLinearOperator
        ``K + D`` of the training inputs.
    """

    def __init__(self, test_test: LinearOperator, cross: StateSpaceCovarianceLinearOperator, train):
        super().__init__(test_test, cross, train)
        self.test_test, self.cross, self.train = test_test, cross, train

    def _size(self) -> torch.Size:
        return self.test_test.shape

    def _transpose_nonbatch(self) -> StateSpacePosteriorCovariance:
        return self

    def _matmul(self, rhs: Tensor) -> Tensor:
        correction = self.cross._matmul(self.train.solve(self.cross._transpose_nonbatch()._matmul(rhs)))
        return self.test_test._matmul(rhs) - correction

    def _diagonal(self) -> Tensor:
        if torch.is_grad_enabled() and _requires_grad(self.cross, self.train):
            return self._differentiable_diagonal()
        return self._smoothed_variances()

    def _smoothed_variances(self) -> Tensor:
        """The RTS smoother on the joint steps: training steps observed, test steps not."""
        cross, noise = self.cross, self.train.noise
        n = cross.num_steps
        observed = torch.zeros(n, dtype=torch.bool)
        observed[cross._cols.cpu()] = True
        step_noise = torch.ones(*noise.shape[:-1], n, dtype=noise.dtype, device=noise.device)
        step_noise = step_noise.index_copy(-1, cross._cols, noise.detach())
        rhs = torch.zeros(n, 1, dtype=noise.dtype, device=noise.device)
        with torch.no_grad():
            _, var = smoothed_moments(cross.transitions, cross.noises, cross.stationary, step_noise, rhs, observed)
        return var.index_select(-1, cross.rows)

    def _differentiable_diagonal(self) -> Tensor:
        m = self.cross.shape[-2]
        if m > _DIFFERENTIABLE_VARIANCE_LIMIT:
            raise RuntimeError(
                f"differentiable posterior variances at {m} > {_DIFFERENTIABLE_VARIANCE_LIMIT} test points would need "
                "as many Kalman solves; predict under torch.no_grad() (exact smoother variances), or in chunks"
            )
        cross_t = self.cross._transpose_nonbatch()
        prior = self.test_test._diagonal()
        out = []
        for start in range(0, m, _BLOCK):
            index = torch.arange(start, min(start + _BLOCK, m), device=self.cross.rows.device)
            kxs = cross_t._matmul(_unit(m, index, self))  # (*batch, n, block): columns of Kₓ*
            reduced = (kxs * self.train.solve(kxs)).sum(-2)
            out.append(prior[..., index] - reduced)
        return torch.cat(out, -1)


def _unit(m: int, index: Tensor, like: LinearOperator) -> Tensor:
    eye = torch.zeros(m, index.numel(), dtype=like.dtype, device=like.device)
    eye[index, torch.arange(index.numel(), device=like.device)] = 1.0
    return eye


def _requires_grad(cross: StateSpaceCovarianceLinearOperator, train) -> bool:
    tensors = (cross.transitions, cross.noises, cross.stationary, train.noise)
    return any(t.requires_grad for t in tensors)


def _evaluate(op):
    return op.evaluate_kernel() if hasattr(op, "evaluate_kernel") else op


def _cross(test_train_covar) -> StateSpaceCovarianceLinearOperator:
    cross = _evaluate(test_train_covar)
    if not isinstance(cross, StateSpaceCovarianceLinearOperator):
        raise TypeError(
            "StateSpacePredictionStrategy needs the cross-covariance of a state-space kernel "
            f"(got {type(cross).__name__})"
        )
    return cross
