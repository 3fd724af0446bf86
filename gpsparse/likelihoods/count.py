r"""Count likelihoods with a log link: Poisson and negative binomial, with exposures.

With the linear predictor ``η = f + log E`` (exposure ``E``, default 1) and
mean ``μ = e^η``:

**Poisson** ``y ~ Poisson(μ)``:

$$
ℓ = y η − e^{η} − \log y!, \qquad ℓ' = y − μ, \qquad ℓ'' = ℓ''' = −μ.
$$

**Negative binomial** with dispersion (size) ``r > 0``, ``Var y = μ + μ²/r``,
and ``p = μ/(r + μ) = σ(η − \log r)``:

$$
ℓ = \log Γ(y + r) − \log Γ(r) − \log y! − r\,\mathrm{softplus}(η − \log r) − y\,\mathrm{softplus}(\log r − η),
$$
$$
ℓ' = y − (y + r)p, \qquad ℓ'' = −(y + r)p(1 − p), \qquad ℓ''' = −(y + r)p(1 − p)(1 − 2p).
$$

Both are concave in ``f`` (``ℓ'' < 0``), so the Laplace mode is unique and
Newton's matrix ``Q + WᵀHW`` is positive definite. Targets must be finite,
non-negative integers (stored as floats); anything else raises ``ValueError``.
"""

from __future__ import annotations

import numpy as np
import scipy.special
import torch
import torch.nn.functional as F
from gpytorch.constraints import Interval, Positive
from gpytorch.priors import Prior
from torch import Tensor

from gpsparse.likelihoods.base import LaplaceLikelihood, check_finite_targets
from gpsparse.likelihoods.quadrature import CountQuadratureMixture

__all__ = ["PoissonLikelihood", "NegativeBinomialLikelihood"]


def check_counts(y: Tensor, who: str) -> Tensor:
    """Finite, non-negative integer targets, else ``ValueError`` naming the first offending entry."""
    y = check_finite_targets(y, who)
    flat = y.reshape(-1)
    negative = flat < 0
    if bool(negative.any()):
        bad = int(negative.nonzero()[0])
        raise ValueError(f"{who}: counts must be non-negative; entry {bad} is {float(flat[bad])}")
    fractional = flat != torch.round(flat)
    if bool(fractional.any()):
        bad = int(fractional.nonzero()[0])
        raise ValueError(f"{who}: counts must be integers; entry {bad} is {float(flat[bad])}")
    return y


class PoissonLikelihood(LaplaceLikelihood):
    r"""``y_i ~ Poisson(E_i e^{f_i})``: log link with optional exposures ``E`` (offset ``log E``).

    Parameters
    ----------
    exposure : Tensor, optional
        ``(n,)`` positive exposures of the training observations (e.g. expected
        counts in disease mapping, cell areas for a binned point pattern).
    num_locs : int, optional
        Gauss–Hermite nodes of the predictive distribution (default 20).

    Notes
    -----
    ``likelihood(model(x_test))`` is a
    [`CountQuadratureMixture`][gpsparse.likelihoods.quadrature.CountQuadratureMixture]
    of Poisson distributions (``mean``, ``variance``, ``log_prob``, ``cdf``,
    ``icdf`` quantiles); its mean is also exactly ``E e^{m + v/2}``.
    No hyperparameters.
    """

    takes_exposure = True

    def check_targets(self, y: Tensor) -> Tensor:
        return check_counts(y, "PoissonLikelihood")

    def closed_forms(self, f: Tensor, y: Tensor, params=(), offset: Tensor | None = None):
        eta = f if offset is None else f + offset.to(f)
        mu = torch.exp(eta)
        ell = y * eta - mu - torch.lgamma(y + 1.0)
        return ell, y - mu, -mu, -mu

    def conditional(self, eta: Tensor, params=()):
        return torch.distributions.Poisson(torch.exp(eta), validate_args=False)

    def _mixture(self, points: Tensor, weights: Tensor):
        rates = torch.exp(points)
        return CountQuadratureMixture(
            torch.distributions.Poisson(rates, validate_args=False),
            weights,
            lambda k: torch.where(k < 0, torch.zeros_like(rates), torch.special.gammaincc(k.clamp_min(0) + 1.0, rates)),
        )


