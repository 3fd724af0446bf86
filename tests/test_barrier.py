"""BarrierMaternKernel and gpsparse.mesh.barrier: the barrier model of Bakka et al. (2019).

References are independent of the library's FEM code: a per-triangle loop
assembles the consistent mass, the per-region lumped masses and stiffness
matrices densely (the reference-triangle Jacobian, as in R-INLA's
``inla.barrier.fem``), and R-INLA's formula
``Q = 2/(πσ²) · A (r²C̃_n + (fr)²C̃_b)⁻¹ A``, ``A = M + r²/8 G_n + (fr)²/8 G_b``
is built in float64 torch, differentiable in ``r`` and ``σ``.
"""

from __future__ import annotations

import math
import pickle

import gpytorch
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spl
import torch

import gpsparse
from gpsparse.core.cholmod import cholmod_available
from gpsparse.kernels import BarrierMaternKernel, MeshMaternKernel, PCMaternRangePrior, PCMaternSigmaPrior
from gpsparse.mesh import Mesh, cells_in_polygon
from gpsparse.mesh.barrier import BarrierSPDEStructure, barrier_mask

F64 = torch.float64
EXACT = {"rtol": 1e-8, "atol": 1e-10}


# ------------------------------------------------------------------ fixtures and references
def irregular_mesh(m: int = 7, seed: int = 0, span: float = 1.0) -> Mesh:
    """A jittered ``m × m`` grid with alternating diagonals (no lattice symmetry)."""
    mesh = Mesh.regular_grid([[0, 0], [span, span]], m, diagonal="alternate")
    h = span / (m - 1)
    v = mesh.vertices + np.random.default_rng(seed).uniform(-0.25 * h, 0.25 * h, mesh.vertices.shape)
    edge = np.isclose(mesh.vertices, 0.0) | np.isclose(mesh.vertices, span)
    v[edge] = mesh.vertices[edge]
    return Mesh(v, mesh.cells)


def left_band(mesh: Mesh) -> np.ndarray:
    """Barrier: the triangles with centroid in the vertical band 0.3 < x < 0.5 below y = 0.7."""
    return cells_in_polygon(mesh, [[0.3, -1.0], [0.5, -1.0], [0.5, 0.7], [0.3, 0.7]])


def dense_fem(mesh: Mesh, barrier: np.ndarray):
    """Per-triangle loop: consistent mass, lumped mass per region (normal, barrier), stiffness per region."""
    n = mesh.num_vertices
    C = np.zeros((n, n))
    c = np.zeros((2, n))
    G = np.zeros((2, n, n))
    grads = np.array([[-1.0, -1.0], [1.0, 0.0], [0.0, 1.0]])  # ∇ of the reference hat functions
    for t, tri in enumerate(mesh.cells):
        p = mesh.vertices[tri]
        T = np.stack([p[1] - p[0], p[2] - p[0]], axis=1)  # (D, 2) map from the reference triangle
        area = 0.5 * math.sqrt(np.linalg.det(T.T @ T))
        region = int(barrier[t])
        local_g = area * grads @ np.linalg.inv(T.T @ T) @ grads.T
        for a in range(3):
            c[region, tri[a]] += area / 3
            for b in range(3):
                C[tri[a], tri[b]] += area / 12 * (2.0 if a == b else 1.0)
                G[region, tri[a], tri[b]] += local_g[a, b]
    return torch.from_numpy(C), torch.from_numpy(c), torch.from_numpy(G)


def reference_precision(fem, r: torch.Tensor, sigma: torch.Tensor, fraction: float, mass: str) -> torch.Tensor:
    """R-INLA's ``inla.barrier.q`` formula, densely (``mass="lumped"``: ``C̃`` in place of ``C`` in ``A``)."""
    C, c, G = fem
    M = C if mass == "consistent" else torch.diag(c.sum(0))
    rb = fraction * r
    A = M + r**2 / 8 * G[0] + rb**2 / 8 * G[1]
    noise = r**2 * c[0] + rb**2 * c[1]
    return 2.0 / (math.pi * sigma**2) * A @ torch.diag(1.0 / noise) @ A


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, covar_module):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def base(model) -> BarrierMaternKernel:
    k = model.covar_module
    return k.base_kernel if isinstance(k, gpytorch.kernels.ScaleKernel) else k


