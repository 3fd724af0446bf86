"""Issue 11, item 7: the SLQ (Lanczos-adjoint) gradient once Lanczos has converged.

Matrix: ``Q = (0.1 I + L)²`` with ``L`` the graph Laplacian of the 12 × 12 grid
(``n = 144``, 65 distinct eigenvalues, condition number ≈ 6·10³), 4 fixed
Rademacher probes. Reference: the exact gradient of ``(1/m) Σ zᵀ log(Q) z``,
``(1/m) Σ dlog(Q)*[z zᵀ]`` by Daleckii–Krein on a float64 ``eigh`` (autograd
through ``eigh`` is NaN here: the lattice has repeated eigenvalues).
"""

import pytest
import torch

import gpsparse

DTYPE = torch.float64


def _lattice_matrix(side: int = 12):
    n = side * side
    lap = torch.zeros(n, n, dtype=DTYPE)
    for i in range(side):
        for j in range(side):
            a = i * side + j
            for di, dj in ((1, 0), (0, 1)):
                if i + di < side and j + dj < side:
                    b = (i + di) * side + j + dj
                    lap[a, b] -= 1
                    lap[b, a] -= 1
                    lap[a, a] += 1
                    lap[b, b] += 1
    shifted = 0.1 * torch.eye(n, dtype=DTYPE) + lap
    return (shifted @ shifted).to_sparse_coo().coalesce()


@pytest.fixture(scope="module")
def problem():
    S = _lattice_matrix()
    n = S.shape[0]
    gen = torch.Generator().manual_seed(0)
    probes = (torch.randint(0, 2, (n, 4), generator=gen) * 2 - 1).to(DTYPE)
    return S.indices(), S.values(), probes, n


def _exact(indices, values, probes, n):
    A = torch.sparse_coo_tensor(indices, values, (n, n)).to_dense()
    e, U = torch.linalg.eigh(A)
    f = e.log()
    diff = e[:, None] - e[None, :]
    close = diff.abs() <= 1e-12 * e.max()
    loewner = torch.where(
        close, 2.0 / (e[:, None] + e[None, :]), (f[:, None] - f[None, :]) / torch.where(close, 1.0, diff)
    )
    W = U.T @ probes
    m = probes.shape[1]
    value = (W * (f[:, None] * W)).sum() / m
    G = U @ (loewner * (W @ W.T)) @ U.T / m
    return value, G[indices[0], indices[1]]


def _estimate(indices, values, probes, n, K, reorthogonalize):
    A = torch.sparse_coo_tensor(indices, values, (n, n))
    return gpsparse.logdet(
        A, probes=probes, num_lanczos=K, preconditioner=None, reorthogonalize=reorthogonalize, road="krylov"
    )


def _gradient(indices, values, probes, n, K, reorthogonalize):
    v = values.clone().requires_grad_(True)
    est = _estimate(indices, v, probes, n, K, reorthogonalize)
    (grad,) = torch.autograd.grad(est, v)
    return est.detach(), grad


@pytest.mark.parametrize("K, reorthogonalize", [(150, False), (150, True), (144, True), (80, True)])
def test_converged_gradient_equals_quadratic_form_gradient(problem, K, reorthogonalize):
    indices, values, probes, n = problem
    value, reference = _exact(indices, values, probes, n)
    est, grad = _gradient(indices, values, probes, n, K, reorthogonalize)
    assert torch.isfinite(grad).all()
    assert abs(float(est - value)) <= 1e-9 * abs(float(value))
    assert float((grad - reference).norm() / reference.norm()) <= 1e-8


def _directional_fd(indices, values, probes, n, K, direction, h=1e-6):
    plus = _estimate(indices, values + h * direction, probes, n, K, True)
    minus = _estimate(indices, values - h * direction, probes, n, K, True)
    return float((plus - minus) / (2 * h))


def _symmetric_direction(indices, n, seed):
    gen = torch.Generator().manual_seed(seed)
    D = torch.zeros(n, n, dtype=DTYPE)
    D[indices[0], indices[1]] = torch.randn(indices.shape[1], generator=gen, dtype=DTYPE)
    D = (D + D.T) / 2
    return D[indices[0], indices[1]]


