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
(``gpsparse.mesh.operator``).

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
from linear_operator.operators import LinearOperator
from torch import Tensor

from gpsparse.core.rational import StieltjesApproximation, stieltjes_approximation
from gpsparse.linalg import dispatch
from gpsparse.mesh.operator import LOGDET_ROADS, SPDEPrecisionLinearOperator
from gpsparse.mesh.spde import MeshSPDEStructure
from gpsparse.operators.block import block_diagonal
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = ["FractionalMeshPrecision", "FractionalSPDEPrecisionLinearOperator"]


class FractionalSPDEPrecisionLinearOperator(SPDEPrecisionLinearOperator):
    r"""A sparse precision with ``log det Q = Σ_f power_f · log det M_f + offset`` (several first-order factors).

    Parameters
    ----------
    values : Tensor
        ``(*batch, nnz)`` values of ``Q`` on ``pattern``.
    factor_values : Tensor
        ``(*batch_f, F, nnz_M)``: the ``F`` factors ``M_f`` on ``factor_pattern``.
    offset : Tensor
        ``(*batch)``.
    powers : tuple of int
        ``F`` positive integers.
    pattern, factor_pattern, logdet_road :
        As for [`SPDEPrecisionLinearOperator`][gpsparse.mesh.operator.SPDEPrecisionLinearOperator];
        ``log det`` is computed on first use, all ``F`` factors in one batched call.
    """

    def __init__(
        self,
        values: Tensor,
        factor_values: Tensor,
        offset: Tensor,
        *,
        pattern,
        factor_pattern,
        powers: tuple[int, ...],
        logdet_road: str = "auto",
    ):
        powers = tuple(int(p) for p in powers)
        if not powers or any(p < 1 for p in powers):
            raise ValueError(f"powers must be positive integers, got {powers!r}")
        if factor_values.dim() < 2 or factor_values.shape[-2] != len(powers):
            raise ValueError(f"factor_values must have shape (*batch, {len(powers)}, nnz_M)")
        SparseLinearOperator.__init__(self, values, pattern=pattern)
        if not (pattern.symmetric and factor_pattern.symmetric):
            raise ValueError("an SPDE precision and its factors need symmetric patterns")
        if pattern.size[0] % factor_pattern.size[0]:
            raise ValueError(f"the factors have size {factor_pattern.size}, which does not divide Q's {pattern.size}")
        if factor_values.shape[-1] != factor_pattern.nnz:
            raise ValueError(f"factor_values must have shape (*batch, {len(powers)}, {factor_pattern.nnz})")
        if not isinstance(offset, Tensor) or offset.shape != values.shape[:-1]:
            raise ValueError(f"offset must have the batch shape {tuple(values.shape[:-1])} of the values")
        if logdet_road not in LOGDET_ROADS:
            raise ValueError(f"logdet_road must be one of {LOGDET_ROADS}, got {logdet_road!r}")
        LinearOperator.__init__(
            self,
            values,
            factor_values,
            offset,
            pattern=pattern,
            factor_pattern=factor_pattern,
            powers=powers,
            logdet_road=logdet_road,
        )
        self.factor_values, self.offset, self.powers = factor_values, offset, powers
        self.factor_pattern, self.power, self.logdet_road = factor_pattern, None, logdet_road
        self._logdet: Tensor | None = None

    def factor(self) -> SparseLinearOperator:
        """The factors ``M_f`` as one SparseLinearOperator ``(*batch_f, F, N, N)``."""
        return SparseLinearOperator(self.factor_values, pattern=self.factor_pattern)

    def factor_road(self) -> str:
        batch = self.factor_values.shape[:-1].numel()
        return dispatch.choose_road(self.factor_pattern, self._factor_config(), logdet=True, batch_numel=batch)

    @property
    def known_logdet(self) -> Tensor:
        """``Σ_f power_f log det M_f + offset`` ``(*batch)``, computed on first use."""
        if self._logdet is None:
            logdets = dispatch.logdet(self.factor_values, self.factor_pattern, self._factor_config())  # (*b, F)
            weights = torch.tensor(self.powers, dtype=logdets.dtype, device=logdets.device)
            self._logdet = ((logdets * weights).sum(-1) + self.offset).expand(self.batch_shape)
        return self._logdet

    def _with(self, values: Tensor, factor_values: Tensor, offset: Tensor) -> FractionalSPDEPrecisionLinearOperator:
        return FractionalSPDEPrecisionLinearOperator(
            values,
            factor_values,
            offset,
            pattern=self.pattern,
            factor_pattern=self.factor_pattern,
            powers=self.powers,
            logdet_road=self.logdet_road,
        )

    def _factors_for(self, batch_shape: torch.Size) -> Tensor:
        return self.factor_values.expand(*batch_shape, *self.factor_values.shape[-2:])

    def _expand_batch(self, batch_shape) -> FractionalSPDEPrecisionLinearOperator:
        batch_shape = torch.Size(batch_shape)
        values = self.values.expand(*batch_shape, self.pattern.nnz)
        return self._with(values, self._factors_for(batch_shape), self.offset.expand(batch_shape))

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        result = SparseLinearOperator._getitem(self, row_index, col_index, *batch_indices)
        if not isinstance(result, SparseLinearOperator) or result.pattern is not self.pattern:
            return result
        factors = self._factors_for(self.batch_shape)
        factors = factors[(*batch_indices, slice(None), slice(None))] if batch_indices else factors
        offset = self.offset[batch_indices] if batch_indices else self.offset
        if offset.shape != result.values.shape[:-1]:
            return result
        return self._with(result.values, factors, offset)

    def _mul_constant(self, other) -> SparseLinearOperator:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        scaled = SparseLinearOperator._mul_constant(self, other)
        if not bool((other > 0).all()):
            return scaled
        batch = scaled.values.shape[:-1]
        offset = (self.offset + self.pattern.size[0] * other.log()).expand(batch)
        return self._with(scaled.values, self._factors_for(batch), offset)


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

    def operator(self, kappa2: Tensor, tau: Tensor) -> FractionalSPDEPrecisionLinearOperator:
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
        return FractionalSPDEPrecisionLinearOperator(
            Q.values,
            factors,
            offset,
            pattern=Q.pattern,
            factor_pattern=self.factor_pattern.to(kappa2.device),
            powers=powers,
            logdet_road=self.logdet_road,
        )
