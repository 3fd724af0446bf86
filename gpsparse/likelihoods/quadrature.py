r"""Gauss–Hermite quadrature against the latent marginals, and the predictive distributions it builds.

For a latent ``f ~ N(m, v)`` (one per test point) and a likelihood ``p(y | f)``,
the predictive distribution ``p(y) = ∫ p(y | f) N(f; m, v) df`` is the
mixture

$$
p(y) \approx \sum_{j=1}^{J} w_j \, p(y \mid f_j), \qquad
f_j = m + \sqrt{2v}\, t_j, \qquad w_j = ω_j / \sqrt{π},
$$

over the ``J`` Gauss–Hermite nodes ``t_j`` and weights ``ω_j`` (exact for
``p(y|f)`` polynomial of degree ``< 2J`` in ``f``), GPyTorch's
``GaussHermiteQuadrature1D`` rule with its default ``J =
gpytorch.settings.num_gauss_hermite_locs`` (20), but with nodes and weights in
float64 (GPyTorch stores them in float32, a 1e-7 relative error).

[`CountQuadratureMixture`][gpsparse.likelihoods.quadrature.CountQuadratureMixture]
is that mixture for count likelihoods (Poisson, negative binomial) as a
``torch.distributions.MixtureSameFamily``: ``mean``, ``variance``,
``log_prob`` and ``sample`` from torch, plus ``cdf`` and integer quantiles
``icdf`` (the smallest ``k`` with ``P(Y ≤ k) ≥ q``, by bisection on the
mixture's cdf).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Categorical, MixtureSameFamily

__all__ = ["gauss_hermite", "latent_nodes", "CountQuadratureMixture"]


def gauss_hermite(num_locs: int, dtype=torch.float64, device=None) -> tuple[Tensor, Tensor]:
    """Nodes ``t_j`` and normalised weights ``w_j = ω_j/√π`` (summing to 1) of the ``num_locs``-point rule."""
    if int(num_locs) < 1:
        raise ValueError(f"num_locs must be a positive integer, got {num_locs}")
    nodes, weights = np.polynomial.hermite.hermgauss(int(num_locs))
    nodes = torch.as_tensor(nodes, dtype=torch.float64)
    weights = torch.as_tensor(weights / math.sqrt(math.pi), dtype=torch.float64)
    return nodes.to(dtype=dtype, device=device), weights.to(dtype=dtype, device=device)


def latent_nodes(mean: Tensor, variance: Tensor, num_locs: int) -> tuple[Tensor, Tensor]:
    """Quadrature points ``f_j = m + √(2v) t_j`` ``(*batch, n, J)`` and weights ``(J,)`` for ``f ~ N(m, v)``."""
    nodes, weights = gauss_hermite(num_locs, dtype=mean.dtype, device=mean.device)
    points = mean.unsqueeze(-1) + torch.sqrt(2.0 * variance.clamp_min(0.0)).unsqueeze(-1) * nodes
    return points, weights


class CountQuadratureMixture(MixtureSameFamily):
    r"""The Gauss–Hermite mixture ``Σ_j w_j p(y | f_j)`` of a count distribution, batch ``(*batch, n)``.

    Parameters
    ----------
    components : torch.distributions.Distribution
        ``p(y | f_j)`` with batch shape ``(*batch, n, J)`` (the last dimension
        runs over the quadrature nodes); ``torch.distributions.Poisson`` or
        ``NegativeBinomial``.
    weights : Tensor
        ``(J,)`` quadrature weights (summing to 1).
    cdf_fn : callable
        ``cdf_fn(k)`` → ``P(Y ≤ k | f_j)`` of shape ``(*batch, n, J)`` for integer
        ``k`` broadcast against ``(*batch, n, 1)``.

    Notes
    -----
    ``mean`` and ``variance`` are the mixture's (law of total variance),
    ``log_prob(y) = log Σ_j w_j p(y | f_j)``; ``cdf(k) = Σ_j w_j P(Y ≤ k | f_j)``
    (``k`` rounded down to an integer) and ``icdf(q)`` the smallest integer
    ``k ≥ 0`` with ``cdf(k) ≥ q``, by bisection (``O(log k)`` cdf evaluations).
    """

    def __init__(self, components, weights: Tensor, cdf_fn):
        mixing = Categorical(probs=weights.expand(*components.batch_shape))
        super().__init__(mixing, components, validate_args=False)
        self._cdf_fn = cdf_fn

    def cdf(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value, dtype=self.mean.dtype, device=self.mean.device)
        k = torch.floor(value).unsqueeze(-1)
        probs = self._cdf_fn(k)
        result = (probs * self.mixture_distribution.probs).sum(-1)
        return torch.where(value < 0, torch.zeros_like(result), result.clamp(0.0, 1.0))

    def icdf(self, value: Tensor) -> Tensor:
        """Smallest integer ``k ≥ 0`` with ``cdf(k) ≥ q`` for ``q`` in ``[0, 1)`` (broadcast against the batch)."""
        q = torch.as_tensor(value, dtype=self.mean.dtype, device=self.mean.device)
        if bool(((q < 0) | (q >= 1)).any()):
            raise ValueError("quantile levels must lie in [0, 1)")
        shape = torch.broadcast_shapes(q.shape, self.batch_shape)
        q = q.expand(shape)
        low = torch.full(shape, -1.0, dtype=q.dtype, device=q.device)  # cdf(-1) = 0 < q (or q = 0: answer 0)
        high = torch.ceil(self.mean + 10.0 * self.variance.sqrt() + 10.0).expand(shape).clone()
        while True:  # make sure cdf(high) ≥ q
            short = self.cdf(high) < q
            if not bool(short.any()):
                break
            high = torch.where(short, 2.0 * high + 1.0, high)
        while bool((high - low > 1).any()):
            mid = torch.floor((low + high) / 2)
            reached = self.cdf(mid) >= q
            high = torch.where(reached, mid, high)
            low = torch.where(reached, low, mid)
        return high
