r"""GPyTorch prediction for sparse-precision models, hooked through ``Kernel.prediction_strategy``.

For a GMRF prior ``f ~ N(μ, Q⁻¹)`` on N nodes, training observations
``y = W f + ε`` (``ε ~ N(0, D)``) and test rows ``W*``, the posterior of the
latent field has the sparse precision ``P = Q + Wᵀ D⁻¹ W``, so

    mean*  = μ* + W* P⁻¹ Wᵀ D⁻¹ (y − μ)          (one solve in P, cached across calls)
    covar* = W* P⁻¹ W*ᵀ                            (a SparsePrecisionLinearOperator with precision P)

— the posterior is again a sparse-precision covariance. Its variances
``diag(W* P⁻¹ W*ᵀ)`` come from ``gpsparse.operators.precision.covariance_diagonal``:
exact for **any number of test points** from one selected inverse of ``P``
whenever ``P`` has a factorisation (the banded road, or CHOLMOD when
scikit-sparse is installed, up to ``variance_defaults(selected_inverse_limit=)``
nodes), else by solves up to 1024 test points, and a Monte Carlo estimator
beyond or under ``gpytorch.settings.fast_pred_var()`` (relative standard error
``√(2/S)`` per variance, ``gpsparse.linalg.variance``). When a test row of
``W*`` couples two nodes that are not an entry of ``P`` (bilinear interpolation
in a cell without training points on a 5-point-stencil lattice, trilinear on
a 3-D lattice), the covariance is returned on ``P`` stored on the pattern of
``P + 0·W*ᵀW*`` (same matrix, zeros added; R-INLA's ``inla.qinv(Q + 0·AᵀA)``),
so that the selected inverse holds every ``(P⁻¹)[i, j]`` needed — one
factorisation per test pattern, cached across calls with the same test inputs.

*Nodes that depend on the inputs.* GPyTorch evaluates the cross-covariance
as ``k(x*, x)``; a kernel whose latent nodes are built from its inputs (the
1-D Markov kernels of ``gpsparse.kernels.markov``) returns it over the
nodes of the *joint* inputs, ``W*_J Q_J⁻¹ W_Jᵀ``. When ``Q_J`` is not the
training precision (another size, pattern or values), the posterior is
formed on the joint nodes,

    P_J = Q_J + W_Jᵀ D⁻¹ W_J,   mean* = μ* + W*_J P_J⁻¹ W_Jᵀ D⁻¹ (y − μ),   covar* = W*_J P_J⁻¹ W*_Jᵀ

(one solve per prediction call, exact: the joint prior restricted to the
training rows is the training prior). Kernels with fixed nodes (lattices,
graphs) keep the cached path above.

*Additive models.* For ``K = Σ_i W_i Q_i⁻¹ W_iᵀ``
([`SparsePrecisionAdditiveKernel`][gpsparse.kernels.SparsePrecisionAdditiveKernel])
the latent field stacks the components, ``u = (u_1, …, u_k)`` with
``Q = blockdiag(Q_i)`` and ``W = [W_1 ⋯ W_k]``, so the same ``P`` gives each
component's posterior, ``f_i(x*) = W*_i u_i``:

    mean*_i = W*_i (P⁻¹ Wᵀ D⁻¹ (y − μ))[block i],   var*_i = diag(W*_i (P⁻¹)_{ii} W*_iᵀ)

— ``W*`` with its columns outside block ``i`` zeroed, through the same
variance machinery as the total
([`component_predictions`][gpsparse.kernels.prediction.component_predictions]).
The component means add up to the total mean less the prior mean ``μ*``.

``gpytorch.settings.skip_posterior_variances()`` returns a zero covariance.
Samples (``rsample``) are ``W* P^{-1/2} z`` by Lanczos ``f(P)v``. Solves use
[`gpsparse.settings.solver_defaults`][] (``rtol = 1e-6``), not GPyTorch's
``eval_cg_tolerance``.
"""

from __future__ import annotations

