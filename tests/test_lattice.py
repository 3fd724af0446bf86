"""LatticeMaternKernel: lattice, τ, interpolation, covariance vs Matérn, MLL vs dense, GPyTorch, size, errors."""

from __future__ import annotations

import copy
import itertools
import json
import math
import subprocess
import sys
import textwrap
from unittest.mock import patch

import gpytorch
import numpy as np
import pytest
import scipy.fft
import torch
from helpers import tolerance
from scipy.special import gamma, ive, kv

import gpsparse
from gpsparse import SparseLinearOperator, SparsePrecisionLinearOperator
from gpsparse.kernels.lattice import LatticeMaternKernel, lattice_variance, neumann_eigenvalues, neumann_laplacian
from gpsparse.kernels.prediction import SparsePrecisionPredictionStrategy
from gpsparse.operators.known_logdet import KnownLogdetSparseLinearOperator

F64 = torch.float64
TOL = tolerance(F64, "direct")


@pytest.fixture(autouse=True)
def _one_thread():
    """Small CG solves here are overhead-bound: on shared cores 2 threads run them ~6× slower (DESIGN.md §6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ references
def grid_nodes(low, high, sizes) -> torch.Tensor:
    """``(N, d)`` node coordinates in C order (first dimension slowest), by itertools."""
    axes = [np.linspace(a, b, m) for a, b, m in zip(low, high, sizes)]
    return torch.tensor(list(itertools.product(*axes)), dtype=F64)


def dense_laplacian(low, high, sizes) -> torch.Tensor:
    """Graph Laplacian of the grid with weight 1/h_d² between axis neighbours (from node coordinates)."""
    nodes = grid_nodes(low, high, sizes)
    spacing = torch.tensor([(b - a) / (m - 1) for a, b, m in zip(low, high, sizes)], dtype=F64)
    steps = (nodes[:, None, :] - nodes[None, :, :]).abs() / spacing
    axis_neighbour = ((steps - 1).abs() < 1e-9).sum(-1) == 1
    axis_neighbour &= (steps < 1e-9).sum(-1) == len(sizes) - 1
    axis = steps.argmax(-1)
    weights = torch.where(axis_neighbour, spacing[axis] ** -2, torch.zeros((), dtype=F64))
    return torch.diag(weights.sum(-1)) - weights


def hat_interpolation(x, low, high, sizes) -> torch.Tensor:
    """Dense ``(n, N)`` multilinear weights Π_d max(0, 1 − |x_d − z_d|/h_d) (differentiable in x)."""
    nodes = grid_nodes(low, high, sizes)
    spacing = torch.tensor([(b - a) / (m - 1) for a, b, m in zip(low, high, sizes)], dtype=F64)
    return (1 - (x[:, None, :] - nodes[None, :, :]).abs() / spacing).clamp_min(0).prod(-1)


def periodic_variance(kappa2, spacing, alpha, size) -> torch.Tensor:
    """Diagonal of (κ²I + L)^−α on a periodic lattice of ``size`` nodes per side (→ infinite lattice)."""
    freq = [2 - 2 * torch.cos(2 * math.pi * torch.arange(size, dtype=F64) / size) for _ in spacing]
    grids = torch.meshgrid(*freq, indexing="ij")
    eig = sum(g / h**2 for g, h in zip(grids, spacing))
    return (kappa2 + eig).pow(-alpha).mean()


def lattice_correlation(alpha, kappa2, spacing, offsets) -> np.ndarray:
    """Interior correlation of the infinite lattice at integer offsets ``(k, d)``, by Bessel functions.

    ``[(κ²I + L)^−α]_{0,j} = Γ(α)⁻¹ ∫ t^{α−1} e^{−tκ²} Π_d e^{−z_d} I_{j_d}(z_d) dt`` (z_d = 2t/h_d²),
    trapezoid rule in log t — independent of the module's implementation (scipy's ``ive``).
    """
    tc = min(min(spacing) ** 2, 1 / kappa2)
    s = np.arange(math.log(tc) - 40, math.log(80 / kappa2), 0.2)
    t = np.exp(s)
    weight = np.exp(alpha * s - t * kappa2)
    offsets = np.atleast_2d(np.abs(offsets))
    tables = [ive(np.arange(offsets.max() + 1)[None, :], 2 * t[:, None] / h**2) for h in spacing]  # (K, J) per dim
    variance = weight @ np.prod([table[:, 0] for table in tables], axis=0)
    out = np.empty(len(offsets))
    for start in range(0, len(offsets), 8192):
        chunk = offsets[start : start + 8192]
        heat = np.prod([table[:, chunk[:, k]] for k, table in enumerate(tables)], axis=0)
        out[start : start + 8192] = weight @ heat
    return out / variance


def matern_correlation(r, nu, kappa) -> np.ndarray:
    """Continuum Matérn correlation 2^{1−ν}/Γ(ν) (κr)^ν K_ν(κr) (scipy's K_ν)."""
    x = kappa * np.asarray(r, dtype=float)
    positive = np.where(x > 0, x, 1.0)
    return np.where(x > 0, 2 ** (1 - nu) / gamma(nu) * positive**nu * kv(nu, positive), 1.0)


class DenseLatticeKernel(gpytorch.kernels.Kernel):
    """The same model formed densely and independently: hat functions, graph Laplacian, periodic-sum τ."""

    has_lengthscale = True

    def __init__(self, low, high, sizes, alpha, **kwargs):
        super().__init__(**kwargs)
        self.low, self.high, self.sizes, self.alpha = low, high, sizes, alpha
        self.spacing = [(b - a) / (m - 1) for a, b, m in zip(low, high, sizes)]
        self.lap = dense_laplacian(low, high, sizes)

    def covariance(self):
        nu = max(self.alpha - len(self.sizes) / 2, 0.5)  # R-INLA's nominal ν for α = 1 in 2-D
        kappa2 = 8 * nu / self.lengthscale[0, 0] ** 2
        tau = periodic_variance(kappa2, self.spacing, self.alpha, {1: 2048, 2: 256, 3: 48}[len(self.sizes)])
        eye = torch.eye(self.lap.shape[0], dtype=F64)
        return torch.linalg.inv(tau * torch.linalg.matrix_power(kappa2 * eye + self.lap, self.alpha))

    def forward(self, x1, x2, diag=False, **params):
        w1 = hat_interpolation(x1, self.low, self.high, self.sizes)
        w2 = hat_interpolation(x2, self.low, self.high, self.sizes)
        k = w1 @ self.covariance() @ w2.T
        return k.diagonal() if diag else k


class Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean = gpytorch.means.ConstantMean()
        self.covar = gpytorch.kernels.ScaleKernel(kernel)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))


