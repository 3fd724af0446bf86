"""Fractional smoothness on the lattice: the rational fit, the block precisions and the kernel against dense float64.

References are independent of the implementation: the approximant is formed
densely from the eigendecomposition of the dense Laplacian (``R`` evaluated
at ``κ²/(κ² + λ)``, no partial fractions), normalised by a periodic-lattice
sum; the exact fractional covariance is ``V (κ² + λ)^{−α} Vᵀ`` the same way.
"""

from __future__ import annotations

import math

import gpytorch
import numpy as np
import pytest
import torch
from test_lattice import Model, dense_laplacian, hat_interpolation, points

import gpsparse
from gpsparse.core.rational import stieltjes_approximation
from gpsparse.kernels import FractionalMaternPrecision, LatticeMaternKernel, SparsePrecisionAdditiveKernel
from gpsparse.operators.precision import SparsePrecisionLinearOperator

F64 = torch.float64

CASES = {  # (low, high, grid size, α) — anisotropic cells in 2-D
    "1d-a0.8": ((0.0,), (2.0,), (41,), 0.8),
    "1d-a1.3": ((0.0,), (2.0,), (41,), 1.3),
    "2d-a1.5": ((0.0, -0.5), (1.2, 0.5), (13, 9), 1.5),
    "2d-a2.3": ((0.0, -0.5), (1.2, 0.5), (13, 9), 2.3),
    "3d-a1.7": ((0.0, 0.0, 0.0), (1.0, 0.8, 1.2), (6, 5, 7), 1.7),
}


# ------------------------------------------------------------------ references
def periodic_mean(function, spacing, size) -> torch.Tensor:
    """Mean of ``function(λ)`` over the eigenvalues of a periodic lattice (→ the infinite-lattice variance)."""
    freq = [2 - 2 * torch.cos(2 * math.pi * torch.arange(size, dtype=F64) / size) for _ in spacing]
    grids = torch.meshgrid(*freq, indexing="ij")
    return function(sum(g / h**2 for g, h in zip(grids, spacing))).mean()


def rational(beta, order, y: torch.Tensor) -> torch.Tensor:
    """``R(y)`` from the fitted coefficients, evaluated directly (differentiable in ``y``)."""
    fit = stieltjes_approximation(beta, order)
    r, p = torch.tensor(fit.residues, dtype=F64), torch.tensor(fit.poles, dtype=F64)
    return fit.constant + (r * y[..., None] / (1 + p * y[..., None])).sum(-1)


class DenseFractionalKernel(gpytorch.kernels.Kernel):
    """Dense float64 model: hat functions and ``V g(λ) Vᵀ / v`` with ``g`` the approximant (or the exact power)."""

    has_lengthscale = True

    def __init__(self, low, high, sizes, alpha, order=4, exact=False, **kwargs):
        super().__init__(**kwargs)
        self.low, self.high, self.sizes, self.alpha, self.order, self.exact = low, high, sizes, alpha, order, exact
        self.spacing = [(b - a) / (m - 1) for a, b, m in zip(low, high, sizes)]
        self.eig, self.vec = torch.linalg.eigh(dense_laplacian(low, high, sizes))

    def spectrum(self, kappa2, lam):
        if self.exact:
            return (kappa2 + lam) ** -self.alpha
        n = math.floor(self.alpha)
        beta = self.alpha - n
        return (kappa2 + lam) ** -n * kappa2**-beta * rational(beta, self.order, kappa2 / (kappa2 + lam))

    def covariance(self):
        nu = self.alpha - len(self.sizes) / 2
        kappa2 = 8 * nu / self.lengthscale[0, 0] ** 2
        size = {1: 4096, 2: 256, 3: 48}[len(self.sizes)]
        variance = periodic_mean(lambda lam: self.spectrum(kappa2, lam), self.spacing, size)
        return (self.vec * self.spectrum(kappa2, self.eig)) @ self.vec.T / variance

    def forward(self, x1, x2, diag=False, **params):
        w1 = hat_interpolation(x1, self.low, self.high, self.sizes)
        w2 = hat_interpolation(x2, self.low, self.high, self.sizes)
        k = w1 @ self.covariance() @ w2.T
        return k.diagonal() if diag else k


