r"""Fractional smoothness on a mesh: ``(κ² − Δ)^{α/2}`` for non-integer ``α`` as a sum of FEM GMRFs.

The finite-element covariance of the SPDE field with integer ``α`` is
``τ^{−2} A^{−α} C̃^{−1}`` with ``A = κ² I + C̃^{−1} G`` (``Q_α = τ² C̃ A^α``,
``gpsparse.mesh.spde``). For ``α = n + β`` (``n = ⌊α⌋ ≥ 1``, ``0 < β < 1``)
the positive partial-fraction fit ``y^β ≈ c₀ + Σ_i r_i y/(1 + p_i y)`` of
``gpsparse.core.rational`` at ``y = κ²/(κ² + λ)`` (``λ`` the eigenvalues of
``C̃^{−1}G``) gives, as on the lattice
([`FractionalMaternPrecision`][gpsparse.kernels.FractionalMaternPrecision]),

$$
τ^{−2} A^{−α} C̃^{−1} ≈ \sum_{j=0}^{m} Q_j^{−1}, \qquad
Q_0 = \frac{τ^2 κ^{2β}}{c_0}\, \tilde C A^n, \qquad
Q_i = \frac{τ^2 κ^{2β − 2}}{r_i}\, \tilde C A^n (A + p_i κ^2),
$$

``m + 1`` independent GMRFs on the vertices. With ``D = C̃^{1/2}`` and
``M(s) = s I + D^{−1} G D^{−1}`` these are ``D M(κ²)^n D`` and
``D M(κ²)^n M((1 + p_i)κ²) D`` (times the constants): symmetric, positive
definite, polynomials of degree ``n`` and ``n + 1`` in the mass-normalised
Laplacian (the ``n``- and ``(n+1)``-ring patterns), and

$$
\log\det Q_i = N \log s_i + \sum_k \log \tilde c_k + n \log\det M(κ^2) + \log\det M((1 + p_i) κ^2)
$$

(``s_i`` the constant, no last term for ``Q_0``): ``m + 1`` log-determinants
of first-order factors, exact by CHOLMOD/banded/dense or stochastic
(``gpsparse.mesh.operator``; ``SPDEPrecisionLinearOperator`` with one power per factor).

*Normalisation.* ``τ`` is R-INLA's (and rSPDE's) formula
``σ² = Γ(ν)/(Γ(α)(4π)^{d/2} κ^{2ν} τ²)`` at the fractional ``α``: the
approximant's marginal variance away from the boundary is ``σ²`` up to the
fit's relative error, the mesh's discretisation and, for ``n = 1`` in 2-D,
the ``c₀`` block — an ``α = 1`` field whose variance grows like
``log(1/(κh))`` as the mesh size ``h → 0``, weighted by ``c₀`` (1.4e-3 for
β = 1/2 with 4 partial fractions: about 1 % of ``σ²`` at ``h = ρ/16``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gpsparse.core.rational import StieltjesApproximation, stieltjes_approximation
from gpsparse.mesh.operator import SPDEPrecisionLinearOperator
from gpsparse.mesh.spde import MeshSPDEStructure
from gpsparse.operators.block import block_diagonal
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = ["FractionalMeshPrecision"]


class FractionalMeshPrecision:
    r"""``blockdiag(Q_0, …, Q_m)`` approximating the mesh SPDE precision for non-integer ``α > 1`` (module docstring).

    Parameters
    ----------
    mesh : gpsparse.mesh.Mesh
        Any mesh (interval, plane, sphere); a stationary isotropic field.
    alpha : float
        Non-integer ``α > 1``.
    order : int
        Partial fractions ``m`` (1 … 8, default 4).
    logdet_road : {"auto", "settings"}
        The factors' log-determinant road (``gpsparse.mesh.operator``).
    """

    def __init__(self, mesh, alpha: float, *, order: int = 4, logdet_road: str = "auto"):
        alpha = float(alpha)
        self.degree = int(math.floor(alpha))
        self.beta = alpha - self.degree
        if not 0.0 < self.beta < 1.0 or self.degree < 1:
            raise ValueError(f"FractionalMeshPrecision needs a non-integer alpha > 1, got {alpha}")
        self.alpha, self.logdet_road = alpha, logdet_road
        self.rational: StieltjesApproximation = stieltjes_approximation(round(self.beta, 12), int(order))
        self.rational.warn_if_poor()
        self.low = MeshSPDEStructure(mesh, self.degree)  # Q_0: degree n
        self.high = MeshSPDEStructure(mesh, self.degree + 1)  # Q_i: degree n + 1
        self.num_nodes = mesh.num_vertices
        self.factor_pattern = self.high.factor_pattern

    def _terms(self) -> list[tuple[float, float | None]]:
        """``(weight, p)`` per block: ``(c₀, None)`` for ``Q_0`` (if ``c₀ > 0``), ``(r_i, p_i)`` for the rest."""
        return self.rational.terms()

    @property
    def num_blocks(self) -> int:
        """``m + 1`` (``m`` when ``c₀ = 0``; partial fractions with a zero residue are dropped)."""
        return len(self._terms())

    def operator(self, kappa2: Tensor, tau: Tensor) -> SPDEPrecisionLinearOperator:
        """The block-diagonal precision ``((m+1)N`` square, batch of ``κ²``, ``τ``)."""
        n, blocks, shifts, offset = self.degree, [], [], torch.zeros_like(kappa2)
        log_lumped = self.high.log_lumped_sum
        for weight, p in self._terms():
            if p is None:  # τ² κ^{2β}/c₀ · D M^n D
                scale = kappa2**self.beta / weight
                coefficients = [math.comb(n, k) * kappa2 ** (n - k) for k in range(n + 1)]
                values = self.low.polynomial_values(torch.stack(coefficients, -1), tau * scale.sqrt())
            else:  # τ² κ^{2β−2}/r · D M^n (M + pκ²) D
                scale = kappa2 ** (self.beta - 1) / weight
                coefficients = [
                    kappa2 ** (n + 1 - k) * (math.comb(n, k) * (1 + p) + (math.comb(n, k - 1) if k else 0))
                    for k in range(n + 2)
                ]
                values = self.high.polynomial_values(torch.stack(coefficients, -1), tau * scale.sqrt())
                shifts.append(1.0 + p)
            pattern = (self.low if p is None else self.high).pattern.to(kappa2.device)
            blocks.append(SparseLinearOperator(values, pattern=pattern))
            offset = offset + self.num_nodes * torch.log(scale * tau**2) + log_lumped
        Q = block_diagonal(blocks)
        factor_kappa2 = torch.stack([kappa2] + [kappa2 * s for s in shifts], -1)  # (*batch, 1 + #shifts)
        t = self.high.tensors(kappa2.dtype, kappa2.device)
        diagonal = torch.zeros_like(t["factor_laplacians"][0]).index_fill(-1, t["factor_diag"], 1.0)
        factors = t["factor_laplacians"][0] + factor_kappa2.unsqueeze(-1) * diagonal  # M(s) = s I + L
        powers = (n * len(blocks),) + (1,) * len(shifts)
        return SPDEPrecisionLinearOperator(
            Q.values,
            factors,
            offset,
            pattern=Q.pattern,
            factor_pattern=self.factor_pattern.to(kappa2.device),
            power=powers,
            logdet_road=self.logdet_road,
        )
