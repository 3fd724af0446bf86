r"""Binary likelihood ``y ∈ {0, 1}`` with a logit (default) or probit link.

**Logit**, ``P(y = 1 | f) = σ(f)``:

$$
ℓ = y f − \mathrm{softplus}(f), \quad ℓ' = y − σ, \quad ℓ'' = −σ(1 − σ), \quad ℓ''' = −σ(1 − σ)(1 − 2σ).
$$

**Probit**, ``P(y = 1 | f) = Φ(f)``: with ``s = 2y − 1``, ``z = s f`` and the
inverse Mills ratio ``λ = φ(z)/Φ(z)`` (from ``log Φ``, stable for very
negative ``z``):

$$
ℓ = \log Φ(z), \quad ℓ' = s λ, \quad ℓ'' = −λ(z + λ), \quad ℓ''' = s\,[λ(z + λ)(z + 2λ) − λ].
$$

Both are concave in ``f``. Labels must be 0 or 1 (any float or integer
dtype); anything else, or a non-finite label, raises ``ValueError``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gpsparse.likelihoods.base import LaplaceLikelihood, check_finite_targets

__all__ = ["BernoulliLikelihood"]

LINKS = ("logit", "probit")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class BernoulliLikelihood(LaplaceLikelihood):
    r"""``y_i ~ Bernoulli(σ(f_i))`` (``link="logit"``, default) or ``Bernoulli(Φ(f_i))`` (``link="probit"``).

    Parameters
    ----------
    link : {"logit", "probit"}
        The inverse link. GPyTorch's own ``BernoulliLikelihood`` is the probit one.
    num_locs : int, optional
        Gauss–Hermite nodes of the logit predictive quadrature (default 20).

    Notes
    -----
    ``likelihood(model(x_test))`` is ``torch.distributions.Bernoulli`` with
    ``probs = E[σ(f)]`` by Gauss–Hermite quadrature (logit) or the closed form
    ``Φ(m / √(1 + v))`` (probit). No hyperparameters.
    """

    def __init__(self, link: str = "logit", num_locs: int | None = None):
        if link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, got {link!r}")
        super().__init__(num_locs=num_locs)
        self.link = link

    def check_targets(self, y: Tensor) -> Tensor:
        y = check_finite_targets(y, "BernoulliLikelihood")
        flat = y.reshape(-1)
        bad = (flat != 0) & (flat != 1)
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise ValueError(f"BernoulliLikelihood: labels must be 0 or 1; entry {first} is {float(flat[first])}")
        return y

    def closed_forms(self, f: Tensor, y: Tensor, params=(), offset: Tensor | None = None):
        eta = f if offset is None else f + offset.to(f)
        if self.link == "logit":
            p = torch.sigmoid(eta)
            q = torch.sigmoid(-eta)
            ell = y * eta - F.softplus(eta)
            d2 = -p * q
            return ell, y - p, d2, d2 * (q - p)
        s = 2.0 * y - 1.0
        z = s * eta
        log_cdf = torch.special.log_ndtr(z)
        lam = torch.exp(-0.5 * z * z - _HALF_LOG_2PI - log_cdf)
        zl = z + lam
        d2 = -lam * zl
        d3 = s * (lam * zl * (z + 2.0 * lam) - lam)
        return log_cdf, s * lam, d2, d3

    def conditional(self, eta: Tensor, params=()):
        if self.link == "logit":
            return torch.distributions.Bernoulli(logits=eta, validate_args=False)
        return torch.distributions.Bernoulli(probs=torch.special.ndtr(eta), validate_args=False)

    def marginal(self, function_dist, *args, exposure=None, **kwargs):
        if exposure is not None:
            raise ValueError("BernoulliLikelihood takes no exposure")
        if self.link == "probit":
            mean, variance = function_dist.mean, function_dist.variance
            probs = torch.special.ndtr(mean / torch.sqrt(1.0 + variance))
            return torch.distributions.Bernoulli(probs=probs, validate_args=False)
        return super().marginal(function_dist, *args, **kwargs)

    def _mixture(self, points: Tensor, weights: Tensor):
        probs = (torch.sigmoid(points) * weights).sum(-1)
        return torch.distributions.Bernoulli(probs=probs, validate_args=False)
