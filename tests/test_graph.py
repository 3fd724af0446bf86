"""GraphMaternKernel: Laplacians, values vs dense references, normalisation, GPyTorch training, errors, size."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap

import gpytorch
import linear_operator
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import tolerance

import gpsparse
from gpsparse import SparseLinearOperator, SparsePrecisionLinearOperator
from gpsparse.kernels.graph import GraphMaternKernel, graph_laplacian
from gpsparse.operators.known_logdet import KnownLogdetSparseLinearOperator

DIRECT = tolerance(torch.float64, "direct")
ITERATIVE = tolerance(torch.float64, "iterative")
STOCHASTIC = tolerance(torch.float64, "stochastic")


# ------------------------------------------------------------------ graphs
def lattice_edges(rows: int, cols: int) -> torch.Tensor:
    """Edge index ``(2, E)`` of a rows × cols grid graph (node ``r·cols + c``), each edge once."""
    node = torch.arange(rows * cols).reshape(rows, cols)
    horizontal = torch.stack([node[:, :-1].reshape(-1), node[:, 1:].reshape(-1)])
    vertical = torch.stack([node[:-1].reshape(-1), node[1:].reshape(-1)])
    return torch.cat([horizontal, vertical], 1)


def random_graph(n: int, seed: int = 0, isolated: int = 0) -> sp.csr_matrix:
    """A weighted random geometric graph on ``n`` nodes (several components) plus ``isolated`` isolated nodes."""
    rng = np.random.default_rng(seed)
    points = rng.random((n, 2))
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    row, col = np.nonzero(np.triu(dist < 0.15, k=1))
    weight = rng.uniform(0.5, 2.0, row.size)
    total = n + isolated
    upper = sp.coo_matrix((weight, (row, col)), shape=(total, total))
    return (upper + upper.T).tocsr()


def dense_laplacian(adjacency: np.ndarray, normalized: bool) -> np.ndarray:
    """Textbook ``D − A`` or ``I − D^{−½} A D^{−½}`` (isolated nodes: zero rows)."""
    degree = adjacency.sum(1)
    if not normalized:
        return np.diag(degree) - adjacency
    inv_sqrt = np.where(degree > 0, 1 / np.sqrt(np.where(degree > 0, degree, 1)), 0.0)
    return np.diag((degree > 0).astype(float)) - inv_sqrt[:, None] * adjacency * inv_sqrt[None]


def dense_covariance(laplacian: torch.Tensor, lengthscale: torch.Tensor, nu: int, normalization="exact"):
    """``τ⁻¹ (κ²I + L)^{−ν}`` with ``κ² = 2ν/ℓ²`` and ``τ`` the mean of the diagonal (dense, differentiable)."""
    n = laplacian.shape[-1]
    kappa2 = 2 * nu / lengthscale.reshape(()) ** 2
    base = torch.linalg.matrix_power(kappa2 * torch.eye(n, dtype=laplacian.dtype) + laplacian, nu)
    covariance = torch.linalg.inv(base)
    if normalization == "none":
        return covariance
    return covariance / covariance.diagonal().mean()


@pytest.fixture
def tight():
    """Solves to rtol 1e-11, so that dense comparisons of ``W Q⁻¹ Wᵀ`` (CG solves) test the model, not CG."""
    with gpsparse.settings.solver_defaults(rtol=1e-11):
        yield


def ids(*nodes) -> torch.Tensor:
    return torch.tensor(nodes, dtype=torch.float64).unsqueeze(-1)


def _kernel(graph, lengthscale=3.0, **kwargs) -> GraphMaternKernel:
    kernel = GraphMaternKernel(graph, **kwargs).double()
    kernel.lengthscale = lengthscale
    return kernel


# -------------------------------------------------------------- Laplacians
@pytest.mark.parametrize("normalized", [False, True])
def test_laplacian_matches_textbook_definition_for_every_input_format(normalized):
    adjacency = random_graph(40, seed=1, isolated=3)
    coo = adjacency.tocoo()
    upper = coo.row < coo.col
    edge_index = torch.from_numpy(np.vstack([coo.row[upper], coo.col[upper]]))  # each edge in one direction
    weight = torch.from_numpy(coo.data[upper])
    expected = dense_laplacian(adjacency.toarray(), normalized)
    torch_coo = torch.sparse_coo_tensor(np.vstack([coo.row, coo.col]), coo.data, coo.shape, check_invariants=True)
    inputs = {
        "edge index (one direction)": (edge_index, dict(num_nodes=43, edge_weight=weight)),
        "edge index (both directions)": (
            torch.cat([edge_index, edge_index.flip(0)], 1),
            dict(num_nodes=43, edge_weight=torch.cat([weight, weight])),
        ),
        "numpy edge index": (edge_index.numpy(), dict(num_nodes=43, edge_weight=weight.numpy())),
        "scipy matrix": (adjacency, {}),
        "scipy array": (sp.csr_array(adjacency), {}),
        "torch coo": (torch_coo, {}),
        "torch csr": (torch_coo.to_sparse_csr(), {}),
    }
    for name, (graph, kwargs) in inputs.items():
        laplacian = graph_laplacian(graph, normalized=normalized, **kwargs)
        assert laplacian.shape == (43, 43), name
        np.testing.assert_allclose(laplacian.toarray(), expected, rtol=1e-14, atol=1e-14, err_msg=name)
        assert abs(laplacian - laplacian.T).max() == 0, name  # exactly symmetric
    eigenvalues = np.linalg.eigvalsh(expected)
    assert eigenvalues.min() > -1e-12 and (not normalized or eigenvalues.max() < 2 + 1e-12)


def test_self_loops_are_ignored_duplicates_summed_zeros_dropped():
    edges = torch.tensor([[0, 1, 1, 2, 2, 3], [1, 2, 2, 2, 3, 0]])  # (1, 2) twice, a loop at 2, (3, 0) zero
    weight = torch.tensor([1.0, 0.5, 0.25, 7.0, 2.0, 0.0])
    adjacency = np.zeros((4, 4))
    for i, j, w in ((0, 1, 1.0), (1, 2, 0.75), (2, 3, 2.0)):
        adjacency[i, j] = adjacency[j, i] = w
    for normalized in (False, True):
        laplacian = graph_laplacian(edges, edge_weight=weight, normalized=normalized)
        np.testing.assert_allclose(laplacian.toarray(), dense_laplacian(adjacency, normalized), rtol=1e-14)
        assert laplacian.nnz == 4 + 6  # the zero-weight edge is not stored


def test_isolated_nodes_from_num_nodes_have_zero_rows():
    laplacian = graph_laplacian(torch.tensor([[0], [1]]), num_nodes=4, normalized=True)
    np.testing.assert_array_equal(laplacian.toarray()[2:], 0.0)
    np.testing.assert_allclose(laplacian.toarray()[:2, :2], [[1.0, -1.0], [-1.0, 1.0]])


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("nu", [1, 2, 3])
@pytest.mark.parametrize("normalized", [False, True])
def test_values_match_dense_reference(nu, normalized, tight):
    adjacency = random_graph(60, seed=2, isolated=2)
    kernel = _kernel(adjacency, lengthscale=2.5, alpha=nu, normalized=normalized)
    laplacian = torch.from_numpy(dense_laplacian(adjacency.toarray(), normalized))
    reference = dense_covariance(laplacian, torch.tensor(2.5, dtype=torch.float64), nu)
    x1, x2 = ids(0, 5, 5, 17, 61, 33), ids(61, 0, 2, 40)  # repeated ids and an isolated node (61)
    op = kernel(x1).evaluate_kernel()
    assert isinstance(op, SparsePrecisionLinearOperator) and isinstance(op.Q, KnownLogdetSparseLinearOperator)
    assert op.shape == (6, 6)
    torch.testing.assert_close(op.to_dense(), reference[x1.long().squeeze(-1)][:, x1.long().squeeze(-1)], **ITERATIVE)
    cross = kernel(x1, x2).evaluate_kernel()
    assert cross.shape == (6, 4) and cross.right_interp is not None
    expected = reference[x1.long().squeeze(-1)][:, x2.long().squeeze(-1)]
    torch.testing.assert_close(cross.to_dense(), expected, **ITERATIVE)
    with gpsparse.settings.max_dense_size(62 * 62):
        Q = kernel.precision().to_dense()
    torch.testing.assert_close(torch.linalg.inv(Q), reference, **ITERATIVE)
    tau = kernel.precision_scale().detach()  # an isolated node (a zero row of L) has variance κ^{−2ν} / τ
    torch.testing.assert_close(reference[61, 61], (2 * nu / 2.5**2) ** -nu / tau, **DIRECT)


def test_mean_marginal_variance_is_one_and_outputscale_is_the_mean_variance(tight):
    kernel = _kernel(lattice_edges(7, 8), lengthscale=4.0)
    x = torch.arange(56, dtype=torch.float64).unsqueeze(-1)
    variances = kernel(x, diag=True).detach()
    assert variances.shape == (56,)
    torch.testing.assert_close(variances.mean(), torch.tensor(1.0, dtype=torch.float64), **ITERATIVE)
    assert float(variances.max() / variances.min()) > 1.5  # corners and edges differ from the interior
    scaled = gpytorch.kernels.ScaleKernel(kernel).double()
    scaled.outputscale = 2.5
    torch.testing.assert_close(scaled(x, diag=True).mean(), torch.tensor(2.5, dtype=torch.float64), **ITERATIVE)
    evaluated = scaled(x).evaluate_kernel()
    assert isinstance(evaluated, SparsePrecisionLinearOperator)  # ScaleKernel keeps the sparse-precision type
    torch.testing.assert_close(evaluated.to_dense().diagonal(), 2.5 * variances, **ITERATIVE)


def test_diag_matches_dense_and_cross_diag(tight):
    adjacency = random_graph(50, seed=3)
    kernel = _kernel(adjacency, lengthscale=2.0)
    reference = dense_covariance(torch.from_numpy(dense_laplacian(adjacency.toarray(), False)), torch.tensor(2.0), 2)
    x1, x2 = ids(3, 7, 7, 49), ids(3, 8, 1, 0)
    a, b = x1.long().squeeze(-1), x2.long().squeeze(-1)
    torch.testing.assert_close(kernel(x1, diag=True), reference[a, a], **ITERATIVE)
    torch.testing.assert_close(kernel(x1, x2, diag=True), reference[a, b], **ITERATIVE)
    (grad,) = torch.autograd.grad(kernel(x1, x2, diag=True).sum(), kernel.raw_lengthscale)
    assert float(grad.abs()) > 0


def test_normalization_none_is_the_plain_matern_precision(tight):
    kernel = _kernel(lattice_edges(6, 7), lengthscale=3.0, normalization="none")
    laplacian = torch.from_numpy(graph_laplacian(lattice_edges(6, 7)).toarray())
    reference = dense_covariance(laplacian, torch.tensor(3.0, dtype=torch.float64), 2, normalization="none")
    x = ids(0, 10, 41)
    torch.testing.assert_close(kernel(x).to_dense(), reference[[0, 10, 41]][:, [0, 10, 41]], **ITERATIVE)
    torch.testing.assert_close(kernel.precision_scale(), torch.ones((), dtype=torch.float64))


def test_float32_parameters():
    kernel = GraphMaternKernel(lattice_edges(5, 6))
    kernel.lengthscale = 2.0
    x = torch.arange(30.0).unsqueeze(-1)
    op = kernel(x).evaluate_kernel()
    assert op.dtype == torch.float32
    reference = dense_covariance(torch.from_numpy(graph_laplacian(lattice_edges(5, 6)).toarray()), torch.tensor(2.0), 2)
    torch.testing.assert_close(op.to_dense().double(), reference, **tolerance(torch.float32, "iterative"))


# ---------------------------------------------------- stochastic normalisation
def test_stochastic_normalization_is_unbiased_and_deflates_the_null_space():
    adjacency = random_graph(70, seed=4, isolated=2)  # several components and isolated nodes
    for normalized in (False, True):
        exact = _kernel(adjacency, lengthscale=3.0, normalized=normalized)
        many = _kernel(adjacency, lengthscale=3.0, normalized=normalized, normalization="stochastic", num_probes=1000)
        laplacian = dense_laplacian(adjacency.toarray(), normalized)
        values, vectors = np.linalg.eigh(laplacian)
        null = vectors[:, values < 1e-9]
        assert many._num_components == null.shape[1] >= 4
        probes = many._probes(torch.float64, torch.device("cpu")).numpy()
        assert np.abs(null.T @ probes).max() < 1e-10  # projected off the null space of L
        # 32 probes: ≤ 4 % standard deviation measured; 1000 probes: ~0.7 %
        torch.testing.assert_close(many.precision_scale(), exact.precision_scale(), rtol=0.03, atol=0)


def test_stochastic_normalization_value_and_gradient_match_dense_estimator(tight):
    """τ = (1/N)[c κ^{−2ν} + mean_s zₛᵀ(κ²I+L)^{−ν}zₛ] with the kernel's fixed probes, vs dense autograd."""
    adjacency = random_graph(80, seed=5, isolated=1)
    laplacian = torch.from_numpy(dense_laplacian(adjacency.toarray(), False))
    for nu in (1, 2, 3):
        kernel = _kernel(adjacency, lengthscale=2.0, alpha=nu, normalization="stochastic", num_probes=8)
        tau = kernel.precision_scale()
        (grad,) = torch.autograd.grad(tau, kernel.raw_lengthscale)
        raw = kernel.raw_lengthscale.detach().clone().requires_grad_(True)
        kappa2 = 2 * nu / torch.nn.functional.softplus(raw).reshape(()) ** 2
        probes = kernel._probes(torch.float64, torch.device("cpu"))
        base = torch.linalg.matrix_power(kappa2 * torch.eye(81, dtype=torch.float64) + laplacian, nu)
        quad = (probes * torch.linalg.solve(base, probes)).sum() / 8
        expected = (kernel._num_components * kappa2**-nu + quad) / 81
        (expected_grad,) = torch.autograd.grad(expected, raw)
        torch.testing.assert_close(tau, expected, **ITERATIVE)
        torch.testing.assert_close(grad, expected_grad, **ITERATIVE)


