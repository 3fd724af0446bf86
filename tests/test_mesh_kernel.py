"""MeshMaternKernel and SPDEPrecisionLinearOperator against dense float64, the continuum Matérn and the lattice."""

from __future__ import annotations

import copy
import math
import pickle
import unittest

import gpytorch
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spl
import torch
from helpers import tolerance
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase
from scipy.special import kv

import gpsparse
from gpsparse.core.cholmod import cholmod_available
from gpsparse.kernels import (
    LatticeMaternKernel,
    MeshMaternKernel,
    PCMaternRangePrior,
    PCMaternSigmaPrior,
    SparsePrecisionAdditiveKernel,
)
from gpsparse.kernels.mesh import NORMALIZATIONS
from gpsparse.mesh import Mesh
from gpsparse.mesh.operator import SPDEPrecisionLinearOperator
from gpsparse.mesh.spde import MeshSPDEStructure, matern_tau, nominal_smoothness, sphere_variance_factor
from gpsparse.operators.precision import NoisySparsePrecisionLinearOperator

F64 = torch.float64
EXACT = {"rtol": 1e-8, "atol": 1e-10}  # the 1e-8 against dense float64


# ------------------------------------------------------------------ fixtures
def irregular_mesh(m: int = 7, seed: int = 0, span: float = 1.0) -> Mesh:
    """A jittered ``m × m`` grid, alternating diagonals: irregular, no lattice symmetry (no triangle package needed)."""
    mesh = Mesh.regular_grid([[0, 0], [span, span]], m, diagonal="alternate")
    h = span / (m - 1)
    rng = np.random.default_rng(seed)
    v = mesh.vertices + rng.uniform(-0.25 * h, 0.25 * h, mesh.vertices.shape)
    edge = np.isclose(mesh.vertices, 0.0) | np.isclose(mesh.vertices, span)
    v[edge] = mesh.vertices[edge]  # keep the boundary straight
    return Mesh(v, mesh.cells)


def sphere_points(count: int, seed: int = 0) -> torch.Tensor:
    p = np.random.default_rng(seed).standard_normal((count, 3))
    return torch.from_numpy(p / np.linalg.norm(p, axis=1, keepdims=True))


def dense_precision(kernel: MeshMaternKernel) -> torch.Tensor:
    """``Q = T (𝒦C̃𝒦 + G_H)(C̃⁻¹(𝒦C̃𝒦 + G_H))^{α−1} T`` densely, differentiable in the kernel's parameters."""
    mesh = kernel.mesh
    c = torch.from_numpy(mesh.lumped_mass())
    h = kernel._anisotropy_entries()
    if h is None:
        G = torch.from_numpy(mesh.stiffness_matrix().toarray())
    else:
        xx, yy, xy = (torch.from_numpy(g.toarray()) for g in mesh.stiffness_components())
        G = h[0] * xx + h[1] * yy + h[2] * xy
    n = mesh.num_vertices
    kappa, tau = kernel.kappa(), kernel.tau()
    kappa = kappa.expand(n) if kappa.dim() == 0 else kappa
    tau = tau.expand(n) if tau.dim() == 0 else tau
    K = torch.diag(kappa**2 * c) + G
    Q = K
    for _ in range(kernel.alpha - 1):
        Q = Q @ torch.diag(1 / c) @ K
    return tau[:, None] * Q * tau[None, :]


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, covar_module):
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def mesh_kernel(model) -> MeshMaternKernel:
    k = model.covar_module
    return k.base_kernel if isinstance(k, gpytorch.kernels.ScaleKernel) else k


def dense_mll(model, x, y) -> torch.Tensor:
    kernel = mesh_kernel(model)
    scale = model.covar_module.outputscale if isinstance(model.covar_module, gpytorch.kernels.ScaleKernel) else 1.0
    W = kernel.interpolation(x).to_dense()
    Q = dense_precision(kernel)
    K = scale * W @ torch.linalg.solve(Q, W.T) + model.likelihood.noise * torch.eye(len(x), dtype=F64)
    mean = model.mean_module.constant.expand(len(x))
    return torch.distributions.MultivariateNormal(mean, K).log_prob(y) / len(x)


def gradients(value: torch.Tensor, model) -> dict:
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}


CASES = {
    "plane": dict(mesh=lambda: irregular_mesh(), alpha=2),
    "plane-alpha3": dict(mesh=lambda: irregular_mesh(6), alpha=3),
    "plane-alpha1": dict(mesh=lambda: irregular_mesh(), alpha=1),
    "plane-alpha1-anisotropic-nonstationary": dict(mesh=lambda: irregular_mesh(), alpha=1, anisotropy=True, basis=True),
    "sphere-alpha1": dict(mesh=lambda: Mesh.icosphere(2), alpha=1),
    "sphere": dict(mesh=lambda: Mesh.icosphere(2), alpha=2, normalization="sphere"),
    "interval-alpha1": dict(mesh=lambda: Mesh.interval(np.sort(np.random.default_rng(0).uniform(0, 1, 30))), alpha=1),
    "interval-alpha2": dict(mesh=lambda: Mesh.interval(np.linspace(0, 1, 25)), alpha=2),
    "nonstationary": dict(mesh=lambda: irregular_mesh(), alpha=2, basis=True),
    "nonstationary-alpha1-interval": dict(mesh=lambda: Mesh.interval(np.linspace(0, 1, 20)), alpha=1, basis=True),
    "anisotropic": dict(mesh=lambda: irregular_mesh(), alpha=2, anisotropy=True),
    "anisotropic-nonstationary": dict(mesh=lambda: irregular_mesh(), alpha=2, anisotropy=True, basis=True),
    "scale-kernel": dict(mesh=lambda: irregular_mesh(), alpha=2, scale=True),
}