def dense_covariance(model, fem, x1, x2=None) -> torch.Tensor:
    kernel = base(model)
    scale = model.covar_module.outputscale if isinstance(model.covar_module, gpytorch.kernels.ScaleKernel) else 1.0
    Q = reference_precision(fem, kernel.range[0], kernel.sigma[0], kernel.range_fraction, kernel.mass)
    W1 = kernel.interpolation(x1).to_dense()
    W2 = W1 if x2 is None else kernel.interpolation(x2).to_dense()
    return scale * W1 @ torch.linalg.solve(Q, W2.T)


def dense_mll(model, fem, x, y) -> torch.Tensor:
    K = dense_covariance(model, fem, x) + model.likelihood.noise * torch.eye(len(x), dtype=F64)
    return torch.distributions.MultivariateNormal(model.mean_module.constant.expand(len(x)), K).log_prob(y) / len(x)


def gradients(value: torch.Tensor, model) -> dict:
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}


CASES = {
    "consistent": dict(mesh=irregular_mesh, mass="consistent", fraction=0.2),
    "lumped": dict(mesh=irregular_mesh, mass="lumped", fraction=0.2),
    "wide-region": dict(mesh=irregular_mesh, mass="consistent", fraction=1.7),
    "scale-kernel": dict(mesh=irregular_mesh, mass="consistent", fraction=0.1, scale=True),
    "sphere": dict(mesh=lambda: Mesh.icosphere(2), mass="consistent", fraction=0.3),
}


def build(case: str, n: int = 40, seed: int = 0):
    spec = CASES[case]
    mesh = spec["mesh"]()
    if mesh.kind == "sphere":
        barrier = np.flatnonzero(np.abs(mesh.vertices[mesh.cells].mean(1)[:, 2]) < 0.15)  # an equatorial belt
        p = np.random.default_rng(seed).standard_normal((n, 3))
        x = torch.from_numpy(p / np.linalg.norm(p, axis=1, keepdims=True))
    else:
        barrier = left_band(mesh)
        x = torch.from_numpy(np.random.default_rng(seed).uniform(size=(n, 2)))
    kernel = BarrierMaternKernel(mesh, barrier, spec["fraction"], mass=spec["mass"])
    y = torch.sin(3 * x.sum(-1)) + 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    covar = gpytorch.kernels.ScaleKernel(kernel) if spec.get("scale") else kernel
    model = GP(x, y, covar).double()
    kernel.range = 0.45 if mesh.kind == "plane" else 0.9
    kernel.sigma = 0.8
    model.likelihood.noise = 0.05
    model.mean_module.constant.data.fill_(0.1)
    if spec.get("scale"):
        model.covar_module.outputscale = 1.7
    return model, x, y, dense_fem(mesh, kernel.barrier)


