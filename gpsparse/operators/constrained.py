r"""Covariances of Gaussian Markov random fields under linear constraints ``A x = 0``, exactly and sparsely.

An intrinsic GMRF (random walk, Besag/ICAR) has a rank-deficient precision
``Q``: its density ``∝ exp(−½ xᵀQx)`` is improper along the null space of
``Q``. Constraining ``x`` to ``S = {x : A x = 0}`` with the rows of ``A``
spanning that null space (sum to zero per connected component; also zero
linear trend for RW2) makes it proper, with covariance ``Q⁺`` (the
Moore–Penrose inverse). More generally, for any symmetric positive
semi-definite ``Q`` that is positive definite on ``S`` the constrained field
has the covariance

$$
Σ_Q = V_⊥ (V_⊥ᵀ Q V_⊥)^{-1} V_⊥ᵀ = (PQP)^{+}, \qquad P = I − VVᵀ,
$$

``V`` (N × k) an orthonormal basis of ``A``'s rows and ``V_⊥`` of their
complement — ``Q⁺`` when ``Q V = 0``, and the posterior covariance of a
constrained field when ``Q`` is a posterior precision ``Q + WᵀD⁻¹W``; its
generalised determinant is ``det_S Q = det(V_⊥ᵀQV_⊥)`` (``det* Q``, the
product of the nonzero eigenvalues, for an intrinsic ``Q``).

Nothing dense of size N × N is formed. The *sparse rank completion*
``R = Q + EEᵀ``, ``E = s·[e_{p_1} … e_{p_k}]`` (``k`` pivot nodes with
``T = EᵀV`` invertible: ``R`` adds ``s²`` to ``k`` diagonal entries and keeps
``Q``'s pattern), is a generalised inverse's source for an intrinsic ``Q``:
``Q R⁻¹ Q = Q``, so ``Q⁺ = P R⁻¹ P`` and ``det R = det* Q · det(T)²``. A
general ``Q`` enters through the intrinsic ``PQP = Q − VFᵀ − FVᵀ + V(VᵀF)Vᵀ``
(``F = QV``, dense N × k, never N × N): ``Σ_Q = P X_c⁻¹ P`` with
``X_c = PQP + EEᵀ = R + U M' Uᵀ``, ``U = [V F]``,
``M' = [[VᵀF, −I], [−I, 0]]`` (rank ``2k``), and Woodbury and the
determinant lemma give

$$
Y = R^{-1}U,\quad \mathrm{Inner} = M'^{-1} + UᵀY,\quad
Σ_Q = P R^{-1} P − (PY)\,\mathrm{Inner}^{-1}(PY)ᵀ,\quad
\log\det{}_S Q = \log\det R + \log|\det \mathrm{Inner}| − 2\log|\det T| .
$$

For an intrinsic ``Q`` (``F = 0``) the correction vanishes. This is the
exact conditioning by kriging of ``N(0, (Q + VVᵀ)⁻¹)`` on ``Vᵀx = 0`` (Rue &
Held 2005, §2.3.3), arranged so that the large terms of the corner-pinned
``R⁻¹`` do not cancel (the plain kriging form with ``Q + VVᵀ = R + [V E]
diag(I, −I) [V E]ᵀ`` computes the same function, but its float32 gradients
were measured 200× less accurate). Costs: ``2k`` solves with ``R`` per
operator and ``2k × 2k`` dense algebra; the solves and ``log det R`` take the
dispatcher's roads (banded, CHOLMOD, dense; CG and stochastic Lanczos
quadrature on the Krylov road). Derivations, and the marginal likelihood
of ``y = W x + ε``: ``docs/mathematics.md``, "Intrinsic GMRFs and linear
constraints".

Classes: [`LinearConstraints`][gpsparse.operators.constrained.LinearConstraints]
(the constraints, as ``V`` and pivots),
[`ConstrainedPrecisionLinearOperator`][gpsparse.operators.constrained.ConstrainedPrecisionLinearOperator]
(``K = W Σ W'ᵀ``) and
[`NoisyConstrainedPrecisionLinearOperator`][gpsparse.operators.constrained.NoisyConstrainedPrecisionLinearOperator]
(``K + D``, what GPyTorch's Gaussian likelihood forms; marginal likelihood
and solves through the constrained posterior).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from linear_operator.operators import DiagLinearOperator, LinearOperator, ZeroLinearOperator
from torch import Tensor

from gpsparse import settings as gs_settings
from gpsparse.core.constraints import component_basis, constraint_basis, pivot_nodes
from gpsparse.errors import NotPositiveDefiniteError
from gpsparse.linalg import dispatch
from gpsparse.operators.block import block_diagonal, component_offsets, hstack_interpolations
from gpsparse.operators.gmrf import (
    apply,
    apply_t,
    covariance_diagonal,
    interpolation_operator,
    select_rows,
    weighted_gram,
)
from gpsparse.operators.known_logdet import KnownLogdetSparseLinearOperator
from gpsparse.operators.precision import DenseLimitedCovariance, SparsePrecisionLinearOperator
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = [
    "LinearConstraints",
    "ConstrainedPrecisionLinearOperator",
    "NoisyConstrainedPrecisionLinearOperator",
    "add_covariances",
    "constrained_logdet",
]

#: Orthonormality tolerance of a basis given to ``LinearConstraints`` directly.
_ORTHONORMAL_ATOL = 1e-8
#: Stacked constraints of block sums, by the identity of their blocks (``LinearConstraints.stack``).
_STACK_CACHE: dict[tuple, tuple] = {}


class LinearConstraints:
    r"""Linear constraints ``A x = 0`` on N nodes, held as an orthonormal basis ``V`` (N × k) of ``A``'s rows.

    Build them with [`from_matrix`][gpsparse.operators.constrained.LinearConstraints.from_matrix]
    (any full-row-rank ``A``) or
    [`from_components`][gpsparse.operators.constrained.LinearConstraints.from_components]
    (sum to zero per connected component, and zero linear trend for order 2);
    the constructor takes an orthonormal ``V`` itself.

    Parameters
    ----------
    basis : Tensor or numpy.ndarray
        ``(N, k)`` with orthonormal columns (float64 is kept on the CPU and
        cast per dtype and device on use).
    pivots : array of int, optional
        ``k`` nodes with ``V[pivots]`` invertible (default: QR with column
        pivoting on ``Vᵀ``, ``gpsparse.core.constraints.pivot_nodes``).

    Attributes
    ----------
    num_nodes, num_constraints : int
        ``N`` and ``k``.
    pivots : Tensor
        ``(k,)`` int64.

    Raises
    ------
    ValueError
        A basis that is not ``(N, k)`` with ``0 < k < N`` and orthonormal
        columns, or pivots that are out of range or make ``V[pivots]``
        singular.
    """

    def __init__(self, basis, *, pivots=None):
        V = basis.detach().cpu().double().numpy() if isinstance(basis, Tensor) else np.asarray(basis, np.float64)
        if V.ndim != 2 or not 0 < V.shape[1] < V.shape[0]:
            raise ValueError(f"a constraint basis must be (N, k) with 0 < k < N, got shape {V.shape}")
        if not np.isfinite(V).all() or np.abs(V.T @ V - np.eye(V.shape[1])).max() > _ORTHONORMAL_ATOL:
            raise ValueError(
                "the constraint basis must have orthonormal columns; build constraints from a matrix A "
                "(A x = 0) with LinearConstraints.from_matrix(A)"
            )
        piv = pivot_nodes(V) if pivots is None else np.asarray(pivots, dtype=np.int64).reshape(-1)
        if piv.shape != (V.shape[1],) or piv.min() < 0 or piv.max() >= V.shape[0]:
            raise ValueError(f"pivots must be {V.shape[1]} node indices in range, got {piv}")
        block = V[piv]
        if np.linalg.svd(block, compute_uv=False)[-1] < 1e-12 * max(1.0, np.abs(block).max()):
            raise ValueError("the pivot nodes make V[pivots] singular; choose other pivots (or leave the default)")
        self._basis = torch.from_numpy(np.ascontiguousarray(V))
        self.pivots = torch.from_numpy(piv)
        self._cache: dict[tuple, Tensor] = {}

    # ------------------------------------------------------------ builders
    @classmethod
    def from_matrix(cls, matrix) -> LinearConstraints:
        """Constraints ``A x = 0`` from a ``(k, N)`` matrix (dense torch / NumPy, torch sparse or SciPy sparse).

        Raises ``ValueError`` for a rank-deficient, non-finite or too tall
        ``A`` (``gpsparse.core.constraints.constraint_basis``).
        """
        if sp.issparse(matrix):
            A = matrix.toarray()
        elif isinstance(matrix, Tensor):
            A = (matrix.to_dense() if matrix.layout != torch.strided else matrix).detach().cpu().double().numpy()
        else:
            A = np.asarray(matrix, dtype=np.float64)
        return cls(constraint_basis(A))

    @classmethod
    def from_components(cls, labels, num_components: int | None = None, *, order: int = 1, positions=None):
        """Sum to zero per component (and zero linear trend in ``positions`` for ``order=2``).

        ``labels`` ``(N,)``: the component of every node
        (``gpsparse.core.constraints.component_basis``). Pivots: the first node
        of each component (order 1); its first and last node (order 2).
        """
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        count = int(labels.max()) + 1 if num_components is None else int(num_components)
        V = component_basis(labels, count, order=order, positions=positions)
        order_nodes = np.argsort(labels, kind="stable")
        starts = np.searchsorted(labels[order_nodes], np.arange(count))
        stops = np.searchsorted(labels[order_nodes], np.arange(count), side="right") - 1
        if order == 1:
            pivots = order_nodes[starts]
        else:  # the extreme positions of each component: a well-conditioned [1, t] block
            t = np.asarray(positions, dtype=np.float64).reshape(-1)
            pivots = []
            for c in range(count):
                nodes = order_nodes[starts[c] : stops[c] + 1]
                pivots += [nodes[np.argmin(t[nodes])], nodes[np.argmax(t[nodes])]]
            pivots = np.asarray(pivots, dtype=np.int64)
        return cls(V, pivots=pivots)

    # ---------------------------------------------------------- properties
    @property
    def num_nodes(self) -> int:
        return int(self._basis.shape[0])

    @property
    def num_constraints(self) -> int:
        return int(self._basis.shape[1])

    @property
    def matrix(self) -> Tensor:
        """``Vᵀ`` ``(k, N)`` float64: constraints with orthonormal rows (the same subspace as the given ``A``)."""
        return self._basis.T

    def basis(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        """``V`` ``(N, k)`` in ``dtype`` on ``device`` (cached)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = self._basis.to(dtype=dtype, device=device)
        return self._cache[key]

    def residual(self, x: Tensor) -> Tensor:
        """``Vᵀ x`` for ``x`` ``(..., N)``: zero (to rounding) for a field that satisfies the constraints."""
        return x @ self.basis(x.dtype, x.device)

    def check(self, Q, *, max_dense_nodes: int = 2048, rtol: float = 1e-10) -> str:
        r"""Check that the constraints make the field with (semi-definite) precision ``Q`` proper.

        Proper means ``Q`` positive definite on ``{x : A x = 0}``: the
        smallest eigenvalue of ``V_⊥ᵀ Q V_⊥`` above ``rtol`` times the largest
        (dense float64, up to ``max_dense_nodes`` nodes). Returns
        ``"intrinsic"`` when, in addition, the constraints span the null space
        of ``Q`` (``‖QV‖ ≤ rtol‖Q‖``: the covariance is ``Q⁺``), else
        ``"conditioned"`` (a proper ``Q`` under extra constraints, e.g. a
        corner constraint or a posterior precision). Larger problems are not
        checked here (``"unchecked"``); there an improper field shows up as a
        factorisation failure of ``Q + EEᵀ`` on the exact roads, which the
        operators report as ``NotPositiveDefiniteError``.

        Parameters
        ----------
        Q : SparseLinearOperator, Tensor, numpy.ndarray or scipy.sparse matrix
            ``(N, N)`` symmetric; a single matrix (no batch).

        Raises
        ------
        ValueError
            ``Q`` of another size, or not positive definite on the constraint
            subspace (too few constraints for its null space, or constraints
            that leave a null direction free): the constrained field is improper.
        """
        if isinstance(Q, SparseLinearOperator):
            Q = Q.to_dense()
        if isinstance(Q, Tensor):
            Q = Q.detach().cpu().double().numpy()
        Q = Q.toarray() if sp.issparse(Q) else np.asarray(Q, dtype=np.float64)
        n = self.num_nodes
        if Q.shape != (n, n):
            raise ValueError(f"the constraints are on {n} nodes but Q has shape {Q.shape}")
        if n > max_dense_nodes:
            return "unchecked"
        V = self._basis.numpy()
        full, _ = np.linalg.qr(np.concatenate([V, np.eye(n)], axis=1))
        perp = full[:, self.num_constraints : n]
        inner = perp.T @ (0.5 * (Q + Q.T)) @ perp
        eigenvalues = np.linalg.eigvalsh(inner)
        scale = max(np.abs(eigenvalues).max(), np.abs(Q).max(), np.finfo(np.float64).tiny)
        if eigenvalues[0] <= rtol * scale:
            free = int((eigenvalues <= rtol * scale).sum())
            raise ValueError(
                f"the constraints leave the field improper: Q is not positive definite on the constraint "
                f"subspace ({free} free direction(s) with eigenvalue ≤ {eigenvalues[0]:.3g}; e.g. an RW2 needs its "
                "linear trend constrained as well as its sum, a graph one sum-to-zero constraint per connected "
                "component)"
            )
        return "intrinsic" if np.abs(Q @ V).max() <= rtol * scale else "conditioned"

    @staticmethod
    def stack(parts) -> LinearConstraints:
        """Constraints of stacked independent fields: ``parts`` = ``(constraints or None, num_nodes)`` per block.

        ``V = blockdiag(V_1, …)`` (blocks without constraints contribute rows of
        zeros), pivots shifted by the block offsets.
        """
        parts = [(c, int(n)) for c, n in parts]
        key = tuple((id(c), n) for c, n in parts)
        hit = _STACK_CACHE.get(key)
        if hit is not None and all(a is b for (a, _), (b, _) in zip(hit[0], parts)):
            return hit[1]
        total = sum(n for _, n in parts)
        blocks, pivots, offset = [], [], 0
        for constraints, n in parts:
            if constraints is not None:
                if constraints.num_nodes != n:
                    raise ValueError(f"constraints on {constraints.num_nodes} nodes for a block of {n}")
                V = np.zeros((total, constraints.num_constraints))
                V[offset : offset + n] = constraints._basis.numpy()
                blocks.append(V)
                pivots.append(constraints.pivots.numpy() + offset)
            offset += int(n)
        if not blocks:
            raise ValueError("no block has constraints")
        stacked = LinearConstraints(np.concatenate(blocks, 1), pivots=np.concatenate(pivots))
        if len(_STACK_CACHE) >= 8:
            _STACK_CACHE.pop(next(iter(_STACK_CACHE)))
        _STACK_CACHE[key] = (parts, stacked)  # the same stacked object for the same blocks (strong references)
        return stacked

    def same_as(self, other: LinearConstraints) -> bool:
        """Whether ``other`` holds the same basis and pivots (the same object, or equal values)."""
        if other is self:
            return True
        return (
            isinstance(other, LinearConstraints)
            and self._basis.shape == other._basis.shape
            and bool(torch.equal(self._basis, other._basis))
            and bool(torch.equal(self.pivots, other.pivots))
        )

    def embed(self, offset: int, total: int) -> LinearConstraints:
        """The same constraints on nodes ``offset … offset + N − 1`` of a stacked field of ``total`` nodes."""
        if offset < 0 or offset + self.num_nodes > total:
            raise ValueError(f"cannot embed {self.num_nodes} nodes at offset {offset} into {total}")
        V = np.zeros((total, self.num_constraints))
        V[offset : offset + self.num_nodes] = self._basis.numpy()
        return LinearConstraints(V, pivots=self.pivots.numpy() + offset)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def __repr__(self) -> str:
        return f"LinearConstraints(num_nodes={self.num_nodes}, num_constraints={self.num_constraints})"


