"""WendlandKernel and the grid neighbour search: values, patterns, caching, gradients, batches, errors, size."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import gpytorch
import pytest
import torch
from helpers import tolerance

from gpsparse import SparseLinearOperator
from gpsparse.core.neighbors import radius_pairs
from gpsparse.kernels import WendlandKernel, wendland_phi31

TOL = tolerance(torch.float64, "direct")


# ------------------------------------------------------------------ references
def dense_wendland(x1: torch.Tensor, x2: torch.Tensor, radius) -> torch.Tensor:
    """Dense reference k = (1 − r)₊⁴ (4r + 1), r = ‖x − x'‖/ρ, via torch.cdist (differentiable in ρ)."""
    r = torch.cdist(x1, x2) / radius
    return (1 - r).clamp_min(0) ** 4 * (4 * r + 1)


def dense_wendland_ard(x1: torch.Tensor, x2: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Dense reference with per-dimension radii ``(d,)``; safe at coincident points (differentiable in x)."""
    q = (((x1.unsqueeze(-2) - x2.unsqueeze(-3)) / radius) ** 2).sum(-1)
    zero = q == 0
    r = torch.where(zero, 0.0, torch.where(zero, 1.0, q).sqrt())
    return (1 - r).clamp_min(0) ** 4 * (4 * r + 1)


def _kernel(radius, **kwargs) -> WendlandKernel:
    kernel = WendlandKernel(**kwargs).double()
    kernel.radius = torch.as_tensor(radius, dtype=torch.float64)
    return kernel


def _points(n, d, seed=0, dtype=torch.float64):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------- neighbour search
@pytest.fixture(params=["kdtree", "grid"])
def backend(request, monkeypatch):
    """Both CPU searches: scipy's cKDTree (the default) and the torch grid search that CUDA tensors use."""
    import gpsparse.core.neighbors as neighbors

    monkeypatch.setattr(neighbors, "_CPU_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "rectangular"])
def test_radius_pairs_equal_brute_force(d, symmetric, backend):
    x = _points(400, d, seed=1)
    x[:5] = x[5:10]  # coincident points
    y = None if symmetric else _points(250, d, seed=2)
    radius = torch.tensor([0.1, 0.2, 0.15][:d], dtype=torch.float64)
    row, col = radius_pairs(x, y, radius=radius)
    other = x if symmetric else y
    expected = ((((x[:, None] - other[None]) / radius) ** 2).sum(-1) < 1).nonzero()
    got = torch.stack([row, col], 1)
    assert got.shape[0] == torch.unique(got, dim=0).shape[0]  # no duplicates
    assert torch.equal(torch.unique(got, dim=0), torch.unique(expected, dim=0))


def test_radius_pairs_chunked_search_is_identical(monkeypatch):
    import gpsparse.core.neighbors as neighbors

    monkeypatch.setattr(neighbors, "_CPU_BACKEND", "grid")  # the chunking is the grid search's (CUDA's path)

    x = _points(600, 2, seed=3)
    full = radius_pairs(x, radius=0.1)
    monkeypatch.setattr(neighbors, "_CHUNK_CANDIDATES", 257)
    chunked = radius_pairs(x, radius=0.1)
    key = lambda rc: torch.sort(rc[0] * 600 + rc[1]).values  # noqa: E731
    assert torch.equal(key(full), key(chunked))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_radius_pairs_ties_at_the_radius_agree(monkeypatch, dtype):
    """A regular lattice puts many pairs at the radius, up to rounding: cKDTree and the grid search agree exactly."""
    import gpsparse.core.neighbors as neighbors

    g = torch.arange(12, dtype=dtype) * 0.1
    x = torch.cartesian_prod(g, g)
    found = {}
    for name in ("kdtree", "grid"):
        monkeypatch.setattr(neighbors, "_CPU_BACKEND", name)
        row, col = radius_pairs(x, radius=0.1)
        found[name] = torch.unique(torch.stack([row, col], 1), dim=0)
    assert torch.equal(found["kdtree"], found["grid"])
    if dtype == torch.float64:  # rounding puts some of the lattice neighbours inside the radius
        assert found["grid"].shape[0] > x.shape[0]


def test_radius_pairs_errors(backend):
    x = _points(10, 2)
    with pytest.raises(ValueError, match="contains NaN"):
        radius_pairs(torch.full((3, 2), float("nan")), radius=1.0)
    with pytest.raises(ValueError, match="positive finite"):
        radius_pairs(x, radius=0.0)
    with pytest.raises(ValueError, match="same number of dimensions"):
        radius_pairs(x, _points(4, 3), radius=1.0)
    with pytest.raises(ValueError, match="2-D tensor"):
        radius_pairs(torch.rand(5), radius=1.0)
    with pytest.raises(RuntimeError, match="max_pairs"):
        radius_pairs(x, radius=10.0, max_pairs=50)


# -------------------------------------------------------------------- values
@pytest.mark.parametrize("d", [1, 2, 3])
def test_symmetric_values_match_dense_reference(d):
    x = _points(300, d)
    kernel = _kernel(0.25)
    op = kernel(x).evaluate_kernel()
    assert isinstance(op, SparseLinearOperator)
    assert op.pattern.symmetric and op.shape == (300, 300)
    assert bool((op.pattern.diagonal_positions >= 0).all())  # the diagonal is always stored
    torch.testing.assert_close(op.to_dense(), dense_wendland(x, x, 0.25), **TOL)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_rectangular_values_match_dense_reference(d):
    x1, x2 = _points(200, d, seed=1), _points(150, d, seed=2)
    kernel = _kernel(0.3)
    op = kernel(x1, x2).evaluate_kernel()
    assert isinstance(op, SparseLinearOperator)
    assert not op.pattern.symmetric and op.shape == (200, 150)
    torch.testing.assert_close(op.to_dense(), dense_wendland(x1, x2, 0.3), **TOL)


def test_equal_tensors_give_a_symmetric_pattern():
    x = _points(100, 2)
    kernel = _kernel(0.2)
    assert kernel.forward(x, x.clone()).pattern.symmetric
    assert not kernel.forward(x, x[:99]).pattern.symmetric


def test_ard_values_match_dense_reference():
    x1, x2 = _points(200, 3, seed=1), _points(120, 3, seed=2)
    radius = torch.tensor([[0.2, 0.4, 0.3]], dtype=torch.float64)
    kernel = _kernel(radius, ard_num_dims=3)
    torch.testing.assert_close(kernel.forward(x1, x1).to_dense(), dense_wendland_ard(x1, x1, radius[0]), **TOL)
    torch.testing.assert_close(kernel.forward(x1, x2).to_dense(), dense_wendland_ard(x1, x2, radius[0]), **TOL)


def test_float32_inputs_and_parameters():
    x = _points(200, 2, dtype=torch.float32)
    kernel = WendlandKernel()
    kernel.radius = 0.2
    op = kernel(x).evaluate_kernel()
    assert op.dtype == torch.float32
    reference = dense_wendland(x.double(), x.double(), kernel.radius.detach().double().item())
    torch.testing.assert_close(op.to_dense().double(), reference, **tolerance(torch.float32, "direct"))


# ------------------------------------------------------------------ patterns
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "rectangular"])
def test_pattern_holds_every_pair_within_radius_and_none_beyond_margin(d, symmetric):
    x1 = _points(500, d, seed=4)
    x2 = x1 if symmetric else _points(450, d, seed=5)
    radius = 0.12
    kernel = _kernel(radius)
    pattern = kernel.forward(x1, x2).pattern
    stored = torch.zeros(pattern.size, dtype=torch.bool)
    stored[pattern.row, pattern.col_long] = True
    dist = torch.cdist(x1, x2)
    assert bool(stored[dist < radius].all())  # misses no pair with r < ρ
    assert not bool(stored[dist >= kernel.search_margin * radius].any())  # nothing beyond the search radius
    assert bool((dist[stored] >= radius).any())  # the margin is really there: explicit zeros are stored


