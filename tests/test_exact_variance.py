"""Exact predictive variances at 10⁴ test points from one selected inverse (issue 11, item 9).

The stock GPyTorch path (``model.eval(); model(x_test).variance``) on a 1-D Markov model
(the Kalman road: RTS smoother on the joint inputs) and on 2-D / 3-D lattices (CHOLMOD) against dense float64 references
``diag(K** − K*ₓ (Kₓₓ + σ²I)⁻¹ Kₓ*)`` to 1e-8; the pattern of ``P + 0·W*ᵀW*`` when test
rows couple nodes outside ``P``'s pattern; the memory-bounded Monte Carlo fallback.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from unittest.mock import patch

import gpytorch
import pytest
import torch
from helpers import tolerance
from matrices import lattice_laplacian, scipy_to_torch

import gpsparse
from gpsparse import SparseLinearOperator, SparsePrecisionLinearOperator
from gpsparse.core.cholmod import cholmod_available
from gpsparse.kernels import LatticeMaternKernel, MarkovMaternKernel, SparsePrecisionKernel
from gpsparse.linalg import variance
from gpsparse.linalg.functional import funm
from gpsparse.operators.precision import covariance_diagonal

NUM_TEST = 10_000
needs_cholmod = pytest.mark.skipif(not cholmod_available(), reason="scikit-sparse (CHOLMOD) not installed")


class Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean = gpytorch.means.ZeroMean()
        self.covar = gpytorch.kernels.ScaleKernel(kernel)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))


def _hyper(model):
    """``(outputscale, noise)`` as the model holds them (the constraints round the values set)."""
    return float(model.covar.outputscale.detach()), float(model.likelihood.noise.detach())


def _model(x, y, kernel, noise=0.05, outputscale=1.7):
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = Model(x, y, likelihood, kernel).double()
    likelihood.noise = noise
    model.covar.outputscale = outputscale
    model.eval()
    likelihood.eval()
    return model


def _exact_road_only():
    """Fail if the variances take the solve or Monte Carlo roads instead of a selected inverse."""
    module = sys.modules[covariance_diagonal.__module__]  # wherever the operators layer keeps it
    return (
        patch.object(module, "exact_diagonal", side_effect=AssertionError("solves, not a selected inverse")),
        patch.object(module, "stochastic_diagonal", side_effect=AssertionError("Monte Carlo")),
    )


def _predictive_variance(model, x_test):
    solves, mc = _exact_road_only()
    with torch.no_grad(), solves, mc:
        return model(x_test).variance


def _dense_reference(k_test_diag, k_cross, k_train, noise):
    """``diag(K** − K*ₓ (Kₓₓ + σ²I)⁻¹ Kₓ*)`` in float64."""
    chol = torch.linalg.cholesky(k_train + noise * torch.eye(k_train.shape[0], dtype=torch.float64))
    half = torch.linalg.solve_triangular(chol, k_cross.T, upper=False)
    return k_test_diag - half.pow(2).sum(0)


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------------------------------ 1-D Markov


@pytest.mark.parametrize("nu", [0.5, 1.5])
def test_markov_variances_at_1e4_points_match_dense(nu):
    # training nodes every 0.05, test points every 0.001 (the smoother is exact at any spacing;
    # tests/test_markov_state_space.py covers test points on and next to training points)
    gen = torch.Generator().manual_seed(0)
    x = (0.025 + 0.05 * torch.arange(200, dtype=torch.float64))[:, None]
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(200, generator=gen, dtype=torch.float64)
    x_test = (0.0005 + 0.001 * torch.arange(NUM_TEST, dtype=torch.float64))[torch.randperm(NUM_TEST, generator=gen)]
    x_test = x_test[:, None]
    kernel = MarkovMaternKernel(nu=nu)
    kernel.lengthscale = 0.3
    model = _model(x, y, kernel)
    var = _predictive_variance(model, x_test)

    s2, noise = _hyper(model)
    lam = (2 * nu) ** 0.5 / float(kernel.lengthscale.detach())

    def matern(a, b):  # |a − b| directly (gpytorch's √(a² + b² − 2ab) is accurate to ~1e-8·|a| only)
        d = lam * (a - b.T).abs()
        return s2 * (torch.exp(-d) if nu == 0.5 else (1 + d) * torch.exp(-d))

    reference = _dense_reference(
        torch.full((NUM_TEST,), s2, dtype=torch.float64), matern(x_test, x), matern(x, x), noise
    )
    assert var.shape == (NUM_TEST,)
    _close(var, reference)


# ------------------------------------------------------------------------------------------ lattices


def _lattice_reference(Q_dense, W_train, W_test, s2, noise):
    cov = s2 * torch.linalg.inv(Q_dense)
    cross = W_test @ cov  # (m*, N)
    return _dense_reference((cross * W_test).sum(-1), cross @ W_train.T, W_train @ cov @ W_train.T, noise)


@needs_cholmod
@pytest.mark.parametrize("dim", [2, 3])
def test_lattice_matern_variances_at_1e4_points_match_dense(dim):
    """2-D: bilinear pairs lie in the 13-point pattern; 3-D: trilinear corner pairs do not (P + 0·W*ᵀW*)."""
    grid = 21 if dim == 2 else 7
    kernel = LatticeMaternKernel(bounds=[[0.0] * dim, [1.0] * dim], grid_size=grid, alpha=2)
    kernel.lengthscale = 0.3
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(150, dim, generator=gen, dtype=torch.float64) * 0.5  # one corner: many test cells empty
    y = torch.sin(4 * x.sum(-1)) + 0.1 * torch.randn(150, generator=gen, dtype=torch.float64)
    x_test = torch.rand(NUM_TEST, dim, generator=gen, dtype=torch.float64)
    model = _model(x, y, kernel)
    var = _predictive_variance(model, x_test)
    with torch.no_grad():
        Q = kernel.precision().to_dense()
        W, W_test = kernel.interpolation(x).to_dense(), kernel.interpolation(x_test).to_dense()
    _close(var, _lattice_reference(Q, W, W_test, *_hyper(model)))


class FivePointKernel(SparsePrecisionKernel):
    """``Q = κ²I + L`` on an M × M lattice (5-point stencil) read by bilinear interpolation (a test stand-in)."""

    M = 24

    def __init__(self):
        super().__init__()
        lap = scipy_to_torch(lattice_laplacian(self.M))
        self._lap = SparseLinearOperator.from_tensor(lap)
        self.kappa2 = 0.05

    def precision(self) -> SparseLinearOperator:
        return self._lap.add_diagonal(torch.tensor(self.kappa2, dtype=torch.float64))

    def interpolation(self, points):
        M = self.M
        i0 = points.floor().long().clamp(0, M - 2)
        f = points - i0
        rows, cols, vals = [], [], []
        for di, dj in ((0, 0), (1, 0), (0, 1), (1, 1)):
            rows.append(torch.arange(len(points)))
            cols.append((i0[:, 0] + di) * M + (i0[:, 1] + dj))
            vals.append((f[:, 0] if di else 1 - f[:, 0]) * (f[:, 1] if dj else 1 - f[:, 1]))
        idx = torch.stack([torch.cat(rows), torch.cat(cols)])
        w = torch.sparse_coo_tensor(idx, torch.cat(vals), (len(points), M * M)).coalesce()
        return SparseLinearOperator.from_tensor(w, symmetric=False)

    def forward(self, x1, x2, diag=False, **params):
        same = x1.shape == x2.shape and torch.equal(x1, x2)
        W1 = self.interpolation(x1)
        return SparsePrecisionLinearOperator(
            self.precision(), interp=W1, right_interp=None if same else self.interpolation(x2)
        )


@needs_cholmod
def test_five_point_lattice_needs_the_widened_pattern_and_matches_dense():
    M = FivePointKernel.M
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(120, 2, generator=gen, dtype=torch.float64) * (M - 1) / 2  # training in one quadrant
    y = torch.cos(x[:, 0] / 3) + 0.1 * torch.randn(120, generator=gen, dtype=torch.float64)
    x_test = torch.rand(NUM_TEST, 2, generator=gen, dtype=torch.float64) * (M - 1)
    kernel = FivePointKernel()
    model = _model(x, y, kernel)
    var = _predictive_variance(model, x_test)
    P = model.prediction_strategy.posterior_precision()
    W_test = kernel.interpolation(x_test)
    assert variance.couples_outside(P.pattern, W_test)  # the diagonal pairs of empty cells are not in P
    with torch.no_grad():
        Q = kernel.precision().to_dense()
        reference = _lattice_reference(Q, kernel.interpolation(x).to_dense(), W_test.to_dense(), *_hyper(model))
    _close(var, reference)
    # a second call with the same test inputs reuses the widened precision (one factorisation)
    widened = model.prediction_strategy._widened[2]
    assert widened.pattern.nnz > P.pattern.nnz
    _close(_predictive_variance(model, x_test), reference)
    assert model.prediction_strategy._widened[2] is widened


@needs_cholmod
def test_selected_diagonal_widens_the_pattern():
    """``diagonal_from_inverse`` refuses pairs off the pattern; ``selected_diagonal`` widens it: equal dense."""
    kernel = FivePointKernel()
    Q = kernel.precision()
    gen = torch.Generator().manual_seed(3)
    W = kernel.interpolation(torch.rand(500, 2, generator=gen, dtype=torch.float64) * (kernel.M - 1))
    config = replace(Q._road_config(), cholesky=True)
    assert variance.diagonal_from_inverse(Q.selected_inverse(), Q.pattern, W) is None
    values, pattern = variance.pattern_with_pairs(Q.values, Q.pattern, W)
    kept = pattern.positions(Q.pattern.row, Q.pattern.col_long)[0]
    assert pattern.nnz > Q.pattern.nnz and torch.equal(values[kept], Q.values)
    diag = variance.selected_diagonal(Q.values, Q.pattern, W, config)
    Wd = W.to_dense()
    reference = ((Wd @ torch.linalg.inv(Q.to_dense())) * Wd).sum(-1)
    torch.testing.assert_close(diag, reference, **tolerance(torch.float64, "direct"))
    torch.testing.assert_close(
        variance.selected_diagonal(Q.values, Q.pattern, None, config),
        torch.linalg.inv(Q.to_dense()).diagonal(),
        **tolerance(torch.float64, "direct"),
    )


# ------------------------------------------------------------------------------------------ Monte Carlo


def _lattice_precision(M=20, shift=0.3):
    lap = lattice_laplacian(M)
    return SparseLinearOperator.from_tensor(scipy_to_torch(lap + shift * scipy_eye(M * M)))


def scipy_eye(n):
    import scipy.sparse as sp

    return sp.eye(n, format="csr")


def test_two_pass_lanczos_equals_stored_basis_lanczos():
    Q = _lattice_precision()
    v = torch.randn(2, Q.shape[-1], 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batched = SparseLinearOperator(torch.stack([Q.values, 3 * Q.values]), pattern=Q.pattern)
    two_pass = variance._inv_sqrt_two_pass(batched.values, batched.pattern, v, 30)
    stored = funm(batched, v, "inv_sqrt", num_lanczos=30, reorthogonalize=False)
    torch.testing.assert_close(two_pass, stored, **tolerance(torch.float64, "direct"))


def test_monte_carlo_error_is_stated_and_memory_bounded():
    Q = _lattice_precision()
    reference = torch.linalg.inv(Q.to_dense()).diagonal()
    S = 512
    gen = torch.Generator().manual_seed(4)
    with patch.object(variance, "funm", side_effect=AssertionError("stored-basis Lanczos without gradients")):
        estimate, stderr = variance.stochastic_diagonal_with_error(Q, None, num_probes=S, num_lanczos=40, generator=gen)
    expected = variance.monte_carlo_relative_error(S)
    assert expected == pytest.approx((2 / S) ** 0.5)
    relative = (estimate - reference) / reference
    assert abs(float(relative.pow(2).mean().sqrt()) / expected - 1) < 0.15  # RMS relative error ≈ √(2/S)
    assert abs(float((stderr / reference).mean()) / expected - 1) < 0.1  # the returned standard error too
    assert float(((estimate - reference).abs() <= 4 * stderr).float().mean()) > 0.99


def test_monte_carlo_blocks_and_gradients():
    Q = _lattice_precision(M=8)
    values = Q.values.clone().requires_grad_(True)
    Qg = SparseLinearOperator(values, pattern=Q.pattern)
    gen = torch.Generator().manual_seed(5)
    out = variance.stochastic_diagonal(Qg, None, num_probes=10, num_lanczos=64, generator=gen, block=4)
    out.sum().backward()
    assert values.grad is not None and bool(torch.isfinite(values.grad).all())
    with pytest.raises(ValueError, match="block must be a positive integer"):
        variance.stochastic_diagonal(Q, None, num_probes=4, num_lanczos=8, block=0)


def test_stochastic_prediction_under_fast_pred_var_is_the_fallback():
    """``fast_pred_var`` keeps the Monte Carlo road (two-pass, bounded memory), error within √(2/S)."""
    M = FivePointKernel.M
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(200, 2, generator=gen, dtype=torch.float64) * (M - 1)
    y = torch.randn(200, generator=gen, dtype=torch.float64)
    x_test = torch.rand(300, 2, generator=gen, dtype=torch.float64) * (M - 1)
    model = _model(x, y, FivePointKernel())
    S = 800
    with torch.no_grad():
        exact = model(x_test).variance
        with gpytorch.settings.fast_pred_var(), gpsparse.settings.variance_defaults(num_probes=S):
            torch.manual_seed(0)
            mc = model(x_test).variance
    rms = float(((mc - exact) / exact).pow(2).mean().sqrt())
    assert rms < 1.3 * variance.monte_carlo_relative_error(S)
