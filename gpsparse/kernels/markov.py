r"""Matérn kernels ν = 1/2, 3/2, 5/2 on 1-D inputs as exact block-tridiagonal precisions.

A Matérn process with ν = p + ½ is the first component of a linear SDE whose
state is ``s = p + 1`` derivatives (Hartikainen & Särkkä, 2010). On sorted
nodes ``t_0 < … < t_{n−1}`` the states form a Markov chain, so their joint
precision is block tridiagonal (``s × s`` blocks, half-bandwidth ``2s − 1 ≤ 5``)
and the covariance of the observations is ``W Q⁻¹ Wᵀ`` with ``W`` selecting
the first state component — the exact Matérn covariance, never formed.
gpsparse's banded Cholesky (:mod:`gpsparse.core.banded`) then gives exact
log-determinants, solves and gradients in ``O(n)``.

This module has two layers: pure tensor functions building the state-space
matrices and the precision (:func:`matern_state_space`,
:func:`matern_transition_and_noise`, :func:`matern_precision`; no gpytorch),
and the adapter :class:`MarkovMaternKernel`.

Mathematics
-----------
With ``λ = √(2ν)/ℓ`` and the state scaled to ``z_c = f^{(c)}/λ^c``, every matrix
depends on the scaled gap ``x = λΔ`` only. The drift is the companion matrix
``F`` of ``(u + 1)^s`` and ``N = F + I`` is nilpotent, so the transition is

.. math::
    A(x) = e^{Fx} = e^{-x} \sum_{k<s} N^k x^k / k!,

and with ``e^{Fu} e_s = e^{-u} Σ_j a_j u^j`` (``a_j = N^j e_s / j!``) and the
white-noise intensity ``q = (p!)²/(2p)! · 2^{2p+1}`` (unit variance) the
process noise is

.. math::
    Σ(x) = q \int_0^x e^{Fu} e_s e_s^T e^{F^T u} du
         = \sum_{m=0}^{2p} P(m + 1, 2x)\, K_m, \qquad
    K_m = q \frac{m!}{2^{m+1}} \sum_{j+k=m} a_j a_k^T,

where ``P(m + 1, y) = e^{−y} Σ_{i>m} y^i/i!`` is the regularised lower
incomplete gamma function (for the top order a series for ``x < 1``, where
``1 − e^{−y} Σ_{i≤m}`` would cancel, and that closed form beyond; lower
orders by the stable downward recurrence
``P(m, y) = P(m + 1, y) + e^{−y} y^m/m!``). The stationary covariance is
``P∞ = Σ_m K_m``. The chain ``z_0 ~ N(0, P∞)``, ``z_{k+1} = A_k z_k + ε_k``,
``ε_k ~ N(0, Σ_k)`` has the precision ``Q = Lᵀ S⁻¹ L`` (``L`` block
bidiagonal with ``I`` and ``−A_k``, ``S = blockdiag(P∞, Σ_0, …)``):

* ``Q_{00} = P∞⁻¹ + A_0ᵀ Σ_0⁻¹ A_0``, ``Q_{ii} = Σ_{i−1}⁻¹ + A_iᵀ Σ_i⁻¹ A_i``,
  ``Q_{n−1,n−1} = Σ_{n−2}⁻¹``;
* ``Q_{k+1,k} = −Σ_k⁻¹ A_k = Q_{k,k+1}ᵀ``.

Everything is a differentiable function of ``x``, hence of ``ℓ`` and of the
inputs, built with vectorised tensor operations (no loop over ``n``); the
``s × s`` inverses are closed-form cofactor formulas.

Numerical range
---------------
For ν ≥ 3/2 two close nodes make the precision ill-conditioned: the state at
``t + Δ`` is almost determined by the state at ``t`` (the innovation variance
is ``O(x^{2s−1})``), and a float64 Cholesky of ``Q`` or ``Q + WᵀD⁻¹W`` loses
about ``(2s − 1)·log10(1/x)`` digits *whatever the accuracy of the entries*
(measured with entries computed to 40 digits). ν = 1/2 is unaffected. See
:class:`MarkovMaternKernel` for the measured errors and the warning.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gpsparse.core.pattern import SparsityPattern
from gpsparse.kernels._inputs import check_batch_shapes, input_version, same_input
from gpsparse.kernels.base import SparsePrecisionKernel
from gpsparse.operators.precision import SparsePrecisionLinearOperator
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = [
    "MarkovMaternKernel",
    "MaternStateSpace",
    "matern_state_space",
    "matern_transition_and_noise",
    "matern_precision",
    "matern_covariance",
    "precision_pattern",
    "CloseInputsWarning",
    "SUPPORTED_NU",
]

#: The smoothness parameters with a finite-dimensional state-space form handled here.
SUPPORTED_NU = (0.5, 1.5, 2.5)

#: Terms of the incomplete-gamma series beyond the first (for 2x < 2 the tail is < 1e-18 relative).
_SERIES_TERMS = 26

#: Smallest scaled gap λ·Δ without a warning, per ν (estimated float64 error of the marginal
#: likelihood ≲ 1e-6 relative above it; measured in tests/test_markov.py::test_accuracy_versus_gap).
_WARN_GAP = {0.5: 0.0, 1.5: 1e-3, 2.5: 1e-1}


class CloseInputsWarning(RuntimeWarning):
    """Inputs so close (relative to the lengthscale) that the float64 precision path loses accuracy."""


# ---------------------------------------------------------------------------
# State-space constants (λ = 1, scaled state)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MaternStateSpace:
    r"""Constant matrices of the Matérn ν = p + ½ SDE in scaled time ``x = λt`` (float64, CPU).

    Attributes
    ----------
    order : int
        State dimension ``s = p + 1``.
    transition_coeffs : Tensor
        ``(s, s, s)``: ``C_k = N^k / k!`` so that ``A(x) = Σ_k x^k e^{−x} C_k``.
    noise_coeffs : Tensor
        ``(2s − 1, s, s)``: ``K_m`` so that ``Σ(x) = Σ_m P(m + 1, 2x) K_m``.
    stationary : Tensor
        ``(s, s)`` stationary covariance ``P∞ = Σ_m K_m`` (``P∞[0, 0] = 1``).
    stationary_inverse : Tensor
        ``(s, s)`` ``P∞⁻¹``.
    """

    order: int
    transition_coeffs: Tensor
    noise_coeffs: Tensor
    stationary: Tensor
    stationary_inverse: Tensor


@cache
def matern_state_space(nu: float) -> MaternStateSpace:
    """The constants of the Matérn ν SDE (module docstring); ν in :data:`SUPPORTED_NU`.

    Examples
    --------
    >>> matern_state_space(1.5).stationary
    tensor([[1., 0.],
            [0., 1.]], dtype=torch.float64)
    """
    p = _order(nu) - 1
    s = p + 1
    drift = torch.zeros(s, s, dtype=torch.float64)
    drift[torch.arange(s - 1), torch.arange(1, s)] = 1.0
    drift[s - 1] = -torch.tensor([math.comb(s, j) for j in range(s)], dtype=torch.float64)
    nilpotent = drift + torch.eye(s, dtype=torch.float64)
    powers = [torch.linalg.matrix_power(nilpotent, k) for k in range(s)]
    transition = torch.stack([powers[k] / math.factorial(k) for k in range(s)])
    a = [powers[j][:, s - 1] / math.factorial(j) for j in range(s)]
    q = math.factorial(p) ** 2 / math.factorial(2 * p) * 2 ** (2 * p + 1)
    noise = torch.zeros(2 * s - 1, s, s, dtype=torch.float64)
    for j in range(s):
        for k in range(s):
            noise[j + k] += torch.outer(a[j], a[k])
    scale = torch.tensor([q * math.factorial(m) / 2 ** (m + 1) for m in range(2 * s - 1)], dtype=torch.float64)
    noise = noise * scale[:, None, None]
    stationary = noise.sum(0)
    return MaternStateSpace(s, transition, noise, stationary, torch.linalg.inv(stationary))


def _order(nu) -> int:
    if nu not in SUPPORTED_NU:
        raise ValueError(f"nu must be one of {SUPPORTED_NU} (Matérn ν = p + 1/2 with a state space), got {nu!r}")
    return int(nu + 0.5)


# ---------------------------------------------------------------------------
# Incomplete gamma function and the transition / noise matrices
# ---------------------------------------------------------------------------


class _RegularizedGamma(torch.autograd.Function):
    r"""``P(m + 1, 2x)`` for ``m = 0 … M`` and ``x ≥ 0``, shape ``(M + 1, *x.shape)``.

    The top order ``P(M + 1, y)`` (``y = 2x``) is the series
    ``e^{−y} Σ_{i>M} y^i/i!`` summed by Horner's rule for ``y < 2``
    (``_SERIES_TERMS`` positive terms: no cancellation) and the closed form
    ``1 − e^{−y} Σ_{i≤M} y^i/i!`` for ``y ≥ 2`` (≥ 0.05 for ``M ≤ 4``: a few
    ulps). Lower orders follow by the downward recurrence
    ``P(m, y) = P(m + 1, y) + e^{−y} y^m/m!`` (positive terms, stable).
    Backward: ``∂P(m + 1, 2x)/∂x = 2 e^{−y} y^m/m!``. Saves ``x`` only.
    """

    @staticmethod
    def forward(ctx, x: Tensor, top: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.top = top
        y = 2 * x
        one = torch.ones_like(x)
        small = y.clamp(max=2.0)
        tail = one  # Σ_{i>M} y^i/i! = y^{M+1}/(M+1)! · (1 + y/(M+2)(1 + y/(M+3)(…)))
        for i in range(top + 1 + _SERIES_TERMS, top + 1, -1):
            tail = torch.addcmul(one, tail, small, value=1.0 / i)
        tail = tail * small.pow(top + 1) * (torch.exp(-small) / math.factorial(top + 1))
        big = y.clamp(min=2.0)
        partial, term = one, one
        for m in range(1, top + 1):
            term = term * big * (1.0 / m)
            partial = partial + term
        closed = torch.addcmul(one, torch.exp(-big), partial, value=-1.0)
        upper = torch.where(y < 2.0, tail, closed)
        weights = _gamma_weights(y, top)
        out = [upper]
        for m in range(top, 0, -1):
            out.append(out[-1] + weights[m])
        return torch.stack(out[::-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        weights = _gamma_weights(2 * x, ctx.top)
        total = grad[0] * weights[0]
        for m in range(1, ctx.top + 1):
            total = torch.addcmul(total, grad[m], weights[m])
        return 2 * total, None


def _gamma_weights(y: Tensor, top: int) -> list[Tensor]:
    """``e^{−y} y^m / m!`` for ``m = 0 … top``."""
    weights = [torch.exp(-y)]
    for m in range(1, top + 1):
        weights.append(weights[-1] * y * (1.0 / m))
    return weights


# The s × s matrices below are nested lists of (*batch, k) tensors, one per entry ("structure of
# arrays"): products of tiny matrices become a few long elementwise operations (a batched matmul of
# 10⁶ 3 × 3 blocks is ~10× slower on the CPU), and symmetric matrices share one tensor per pair.


def _entries(x: Tensor, nu: float) -> tuple[list, list]:
    """Entry lists of ``A(x)`` and ``Σ(x)`` (module docstring); zero coefficients are skipped."""
    space = matern_state_space(nu)
    s = space.order
    decay = torch.exp(-x)
    powers = [decay]
    for _ in range(1, s):
        powers.append(powers[-1] * x)
    gammas = _RegularizedGamma.apply(x, 2 * s - 2)
    C, K = space.transition_coeffs.tolist(), space.noise_coeffs.tolist()

    def combine(coeffs, basis, a, b):
        terms = [(c[a][b], v) for c, v in zip(coeffs, basis) if c[a][b] != 0]
        if not terms:
            return torch.zeros_like(x)
        out = terms[0][1] * terms[0][0]
        for c, v in terms[1:]:
            out = torch.add(out, v, alpha=c)
        return out

    A = [[combine(C, powers, a, b) for b in range(s)] for a in range(s)]
    S = [[None] * s for _ in range(s)]
    for a in range(s):
        for b in range(a, s):
            S[a][b] = S[b][a] = combine(K, gammas, a, b)
    return A, S


def _symmetric_inverse(S: list) -> list:
    """Closed-form inverse of a symmetric ``s × s`` entry list, ``s ≤ 3`` (cofactors; symmetric output).

    Under the diagonal scaling of the noise covariances (``Σ_{cc'} ~ x^{2s−1−c−c'}`` for small ``x``)
    every cofactor product scales alike, so the cancellation is bounded independently of ``x``.
    """
    s = len(S)
    if s == 1:
        return [[S[0][0].reciprocal()]]
    if s == 2:
        a, b, d = S[0][0], S[0][1], S[1][1]
        det = _cross(a, d, b, b)
        off = -b / det
        return [[d / det, off], [off, a / det]]
    a, b, c = S[0][0], S[0][1], S[0][2]
    d, e, f = S[1][1], S[1][2], S[2][2]
    c00, c01, c02 = _cross(d, f, e, e), _cross(c, e, b, f), _cross(b, e, c, d)
    c11, c12, c22 = _cross(a, f, c, c), _cross(b, c, a, e), _cross(a, d, b, b)
    det = _dot([a, b, c], [c00, c01, c02])
    i00, i01, i02, i11, i12, i22 = (v / det for v in (c00, c01, c02, c11, c12, c22))
    return [[i00, i01, i02], [i01, i11, i12], [i02, i12, i22]]


def _stack(entries: list) -> Tensor:
    """``(*batch, k, s, s)`` from an ``s × s`` entry list of ``(*batch, k)`` tensors."""
    return torch.stack([torch.stack(row, -1) for row in entries], -2)


def matern_transition_and_noise(scaled_gaps: Tensor, nu: float) -> tuple[Tensor, Tensor]:
    r"""Transition ``A(x)`` and process noise ``Σ(x)`` of the scaled Matérn state over gaps ``x = λΔ``.

    Parameters
    ----------
    scaled_gaps : Tensor
        ``(*batch, k)`` non-negative gaps ``λ Δ`` (any floating dtype, differentiable).
    nu : float
        0.5, 1.5 or 2.5.

    Returns
    -------
    (Tensor, Tensor)
        ``A`` and ``Σ``, each ``(*batch, k, s, s)``: ``z(t + Δ) = A z(t) + ε``,
        ``ε ~ N(0, Σ)``, for the state ``z_c = f^{(c)}/λ^c`` of a unit-variance
        Matérn process. ``A = e^{Fx}`` and ``Σ = P∞ − A P∞ Aᵀ`` (module
        docstring); ``Σ`` is accurate to a few ulps of ``√(Σ_aa Σ_bb)`` also
        for tiny ``x``, where the difference ``P∞ − A P∞ Aᵀ`` would cancel.

    Examples
    --------
    >>> import torch
    >>> A, S = matern_transition_and_noise(torch.tensor([0.5], dtype=torch.float64), 0.5)
    >>> bool(torch.allclose(A[0, 0, 0], torch.exp(torch.tensor(-0.5, dtype=torch.float64))))
    True
    >>> bool(torch.allclose(S[0, 0, 0], 1 - torch.exp(torch.tensor(-1.0, dtype=torch.float64))))
    True
    """
    A, S = _entries(scaled_gaps, nu)
    return _stack(A), _stack(S)


def _gap_blocks(x: Tensor, nu: float) -> tuple[list, list, list]:
    """Per-gap entry lists ``(L, Σ⁻¹, AᵀΣ⁻¹A)`` with ``L = −Σ⁻¹A``; the last two symmetric (shared tensors)."""
    A, S = _entries(x, nu)
    s = len(A)
    S_inv = _symmetric_inverse(S)
    M = [[_dot([S_inv[a][c] for c in range(s)], [A[c][b] for c in range(s)]) for b in range(s)] for a in range(s)]
    quad = [[None] * s for _ in range(s)]
    for a in range(s):
        for b in range(a, s):
            quad[a][b] = quad[b][a] = _dot([A[c][a] for c in range(s)], [M[c][b] for c in range(s)])
    return [[-v for v in row] for row in M], S_inv, quad


def _dot(u: list, v: list) -> Tensor:
    """``Σ_c u_c v_c`` of entry tensors (fused multiply-adds)."""
    out = u[0] * v[0]
    for a, b in zip(u[1:], v[1:]):
        out = torch.addcmul(out, a, b)
    return out


def _cross(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """``a·b − c·d``."""
    return torch.addcmul(a * b, c, d, value=-1.0)


def _assemble(x: Tensor, nu: float, p_inv: Tensor) -> Tensor:
    """CSR values of ``Q`` (layout of :func:`precision_pattern`) from the scaled gaps, ``(*batch, nnz)``.

    Node ``i``'s rows hold ``[L_{i−1}[a, :], D_i[a, :], L_i[:, a]]`` with
    ``D_i = Σ_{i−1}⁻¹ + A_iᵀΣ_i⁻¹A_i`` (``P∞⁻¹`` for ``i = 0``, no second term
    for ``i = n − 1``). The interior nodes are written by one stack of ``3s²``
    entry arrays (the structure-of-arrays to CSR transpose), the two end nodes
    separately.
    """
    lower, s_inv, quad = _gap_blocks(x, nu)
    s = len(lower)
    r = range(s)
    interior = []
    for a in r:
        interior += [lower[a][b][..., :-1] for b in r]
        interior += [s_inv[a][b][..., :-1] + quad[a][b][..., 1:] for b in r]
        interior += [lower[b][a][..., 1:] for b in r]
    p = p_inv.tolist()
    first, last = [], []
    for a in r:
        first += [p[a][b] + quad[a][b][..., 0] for b in r] + [lower[b][a][..., 0] for b in r]
        last += [lower[a][b][..., -1] for b in r] + [s_inv[a][b][..., -1] for b in r]
    parts = [torch.stack(first, -1), torch.stack(interior, -1).flatten(-2), torch.stack(last, -1)]
    return torch.cat(parts, -1)


def _gap_gradients(grad: Tensor, n: int, s: int) -> list[Tensor]:
    """The adjoint of :func:`_assemble`'s arrangement: gradients of the entries of ``(L, Σ⁻¹, AᵀΣ⁻¹A)``.

    Returns the flat list ``[gL_ab for a, b] + [gΣ⁻¹_ab for a ≤ b] + [gQ_ab for a ≤ b]`` of
    ``(*batch, n − 1)`` tensors; a symmetric entry collects both of its positions. One transpose of
    the interior rows (``(n − 2, s, 3s)`` to ``(s, 3s, n − 2)``) and ``O(n)`` concatenations.
    """
    w = 2 * s * s
    first = grad[..., :w].unflatten(-1, (s, 2 * s))  # node 0: [D, U]
    last = grad[..., grad.shape[-1] - w :].unflatten(-1, (s, 2 * s))  # node n − 1: [L, D]
    g = grad[..., w : grad.shape[-1] - w].unflatten(-1, (n - 2, s, 3 * s)).movedim(-3, -1).contiguous()
    r = range(s)

    def with_ends(head, middle, tail):
        parts = [v.unsqueeze(-1) for v in (head,) if v is not None] + [middle]
        return torch.cat(parts + [v.unsqueeze(-1) for v in (tail,) if v is not None], -1)

    # L_k[a, b] sits at node k + 1 (row a, block L) and transposed at node k (row b, block U).
    lower = [
        with_ends(None, g[..., a, b, :], last[..., a, b])
        + with_ends(first[..., b, s + a], g[..., b, 2 * s + a, :], None)
        for a in r
        for b in r
    ]
    pairs = [(a, b) for a in r for b in r if a <= b]

    def diag(a, b):  # gradient of D_i[a, b] at every node i = 0 … n − 1
        return with_ends(first[..., a, b], g[..., a, s + b, :], last[..., a, s + b])

    sym = [diag(a, b) if a == b else diag(a, b) + diag(b, a) for a, b in pairs]
    return lower + [v[..., 1:] for v in sym] + [v[..., :-1] for v in sym]


class _PrecisionValues(torch.autograd.Function):
    """CSR values of ``Q`` from the scaled gaps ``x`` ``(*batch, n − 1)``.

    The forward builds the blocks without a graph and saves only ``x``; the
    backward recomputes the entry arrays under autograd and pulls the
    gradient of the values (rearranged by :func:`_gap_gradients`) back to
    ``x``: memory between forward and backward is ``O(n)``, not ``O(nnz)``
    per intermediate.
    """

    @staticmethod
    def forward(ctx, x: Tensor, nu: float, p_inv: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        ctx.nu = nu
        return _assemble(x, nu, p_inv)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        s = _order(ctx.nu)
        grads = _gap_gradients(grad, x.shape[-1] + 1, s)
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            lower, s_inv, quad = _gap_blocks(leaf, ctx.nu)
            pairs = [(a, b) for a in range(s) for b in range(s) if a <= b]
            outputs = [v for row in lower for v in row] + [s_inv[a][b] for a, b in pairs]
            outputs += [quad[a][b] for a, b in pairs]
            (grad_x,) = torch.autograd.grad(outputs, leaf, grads)
        return grad_x, None, None


# ---------------------------------------------------------------------------
# The precision matrix
# ---------------------------------------------------------------------------


def precision_pattern(num_nodes: int, order: int, device=None) -> SparsityPattern:
    """Symmetric block-tridiagonal pattern of ``num_nodes`` nodes with ``order × order`` blocks.

    Row ``i·s + a`` stores the contiguous columns of the blocks ``i − 1, i, i + 1``
    (those that exist); built directly in CSR order, ``O(nnz)``, no sort.

    Examples
    --------
    >>> precision_pattern(3, 2)
    SparsityPattern(size=(6, 6), nnz=28, device=cpu, symmetric)
    """
    n, s = int(num_nodes), int(order)
    node = torch.arange(n * s, device=device) // s
    first = (node - 1).clamp(min=0) * s
    counts = ((node + 1).clamp(max=n - 1) + 1) * s - first
    crow = torch.zeros(n * s + 1, dtype=torch.long, device=device)
    torch.cumsum(counts, 0, out=crow[1:])
    within = torch.arange(int(crow[-1]), device=device) - torch.repeat_interleave(crow[:-1], counts)
    col = torch.repeat_interleave(first, counts) + within
    return SparsityPattern(crow, col, (n * s, n * s), symmetric=True)


def matern_precision(
    times: Tensor, rate: Tensor, nu: float, *, pattern: SparsityPattern | None = None
) -> SparseLinearOperator:
    r"""Exact precision of the scaled Matérn state at sorted distinct ``times``.

    Parameters
    ----------
    times : Tensor
        ``(n,)`` strictly increasing node positions (differentiable).
    rate : Tensor
        ``(*batch,)`` positive ``λ = √(2ν)/ℓ`` (differentiable).
    nu : float
        0.5, 1.5 or 2.5.
    pattern : SparsityPattern, optional
        ``precision_pattern(n, s)`` to reuse (cached by the kernel).

    Returns
    -------
    SparseLinearOperator
        ``(*batch, n·s, n·s)`` symmetric block-tridiagonal ``Q`` (module
        docstring); ``(Q⁻¹)[i·s, j·s] = k_ν(|t_i − t_j|)``, the unit-variance
        Matérn covariance. Half-bandwidth ``2s − 1``. Values in the promoted
        dtype of ``times`` and ``rate``.

    Complexity
    ----------
    ``O(n·s³)`` time, vectorised over nodes and batch (elementwise
    operations on ``(*batch, n)`` tensors); the backward recomputes the
    blocks and keeps ``O(n)`` memory between the passes.

    Examples
    --------
    >>> import torch
    >>> t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    >>> Q = matern_precision(t, torch.tensor(1.0, dtype=torch.float64), 0.5)
    >>> C = torch.linalg.inv(Q.to_dense())
    >>> bool(torch.allclose(C, torch.exp(-(t[:, None] - t).abs())))
    True
    """
    space = matern_state_space(nu)
    s = space.order
    n = times.shape[-1]
    if times.dim() != 1 or n == 0:
        raise ValueError(f"times must be a non-empty 1-D tensor, got shape {tuple(times.shape)}")
    dtype = torch.promote_types(times.dtype, rate.dtype)
    rate = rate.to(dtype)
    if pattern is None:
        pattern = precision_pattern(n, s, device=times.device)
    if pattern.size != (n * s, n * s):
        raise ValueError(f"pattern of size {pattern.size} does not fit {n} nodes of order {s}")
    p_inv = space.stationary_inverse.to(device=times.device, dtype=dtype)
    if n == 1:
        return SparseLinearOperator(p_inv.reshape(-1).expand(*rate.shape, s * s), pattern=pattern)
    times = times.to(dtype)
    scaled = rate[..., None] * (times[1:] - times[:-1])  # (*batch, n − 1)
    return SparseLinearOperator(_PrecisionValues.apply(scaled, float(nu), p_inv), pattern=pattern)


def matern_covariance(scaled_distance: Tensor, nu: float) -> Tensor:
    """The unit-variance Matérn ν covariance of scaled distances ``λ|t − t'|`` (elementwise)."""
    _order(nu)
    d = scaled_distance
    if nu == 0.5:
        poly = torch.ones_like(d)
    elif nu == 1.5:
        poly = 1 + d
    else:
        poly = 1 + d + d * d / 3
    return poly * torch.exp(-d)


