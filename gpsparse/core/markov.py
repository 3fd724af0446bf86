r"""Numerics of the Matérn ν = 1/2, 3/2, 5/2 state-space model: exact block-tridiagonal precisions.

A Matérn process with ν = p + ½ is the first component of a linear SDE whose
state is ``s = p + 1`` derivatives (Hartikainen & Särkkä, 2010). On sorted
nodes ``t_0 < … < t_{n−1}`` the states form a Markov chain, so their joint
precision is block tridiagonal (``s × s`` blocks, half-bandwidth ``2s − 1 ≤ 5``)
and the covariance of the observations is ``W Q⁻¹ Wᵀ`` with ``W`` selecting
the first state component — the exact Matérn covariance, never formed.
gpsparse's banded Cholesky (``gpsparse.core.banded``) then gives exact
log-determinants, solves and gradients in ``O(n)``.

This module is the core (DESIGN.md §1: plain tensors, no GPyTorch, no
Function subclasses): the state-space constants (``matern_state_space``),
the regularised incomplete gamma function and its derivative, the entries of
the transitions and noise covariances, the CSR values of the precision and
their adjoint (``assemble_precision_values``,
``precision_values_vjp``), the pattern (``precision_pattern``) and
the covariance (``matern_covariance``). The Function classes pairing
them are in ``gpsparse.autograd.markov``; the GPyTorch kernel
``MarkovMaternKernel`` and ``matern_precision`` (the precision as a
``SparseLinearOperator``) in ``gpsparse.kernels.markov``.

Mathematics
-----------
With ``λ = √(2ν)/ℓ`` and the state scaled to ``z_c = f^{(c)}/λ^c``, every matrix
depends on the scaled gap ``x = λΔ`` only. The drift is the companion matrix
``F`` of ``(u + 1)^s`` and ``N = F + I`` is nilpotent, so the transition is

$$
A(x) = e^{Fx} = e^{-x} \sum_{k<s} N^k x^k / k!,
$$

and with ``e^{Fu} e_s = e^{-u} Σ_j a_j u^j`` (``a_j = N^j e_s / j!``) and the
white-noise intensity ``q = (p!)²/(2p)! · 2^{2p+1}`` (unit variance) the
process noise is

$$
Σ(x) = q \int_0^x e^{Fu} e_s e_s^T e^{F^T u} du
= \sum_{m=0}^{2p} P(m + 1, 2x)\, K_m, \qquad
K_m = q \frac{m!}{2^{m+1}} \sum_{j+k=m} a_j a_k^T,
$$

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
``gpsparse.kernels.markov.MarkovMaternKernel`` for the measured errors and the warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from gpsparse.core.pattern import SparsityPattern

__all__ = [
    "SUPPORTED_NU",
    "MaternStateSpace",
    "matern_state_space",
    "matern_order",
    "regularized_gamma",
    "regularized_gamma_weights",
    "regularized_gamma_vjp",
    "transition_and_noise_entries",
    "stack_entries",
    "symmetric_inverse",
    "gap_blocks",
    "assemble_precision_values",
    "gap_gradients",
    "precision_values_vjp",
    "precision_pattern",
    "matern_covariance",
]

#: The smoothness parameters with a finite-dimensional state-space form handled here.
SUPPORTED_NU = (0.5, 1.5, 2.5)

#: Terms of the incomplete-gamma series beyond the first (for 2x < 2 the tail is < 1e-18 relative).
_SERIES_TERMS = 26

#: ``(x, top) -> (top + 1, *x.shape)`` tensor of ``P(m + 1, 2x)``: ``regularized_gamma`` or a
#: differentiable stand-in with a custom backward (``gpsparse.autograd.markov.regularized_gamma``).
GammaFn = Callable[[Tensor, int], Tensor]

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
    """The constants of the Matérn ν SDE (module docstring); ν in ``SUPPORTED_NU``.

    Examples
    --------
    >>> matern_state_space(1.5).stationary
    tensor([[1., 0.],
            [0., 1.]], dtype=torch.float64)
    """
    p = matern_order(nu) - 1
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


def matern_order(nu) -> int:
    """State dimension ``s = p + 1`` of Matérn ν = p + ½; ``ValueError`` unless ν is in ``SUPPORTED_NU``."""
    if nu not in SUPPORTED_NU:
        raise ValueError(f"nu must be one of {SUPPORTED_NU} (Matérn ν = p + 1/2 with a state space), got {nu!r}")
    return int(nu + 0.5)


# ---------------------------------------------------------------------------
# Incomplete gamma function
# ---------------------------------------------------------------------------


def regularized_gamma(x: Tensor, top: int) -> Tensor:
    r"""``P(m + 1, 2x)`` for ``m = 0 … top`` and ``x ≥ 0``, shape ``(top + 1, *x.shape)``.

    The top order ``P(M + 1, y)`` (``y = 2x``, ``M = top``) is the series
    ``e^{−y} Σ_{i>M} y^i/i!`` summed by Horner's rule for ``y < 2``
    (``_SERIES_TERMS`` positive terms: no cancellation) and the closed form
    ``1 − e^{−y} Σ_{i≤M} y^i/i!`` for ``y ≥ 2`` (≥ 0.05 for ``M ≤ 4``: a few
    ulps). Lower orders follow by the downward recurrence
    ``P(m, y) = P(m + 1, y) + e^{−y} y^m/m!`` (positive terms, stable).

    Differentiable under plain autograd (the oracle of the custom backward in
    ``gpsparse.autograd.markov``, whose gradient is
    ``regularized_gamma_vjp``).

    Examples
    --------
    >>> import torch
    >>> P = regularized_gamma(torch.tensor([0.5], dtype=torch.float64), 0)   # P(1, y) = 1 − e^{−y}
    >>> bool(torch.allclose(P[0], 1 - torch.exp(torch.tensor([-1.0], dtype=torch.float64))))
    True
    """
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
    weights = regularized_gamma_weights(y, top)
    out = [upper]
    for m in range(top, 0, -1):
        out.append(out[-1] + weights[m])
    return torch.stack(out[::-1])


def regularized_gamma_weights(y: Tensor, top: int) -> list[Tensor]:
    """``e^{−y} y^m / m!`` for ``m = 0 … top``."""
    weights = [torch.exp(-y)]
    for m in range(1, top + 1):
        weights.append(weights[-1] * y * (1.0 / m))
    return weights


def regularized_gamma_vjp(x: Tensor, top: int, grad: Tensor) -> Tensor:
    """``Σ_m grad[m] · ∂P(m + 1, 2x)/∂x`` with ``∂P(m + 1, 2x)/∂x = 2 e^{−2x} (2x)^m/m!``; shape of ``x``."""
    weights = regularized_gamma_weights(2 * x, top)
    total = grad[0] * weights[0]
    for m in range(1, top + 1):
        total = torch.addcmul(total, grad[m], weights[m])
    return 2 * total


# ---------------------------------------------------------------------------
# The transition / noise matrices and the CSR values of the precision
# ---------------------------------------------------------------------------


# The s × s matrices below are nested lists of (*batch, k) tensors, one per entry ("structure of
# arrays"): products of tiny matrices become a few long elementwise operations (a batched matmul of
# 10⁶ 3 × 3 blocks is ~10× slower on the CPU), and symmetric matrices share one tensor per pair.


def transition_and_noise_entries(x: Tensor, nu: float, *, gamma: GammaFn = regularized_gamma) -> tuple[list, list]:
    """Entry lists of ``A(x)`` and ``Σ(x)`` (module docstring) of the scaled gaps ``x``; zero coefficients skipped.

    ``gamma`` evaluates ``P(m + 1, 2x)`` (default ``regularized_gamma``; the autograd layer passes
    one with a custom backward). Stack the lists with ``stack_entries``.
    """
    space = matern_state_space(nu)
    s = space.order
    decay = torch.exp(-x)
    powers = [decay]
    for _ in range(1, s):
        powers.append(powers[-1] * x)
    gammas = gamma(x, 2 * s - 2)
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


def symmetric_inverse(S: list) -> list:
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


def stack_entries(entries: list) -> Tensor:
    """``(*batch, k, s, s)`` from an ``s × s`` entry list of ``(*batch, k)`` tensors."""
    return torch.stack([torch.stack(row, -1) for row in entries], -2)


def gap_blocks(x: Tensor, nu: float, *, gamma: GammaFn = regularized_gamma) -> tuple[list, list, list]:
    """Per-gap entry lists ``(L, Σ⁻¹, AᵀΣ⁻¹A)`` with ``L = −Σ⁻¹A``; the last two symmetric (shared tensors)."""
    A, S = transition_and_noise_entries(x, nu, gamma=gamma)
    s = len(A)
    S_inv = symmetric_inverse(S)
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


def assemble_precision_values(x: Tensor, nu: float, p_inv: Tensor) -> Tensor:
    """CSR values of ``Q`` (layout of ``precision_pattern``) from the scaled gaps, ``(*batch, nnz)``.

    Node ``i``'s rows hold ``[L_{i−1}[a, :], D_i[a, :], L_i[:, a]]`` with
    ``D_i = Σ_{i−1}⁻¹ + A_iᵀΣ_i⁻¹A_i`` (``P∞⁻¹`` for ``i = 0``, no second term
    for ``i = n − 1``). The interior nodes are written by one stack of ``3s²``
    entry arrays (the structure-of-arrays to CSR transpose), the two end nodes
    separately. Forward only (no custom gradient needed here: under plain
    autograd it is the oracle of ``precision_values_vjp``).
    """
    lower, s_inv, quad = gap_blocks(x, nu)
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


def gap_gradients(grad: Tensor, n: int, s: int) -> list[Tensor]:
    """The adjoint of ``assemble_precision_values``'s arrangement: gradients of the entries of ``(L, Σ⁻¹, AᵀΣ⁻¹A)``.

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