def test_entries_beyond_the_radius_are_exact_zeros_with_zero_gradient():
    x = _points(300, 2)
    kernel = _kernel(0.2)
    kernel.forward(x, x)
    kernel.radius = 0.19  # shrink within the cached pattern
    op = kernel.forward(x, x)
    assert kernel.num_pattern_builds == 1
    row, col = op.pattern.row, op.pattern.col_long
    outside = (x[row] - x[col]).norm(dim=-1) >= 0.19
    assert bool(outside.any())
    assert bool((op.values[outside] == 0).all())
    (grad,) = torch.autograd.grad((op.values * torch.rand_like(op.values)).sum(), kernel.raw_radius, retain_graph=True)
    (masked,) = torch.autograd.grad(op.values[outside].sum(), kernel.raw_radius)
    assert grad.abs().item() > 0 and masked.abs().item() == 0


# ------------------------------------------------------------------- caching
def test_pattern_is_cached_across_calls_and_small_radius_changes():
    x = _points(400, 2)
    kernel = _kernel(0.1)
    first = kernel(x).evaluate_kernel()
    second = kernel(x).evaluate_kernel()
    assert second.pattern is first.pattern and kernel.num_pattern_builds == 1
    assert kernel.forward(x.clone(), x.clone()).pattern is first.pattern  # equal tensors: a torch.equal hit
    for radius in (0.105, 0.109, 0.095, 0.08):  # within the margin, or shrunk less than max_search_ratio
        kernel.radius = radius
        assert kernel(x).evaluate_kernel().pattern is first.pattern
    assert kernel.num_pattern_builds == 1