def test_stochastic_normalization_batches_and_reuse_without_grad(tight):
    edges = lattice_edges(6, 8)
    lengthscales = (1.5, 3.0, 6.0)
    for nu in (1, 2):
        batched = _kernel(
            edges,
            torch.tensor(lengthscales).view(3, 1, 1),
            batch_shape=torch.Size([3]),
            alpha=nu,
            normalization="stochastic",
        )
        singles = [_kernel(edges, ell, alpha=nu, normalization="stochastic").precision_scale() for ell in lengthscales]
        torch.testing.assert_close(batched.precision_scale(), torch.stack(singles), **ITERATIVE)
    kernel = _kernel(edges, 2.0, normalization="stochastic")
    assert kernel.precision_scale().grad_fn is not None  # recorded for backward: recomputed at every call
    with torch.no_grad():
        first = kernel.precision_scale()
        assert kernel.precision_scale() is kernel.precision_scale()  # equal κ², no graph: reused
        kernel.lengthscale = 2.5
        assert not torch.equal(kernel.precision_scale(), first)


def test_auto_normalization_follows_max_eigen_nodes():
    edges = lattice_edges(5, 5)
    assert _kernel(edges).normalization == "exact"
    small_limit = _kernel(edges, max_eigen_nodes=10)
    assert small_limit.normalization == "stochastic" and small_limit.eigenvalues is None
    assert type(small_limit.precision()) is SparseLinearOperator  # no eigenvalues: general log-determinant paths
    same_probes = _kernel(edges, max_eigen_nodes=10)
    torch.testing.assert_close(small_limit.precision_scale(), same_probes.precision_scale(), rtol=0, atol=0)


