"""Sparse-precision covariances W Q⁻¹ Wᵀ (+ D) against dense float64 references."""

from __future__ import annotations

from unittest.mock import patch

import linear_operator
import numpy as np
import pytest
import torch
from matrices import lattice_laplacian, scipy_to_torch

import gpsparse
import gpsparse.core.cholmod
import gpsparse.linalg.dispatch
from gpsparse import NoisySparsePrecisionLinearOperator, SparseLinearOperator, SparsePrecisionLinearOperator

M = 20  # 20 × 20 lattice, N = 400


def _precision(kappa, tau):
    """Q(κ, τ) = τ (κ⁴ I + 2κ² L + L²) + 0.01 I = τ (κ²I + L)² + 0.01 I, differentiable in κ and τ."""
    lap = lattice_laplacian(M)
    L = SparseLinearOperator.from_tensor(scipy_to_torch(lap))
    L2 = SparseLinearOperator.from_tensor(scipy_to_torch(lap @ lap))
    q = (L2 + L * (2 * kappa**2)).add_diagonal(kappa**4) * tau
    return q.add_diagonal(torch.tensor(0.01, dtype=torch.float64))


def _selection(rows, n):
    idx = torch.stack([torch.arange(len(rows)), torch.as_tensor(rows)])
    return torch.sparse_coo_tensor(idx, torch.ones(len(rows), dtype=torch.float64), (len(rows), n)).coalesce()


def _bilinear(points):
    """Bilinear interpolation weights of points in [0, M-1]² on the lattice (4 nonzeros per row)."""
    rows, cols, vals = [], [], []
    for r, (x, y) in enumerate(points):
        i0, j0 = int(np.floor(x)), int(np.floor(y))
        i0, j0 = min(i0, M - 2), min(j0, M - 2)
        fx, fy = x - i0, y - j0
        for di, dj, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            rows.append(r)
            cols.append((i0 + di) * M + (j0 + dj))
            vals.append(w)
    idx = torch.tensor([rows, cols])
    return torch.sparse_coo_tensor(idx, torch.tensor(vals, dtype=torch.float64), (len(points), M * M)).coalesce()


def _interps():
    rng = np.random.default_rng(0)
    return {
        "identity": None,
        "selection": _selection(np.sort(rng.choice(M * M, 300, replace=False)), M * M),
        "interpolation": _bilinear(rng.uniform(0, M - 1, size=(250, 2))),
    }


def _dense_cov(Q_dense, W):
    cov = torch.linalg.inv(Q_dense)
    if W is None:
        return cov
    Wd = W.to_dense()
    return Wd @ cov @ Wd.T


@pytest.mark.parametrize("road", ["exact", "shared-probes"])
@pytest.mark.parametrize("which", ["identity", "selection", "interpolation"])
@pytest.mark.parametrize("heteroscedastic", [False, True])
def test_noisy_mll_terms_match_dense(which, heteroscedastic, road):
    """The MLL terms and gradients: exact (N = 400 takes the dense road) and by SLQ with shared probes."""
    W = _interps()[which]
    m = M * M if W is None else W.shape[0]
    kappa = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    base_noise = (
        0.05 + 0.1 * torch.rand(m, generator=gen, dtype=torch.float64)
        if heteroscedastic
        else torch.full((m,), 0.1, dtype=torch.float64)
    )
    noise = base_noise.clone().requires_grad_(True)
    y = torch.randn(m, 1, generator=gen, dtype=torch.float64)

    K = SparsePrecisionLinearOperator(_precision(kappa, tau), interp=W)
    Ky = K + linear_operator.operators.DiagLinearOperator(noise)
    assert isinstance(Ky, NoisySparsePrecisionLinearOperator)
    torch.manual_seed(0)
    dense_rows = gpsparse.linalg.dispatch.DIFFERENCE_DENSE_MAX_ROWS if road == "exact" else 0
    with (
        linear_operator.settings.max_cholesky_size(0),
        gpsparse.settings.logdet_defaults(num_probes=128, num_lanczos=40),
        patch.object(gpsparse.linalg.dispatch, "DIFFERENCE_DENSE_MAX_ROWS", dense_rows),
    ):
        quad, logdet = Ky.inv_quad_logdet(inv_quad_rhs=y, logdet=True)
    (quad + logdet).backward()
    grads = torch.stack([kappa.grad, tau.grad]), noise.grad.clone()

    kappa_r, tau_r = (t.detach().clone().requires_grad_(True) for t in (kappa, tau))
    noise_r = base_noise.clone().requires_grad_(True)
    dense = _dense_cov(_precision(kappa_r, tau_r).to_dense(), W) + torch.diag(noise_r)
    quad_r = (y * torch.linalg.solve(dense, y)).sum()
    logdet_r = torch.logdet(dense)
    (quad_r + logdet_r).backward()

    torch.testing.assert_close(quad, quad_r, rtol=1e-6, atol=1e-8)
    assert abs(float(logdet - logdet_r)) < 1e-2 * abs(float(logdet_r))
    if road == "exact":
        torch.testing.assert_close(logdet.detach(), logdet_r.detach(), rtol=1e-9, atol=1e-9)
    expected = torch.stack([kappa_r.grad, tau_r.grad])
    assert float((grads[0] - expected).norm() / expected.norm()) < 0.05
    cos = torch.nn.functional.cosine_similarity(grads[1], noise_r.grad, dim=0)
    assert float(cos) > 0.95