# ------------------------------------------------------------------ the completion
@dataclass
class _Completion:
    """``R = X + EEᵀ`` and the low-rank terms of ``Σ = P R⁻¹ P − (PY) N (PY)ᵀ`` (module docstring)."""

    R: SparseLinearOperator
    V: Tensor  # (N, k)
    Y: Tensor  # (*batch, N, 2k): R⁻¹ [V F]
    PY: Tensor  # (*batch, N, 2k): P R⁻¹ [V F]
    N: Tensor  # (*batch, 2k, 2k): Inner⁻¹
    correction: Tensor  # (*batch,): log det_S X − log det R = log|det Inner| − 2 log|det T|
    extra: Tensor | None  # R⁻¹ P · (extra right-hand sides)

    def project(self, z: Tensor) -> Tensor:
        """``P z = z − V Vᵀ z`` for ``z`` ``(*batch, N, c)``."""
        return z - self.V @ (self.V.mT @ z)

    def apply(self, z: Tensor, solved: Tensor | None = None) -> Tensor:
        """``Σ z`` for ``z`` ``(*batch, N, c)`` (``solved = R⁻¹ P z`` if already known)."""
        solved = self.R.solve(self.project(z)) if solved is None else solved
        return self.project(solved) - self.PY @ (self.N @ (self.PY.mT @ z))

    def quadratic(self, b: Tensor, solved: Tensor) -> Tensor:
        """``diag(bᵀ Σ b)`` ``(*batch, c)`` with ``solved = R⁻¹ P b``."""
        projected = self.PY.mT @ b
        return (self.project(b) * solved).sum(-2) - (projected * (self.N @ projected)).sum(-2)