import gpytorch
import torch
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy
from linear_operator.operators import LinearOperator, ZeroLinearOperator
from torch import Tensor

from gpsparse.core.cholmod import cholmod_available
from gpsparse.linalg.variance import couples_outside, pattern_with_pairs
from gpsparse.operators.block import restrict_columns
from gpsparse.operators.precision import NoisySparsePrecisionLinearOperator, SparsePrecisionLinearOperator
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = ["SparsePrecisionPredictionStrategy", "component_predictions"]


class SparsePrecisionPredictionStrategy(DefaultPredictionStrategy):
    """Exact GP prediction through the posterior precision (module docstring).

    Returned by ``gpsparse.kernels.SparsePrecisionKernel.prediction_strategy``;
    ``model.eval(); likelihood(model(x_test))`` then never forms a dense
    matrix.
    """

    def __init__(self, train_inputs, train_prior_dist, train_labels, likelihood, root=None, inv_root=None):
        super().__init__(train_inputs, train_prior_dist, train_labels, likelihood, root=root, inv_root=inv_root)
        self._alpha: Tensor | None = None
        self._train_op: NoisySparsePrecisionLinearOperator | None = None
        self._precision = None
        self._widened: tuple | None = None  # (test pattern, P, P on the pattern of P + 0·W*ᵀW*)
        self._last_cross: SparsePrecisionLinearOperator | None = None  # of the last prediction call

    def _train_operator(self) -> NoisySparsePrecisionLinearOperator:
        if self._train_op is not None:
            return self._train_op
        op = self.lik_train_train_covar
        op = op.evaluate_kernel() if hasattr(op, "evaluate_kernel") else op
        if not isinstance(op, NoisySparsePrecisionLinearOperator):
            raise TypeError(
                "SparsePrecisionPredictionStrategy needs a Gaussian likelihood on a sparse-precision kernel "
                f"(got a training covariance of type {type(op).__name__})"
            )
        self._train_op = op
        return op

    def posterior_precision(self):
        """The training posterior precision ``P = Q + WᵀD⁻¹W``.

        Built once per strategy under ``torch.no_grad()`` (the usual prediction), so
        that its selected inverse (exact variances) is computed once across calls;
        rebuilt at every call when gradients are on (a cached graph could be
        back-propagated only once).
        """
        if torch.is_grad_enabled():
            return self._train_operator().posterior_precision()
        if self._precision is None:
            self._precision = self._train_operator().posterior_precision()
        return self._precision

    def posterior_weights(self) -> Tensor:
        """``α = P⁻¹ Wᵀ D⁻¹ (y − μ)``, shape ``(*batch, N)`` — the mean cache (one solve)."""
        if self._alpha is None:
            op = self._train_operator()
            residual = (self.train_labels - self.train_prior_dist.mean).unsqueeze(-1)
            scaled = residual / op.noise.unsqueeze(-1)
            rhs = scaled if op.interp is None else op.interp._transpose_nonbatch()._matmul(scaled)
            self._alpha = self.posterior_precision().solve(rhs).squeeze(-1)
        return self._alpha

    def exact_prediction(self, test_mean: Tensor, test_test_covar, test_train_covar):
        self._last_cross = cross = _cross_covariance(test_train_covar)
        mean, precision, w_test = self._posterior(test_mean, cross)
        return mean, self._posterior_covariance(_evaluate(test_test_covar), precision, w_test)

    def exact_predictive_mean(self, test_mean: Tensor, test_train_covar) -> Tensor:
        return self._posterior(test_mean, _cross_covariance(test_train_covar))[0]

    def exact_predictive_covar(self, test_test_covar, test_train_covar) -> LinearOperator:
        _, precision, w_test = self._posterior(None, _cross_covariance(test_train_covar))
        return self._posterior_covariance(_evaluate(test_test_covar), precision, w_test)

    def component_predictions(self, test_train_covar=None) -> list[tuple[Tensor, Tensor]]:
        r"""Posterior ``(mean, variance)`` of each component ``f_i(x*) = W*_i u_i`` of an additive model.

        Parameters
        ----------
        test_train_covar : SparsePrecisionLinearOperator, optional
            The cross-covariance ``k(x*, x)``; by default that of the last
            prediction call (``model(x_test)``).

        Returns
        -------
        list of (Tensor, Tensor)
            One ``(mean, variance)`` pair per component (one pair for a
            single field), each ``(*batch, n*)``: the formulas of the module
            notes, through the same ``P``, posterior weights and variance
            machinery as the total. The means exclude the prior mean ``μ*``.
        """
        cross = self._last_cross if test_train_covar is None else _cross_covariance(test_train_covar)
        if cross is None:
            raise RuntimeError("no prediction yet: call model(x_test) in eval mode first, or pass test_train_covar")
        weights, precision, w_test = self._weights(cross)
        variance_precision = self._variance_precision(precision, w_test)
        offsets = cross.components if cross.components is not None else (0, cross.Q.shape[-1])
        rows = cross.shape[-2]
        result = []
        for start, stop in zip(offsets, offsets[1:]):
            w_i = restrict_columns(w_test, start, stop, rows, cross.dtype, cross.device)
            mean = w_i._matmul(weights).squeeze(-1)
            variance = SparsePrecisionLinearOperator(variance_precision, interp=w_i)._diagonal()
            result.append((mean, variance))
        return result

    def _posterior(self, test_mean: Tensor | None, cross: SparsePrecisionLinearOperator):
        """``(mean*, P, W*)``: cached training posterior when ``cross`` lives on the training nodes, else joint."""
        weights, precision, w_test = self._weights(cross, need_weights=test_mean is not None)
        if test_mean is None:
            return None, precision, w_test
        return test_mean + _apply(w_test, weights).squeeze(-1), precision, w_test

    def _weights(self, cross: SparsePrecisionLinearOperator, need_weights: bool = True):
        """``(P⁻¹ Wᵀ D⁻¹ (y − μ)`` as ``(*batch, N, 1)`` or None, ``P``, ``W*)``, on the training or joint nodes."""
        op = self._train_operator()
        w_test = cross.interp
        if _same_nodes(cross, op):
            weights = self.posterior_weights().unsqueeze(-1) if need_weights else None
            return weights, self.posterior_precision(), w_test
        # The joint nodes: P_J = Q_J + W_Jᵀ D⁻¹ W_J with the training rows W_J of the cross-covariance.
        joint = NoisySparsePrecisionLinearOperator(cross.Q, op.noise, interp=cross._right)
        precision = joint.posterior_precision()
        if not need_weights:
            return None, precision, w_test
        residual = (self.train_labels - self.train_prior_dist.mean).unsqueeze(-1)
        scaled = residual / op.noise.unsqueeze(-1)
        rhs = scaled if joint.interp is None else joint.interp._transpose_nonbatch()._matmul(scaled)
        return precision.solve(rhs), precision, w_test

    def _posterior_covariance(self, test_test: LinearOperator, precision, w_test) -> LinearOperator:
        if gpytorch.settings.skip_posterior_variances.on():
            return ZeroLinearOperator(*test_test.shape, dtype=test_test.dtype, device=test_test.device)
        return SparsePrecisionLinearOperator(self._variance_precision(precision, w_test), interp=w_test)

    def _variance_precision(self, precision, w_test):
        """``P`` on the pattern of ``P + 0·W*ᵀW*`` when ``W*`` couples nodes outside ``P``'s pattern.

        Only where exact variances from a selected inverse are possible (no
        gradient in ``P``, and the widened pattern has an exact road: banded,
        or CHOLMOD installed); else ``P`` itself (solves or Monte Carlo do not
        need the pairs). Cached for the last test pattern and ``P``.
        """
        if w_test is None or (torch.is_grad_enabled() and precision.values.requires_grad):
            return precision
        cached = self._widened
        if cached is not None and cached[1] is precision and _same_pattern(cached[0], w_test.pattern):
            return cached[2]
        widened = precision
        if couples_outside(precision.pattern, w_test):
            values, pattern = pattern_with_pairs(precision.values, precision.pattern, w_test)
            candidate = SparseLinearOperator(values, pattern=pattern)
            if cholmod_available() or candidate.road(logdet=False) == "banded":
                widened = candidate
        self._widened = (w_test.pattern, precision, widened)
        return widened