def points(n, low, high, seed=0, margin=0.0):
    low, high = torch.tensor(low, dtype=F64), torch.tensor(high, dtype=F64)
    u = torch.rand(n, len(low), generator=torch.Generator().manual_seed(seed), dtype=F64)
    return low + margin + u * (high - low - 2 * margin)


def kernel(low, high, sizes, alpha=2, lengthscale=None, **kwargs) -> LatticeMaternKernel:
    k = LatticeMaternKernel([list(low), list(high)], list(sizes), alpha, **kwargs).double()
    if lengthscale is not None:
        k.lengthscale = torch.as_tensor(lengthscale, dtype=F64)  # a python float would pass through float32
    return k


CASES = {  # (low, high, grid size, α) — anisotropic cells everywhere
    "1d-a1": ((0.0,), (2.0,), (41,), 1),
    "1d-a2": ((0.0,), (2.0,), (41,), 2),
    "1d-a3": ((-1.0,), (1.0,), (33,), 3),
    "2d-a1": ((0.0, -0.5), (1.2, 0.5), (13, 9), 1),
    "2d-a2": ((0.0, -0.5), (1.2, 0.5), (13, 9), 2),
    "2d-a3": ((0.0, 0.0), (1.0, 1.3), (9, 11), 3),
    "3d-a2": ((0.0, 0.0, 0.0), (1.0, 0.8, 1.2), (6, 5, 7), 2),
    "3d-a3": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (5, 6, 5), 3),
}


# ------------------------------------------------------------------- lattice
@pytest.mark.parametrize("sizes", [(9,), (5, 4), (4, 3, 5)], ids=["1d", "2d", "3d"])
def test_neumann_laplacian_and_closed_form_eigenvalues(sizes):
    low = [0.0, -1.0, 2.0][: len(sizes)]
    high = [1.0, 0.5, 3.7][: len(sizes)]
    spacing = [(b - a) / (m - 1) for a, b, m in zip(low, high, sizes)]
    lap = neumann_laplacian(sizes, spacing)
    torch.testing.assert_close(torch.from_numpy(lap.toarray()), dense_laplacian(low, high, sizes), **TOL)
    eig = np.sort(neumann_eigenvalues(sizes, spacing))
    np.testing.assert_allclose(eig, np.linalg.eigvalsh(lap.toarray()), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize(
    "spacing, alpha, cells",
    [((0.1,), 1, 3), ((0.1,), 3, 12), ((0.1, 0.07), 2, 2), ((0.05, 0.05), 3, 16), ((0.1, 0.1, 0.13), 2, 4)],
)
def test_lattice_variance_matches_brute_force_periodic_sum(spacing, alpha, cells):
    nu = alpha - len(spacing) / 2
    kappa2 = torch.tensor(8 * nu / (cells * max(spacing)) ** 2, dtype=F64, requires_grad=True)
    value = lattice_variance(kappa2, spacing, alpha)
    (grad,) = torch.autograd.grad(value, kappa2)
    reference_kappa2 = kappa2.detach().clone().requires_grad_(True)
    reference = periodic_variance(reference_kappa2, spacing, alpha, {1: 4096, 2: 512, 3: 96}[len(spacing)])
    (reference_grad,) = torch.autograd.grad(reference, reference_kappa2)
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-11, atol=0)


@pytest.mark.parametrize("spacing, cells", [((0.1, 0.1), 2), ((0.05, 0.08), 8), ((0.02, 0.02), 16)])
def test_lattice_variance_alpha_one_in_two_dimensions(spacing, cells):
    # ν = 0: the continuum variance diverges, the lattice variance is finite and exact (κ from ν_nominal = 1/2)
    kappa2 = torch.tensor(4.0 / (cells * max(spacing)) ** 2, dtype=F64, requires_grad=True)
    value = lattice_variance(kappa2, spacing, 1)
    (grad,) = torch.autograd.grad(value, kappa2)
    reference_kappa2 = kappa2.detach().clone().requires_grad_(True)
    reference = periodic_variance(reference_kappa2, spacing, 1, 1024)
    (reference_grad,) = torch.autograd.grad(reference, reference_kappa2)
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-10, atol=0)
    # log-divergence as h → 0 at fixed κ: v ≈ h² (log(1/(κ²h²)) + c) / (4π) (the nominal continuum variance is ∞)
    v, k2 = float(value.detach()), float(kappa2.detach())
    assert v > spacing[0] * spacing[1] / (4 * math.pi) * math.log(1 / (k2 * max(spacing) ** 2))