def _pivot_scale(X: SparseLinearOperator) -> float:
    """``s²``: the mean absolute diagonal of ``X`` (a constant: detached), 1 where that is zero or not finite."""
    diagonal = X._diagonal().detach()
    scale = float(diagonal.abs().mean()) if diagonal.numel() else 1.0
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def _completion_parts(X: SparseLinearOperator, constraints: LinearConstraints):
    """``(R, V, E-scale², T)``: the sparse completion ``R = X + EEᵀ`` and ``T = EᵀV`` (pivot rows of ``V``, scaled)."""
    n, dtype, device = X.shape[-1], X.dtype, X.device
    if constraints.num_nodes != n:
        raise ValueError(f"the constraints are on {constraints.num_nodes} nodes but the precision has {n}")
    V = constraints.basis(dtype, device)
    pivots = constraints.pivots.to(device)
    scale2 = _pivot_scale(X)
    bump = torch.zeros(n, dtype=dtype, device=device)
    bump[pivots] = scale2
    return X.add_diagonal(bump), V, scale2, math.sqrt(scale2) * V[pivots]


def _complete(X: SparseLinearOperator, constraints: LinearConstraints, extra: Tensor | None = None) -> _Completion:
    r"""The completion of ``X`` (module docstring): ``2k`` (+ extra) solves with ``R`` in one call, ``2k × 2k`` algebra.

    ``Σ = (PXP)⁺ = P X_c⁻¹ P`` with ``X_c = PXP + EEᵀ = R + U M' Uᵀ``,
    ``U = [V F]``, ``F = XV``, ``M' = [[VᵀF, −I], [−I, 0]]``; Woodbury gives
    ``X_c⁻¹ = R⁻¹ − Y Inner⁻¹ Yᵀ`` with ``Y = R⁻¹U`` and
    ``Inner = M'⁻¹ + UᵀY``, ``M'⁻¹ = [[0, −I], [−I, −VᵀF]]``. For an
    intrinsic ``X`` (``F = 0``) the correction vanishes and ``Σ = P R⁻¹ P``.
    """
    R, V, scale2, T = _completion_parts(X, constraints)
    n, k, dtype, device = X.shape[-1], V.shape[-1], X.dtype, X.device
    F = X._matmul(V.expand(*X.batch_shape, n, k))
    U = torch.cat([V.expand_as(F), F], -1)
    batch = R.batch_shape if extra is None else torch.broadcast_shapes(R.batch_shape, extra.shape[:-2])
    rhs = U.expand(*batch, n, 2 * k)
    if extra is not None:
        projected = extra - V @ (V.mT @ extra)
        rhs = torch.cat([rhs, projected.expand(*batch, *extra.shape[-2:])], -1)
    try:
        solved = R.solve(rhs)
    except NotPositiveDefiniteError as error:
        raise NotPositiveDefiniteError(
            "the constrained precision is not positive definite on the constraint subspace {x : A x = 0}: its "
            "null space is larger than the constraints (an RW2 needs its linear trend constrained as well as its "
            "sum; every connected component of a Besag graph needs its own sum-to-zero constraint), so the "
            f"constrained field is improper ({error})"
        ) from error
    Y, rest = solved[..., : 2 * k], (solved[..., 2 * k :] if extra is not None else None)
    VF = V.mT @ F
    VF = 0.5 * (VF + VF.mT)
    eye = torch.eye(k, dtype=dtype, device=device).expand_as(VF)
    top = torch.cat([torch.zeros_like(VF), -eye], -1)
    bottom = torch.cat([-eye, -VF], -1)
    inner = torch.cat([top, bottom], -2) + U.mT @ Y
    inner = 0.5 * (inner + inner.mT)
    sign, logabsdet = torch.linalg.slogdet(inner)
    # det X_c = det R · det M' · det Inner with det M' = (−1)^k: a positive definite X_c needs sign = (−1)^k.
    if bool((sign.detach() != (-1.0) ** k).any()) or not bool(torch.isfinite(logabsdet.detach()).all()):
        raise NotPositiveDefiniteError(
            "the constrained precision is not positive definite on the constraint subspace {x : A x = 0} (the "
            "constraints do not make the field proper: Q is singular on the subspace they leave free)"
        )
    N = torch.linalg.inv(inner)
    N = 0.5 * (N + N.mT)
    PY = Y - V @ (V.mT @ Y)
    correction = logabsdet - 2.0 * torch.linalg.slogdet(T).logabsdet
    return _Completion(R=R, V=V, Y=Y, PY=PY, N=N, correction=correction, extra=rest)