def test_pattern_is_rebuilt_when_radius_grows_past_margin_or_shrinks_far():
    x = _points(400, 2)
    kernel = _kernel(0.1)
    first = kernel.forward(x, x)
    kernel.radius = 0.111  # past the search radius 1.1 · 0.1
    grown = kernel.forward(x, x)
    assert grown.pattern is not first.pattern and kernel.num_pattern_builds == 2
    torch.testing.assert_close(grown.to_dense(), dense_wendland(x, x, 0.111), **TOL)
    kernel.radius = 0.05  # search radius 0.1221 > 1.5 · 0.05: too many stored zeros
    shrunk = kernel.forward(x, x)
    assert kernel.num_pattern_builds == 3 and shrunk.pattern.nnz < grown.pattern.nnz
    torch.testing.assert_close(shrunk.to_dense(), dense_wendland(x, x, 0.05), **TOL)


def test_pattern_is_rebuilt_when_inputs_change():
    x = _points(300, 2)
    kernel = _kernel(0.1)
    first = kernel.forward(x, x)
    other = _points(300, 2, seed=9)
    assert kernel.forward(other, other).pattern is not first.pattern
    assert kernel.num_pattern_builds == 2
    assert kernel.forward(x, x).pattern is first.pattern  # both kept (pattern_cache_size = 2)
    x[0] += 0.5  # in place
    op = kernel.forward(x, x)
    assert kernel.num_pattern_builds == 3
    torch.testing.assert_close(op.to_dense(), dense_wendland(x, x, 0.1), **TOL)