def build(case: str, n: int = 40, seed: int = 0):
    spec = CASES[case]
    mesh = spec["mesh"]()
    kwargs = {}
    if spec.get("basis"):
        v = mesh.vertices
        centred = (v - v.mean(0)) / np.ptp(v, axis=0).max()
        kwargs["kappa_basis"] = centred
        kwargs["tau_basis"] = np.c_[centred[:, :1], centred[:, :1] ** 2]
    if spec.get("anisotropy"):
        kwargs["anisotropy"] = True
    if "normalization" in spec:
        kwargs["normalization"] = spec["normalization"]
    kernel = MeshMaternKernel(mesh, spec["alpha"], **kwargs)
    gen = torch.Generator().manual_seed(seed)
    if mesh.kind == "sphere":
        x = sphere_points(n, seed)
    else:
        lo, hi = mesh.vertices.min(0), mesh.vertices.max(0)
        x = torch.from_numpy(lo + (hi - lo) * np.random.default_rng(seed).uniform(size=(n, mesh.vertices.shape[1])))
    y = torch.sin(3 * x.sum(-1)) + 0.1 * torch.randn(n, generator=gen, dtype=F64)
    covar = gpytorch.kernels.ScaleKernel(kernel) if spec.get("scale") else kernel
    model = GP(x, y, covar).double()
    kernel.range = 0.35 * float(np.ptp(mesh.vertices, axis=0).max())
    kernel.sigma = 0.8
    model.likelihood.noise = 0.05
    model.mean_module.constant.data.fill_(0.1)
    if spec.get("basis"):
        with torch.no_grad():
            kernel.kappa_coefficients.copy_(torch.linspace(-0.4, 0.5, kernel.kappa_coefficients.shape[-1]))
            kernel.tau_coefficients.copy_(torch.linspace(0.3, -0.2, kernel.tau_coefficients.shape[-1]))
    if spec.get("anisotropy"):
        with torch.no_grad():
            kernel.anisotropy_angle.fill_(0.6)
            kernel.anisotropy_log_ratio.fill_(0.8)
    if spec.get("scale"):
        model.covar_module.outputscale = 1.7
    return model, x, y


# ------------------------------------------------------------------ MLL and gradients
@pytest.mark.parametrize("case", list(CASES))
def test_mll_and_gradients_match_dense_float64(case):
    model, x, y = build(case)
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    value = mll(model(x), y)
    reference = dense_mll(model, x, y)
    torch.testing.assert_close(value, reference, **EXACT)
    got, expected = gradients(value, model), gradients(reference, model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **EXACT, msg=lambda m, n=name: f"{n}: {m}")
    assert any(float(g.abs().max()) > 0 for g in got.values())


def test_precision_and_logdet_match_dense():
    for case in ("plane", "sphere", "interval-alpha1", "anisotropic-nonstationary", "plane-alpha3"):
        model, _, _ = build(case)
        kernel = mesh_kernel(model)
        Q = kernel.precision()
        dense = dense_precision(kernel)
        torch.testing.assert_close(Q.to_dense(), dense, **tolerance(F64, "direct"))
        torch.testing.assert_close(Q.logdet(), torch.logdet(dense), **EXACT)
        # log det Q = 2 log det(κ²C̃ + G) − log det C̃ + n log τ² for a stationary α = 2 field
        if case in ("plane", "sphere"):
            c = torch.from_numpy(kernel.mesh.lumped_mass())
            K = torch.diag(kernel.kappa() ** 2 * c) + torch.from_numpy(kernel.mesh.stiffness_matrix().toarray())
            formula = 2 * torch.logdet(K) - c.log().sum() + kernel.num_nodes * torch.log(kernel.tau() ** 2)
            torch.testing.assert_close(Q.logdet(), formula, **EXACT)