def component_predictions(model, x_test: Tensor) -> list[tuple[Tensor, Tensor]]:
    r"""Posterior ``(mean, variance)`` of each component of an additive sparse-precision ``ExactGP`` at ``x_test``.

    Calls ``model(x_test)`` (the model must be in eval mode; gradient mode
    is the caller's) and returns
    [`SparsePrecisionPredictionStrategy.component_predictions`][gpsparse.kernels.prediction.SparsePrecisionPredictionStrategy.component_predictions]:
    one pair per component of the
    [`SparsePrecisionAdditiveKernel`][gpsparse.kernels.SparsePrecisionAdditiveKernel],
    in the order of its kernels, each ``(*batch, n*)``; ``Σ_i mean_i + μ*``
    is the predictive mean.

    Raises
    ------
    RuntimeError
        The model is in training mode.
    TypeError
        The model does not predict through ``SparsePrecisionPredictionStrategy``.

    Examples
    --------
    >>> import gpytorch, torch
    >>> from gpsparse.kernels import LatticeMaternKernel, component_predictions
    >>> class Model(gpytorch.models.ExactGP):
    ...     def __init__(self, x, y):
    ...         super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
    ...         self.covar = LatticeMaternKernel([0.0, 1.0], 40) + LatticeMaternKernel([0.0, 1.0], 10)
    ...     def forward(self, x):
    ...         return gpytorch.distributions.MultivariateNormal(torch.zeros(len(x)), self.covar(x))
    >>> x = torch.linspace(0, 1, 30).unsqueeze(-1)
    >>> model = Model(x, torch.sin(6 * x[:, 0])).eval()
    >>> with torch.no_grad():
    ...     (m1, v1), (m2, v2) = component_predictions(model, x[:5])
    ...     total = model(x[:5]).mean
    >>> bool(torch.allclose(m1 + m2, total, atol=1e-5))
    True
    """
    if model.training:
        raise RuntimeError("component_predictions needs the model in eval mode (model.eval())")
    model(x_test)
    strategy = model.prediction_strategy
    if not isinstance(strategy, SparsePrecisionPredictionStrategy):
        raise TypeError(
            "component_predictions needs a model predicting through SparsePrecisionPredictionStrategy (a "
            f"sparse-precision kernel or SparsePrecisionAdditiveKernel), got {type(strategy).__name__}"
        )
    return strategy.component_predictions()