def test_lattice_variance_batches_and_continuum_limit():
    kappa2 = torch.tensor([[0.5, 2.0], [8.0, 0.01]], dtype=F64)
    batched = lattice_variance(kappa2, (0.3, 0.2), 2)
    assert batched.shape == (2, 2)
    for k, v in zip(kappa2.reshape(-1), batched.reshape(-1)):
        torch.testing.assert_close(v, lattice_variance(k, (0.3, 0.2), 2), rtol=1e-13, atol=0)
    # fine lattice: v ≈ Π h_d · Γ(ν)/(Γ(α)(4π)^{d/2} κ^{2ν}), the continuum variance per unit cell volume
    h, kappa = 0.01, 1.0
    continuum = h**2 * math.gamma(1.0) / (math.gamma(2) * 4 * math.pi * kappa**2)
    assert abs(float(lattice_variance(torch.tensor(kappa**2, dtype=F64), (h, h), 2)) / continuum - 1) < 1e-3
    assert lattice_variance(torch.tensor(0.5), (0.3,), 1).dtype == torch.float32


# --------------------------------------------------------------- precision Q
@pytest.mark.parametrize("case", list(CASES))
def test_precision_values_and_exact_logdet_match_dense(case):
    low, high, sizes, alpha = CASES[case]
    k = kernel(low, high, sizes, alpha, lengthscale=0.45)
    Q = k.precision()
    assert isinstance(Q, KnownLogdetSparseLinearOperator) and Q.shape == (k.num_nodes, k.num_nodes)
    dense = DenseLatticeKernel(low, high, sizes, alpha).double()
    dense.lengthscale = torch.tensor(0.45, dtype=F64)
    expected = torch.linalg.inv(dense.covariance())
    torch.testing.assert_close(Q.to_dense(), expected, rtol=1e-10, atol=1e-10 * float(expected.detach().abs().max()))
    logdet = Q.logdet()
    logdet.backward()
    reference = torch.logdet(expected)
    reference.backward()
    torch.testing.assert_close(logdet, reference, **TOL)
    torch.testing.assert_close(k.raw_lengthscale.grad, dense.raw_lengthscale.grad, rtol=1e-9, atol=1e-12)
    if len(sizes) == 1:
        assert Q.road() == "banded"  # half-bandwidth α: gpsparse's exact banded path


@pytest.mark.skipif(not gpsparse.core.cholmod.cholmod_available(), reason="scikit-sparse (CHOLMOD) not installed")
def test_exact_logdet_matches_cholmod_on_a_larger_lattice():
    from gpsparse.autograd.cholmod import cholesky_logdet

    k = kernel((0.0, 0.0), (3.0, 2.0), (61, 51), alpha=3, lengthscale=0.4)
    Q = k.precision()
    torch.testing.assert_close(Q.logdet(), cholesky_logdet(Q.values, Q.pattern), rtol=1e-12, atol=1e-8)


# ------------------------------------------------------------ interpolation
@pytest.mark.parametrize("case", ["1d-a2", "2d-a2", "3d-a2"])
def test_interpolation_matches_hat_functions(case):
    low, high, sizes, _ = CASES[case]
    k = kernel(low, high, sizes)
    x = points(50, low, high)
    nodes = grid_nodes(low, high, sizes)
    x = torch.cat([x, nodes[[0, -1, 3]], torch.tensor([high], dtype=F64), torch.tensor([low], dtype=F64)])
    W = k.interpolation(x)
    assert isinstance(W, SparseLinearOperator) and W.shape == (x.shape[0], k.num_nodes)
    assert W.pattern.nnz == x.shape[0] * 2 ** len(sizes)
    torch.testing.assert_close(W.to_dense(), hat_interpolation(x, low, high, sizes), **TOL)
    torch.testing.assert_close(W.to_dense().sum(-1), torch.ones(x.shape[0], dtype=F64), **TOL)
    torch.testing.assert_close(k.grid_points(), nodes, **TOL)


def test_interpolation_gradient_with_respect_to_inputs():
    low, high, sizes, _ = CASES["2d-a2"]
    k = kernel(low, high, sizes)
    x = points(30, low, high, seed=4).requires_grad_(True)
    weights = torch.randn(30, k.num_nodes, dtype=F64, generator=torch.Generator().manual_seed(0))
    (got,) = torch.autograd.grad((k.interpolation(x).to_dense() * weights).sum(), x)
    (expected,) = torch.autograd.grad((hat_interpolation(x, low, high, sizes) * weights).sum(), x)
    torch.testing.assert_close(got, expected, **TOL)


