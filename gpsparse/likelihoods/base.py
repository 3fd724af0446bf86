r"""The base class of likelihoods for the Laplace approximation: closed-form derivatives in the latent.

A likelihood ``p(y | f) = Π_i p(y_i | f_i)`` factorises over observations; the
Laplace approximation ([`LaplaceMarginalLogLikelihood`][gpsparse.mlls.LaplaceMarginalLogLikelihood])
needs, per observation, ``ℓ_i = log p(y_i | f_i)`` and its first three
derivatives in ``f_i``,

$$
ℓ'_i = \frac{∂ℓ_i}{∂f_i}, \qquad ℓ''_i = \frac{∂^2ℓ_i}{∂f_i^2}, \qquad ℓ'''_i = \frac{∂^3ℓ_i}{∂f_i^3},
$$

— ``ℓ'`` for the gradient of the Newton iteration, ``−ℓ''`` for the weights
``H`` of the posterior precision ``P = Q + Wᵀ H W``, ``ℓ'''`` for the
dependence of ``log det P`` on the mode. Subclasses implement them in closed
form in ``closed_forms(f, y, params)``, a torch expression of the
hyperparameter tensors ``params`` (``laplace_parameters()``), so that their
derivatives with respect to the hyperparameters come from autograd on the
closed forms.

Every subclass is a GPyTorch ``Likelihood``: ``likelihood(f_samples)`` is the
conditional distribution, ``likelihood(mvn)`` the predictive (marginal)
distribution by Gauss–Hermite quadrature against the latent marginals
(``gpsparse.likelihoods.quadrature``), ``expected_log_prob`` and
``log_marginal`` by the same quadrature.

*Exposure.* A per-observation offset ``o_i`` enters as ``η_i = f_i + o_i``
(``o = log E`` for Poisson and negative-binomial exposures). It is given at
construction (the training data's, used by the marginal likelihood) and may
be overridden per call (``likelihood(mvn, exposure=E_test)``); a stored
exposure is used at prediction only when its length matches the test points.
"""

from __future__ import annotations

from typing import Any

import gpytorch
import torch
from torch import Tensor

from gpsparse.likelihoods.quadrature import latent_nodes

__all__ = ["LaplaceLikelihood"]