def precision_values_vjp(x: Tensor, nu: float, grad: Tensor, *, gamma: GammaFn = regularized_gamma) -> Tensor:
    """The gradient with respect to the scaled gaps ``x`` ``(*batch, n − 1)`` of ``⟨grad, values(x)⟩``.

    ``values`` is ``assemble_precision_values`` and ``grad`` ``(*batch, nnz)`` the upstream
    gradient. The blocks are recomputed under autograd (with ``gamma``, e.g. one with a custom
    backward) and the gradient of the values, rearranged by ``gap_gradients``, pulled back to
    ``x``: nothing of size ``O(nnz)`` per intermediate need be kept between a forward and this.
    """
    s = matern_order(nu)
    grads = gap_gradients(grad, x.shape[-1] + 1, s)
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        lower, s_inv, quad = gap_blocks(leaf, nu, gamma=gamma)
        pairs = [(a, b) for a in range(s) for b in range(s) if a <= b]
        outputs = [v for row in lower for v in row] + [s_inv[a][b] for a, b in pairs]
        outputs += [quad[a][b] for a, b in pairs]
        (grad_x,) = torch.autograd.grad(outputs, leaf, grads)
    return grad_x


# ---------------------------------------------------------------------------
# The precision pattern and the covariance
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


def matern_covariance(scaled_distance: Tensor, nu: float) -> Tensor:
    """The unit-variance Matérn ν covariance of scaled distances ``λ|t − t'|`` (elementwise).

    Examples
    --------
    >>> import torch
    >>> matern_covariance(torch.tensor([0.0, 1.0], dtype=torch.float64), 0.5)
    tensor([1.0000, 0.3679], dtype=torch.float64)
    """
    matern_order(nu)
    d = scaled_distance
    if nu == 0.5:
        poly = torch.ones_like(d)
    elif nu == 1.5:
        poly = 1 + d
    else:
        poly = 1 + d + d * d / 3
    return poly * torch.exp(-d)