def _check_constraints(constraints) -> LinearConstraints:
    if isinstance(constraints, LinearConstraints):
        return constraints
    if constraints is None:
        raise ValueError("constraints are required (a LinearConstraints or a (k, N) constraint matrix)")
    return LinearConstraints.from_matrix(constraints)


def _check_pseudo_logdet(pseudo_logdet, Q: SparseLinearOperator):
    if pseudo_logdet is None:
        return None
    if not isinstance(pseudo_logdet, Tensor):
        pseudo_logdet = torch.as_tensor(pseudo_logdet, dtype=Q.dtype, device=Q.device)
    elif pseudo_logdet.dtype != Q.dtype or pseudo_logdet.device != Q.device:
        pseudo_logdet = pseudo_logdet.to(dtype=Q.dtype, device=Q.device)
    try:
        torch.broadcast_shapes(pseudo_logdet.shape, Q.batch_shape)
    except RuntimeError:
        raise ValueError(
            f"pseudo_logdet of shape {tuple(pseudo_logdet.shape)} does not broadcast with Q's batch shape "
            f"{tuple(Q.batch_shape)}"
        ) from None
    return pseudo_logdet


class ConstrainedPrecisionLinearOperator(DenseLimitedCovariance, LinearOperator):
    r"""``K = W Σ W'ᵀ``: the covariance of a GMRF with precision ``Q`` under linear constraints ``A x = 0``.

    ``Σ = V_⊥ (V_⊥ᵀ Q V_⊥)⁻¹ V_⊥ᵀ`` (module docstring): ``Q⁺`` for an
    intrinsic ``Q`` whose null space the constraints span (random walks,
    Besag), the constrained posterior covariance for a posterior precision
    ``Q + WᵀD⁻¹W``. Never formed: products are one solve with the sparse
    completion ``R = Q + EEᵀ`` plus a rank-``2k`` correction.

    Parameters
    ----------
    Q : SparseLinearOperator
        Symmetric positive semi-definite ``(*batch, N, N)``, positive
        definite on ``{x : A x = 0}``.
    constraints : LinearConstraints, Tensor, numpy.ndarray or scipy.sparse matrix
        The constraints (a matrix ``A`` ``(k, N)`` of full row rank is
        converted by ``LinearConstraints.from_matrix``).
    interp : torch sparse tensor or SparseLinearOperator, optional
        ``W`` (m × N); identity if omitted.
    right_interp : optional
        ``W'`` for cross-covariances; ``W`` if omitted.
    pseudo_logdet : Tensor, optional
        ``log det* Q`` (the sum of the logs of the nonzero eigenvalues),
        ``(*batch)``, for an intrinsic ``Q`` whose null space is exactly
        spanned by the constraints; a differentiable function of the same
        parameters as ``Q`` (the kernels pass their closed forms). Then the
        marginal likelihood needs no completion of ``Q`` (no solves with
        ``Q + EEᵀ``) and ``log det(Q + EEᵀ)`` is known. Not checked.
    components : tuple of int, optional
        Node offsets of stacked fields (as in
        [`SparsePrecisionLinearOperator`][gpsparse.SparsePrecisionLinearOperator]),
        e.g. ``(0, N, 2N)`` for BYM2's unstructured and structured parts.

    Notes
    -----
    * ``K v = W (P R⁻¹ P z − (PY) Inner⁻¹ (PY)ᵀ z)``, ``z = W'ᵀ v``: one
        solve with ``R`` (banded, CHOLMOD or CG: the dispatcher's road);
        ``Y = R⁻¹[V QV]`` is computed once per operator (``2k`` solves;
        recomputed per call only while gradients flow into ``Q``).
    * The diagonal: ``diag(W R⁻¹ Wᵀ)`` by ``covariance_diagonal`` (exact
        from a selected inverse on the banded and CHOLMOD roads, else solves
        or Monte Carlo, per [`gpsparse.settings.variance_defaults`][]) plus
        the exact low-rank parts of ``P`` and of the correction.
    * ``K + D`` (``add_diagonal``, ``+ DiagLinearOperator``) returns a
        [`NoisyConstrainedPrecisionLinearOperator`][gpsparse.operators.constrained.NoisyConstrainedPrecisionLinearOperator].
    * ``K + K'`` with ``K'`` another constrained or sparse-precision covariance
        (independent fields, e.g. a Besag area effect plus a lattice or
        random-walk term) is one constrained operator on the stacked nodes
        (``add_covariances``); write the constrained term first
        (``SparsePrecisionLinearOperator + K`` is linear_operator's generic sum).
    * ``c·K`` for ``c > 0`` is ``W Σ(Q/c) Wᵀ`` (``ScaleKernel``); other
        constants give linear_operator's generic ``ConstantMulLinearOperator``.
    * Solves and log-determinants of ``K`` itself (no noise) form it
        densely within [`gpsparse.settings.max_dense_size`][] and raise
        ``NotImplementedError`` above (add noise). ``K`` is singular when ``W``
        observes a constrained combination — e.g. every node of a
        sum-to-zero field: the observations must then sum to zero, and other
        data have density zero; that raises
        [`NotPositiveDefiniteError`][gpsparse.errors.NotPositiveDefiniteError].
    * Gradients reach ``Q``'s and ``W``'s values (autograd through the
        sparse-gradient solves and the small dense algebra).

    Examples
    --------
    >>> import torch
    >>> from gpsparse import SparseLinearOperator
    >>> from gpsparse.operators.constrained import ConstrainedPrecisionLinearOperator
    >>> i = torch.tensor([[0, 0, 1, 1, 1, 2, 2], [0, 1, 0, 1, 2, 1, 2]])
    >>> v = torch.tensor([1.0, -1.0, -1.0, 2.0, -1.0, -1.0, 1.0], dtype=torch.float64)  # RW1 on 3 nodes
    >>> Q = SparseLinearOperator.from_tensor(torch.sparse_coo_tensor(i, v, (3, 3)))
    >>> K = ConstrainedPrecisionLinearOperator(Q, torch.ones(1, 3))  # sum to zero
    >>> torch.allclose(K.to_dense(), torch.linalg.pinv(Q.to_dense()))
    True
    """

    def __init__(
        self,
        Q: SparseLinearOperator,
        constraints,
        interp=None,
        right_interp=None,
        *,
        pseudo_logdet: Tensor | None = None,
        components=None,
    ):
        if not isinstance(Q, SparseLinearOperator):
            raise TypeError(f"Q must be a gpsparse.SparseLinearOperator, got {type(Q).__name__}")
        if not Q.is_symmetric:
            raise ValueError("Q must be symmetric (declared or detected) to be a precision matrix")
        constraints = _check_constraints(constraints)
        num_nodes = Q.shape[-1]
        if constraints.num_nodes != num_nodes:
            raise ValueError(f"the constraints are on {constraints.num_nodes} nodes but Q has {num_nodes}")
        interp = interpolation_operator(interp, num_nodes, Q.device, Q.dtype)
        right_interp = interpolation_operator(right_interp, num_nodes, Q.device, Q.dtype)
        pseudo_logdet = _check_pseudo_logdet(pseudo_logdet, Q)
        components = _check_components(components, num_nodes)
        super().__init__(
            Q,
            interp=interp,
            right_interp=right_interp,
            constraints=constraints,
            pseudo_logdet=pseudo_logdet,
            components=components,
        )
        self.Q, self.interp, self.right_interp = Q, interp, right_interp
        self.constraints, self.pseudo_logdet, self.components = constraints, pseudo_logdet, components
        self._completion_cache = None

    # ------------------------------------------------------------ structure
    @property
    def _right(self) -> SparseLinearOperator | None:
        return self.interp if self.right_interp is None else self.right_interp

    @property
    def is_symmetric(self) -> bool:
        return self.right_interp is None or self.right_interp is self.interp

    def _size(self) -> torch.Size:
        n = self.Q.shape[-1]
        rows = n if self.interp is None else self.interp.shape[-2]
        cols = n if self._right is None else self._right.shape[-2]
        return torch.Size((*self.Q.batch_shape, rows, cols))

    def _with(self, **changes) -> ConstrainedPrecisionLinearOperator:
        arguments = dict(
            Q=self.Q,
            constraints=self.constraints,
            interp=self.interp,
            right_interp=self.right_interp,
            pseudo_logdet=self.pseudo_logdet,
            components=self.components,
        )
        arguments.update(changes)
        return ConstrainedPrecisionLinearOperator(**arguments)

    def completion(self) -> _Completion:
        """``R = Q + EEᵀ``, ``Y``, ``M`` and ``log det_S Q − log det R`` (recomputed per call when gradients flow)."""
        recording = torch.is_grad_enabled() and self.Q.values.requires_grad
        if recording:
            return _complete(self.Q, self.constraints)
        key = (self.Q.values._version, self.Q.values.dtype)
        cached = self._completion_cache
        if cached is None or cached[0] != key:
            cached = self._completion_cache = (key, _complete(self.Q, self.constraints))
        return cached[1]

    # ------------------------------------------------------------- products
    def _matmul(self, rhs: Tensor) -> Tensor:
        completion = self.completion()
        z = apply_t(self._right, rhs)
        batch = torch.broadcast_shapes(z.shape[:-2], completion.Y.shape[:-2])
        z = z.expand(*batch, *z.shape[-2:])
        return apply(self.interp, completion.apply(z))

    def _transpose_nonbatch(self) -> ConstrainedPrecisionLinearOperator:
        if self.is_symmetric:
            return self
        return self._with(interp=self._right, right_interp=self.interp)

    def _expand_batch(self, batch_shape) -> ConstrainedPrecisionLinearOperator:
        batch_shape = torch.Size(batch_shape)
        pseudo = None if self.pseudo_logdet is None else self.pseudo_logdet.expand(batch_shape)
        return self._with(Q=self.Q._expand_batch(batch_shape), pseudo_logdet=pseudo)

    def _mul_constant(self, other) -> LinearOperator:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        if not bool((other.detach() > 0).all()):
            if bool((other.detach() == 0).all()):
                batch = torch.broadcast_shapes(self.batch_shape, other.shape)
                return ZeroLinearOperator(*batch, *self.matrix_shape, dtype=self.dtype, device=self.device)
            return super()._mul_constant(other)
        pseudo = None
        if self.pseudo_logdet is not None:
            rank = self.Q.shape[-1] - self.constraints.num_constraints
            pseudo = self.pseudo_logdet - rank * other.log()
        return self._with(Q=self.Q._mul_constant(other.reciprocal()), pseudo_logdet=pseudo)

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        Q = self.Q._getitem(slice(None), slice(None), *batch_indices) if batch_indices else self.Q
        pseudo = self.pseudo_logdet
        if batch_indices and pseudo is not None:
            pseudo = pseudo.expand(self.Q.batch_shape)[batch_indices]
        rows = select_rows(self.interp, row_index, self.shape[-2], Q)
        if self.is_symmetric and _same_index(row_index, col_index):
            return self._with(Q=Q, interp=rows, right_interp=None, pseudo_logdet=pseudo)  # still symmetric
        cols = select_rows(self._right, col_index, self.shape[-1], Q)
        if cols is None and rows is not None:  # None on the right would mean "the same as the rows"
            cols = select_rows(None, torch.arange(Q.shape[-1], device=Q.device), Q.shape[-1], Q)
        return self._with(Q=Q, interp=rows, right_interp=cols, pseudo_logdet=pseudo)

    def _diagonal(self) -> Tensor:
        """``diag(W R⁻¹ Wᵀ) − rowsum((WY) M ∘ WY)`` (class notes)."""
        if not self.is_symmetric:
            raise ValueError("the diagonal of a cross-covariance is not defined here")
        completion = self.completion()
        k = self.constraints.num_constraints
        base = covariance_diagonal(completion.R, self.interp)  # diag(W R⁻¹ Wᵀ)
        WV = apply(self.interp, completion.V.expand(*completion.Y.shape[:-2], *completion.V.shape))
        RV = completion.Y[..., :k]  # R⁻¹ V
        WRV = apply(self.interp, RV)
        projection = -2.0 * (WV * WRV).sum(-1) + ((WV @ (completion.V.mT @ RV)) * WV).sum(-1)
        WPY = apply(self.interp, completion.PY)
        return base + projection - ((WPY @ completion.N) * WPY).sum(-1)

    # ---------------------------------------------------------------- noise
    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        """``K + D`` with D diagonal (scalar, ``(m,)`` or batched), as a ``NoisyConstrainedPrecisionLinearOperator``."""
        if not self.is_symmetric:
            raise ValueError("add_diagonal needs a square, symmetric covariance")
        diag = torch.as_tensor(diag, dtype=self.dtype, device=self.device)
        if diag.dim() == 0:
            diag = diag.reshape(1)
        m = self.shape[-1]
        noise = diag.expand(*torch.broadcast_shapes(diag.shape[:-1], self.batch_shape), m)
        if not bool(torch.isfinite(noise.detach()).all()) or bool((noise.detach() <= 0).any()):
            return super().add_diagonal(diag)
        return NoisyConstrainedPrecisionLinearOperator(
            self.Q,
            noise,
            self.constraints,
            interp=self.interp,
            pseudo_logdet=self.pseudo_logdet,
            components=self.components,
        )

    def __add__(self, other):
        if isinstance(other, DiagLinearOperator):
            return self.add_diagonal(other._diagonal())
        if isinstance(other, (ConstrainedPrecisionLinearOperator, SparsePrecisionLinearOperator)):
            total = add_covariances(self, other)
            if total is not None:
                return total
        return super().__add__(other)

    # --------------------------------------------------------------- solves
    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """``K⁻¹ R`` by a dense Cholesky of ``K`` (class notes)."""
        vector = right_tensor.dim() == 1
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        factor = self._dense_factor("solve")
        batch = torch.broadcast_shapes(factor.shape[:-2], rhs.shape[:-2])
        result = torch.cholesky_solve(rhs.expand(*batch, *rhs.shape[-2:]), factor.expand(*batch, *factor.shape[-2:]))
        result = result.squeeze(-1) if vector else result
        return result if left_tensor is None else left_tensor @ result

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        return self.inv_quad_logdet(inv_quad_rhs, logdet=False, reduce_inv_quad=reduce_inv_quad)[0]

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True):
        """``rᵀK⁻¹r`` and ``log det K`` by a dense Cholesky of ``K`` (class notes)."""
        if inv_quad_rhs is None and not logdet:
            raise ValueError("Either `inv_quad_rhs` or `logdet` must be specified.")
        zero = torch.zeros([], dtype=self.dtype, device=self.device)
        quad = logdet_term = zero
        factor = self._dense_factor("inv_quad_logdet")
        if inv_quad_rhs is not None:
            rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
            batch = torch.broadcast_shapes(factor.shape[:-2], rhs.shape[:-2])
            half = torch.linalg.solve_triangular(
                factor.expand(*batch, *factor.shape[-2:]), rhs.expand(*batch, *rhs.shape[-2:]), upper=False
            )
            quad = half.pow(2).sum(-2)
            quad = quad.sum(-1) if reduce_inv_quad else quad
        if logdet:
            logdet_term = 2.0 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return quad, logdet_term

    def _dense_factor(self, what: str) -> Tensor:
        if not self.is_symmetric:
            raise ValueError(f"{what} needs a square, symmetric covariance")
        if not self._dense_fits():
            raise NotImplementedError(
                f"{what} of a constrained W Σ Wᵀ without noise has no sparse form; it is formed densely only within "
                f"gpsparse.settings.max_dense_size = {gs_settings.current().max_dense_size:,}, which shape "
                f"{tuple(self.shape)} exceeds. Add observation noise (K + D, as GPyTorch's GaussianLikelihood does), "
                "which works through the sparse constrained posterior, or raise the limit"
            )
        dense = self.to_dense()
        factor, info = torch.linalg.cholesky_ex(0.5 * (dense + dense.mT))
        pivots = factor.diagonal(dim1=-2, dim2=-1).pow(2)
        largest = dense.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True)
        tiny = pivots <= dense.shape[-1] * torch.finfo(dense.dtype).eps * largest  # numerically singular
        if bool((info > 0).any()) or bool(tiny.any()):
            raise NotPositiveDefiniteError(
                f"{what}: the constrained covariance W Σ Wᵀ is singular to working precision: the rows of W "
                "observe a combination of the field that the constraints A x = 0 fix (e.g. every node of a "
                "sum-to-zero field, whose values must then sum to zero; other data have density zero). "
                "Add observation noise (K + D) or observe fewer combinations"
            )
        return factor