class LaplaceLikelihood(gpytorch.likelihoods.Likelihood):
    """A factorising likelihood with closed-form ``log p(y|f)`` and its first three derivatives in ``f``.

    Parameters
    ----------
    exposure : Tensor, optional
        ``(n,)`` positive exposures of the training observations (the mean is
        multiplied by them; offset ``log E`` on the latent scale). Only for
        likelihoods that take one (``takes_exposure``).
    num_locs : int, optional
        Gauss–Hermite nodes of the predictive quadrature (default
        ``gpytorch.settings.num_gauss_hermite_locs``, 20).

    Notes
    -----
    Subclasses implement ``closed_forms`` and ``check_targets``, and
    ``conditional(eta, params)`` (the torch distribution of ``y`` given the
    linear predictor ``η = f + offset``).
    """

    takes_exposure: bool = False
    #: Whether ``ℓ`` is concave in ``f`` for every ``y`` (then ``H = −ℓ'' ≥ 0`` and Newton's matrix is definite).
    log_concave: bool = True

    def __init__(self, exposure: Tensor | None = None, num_locs: int | None = None):
        super().__init__()
        if exposure is not None:
            if not self.takes_exposure:
                raise ValueError(f"{type(self).__name__} takes no exposure")
            exposure = _check_exposure(exposure)
            self.register_buffer("exposure", exposure)
        else:
            self.exposure = None
        self.num_locs = int(gpytorch.settings.num_gauss_hermite_locs.value() if num_locs is None else num_locs)

    # ------------------------------------------------------------------ to implement
    def laplace_parameters(self) -> tuple[Tensor, ...]:
        """The (transformed) hyperparameter tensors the closed forms depend on (none by default)."""
        return ()

    def closed_forms(self, f: Tensor, y: Tensor, params: tuple[Tensor, ...], offset: Tensor | None = None):
        """``(ℓ, ℓ', ℓ'', ℓ''')`` elementwise at ``f`` for targets ``y``, differentiable in ``params``."""
        raise NotImplementedError

    def check_targets(self, y: Tensor) -> Tensor:
        """Validate the targets (raise ``ValueError``) and return them."""
        raise NotImplementedError

    def conditional(self, eta: Tensor, params: tuple[Tensor, ...]):
        """The torch distribution of ``y`` given the linear predictor ``η = f + offset``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ public helpers
    def log_prob(self, f: Tensor, y: Tensor, *, exposure: Tensor | None = None) -> Tensor:
        """Elementwise ``log p(y_i | f_i)`` (closed form; the training exposure unless ``exposure`` is given)."""
        y = self.check_targets(y)
        return self.closed_forms(f, y, self.laplace_parameters(), self._offset(f.shape[-1], exposure, "log_prob"))[0]

    def log_prob_derivatives(self, f: Tensor, y: Tensor, *, exposure: Tensor | None = None):
        """``(ℓ', ℓ'', ℓ''')``: the first three derivatives of ``log p(y_i | f_i)`` in ``f_i``, closed form."""
        y = self.check_targets(y)
        offset = self._offset(f.shape[-1], exposure, "log_prob_derivatives")
        return self.closed_forms(f, y, self.laplace_parameters(), offset)[1:]

    def training_offset(self, num: int) -> Tensor | None:
        """The offset ``log E`` of the stored (training) exposure, checked against ``num`` observations."""
        if self.exposure is None:
            return None
        if self.exposure.shape[-1] != num:
            raise ValueError(
                f"the likelihood's exposure has {self.exposure.shape[-1]} entries but there are {num} observations"
            )
        return self.exposure.log()

    def _offset(self, num: int, exposure: Tensor | None, what: str) -> Tensor | None:
        if exposure is not None:
            if not self.takes_exposure:
                raise ValueError(f"{type(self).__name__} takes no exposure")
            return _check_exposure(exposure).log()
        if self.exposure is None:
            return None
        if self.exposure.shape[-1] != num:
            raise ValueError(
                f"{what}: the stored (training) exposure has {self.exposure.shape[-1]} entries but the latent has "
                f"{num}; pass exposure= for these points (exposure=torch.ones(n) for the rate per unit exposure)"
            )
        return self.exposure.log()

    # ------------------------------------------------------------------ GPyTorch protocol
    def forward(self, function_samples: Tensor, *args: Any, exposure: Tensor | None = None, **kwargs: Any):
        """The conditional distribution ``p(y | f)`` at latent samples ``f`` (shape ``(..., n)``)."""
        offset = self._offset(function_samples.shape[-1], exposure, "forward")
        eta = function_samples if offset is None else function_samples + offset.to(function_samples)
        return self.conditional(eta, self.laplace_parameters())

    def marginal(self, function_dist, *args: Any, exposure: Tensor | None = None, **kwargs: Any):
        """The predictive distribution ``∫ p(y | f) N(f; m, v) df`` by Gauss–Hermite quadrature (per point)."""
        mean, variance = function_dist.mean, function_dist.variance
        points, weights = latent_nodes(mean, variance, self.num_locs)
        offset = self._offset(mean.shape[-1], exposure, "marginal")
        if offset is not None:
            points = points + offset.to(points).unsqueeze(-1)
        return self._mixture(points, weights)

    def _mixture(self, points: Tensor, weights: Tensor):
        raise NotImplementedError

    def expected_log_prob(self, observations: Tensor, function_dist, *args: Any, **kwargs: Any) -> Tensor:
        """``E_{f ~ N(m, v)}[log p(y_i | f_i)]`` per point, by Gauss–Hermite quadrature."""
        y = self.check_targets(observations)
        points, weights = latent_nodes(function_dist.mean, function_dist.variance, self.num_locs)
        offset = self._offset(points.shape[-2], kwargs.get("exposure"), "expected_log_prob")
        ell = self.closed_forms(
            points, y.unsqueeze(-1), self.laplace_parameters(), None if offset is None else offset.unsqueeze(-1)
        )[0]
        return (ell * weights).sum(-1)

    def log_marginal(self, observations: Tensor, function_dist, *args: Any, **kwargs: Any) -> Tensor:
        """``log p(y_i) = log ∫ p(y_i | f) N(f; m_i, v_i) df`` per point, by Gauss–Hermite quadrature."""
        y = self.check_targets(observations)
        return self.marginal(function_dist, *args, **kwargs).log_prob(y)


def _check_exposure(exposure) -> Tensor:
    exposure = torch.as_tensor(exposure)
    if not exposure.is_floating_point():
        exposure = exposure.double()
    if exposure.dim() != 1:
        raise ValueError(
            f"exposure must be a 1-D tensor (one entry per observation), got shape {tuple(exposure.shape)}"
        )
    if not bool(torch.isfinite(exposure).all()) or bool((exposure <= 0).any()):
        raise ValueError("exposure must be finite and positive")
    return exposure


def check_finite_targets(y: Tensor, name: str) -> Tensor:
    """``y`` as a floating tensor; ``ValueError`` for non-finite entries (shared by the subclasses)."""
    y = torch.as_tensor(y)
    if not y.is_floating_point():
        y = y.double()
    if y.numel() and not bool(torch.isfinite(y).all()):
        bad = int((~torch.isfinite(y)).reshape(-1).nonzero()[0])
        raise ValueError(f"{name}: the targets must be finite; entry {bad} is {float(y.reshape(-1)[bad])}")
    return y