def test_interpolation_cache():
    low, high, sizes, _ = CASES["2d-a2"]
    k = kernel(low, high, sizes, lengthscale=0.4)
    x, other = points(40, low, high), points(40, low, high, seed=1)
    first = k(x).evaluate_kernel()
    again = k(x).evaluate_kernel()
    assert k.num_interp_builds == 1 and again.interp.pattern is first.interp.pattern
    k.forward(x.clone(), x.clone())  # equal tensors: a torch.equal hit
    assert k.num_interp_builds == 1
    k.lengthscale = 0.6  # hyperparameters do not touch W
    assert k(x).evaluate_kernel().interp.pattern is first.interp.pattern
    k.forward(other, x)
    assert k.num_interp_builds == 2
    x[0, 0] = 0.9  # in place: rebuilt
    W = k.interpolation(x)
    assert k.num_interp_builds == 3
    torch.testing.assert_close(W.to_dense(), hat_interpolation(x, low, high, sizes), **TOL)
    assert k.precision().pattern is first.Q.pattern  # the precision structure is built once
    k.float()
    k.interpolation(x.float())
    assert k.num_interp_builds == 4  # another dtype
    clone = copy.deepcopy(k)
    assert clone._interp_cache == [] and clone._structure is None
    torch.testing.assert_close(clone.precision().to_dense(), k.precision().to_dense())


# ----------------------------------------------------- covariance vs Matérn
@pytest.mark.parametrize(
    "d, alpha, cells, side",
    [(1, 1, 8, 161), (1, 2, 4, 81), (1, 3, 8, 161), (2, 2, 4, 61), (2, 3, 8, 81), (3, 2, 4, 41), (3, 3, 2, 21)],
)
def test_interior_covariance_is_the_lattice_matern(d, alpha, cells, side):
    """Q⁻¹ at the centre of a lattice of ≥ 10 lengthscales: the infinite-lattice correlation (exact, 1e-6),
    and the continuum Matérn up to the documented discretisation error.

    The column of Q⁻¹ comes from the DCT-II eigenbasis of the Neumann lattice (scipy.fft, exact) and is
    checked against the kernel's sparse Q by a residual.
    """
    h = 1.0
    k = kernel((0.0,) * d, (h * (side - 1),) * d, (side,) * d, alpha, lengthscale=cells * h)
    Q = k.precision().detach()
    centre = k.num_nodes // 2
    unit = np.zeros((side,) * d)
    unit.reshape(-1)[centre] = 1.0
    freq = 2 - 2 * np.cos(np.pi * np.arange(side) / side)
    eig = sum(np.meshgrid(*[freq] * d, indexing="ij")) / h**2
    kappa2 = float(k.kappa2().detach())
    tau = float(lattice_variance(torch.tensor(kappa2, dtype=F64), k.spacing, alpha))
    column = scipy.fft.idctn(scipy.fft.dctn(unit, norm="ortho") / (tau * (kappa2 + eig) ** alpha), norm="ortho")
    column = torch.from_numpy(column.reshape(-1))
    residual = Q @ column.unsqueeze(-1) - torch.from_numpy(unit.reshape(-1, 1))
    assert float(residual.abs().max()) < 1e-9 * float(Q.values.abs().max())
    offsets = (k.grid_points() - k.grid_points()[centre]).round().long()
    near = offsets.abs().amax(-1) <= 3 * cells
    r = offsets[near].double().norm(dim=-1).numpy()
    lattice = lattice_correlation(alpha, kappa2, (h,) * d, offsets[near].numpy())
    np.testing.assert_allclose(column[near].numpy(), lattice, rtol=0, atol=1e-6)
    error = np.abs(column[near].numpy() - matern_correlation(r, k.nu, math.sqrt(kappa2)))[r <= 3 * cells].max()
    documented = DISCRETISATION_ERROR[(d, alpha)][[2, 4, 8, 16].index(cells)]
    assert abs(error - documented) < 0.01 * documented, (error, documented)


#: The docstring's table: max_r |c_lattice(r) − c_Matérn(r)| over node offsets r ≤ 3ℓ at 2, 4, 8, 16 cells per ℓ.
DISCRETISATION_ERROR = {
    (1, 1): (0.0141, 0.00375, 0.000953, 0.000239),
    (1, 2): (0.0834, 0.0576, 0.0184, 0.00495),
    (1, 3): (0.112, 0.0525, 0.0133, 0.00313),
    (2, 2): (0.0626, 0.0727, 0.0363, 0.0137),
    (2, 3): (0.104, 0.0841, 0.0227, 0.00536),
    (3, 2): (0.0578, 0.0285, 0.0281, 0.0197),
    (3, 3): (0.0870, 0.0991, 0.0373, 0.0103),
}
#: The docstring's cell-centre variances of W Q⁻¹ Wᵀ at 2, 4, 8, 16 cells per ℓ.
CELL_CENTRE_VARIANCE = {
    (1, 1): (0.69, 0.81, 0.89, 0.94),
    (1, 2): (0.70, 0.86, 0.96, 0.99),
    (2, 2): (0.51, 0.72, 0.88, 0.96),
    (2, 3): (0.51, 0.77, 0.94, 0.98),
    (3, 2): (0.40, 0.59, 0.75, 0.86),
    (3, 3): (0.37, 0.66, 0.88, 0.97),
}