class NegativeBinomialLikelihood(LaplaceLikelihood):
    r"""``y_i ~ NB(mean μ_i = E_i e^{f_i}, dispersion r)``, ``Var y_i = μ_i + μ_i²/r``; ``r`` learnable.

    Parameters
    ----------
    exposure : Tensor, optional
        ``(n,)`` positive exposures of the training observations.
    dispersion_prior : gpytorch.priors.Prior, optional
        Prior on ``r``.
    dispersion_constraint : gpytorch.constraints.Interval, optional
        Constraint on ``r`` (default ``Positive()``).
    num_locs : int, optional
        Gauss–Hermite nodes of the predictive distribution (default 20).

    Attributes
    ----------
    dispersion : Tensor
        ``r`` (the "size"; ``r → ∞`` is the Poisson limit), initialised to 1.

    Notes
    -----
    The predictive distribution is a Gauss–Hermite mixture of
    ``torch.distributions.NegativeBinomial(total_count=r, logits=η − log r)``
    (mean ``e^η``); its ``cdf`` is ``I_{1−p}(r, k + 1)`` (SciPy's regularised
    incomplete beta, detached).
    """

    takes_exposure = True

    def __init__(
        self,
        exposure: Tensor | None = None,
        *,
        dispersion_prior: Prior | None = None,
        dispersion_constraint: Interval | None = None,
        num_locs: int | None = None,
    ):
        super().__init__(exposure=exposure, num_locs=num_locs)
        self.register_parameter("raw_dispersion", torch.nn.Parameter(torch.zeros(1)))
        self.register_constraint(
            "raw_dispersion", Positive() if dispersion_constraint is None else dispersion_constraint
        )
        if dispersion_prior is not None:
            self.register_prior(
                "dispersion_prior", dispersion_prior, lambda m: m.dispersion, lambda m, v: m._set_dispersion(v)
            )
        self._set_dispersion(1.0)

    @property
    def dispersion(self) -> Tensor:
        return self.raw_dispersion_constraint.transform(self.raw_dispersion)

    @dispersion.setter
    def dispersion(self, value) -> None:
        self._set_dispersion(value)

    def _set_dispersion(self, value) -> None:
        raw = self.raw_dispersion
        value = torch.as_tensor(value, dtype=raw.dtype, device=raw.device)
        self.initialize(raw_dispersion=self.raw_dispersion_constraint.inverse_transform(value).reshape(1))

    def laplace_parameters(self) -> tuple[Tensor, ...]:
        return (self.dispersion,)

    def check_targets(self, y: Tensor) -> Tensor:
        return check_counts(y, "NegativeBinomialLikelihood")

    def closed_forms(self, f: Tensor, y: Tensor, params, offset: Tensor | None = None):
        (r,) = params
        r = r.to(f).reshape(())
        eta = f if offset is None else f + offset.to(f)
        log_r = torch.log(r)
        z = eta - log_r
        p = torch.sigmoid(z)
        q = torch.sigmoid(-z)  # 1 − p without cancellation
        ell = torch.lgamma(y + r) - torch.lgamma(r) - torch.lgamma(y + 1.0) - r * F.softplus(z) - y * F.softplus(-z)
        total = y + r
        d1 = y - total * p
        d2 = -total * p * q
        d3 = d2 * (q - p)
        return ell, d1, d2, d3

    def conditional(self, eta: Tensor, params):
        (r,) = params
        r = r.to(eta).reshape(())
        return torch.distributions.NegativeBinomial(total_count=r, logits=eta - torch.log(r), validate_args=False)

    def _mixture(self, points: Tensor, weights: Tensor):
        r = self.dispersion.detach().to(points).reshape(())
        components = torch.distributions.NegativeBinomial(
            total_count=r.expand(points.shape), logits=points - torch.log(r), validate_args=False
        )
        fail = torch.sigmoid(torch.log(r) - points)  # 1 − p

        def cdf(k: Tensor) -> Tensor:
            k_np = np.broadcast_to(k.detach().cpu().numpy(), points.shape)
            out = scipy.special.betainc(float(r), np.maximum(k_np, 0.0) + 1.0, fail.detach().cpu().numpy())
            out = np.where(k_np < 0, 0.0, out)
            return torch.as_tensor(out, dtype=points.dtype, device=points.device)

        return CountQuadratureMixture(components, weights, cdf)
