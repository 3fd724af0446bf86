r"""Fractional Matérn smoothness on a lattice: ``(κ² I + L)^{−α}`` for non-integer ``α`` as a sum of GMRFs.

With ``α = n + β`` (``n = ⌊α⌋``, ``0 < β < 1``), ``A = κ² I + L`` and the
positive partial-fraction approximation ``y^β ≈ c₀ + Σ_i r_i y/(1 + p_i y)``
of ``gpsparse.core.rational`` at ``y = κ²/(κ² + λ)``,

$$
A^{−α} ≈ κ^{−2β} A^{−n}\Bigl[c_0 I + \sum_{i=1}^m r_i κ^2 (A + p_i κ^2)^{−1}\Bigr]
= Q_0^{−1} + \sum_{i=1}^m Q_i^{−1},
$$

$$
Q_0 = \frac{κ^{2β}}{c_0} A^n, \qquad
Q_i = \frac{κ^{2β − 2}}{r_i} A^n (A + p_i κ^2):
$$

``m + 1`` independent GMRFs on the lattice nodes, each precision a
polynomial of degree ≤ ``n + 1`` in ``L`` (the pattern of
``(|L| + I)^{n+1}``), all positive definite (``c₀, r_i, p_i ≥ 0``; a zero
``c₀`` drops ``Q_0``). The covariance of observations ``W`` is
``Σ_j W Q_j^{−1} Wᵀ = [W ⋯ W] blockdiag(Q_j)^{−1} [W ⋯ W]ᵀ``: a sparse-
precision covariance on ``(m + 1) N`` latent values, trained and predicted
like any other sum (``gpsparse.operators.block``). Each block's
log-determinant is exact from the Laplacian's eigenvalues.

*Normalisation.* The approximant's marginal variance on the infinite
lattice is exact, by partial fractions of ``A^{−n}(A + q)^{−1}`` into
powers ``A^{−k}`` and ``(A + q)^{−1}`` whose variances are
``lattice_variance`` integrals; every precision is multiplied by it, so the
approximate field has variance exactly 1 away from the boundary (as the
integer-``α`` kernel). Cancellation in the partial fractions loses
``~log₁₀(1/p_min^n)`` digits (p_min ≳ 0.05: at most 3).

*Accuracy.* The covariance error is bounded by the uniform error of the
rational fit, relative to the variance times a factor of order one
(``StieltjesApproximation.error``; order 4: 1.4e-3 for β = 1/2, 2.6e-4 for
β = 0.8, 8.6e-3 for β = 0.3; the table in ``gpsparse.core.rational``). A fit
with error above 1e-2 (small β) is built with a warning.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from gpsparse.core.lattice import lattice_variance
from gpsparse.core.rational import StieltjesApproximation, stieltjes_approximation
from gpsparse.kernels.spde import MaternPrecision
from gpsparse.operators.block import block_diagonal
from gpsparse.operators.known_logdet import KnownLogdetSparseLinearOperator

__all__ = ["FractionalMaternPrecision", "parse_alpha"]


class FractionalMaternPrecision:
    r"""``blockdiag(Q_0, Q_1, …, Q_m)`` approximating ``(κ² I + L)^{−α}`` for non-integer ``α`` (module docstring).

    Parameters
    ----------
    laplacian : scipy.sparse matrix
        Symmetric positive semi-definite ``L`` (N × N).
    alpha : float
        Non-integer ``α > 0``.
    eigenvalues : array
        ``(N,)`` eigenvalues of ``L`` (exact log-determinants).
    spacing : sequence of float
        Lattice spacing (the infinite-lattice variance used for the normalisation).
    order : int
        Number ``m`` of partial fractions (default 4).
    """

    def __init__(self, laplacian, alpha: float, *, eigenvalues, spacing, order: int = 4):
        alpha = float(alpha)
        self.degree = int(math.floor(alpha))
        self.beta = alpha - self.degree
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"FractionalMaternPrecision needs a non-integer alpha, got {alpha}")
        self.alpha, self.spacing = alpha, tuple(float(h) for h in spacing)
        self.rational: StieltjesApproximation = stieltjes_approximation(round(self.beta, 12), int(order))
        self.rational.warn_if_poor()
        self.structure = MaternPrecision(laplacian, self.degree + 1, eigenvalues=eigenvalues)
        self.num_nodes = self.structure.num_nodes

    @property
    def num_blocks(self) -> int:
        """``m + 1`` (``m`` when ``c₀ = 0``)."""
        return len(self._terms())

    def _terms(self) -> list[tuple[float, float | None]]:
        """``(weight, p)`` per block: ``(c₀, None)`` for ``Q_0`` (if ``c₀ > 0``), ``(r_i, p_i)`` for the rest."""
        return self.rational.terms()

    def operator(self, kappa2: Tensor) -> KnownLogdetSparseLinearOperator:
        """The block-diagonal precision (``(m+1)N`` square, batch of ``κ²``), normalised to unit variance."""
        pattern, basis, eig = self.structure._tensors(kappa2.dtype, kappa2.device)
        variance = self.variance(kappa2)
        n = self.degree
        blocks = []
        for weight, p in self._terms():
            if p is None:  # κ^{2β}/c₀ · A^n
                coefficients = [math.comb(n, k) * kappa2 ** (n - k) for k in range(n + 1)] + [torch.zeros_like(kappa2)]
                scale = kappa2**self.beta / weight
                spectrum = n * torch.log(kappa2.unsqueeze(-1) + eig).sum(-1)
            else:  # κ^{2β−2}/r · A^n (A + pκ²)
                coefficients = [
                    kappa2 ** (n + 1 - k) * (math.comb(n, k) * (1 + p) + (math.comb(n, k - 1) if k else 0))
                    for k in range(n + 2)
                ]
                scale = kappa2 ** (self.beta - 1) / weight
                lam = kappa2.unsqueeze(-1) + eig
                spectrum = (n * torch.log(lam) + torch.log(lam + p * kappa2.unsqueeze(-1))).sum(-1)
            scale = scale * variance
            values = scale.unsqueeze(-1) * (torch.stack(coefficients, -1) @ basis)
            logdet = self.num_nodes * torch.log(scale) + spectrum
            blocks.append(KnownLogdetSparseLinearOperator(values, logdet, pattern=pattern))
        return block_diagonal(blocks)

    def variance(self, kappa2: Tensor) -> Tensor:
        r"""Infinite-lattice variance of the (unnormalised) approximant ``Σ_j Q_j^{−1}``, differentiable in ``κ²``."""
        n = self.degree
        total = torch.zeros_like(kappa2)
        for weight, p in self._terms():
            if p is None:
                part = torch.ones_like(kappa2) if n == 0 else lattice_variance(kappa2, self.spacing, n)
                total = total + weight * part
                continue
            q = p * kappa2  # A^{-n}(A + q)^{-1} = Σ_k (−1)^{n−k} q^{−(n−k+1)} A^{−k} + (−1)^n q^{−n} (A + q)^{−1}
            part = (-1) ** n * q ** (-n) * lattice_variance(kappa2 + q, self.spacing, 1)
            for k in range(1, n + 1):
                part = part + (-1) ** (n - k) * q ** (-(n - k + 1)) * lattice_variance(kappa2, self.spacing, k)
            total = total + weight * kappa2 * part
        return kappa2 ** (-self.beta) * total


def parse_alpha(alpha, d: int, *, minimum: float = 0.0) -> int | float:
    """``α`` as an int when integral, else a float: ``α > 0`` and ``≥ minimum``, ``ν = α − d/2 ≥ 0``
    (``> 0`` for a fractional ``α``). Shared by the lattice and mesh kernels.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.integer | np.floating):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not math.isfinite(alpha) or alpha <= 0 or alpha < minimum:
        bound = "a positive number" if minimum <= 0 else f"a number ≥ {minimum:g}"
        raise ValueError(f"alpha must be {bound}, got {alpha!r}")
    alpha = int(alpha) if float(alpha).is_integer() else float(alpha)
    if alpha < d / 2:
        raise ValueError(
            f"alpha = {alpha} gives smoothness ν = α − d/2 = {alpha - d / 2:g} < 0 in d = {d} dimensions; "
            f"use alpha ≥ {(d + 1) // 2}"
        )
    if isinstance(alpha, float) and alpha <= d / 2:
        raise ValueError(f"a fractional alpha needs ν = α − d/2 > 0; alpha = {alpha} in d = {d} dimensions gives ν = 0")
    return alpha