class NoisyConstrainedPrecisionLinearOperator(LinearOperator):
    r"""``K_y = W Σ Wᵀ + D`` for a constrained GMRF, through the constrained posterior.

    ``Σ`` is the constrained covariance of
    [`ConstrainedPrecisionLinearOperator`][gpsparse.operators.constrained.ConstrainedPrecisionLinearOperator].

    The marginal likelihood of ``y = W x + ε`` under the constrained prior
    goes through the sparse posterior precision ``P = Q + WᵀD⁻¹W``, which is
    positive definite on the constraint subspace, and its completion
    ``H = P + EEᵀ`` (``R + WᵀD⁻¹W`` up to the pivot scale):

    $$
    \log\det K_y = \log\det{}_S P − \log\det{}_S Q + \sum_i \log d_i ,\qquad
    yᵀK_y^{-1}y = yᵀD^{-1}y − bᵀ Σ_P b ,\quad b = WᵀD^{-1}y ,
    $$

    with ``Σ_P = P_V H⁻¹ P_V − (P_V Y_H) Inner_H⁻¹ (P_V Y_H)ᵀ`` the
    constrained posterior covariance (``P_V = I − VVᵀ``) and ``log det_S``
    the generalised determinants (module docstring; ``docs/mathematics.md``). One solve call with ``H``
    (``2k`` + the right-hand sides) and ``log det H − log det R`` by
    ``gpsparse.linalg.dispatch.logdet_difference`` (exact on the banded,
    CHOLMOD and dense roads; stochastic Lanczos quadrature with common
    probes on the Krylov road, as for
    [`NoisySparsePrecisionLinearOperator`][gpsparse.NoisySparsePrecisionLinearOperator]);
    ``log det_S Q`` from ``pseudo_logdet`` when given (then ``log det R =
    log det* Q + 2 log|det T|``, ``T = EᵀV``, needs no road), else from ``2k``
    solves with ``R``. Solves: ``K_y⁻¹ v = D⁻¹v − D⁻¹ W Σ_P Wᵀ D⁻¹ v``.

    Parameters
    ----------
    Q, constraints, interp, pseudo_logdet, components
        As for ``ConstrainedPrecisionLinearOperator``.
    noise : Tensor
        Positive diagonal ``d`` of ``D``, ``(*batch, m)``.
    """

    def __init__(
        self,
        Q: SparseLinearOperator,
        noise: Tensor,
        constraints,
        interp=None,
        *,
        pseudo_logdet: Tensor | None = None,
        components=None,
    ):
        if not isinstance(Q, SparseLinearOperator) or not Q.is_symmetric:
            raise TypeError("Q must be a symmetric gpsparse.SparseLinearOperator")
        constraints = _check_constraints(constraints)
        if constraints.num_nodes != Q.shape[-1]:
            raise ValueError(f"the constraints are on {constraints.num_nodes} nodes but Q has {Q.shape[-1]}")
        interp = interpolation_operator(interp, Q.shape[-1], Q.device, Q.dtype)
        m = Q.shape[-1] if interp is None else interp.shape[-2]
        if noise.shape[-1] != m:
            raise ValueError(f"noise has {noise.shape[-1]} entries but the covariance has {m} rows")
        if not bool(torch.isfinite(noise.detach()).all()) or bool((noise.detach() <= 0).any()):
            raise ValueError("the noise variances must be finite and positive")
        pseudo_logdet = _check_pseudo_logdet(pseudo_logdet, Q)
        components = _check_components(components, Q.shape[-1])
        super().__init__(
            Q,
            noise,
            constraints=constraints,
            interp=interp,
            pseudo_logdet=pseudo_logdet,
            components=components,
        )
        self.Q, self.noise, self.interp = Q, noise, interp
        self.constraints, self.pseudo_logdet, self.components = constraints, pseudo_logdet, components

    def _size(self) -> torch.Size:
        m = self.noise.shape[-1]
        return torch.Size((*torch.broadcast_shapes(self.Q.batch_shape, self.noise.shape[:-1]), m, m))

    @property
    def covariance(self) -> ConstrainedPrecisionLinearOperator:
        """The noise-free part ``W Σ Wᵀ``."""
        return ConstrainedPrecisionLinearOperator(
            self.Q,
            self.constraints,
            interp=self.interp,
            pseudo_logdet=self.pseudo_logdet,
            components=self.components,
        )

    def posterior_precision(self) -> SparseLinearOperator:
        """``P = Q + Wᵀ D⁻¹ W`` (sparse; positive definite on the constraint subspace), differentiable."""
        inv_noise = self.noise.reciprocal()
        if self.interp is None:
            return self.Q.add_diagonal(inv_noise)
        return self.Q + weighted_gram(self.interp, inv_noise)

    def posterior_covariance(self, interp=None) -> ConstrainedPrecisionLinearOperator:
        """The constrained posterior covariance of the latent field, ``W* Σ_P W*ᵀ`` (``W* = I`` by default)."""
        P = self.posterior_precision()
        return ConstrainedPrecisionLinearOperator(P, self.constraints, interp=interp, components=self.components)

    def posterior_mean(self, residual: Tensor) -> Tensor:
        r"""The constrained posterior mean ``x̂ = Σ_P Wᵀ D⁻¹ r`` ``(*batch, N)`` of the latent field for residuals ``r``.

        ``r = y − μ`` ``(*batch, m)``. It satisfies ``A x̂ = 0``: ``Σ_P``
        maps into the constraint subspace, and the result is projected once
        more, ``x̂ ← x̂ − V Vᵀ x̂``, so that ``‖Vᵀ x̂‖`` is at rounding level
        whatever the accuracy of the solves.
        """
        rhs = apply_t(self.interp, (residual / self.noise).unsqueeze(-1))
        completion = _complete(self.posterior_precision(), self.constraints, extra=rhs)
        mean = completion.apply(rhs, solved=completion.extra).squeeze(-1)
        V = self.constraints.basis(mean.dtype, mean.device)
        return mean - (mean @ V) @ V.T

    def _with(self, **changes) -> NoisyConstrainedPrecisionLinearOperator:
        arguments = dict(
            Q=self.Q,
            noise=self.noise,
            constraints=self.constraints,
            interp=self.interp,
            pseudo_logdet=self.pseudo_logdet,
            components=self.components,
        )
        arguments.update(changes)
        return NoisyConstrainedPrecisionLinearOperator(**arguments)

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.covariance._matmul(rhs) + self.noise.unsqueeze(-1) * rhs

    def _transpose_nonbatch(self) -> NoisyConstrainedPrecisionLinearOperator:
        return self

    def _expand_batch(self, batch_shape) -> NoisyConstrainedPrecisionLinearOperator:
        batch_shape = torch.Size(batch_shape)
        pseudo = None if self.pseudo_logdet is None else self.pseudo_logdet.expand(batch_shape)
        return self._with(
            Q=self.Q._expand_batch(batch_shape),
            noise=self.noise.expand(*batch_shape, self.shape[-1]),
            pseudo_logdet=pseudo,
        )

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        full = all(isinstance(i, slice) and i == slice(None) for i in (row_index, col_index))
        if not (full and batch_indices):  # rows or columns: linear_operator's interpolation
            return super()._getitem(row_index, col_index, *batch_indices)
        Q = self.Q if self.Q.batch_shape == self.batch_shape else self.Q._expand_batch(self.batch_shape)
        noise = self.noise.expand(*self.batch_shape, self.shape[-1])
        pseudo = None if self.pseudo_logdet is None else self.pseudo_logdet.expand(self.batch_shape)[batch_indices]
        return self._with(
            Q=Q._getitem(slice(None), slice(None), *batch_indices),
            noise=noise[(*batch_indices, slice(None))],
            pseudo_logdet=pseudo,
        )

    def _diagonal(self) -> Tensor:
        return self.covariance._diagonal() + self.noise

    def _mul_constant(self, other) -> LinearOperator:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        if not bool((other.detach() > 0).all()):
            return super()._mul_constant(other)
        pseudo = None
        if self.pseudo_logdet is not None:
            pseudo = self.pseudo_logdet - (self.Q.shape[-1] - self.constraints.num_constraints) * other.log()
        noise = self.noise * (other.unsqueeze(-1) if other.dim() else other)
        return self._with(Q=self.Q._mul_constant(other.reciprocal()), noise=noise, pseudo_logdet=pseudo)

    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        """``K_y + E``: the noise becomes ``d + e`` (the generic sum if that is not positive)."""
        diag = torch.as_tensor(diag, dtype=self.dtype, device=self.device)
        noise = self.noise + diag
        if bool(torch.isfinite(noise.detach()).all()) and bool((noise.detach() > 0).all()):
            return self._with(noise=noise)
        return super().add_diagonal(diag)

    def __add__(self, other):
        if isinstance(other, DiagLinearOperator):
            return self.add_diagonal(other._diagonal())
        return super().__add__(other)

    def to_dense(self) -> Tensor:
        return self.covariance.to_dense() + torch.diag_embed(self.noise)

    def _cholesky(self, upper: bool = False):
        self.covariance.to_dense()  # raises above the dense limit
        return super()._cholesky(upper=upper)

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """``K_y⁻¹ R = D⁻¹R − D⁻¹ W Σ_P Wᵀ D⁻¹ R`` (one solve call with ``H``)."""
        vector = right_tensor.dim() == 1
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        scaled = rhs / self.noise.unsqueeze(-1)
        b = apply_t(self.interp, scaled)
        completion = _complete(self.posterior_precision(), self.constraints, extra=b)
        correction = apply(self.interp, completion.apply(_expand_to(b, completion), solved=completion.extra))
        result = scaled - correction / self.noise.unsqueeze(-1)
        result = result.squeeze(-1) if vector else result
        return result if left_tensor is None else left_tensor @ result

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        return self.inv_quad_logdet(inv_quad_rhs, logdet=False, reduce_inv_quad=reduce_inv_quad)[0]

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True):
        """``yᵀK_y⁻¹y`` and ``log det K_y`` through the constrained posterior (class docstring)."""
        if inv_quad_rhs is None and not logdet:
            raise ValueError("Either `inv_quad_rhs` or `logdet` must be specified.")
        zero = torch.zeros([], dtype=self.dtype, device=self.device)
        quad = logdet_term = zero
        rhs = scaled = b = None
        if inv_quad_rhs is not None:
            rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
            scaled = rhs / self.noise.unsqueeze(-1)
            b = apply_t(self.interp, scaled)
        posterior = _complete(self.posterior_precision(), self.constraints, extra=b)
        if b is not None:
            b = _expand_to(b, posterior)
            quad_p = posterior.quadratic(b, posterior.extra)
            quad = (rhs * scaled).sum(-2) - quad_p
            quad = quad.sum(-1) if reduce_inv_quad else quad
        if logdet:
            logdet_term = self._logdet_ratio(posterior) + self.noise.log().sum(-1)
        return quad, logdet_term

    def _logdet_ratio(self, posterior: _Completion) -> Tensor:
        """``log det_S P − log det_S Q`` (class docstring)."""
        H = posterior.R
        if self.pseudo_logdet is not None:
            # R = Q + EEᵀ with null(Q) = span(V): det R = det* Q · det(T)², T = EᵀV (its pivot rows, scaled by s).
            R, _, _, T = _completion_parts(self.Q, self.constraints)
            log_t = 2.0 * torch.linalg.slogdet(T).logabsdet
            prior_correction = -log_t
            known = self.pseudo_logdet + log_t
        else:
            prior = _complete(self.Q, self.constraints)
            R, prior_correction, known = prior.R, prior.correction, None
        _, difference, _ = dispatch.logdet_difference(
            H.values,
            H.pattern,
            H._road_config(dense=True),
            R.values,
            R.pattern,
            R._road_config(dense=True),
            known_b=known,
        )
        return difference + posterior.correction - prior_correction