@pytest.mark.parametrize("K", [10, 20, 30])
def test_unconverged_gradient_matches_finite_differences(problem, K):
    """Unconverged K (no Ritz pair converged to working precision): the adjoint is the estimate's derivative.

    At K = 30 one Ritz pair per probe has a relative residual of about 3e-10; the
    estimate's curvature is then large (the central difference moves from 49.00 at
    h = 1e-3 to 49.761 at h = 1e-7), so the step is 1e-7.
    """
    indices, values, probes, n = problem
    _, grad = _gradient(indices, values, probes, n, K, True)
    for seed in range(2):
        direction = _symmetric_direction(indices, n, seed)
        fd = _directional_fd(indices, values, probes, n, K, direction, h=1e-7)
        assert abs(float(grad @ direction) - fd) <= 1e-5 * max(1.0, abs(fd))


@pytest.mark.xfail(
    strict=True,
    reason="issue 11 item 7, left open: at K = 40 the exact derivative of the estimate is ill-posed in float64 "
    "(66.24 at the float64 matrix, about -1.1e6 after a sub-ulp 1e-17 perturbation: "
    "tests/test_lanczos_converged_reference.py); the adjoint returns 3.8e7, float64 central differences 65.5",
)
def test_converged_ritz_pairs_gradient_matches_finite_differences(problem):
    indices, values, probes, n = problem
    _, grad = _gradient(indices, values, probes, n, 40, True)
    direction = _symmetric_direction(indices, n, 0)
    fd = _directional_fd(indices, values, probes, n, 40, direction, h=1e-6)
    assert abs(float(grad @ direction) - fd) <= 1e-3 * abs(fd)


def _adjoint_left(A, probes, K):
    from gpsparse.core.lanczos import lanczos
    from gpsparse.core.lanczos_adjoint import lanczos_adjoint
    from gpsparse.core.quadrature import FUNCTIONS, quadrature_grad_matrix

    dec = lanczos(lambda x: A @ x, probes, K, reorthogonalize=True)
    _, grad_t = quadrature_grad_matrix(dec.alpha, dec.beta, FUNCTIONS["log"])
    grad_alpha = torch.diagonal(grad_t, dim1=-2, dim2=-1)
    grad_beta = 2.0 * torch.diagonal(grad_t, offset=1, dim1=-2, dim2=-1)
    _, adjoint, _ = lanczos_adjoint(lambda x: A @ x, dec, None, grad_alpha, grad_beta)
    return dec, adjoint.reshape(dec.basis.shape)


@pytest.mark.parametrize("K", [10, 40])
def test_adjoint_satisfies_scale_and_shift_identities(problem, K):
    """``∂q/∂A = Σ_k λ_k q_kᵀ`` of ``q = e₁ᵀ log(T) e₁``: ``⟨∂q/∂A, A⟩ = 1`` and ``tr ∂q/∂A = e₁ᵀ T⁻¹ e₁``.

    Exact identities of the derivative of the K-step estimate (``T(sA) = sT(A)``
    and ``T(A + sI) = T(A) + sI``), checked also with Ritz pairs converged to
    working precision (K = 40; at K = 60, Ritz residuals 1e-26, the first holds only to 8e-5).
    """
    indices, values, probes, n = problem
    A = torch.sparse_coo_tensor(indices, values, (n, n)).to_dense()
    dec, left = _adjoint_left(A, probes, K)
    trace = (left * dec.basis).sum((0, 2))
    T = torch.diag_embed(dec.alpha) + torch.diag_embed(dec.beta, 1) + torch.diag_embed(dec.beta, -1)
    shift = torch.linalg.inv(T)[..., 0, 0]
    scale = (left * (A @ dec.basis.reshape(n, -1)).reshape(dec.basis.shape)).sum((0, 2))
    assert float(((trace - shift).abs() / shift).max()) <= 1e-8
    assert float((scale - 1).abs().max()) <= 1e-6