# ---------------------------------------------------------------------------
# The GPyTorch kernel
# ---------------------------------------------------------------------------


@dataclass
class _NodeEntry:
    """Sorting/merging of one pair of inputs into latent nodes, with the patterns built for them."""

    x1: Tensor  # detached copies of the inputs (x2 None when symmetric)
    x2: Tensor | None
    x1_ref: weakref.ref
    x2_ref: weakref.ref | None
    x1_version: int
    x2_version: int
    representative: Tensor  # (n,) position of each sorted node's first input in cat(x1, x2) (flattened member)
    precision: SparsityPattern  # precision_pattern(n, s)
    select1: SparsityPattern  # (m1, n·s) selection of the f component of each x1 row's node
    select2: SparsityPattern | None
    min_gap: float  # smallest distance between distinct nodes (inf for one node)
    warned_rate: float = math.inf  # smallest λ already warned about (warn once per entry and regime)


class MarkovMaternKernel(SparsePrecisionKernel):
    r"""Matérn ν ∈ {1/2, 3/2, 5/2} on 1-D inputs through its exact sparse (Markov) precision.

    .. math::
        k(t, t') = \phi_\nu(λ|t − t'|), \quad λ = \sqrt{2ν}/ℓ, \quad
        \phi_{1/2}(d) = e^{−d},\ \phi_{3/2}(d) = (1 + d)e^{−d},\
        \phi_{5/2}(d) = (1 + d + d²/3)e^{−d}

    — the same covariance as ``gpytorch.kernels.MaternKernel(nu)`` (unit
    variance; wrap in ``ScaleKernel``). ``forward`` sorts the inputs, merges
    equal ones into one latent node and returns
    ``SparsePrecisionLinearOperator(Q, interp=W₁, right_interp=W₂)`` with the
    block-tridiagonal state precision ``Q`` of :func:`matern_precision` and
    selections ``W`` of the first state component (several rows of ``W`` hit
    the same node for duplicate inputs). For ``k(x1, x2)`` with different
    inputs the nodes are those of ``cat(x1, x2)``. The half-bandwidth of ``Q``
    (and of the posterior precision ``Q + WᵀD⁻¹W``) is ``2s − 1 ≤ 5``, within
    gpsparse's exact banded path (``max_banded_bandwidth = 6``): marginal
    likelihood, gradients and predictions are exact (no probes, no CG) in
    ``O(n)`` time and memory.

    Parameters
    ----------
    nu : float
        0.5, 1.5 or 2.5 (default 2.5, as GPyTorch).
    pattern_cache_size : int
        Node structures kept (default 3: training inputs, and the test–train
        and test–test pairs of a prediction).
    **kwargs
        As :class:`gpytorch.kernels.MaternKernel`: ``lengthscale_prior``,
        ``lengthscale_constraint`` (default ``Positive()``), ``batch_shape``,
        ``active_dims`` (to pick one column of multi-dimensional inputs),
        ``ard_num_dims`` (must be 1 or None).

    Notes
    -----
    *Cache.* Sorting, merging, the precision pattern and the selections
    depend only on the inputs; they are reused while the inputs are the same
    (identity and in-place version, else ``torch.equal`` against a stored
    copy), ``num_node_builds`` counts rebuilds. The values of ``Q`` are
    recomputed at every call, differentiably in ``ℓ`` and in the inputs
    (through the gaps between nodes; a duplicate input receives no gradient).

    *diag=True* returns ``φ_ν(λ|x1_i − x2_i|)``, exactly 1 for equal inputs.

    *Batches.* A batched lengthscale (``batch_shape``) gives batched values on
    one pattern. Batched inputs must be equal across the batch (e.g.
    expanded); members with different inputs raise ``NotImplementedError``
    (they would need one selection ``W`` per member).

    *Accuracy.* Exact to rounding for ν = 1/2 at any spacing. For ν ≥ 3/2 a
    float64 Cholesky of the precision loses about ``(2s − 1)·log10(1/(λΔ))``
    digits at the smallest gap ``Δ`` between distinct inputs (the Markov
    chain is nearly deterministic over short gaps; measured with entries
    computed to 40 digits, so it is the factorisation, not the entries).
    Relative error of ``yᵀK⁻¹y + log det K`` for one close pair (scaled gap
    ``λΔ``) among 120 well-separated points (float64,
    ``test_accuracy_versus_gap``):

    ========  ======  ======  ======  ======  ======  ======
    λΔ        0.3     0.1     0.03    0.01    1e-3    1e-4
    ========  ======  ======  ======  ======  ======  ======
    ν = 3/2   <1e-15  5e-14   6e-14   1e-10   9e-8    1e-4
    ν = 5/2   8e-12   3e-9    8e-7    6e-4    ~1      fails
    ========  ======  ======  ======  ======  ======  ======

    Many close pairs add up; predictions at test points close to training
    points suffer alike (the joint nodes then have the small gap). A
    :class:`CloseInputsWarning` is issued once per input set when ``λΔ_min``
    is below 1e-3 (ν = 3/2) or 0.1 (ν = 5/2); round or merge near-duplicate
    inputs, or use ν = 1/2 (or 3/2) there. GPyTorch's dense ``MaternKernel``
    computes distances as ``√(x² + x'² − 2xx')``, itself only accurate to
    ``~1e-8·|x|`` for close pairs.

    Raises
    ------
    ValueError
        ``nu`` not supported; inputs not of shape ``(..., n, 1)``; NaN or Inf
        inputs; empty inputs; ``ard_num_dims`` other than 1.
    NotImplementedError
        Batched inputs that differ between batch members;
        ``last_dim_is_batch=True``.

    Examples
    --------
    >>> import torch, gpytorch
    >>> from gpsparse.kernels.markov import MarkovMaternKernel
    >>> kernel = gpytorch.kernels.ScaleKernel(MarkovMaternKernel(nu=1.5)).double()
    >>> x = torch.randperm(1000).double()[:, None] / 10   # any order; λ·Δ ≥ 0.17 here
    >>> K = kernel(x).evaluate_kernel()       # W Q⁻¹ Wᵀ with a banded Q (2000 × 2000 state precision)
    >>> K.Q.shape, type(K).__name__
    (torch.Size([2000, 2000]), 'SparsePrecisionLinearOperator')
    """

    has_lengthscale = True
    is_stationary = True

    def __init__(self, nu: float = 2.5, *, pattern_cache_size: int = 3, **kwargs):
        _order(nu)
        ard = kwargs.get("ard_num_dims")
        if ard is not None and int(ard) != 1:
            raise ValueError(
                f"MarkovMaternKernel works on 1-D inputs only; got ard_num_dims={ard} "
                "(use active_dims to select one input column)"
            )
        if int(pattern_cache_size) < 1:
            raise ValueError(f"pattern_cache_size must be a positive integer, got {pattern_cache_size}")
        super().__init__(**kwargs)
        self.nu = float(nu)
        self.pattern_cache_size = int(pattern_cache_size)
        self._node_cache: list[_NodeEntry] = []
        self.num_node_builds = 0

    @property
    def rate(self) -> Tensor:
        """``λ = √(2ν)/ℓ``, shape ``(*batch_shape,)``."""
        return math.sqrt(2 * self.nu) / self.lengthscale[..., 0, 0]

    # ----------------------------------------------------------- forward
    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch:
            raise NotImplementedError(
                "MarkovMaternKernel does not support last_dim_is_batch (deprecated in GPyTorch); "
                "use one kernel per input dimension with active_dims instead"
            )
        self._check_inputs(x1, x2)
        rate = self.rate
        if diag:
            distance = (x1 - x2).abs()[..., 0]
            return matern_covariance(rate[..., None] * distance, self.nu)
        symmetric = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        entry = self._node_entry(x1, x2, symmetric)
        self._warn_if_close(entry, rate)
        flat = _member(x1)[:, 0] if symmetric else torch.cat([_member(x1)[:, 0], _member(x2)[:, 0]])
        times = flat[entry.representative]
        Q = matern_precision(times, rate, self.nu, pattern=entry.precision)
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], Q.batch_shape)
        if batch != Q.batch_shape:
            Q = Q._expand_batch(batch)
        w1 = _selection(entry.select1, Q)
        w2 = None if symmetric else _selection(entry.select2, Q)
        return SparsePrecisionLinearOperator(Q, interp=w1, right_interp=w2)

    def _check_inputs(self, x1: Tensor, x2: Tensor) -> None:
        for name, x in (("x1", x1), ("x2", x2)):
            if x.dim() < 2 or x.shape[-1] != 1:
                raise ValueError(
                    f"MarkovMaternKernel needs 1-D inputs of shape (..., n, 1), got {name} of shape "
                    f"{tuple(x.shape)} (use active_dims to select one column)"
                )
            if x.shape[-2] == 0:
                raise ValueError(f"MarkovMaternKernel needs at least one input point, got an empty {name}")
            if not bool(torch.isfinite(x.detach()).all()):
                bad = "NaN" if bool(torch.isnan(x.detach()).any()) else "Inf"
                raise ValueError(f"MarkovMaternKernel inputs contain {bad} ({name})")
        check_batch_shapes(x1, x2, self.batch_shape)

    def _warn_if_close(self, entry: _NodeEntry, rate: Tensor) -> None:
        """One :class:`CloseInputsWarning` per input set, repeated only when ``λ`` has dropped 10× since."""
        limit = _WARN_GAP[self.nu]
        smallest = float(rate.detach().min()) if rate.numel() else math.inf
        scaled = entry.min_gap * smallest
        if scaled < limit and smallest < entry.warned_rate / 10:
            entry.warned_rate = smallest
            warnings.warn(
                f"MarkovMaternKernel(nu={self.nu}): the closest distinct inputs are λ·Δ = {scaled:.2e} apart "
                f"(below {limit:g}); the float64 banded precision loses about "
                f"{(2 * _order(self.nu) - 1) * math.log10(1 / scaled):.0f} digits there. Round or merge "
                "near-duplicate inputs, or use nu=0.5 (see the class notes)",
                CloseInputsWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------ cache
    def _node_entry(self, x1: Tensor, x2: Tensor, symmetric: bool) -> _NodeEntry:
        other = None if symmetric else x2
        for k, entry in enumerate(self._node_cache):
            if (other is None) != (entry.x2 is None):
                continue
            if not same_input(entry.x1_ref, entry.x1_version, entry.x1, x1):
                continue
            if other is not None and not same_input(entry.x2_ref, entry.x2_version, entry.x2, other):
                continue
            self._node_cache.insert(0, self._node_cache.pop(k))
            return entry
        entry = self._build_entry(x1, other)
        self._node_cache.insert(0, entry)
        del self._node_cache[self.pattern_cache_size :]
        return entry

    def _build_entry(self, x1: Tensor, x2: Tensor | None) -> _NodeEntry:
        self.num_node_builds += 1
        s = _order(self.nu)
        first = _member(x1.detach())[:, 0]
        flat = first if x2 is None else torch.cat([first, _member(x2.detach())[:, 0]])
        unique, node = torch.unique(flat, sorted=True, return_inverse=True)
        n = unique.numel()
        positions = torch.arange(flat.numel(), device=flat.device)
        representative = torch.full((n,), flat.numel(), dtype=torch.long, device=flat.device)
        representative = representative.scatter_reduce(0, node, positions, reduce="amin")
        m1 = first.numel()
        min_gap = float((unique[1:] - unique[:-1]).min()) if n > 1 else math.inf
        return _NodeEntry(
            x1=x1.detach().clone(),
            x2=None if x2 is None else x2.detach().clone(),
            x1_ref=weakref.ref(x1),
            x2_ref=None if x2 is None else weakref.ref(x2),
            x1_version=input_version(x1),
            x2_version=-1 if x2 is None else input_version(x2),
            representative=representative,
            precision=precision_pattern(n, s, device=flat.device),
            select1=_selection_pattern(node[:m1], s, n),
            select2=None if x2 is None else _selection_pattern(node[m1:], s, n),
            min_gap=min_gap,
        )

    def clear_node_cache(self) -> None:
        """Drop every cached node structure (the next call rebuilds)."""
        self._node_cache.clear()

    def __getstate__(self):
        # Pickles and deep copies start with an empty cache (weak references, index tensors).
        state = dict(super().__getstate__())
        state["_node_cache"] = []
        return state


def _member(x: Tensor) -> Tensor:
    """The ``(n, 1)`` inputs shared by every batch member of ``(*batch, n, 1)``; raises if they differ."""
    if x.dim() == 2:
        return x
    flat = x.reshape(-1, *x.shape[-2:])
    if flat.shape[0] > 1 and not torch.equal(flat, flat[:1].expand_as(flat)):
        raise NotImplementedError(
            "MarkovMaternKernel: batched inputs that differ between batch members are not supported (each "
            "member would need its own node ordering and selection W); use one model per member or equal inputs"
        )
    return flat[0]


def _selection_pattern(node: Tensor, order: int, num_nodes: int) -> SparsityPattern:
    """``(m, n·s)`` pattern with one entry per row, at the first state component of the row's node."""
    m = node.numel()
    crow = torch.arange(m + 1, device=node.device)
    return SparsityPattern(crow, node * order, (m, num_nodes * order))


def _selection(pattern: SparsityPattern, Q: SparseLinearOperator) -> SparseLinearOperator:
    return SparseLinearOperator(torch.ones(pattern.nnz, dtype=Q.dtype, device=Q.device), pattern=pattern)