def test_documented_resolution_tables(capsys):
    """Recompute the docstring's tables from the infinite-lattice correlation (printed: the report)."""
    rows = []
    for (d, alpha), documented in DISCRETISATION_ERROR.items():
        nu = alpha - d / 2
        errors, centres = [], []
        for cells in (2, 4, 8, 16):
            kappa2 = 8 * nu / cells**2
            # offsets up to permutation and sign (square cells): j₁ ≥ j₂ ≥ … ≥ 0
            offsets = np.array(list(itertools.combinations_with_replacement(range(3 * cells, -1, -1), d)))
            r = np.linalg.norm(offsets, axis=-1)
            lattice = lattice_correlation(alpha, kappa2, (1.0,) * d, offsets)
            keep = r <= 3 * cells
            errors.append(np.abs(lattice - matern_correlation(r, nu, math.sqrt(kappa2)))[keep].max())
            # cell centre: weights 2^−d on each corner; corner differences δ ∈ {−1, 0, 1}^d, multiplicity Π(2 − |δ|)
            deltas = np.array(list(itertools.product((-1, 0, 1), repeat=d)))
            multiplicity = np.prod(2 - np.abs(deltas), axis=-1)
            centres.append(float(multiplicity @ lattice_correlation(alpha, kappa2, (1.0,) * d, deltas)) / 4**d)
        np.testing.assert_allclose(errors, documented, rtol=0.006)
        if (d, alpha) in CELL_CENTRE_VARIANCE:
            np.testing.assert_allclose(centres, CELL_CENTRE_VARIANCE[(d, alpha)], atol=0.006)
        rows.append(
            f"d={d} α={alpha}: max error {np.round(errors, 5).tolist()}  cell-centre var {np.round(centres, 3)}"
        )
    with capsys.disabled():
        print("\nLatticeMaternKernel resolution (2, 4, 8, 16 cells per lengthscale):\n" + "\n".join(rows))


def test_variances_at_nodes_cell_centres_and_boundaries():
    """diag(W Q⁻¹ Wᵀ): 1 at interior nodes, the documented dip at cell centres, 1 + image terms at the boundary."""
    side, cells = 41, 4
    k = kernel((0.0, 0.0), (40.0, 40.0), (side, side), alpha=2, lengthscale=float(cells))
    kappa2 = float(k.kappa2().detach())
    centre = 20.0
    x = torch.tensor(
        [
            [centre, centre],  # interior node
            [centre + 0.5, centre + 0.5],  # cell centre
            [0.0, centre],  # node on a face
            [float(cells), centre],  # node a lengthscale from a face
            [0.0, 0.0],  # corner node
        ],
        dtype=F64,
    )
    with gpsparse.settings.solver_defaults(rtol=1e-10):
        variance = k(x, diag=True)
    c = lambda *offset: float(lattice_correlation(2, kappa2, (1.0, 1.0), np.array([offset]))[0])  # noqa: E731
    expected = [
        1.0,
        (4 * 1.0 + 8 * c(1, 0) + 4 * c(1, 1)) / 16,
        1 + c(1, 0),  # image half a cell beyond the face: distance 1 cell
        1 + c(2 * cells + 1, 0),
        1 + 2 * c(1, 0) + c(1, 1),
    ]
    torch.testing.assert_close(variance, torch.tensor(expected, dtype=F64), rtol=0, atol=2e-6)
    assert abs(expected[1] - CELL_CENTRE_VARIANCE[(2, 2)][1]) < 0.006 and expected[3] - 1 < 0.01


# ----------------------------------------------------- kernel vs dense model
@pytest.mark.parametrize("case", ["1d-a1", "2d-a1", "2d-a2", "3d-a3"])
def test_kernel_matrices_match_dense_reference(case):
    low, high, sizes, alpha = CASES[case]
    k = kernel(low, high, sizes, alpha, lengthscale=0.5)
    dense = DenseLatticeKernel(low, high, sizes, alpha).double()
    dense.lengthscale = 0.5
    x1, x2 = points(30, low, high, seed=1), points(20, low, high, seed=2)
    scaled = gpytorch.kernels.ScaleKernel(k).double()
    scaled.outputscale = torch.tensor(1.7, dtype=F64)
    with gpsparse.settings.solver_defaults(rtol=1e-10):
        symmetric = scaled(x1).evaluate_kernel()
        cross = k(x1, x2).evaluate_kernel()
        assert isinstance(symmetric, SparsePrecisionLinearOperator) and symmetric.right_interp is None
        assert isinstance(cross, SparsePrecisionLinearOperator) and cross.shape == (30, 20)
        tol = dict(rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(symmetric.to_dense(), 1.7 * dense(x1, x1).to_dense(), **tol)
        torch.testing.assert_close(cross.to_dense(), dense(x1, x2).to_dense(), **tol)
        torch.testing.assert_close(scaled(x1, diag=True), 1.7 * dense(x1, x1, diag=True), **tol)
        torch.testing.assert_close(k(x1[:20], x2, diag=True), dense(x1[:20], x2, diag=True), **tol)


@pytest.mark.parametrize("case", ["1d-a2", "1d-a3", "2d-a1", "2d-a2", "2d-a3", "3d-a2"])
def test_marginal_likelihood_and_gradients_match_dense(case):
    low, high, sizes, alpha = CASES[case]
    x = points(60, low, high, seed=3)
    y = torch.sin(3 * x).sum(-1) + 0.1 * torch.randn(60, generator=torch.Generator().manual_seed(4), dtype=F64)
    losses, grads, known = [], [], []
    original = KnownLogdetSparseLinearOperator.inv_quad_logdet

    def spy(self, *args, **kwargs):
        known.append(type(self))
        return original(self, *args, **kwargs)

    for k in (kernel(low, high, sizes, alpha), DenseLatticeKernel(low, high, sizes, alpha)):
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = Model(x, y, likelihood, k).double()
        model.covar.base_kernel.lengthscale = 0.5
        model.covar.outputscale = 1.3
        likelihood.noise = 0.05
        model.mean.constant.data.fill_(0.2)
        with (
            gpsparse.settings.solver_defaults(rtol=1e-10),
            patch.object(KnownLogdetSparseLinearOperator, "inv_quad_logdet", spy),
        ):
            loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
            loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert known == [KnownLogdetSparseLinearOperator]  # log det Q: the closed form, once
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-9, atol=1e-10)
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 4
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-7, atol=1e-9)