def _cross_covariance(test_train_covar) -> SparsePrecisionLinearOperator:
    cross = _evaluate(test_train_covar)
    if not isinstance(cross, SparsePrecisionLinearOperator):
        raise TypeError(f"expected a sparse-precision cross-covariance, got {type(cross).__name__}")
    return cross


def _same_nodes(cross: SparsePrecisionLinearOperator, op: NoisySparsePrecisionLinearOperator) -> bool:
    """Whether the cross-covariance's ``Q`` and training rows are the training operator's (O(nnz) comparison)."""
    return _same_sparse(cross.Q, op.Q) and _same_sparse(cross._right, op.interp)


def _same_sparse(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a is b:
        return True
    if a.shape != b.shape or a.pattern.nnz != b.pattern.nnz:
        return False
    return _same_pattern(a.pattern, b.pattern) and torch.equal(a.values.detach(), b.values.detach())


def _same_pattern(a, b) -> bool:
    if a is b:
        return True
    return a.size == b.size and a.nnz == b.nnz and torch.equal(a.crow, b.crow) and torch.equal(a.col, b.col)


def _evaluate(op):
    return op.evaluate_kernel() if hasattr(op, "evaluate_kernel") else op


def _apply(W, x: Tensor) -> Tensor:
    return x if W is None else W._matmul(x)