def kernel(case, lengthscale=0.5, **kwargs) -> LatticeMaternKernel:
    low, high, sizes, alpha = CASES[case]
    k = LatticeMaternKernel([list(low), list(high)], list(sizes), alpha, **kwargs).double()
    k.lengthscale = torch.tensor(lengthscale, dtype=F64)
    return k


def dense(case, lengthscale=0.5, **kwargs) -> DenseFractionalKernel:
    low, high, sizes, alpha = CASES[case]
    k = DenseFractionalKernel(low, high, sizes, alpha, **kwargs).double()
    k.lengthscale = torch.tensor(lengthscale, dtype=F64)
    return k


# ------------------------------------------------------------- rational fit
@pytest.mark.parametrize(
    "beta, order, bound",
    [(0.5, 3, 9e-3), (0.5, 4, 1.5e-3), (0.5, 6, 4e-4), (0.8, 4, 3e-4), (0.3, 4, 1e-2), (0.9, 6, 1e-5)],
)
def test_rational_fit_is_positive_and_meets_its_error(beta, order, bound):
    fit = stieltjes_approximation(beta, order)
    assert fit.beta == beta and fit.residues.shape == fit.poles.shape == (order,)
    assert fit.constant >= 0 and (fit.residues >= 0).all() and (fit.poles > 0).all()
    y = np.unique(np.concatenate([np.linspace(0.0, 1.0, 20001), np.logspace(-18.0, 0.0, 20001)]))
    error = np.abs(fit(y) - y**beta).max()  # an independent, finer grid than the fit's own check
    assert error <= bound
    assert error <= 1.05 * fit.error and fit.error <= 1.05 * error
    assert stieltjes_approximation(beta, order) is fit  # cached