def test_banded_one_dimensional_model_is_exact_beyond_the_dense_limit():
    """d = 1, N = 1200 > max_cholesky_size: Q known, P banded — the loss matches dense without SLQ."""
    low, high, sizes = (0.0,), (12.0,), (1200,)
    x = points(150, low, high, seed=5, margin=1.0)
    y = torch.cos(2 * x[:, 0])
    losses = []
    for k in (kernel(low, high, sizes, 2), DenseLatticeKernel(low, high, sizes, 2)):
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = Model(x, y, likelihood, k).double()
        model.covar.base_kernel.lengthscale = 1.0
        likelihood.noise = 0.01
        with patch("gpsparse.linalg.dispatch._slq_inv_quad_logdet", side_effect=AssertionError("SLQ used")):
            losses.append(-gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y).detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-8, atol=1e-9)


def test_exact_gp_training_and_prediction():
    """An unchanged GPyTorch Adam loop trains the kernel; predictions equal a dense model with the same parameters."""
    low, high, sizes = (-0.25, -0.25), (1.25, 1.25), (24, 24)  # N = 576, h ≈ 0.065
    x = points(200, (0.0, 0.0), (1.0, 1.0), seed=6)
    truth = lambda z: torch.sin(4 * z[:, 0]) * torch.cos(3 * z[:, 1])  # noqa: E731
    y = truth(x) + 0.05 * torch.randn(200, generator=torch.Generator().manual_seed(7), dtype=F64)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    constraint = gpytorch.constraints.Interval(0.1, 0.6)  # keeps ℓ well inside the box (see the boundary notes)
    model = Model(x, y, likelihood, kernel(low, high, sizes, 2, lengthscale_constraint=constraint)).double()
    model.train()
    likelihood.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5
    assert 0.4 < float(model.covar.base_kernel.lengthscale.detach()) < 0.6  # moved from 0.35 (raw 0)
    assert model.covar.base_kernel.num_interp_builds == 1

    dense_likelihood = gpytorch.likelihoods.GaussianLikelihood()
    reference = DenseLatticeKernel(low, high, sizes, 2, lengthscale_constraint=gpytorch.constraints.Interval(0.1, 0.6))
    dense = Model(x, y, dense_likelihood, reference).double()
    dense.load_state_dict(model.state_dict(), strict=False)
    dense_likelihood.load_state_dict(likelihood.state_dict())
    x_test = points(100, (0.0, 0.0), (1.0, 1.0), seed=8)
    results = []
    for m, lik in ((model, likelihood), (dense, dense_likelihood)):
        m.eval()
        lik.eval()
        with torch.no_grad(), gpsparse.settings.solver_defaults(rtol=1e-10):
            prediction = lik(m(x_test))
            results.append((prediction.mean, prediction.variance))
    assert isinstance(model.prediction_strategy, SparsePrecisionPredictionStrategy)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-7, atol=1e-9)
    assert float((results[0][0] - truth(x_test)).pow(2).mean().sqrt()) < 0.1


# ------------------------------------------------------------ batches, dtypes
def test_batched_lengthscales_share_one_pattern():
    low, high, sizes, alpha = CASES["2d-a2"]
    k = kernel(low, high, sizes, alpha, batch_shape=torch.Size([3]))
    lengthscales = torch.tensor([0.3, 0.5, 0.8], dtype=F64)
    k.lengthscale = lengthscales.view(3, 1, 1)
    x = points(12, low, high)
    Q = k.precision()
    assert Q.values.shape == (3, Q.pattern.nnz) and Q.known_logdet.shape == (3,)
    with gpsparse.settings.solver_defaults(rtol=1e-10):
        K = k(x).evaluate_kernel()
        assert K.shape == (3, 12, 12)
        dense = K.to_dense()
        diag = k(x, diag=True)
        for b in range(3):
            single = kernel(low, high, sizes, alpha, lengthscale=float(lengthscales[b]))
            torch.testing.assert_close(dense[b], single(x).to_dense(), rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(Q.known_logdet[b], single.precision().logdet(), **TOL)
            torch.testing.assert_close(diag[b], single(x, diag=True), rtol=1e-8, atol=1e-10)
    scaled = gpytorch.kernels.ScaleKernel(k, batch_shape=torch.Size([3])).double()
    assert isinstance(scaled(x).evaluate_kernel().Q, KnownLogdetSparseLinearOperator)


def test_batched_marginal_likelihood_equals_separate_models():
    """A batch of two independent GPs (batch_shape=(2,), y of shape (2, n)) on one lattice and one W."""
    low, high, sizes, alpha = CASES["2d-a3"]
    x = points(40, low, high, seed=9)
    y = torch.stack([torch.sin(4 * x[:, 0]), torch.cos(3 * x[:, 1])])
    batch = torch.Size([2])
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=batch)
    model = Model(x, y, likelihood, kernel(low, high, sizes, alpha, batch_shape=batch)).double()
    model.covar = gpytorch.kernels.ScaleKernel(model.covar.base_kernel, batch_shape=batch).double()
    model.mean = gpytorch.means.ConstantMean(batch_shape=batch).double()
    model.covar.base_kernel.lengthscale = torch.tensor([0.3, 0.6], dtype=F64).view(2, 1, 1)
    likelihood.noise = torch.tensor([[0.05], [0.2]], dtype=F64)
    with gpsparse.settings.solver_defaults(rtol=1e-10):
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        batched = mll(model(x), y)
        assert batched.shape == (2,)
        for b, (lengthscale, noise) in enumerate(((0.3, 0.05), (0.6, 0.2))):
            single_likelihood = gpytorch.likelihoods.GaussianLikelihood()
            single = Model(x, y[b], single_likelihood, kernel(low, high, sizes, alpha, lengthscale=lengthscale))
            single = single.double()
            single_likelihood.noise = torch.tensor(noise, dtype=F64)
            expected = gpytorch.mlls.ExactMarginalLogLikelihood(single_likelihood, single)(single(x), y[b])
            torch.testing.assert_close(batched[b], expected, rtol=1e-9, atol=1e-10)