def test_input_gradients_match_dense():
    model, x, y = build("plane", n=15)
    kernel = mesh_kernel(model)
    x = x.clone().requires_grad_(True)
    method = "cholesky" if cholmod_available() else "slq"  # exact solves where available (CG: rtol 1e-6)
    with gpsparse.settings.logdet_defaults(method=method):
        K = kernel(x).evaluate_kernel().to_dense()
        (g,) = torch.autograd.grad((K * torch.arange(15.0, dtype=F64)).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    cells, ids, _ = kernel.mesh.locate(x2.detach())
    weights = kernel.mesh.interpolation_weights(x2, cells, ids)
    W = torch.zeros(15, kernel.num_nodes, dtype=F64).scatter(1, torch.from_numpy(ids), weights)
    Kd = W @ torch.linalg.solve(dense_precision(kernel), W.T)
    (gd,) = torch.autograd.grad((Kd * torch.arange(15.0, dtype=F64)).sum(), x2)
    torch.testing.assert_close(g, gd, **(EXACT if cholmod_available() else {"rtol": 1e-3, "atol": 1e-6}))


@pytest.mark.skipif(not cholmod_available(), reason="needs scikit-sparse (CHOLMOD)")
def test_logdet_roads_exact_and_estimated():
    mesh = irregular_mesh(40)  # 1 600 vertices: above the dense road's 1 024 rows
    kernel = MeshMaternKernel(mesh).double()
    kernel.range = 0.3
    Q = kernel.precision()
    assert Q.factor_road() == "cholesky"
    exact = Q.logdet()
    settings_kernel = MeshMaternKernel(mesh, logdet_road="settings").double()
    settings_kernel.range = 0.3
    Qs = settings_kernel.precision()
    assert Qs.factor_road() == "krylov"
    torch.manual_seed(0)
    with gpsparse.settings.logdet_defaults(num_probes=64, num_lanczos=60):
        estimate = Qs.logdet()
    # SLQ on the first-order factor only (measured relative error 3e-3; the offset is exact)
    assert abs(float(estimate - exact)) < 1e-2 * abs(float(exact))
    with gpsparse.settings.logdet_defaults(method="cholesky"):
        assert settings_kernel.precision().factor_road() == "cholesky"
        torch.testing.assert_close(settings_kernel.precision().logdet(), exact, **EXACT)
    # gradients of the exact road (selected inversion of M) against dense autograd
    kernel.raw_range.grad = None
    Q.logdet().backward()
    grad = kernel.raw_range.grad.clone()
    kernel.raw_range.grad = None
    with gpsparse.settings.max_dense_size(10**8):
        torch.logdet(dense_precision(kernel)).backward()
    torch.testing.assert_close(grad, kernel.raw_range.grad, **EXACT)


def test_interval_factor_takes_the_banded_road():
    kernel = MeshMaternKernel(Mesh.interval(np.linspace(0, 1, 3000)), alpha=1).double()
    assert kernel.precision().factor_road() == "banded"


def test_logdet_is_computed_on_first_use_only():
    model, x, _ = build("plane")
    kernel = mesh_kernel(model)
    calls = []
    original = gpsparse.linalg.dispatch.logdet

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    gpsparse.linalg.dispatch.logdet = counting
    try:
        Q = kernel.precision()
        kernel(x).evaluate_kernel().to_dense()  # products and solves need no log-determinant
        assert not calls
        Q.logdet()
        Q.logdet()
        assert len(calls) == 1
        (Q * 2.0).logdet()  # scaling keeps the factorised form (a new operator: one more call)
        assert len(calls) == 2
    finally:
        gpsparse.linalg.dispatch.logdet = original
    torch.testing.assert_close((Q * 2.0).logdet(), Q.logdet() + kernel.num_nodes * math.log(2.0))


# ------------------------------------------------------------------ prediction, sums, Laplace
def dense_posterior(model, x, y, x_test):
    kernel = mesh_kernel(model)
    scale = model.covar_module.outputscale if isinstance(model.covar_module, gpytorch.kernels.ScaleKernel) else 1.0
    Sigma = scale * torch.linalg.inv(dense_precision(kernel))
    W, Ws = kernel.interpolation(x).to_dense(), kernel.interpolation(x_test).to_dense()
    K = W @ Sigma @ W.T + model.likelihood.noise * torch.eye(len(x), dtype=F64)
    Ks, Kss = Ws @ Sigma @ W.T, Ws @ Sigma @ Ws.T
    c = model.mean_module.constant
    mean = c + Ks @ torch.linalg.solve(K, y - c)
    var = (Kss - Ks @ torch.linalg.solve(K, Ks.T)).diagonal()
    return mean, var


@pytest.mark.parametrize("case", ["plane", "sphere", "scale-kernel", "anisotropic-nonstationary"])
def test_predictions_match_dense(case):
    model, x, y = build(case)
    if CASES[case]["mesh"]().kind == "sphere":
        x_test = sphere_points(12, seed=5)
    else:
        x_test = torch.rand(12, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    model.eval()
    exact = cholmod_available()  # CHOLMOD solves; CG (rtol 1e-6) otherwise
    with torch.no_grad(), gpsparse.settings.logdet_defaults(method="cholesky" if exact else "slq"):
        post = model(x_test)
        mean, var = dense_posterior(model, x, y, x_test)
        tol = EXACT if exact else {"rtol": 1e-3, "atol": 1e-5}
        torch.testing.assert_close(post.mean, mean, **tol)
        torch.testing.assert_close(post.variance, var, **tol)


def test_sum_of_two_mesh_kernels_matches_dense():
    mesh = irregular_mesh()
    k1, k2 = MeshMaternKernel(mesh), MeshMaternKernel(Mesh.regular_grid([[0, 0], [1, 1]], 5))
    covar = k1 + k2
    assert isinstance(covar, SparsePrecisionAdditiveKernel)
    x = torch.rand(30, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = torch.sin(5 * x[:, 0])
    model = GP(x, y, covar).double()
    k1.range, k2.range, k2.sigma = 0.3, 0.6, 0.5
    model.likelihood.noise = 0.1
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    value = mll(model(x), y)
    K = sum(
        k.interpolation(x).to_dense() @ torch.linalg.solve(dense_precision(k), k.interpolation(x).to_dense().T)
        for k in (k1, k2)
    ) + model.likelihood.noise * torch.eye(30, dtype=F64)
    reference = torch.distributions.MultivariateNormal(model.mean_module.constant.expand(30), K).log_prob(y) / 30
    torch.testing.assert_close(value, reference, **EXACT)
    got, expected = gradients(value, model), gradients(reference, model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **EXACT)


def test_laplace_model_runs_with_a_mesh_kernel():
    models = pytest.importorskip("gpsparse.models")
    likelihoods = pytest.importorskip("gpsparse.likelihoods")
    mlls = pytest.importorskip("gpsparse.mlls")
    mesh = irregular_mesh()
    x = torch.rand(40, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    y = torch.poisson(torch.exp(torch.sin(4 * x[:, 0])), generator=torch.Generator().manual_seed(3))
    values = []
    for road in ("dense", "auto"):
        kernel = MeshMaternKernel(mesh)
        model = models.LaplaceGP(x, y, likelihoods.PoissonLikelihood(), covar_module=kernel, road=road).double()
        kernel.range = 0.4
        mll = mlls.LaplaceMarginalLogLikelihood(model.likelihood, model)
        model.train()
        value = mll(model(x), y)
        value.backward()
        assert torch.isfinite(kernel.raw_range.grad).all()
        values.append(value.detach())
    torch.testing.assert_close(values[0], values[1], **tolerance(F64, "iterative"))


def test_batch_of_hyperparameters():
    mesh = irregular_mesh(5)
    kernel = MeshMaternKernel(mesh, batch_shape=torch.Size([3])).double()
    kernel.range = torch.tensor([[0.2], [0.4], [0.8]], dtype=F64)
    x = torch.rand(10, 2, dtype=F64)
    exact = cholmod_available()  # exact solves where available
    tol = tolerance(F64, "direct") if exact else {"rtol": 1e-3, "atol": 1e-6}
    with gpsparse.settings.logdet_defaults(method="cholesky" if exact else "slq"):
        K = kernel(x).evaluate_kernel()
        assert K.shape == (3, 10, 10)
        dense = K.to_dense()
        for b in range(3):
            single = MeshMaternKernel(mesh).double()
            single.range = float(kernel.range[b, 0])
            torch.testing.assert_close(dense[b], single(x).evaluate_kernel().to_dense(), **tol)
        diag = kernel(x, diag=True)
        torch.testing.assert_close(diag, dense.diagonal(dim1=-2, dim2=-1), **tol)
    with pytest.raises(NotImplementedError, match="one set of inputs"):
        kernel(torch.rand(3, 10, 2, dtype=F64)).evaluate_kernel()


def test_diag_and_cross_covariance():
    model, x, _ = build("plane")
    kernel = mesh_kernel(model)
    x2 = x.flip(0) * 0.9
    exact = cholmod_available()
    tol = tolerance(F64, "direct") if exact else {"rtol": 1e-3, "atol": 1e-6}
    with gpsparse.settings.logdet_defaults(method="cholesky" if exact else "slq"):
        full = kernel(x, x2).evaluate_kernel().to_dense()
        W1, W2 = kernel.interpolation(x).to_dense(), kernel.interpolation(x2).to_dense()
        torch.testing.assert_close(full, W1 @ torch.linalg.solve(dense_precision(kernel), W2.T), **tol)
        torch.testing.assert_close(kernel(x, x2, diag=True), full.diagonal(), **tol)
    assert kernel.num_interp_builds == 2
    kernel(x.clone())  # equal values: the cache hits
    assert kernel.num_interp_builds == 2


def test_kernel_pickles_and_copies():
    model, x, _ = build("nonstationary")
    kernel = mesh_kernel(model)
    before = kernel(x).evaluate_kernel().to_dense()
    for clone in (copy.deepcopy(kernel), pickle.loads(pickle.dumps(kernel))):
        torch.testing.assert_close(clone(x).evaluate_kernel().to_dense(), before, **tolerance(F64, "iterative"))


# ------------------------------------------------------------------ accuracy against the continuum
def _centre_covariance(m: int, diagonal: str = "up", half_width: float = 4.0, rho: float = 1.0):
    """Column of Q⁻¹ at the centre of a (2·half_width)² regular mesh, the vertices' distances, the mesh size."""
    mesh = Mesh.regular_grid([[-half_width, -half_width], [half_width, half_width]], m, diagonal=diagonal)
    structure = MeshSPDEStructure(mesh, 2)
    kappa = torch.tensor(math.sqrt(8.0) / rho, dtype=F64)
    values = structure.precision_values(kappa**2, matern_tau(kappa, torch.tensor(1.0, dtype=F64), 2, 2)).numpy()
    p = structure.pattern
    Q = sp.csc_matrix(sp.csr_matrix((values, p.col.numpy(), p.crow.numpy()), shape=p.size))
    centre = (m * m) // 2
    e = np.zeros(m * m)
    e[centre] = 1.0
    column = spl.spsolve(Q, e)
    r = np.linalg.norm(mesh.vertices - mesh.vertices[centre], axis=1)
    return column, r, 2 * half_width / (m - 1), float(kappa)


def continuum_error(m: int, diagonal: str = "up") -> tuple[float, float, float]:
    """Max |Q⁻¹ − Matérn(ν = 1)| within 2 ranges of the centre (4 ranges from the boundary), and beyond r ≥ ρ/4."""
    column, r, h, kappa = _centre_covariance(m, diagonal)
    matern = np.where(r > 0, kappa * r * kv(1, kappa * np.maximum(r, 1e-300)), 1.0)
    near = r <= 2.0
    error = np.abs(column - matern)
    return h, float(error[near].max()), float(error[near & (r >= 0.25)].max())


def test_covariance_converges_to_the_continuum_matern():
    # ρ = 1, domain [−4, 4]², α = 2 (ν = 1): h = ρ/8. The largest error is the variance at r = 0 (the
    # FEM's O(h) overshoot); away from r = 0 the error is far smaller. Finer sizes: the slow test below.
    h, err, err_far = continuum_error(65)
    assert h == pytest.approx(0.125)
    assert err < 0.06 and err_far < 0.01


@pytest.mark.slow
def test_covariance_error_versus_mesh_size():
    rows = [(diagonal, *continuum_error(m, diagonal)) for diagonal in ("up", "alternate") for m in (33, 65, 129, 257)]
    for diagonal, h, err, far in rows:
        print(f"{diagonal:9s} h/ρ = {h:.4f}: max error {err:.4f} (r ≥ ρ/4: {far:.5f})")
    for diagonal in ("up", "alternate"):
        errs = [err for d, _, err, _ in rows if d == diagonal]
        assert all(b < a for a, b in zip(errs, errs[1:]))  # decreases with h
        assert errs[-1] < 0.015


def test_sphere_variance_is_sigma_squared_on_a_uniform_icosphere():
    mesh = Mesh.icosphere(4)  # 2 562 vertices, h ≈ 0.075 R
    kernel = MeshMaternKernel(mesh, normalization="sphere").double()
    kernel.range, kernel.sigma = 1.0, 1.0
    Q = kernel.precision()
    with torch.no_grad():
        variances = torch.linalg.inv(Q.to_dense()).diagonal() if not cholmod_available() else None
        if variances is None:
            inverse = Q.selected_inverse()
            variances = inverse[Q.pattern.diagonal_positions]
    # measured: mean 1.028, spread (sd) 0.0021, range [1.012, 1.032]; the FEM's O(h) overshoot, as in the plane
    assert abs(float(variances.mean()) - 1.0) < 0.04
    assert float(variances.std()) < 0.005
    # R-INLA's planar τ: the same field up to the sphere's factor (→ 1 as ρ/R → 0)
    planar = MeshMaternKernel(mesh).double()
    planar.range, planar.sigma = 1.0, 1.0  # set in float64 (the constructor's values are float32-rounded)
    factor = sphere_variance_factor(planar.kappa().detach(), 1.0, 2)
    torch.testing.assert_close(planar.tau() ** 2 * factor, kernel.tau() ** 2, **tolerance(F64, "direct"))


def test_sphere_variance_factor_limits():
    kappa = torch.tensor([2.0, 20.0, 200.0], dtype=F64)
    f = sphere_variance_factor(kappa, 1.0, 2)
    assert float(f[0]) > float(f[1]) > float(f[2]) > 1.0
    assert abs(float(f[2]) - 1.0) < 1e-3  # range ≪ radius: the plane's formula
    # direct series with many more terms
    l_ = torch.arange(400_000, dtype=F64)
    series = ((2 * l_ + 1) / (4 * math.pi) / (4.0 + l_ * (l_ + 1)) ** 2).sum()
    plane = 1 / (4 * math.pi * 4.0)
    torch.testing.assert_close(f[0], series / plane, rtol=2e-9, atol=0)


def test_regular_mesh_agrees_with_the_lattice_kernel():
    """Interior rows: Q_mesh = τ²h²/τ_lat · Q_lattice exactly; covariances equal up to that constant."""
    from gpsparse.core.lattice import lattice_variance

    m, bounds = 61, [[-1.0, -1.0], [2.0, 2.0]]
    h = 3.0 / (m - 1)
    mesh_k = MeshMaternKernel(Mesh.regular_grid(bounds, m)).double()
    lattice_k = LatticeMaternKernel(bounds, m).double()
    # float64 values (GPyTorch's lengthscale setter rounds a Python float to float32)
    mesh_k.range, mesh_k.sigma, lattice_k.lengthscale = 0.3, 1.0, torch.tensor(0.3, dtype=F64)
    with torch.no_grad():
        Qm, Ql = mesh_k.precision(), lattice_k.precision()
        assert Qm.pattern.nnz == Ql.pattern.nnz  # the same 13-point stencil (G is 0 across the diagonals)
        ratio_expected = mesh_k.tau() ** 2 * h**2 / lattice_variance(mesh_k.kappa() ** 2, (h, h), 2)
        row, col = Ql.pattern.row, Ql.pattern.col_long
        i, j = row // m, row % m
        interior = (i >= 2) & (i < m - 2) & (j >= 2) & (j < m - 2)
        pos, found = Qm.pattern.positions(row[interior], col[interior])
        assert bool(found.all())
        torch.testing.assert_close(Qm.values[pos], ratio_expected * Ql.values[interior], rtol=1e-12, atol=1e-9)
        # covariances at points well inside (≥ 3 ranges from the boundary): equal up to the constant
        g = torch.linspace(0.0, 1.0, 6, dtype=F64)
        x = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        with gpsparse.settings.max_dense_size(10**8):
            Km = mesh_k(x).evaluate_kernel().to_dense()
            Kl = lattice_k(x).evaluate_kernel().to_dense()
        torch.testing.assert_close(Km * ratio_expected, Kl, rtol=1e-4, atol=1e-5)
        # the constant is the documented normalisation difference: continuum τ vs unit lattice variance
        assert 1.05 < float(Km.diagonal().mean()) < 1.10 and abs(float(Kl.diagonal().mean()) - 1) < 1e-6


# ------------------------------------------------------------------ non-stationary and anisotropic behaviour
def test_nonstationary_tau_basis_scales_the_variance():
    mesh = irregular_mesh(12)
    flag = (mesh.vertices[:, 0] > 0.5).astype(float)
    kernel = MeshMaternKernel(mesh, tau_basis=flag[:, None]).double()
    kernel.range = 0.2
    with torch.no_grad():
        kernel.tau_coefficients.fill_(math.log(0.5))  # τ halved on the right: variance × 4 there (far from x = 0.5)
        var = torch.linalg.inv(kernel.precision().to_dense()).diagonal()
    v = mesh.vertices
    left = (v[:, 0] > 0.15) & (v[:, 0] < 0.25) & (v[:, 1] > 0.3) & (v[:, 1] < 0.7)
    right = (v[:, 0] > 0.75) & (v[:, 0] < 0.85) & (v[:, 1] > 0.3) & (v[:, 1] < 0.7)
    ratio = float(var[torch.from_numpy(right)].mean() / var[torch.from_numpy(left)].mean())
    assert 3.0 < ratio < 5.0


def test_anisotropy_stretches_the_correlation():
    mesh = Mesh.regular_grid([[-2, -2], [2, 2]], 41, diagonal="alternate")
    kernel = MeshMaternKernel(mesh, anisotropy=True).double()
    kernel.range = 0.5
    with torch.no_grad():
        kernel.anisotropy_log_ratio.fill_(math.log(4.0))  # ranges 0.5·2 along x (φ = 0) and 0.5/2 along y
        H = kernel.anisotropy_matrix()
        torch.testing.assert_close(torch.linalg.det(H), torch.ones((), dtype=F64))
        torch.testing.assert_close(H, torch.diag(torch.tensor([4.0, 0.25], dtype=F64)))
        Sigma = torch.linalg.inv(kernel.precision().to_dense())
    centre, step = 20 * 41 + 20, 4  # the vertex at 0; 4 vertices = 0.4 away along x (×41) and along y (×1)
    along = float(Sigma[centre, centre + step * 41] / Sigma[centre, centre])
    across = float(Sigma[centre, centre + step] / Sigma[centre, centre])

    def matern(r, rho):  # ν = 1 correlation
        z = math.sqrt(8.0) * r / rho
        return float(z * kv(1, z))

    assert abs(along - matern(0.4, 1.0)) < 0.05 and abs(across - matern(0.4, 0.25)) < 0.05
    assert along > 0.45 > matern(0.4, 0.5) > 0.1 > across


# ------------------------------------------------------------------ priors
def test_pc_priors():
    prior = PCMaternRangePrior(0.5, probability=0.1)
    rho = torch.linspace(1e-3, 60.0, 400_001, dtype=torch.float64)
    density = prior.log_prob(rho).exp()
    below = torch.trapezoid(density[rho <= 0.5], rho[rho <= 0.5])
    assert abs(float(below) - 0.1) < 1e-3  # P(ρ < ρ₀) = p
    samples = prior.rsample(torch.Size([200_000]))
    assert abs(float((samples < 0.5).double().mean()) - 0.1) < 5e-3
    sigma_prior = PCMaternSigmaPrior(2.0, probability=0.05)
    torch.testing.assert_close(torch.exp(-sigma_prior.rate * 2.0), torch.tensor(0.05))
    assert float(sigma_prior.log_prob(torch.tensor(1.0))) == pytest.approx(
        math.log(-math.log(0.05) / 2) + math.log(0.05) / 2
    )
    expanded = prior.expand(torch.Size([3]))
    assert expanded.log_prob(torch.ones(3)).shape == (3,)
    with pytest.raises(ValueError, match="range0"):
        PCMaternRangePrior(-1.0)
    with pytest.raises(ValueError, match="sigma0"):
        PCMaternSigmaPrior(1.0, probability=2.0)


def test_priors_enter_the_marginal_likelihood():
    model, x, y = build("plane")
    kernel = mesh_kernel(model)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()
    without = mll(model(x), y)
    range_prior, sigma_prior = PCMaternRangePrior(0.2, 0.5), PCMaternSigmaPrior(1.0, 0.05)
    kernel.register_prior("range_prior", range_prior, lambda m: m.range, lambda m, v: setattr(m, "range", v))
    kernel.register_prior("sigma_prior", sigma_prior, lambda m: m.sigma, lambda m, v: setattr(m, "sigma", v))
    with_priors = mll(model(x), y)
    extra = (range_prior.log_prob(kernel.range).sum() + sigma_prior.log_prob(kernel.sigma).sum()) / len(x)
    torch.testing.assert_close(with_priors - without, extra, **EXACT)
    # the constructor's keywords register the same priors
    k2 = MeshMaternKernel(kernel.mesh, range_prior=PCMaternRangePrior(0.2), sigma_prior=PCMaternSigmaPrior(1.0))
    assert {name for name, *_ in k2.named_priors()} == {"range_prior", "sigma_prior"}


# ------------------------------------------------------------------ bad input
def test_bad_kernel_arguments_raise():
    plane, sphere, line = irregular_mesh(4), Mesh.icosphere(1), Mesh.interval([0.0, 1.0, 2.0])
    cases = [
        (lambda: MeshMaternKernel(plane, alpha=0), ValueError, "≥ 1"),
        (lambda: MeshMaternKernel(sphere, alpha=1, normalization="sphere"), ValueError, "alpha ≥ 2"),
        (lambda: MeshMaternKernel(plane, alpha=0.9), ValueError, "≥ 1"),  # fractional α: tests/test_mesh_fractional.py
        (lambda: MeshMaternKernel(plane, alpha=True), ValueError, "positive number"),
        (lambda: MeshMaternKernel(plane, alpha=float("nan")), ValueError, "≥ 1"),
        (lambda: MeshMaternKernel(plane, normalization="sphere"), ValueError, "spherical mesh"),
        (lambda: MeshMaternKernel(plane, normalization="magic"), ValueError, "normalization"),
        (lambda: MeshMaternKernel(sphere, anisotropy=True), ValueError, "planar mesh"),
        (lambda: MeshMaternKernel(plane, kappa_basis=np.ones((3, 1))), ValueError, "kappa_basis"),
        (lambda: MeshMaternKernel(plane, tau_basis=np.full((16, 1), np.nan)), ValueError, "non-finite"),
        (lambda: MeshMaternKernel(plane, alpha=3, anisotropy=True), ValueError, "alpha = 1 or 2"),
        (lambda: MeshMaternKernel(plane, logdet_road="fast"), ValueError, "logdet_road"),
        (lambda: MeshMaternKernel("mesh"), TypeError, "gpsparse.mesh.Mesh"),
        (lambda: MeshMaternKernel(plane, range_prior="flat"), TypeError, "Prior"),
    ]
    for make, error, match in cases:
        with pytest.raises(error, match=match):
            make()
    assert NORMALIZATIONS == ("rinla", "sphere")
    MeshMaternKernel(line, alpha=1)  # ν = 1/2 on an interval: valid
    MeshMaternKernel(plane, alpha=1)  # ν = 0 in 2-D: the GMRF on the mesh (nominal κ, τ)
    with pytest.raises(ValueError, match="ν = α − d/2 = 0"):
        matern_tau(torch.tensor(2.0), torch.tensor(1.0), 1, 2)  # without nominal=True


def test_bad_inputs_raise():
    kernel = MeshMaternKernel(irregular_mesh(4)).double()
    with pytest.raises(ValueError, match=r"point 1 at \[2.0, 2.0\] lies outside the mesh"):
        kernel(torch.tensor([[0.5, 0.5], [2.0, 2.0]], dtype=F64)).evaluate_kernel()
    with pytest.raises(ValueError, match="shape"):
        kernel(torch.rand(4, 3, dtype=F64)).evaluate_kernel()
    with pytest.raises(ValueError, match="non-finite"):
        kernel(torch.tensor([[0.5, float("nan")]], dtype=F64)).evaluate_kernel()
    with pytest.raises(ValueError, match="expects inputs"):
        kernel.forward(torch.rand(4, dtype=F64), torch.rand(4, dtype=F64))
    with pytest.raises(NotImplementedError, match="last_dim_is_batch"):
        kernel.forward(torch.rand(4, 2, dtype=F64), torch.rand(4, 2, dtype=F64), last_dim_is_batch=True)
    sphere_kernel = MeshMaternKernel(Mesh.icosphere(2)).double()
    with pytest.raises(ValueError, match="off the mesh's sphere"):
        sphere_kernel(torch.tensor([[0.0, 0.0, 1.5]], dtype=F64)).evaluate_kernel()


def test_bad_operator_arguments_raise():
    structure = MeshSPDEStructure(irregular_mesh(4), 2)
    k2, tau = torch.tensor(4.0, dtype=F64), torch.tensor(1.0, dtype=F64)
    values, factor, offset = (
        structure.precision_values(k2, tau),
        structure.factor_values(k2),
        structure.logdet_offset(tau),
    )
    kw = dict(pattern=structure.pattern, factor_pattern=structure.factor_pattern, power=2)
    with pytest.raises(ValueError, match="factor_values"):
        SPDEPrecisionLinearOperator(values, factor[:-1], offset, **kw)
    with pytest.raises(ValueError, match="offset"):
        SPDEPrecisionLinearOperator(values, factor, offset.reshape(1), **kw)
    with pytest.raises(ValueError, match="power"):
        SPDEPrecisionLinearOperator(values, factor, offset, **{**kw, "power": 0})
    with pytest.raises(ValueError, match="logdet_road"):
        SPDEPrecisionLinearOperator(values, factor, offset, **kw, logdet_road="x")
    with pytest.raises(ValueError, match="size"):
        other = MeshSPDEStructure(irregular_mesh(5), 2)
        SPDEPrecisionLinearOperator(
            values, factor, offset, pattern=structure.pattern, factor_pattern=other.factor_pattern, power=2
        )
    with pytest.raises(ValueError, match="alpha"):
        MeshSPDEStructure(irregular_mesh(4), 3, general=True)
    with pytest.raises(ValueError, match="planar"):
        MeshSPDEStructure(Mesh.icosphere(1), 2, anisotropic=True)


# ------------------------------------------------------------------ conformance suite
def _spde_operator(batch_shape=(), dtype=torch.float32):
    # An irregular mesh (no lattice symmetry: distinct eigenvalues), float32 leaves as the suite expects.
    structure = MeshSPDEStructure(irregular_mesh(4, seed=3, span=3.0), 2)
    count = int(torch.Size(batch_shape).numel())
    kappa2 = torch.linspace(0.8, 1.6, count, dtype=dtype).reshape(batch_shape)
    tau = torch.linspace(0.9, 0.6, count, dtype=dtype).reshape(batch_shape)
    pattern = structure.tensors(dtype, "cpu")
    return SPDEPrecisionLinearOperator(
        structure.precision_values(kappa2, tau),
        structure.factor_values(kappa2),
        structure.logdet_offset(tau),
        pattern=pattern["pattern"],
        factor_pattern=pattern["factor_pattern"],
        power=2,
    )


class TestSPDEPrecisionLinearOperator(LinearOperatorTestCase, unittest.TestCase):
    """The whole suite; as ``SparseLinearOperator``'s (tests/test_conformance.py): gpsparse's CG and Lanczos."""

    seed = 0
    should_test_sample = True
    should_call_cg = False
    should_call_lanczos = False

    def create_linear_op(self):
        return _spde_operator()

    def evaluate_linear_op(self, linear_op):
        return linear_op.to_dense()


class TestSPDEPrecisionLinearOperatorBatch(TestSPDEPrecisionLinearOperator):
    seed = 1

    def create_linear_op(self):
        return _spde_operator((2,))


def test_operator_keeps_its_type_where_the_factorised_form_survives():
    Q = _spde_operator((2,), F64)
    assert isinstance(Q * 3.0, SPDEPrecisionLinearOperator)
    assert isinstance(Q._expand_batch(torch.Size([4, 2])), SPDEPrecisionLinearOperator)
    assert isinstance(Q[1], SPDEPrecisionLinearOperator)
    assert not isinstance(Q.add_diagonal(torch.tensor(1.0, dtype=F64)), SPDEPrecisionLinearOperator)
    torch.testing.assert_close(Q[1].logdet(), torch.logdet(Q.to_dense()[1]), **EXACT)
    torch.testing.assert_close((Q * 3.0).logdet(), torch.logdet(3.0 * Q.to_dense()), **EXACT)
    noisy = gpsparse.SparsePrecisionLinearOperator(Q).add_diagonal(torch.tensor(0.5, dtype=F64))
    assert isinstance(noisy, NoisySparsePrecisionLinearOperator)


# ------------------------------------------------------------------ α = 1 in 2-D (ν = 0)
def test_alpha1_in_2d_uses_rinla_nominal_kappa_and_tau():
    """κ = √(8·½)/ρ = 2/ρ and τ² = Γ(½)/(Γ(3/2)·4π·κ·σ²) = 1/(2πκσ²) (R-INLA's inla.spde2.matern, alpha = 1)."""
    for mesh in (irregular_mesh(), Mesh.icosphere(1)):
        kernel = MeshMaternKernel(mesh, alpha=1).double()
        kernel.range, kernel.sigma = 0.4, 1.7
        assert kernel.nu == 0 and kernel.nu_nominal == 0.5
        torch.testing.assert_close(kernel.kappa(), torch.tensor(2 / 0.4, dtype=F64), **EXACT)
        torch.testing.assert_close(kernel.tau() ** 2, torch.tensor(1 / (2 * math.pi * 5.0 * 1.7**2), dtype=F64))
        c = torch.from_numpy(mesh.lumped_mass())
        G = torch.from_numpy(mesh.stiffness_matrix().toarray())
        expected = 1 / (2 * math.pi * 5.0 * 1.7**2) * (25.0 * torch.diag(c) + G)
        torch.testing.assert_close(kernel.precision().to_dense(), expected, **EXACT)
    assert nominal_smoothness(1, 2) == (0.5, 1.5) and nominal_smoothness(2, 2) == (1.0, 2.0)
    assert MeshMaternKernel(irregular_mesh(), alpha=2).nu_nominal == 1.0


def _alpha1_centre_variance(m: int) -> float:
    mesh = Mesh.regular_grid([[-4, -4], [4, 4]], m, diagonal="alternate")
    kernel = MeshMaternKernel(mesh, alpha=1).double()
    kernel.range, kernel.sigma = 1.0, 1.0
    with torch.no_grad():
        values = kernel.precision().values.numpy()
    p = kernel.structure().pattern
    Q = sp.csc_matrix(sp.csr_matrix((values, p.col.numpy(), p.crow.numpy()), shape=p.size))
    e = np.zeros(m * m)
    e[(m * m) // 2] = 1.0
    return float(spl.spsolve(Q, e)[(m * m) // 2])


def test_alpha1_in_2d_variance_grows_like_the_log_of_the_mesh_size():
    """The ν = 0 caveat, measured: variance 4.6σ², 6.2σ², 7.6σ² at h = ρ/4, ρ/8, ρ/16 (centre of [−4ρ, 4ρ]²).

    Each halving of h adds ≈ log 2/(2πτ²) = 1.39σ² (τ² = 1/(2πκσ²), κ = 2/ρ): the continuum limit diverges.
    """
    variances = [_alpha1_centre_variance(m) for m in (33, 65, 129)]
    np.testing.assert_allclose(variances, [4.647, 6.167, 7.602], rtol=2e-3)
    steps = np.diff(variances)
    tau2 = 1 / (2 * math.pi * 2.0)  # κ = 2, σ = 1
    np.testing.assert_allclose(steps, math.log(2) / (2 * math.pi * tau2), rtol=0.1)