def constrained_logdet(op: ConstrainedPrecisionLinearOperator) -> Tensor:
    """``log det_S Q`` of a constrained covariance's precision (differentiable in ``Q``'s values).

    The kernel's ``pseudo_logdet`` when it has one, else from the completion:
    ``log det R + log|det Inner| − 2 log|det T|`` (module docstring), ``log det R``
    on the dispatcher's road for ``R`` (exact on the banded, CHOLMOD and dense
    roads; a stochastic estimate on the Krylov road).
    """
    if op.pseudo_logdet is not None:
        return op.pseudo_logdet
    prior = _complete(op.Q, op.constraints)
    R = prior.R
    return dispatch.logdet(R.values, R.pattern, R._road_config(dense=True)) + prior.correction


def add_covariances(a, b) -> ConstrainedPrecisionLinearOperator | None:
    r"""``a + b`` of independent fields, at least one constrained, as one constrained operator (or None).

    ``W Q⁻¹ W'ᵀ``-type terms (``SparsePrecisionLinearOperator``, sign +1) and
    constrained ones stack: ``Q = blockdiag(Q_a, Q_b)``, ``W = [W_a W_b]``,
    the constraints ``blockdiag(V_a, V_b)`` (``LinearConstraints.stack``),
    ``components`` the node offsets of every term (flattened), and
    ``pseudo_logdet`` the sum of the blocks' ``log det*`` when each is known
    (a constrained block's ``pseudo_logdet``, a sparse block's closed-form
    ``log det``), else None. None when the shapes, dtypes or devices differ,
    or a sparse term is negated: the caller falls back to linear_operator's sum.
    """
    for term in (a, b):
        if isinstance(term, SparsePrecisionLinearOperator) and term.sign < 0:
            return None
    if a.matrix_shape != b.matrix_shape or a.dtype != b.dtype or a.device != b.device:
        return None
    nodes = (a.Q.shape[-1], b.Q.shape[-1])
    rows, cols = a.matrix_shape
    Q = block_diagonal((_plain(a.Q), _plain(b.Q)))
    interp = hstack_interpolations((a.interp, b.interp), nodes, rows, a.device, a.dtype)
    right = None
    if not (a.is_symmetric and b.is_symmetric):
        right = hstack_interpolations((a._right, b._right), nodes, cols, a.device, a.dtype)
    constraints = LinearConstraints.stack([(getattr(t, "constraints", None), n) for t, n in zip((a, b), nodes)])
    parts = [_pseudo_or_logdet(t) for t in (a, b)]
    pseudo = None if any(p is None for p in parts) else parts[0] + parts[1]
    components = component_offsets(a.components, nodes[0], b.components, nodes[1])
    return ConstrainedPrecisionLinearOperator(
        Q, constraints, interp=interp, right_interp=right, pseudo_logdet=pseudo, components=components
    )