# ----------------------------------------------------------------- gpytorch
class GraphGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(kernel)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class DenseGraphKernel(gpytorch.kernels.Kernel):
    """Reference: the normalised dense covariance, indexed by node id (exact or the kernel's τ estimator)."""

    has_lengthscale = True

    def __init__(self, laplacian: np.ndarray, nu: int, stochastic_from: GraphMaternKernel | None = None):
        super().__init__()
        self.laplacian = torch.from_numpy(laplacian)
        self.nu = nu
        self.estimator = None  # the sparse kernel's fixed probes and number of components (not a submodule)
        if stochastic_from is not None:
            probes = stochastic_from._probes(torch.float64, torch.device("cpu"))
            self.estimator = (probes, stochastic_from._num_components)

    def covariance(self):
        if self.estimator is None:
            return dense_covariance(self.laplacian, self.lengthscale, self.nu)
        (probes, components), n = self.estimator, self.laplacian.shape[0]
        kappa2 = 2 * self.nu / self.lengthscale.reshape(()) ** 2
        base = torch.linalg.matrix_power(kappa2 * torch.eye(n, dtype=torch.float64) + self.laplacian, self.nu)
        quad = (probes * torch.linalg.solve(base, probes)).sum() / probes.shape[1]
        tau = (components * kappa2**-self.nu + quad) / n
        return torch.linalg.inv(tau * base)

    def forward(self, x1, x2, diag=False, **params):
        cov = self.covariance()[x1.long().squeeze(-1)][:, x2.long().squeeze(-1)]
        return cov.diagonal() if diag else cov