@pytest.mark.parametrize("which", ["identity", "selection", "interpolation"])
def test_products_solves_and_diagonal(which):
    W = _interps()[which]
    Q = _precision(torch.tensor(0.6, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    K = SparsePrecisionLinearOperator(Q, interp=W)
    dense = _dense_cov(Q.to_dense(), W)
    x = torch.randn(K.shape[-1], 3, dtype=torch.float64)
    with gpsparse.settings.solver_defaults(rtol=1e-11):
        torch.testing.assert_close(K @ x, dense @ x, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(K.diagonal(), dense.diagonal(), rtol=1e-7, atol=1e-9)
        noise = torch.full((K.shape[-1],), 0.1, dtype=torch.float64)
        Ky = K.add_diagonal(noise)
        torch.testing.assert_close(Ky.solve(x), torch.linalg.solve(dense + torch.diag(noise), x), rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(
            Ky.inv_quad(x, reduce_inv_quad=False),
            (x * torch.linalg.solve(dense + torch.diag(noise), x)).sum(-2),
            rtol=1e-7,
            atol=1e-9,
        )
        if W is None:
            torch.testing.assert_close(K.solve(x), Q.to_dense() @ x)
    sub = K[5:40, 10:30]
    assert isinstance(sub, SparsePrecisionLinearOperator) and sub.shape == (35, 20)
    with gpsparse.settings.solver_defaults(rtol=1e-11):
        torch.testing.assert_close(sub.to_dense(), dense[5:40, 10:30], rtol=1e-7, atol=1e-9)


def test_scale_keeps_type_and_identity_logdet():
    Q = _precision(torch.tensor(0.8, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    K = SparsePrecisionLinearOperator(Q) * torch.tensor(3.0, dtype=torch.float64)
    assert isinstance(K, SparsePrecisionLinearOperator)
    with gpsparse.settings.solver_defaults(rtol=1e-11):
        torch.testing.assert_close(K.to_dense(), 3.0 * torch.linalg.inv(Q.to_dense()), rtol=1e-7, atol=1e-9)
    with linear_operator.settings.max_cholesky_size(10_000):
        _, ld = SparsePrecisionLinearOperator(Q).inv_quad_logdet(logdet=True)
    torch.testing.assert_close(ld, -torch.logdet(Q.to_dense()), rtol=1e-8, atol=1e-8)


def test_prior_samples_have_the_right_covariance_action():
    Q = _precision(torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    K = SparsePrecisionLinearOperator(Q)
    torch.manual_seed(4)
    samples = K.zero_mean_mvn_samples(3)
    torch.manual_seed(4)
    z = torch.randn(400, 3, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(Q.to_dense())
    expected = (evecs @ (evals.rsqrt().unsqueeze(-1) * (evecs.T @ z))).T
    torch.testing.assert_close(samples, expected, rtol=1e-6, atol=1e-6)


def test_bad_inputs():
    Q = _precision(torch.tensor(0.6, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="columns but Q has 400 nodes"):
        SparsePrecisionLinearOperator(Q, interp=_selection([0, 1], 300))
    with pytest.raises(TypeError, match="SparseLinearOperator"):
        SparsePrecisionLinearOperator(Q.to_dense())
    with pytest.raises(ValueError, match="symmetric"):
        nonsym = SparseLinearOperator.from_tensor(
            _bilinear([(1.5, 2.5)] * 1).to_dense()[:, :1].to_sparse(), symmetric=False
        )
        SparsePrecisionLinearOperator(nonsym)
    K = SparsePrecisionLinearOperator(Q, interp=_interps()["selection"])
    with pytest.raises(ValueError, match="positive"):
        K.add_diagonal(torch.tensor(-0.1, dtype=torch.float64))
    with (
        pytest.raises(NotImplementedError, match="no sparse form.*Add observation noise"),
        gpsparse.settings.max_dense_size(10_000),
    ):
        K.inv_quad_logdet(torch.ones(300, 1, dtype=torch.float64), logdet=True)
    with pytest.raises(ValueError, match="sign must be"):
        SparsePrecisionLinearOperator(Q, sign=2.0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        (-SparsePrecisionLinearOperator(Q)).zero_mean_mvn_samples(2)
    bad = SparseLinearOperator(Q.values * -1.0, pattern=Q.pattern)
    with pytest.raises(gpsparse.NotPositiveDefiniteError):
        with linear_operator.settings.max_cholesky_size(0):
            SparsePrecisionLinearOperator(bad).add_diagonal(torch.tensor(0.1, dtype=torch.float64)).inv_quad_logdet(
                torch.ones(400, 1, dtype=torch.float64), logdet=True
            )
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="move one of them"):
            SparsePrecisionLinearOperator(Q, interp=_interps()["selection"].cuda())


def _ou_precision(n, rho, requires_grad=False):
    """Precision of a stationary AR(1)/OU chain with unit variance: tridiagonal, exact logdet −(n−1)·log(1−ρ²)."""
    rho = torch.as_tensor(rho, dtype=torch.float64).requires_grad_(requires_grad)
    main = torch.full((n,), 1.0, dtype=torch.float64) + rho**2
    main = torch.cat([torch.ones(1, dtype=torch.float64), main[1:-1], torch.ones(1, dtype=torch.float64)])
    i = torch.arange(n)
    idx = torch.cat([torch.stack([i, i]), torch.stack([i[:-1], i[1:]]), torch.stack([i[1:], i[:-1]])], 1)
    off = (-rho).expand(n - 1)
    vals = torch.cat([main, off, off]) / (1 - rho**2)
    return SparseLinearOperator.from_tensor(torch.sparse_coo_tensor(idx, vals, (n, n))), rho


def test_banded_markov_model_is_exact_without_krylov():
    """Tridiagonal Q and P (selection W): exact banded factorisation, no CG/Lanczos, values and gradients exact."""
    from unittest.mock import patch

    n = 300
    Q, rho = _ou_precision(n, 0.9, requires_grad=True)
    W = _selection(np.arange(0, n, 3), n)
    noise = torch.full((W.shape[0],), 0.2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(W.shape[0], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Ky = SparsePrecisionLinearOperator(Q, interp=W).add_diagonal(noise)
    with (
        patch("gpsparse.core.krylov.cg", side_effect=AssertionError("CG called")),
        patch("gpsparse.core.lanczos.lanczos", side_effect=AssertionError("Lanczos called")),
        linear_operator.settings.max_cholesky_size(0),
    ):
        quad, logdet = Ky.inv_quad_logdet(y, logdet=True)
    (quad + logdet).backward()
    Q_r, rho_r = _ou_precision(n, 0.9, requires_grad=True)
    noise_r = noise.detach().clone().requires_grad_(True)
    dense = _dense_cov(Q_r.to_dense(), W) + torch.diag(noise_r)
    quad_r, logdet_r = (y * torch.linalg.solve(dense, y)).sum(), torch.logdet(dense)
    (quad_r + logdet_r).backward()
    torch.testing.assert_close(quad, quad_r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logdet, logdet_r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rho.grad, rho_r.grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(noise.grad, noise_r.grad, rtol=1e-7, atol=1e-9)


requires_cholmod = pytest.mark.skipif(
    not gpsparse.core.cholmod.cholmod_available(), reason="scikit-sparse not installed"
)


@requires_cholmod
def test_exact_cholesky_path_matches_dense():
    """logdet_defaults(method="cholesky"): exact MLL terms and gradients (CHOLMOD + selected inversion)."""
    W = _interps()["interpolation"]
    kappa = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    noise = torch.full((W.shape[0],), 0.1, dtype=torch.float64, requires_grad=True)
    y = torch.randn(W.shape[0], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    Ky = SparsePrecisionLinearOperator(
        _precision(kappa, torch.tensor(2.0, dtype=torch.float64)), interp=W
    ).add_diagonal(noise)
    with (
        gpsparse.settings.logdet_defaults(method="cholesky"),
        linear_operator.settings.max_cholesky_size(0),
        patch("gpsparse.core.krylov.cg", side_effect=AssertionError("CG called")),
    ):
        quad, logdet = Ky.inv_quad_logdet(y, logdet=True)
    (quad + logdet).backward()
    kappa_r = kappa.detach().clone().requires_grad_(True)
    noise_r = noise.detach().clone().requires_grad_(True)
    dense = _dense_cov(_precision(kappa_r, torch.tensor(2.0, dtype=torch.float64)).to_dense(), W) + torch.diag(noise_r)
    quad_r, logdet_r = (y * torch.linalg.solve(dense, y)).sum(), torch.logdet(dense)
    (quad_r + logdet_r).backward()
    torch.testing.assert_close(quad, quad_r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logdet, logdet_r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(kappa.grad, kappa_r.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(noise.grad, noise_r.grad, rtol=1e-6, atol=1e-8)


@requires_cholmod
def test_stale_cholesky_preconditioner_needs_few_lanczos_steps():
    """A CHOLMOD factor from an earlier step as the fixed preconditioner: SLQ on C⁻¹AC⁻ᵀ ≈ I is accurate with K = 5."""
    Q_old = _precision(torch.tensor(0.60, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    Q_new = SparseLinearOperator(
        _precision(torch.tensor(0.62, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)).values,
        pattern=Q_old.pattern,
    )
    exact = torch.logdet(Q_new.to_dense())
    torch.manual_seed(0)
    with (
        linear_operator.settings.max_cholesky_size(0),
        gpsparse.settings.logdet_defaults(preconditioner="cholesky", num_lanczos=5, num_probes=16),
    ):
        Q_old.logdet()  # factorises (step 1)
        estimate = Q_new.logdet()  # reuses the step-1 factor
        plain = None
    with linear_operator.settings.max_cholesky_size(0), gpsparse.settings.logdet_defaults(num_lanczos=5, num_probes=16):
        plain = Q_new.logdet()
    assert abs(float(estimate - exact)) < 1e-3 * abs(float(exact))
    assert abs(float(estimate - exact)) < abs(float(plain - exact))


@pytest.mark.parametrize("which", ["identity", "selection", "interpolation"])
@pytest.mark.parametrize("road", ["banded", "cholesky"])
def test_exact_variances_from_a_selected_inverse_match_dense(which, road):
    """diag(W Q⁻¹ Wᵀ) from one selected inverse (any number of rows) equals the dense reference."""
    from gpsparse.operators.precision import covariance_diagonal

    if road == "cholesky" and not gpsparse.core.cholmod.cholmod_available():
        pytest.skip("scikit-sparse (CHOLMOD) not installed")
    with torch.no_grad():
        Q = _precision(torch.tensor(0.8, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64))
    W = _interps()[which]
    interp = None if W is None else SparseLinearOperator.from_tensor(W, symmetric=False)
    bandwidth = 0 if road == "cholesky" else 2 * M  # the lattice's half-bandwidth is 2M
    solves = []
    real_solve = SparseLinearOperator.solve

    def counting_solve(self, *args, **kwargs):
        solves.append(1)
        return real_solve(self, *args, **kwargs)

    with (
        torch.no_grad(),
        gpsparse.settings.solver_defaults(max_banded_bandwidth=bandwidth),
        patch.object(SparseLinearOperator, "solve", counting_solve),
    ):
        assert Q.road(logdet=False) == ("banded" if road == "banded" else "krylov")
        variances = covariance_diagonal(Q, interp, method="auto")
    assert solves == []  # no solve at all: the selected inverse served every row
    expected = torch.diagonal(_dense_cov(Q.to_dense(), W))
    torch.testing.assert_close(variances, expected, rtol=1e-10, atol=1e-12)


def test_exact_variances_solve_when_the_inverse_is_off_pattern_or_gradients_are_needed():
    from gpsparse.operators.precision import covariance_diagonal

    kappa = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    Q = _precision(kappa, torch.tensor(1.5, dtype=torch.float64))
    far = torch.sparse_coo_tensor(  # one row coupling two distant nodes: (Q⁻¹)[0, M²−1] is not on Q's pattern
        torch.tensor([[0, 0], [0, M * M - 1]]), torch.tensor([0.5, 0.5], dtype=torch.float64), (1, M * M)
    )
    W = SparseLinearOperator.from_tensor(far, symmetric=False)
    dense = _dense_cov(Q.to_dense().detach(), far)
    with gpsparse.settings.solver_defaults(max_banded_bandwidth=2 * M, rtol=1e-12):
        with torch.no_grad():
            torch.testing.assert_close(
                covariance_diagonal(Q, W, method="exact"), torch.diagonal(dense), rtol=1e-9, atol=0
            )
        variance = covariance_diagonal(Q, None, method="exact").sum()  # gradients in κ: solves, differentiable
    variance.backward()
    k = kappa.detach().clone().requires_grad_(True)
    torch.diagonal(torch.linalg.inv(_precision(k, torch.tensor(1.5, dtype=torch.float64)).to_dense())).sum().backward()
    torch.testing.assert_close(kappa.grad, k.grad, rtol=1e-6, atol=1e-10)


def test_selected_inverse_is_cached_per_operator():
    with torch.no_grad():
        Q = _precision(torch.tensor(0.8, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64))
    with gpsparse.settings.solver_defaults(max_banded_bandwidth=2 * M):
        first = Q.selected_inverse()
        assert Q.selected_inverse() is first
    with gpsparse.settings.solver_defaults(max_banded_bandwidth=0):
        if not gpsparse.core.cholmod.cholmod_available():
            assert SparseLinearOperator(Q.values.clone(), pattern=Q.pattern).selected_inverse() is None


@pytest.mark.parametrize("index", [1, slice(0, 2), torch.tensor([0, 2]), (slice(0, 3), slice(1, 4))], ids=str)
def test_row_indexing_without_interpolation(index):
    """K = Q⁻¹ (W = I): selecting rows keeps all columns (issue 11, item 2)."""
    with torch.no_grad():
        Q = _precision(torch.tensor(0.8, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64))
    K = SparsePrecisionLinearOperator(Q)
    dense = torch.linalg.inv(Q.to_dense())
    with gpsparse.settings.solver_defaults(rtol=1e-13):
        got = K[index]
        got = got.to_dense() if hasattr(got, "to_dense") else got
    torch.testing.assert_close(got, dense[index], rtol=1e-8, atol=1e-10)


# ------------------------------------------------ negative scaling (issue 11, item 3)
def _small_cases():
    """(label, K) on a 6 × 6 lattice (N = 36): W = I, a square W, a 7-row (odd) and an 8-row (even) selection."""
    lap = lattice_laplacian(6)
    Q = SparseLinearOperator.from_tensor(scipy_to_torch(lap @ lap + 0.8 * lap)).add_diagonal(
        torch.tensor(0.3, dtype=torch.float64)
    )
    square = torch.eye(36, dtype=torch.float64) + 0.3 * torch.diag(torch.ones(35, dtype=torch.float64), 1)
    return Q, {
        "identity": None,
        "square": square.to_sparse(),
        "odd": _selection([0, 3, 7, 12, 20, 28, 35], 36),
        "even": _selection([0, 3, 7, 12, 20, 28, 33, 35], 36),
    }


@pytest.mark.parametrize("which", ["identity", "square", "odd", "even"])
@pytest.mark.parametrize("noisy", [False, True], ids=["K", "K+D"])
def test_negative_multiples_are_exact(which, noisy):
    """c·K for c < 0, −K and c − K: products, dense form, diagonal, indexing, solves, inv_quad and logdet."""
    Q, interps = _small_cases()
    K = SparsePrecisionLinearOperator(Q, interp=interps[which])
    m = K.shape[-1]
    if noisy:
        K = K.add_diagonal(torch.linspace(0.1, 0.4, m, dtype=torch.float64))
    x = torch.randn(m, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with gpsparse.settings.solver_defaults(rtol=1e-12):
        dense = K.to_dense()
        for op, expected in ((K * -2.5, -2.5 * dense), (-K, -dense), ((K * -2.0) * -0.5, dense)):
            assert isinstance(op, type(K))
            torch.testing.assert_close(op.to_dense(), expected, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(op @ x, expected @ x, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(op.diagonal(), expected.diagonal(), rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(op.mT.to_dense(), expected.mT, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(op[1:4, :].to_dense(), expected[1:4, :], rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(op.expand(2, m, m).to_dense(), expected.expand(2, m, m), rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(op.solve(x), torch.linalg.solve(expected, x), rtol=1e-7, atol=1e-9)
            quad, logdet = op.inv_quad_logdet(x, logdet=True, reduce_inv_quad=False)
            torch.testing.assert_close(quad, (x * torch.linalg.solve(expected, x)).sum(-2), rtol=1e-7, atol=1e-9)
            expected_logdet = torch.logdet(expected)  # NaN for a negative determinant (odd m, negated)
            torch.testing.assert_close(logdet, expected_logdet, rtol=1e-7, atol=1e-9, equal_nan=True)
        c = torch.randn(m, m, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close((c - K).to_dense(), c - dense, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(torch.sub(c, K).to_dense(), c - dense, rtol=1e-9, atol=1e-11)


def test_zero_and_mixed_sign_multiples():
    """c = 0 gives a ZeroLinearOperator; a batch of constants of mixed signs linear_operator's generic product."""
    Q, interps = _small_cases()
    K = SparsePrecisionLinearOperator(Q, interp=interps["odd"])
    zero = K * 0.0
    assert isinstance(zero, linear_operator.operators.ZeroLinearOperator) and zero.shape == K.shape
    assert isinstance(
        K.add_diagonal(torch.tensor(0.2, dtype=torch.float64)) * 0.0, linear_operator.operators.ZeroLinearOperator
    )
    batch = K.expand(2, *K.shape)
    constants = torch.tensor([2.0, -3.0], dtype=torch.float64)
    mixed = batch * constants.reshape(2, 1, 1)
    assert not isinstance(mixed, SparsePrecisionLinearOperator)
    with gpsparse.settings.solver_defaults(rtol=1e-12):
        torch.testing.assert_close(
            mixed.to_dense(), batch.to_dense() * constants.reshape(2, 1, 1), rtol=1e-9, atol=1e-11
        )
    # D − K (the negated covariance plus a diagonal) need not be definite: linear_operator's generic sum.
    d_minus_k = (-K).add_diagonal(torch.tensor(5.0, dtype=torch.float64))
    assert not isinstance(d_minus_k, NoisySparsePrecisionLinearOperator)
    torch.testing.assert_close(d_minus_k.to_dense(), 5.0 * torch.eye(7, dtype=torch.float64) - K.to_dense())


def test_non_identity_interp_solves_and_logdets_densely_with_gradients():
    """W Q⁻¹ Wᵀ (W 8 × 36, full row rank): solve, inv_quad and logdet (dense road) and their gradients in Q."""
    lap = torch.from_numpy((lattice_laplacian(6) @ lattice_laplacian(6)).toarray())
    kappa = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def precision(k):
        dense = lap + 2 * k**2 * torch.from_numpy(lattice_laplacian(6).toarray()) + (k**4 + 0.1) * torch.eye(36)
        return dense

    Wt = _small_cases()[1]["even"]
    mask = precision(kappa).detach() != 0
    Q = SparseLinearOperator.from_tensor(precision(kappa).sparse_mask(mask.to_sparse()).coalesce())
    K = SparsePrecisionLinearOperator(Q, interp=Wt)
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with gpsparse.settings.solver_defaults(rtol=1e-12):
        quad, logdet = K.inv_quad_logdet(x, logdet=True)
        solved = K.solve(x)
    (quad + logdet + solved.sum()).backward()
    k_r = kappa.detach().clone().requires_grad_(True)
    Wd = Wt.to_dense()
    dense = Wd @ torch.linalg.inv(precision(k_r)) @ Wd.T
    quad_r, logdet_r, solved_r = (
        (x * torch.linalg.solve(dense, x)).sum(),
        torch.logdet(dense),
        torch.linalg.solve(dense, x),
    )
    (quad_r + logdet_r + solved_r.sum()).backward()
    torch.testing.assert_close(quad, quad_r, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(logdet, logdet_r, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(solved, solved_r, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(kappa.grad, k_r.grad, rtol=1e-6, atol=1e-9)


# ------------------------------------- batched noisy log-determinants (issue 11, item 4)
def _noisy_batch():
    """Batch of 3 noisy covariances on a 6 × 6 lattice (Q without a closed-form log det), W 10 × 36."""
    lap = lattice_laplacian(6)
    base = SparseLinearOperator.from_tensor(scipy_to_torch(lap @ lap + 0.5 * lap))
    scales = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64).unsqueeze(-1)
    Q = SparseLinearOperator(base.values * scales, pattern=base.pattern).add_diagonal(
        torch.tensor(0.2, dtype=torch.float64)
    )
    W = _selection([0, 4, 9, 13, 17, 20, 24, 29, 31, 35], 36)
    noise = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64).unsqueeze(-1).expand(3, 10)
    return SparsePrecisionLinearOperator(Q, interp=W).add_diagonal(noise)


def test_small_batched_noisy_logdet_takes_an_exact_road():
    """Even under max_cholesky_size(0), N ≤ DIFFERENCE_DENSE_MAX_ROWS gives exact logdet P − logdet Q: no Lanczos."""
    Ky = _noisy_batch()
    exact = torch.logdet(Ky.to_dense())
    with (
        linear_operator.settings.max_cholesky_size(0),
        linear_operator.settings.num_trace_samples(256),
        patch("gpsparse.core.lanczos.lanczos", side_effect=AssertionError("Lanczos called")),
    ):
        logdet = Ky.logdet()
    torch.testing.assert_close(logdet, exact, rtol=1e-9, atol=1e-9)


def test_large_noisy_logdet_shares_probes_and_states_its_error():
    """The SLQ road: the same probes for P and Q, an estimated standard error that matches the actual error,
    and an EstimatorAccuracyWarning when the error is large relative to the difference."""
    Ky = _noisy_batch()
    P, Q = Ky.posterior_precision(), Ky.Q
    exact = torch.logdet(P.to_dense()) - torch.logdet(Q.to_dense())
    errors, stderrs = [], []
    with (
        patch.object(gpsparse.linalg.dispatch, "DIFFERENCE_DENSE_MAX_ROWS", 0),
        linear_operator.settings.max_cholesky_size(0),
    ):
        for seed in range(6):
            gen = torch.Generator().manual_seed(seed)
            with gpsparse.settings.logdet_defaults(num_probes=64):
                _, difference, stderr = gpsparse.linalg.dispatch.logdet_difference(
                    P.values, P.pattern, P._road_config(), Q.values, Q.pattern, Q._road_config(), generator=gen
                )
            errors.append(difference - exact)
            stderrs.append(stderr)
        with (
            gpsparse.settings.logdet_defaults(num_probes=2),
            pytest.warns(gpsparse.errors.EstimatorAccuracyWarning, match="estimated standard error"),
        ):
            # Two probes of the difference of 36 × 36 log-determinants: a standard error far above 0.1·|d| + 0.05.
            Ky.logdet()
    rms = torch.stack(errors).pow(2).mean(0).sqrt()
    mean_stderr = torch.stack(stderrs).mean(0)
    assert bool((rms < 0.1 * exact.abs()).all()), (rms, exact)  # independent estimates missed by 0.3 and more
    assert bool((mean_stderr < 3 * rms).all()) and bool((mean_stderr > rms / 3).all()), (mean_stderr, rms)