def test_rational_error_falls_with_the_order():
    errors = [stieltjes_approximation(0.5, m).error for m in (2, 3, 4, 5)]
    assert all(b < 0.7 * a for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("beta, order", [(0.0, 4), (1.0, 4), (-0.2, 4), (0.5, 0), (0.5, 9), (0.5, 2.5), (0.5, True)])
def test_rational_fit_refuses_bad_arguments(beta, order):
    with pytest.raises(ValueError, match="fractional part|rational order"):
        stieltjes_approximation(beta, order)


# ------------------------------------------------------- precision structure
@pytest.mark.parametrize("case", list(CASES))
def test_block_precisions_and_logdets_match_dense(case):
    k = kernel(case)
    Q = k.precision()
    N, blocks = k.num_nodes, k._precision_structure().num_blocks
    assert k.is_fractional and k.num_latent == N * blocks == Q.shape[-1]
    fit = k._precision_structure().rational
    assert blocks == (fit.constant > 0) + (fit.residues > 0).sum()  # a zero c₀ (β = 0.7, 0.8) drops Q_0
    with gpsparse.settings.max_dense_size(10**8):
        dense_q = Q.to_dense()
    torch.testing.assert_close(dense_q, dense_q.T, rtol=0, atol=0)
    torch.testing.assert_close(Q.logdet(), torch.linalg.slogdet(dense_q)[1], rtol=1e-10, atol=1e-8)
    off_diagonal = dense_q.clone()
    for j in range(blocks):
        off_diagonal[j * N : (j + 1) * N, j * N : (j + 1) * N] = 0
    assert off_diagonal.abs().max() == 0  # independent fields
    # Σ_j Q_j⁻¹ is the dense approximant V g(λ) Vᵀ / v: one covariance over the nodes
    blocks_inverse = torch.linalg.inv(dense_q).reshape(blocks, N, blocks, N).diagonal(dim1=0, dim2=2).sum(-1)
    torch.testing.assert_close(blocks_inverse, dense(case).covariance().detach(), rtol=1e-8, atol=1e-11)


def test_variance_normalisation_is_differentiable():
    """``variance(κ²)`` (partial fractions of lattice integrals) against the periodic sum, value and derivative."""
    structure = kernel("2d-a2.3")._precision_structure()
    reference = dense("2d-a2.3")
    n, beta = 2, 0.3
    for value in (3.0, 40.0, 400.0):
        kappa2 = torch.tensor(value, dtype=F64, requires_grad=True)
        got = structure.variance(kappa2)
        want = periodic_mean(
            lambda lam, k2=kappa2: (k2 + lam) ** -n * k2**-beta * rational(beta, 4, k2 / (k2 + lam)),
            reference.spacing,
            512,
        )
        (g_got,) = torch.autograd.grad(got, kappa2)
        (g_want,) = torch.autograd.grad(want, kappa2)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
        torch.testing.assert_close(g_got, g_want, rtol=1e-7, atol=0)


def test_a_poor_fit_warns():
    with pytest.warns(UserWarning, match=r"uniform error 0.16 \(> 1e-2.*raise rational_order"):
        LatticeMaternKernel([[0.0, 0.0], [1.0, 1.0]], 5, alpha=1.1, rational_order=3).precision()


def test_fractional_precision_refuses_integer_alpha():
    k = kernel("2d-a1.5")
    with pytest.raises(ValueError, match="non-integer alpha"):
        FractionalMaternPrecision(None, 2.0, eigenvalues=np.ones(k.num_nodes), spacing=(1, 1))


# ----------------------------------------------------- kernel vs dense model
@pytest.mark.parametrize("case", ["1d-a0.8", "2d-a1.5", "2d-a2.3", "3d-a1.7"])
def test_kernel_matrices_match_dense_approximant(case):
    k, reference = kernel(case), dense(case)
    low, high, _, _ = CASES[case]
    x1, x2 = points(30, low, high, seed=1), points(20, low, high, seed=2)
    with gpsparse.settings.solver_defaults(rtol=1e-11):
        symmetric = k(x1).evaluate_kernel()
        cross = k(x1, x2).evaluate_kernel()
        assert isinstance(symmetric, SparsePrecisionLinearOperator) and cross.shape == (30, 20)
        tol = dict(rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(symmetric.to_dense(), reference(x1, x1).to_dense(), **tol)
        torch.testing.assert_close(cross.to_dense(), reference(x1, x2).to_dense(), **tol)
        torch.testing.assert_close(k(x1, diag=True), reference(x1, x1, diag=True), **tol)
        torch.testing.assert_close(k(x1[:20], x2, diag=True), reference(x1[:20], x2, diag=True), **tol)


@pytest.mark.parametrize("case", ["1d-a1.3", "2d-a1.5"])
def test_covariance_is_within_the_fit_error_of_the_exact_fractional_power(case):
    """Same lattice, same boundary: the approximant vs ``(κ²I + L)^{−α}``, both at unit infinite-lattice variance."""
    exact = dense(case, exact=True).covariance().detach()
    errors = {}
    for order in (3, 4, 6):
        approximant = dense(case, order=order).covariance().detach()
        errors[order] = (approximant - exact).abs().max().item()
        beta = CASES[case][3] % 1
        assert errors[order] <= 3.0 * stieltjes_approximation(round(beta, 12), order).error, (order, errors)
    assert errors[6] < errors[4] < errors[3]


@pytest.mark.parametrize("case", ["1d-a0.8", "2d-a1.5", "2d-a2.3"])
def test_marginal_likelihood_and_gradients_match_dense(case):
    low, high, _, _ = CASES[case]
    x = points(60, low, high, seed=3)
    y = torch.sin(3 * x).sum(-1) + 0.1 * torch.randn(60, generator=torch.Generator().manual_seed(4), dtype=F64)
    losses, grads = [], []
    for k in (kernel(case), dense(case)):
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = Model(x, y, likelihood, k).double()
        model.covar.base_kernel.lengthscale = 0.4
        model.covar.outputscale = 1.3
        likelihood.noise = 0.05
        model.mean.constant.data.fill_(0.2)
        with gpsparse.settings.solver_defaults(rtol=1e-11):
            loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
            loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad for name, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-9, atol=1e-10)
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 4
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-7, atol=1e-9)