def build(kernel, x, y, *, lengthscale=2.0, outputscale=1.5, noise=0.1):
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    model = GraphGP(x, y, likelihood, kernel).double()
    model.covar_module.base_kernel.lengthscale = lengthscale
    model.covar_module.outputscale = outputscale
    likelihood.noise = noise
    model.mean_module.constant.data.fill_(0.2)
    return model, likelihood


def loss_and_grads(model, likelihood, x, y):
    model.train()
    likelihood.train()
    model.zero_grad()
    loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads


def graph_data(num_nodes, num_observed, seed=0, repeat=0):
    gen = torch.Generator().manual_seed(seed)
    nodes = torch.randperm(num_nodes, generator=gen)[:num_observed]
    nodes = torch.cat([nodes, nodes[:repeat]])  # repeated observations of some nodes
    x = nodes.double().unsqueeze(-1)
    y = torch.sin(nodes.double() / 7) + 0.2 * torch.randn(nodes.numel(), generator=gen, dtype=torch.float64)
    return x, y


CASES = {
    "lattice-exact": dict(graph=lambda: lattice_edges(10, 12), alpha=2, normalized=False, normalization="exact"),
    "random-normalized-exact": dict(
        graph=lambda: random_graph(90, seed=6, isolated=3), alpha=1, normalized=True, normalization="exact"
    ),
    "random-stochastic": dict(
        graph=lambda: random_graph(90, seed=7, isolated=2), alpha=3, normalized=False, normalization="stochastic"
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_marginal_likelihood_and_gradients_match_dense_exact_gp(case):
    spec = CASES[case]
    graph = spec["graph"]()
    options = {key: spec[key] for key in ("alpha", "normalized", "normalization")}
    kernel = GraphMaternKernel(graph, **options)
    n = kernel.num_nodes
    laplacian = graph_laplacian(graph, normalized=spec["normalized"]).toarray()
    stochastic = kernel if spec["normalization"] == "stochastic" else None
    x, y = graph_data(n, int(0.7 * n), seed=1, repeat=5)
    sparse, lik_s = build(kernel, x, y)
    dense, lik_d = build(DenseGraphKernel(laplacian, spec["alpha"], stochastic), x, y)
    with linear_operator.settings.max_cholesky_size(10**9):
        loss_d, grads_d = loss_and_grads(dense, lik_d, x, y)
    loss_s, grads_s = loss_and_grads(sparse, lik_s, x, y)  # n ≤ 800: P by dense Cholesky, log det Q exact or banded
    assert set(grads_s) == set(grads_d) and len(grads_s) == 4
    tol = ITERATIVE if stochastic is not None else DIRECT  # τ's solves with κ²I + L are CG solves
    torch.testing.assert_close(loss_s, loss_d, **tol)
    for name in grads_s:
        assert float(grads_s[name].abs()) > 0, name
        torch.testing.assert_close(grads_s[name], grads_d[name], **tol, msg=name)


def test_marginal_likelihood_paths_banded_cholmod_slq():
    """A path graph (Q banded: exact banded path), CHOLMOD and SLQ against the dense float64 ExactGP."""
    path = torch.stack([torch.arange(199), torch.arange(1, 200)])
    x, y = graph_data(200, 130, seed=2)
    dense, lik_d = build(DenseGraphKernel(graph_laplacian(path).toarray(), 2), x, y, lengthscale=8.0)
    with linear_operator.settings.max_cholesky_size(10**9):
        loss_d, grads_d = loss_and_grads(dense, lik_d, x, y)
    for label, context, tol in (
        ("banded", linear_operator.settings.max_cholesky_size(0), DIRECT),
        ("cholmod", gpsparse.settings.logdet_defaults(method="cholesky"), DIRECT),
        ("slq", gpsparse.settings.max_dense_size(0), STOCHASTIC),
    ):
        if label == "cholmod":
            pytest.importorskip("sksparse")
        sparse, lik_s = build(GraphMaternKernel(path, alpha=2), x, y, lengthscale=8.0)
        banded = 6 if label == "banded" else 0
        torch.manual_seed(0)
        with context, gpsparse.settings.solver_defaults(max_banded_bandwidth=banded, rtol=1e-10):
            with linear_operator.settings.max_cholesky_size(0), gpsparse.settings.logdet_defaults(num_probes=64):
                loss_s, grads_s = loss_and_grads(sparse, lik_s, x, y)
        torch.testing.assert_close(loss_s, loss_d, **tol, msg=label)
        g_s = torch.cat([g.reshape(-1) for g in grads_s.values()])
        g_d = torch.cat([grads_d[name].reshape(-1) for name in grads_s])
        if label == "slq":  # stochastic log det P: compare the gradient's direction
            assert float(torch.nn.functional.cosine_similarity(g_s, g_d, dim=0)) > 0.99
        else:
            torch.testing.assert_close(g_s, g_d, **tol, msg=label)


def test_exact_gp_trains_with_adam_and_predicts_held_out_nodes():
    rows, cols = 18, 20
    edges = lattice_edges(rows, cols)
    n = rows * cols
    gen = torch.Generator().manual_seed(3)
    node = torch.arange(n)
    truth = torch.sin(node.div(cols, rounding_mode="floor") / 3.0) * torch.cos((node % cols) / 4.0)
    perm = torch.randperm(n, generator=gen)
    train, test = perm[:220], perm[220:]
    x, x_test = train.double().unsqueeze(-1), test.double().unsqueeze(-1)
    y = truth[train].double() + 0.1 * torch.randn(220, generator=gen, dtype=torch.float64)
    kernel = GraphMaternKernel(edges, alpha=2)
    model, likelihood = build(kernel, x, y, lengthscale=1.0, outputscale=0.5, noise=0.5)
    model.train()
    likelihood.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert kernel.num_selection_builds == 1  # the training nodes' W built once
    model.eval()
    likelihood.eval()
    with torch.no_grad(), gpsparse.settings.solver_defaults(rtol=1e-10):
        pred = likelihood(model(x_test))
        mean, variance = pred.mean, pred.variance
    rmse = float((mean - truth[test].double()).pow(2).mean().sqrt())
    assert rmse < 0.3 * float(truth.double().std()), rmse
    # the same predictions from the dense model with the trained hyperparameters
    dense, lik_d = build(DenseGraphKernel(graph_laplacian(edges).toarray(), 2), x, y)
    dense.load_state_dict(model.state_dict())
    lik_d.load_state_dict(likelihood.state_dict())
    dense.eval()
    lik_d.eval()
    with torch.no_grad(), linear_operator.settings.max_cholesky_size(10**9):
        reference = lik_d(dense(x_test))
    torch.testing.assert_close(mean, reference.mean, **ITERATIVE)
    torch.testing.assert_close(variance, reference.variance, **ITERATIVE)


# ------------------------------------------------------- batches, caching
def test_batched_lengthscales_share_one_pattern(tight):
    edges = lattice_edges(6, 8)
    kernel = _kernel(edges, lengthscale=torch.tensor([1.5, 3.0, 6.0]).view(3, 1, 1), batch_shape=torch.Size([3]))
    x = ids(0, 5, 12, 47)
    op = kernel(x).evaluate_kernel()
    assert op.shape == (3, 4, 4) and op.Q.values.shape == (3, kernel.structure.pattern.nnz)
    assert op.Q.pattern is kernel.structure.pattern
    assert kernel(x, diag=True).shape == (3, 4)
    for b, lengthscale in enumerate((1.5, 3.0, 6.0)):
        single = _kernel(edges, lengthscale=lengthscale)
        torch.testing.assert_close(op.to_dense()[b], single(x).to_dense(), **ITERATIVE)
    scaled = gpytorch.kernels.ScaleKernel(kernel, batch_shape=torch.Size([3])).double()
    scaled.outputscale = torch.tensor([1.0, 2.0, 3.0])
    evaluated = scaled(x).evaluate_kernel()
    assert isinstance(evaluated, SparsePrecisionLinearOperator) and evaluated.shape == (3, 4, 4)
    torch.testing.assert_close(evaluated.to_dense()[2], 3.0 * op.to_dense()[2], **ITERATIVE)
    # inputs with (equal) batch members broadcast against the kernel batch
    with gpytorch.settings.debug(True):
        expanded = kernel(x.expand(2, 1, 4, 1)).evaluate_kernel()
    assert expanded.shape == (2, 3, 4, 4)


def test_structure_built_once_and_selection_cached_on_inputs():
    kernel = _kernel(lattice_edges(5, 5))
    x = ids(0, 3, 9)
    first = kernel(x).evaluate_kernel()
    second = kernel(x).evaluate_kernel()
    assert second.interp is first.interp and second.Q.pattern is first.Q.pattern is kernel.structure.pattern
    assert kernel.num_selection_builds == 1
    assert kernel(x.clone()).evaluate_kernel().interp is first.interp  # equal values: a torch.equal hit
    other = ids(1, 2)
    cross = kernel(x, other).evaluate_kernel()
    assert cross.interp is first.interp and kernel.num_selection_builds == 2
    x[1, 0] = 4.0  # in place: rebuilt
    assert kernel(x).evaluate_kernel().interp is not first.interp and kernel.num_selection_builds == 3
    clone = copy.deepcopy(kernel)
    assert clone._selection_cache == [] and clone.structure.pattern.nnz == kernel.structure.pattern.nnz
    torch.testing.assert_close(clone(x).to_dense(), kernel(x).to_dense(), **DIRECT)


def test_device_and_dtype_follow_the_parameters(device):
    kernel = _kernel(lattice_edges(4, 5), normalization="stochastic").to(device)
    x = ids(0, 7, 19).to(device)
    op = kernel(x).evaluate_kernel()
    assert op.device == device and op.interp.device == device and op.dtype == torch.float64
    reference = _kernel(lattice_edges(4, 5), normalization="stochastic")(ids(0, 7, 19)).to_dense()
    torch.testing.assert_close(op.to_dense().cpu(), reference, **ITERATIVE)


def test_lengthscale_prior_and_constraint_use_gpytorch_names():
    prior = gpytorch.priors.GammaPrior(2.0, 0.5)
    kernel = GraphMaternKernel(
        lattice_edges(3, 3), lengthscale_prior=prior, lengthscale_constraint=gpytorch.constraints.Interval(0.5, 20.0)
    )
    names = [name for name, *_ in kernel.named_priors()]
    assert names == ["lengthscale_prior"]
    kernel.lengthscale = 4.0
    torch.testing.assert_close(kernel.lengthscale, torch.tensor([[4.0]]))
    assert isinstance(kernel.raw_lengthscale_constraint, gpytorch.constraints.Interval)
    assert kernel.alpha == kernel.nu == 2  # on a graph the smoothness is the exponent
    torch.testing.assert_close(kernel.kappa2, torch.tensor(2 * 2 / 16.0))  # κ² = 2ν/ℓ², ν = 2


def test_real_graph_from_networkx_karate_club(tight):
    nx = pytest.importorskip("networkx")
    graph = nx.karate_club_graph()  # 34 members, 78 weighted edges (ships with networkx)
    adjacency = nx.to_scipy_sparse_array(graph, weight="weight", format="csr")
    kernel = _kernel(adjacency, lengthscale=1.0, normalized=True)
    reference = dense_covariance(
        torch.from_numpy(dense_laplacian(adjacency.toarray(), True)), torch.tensor(1.0, dtype=torch.float64), 2
    )
    x = torch.arange(34, dtype=torch.float64).unsqueeze(-1)
    torch.testing.assert_close(kernel(x).to_dense(), reference, **ITERATIVE)


# ------------------------------------------------------------------ errors
def test_bad_inputs():
    kernel = _kernel(lattice_edges(3, 4))
    with pytest.raises(ValueError, match="node id 12, out of range for a graph of 12 nodes"):
        kernel(ids(0, 12)).evaluate_kernel()
    with pytest.raises(ValueError, match="node id -1, out of range"):
        kernel.forward(ids(0, -1), ids(0))
    with pytest.raises(ValueError, match="integer node ids, got 2.5"):
        kernel.forward(ids(0, 2.5), ids(0))
    with pytest.raises(ValueError, match="non-finite node ids"):
        kernel.forward(ids(0, float("nan")), ids(0))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., n, 1\)"):
        kernel.forward(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch members of x1 hold different node ids"):
        kernel.forward(torch.stack([ids(0, 1), ids(1, 2)]), ids(0))
    with pytest.raises(NotImplementedError, match="last_dim_is_batch"):
        kernel.forward(ids(0), ids(0), last_dim_is_batch=True)
    with pytest.raises(ValueError, match="as many rows in x1"):
        kernel.forward(ids(0, 1), ids(0), diag=True)


def test_bad_graphs_and_arguments():
    edges = lattice_edges(3, 3)
    with pytest.raises(ValueError, match=r"shape \(2, E\), got \(3, 4\)"):
        GraphMaternKernel(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer dtype, got torch.float32"):
        GraphMaternKernel(edges.float())
    with pytest.raises(ValueError, match="negative node id"):
        GraphMaternKernel(torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(ValueError, match="node id 8, out of range for num_nodes=5"):
        GraphMaternKernel(edges, num_nodes=5)
    with pytest.raises(ValueError, match="empty edge index needs num_nodes"):
        GraphMaternKernel(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="non-negative"):
        GraphMaternKernel(edges, edge_weight=-torch.ones(edges.shape[1]))
    with pytest.raises(ValueError, match="finite"):
        GraphMaternKernel(edges, edge_weight=torch.full((edges.shape[1],), float("inf")))
    with pytest.raises(ValueError, match=r"edge_weight must have shape \(E,\)"):
        GraphMaternKernel(edges, edge_weight=torch.ones(3))
    with pytest.raises(ValueError, match=r"undirected: edge \(0, 1\) has weight 1.0 but \(1, 0\) has weight 2.0"):
        GraphMaternKernel(torch.tensor([[0, 1], [1, 0]]), edge_weight=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="must be square"):
        GraphMaternKernel(sp.csr_matrix(np.ones((3, 4))))
    with pytest.raises(ValueError, match="num_nodes=4 but the adjacency has shape"):
        GraphMaternKernel(sp.identity(3, format="csr"), num_nodes=4)
    with pytest.raises(ValueError, match="non-negative"):
        GraphMaternKernel(sp.csr_matrix(-np.ones((3, 3))))
    with pytest.raises(ValueError, match="edge_weight is only used with an edge index"):
        GraphMaternKernel(sp.identity(3, format="csr"), edge_weight=np.ones(3))
    with pytest.raises(TypeError, match="edge index .* or a sparse adjacency matrix"):
        GraphMaternKernel([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="dense adjacency matrices are not accepted"):
        GraphMaternKernel(torch.ones(4, 4))
    for alpha in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="alpha must be an integer ≥ 1"):
            GraphMaternKernel(edges, alpha=alpha)
    with pytest.raises(ValueError, match="normalization must be one of"):
        GraphMaternKernel(edges, normalization="max")
    with pytest.raises(ValueError, match="normalization='exact' needs the Laplacian's eigenvalues"):
        GraphMaternKernel(edges, normalization="exact", max_eigen_nodes=4)
    with pytest.raises(ValueError, match="ard_num_dims=2"):
        GraphMaternKernel(edges, ard_num_dims=2)
    with pytest.raises(ValueError, match="num_probes must be a positive integer"):
        GraphMaternKernel(edges, num_probes=0)
    with pytest.raises(TypeError, match="Expected gpytorch.priors.Prior"):
        GraphMaternKernel(edges, lengthscale_prior=1.0)


# -------------------------------------------------------------------- size
SIZE_SCRIPT = textwrap.dedent(
    """
    import json, math, resource, sys, time, torch, gpytorch
    def peak_rss_kib():
        # this process's own peak RSS in KiB: VmHWM (a child's ru_maxrss starts at its parent's RSS at fork)
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from gpsparse.kernels.graph import GraphMaternKernel

    torch.set_num_threads(1)
    width, length = int(sys.argv[1]), int(sys.argv[2])  # a width × length grid graph
    n = width * length
    node = torch.arange(n).reshape(length, width)
    edges = torch.cat([torch.stack([node[:, :-1].reshape(-1), node[:, 1:].reshape(-1)]),
                       torch.stack([node[:-1].reshape(-1), node[1:].reshape(-1)])], 1)
    start = time.perf_counter()
    kernel = GraphMaternKernel(edges, alpha=2)  # N > max_eigen_nodes: stochastic normalisation
    build = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(n, generator=gen)[: n // 2]
    x = ids.double().unsqueeze(-1)
    y = torch.sin(ids.double() / (n / 30)) + 0.1 * torch.randn(ids.numel(), generator=gen, dtype=torch.float64)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, likelihood)
            self.mean = gpytorch.means.ConstantMean()
            self.covar = gpytorch.kernels.ScaleKernel(kernel)

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean(z), self.covar(z))

    model = Model().double()
    kernel.lengthscale = 20.0
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    torch.manual_seed(0)
    start = time.perf_counter()
    loss = -mll(model(x), y)
    loss.backward()
    step = time.perf_counter() - start
    peak = peak_rss_kib()
    # exact τ and log det Q of a grid graph (a product of two paths): closed-form Laplacian eigenvalues
    with torch.no_grad():
        kappa2 = kernel.kappa2
        path = lambda m: 2 - 2 * torch.cos(math.pi * torch.arange(m, dtype=torch.float64) / m)
        eig = (path(length)[:, None] + path(width)[None, :]).reshape(-1)
        exact_tau = (kappa2 + eig).pow(-2).mean()
        tau = kernel.precision_scale()
        exact_logdet = n * tau.log() + 2 * (kappa2 + eig).log().sum()  # of Q with the kernel's (estimated) τ
        logdet = kernel.precision().logdet()
    print(json.dumps({"n": n, "nnz": kernel.structure.pattern.nnz, "normalization": kernel.normalization,
                      "build_s": build, "mll_backward_s": step, "loss": float(loss.detach()),
                      "grad": float(kernel.raw_lengthscale.grad), "tau_error": float(tau / exact_tau - 1),
                      "logdet_q_error": float((logdet - exact_logdet) / exact_logdet.abs()),
                      "peak_mib": peak / 1024}))
    """
)


def _run_size_script(width: int, length: int) -> dict:
    command = [sys.executable, "-c", SIZE_SCRIPT, str(width), str(length)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(report)
    assert report["n"] == width * length and report["normalization"] == "stochastic"
    assert math.isfinite(report["loss"]) and report["grad"] != 0
    assert abs(report["tau_error"]) < 0.05  # deflated Hutchinson, 32 probes
    return report


def test_marginal_likelihood_and_backward_at_100k_nodes_banded():
    """A 3 × 33 334 ladder (N = 100 002): Q has half-bandwidth 6, so P and Q take the exact banded path."""
    report = _run_size_script(3, 33_334)
    assert abs(report["logdet_q_error"]) < 1e-9
    assert report["peak_mib"] < 2048, report  # a dense N × N float64 matrix would need 80 GB


@pytest.mark.slow
def test_marginal_likelihood_and_backward_at_100k_nodes_slq():
    """A 316 × 316 grid (N = 99 856): CG solves and stochastic Lanczos quadrature (minutes on 2 loaded cores)."""
    report = _run_size_script(316, 316)
    assert abs(report["logdet_q_error"]) < 0.01
    assert report["peak_mib"] < 4096, report  # Lanczos bases of the log-determinant adjoints: ~0.8 GB each


def test_dense_spectrum_respects_the_dense_size_limit():
    from gpsparse.errors import DenseSizeError

    edges = torch.stack([torch.arange(99), torch.arange(1, 100)])
    with gpsparse.settings.max_dense_size(50 * 50), pytest.raises(DenseSizeError, match="max_dense_size"):
        GraphMaternKernel(edges, 100)
    with gpsparse.settings.max_dense_size(50 * 50):
        assert GraphMaternKernel(edges, 100, normalization="none", max_eigen_nodes=10).eigenvalues is None