def test_batched_inputs_with_equal_members():
    low, high, sizes, alpha = CASES["2d-a2"]
    k = kernel(low, high, sizes, alpha, lengthscale=0.4)
    x = points(20, low, high)
    K = k(x.expand(2, 20, 2)).evaluate_kernel()
    assert K.shape == (2, 20, 20)
    with gpsparse.settings.solver_defaults(rtol=1e-10):
        torch.testing.assert_close(K.to_dense()[1], k(x).to_dense(), rtol=1e-9, atol=1e-11)
    with pytest.raises(NotImplementedError, match="batch members differ"):
        k.forward(torch.stack([x, x.flip(0)]), torch.stack([x, x.flip(0)]))


def test_active_dims():
    low, high, sizes, alpha = CASES["2d-a2"]
    k = kernel(low, high, sizes, alpha, lengthscale=0.4, active_dims=[0, 2])
    plain = kernel(low, high, sizes, alpha, lengthscale=0.4)
    x = points(15, low, high)
    wide = torch.stack([x[:, 0], torch.full((15,), 99.0, dtype=F64), x[:, 1]], -1)  # column 1 is ignored
    with gpsparse.settings.solver_defaults(rtol=1e-10):
        torch.testing.assert_close(k(wide).to_dense(), plain(x).to_dense(), rtol=1e-8, atol=1e-10)
    k(wide).evaluate_kernel()
    assert k.num_interp_builds == 1  # the sliced copy of the inputs hits the cache by equality


def test_float32():
    low, high, sizes, alpha = CASES["2d-a2"]
    k32 = LatticeMaternKernel([list(low), list(high)], list(sizes), alpha)
    k32.lengthscale = 0.5
    x = points(30, low, high).float()
    K = k32(x).evaluate_kernel()
    assert K.dtype == torch.float32 and K.Q.known_logdet.dtype == torch.float32
    reference = kernel(low, high, sizes, alpha, lengthscale=0.5)(x.double()).to_dense()
    torch.testing.assert_close(K.to_dense().double(), reference, rtol=1e-3, atol=1e-4)


def test_lengthscale_prior_constraint_and_properties():
    prior = gpytorch.priors.GammaPrior(3.0, 6.0)
    k = LatticeMaternKernel(
        [[0.0, 0.0], [2.0, 1.0]], (21, 11), alpha=3, lengthscale_prior=prior,
        lengthscale_constraint=gpytorch.constraints.Interval(0.05, 1.0),
    )  # fmt: skip
    k.lengthscale = 0.4
    torch.testing.assert_close(k.lengthscale, torch.tensor([[0.4]]))
    ((name, module, p, closure, _),) = list(k.named_priors())
    assert name == "lengthscale_prior" and p is prior
    torch.testing.assert_close(closure(module), k.lengthscale)
    assert k.dim == 2 and k.nu == 2.0 and k.num_nodes == 231 and k.spacing == (0.1, 0.1)
    torch.testing.assert_close(k.cells_per_lengthscale, torch.tensor(4.0))
    torch.testing.assert_close(k.bounds, torch.tensor([[0.0, 0.0], [2.0, 1.0]], dtype=F64))
    torch.testing.assert_close(k.kappa2(), torch.tensor(16.0 / 0.16), rtol=1e-6, atol=0)