# ------------------------------------------------------------------ precision against the dense assembly
@pytest.mark.parametrize("case", ["consistent", "lumped", "wide-region", "sphere"])
def test_precision_values_logdet_and_gradients_match_dense_assembly(case):
    model, _, _, fem = build(case)
    kernel = base(model)
    Q = kernel.precision()
    r, sigma = kernel.range[0], kernel.sigma[0]
    reference = reference_precision(fem, r, sigma, kernel.range_fraction, kernel.mass)
    dense = Q.to_dense()
    torch.testing.assert_close(dense, reference, **EXACT)
    assert torch.equal(dense, dense.mT)
    weights = torch.randn(dense.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    params = [kernel.raw_range, kernel.raw_sigma]
    got = torch.autograd.grad((dense * weights).sum(), params, retain_graph=True)
    expected = torch.autograd.grad((reference * weights).sum(), params, retain_graph=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **EXACT)
        assert float(g.abs().max()) > 0
    logdet, ref_logdet = Q.logdet(), torch.logdet(reference)
    torch.testing.assert_close(logdet, ref_logdet, **EXACT)
    for g, e in zip(torch.autograd.grad(logdet, params), torch.autograd.grad(ref_logdet, params)):
        torch.testing.assert_close(g, e, **EXACT)


# ------------------------------------------------------------------ MLL, prediction, Laplace
@pytest.mark.parametrize("case", list(CASES))
def test_mll_and_gradients_match_dense_float64(case):
    model, x, y, fem = build(case)
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    value = mll(model(x), y)
    reference = dense_mll(model, fem, x, y)
    torch.testing.assert_close(value, reference, **EXACT)
    got, expected = gradients(value, model), gradients(reference, model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **EXACT, msg=lambda m, n=name: f"{n}: {m}")
    assert all(float(g.abs().max()) > 0 for name, g in got.items() if "raw_range" in name or "raw_sigma" in name)


@pytest.mark.skipif(not cholmod_available(), reason="exact solves need CHOLMOD (CG: rtol 1e-6)")
def test_predictions_match_dense():
    model, x, y, fem = build("consistent")
    x_test = torch.rand(12, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    model.eval()
    with torch.no_grad(), gpsparse.settings.logdet_defaults(method="cholesky"):
        post = model(x_test)
        K = dense_covariance(model, fem, x) + model.likelihood.noise * torch.eye(len(x), dtype=F64)
        Ks = dense_covariance(model, fem, x_test, x)
        Kss = dense_covariance(model, fem, x_test)
        mean = model.mean_module.constant + Ks @ torch.linalg.solve(K, y - model.mean_module.constant)
        var = Kss.diag() - (Ks * torch.linalg.solve(K, Ks.T).T).sum(-1)
        torch.testing.assert_close(post.mean, mean, **EXACT)
        torch.testing.assert_close(post.variance, var, **EXACT)


def test_laplace_model_runs_with_a_barrier_kernel():
    models = pytest.importorskip("gpsparse.models")
    likelihoods = pytest.importorskip("gpsparse.likelihoods")
    mlls = pytest.importorskip("gpsparse.mlls")
    mesh = irregular_mesh()
    x = torch.rand(40, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    y = torch.poisson(torch.exp(torch.sin(4 * x[:, 0])), generator=torch.Generator().manual_seed(3))
    values = []
    for road in ("dense", "auto"):
        kernel = BarrierMaternKernel(mesh, left_band(mesh))
        model = models.LaplaceGP(x, y, likelihoods.PoissonLikelihood(), covar_module=kernel, road=road).double()
        kernel.range = 0.4
        model.train()
        value = mlls.LaplaceMarginalLogLikelihood(model.likelihood, model)(model(x), y)
        value.backward()
        assert torch.isfinite(kernel.raw_range.grad).all() and float(kernel.raw_range.grad.abs()) > 0
        values.append(value.detach())
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------ relation to the stationary model
def test_no_barrier_lumped_equals_the_stationary_alpha2_model():
    """``f = 1`` and ``mass="lumped"``: exactly ``MeshMaternKernel(alpha=2)`` (same κ, τ, Q, log det)."""
    for mesh in (irregular_mesh(), Mesh.icosphere(2)):
        barrier = np.arange(0, mesh.num_cells, 3)
        stationary = MeshMaternKernel(mesh, 2).double()
        kernel = BarrierMaternKernel(mesh, barrier, 1.0, mass="lumped").double()
        for k in (stationary, kernel):
            k.range, k.sigma = 0.6, 1.3
        torch.testing.assert_close(kernel.precision().to_dense(), stationary.precision().to_dense(), **EXACT)
        torch.testing.assert_close(kernel.precision().logdet(), stationary.precision().logdet(), **EXACT)


def test_no_barrier_consistent_is_the_stationary_model_with_the_consistent_mass():
    """``f = 1``, R-INLA's barrier mass: ``Q = τ²(κ²C + G)C̃⁻¹(κ²C + G)`` (κ, τ of the α = 2 model).

    It differs from the stationary ``τ²(κ²C̃ + G)C̃⁻¹(κ²C̃ + G)`` by the mass lumping only: the
    covariance at the data differs by a few per cent of the variance (measured below), not more.
    """
    mesh = irregular_mesh(9)
    stationary = MeshMaternKernel(mesh, 2).double()
    kernel = BarrierMaternKernel(mesh, left_band(mesh), 1.0).double()
    for k in (stationary, kernel):
        k.range, k.sigma = 0.5, 1.0
    kappa2, tau = stationary.kappa() ** 2, stationary.tau()
    C = torch.from_numpy(mesh.mass_matrix().toarray())
    c = torch.from_numpy(mesh.lumped_mass())
    G = torch.from_numpy(mesh.stiffness_matrix().toarray())
    K = kappa2 * C + G
    torch.testing.assert_close(kernel.precision().to_dense(), tau**2 * K @ torch.diag(1 / c) @ K, **EXACT)
    x = torch.rand(30, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    cov = [
        torch.linalg.solve(k.precision().to_dense(), torch.eye(mesh.num_vertices, dtype=F64))
        for k in (kernel, stationary)
    ]
    W = kernel.interpolation(x).to_dense()
    diff = (W @ (cov[0] - cov[1]) @ W.T).abs().max() / (W @ cov[1] @ W.T).diag().max()
    assert 1e-4 < float(diff) < 0.1


def test_all_barrier_is_the_stationary_model_with_the_barrier_range():
    mesh = irregular_mesh()
    kernel = BarrierMaternKernel(mesh, np.ones(mesh.num_cells, dtype=bool), 0.4, mass="lumped").double()
    stationary = MeshMaternKernel(mesh, 2).double()
    kernel.range, kernel.sigma = 1.5, 0.7
    stationary.range, stationary.sigma = 0.6, 0.7
    torch.testing.assert_close(kernel.barrier_range, stationary.range)
    torch.testing.assert_close(kernel.precision().to_dense(), stationary.precision().to_dense(), **EXACT)


# ------------------------------------------------------------------ the physical property
def _correlations(kernel, x: np.ndarray) -> np.ndarray:
    structure = kernel.structure()
    with torch.no_grad():
        values = kernel.precision().values.numpy()
    p = structure.pattern
    Q = sp.csc_matrix(sp.csr_matrix((values, p.col.numpy(), p.crow.numpy()), shape=p.size))
    W = sp.csr_matrix(kernel.mesh.interpolation(x).to_dense().numpy())
    K = W @ spl.splu(Q).solve(W.T.toarray())
    d = np.sqrt(np.diag(K))
    return K / d[:, None] / d[None, :]


def test_correlation_does_not_leak_across_a_barrier():
    """A 4 × 2 rectangle (h = 0.05), a wall 0.2 wide at x = 2 from y = 0 to 1.5 (gap above), range 1.

    Points 0.6 apart at y = 0.5 (0.2 in front of the wall on either side): measured correlation across
    the wall 0.018 (consistent mass) / 0.020 (lumped); at the same distance on one side 0.416 / 0.416;
    the stationary model gives 0.387 across. Through the gap (y = 1.8, same points) 0.39.
    """
    mesh = Mesh.regular_grid([[0, 0], [4, 2]], [81, 41], diagonal="alternate")
    wall = cells_in_polygon(mesh, [[1.9, -1], [2.1, -1], [2.1, 1.5], [1.9, 1.5]])
    x = np.array([[1.7, 0.5], [2.3, 0.5], [1.1, 0.5], [1.7, 1.8], [2.3, 1.8]])
    stationary = MeshMaternKernel(mesh).double()
    stationary.range = 1.0
    across_stationary = _correlations(stationary, x)[0, 1]
    for mass in ("consistent", "lumped"):
        kernel = BarrierMaternKernel(mesh, wall, mass=mass).double()
        kernel.range = 1.0
        rho = _correlations(kernel, x)
        across, along, gap = rho[0, 1], rho[0, 2], rho[3, 4]
        assert across < 0.03, across
        assert along > 0.4 and across < 0.1 * along, (across, along)
        assert across < 0.1 * across_stationary
        assert gap > 0.35  # the gap lets it through
    assert 0.35 < across_stationary < 0.45
    # no barrier (f = 1): the stationary correlation across
    kernel = BarrierMaternKernel(mesh, wall, 1.0, mass="lumped").double()
    kernel.range = 1.0
    np.testing.assert_allclose(_correlations(kernel, x)[0, 1], across_stationary, rtol=1e-10)


# ------------------------------------------------------------------ helpers, priors, bad input
def test_cells_in_polygon_and_masks():
    mesh = Mesh.regular_grid([[0, 0], [1, 1]], 11)  # 200 triangles of area 0.005
    square = [[0.2, 0.2], [0.6, 0.2], [0.6, 0.6], [0.2, 0.6]]
    cells = cells_in_polygon(mesh, square)
    assert cells.dtype == np.int64 and len(cells) == 2 * 16  # 4 × 4 cells of two triangles
    centroids = mesh.vertices[mesh.cells[cells]].mean(1)
    assert ((centroids > 0.2) & (centroids < 0.6)).all()
    hole = [[0.3, 0.3], [0.5, 0.3], [0.5, 0.5], [0.3, 0.5]]
    assert len(cells_in_polygon(mesh, square, holes=[hole])) == 2 * 12
    assert len(cells_in_polygon(mesh, square[::-1] + [square[-1]])) == 32  # orientation, closing copy
    mask = barrier_mask(mesh, np.r_[cells, cells[:3]])  # repeats allowed
    assert mask.sum() == 32 and np.array_equal(np.flatnonzero(mask), cells)
    assert np.array_equal(barrier_mask(mesh, torch.from_numpy(mask)), mask)
    kernel = BarrierMaternKernel(mesh, mask)
    assert np.array_equal(kernel.barrier_triangles, cells)
    original = cells.copy()
    BarrierMaternKernel(mesh, cells)
    assert np.array_equal(cells, original)  # inputs are not modified
    assert BarrierSPDEStructure(mesh, []).barrier.sum() == 0
    with pytest.raises(ValueError, match="planar mesh"):
        cells_in_polygon(Mesh.icosphere(1), square)


def test_priors_pickle_and_structure_cache():
    mesh = irregular_mesh()
    kernel = BarrierMaternKernel(
        mesh, left_band(mesh), range_prior=PCMaternRangePrior(0.3, 0.5), sigma_prior=PCMaternSigmaPrior(1.0, 0.05)
    ).double()
    priors = {name for name, *_ in kernel.named_priors()}
    assert priors == {"range_prior", "sigma_prior"}
    kernel.precision()
    clone = pickle.loads(pickle.dumps(kernel))
    assert clone._structure is None
    torch.testing.assert_close(clone.precision().to_dense(), kernel.precision().to_dense())
    assert isinstance(kernel.structure(), BarrierSPDEStructure)


def test_bad_input_raises():
    plane, line = irregular_mesh(4), Mesh.interval([0.0, 1.0, 2.0])
    m = plane.num_cells
    cases = [
        (lambda: BarrierMaternKernel(plane, [0, m]), f"index {m} is out of range"),
        (lambda: BarrierMaternKernel(plane, [-1]), "index -1 is out of range"),
        (lambda: BarrierMaternKernel(plane, [0.5]), "integer triangle indices"),
        (lambda: BarrierMaternKernel(plane, np.ones(m + 1, dtype=bool)), "one entry per triangle"),
        (lambda: BarrierMaternKernel(plane, [0], 0.0), "range_fraction"),
        (lambda: BarrierMaternKernel(plane, [0], -0.2), "range_fraction"),
        (lambda: BarrierMaternKernel(plane, [0], float("nan")), "range_fraction"),
        (lambda: BarrierMaternKernel(plane, [0], "small"), "range_fraction"),
        (lambda: BarrierMaternKernel(plane, [0], mass="exact"), "mass"),
        (lambda: BarrierMaternKernel(line, [0]), "2-D mesh"),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(TypeError, match="gpsparse.mesh.Mesh"):
        BarrierMaternKernel("mesh", [0])
    structure = BarrierSPDEStructure(plane, [0])
    with pytest.raises(ValueError, match="isotropic"):
        structure.precision_values(torch.tensor(1.0, dtype=F64), torch.tensor(1.0, dtype=F64), torch.ones(3))
