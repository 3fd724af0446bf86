r"""The Laplace approximation under linear constraints ``A x = 0``: the constrained posterior precision.

An intrinsic GMRF prior (random walk, Besag, BYM2's structured part) is proper
only on the constraint subspace ``S = {x : Vᵀx = 0}`` (``V`` ``N × k``, an
orthonormal basis of the constraints' rows, spanning the null space of
``Q``). The Laplace approximation then lives on ``S``:

$$
\log p(y \mid θ) \approx \sum_i ℓ_i(\hat f_i) − \tfrac12 \hat x^\top Q \hat x
+ \tfrac12 \log\det{}_S Q − \tfrac12 \log\det{}_S P,
\qquad \hat x = \arg\max_{x ∈ S} Ψ(x),
$$

with ``det_S X = det(V_⊥ᵀ X V_⊥)`` (``V_⊥`` an orthonormal basis of ``S``;
``det_S Q = det* Q`` for an intrinsic ``Q``) and ``P = Q + Wᵀ H W`` as in the
unconstrained case. Every formula of the unconstrained approximation holds
with ``P⁻¹`` replaced by the constrained posterior covariance

$$
Σ_P = V_⊥ (V_⊥ᵀ P V_⊥)^{-1} V_⊥ᵀ :
$$

Newton's step on ``S`` is ``Δ = Σ_P ∇Ψ`` (the mode condition is
``∇Ψ(x̂) ∈ span V``, so the envelope argument still removes ``dx̂/dθ`` from
``Ψ``), ``dx̂/dθ = Σ_P ∂_θ∇Ψ`` (implicit differentiation of
``V_⊥ᵀ∇Ψ(x̂(θ), θ) = 0``), and ``d log det_S P = tr(Σ_P dP)``, so the gradient
needs ``Σ_P`` at ``P``'s pattern (a selected inverse) and solves with ``Σ_P``.

``ConstrainedFactor`` computes them sparsely with the completion of
``gpsparse.operators.constrained`` (the same algebra, here on float64 values
and a road's factorisation — a core, with no linear_operator): with ``k``
pivot nodes ``p`` (``T = s·V[p]`` invertible) and ``s²`` the mean diagonal of
``P``, the sparse ``R = P + s² Σ_j e_{p_j} e_{p_j}ᵀ`` is positive definite when
the null space of ``P`` lies in ``span V`` (always here: ``null(P) ⊆ null(Q)
= span V``), ``U = [V  F]``, ``F = PV``, ``Y = R⁻¹U`` (``2k`` solves) and
``Inner = [[0, −I], [−I, −VᵀF]] + UᵀY`` give

$$
Σ_P = Π R^{-1} Π − (ΠY)\,\mathrm{Inner}^{-1}(ΠY)^\top,\qquad
\log\det{}_S P = \log\det R + \log|\det \mathrm{Inner}| − 2\log|\det T|,
$$

``Π = I − VVᵀ``; ``det Inner`` has the sign ``(−1)^k`` exactly when ``P`` is
positive definite on ``S``. The entries of ``Σ_P`` on ``P``'s pattern are
those of ``R⁻¹`` (the road's selected inverse) plus rank-``4k`` terms
evaluated at the stored entries only. Exact roads only (banded, CHOLMOD,
dense): the Krylov road's probe estimates of ``log det R`` would need a
matching completion of ``Q``, which is not built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.sparse_ops import sampled_product, spmm
from gpsparse.errors import NotPositiveDefiniteError

__all__ = ["ConstraintSpace", "ConstrainedFactor", "EXACT_ROADS"]

#: The roads on which the constrained Laplace approximation runs.
EXACT_ROADS = ("banded", "cholesky", "dense")


@dataclass(frozen=True, eq=False)
class ConstraintSpace:
    """The constraint subspace ``S = {x : Vᵀx = 0}``: ``basis`` ``V`` ``(N, k)`` orthonormal and ``pivots`` ``(k,)``.

    ``V[pivots]`` must be invertible (``gpsparse.operators.constrained.LinearConstraints`` chooses them).
    """

    basis: Tensor
    pivots: Tensor

    def __post_init__(self) -> None:
        if self.basis.dim() != 2 or self.pivots.dim() != 1 or self.pivots.numel() != self.basis.shape[1]:
            raise ValueError(
                f"a constraint space needs a basis (N, k) and k pivots, got {tuple(self.basis.shape)} and "
                f"{tuple(self.pivots.shape)}"
            )

    @property
    def num_constraints(self) -> int:
        return self.basis.shape[1]

    def to(self, device) -> ConstraintSpace:
        return ConstraintSpace(self.basis.to(device=device, dtype=torch.float64), self.pivots.to(device))

    def project(self, z: Tensor) -> Tensor:
        """``Π z = z − V Vᵀ z`` for ``z`` ``(N,)`` or ``(N, c)``."""
        V = self.basis
        return z - V @ (V.T @ z)

    def residual(self, x: Tensor) -> float:
        """``‖Vᵀx‖∞``: how far ``x`` is from ``S``."""
        return float((self.basis.T @ x).abs().max()) if self.basis.numel() else 0.0


def _matvec(values: Tensor, pattern: SparsityPattern, x: Tensor) -> Tensor:
    return spmm(values.reshape(1, -1), pattern, x.unsqueeze(0))[0]


class ConstrainedFactor:
    """``Σ_P``, ``log det_S P`` and ``Σ_P`` on ``P``'s pattern from a road's factorisation of ``R`` (module notes).

    Parameters
    ----------
    values : Tensor
        ``(nnz,)`` float64 values of ``P`` (symmetric pattern with every diagonal entry stored).
    pattern : SparsityPattern
    space : ConstraintSpace
    factorize : callable
        ``factorize(values, pattern)`` → a factorisation with ``solve``,
        ``logdet`` and ``inverse_entries`` (``gpsparse.core.laplace``'s roads).

    Raises
    ------
    NotPositiveDefiniteError
        ``P`` is not positive definite on ``S``.
    """

    def __init__(self, values: Tensor, pattern: SparsityPattern, space: ConstraintSpace, factorize):
        self.pattern = pattern
        self.space = space
        V, pivots = space.basis, space.pivots
        k = V.shape[1]
        diagonal = pattern.diagonal_positions
        if bool((diagonal[pivots] < 0).any()):
            raise ValueError("the posterior precision's pattern must store the diagonal at the pivot nodes")
        scale2 = float(values[diagonal[diagonal >= 0]].abs().mean()) if values.numel() else 1.0
        scale2 = scale2 if math.isfinite(scale2) and scale2 > 0 else 1.0
        bumped = values.clone()
        bumped[diagonal[pivots]] += scale2
        try:
            self.base = factorize(bumped, pattern)
        except NotPositiveDefiniteError as error:
            raise NotPositiveDefiniteError(
                "the posterior precision is not positive definite on the constraint subspace {x : A x = 0} (its "
                f"null space is larger than the constraints): {error}"
            ) from error
        self.road = self.base.road
        F = _matvec(values, pattern, V)
        U = torch.cat([V, F], -1)
        Y = self.base.solve(U)
        VF = V.T @ F
        VF = 0.5 * (VF + VF.T)
        eye = torch.eye(k, dtype=V.dtype, device=V.device)
        zeros = torch.zeros_like(VF)
        inner = torch.cat([torch.cat([zeros, -eye], -1), torch.cat([-eye, -VF], -1)], -2) + U.T @ Y
        inner = 0.5 * (inner + inner.T)
        sign, logabsdet = torch.linalg.slogdet(inner)
        if float(sign) != (-1.0) ** k or not math.isfinite(float(logabsdet)):
            raise NotPositiveDefiniteError(
                "the posterior precision is not positive definite on the constraint subspace {x : A x = 0}"
            )
        self.inner_inverse = torch.linalg.inv(inner)
        self.inner_inverse = 0.5 * (self.inner_inverse + self.inner_inverse.T)
        self.Y_V = Y[:, :k]
        self.PY = space.project(Y)
        T = math.sqrt(scale2) * V[pivots]
        self.correction = logabsdet - 2.0 * torch.linalg.slogdet(T).logabsdet

    def solve(self, rhs: Tensor) -> Tensor:
        """``Σ_P rhs`` for ``rhs`` ``(N,)`` or ``(N, c)`` (in ``S``)."""
        vector = rhs.dim() == 1
        z = rhs.unsqueeze(-1) if vector else rhs
        out = self.space.project(self.base.solve(self.space.project(z)))
        out = out - self.PY @ (self.inner_inverse @ (self.PY.T @ z))
        return out.squeeze(-1) if vector else out

    def logdet(self) -> Tensor:
        """``log det_S P = log det(V_⊥ᵀ P V_⊥)``."""
        return self.base.logdet() + self.correction

    def inverse_entries(self) -> Tensor:
        """``(Σ_P)[i_e, j_e]`` at every stored entry of ``P``'s pattern ``(nnz,)``."""
        base = self.base.inverse_entries()
        V, Y_V, PY = self.space.basis, self.Y_V, self.PY
        gram = V.T @ Y_V
        gram = 0.5 * (gram + gram.T)
        # Π R⁻¹ Π = R⁻¹ − V Y_Vᵀ − Y_V Vᵀ + V (VᵀY_V) Vᵀ, minus (ΠY) Inner⁻¹ (ΠY)ᵀ
        left = torch.cat([-V, -Y_V, V @ gram, -(PY @ self.inner_inverse)], -1)
        right = torch.cat([Y_V, V, V, PY], -1)
        return base + sampled_product(self.pattern, left.unsqueeze(0), right.unsqueeze(0))[0]