# ----------------------------------------------------------------- gradients
def _radius_grad(kernel):
    """d/dρ from the gradient of the raw parameter (softplus: dρ/draw = sigmoid(raw))."""
    return (kernel.raw_radius.grad / torch.sigmoid(kernel.raw_radius.detach())).reshape(())


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "rectangular"])
def test_radius_gradient_of_bilinear_form_matches_dense_reference(symmetric):
    x1 = _points(250, 2, seed=1)
    x2 = x1 if symmetric else _points(200, 2, seed=2)
    left = torch.randn(x1.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    right = torch.randn(x2.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kernel = _kernel(0.2)
    (left * (kernel(x1, x2).evaluate_kernel() @ right)).sum().backward()
    radius = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    (left * (dense_wendland(x1, x2, radius) @ right)).sum().backward()
    torch.testing.assert_close(_radius_grad(kernel), radius.grad, **TOL)


def test_radius_gradient_of_weighted_values_matches_dense_reference():
    x = _points(300, 2)
    kernel = _kernel(0.15)
    weights = torch.rand(300, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    op = kernel.forward(x, x)
    (op.values * weights[op.pattern.row, op.pattern.col_long]).sum().backward()
    radius = torch.tensor(0.15, dtype=torch.float64, requires_grad=True)
    (dense_wendland(x, x, radius) * weights).sum().backward()
    torch.testing.assert_close(_radius_grad(kernel), radius.grad, **TOL)


def test_input_gradient_matches_dense_reference():
    x1 = _points(120, 2, seed=1).requires_grad_(True)
    x2 = _points(90, 2, seed=2).requires_grad_(True)
    radius = torch.tensor([0.3, 0.2], dtype=torch.float64)
    kernel = _kernel(radius.reshape(1, 2), ard_num_dims=2)
    w = torch.rand(120, 90, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    grads = torch.autograd.grad((kernel.forward(x1, x2).to_dense() * w).sum(), (x1, x2))
    expected = torch.autograd.grad((dense_wendland_ard(x1, x2, radius) * w).sum(), (x1, x2))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, **TOL)
    # symmetric, with coincident points on the diagonal: finite gradients
    (gx,) = torch.autograd.grad(kernel.forward(x1, x1).to_dense().sum(), x1)
    (ex,) = torch.autograd.grad(dense_wendland_ard(x1, x1, radius).sum(), x1)
    assert bool(torch.isfinite(gx).all())
    torch.testing.assert_close(gx, ex, **TOL)


def test_phi31_gradcheck_across_support_boundary():
    r = torch.tensor([0.0, 1e-8, 0.3, 0.7, 0.999, 1.0, 1.2, 3.0], dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(wendland_phi31(r.detach()), (1 - r.detach()).clamp_min(0) ** 4 * (4 * r.detach() + 1))
    q = (r.detach()[2:] ** 2).requires_grad_(True)  # q ≫ gradcheck's step: away from the kink of √q at 0
    assert torch.autograd.gradcheck(lambda s: wendland_phi31(s.sqrt()), (q,))
    (g,) = torch.autograd.grad(wendland_phi31(r).sum(), r)
    expected = -20 * r.detach() * (1 - r.detach()).clamp_min(0) ** 3
    torch.testing.assert_close(g, expected, **TOL)


# ---------------------------------------------------------------- diag, batch
def test_diag_returns_dense_diagonal():
    x = _points(50, 2)
    kernel = _kernel(0.2)
    diag = kernel(x, diag=True)
    assert isinstance(diag, torch.Tensor) and diag.shape == (50,)
    torch.testing.assert_close(diag, torch.ones(50, dtype=torch.float64))
    other = x + 0.05
    torch.testing.assert_close(kernel(x, other, diag=True), torch.diagonal(dense_wendland(x, other, 0.2)), **TOL)
    scaled = gpytorch.kernels.ScaleKernel(kernel).double()
    scaled.outputscale = torch.tensor(2.0, dtype=torch.float64)
    torch.testing.assert_close(scaled(x, diag=True), torch.full((50,), 2.0, dtype=torch.float64), **TOL)


def test_batched_radius_shares_one_pattern():
    x = _points(200, 2)
    radii = torch.tensor([0.1, 0.15, 0.2], dtype=torch.float64)
    kernel = _kernel(radii.view(3, 1, 1), batch_shape=torch.Size([3]))
    op = kernel(x).evaluate_kernel()
    assert isinstance(op, SparseLinearOperator) and op.shape == (3, 200, 200)
    assert op.values.shape == (3, op.pattern.nnz)
    dense = op.to_dense()
    for b in range(3):
        torch.testing.assert_close(dense[b], dense_wendland(x, x, radii[b].item()), **TOL)
    torch.testing.assert_close(kernel(x, diag=True), torch.ones(3, 200, dtype=torch.float64))
    # a batched ScaleKernel keeps the type
    scaled = gpytorch.kernels.ScaleKernel(kernel, batch_shape=torch.Size([3])).double()
    assert isinstance(scaled(x).evaluate_kernel(), SparseLinearOperator)


def test_batched_inputs_get_the_union_pattern():
    x = torch.stack([_points(150, 2, seed=s) for s in range(2)])
    kernel = _kernel(0.15)
    op = kernel(x).evaluate_kernel()
    assert op.shape == (2, 150, 150) and op.pattern.symmetric
    dense = op.to_dense()
    for b in range(2):
        torch.testing.assert_close(dense[b], dense_wendland(x[b], x[b], 0.15), **TOL)
    same = kernel(x[:1].expand(4, 150, 2)).evaluate_kernel()  # equal members: a single member's pattern
    assert same.pattern.nnz == kernel.forward(x[0], x[0]).pattern.nnz


# ------------------------------------------------------------------ gpytorch
def test_scale_kernel_and_noise_keep_the_sparse_type():
    x = _points(300, 2)
    covar = gpytorch.kernels.ScaleKernel(_kernel(0.15)).double()
    covar.outputscale = torch.tensor(1.7, dtype=torch.float64)
    lazy = covar(x)
    evaluated = lazy.evaluate_kernel()
    assert isinstance(evaluated, SparseLinearOperator)
    torch.testing.assert_close(evaluated.to_dense(), 1.7 * dense_wendland(x, x, 0.15), **TOL)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = torch.tensor(0.1, dtype=torch.float64)
    prior = gpytorch.distributions.MultivariateNormal(torch.zeros(300, dtype=torch.float64), lazy)
    noisy = likelihood(prior).lazy_covariance_matrix.evaluate_kernel()
    assert isinstance(noisy, SparseLinearOperator)
    torch.testing.assert_close(
        noisy.to_dense(), 1.7 * dense_wendland(x, x, 0.15) + 0.1 * torch.eye(300, dtype=torch.float64), **TOL
    )
    noisy.inv_quad(torch.ones(300, 1, dtype=torch.float64)).backward()
    for p in (likelihood.raw_noise, covar.raw_outputscale, covar.base_kernel.raw_radius):
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and bool((p.grad != 0).all())


def test_radius_prior_and_constraint():
    prior = gpytorch.priors.GammaPrior(2.0, 10.0)
    kernel = WendlandKernel(radius_prior=prior, radius_constraint=gpytorch.constraints.Interval(0.01, 1.0))
    kernel.radius = 0.3
    torch.testing.assert_close(kernel.radius, torch.tensor([[0.3]]))
    ((name, module, p, closure, _),) = [t for t in kernel.named_priors()]
    assert name == "radius_prior" and p is prior
    torch.testing.assert_close(closure(module), kernel.radius)


# -------------------------------------------------------------------- errors
def test_errors():
    kernel = _kernel(0.2)
    x = _points(20, 2)
    with pytest.raises(ValueError, match="positive definite only for inputs of dimension ≤ 3; got d=4"):
        kernel(_points(20, 4)).evaluate_kernel()
    with pytest.raises(ValueError, match="dimension ≤ 3; got ard_num_dims=4"):
        WendlandKernel(ard_num_dims=4)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="contain NaN"):
        kernel(bad).evaluate_kernel()
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="contain Inf"):
        kernel.forward(x, bad)
    with pytest.raises(ValueError, match="same number of dimensions"):
        kernel.forward(x, _points(20, 3))
    with pytest.raises(RuntimeError, match="same number of dimensions"):  # gpytorch's own check in __call__
        kernel(x, _points(20, 3))
    with pytest.raises(ValueError, match="ard_num_dims=3 but got inputs of dimension 2"):
        _kernel(torch.full((1, 3), 0.2), ard_num_dims=3).forward(x, x)
    with pytest.raises(NotImplementedError, match="last_dim_is_batch"):
        kernel.forward(x, x, last_dim_is_batch=True)
    with pytest.raises(RuntimeError, match="max_pairs"):
        _kernel(5.0, max_nnz=100).forward(x, x)
    with pytest.raises(ValueError, match="search_margin must be"):
        WendlandKernel(search_margin=0.9)
    with pytest.raises(TypeError, match="Expected gpytorch.priors.Prior"):
        WendlandKernel(radius_prior=0.5)


# ---------------------------------------------------------------------- size
SIZE_SCRIPT = textwrap.dedent(
    """
    import json, resource, time, torch, gpytorch
    def peak_rss_kib():
        # this process's own peak RSS in KiB: VmHWM (a child's ru_maxrss starts at its parent's RSS at fork)
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from gpsparse import SparseLinearOperator
    from gpsparse.kernels import WendlandKernel

    torch.set_num_threads(1)
    n = 200_000
    x = torch.rand(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    covar = gpytorch.kernels.ScaleKernel(WendlandKernel()).double()
    covar.base_kernel.radius = 0.004  # ~10 neighbours per point (π ρ² n)
    before = peak_rss_kib()
    start = time.perf_counter()
    K = covar(x).evaluate_kernel()
    build = time.perf_counter() - start
    y = K @ torch.ones(n, 1, dtype=torch.float64)
    y.sum().backward()
    peak = peak_rss_kib()
    print(json.dumps({"type": type(K).__name__, "shape": list(K.shape), "nnz": K.pattern.nnz, "build_s": build,
                      "grad": float(covar.base_kernel.raw_radius.grad), "peak_mib": peak / 1024,
                      "before_mib": before / 1024}))
    """
)


def test_kernel_matrix_at_200k_points_stays_sparse_under_2gb():
    out = subprocess.run([sys.executable, "-c", SIZE_SCRIPT], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["type"] == "SparseLinearOperator" and report["shape"] == [200_000, 200_000]
    assert 200_000 * 5 < report["nnz"] < 200_000 * 30  # a few neighbours each (the margin adds ~20 %)
    assert report["grad"] != 0
    assert report["peak_mib"] < 2048, report  # an n × n float64 matrix would need 320 GB


# ---------------------------------------------------------------- defaults
def test_default_radius_comes_from_the_data_spread():
    x = _points(20_000, 2, seed=7)
    kernel = WendlandKernel()
    K = kernel(x).evaluate_kernel()
    per_row = K.pattern.nnz / x.shape[0]
    assert 15 < per_row < 60  # ~30 within the radius, the search margin stores a few more
    assert not kernel.radius_from_data
    expected = (30 / (20_000 * math.pi)) ** 0.5  # unit square: ρ = √(30 / (n π))
    assert float(kernel.radius) == pytest.approx(expected, rel=0.05)
    scaled = WendlandKernel.default_radius(x * torch.tensor([10.0, 1.0], dtype=x.dtype))
    assert scaled == pytest.approx(expected * 10**0.5, rel=0.05)  # the area grew 10×


def test_a_set_or_loaded_radius_is_kept():
    x = _points(500, 2)
    kernel = WendlandKernel()
    kernel.radius = 0.3
    kernel(x).evaluate_kernel()
    assert float(kernel.radius) == pytest.approx(0.3)
    other = WendlandKernel()
    other.load_state_dict(kernel.state_dict())
    other(x).evaluate_kernel()
    assert float(other.radius) == pytest.approx(0.3)
    assert WendlandKernel.default_radius(torch.zeros(5, 2)) == 1.0  # coincident points: no spread


def test_nearly_dense_matrix_warns():
    from gpsparse.errors import DenseKernelWarning

    kernel = WendlandKernel()
    kernel.radius = 0.69  # gpsparse 0.1's fixed default: most pairs of unit-square points
    with pytest.warns(DenseKernelWarning, match="stores .* of its entries"):
        kernel(_points(1_200, 2)).evaluate_kernel()