def test_prediction_and_sum_with_an_integer_lattice_field():
    """A fractional field plus a smooth α = 2 field: posterior mean and variance against the dense GP."""
    case = "2d-a1.5"
    low, high, sizes, _ = CASES[case]
    x, x_test = points(50, low, high, seed=5), points(15, low, high, seed=6)
    y = torch.cos(4 * x[:, 0]) * x[:, 1] + 0.05 * torch.randn(50, generator=torch.Generator().manual_seed(7), dtype=F64)
    smooth = LatticeMaternKernel([list(low), list(high)], list(sizes), 2).double()
    smooth.lengthscale = torch.tensor(0.8, dtype=F64)
    dense_smooth = DenseFractionalKernel(low, high, sizes, 2.0, exact=True).double()
    dense_smooth.lengthscale = torch.tensor(0.8, dtype=F64)
    results = []
    for parts in ((kernel(case, 0.3), smooth), (dense(case, 0.3), dense_smooth)):
        likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
        likelihood.noise = 0.01
        sparse = isinstance(parts[0], LatticeMaternKernel)
        covar = SparsePrecisionAdditiveKernel(*parts) if sparse else parts[0] + parts[1]
        model = Model(x, y, likelihood, covar).double()
        model.eval()
        with torch.no_grad(), gpsparse.settings.solver_defaults(rtol=1e-11), gpytorch.settings.fast_pred_var(False):
            posterior = model(x_test)
            results.append((posterior.mean, posterior.variance))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-9)


def test_float32_and_batched_lengthscales():
    low, high, sizes, _ = CASES["2d-a1.5"]
    x = points(25, low, high, seed=8)
    k32 = LatticeMaternKernel([list(low), list(high)], list(sizes), 1.5)
    k32.lengthscale = 0.4
    reference = dense("2d-a1.5", 0.4)(x, x).to_dense().detach()
    torch.testing.assert_close(k32(x.float()).to_dense().double(), reference, rtol=1e-3, atol=1e-4)
    batched = LatticeMaternKernel([list(low), list(high)], list(sizes), 1.5, batch_shape=torch.Size([2])).double()
    batched.lengthscale = torch.tensor([0.4, 0.7], dtype=F64).reshape(2, 1, 1)
    with gpsparse.settings.solver_defaults(rtol=1e-11):
        K = batched(x).to_dense()
    assert K.shape == (2, 25, 25)
    torch.testing.assert_close(K[0], reference, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(K[1], dense("2d-a1.5", 0.7)(x, x).to_dense().detach(), rtol=1e-8, atol=1e-10)


# -------------------------------------------------------------------- errors
def test_bad_alpha_and_rational_order():
    box2 = [[0.0, 0.0], [1.0, 1.0]]
    for bad in ("1.5", True, None, -1.0, 0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha must be a positive number"):
            LatticeMaternKernel(box2, 5, alpha=bad)
    with pytest.raises(ValueError, match=r"ν = α − d/2 = -0.1 < 0 in d = 2"):
        LatticeMaternKernel(box2, 5, alpha=0.9)
    with pytest.raises(ValueError, match="a fractional alpha needs ν = α − d/2 > 0"):
        LatticeMaternKernel([0.0, 1.0], 5, alpha=0.5)
    for bad in (0, 9, 2.5, True):
        with pytest.raises(ValueError, match="rational_order must be an integer in 1 … 8"):
            LatticeMaternKernel(box2, 5, alpha=1.5, rational_order=bad)
    k = LatticeMaternKernel(box2, 5, alpha=np.float64(2.0))
    assert k.alpha == 2 and isinstance(k.alpha, int) and not k.is_fractional and k.num_latent == 25
    k = LatticeMaternKernel([0.0, 1.0], 5, alpha=1.5, rational_order=3)
    assert k.is_fractional and k.nu == 1.0 and k.num_latent == 5 * k._precision_structure().num_blocks