def _plain(Q: SparseLinearOperator) -> SparseLinearOperator:
    """``Q`` without a closed-form log-determinant (a constrained block has none: its ``Q`` is singular)."""
    return SparseLinearOperator(Q.values, pattern=Q.pattern) if isinstance(Q, KnownLogdetSparseLinearOperator) else Q


def _pseudo_or_logdet(term) -> Tensor | None:
    if isinstance(term, ConstrainedPrecisionLinearOperator):
        return term.pseudo_logdet
    if isinstance(term.Q, KnownLogdetSparseLinearOperator):
        return term.Q.known_logdet
    return None


def _same_index(a, b) -> bool:
    """Whether two row/column indices select the same rows (equal slices, or equal index tensors)."""
    if isinstance(a, slice) and isinstance(b, slice):
        return a == b
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return False


def _expand_to(b: Tensor, completion: _Completion) -> Tensor:
    """``b`` expanded to the batch of the completion's solves (``extra`` was solved at the broadcast batch)."""
    return b.expand(*completion.extra.shape[:-2], *b.shape[-2:])


def _check_components(components, num_nodes: int) -> tuple[int, ...] | None:
    if components is None:
        return None
    components = tuple(int(c) for c in components)
    if len(components) < 2 or components[0] != 0 or components[-1] != num_nodes:
        raise ValueError(f"components must be node offsets from 0 to {num_nodes}, got {components}")
    if any(b < a for a, b in zip(components, components[1:])):
        raise ValueError(f"components must be non-decreasing node offsets, got {components}")
    return components