# -------------------------------------------------------------------- errors
def test_errors():
    with pytest.raises(ValueError, match=r"bounds must have shape \(2, d\)"):
        LatticeMaternKernel([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], 5)
    with pytest.raises(ValueError, match=r"bounds must have shape \(2, d\)"):
        LatticeMaternKernel([0.0, 1.0, 2.0], 5)
    with pytest.raises(ValueError, match="lower < upper"):
        LatticeMaternKernel([[0.0, 1.0], [1.0, 1.0]], 5)
    with pytest.raises(ValueError, match="finite"):
        LatticeMaternKernel([[0.0], [float("inf")]], 5)
    for bad in (1, 0, -3, 2.5, (5, 1), (5,), (5, 5, 5), True):
        with pytest.raises(ValueError, match="grid_size must"):
            LatticeMaternKernel([[0.0, 0.0], [1.0, 1.0]], bad)
    with pytest.raises(ValueError, match="more than 2³¹ − 1"):
        LatticeMaternKernel([[0.0] * 3, [1.0] * 3], 2000)
    assert LatticeMaternKernel([[0.0, 0.0], [1.0, 1.0]], 5, alpha=1).nu_nominal == 0.5  # ν = 0: a lattice GMRF
    with pytest.raises(ValueError, match=r"ν = α − d/2 = -0.5 < 0 in d = 3 dimensions; use alpha ≥ 2"):
        LatticeMaternKernel([[0.0] * 3, [1.0] * 3], 5, alpha=1)
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        LatticeMaternKernel([0.0, 1.0], 5, alpha=-1.5)  # fractional α: tests/test_fractional.py
    with pytest.raises(ValueError, match="isotropic"):
        LatticeMaternKernel([[0.0, 0.0], [1.0, 1.0]], 5, ard_num_dims=2)
    with pytest.raises(ValueError, match="active_dims selects 1 dimensions but the bounds have 2"):
        LatticeMaternKernel([[0.0, 0.0], [1.0, 1.0]], 5, active_dims=[0])
    with pytest.raises(TypeError, match="Expected gpytorch.priors.Prior"):
        LatticeMaternKernel([0.0, 1.0], 5, lengthscale_prior=0.5)

    k = kernel((0.0, 0.0), (1.0, 2.0), (6, 11), lengthscale=0.5)
    x = points(10, (0.0, 0.0), (1.0, 2.0))
    outside = x.clone()
    outside[3, 1] = 2.1
    with pytest.raises(ValueError, match=r"outside the lattice bounds: dimension 1 spans \[.*, 2.1\] but the bounds"):
        k(outside).evaluate_kernel()
    with pytest.raises(ValueError, match="outside the lattice bounds: dimension 0"):
        k.forward(x, x - 0.5)
    with pytest.raises(ValueError, match="built for 2-dimensional inputs .* got x1 of dimension 3"):
        k.forward(points(5, (0.0,) * 3, (1.0,) * 3), points(5, (0.0,) * 3, (1.0,) * 3))
    with pytest.raises(RuntimeError, match="same number of dimensions"):  # gpytorch's own check in __call__
        k(x, x[:, :1])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="contain NaN"):
        k(bad).evaluate_kernel()
    with pytest.raises(NotImplementedError, match="last_dim_is_batch"):
        k.forward(x, x, last_dim_is_batch=True)
    # within rounding of the bounds: accepted (float32 of a float64 bound) and clamped
    edge = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=F64)
    edge[0, 0] += 4e-16
    clamped = torch.minimum(edge, torch.tensor([1.0, 2.0], dtype=F64))
    torch.testing.assert_close(k.interpolation(edge).to_dense(), hat_interpolation(clamped, (0, 0), (1, 2), (6, 11)))


# ---------------------------------------------------------------------- size
SIZE_SCRIPT = textwrap.dedent(
    """
    import json, resource, time, torch, gpytorch, gpsparse
    def peak_rss_kib():
        # this process's own peak RSS in KiB: VmHWM (a child's ru_maxrss starts at its parent's RSS at fork)
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from gpsparse.kernels.lattice import LatticeMaternKernel

    torch.set_num_threads(1)
    torch.manual_seed(0)  # SLQ probes
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0]) * torch.cos(4 * x[:, 1]) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)

    class Model(gpytorch.models.ExactGP):
        def __init__(self, x, y, likelihood):
            super().__init__(x, y, likelihood)
            self.mean = gpytorch.means.ConstantMean()
            self.covar = gpytorch.kernels.ScaleKernel(LatticeMaternKernel([[-0.1, -0.1], [1.1, 1.1]], 500))

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))

    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = Model(x, y, likelihood).double()
    model.covar.base_kernel.lengthscale = 0.02     # 8.3 cells per lengthscale, N = 250 000 nodes
    likelihood.noise = 0.01
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    start = time.perf_counter()
    with gpsparse.settings.logdet_defaults(num_probes=8, num_lanczos=32):
        loss = -mll(model(x), y)
        loss.backward()
    seconds = time.perf_counter() - start
    peak = peak_rss_kib()
    grads = [p.grad for p in model.parameters()]
    print(json.dumps({"nodes": model.covar.base_kernel.num_nodes, "loss": float(loss.detach()), "seconds": seconds,
                      "finite": all(bool(torch.isfinite(g).all()) for g in grads), "num_grads": len(grads),
                      "lengthscale_grad": float(model.covar.base_kernel.raw_lengthscale.grad),
                      "peak_mib": peak / 1024}))
    """
)


@pytest.mark.slow  # ~30-45 s on the shared 2-core machine (N = 250 000 CG and SLQ on P)
def test_marginal_likelihood_backward_at_quarter_million_nodes_under_3gb(capsys):
    out = subprocess.run([sys.executable, "-c", SIZE_SCRIPT], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(f"\nLatticeMaternKernel N = 250 000, n = 20 000, MLL + backward (1 thread): {report}")
    assert report["nodes"] == 250_000 and report["finite"] and report["num_grads"] == 4
    assert report["lengthscale_grad"] != 0 and math.isfinite(report["loss"])
    assert report["peak_mib"] < 3072, report
