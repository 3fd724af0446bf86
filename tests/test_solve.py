"""gpsparse.solve against dense float64 torch.linalg: values and gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tolerance
from matrices import INDEFINITE, NONSYMMETRIC, SPD, build

import gpsparse
from gpsparse import ConvergenceWarning, NonConvergenceError, NotPositiveDefiniteError

CASES = (
    [(name, "cg") for name in SPD]
    + [(name, "minres") for name in INDEFINITE]
    + [(name, "bicgstab") for name in NONSYMMETRIC]
    + [("lattice5-6x6", "minres"), ("random-spd-40", "bicgstab")]
)


def _leaf_matrix(name: str, dtype, layout, device):
    """A sparse matrix whose values are a leaf requiring grad, plus its dense copy sharing the graph."""
    coo = build(name, dtype).to(device)
    values = coo.values().clone().requires_grad_(True)
    matrix = torch.sparse_coo_tensor(coo.indices(), values, coo.shape)
    if layout == "csr":
        matrix = matrix.to_sparse_csr()
    return matrix, values, coo.indices()


def _dense_from(values, indices, size):
    return torch.sparse_coo_tensor(indices, values, size).to_dense()


def _rhs(shape_kind: str, n: int, dtype, device):
    gen = torch.Generator().manual_seed(3)
    shape = {"vector": (n,), "matrix": (n, 3), "batched": (2, 3, n, 2)}[shape_kind]
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


@pytest.mark.parametrize("name,method", CASES)
@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape_kind", ["vector", "matrix", "batched"])
def test_solve_matches_dense(name, method, layout, dtype, shape_kind, device):
    matrix, values, indices = _leaf_matrix(name, dtype, layout, device)
    n = matrix.shape[0]
    B = _rhs(shape_kind, n, dtype, device).requires_grad_(True)
    rtol = 1e-10 if dtype == torch.float64 else 1e-6
    X = gpsparse.solve(matrix, B, method=method, rtol=rtol, strict=True)
    assert X.shape == B.shape

    values_ref = values.detach().double().requires_grad_(True)
    B_ref = B.detach().double().requires_grad_(True)
    dense = _dense_from(values_ref, indices, matrix.shape)
    X_ref = torch.linalg.solve(dense, B_ref.unsqueeze(-1) if shape_kind == "vector" else B_ref)
    X_ref = X_ref.squeeze(-1) if shape_kind == "vector" else X_ref
    tol = tolerance(dtype)
    torch.testing.assert_close(X.double(), X_ref, **tol)

    G = torch.randn_like(X_ref)
    (X * G.to(dtype)).sum().backward()
    (X_ref * G).sum().backward()
    grad_ref = values_ref.grad
    if name not in NONSYMMETRIC:
        # symmetric matrices get the symmetrised gradient (G + Gᵀ)/2 at the stored entries
        dense_grad = _dense_from(grad_ref, indices, matrix.shape)
        grad_ref = 0.5 * (dense_grad + dense_grad.T)[indices[0], indices[1]]
    torch.testing.assert_close(B.grad.double(), B_ref.grad, **tol)
    torch.testing.assert_close(values.grad.double(), grad_ref, **tol)


def test_nonsymmetric_backward_uses_transpose():
    """The backward must solve with Aᵀ: reusing A (torchsparsegradutils' default) gives a wrong gradient."""
    matrix, values, indices = _leaf_matrix("nonsym-40", torch.float64, "coo", "cpu")
    B = torch.randn(40, 2, dtype=torch.float64, requires_grad=True)
    X = gpsparse.solve(matrix, B, method="bicgstab", rtol=1e-12)
    G = torch.randn_like(X)
    (X * G).sum().backward()
    dense = _dense_from(values.detach(), indices, matrix.shape)
    expected = torch.linalg.solve(dense.T, G)
    wrong = torch.linalg.solve(dense, G)
    torch.testing.assert_close(B.grad, expected, rtol=1e-8, atol=1e-10)
    assert (B.grad - wrong).norm() > 0.1 * wrong.norm()


@pytest.mark.parametrize("method", ["cg", "minres", "bicgstab"])
def test_gradcheck_symmetric(method):
    """gradcheck through a symmetric parameterisation (one parameter per upper-triangle entry)."""
    coo = build("lattice5-3x3")
    indices, n = coo.indices(), coo.shape[0]
    upper = indices[0] <= indices[1]
    key_upper = indices[0][upper] * n + indices[1][upper]
    lo, hi = torch.minimum(indices[0], indices[1]), torch.maximum(indices[0], indices[1])
    param_index = torch.searchsorted(key_upper, lo * n + hi)

    def f(params, rhs):
        A = torch.sparse_coo_tensor(indices, params[param_index], coo.shape)
        return gpsparse.solve(A, rhs, method=method, rtol=1e-13)

    params = coo.values()[upper].clone().requires_grad_(True)
    rhs = torch.randn(n, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (params, rhs), atol=1e-6, rtol=1e-5)


def test_nonsym_gradcheck_values():
    coo = build("nonsym-10")
    indices = coo.indices()

    def f(values, rhs):
        return gpsparse.solve(torch.sparse_coo_tensor(indices, values, coo.shape), rhs, method="bicgstab", rtol=1e-13)

    rhs = torch.randn(10, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (coo.values().clone().requires_grad_(True), rhs), atol=1e-6, rtol=1e-5)


def test_preconditioners_give_same_answer():
    coo = build("lattice13-5x5")
    B = torch.randn(25, 4, dtype=torch.float64)
    plain = gpsparse.solve(coo, B, rtol=1e-12)
    for prec in ("jacobi", "ic0"):
        torch.testing.assert_close(
            gpsparse.solve(coo, B, rtol=1e-12, preconditioner=prec), plain, rtol=1e-8, atol=1e-10
        )


def test_x0_warm_start_is_used():
    coo = build("lattice13-5x5")
    B = torch.randn(25, dtype=torch.float64)
    exact = gpsparse.solve(coo, B, rtol=1e-13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = gpsparse.solve(coo, B, x0=exact, max_iters=1, rtol=1e-6)
    torch.testing.assert_close(x, exact)


def test_nonconvergence_warns_and_strict_raises():
    coo = build("lattice13-5x5")
    B = torch.randn(25, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match="did not converge.*relative residual"):
        gpsparse.solve(coo, B, max_iters=2)
    with pytest.raises(NonConvergenceError, match="relative residual"):
        gpsparse.solve(coo, B, max_iters=2, strict=True)


def test_bad_inputs():
    coo = build("lattice5-6x6")
    B = torch.randn(36, dtype=torch.float64)
    with pytest.raises(TypeError, match="to_sparse_csr"):
        gpsparse.solve(coo.to_dense(), B)
    rect = torch.sparse_coo_tensor(torch.tensor([[0, 1], [0, 2]]), torch.tensor([1.0, 2.0]), (2, 3))
    with pytest.raises(ValueError, match="square"):
        gpsparse.solve(rect, torch.ones(2), method="bicgstab")
    with pytest.raises(ValueError, match="does not match"):
        gpsparse.solve(coo, torch.randn(35, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        gpsparse.solve(coo, B.float())
    bad = torch.sparse_coo_tensor(
        coo.indices(), coo.values().clone().index_fill_(0, torch.tensor([0]), float("nan")), coo.shape
    )
    with pytest.raises(ValueError, match="NaN"):
        gpsparse.solve(bad, B)
    with pytest.raises(ValueError, match="Inf"):
        gpsparse.solve(coo, B.clone().index_fill_(0, torch.tensor([3]), float("inf")))
    with pytest.raises(ValueError, match="needs a symmetric matrix"):
        gpsparse.solve(build("nonsym-40"), torch.ones(40, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown method"):
        gpsparse.solve(coo, B, method="gmres")
    with pytest.raises(ValueError, match="unknown preconditioner"):
        gpsparse.solve(coo, B, preconditioner="amg")
    with pytest.raises(ValueError, match="x0 has shape"):
        gpsparse.solve(coo, B, x0=torch.zeros(3, dtype=torch.float64))


def test_not_positive_definite_raises():
    indef = build("sym-indefinite-40")
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        gpsparse.solve(indef, torch.ones(40, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_mismatch():
    coo = build("lattice5-6x6")
    with pytest.raises(ValueError, match="on cuda"):
        gpsparse.solve(coo, torch.ones(36, dtype=torch.float64, device="cuda"))


def test_inputs_not_modified():
    coo = build("lattice13-5x5")
    values = coo.values().clone()
    B = torch.randn(25, 3, dtype=torch.float64)
    B_copy = B.clone()
    x0 = torch.randn(25, 3, dtype=torch.float64)
    x0_copy = x0.clone()
    gpsparse.solve(coo, B, x0=x0, preconditioner="ic0")
    assert torch.equal(coo.values(), values) and torch.equal(B, B_copy) and torch.equal(x0, x0_copy)


def test_ic0_retries_with_a_shift_when_pivots_break_down():
    """IC(0) breaks down on this SPD non-M-matrix; the solver retries with a diagonal shift and converges."""
    from matrices import lattice_precision_13pt, scipy_to_torch

    from gpsparse.core.preconditioners import IncompleteCholeskyPreconditioner

    A = scipy_to_torch(lattice_precision_13pt(24, kappa=0.05, noise=100.0))
    with pytest.raises(NotPositiveDefiniteError):
        IncompleteCholeskyPreconditioner.from_matrix(A.to_sparse_csr())
    B = torch.randn(A.shape[0], 2, dtype=torch.float64)
    x = gpsparse.solve(A, B, preconditioner="ic0", rtol=1e-10, strict=True)
    torch.testing.assert_close(A @ x, B, rtol=1e-7, atol=1e-8)


def test_csr_built_from_grad_values_never_densifies():
    """torch.sparse_csr_tensor(crow, col, v)'s own backward is dense n × n: gpsparse reads the leaf v instead."""
    n = 3000
    i = torch.arange(n)
    v = torch.full((n,), 2.0, dtype=torch.float64, requires_grad=True)
    A = torch.sparse_csr_tensor(torch.arange(n + 1), i, v, (n, n))
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        gpsparse.solve(A, torch.ones(n, dtype=torch.float64)).sum().backward()
    assert not [e for e in prof.function_events if e.cpu_memory_usage >= n * n * 8]
    torch.testing.assert_close(v.grad, torch.full((n,), -0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="dense n × n gradient"):
        gpsparse.solve(
            torch.sparse_csr_tensor(torch.arange(n + 1), i, v * 1.0, (n, n)), torch.ones(n, dtype=torch.float64)
        )
    op = gpsparse.SparseLinearOperator.from_csr(torch.arange(n + 1), i, v * 1.0, (n, n))
    assert op.is_symmetric and op.values.grad_fn is not None


def test_convergence_warning_is_a_linear_operator_numerical_warning():
    """Users filter gpsparse's and linear_operator's numerical warnings together."""
    import warnings

    from linear_operator.utils.warnings import NumericalWarning

    assert issubclass(ConvergenceWarning, NumericalWarning)
    coo = build("lattice13-5x5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=NumericalWarning)
        gpsparse.solve(coo, torch.randn(25, dtype=torch.float64), max_iters=2)  # silenced, not raised


@pytest.mark.parametrize("symmetric_grad", [None, True, False])
def test_symmetric_grad_switch_matches_dense_autograd(symmetric_grad):
    """False: the entry-wise gradient of dense torch.linalg.solve (and torchsparsegradutils); None/True: symmetrised."""
    A = build("lattice5-6x6")
    B = torch.randn(36, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    G = torch.randn(36, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    values = A.values().clone().requires_grad_(True)
    X = gpsparse.solve(
        torch.sparse_coo_tensor(A.indices(), values, A.shape), B, rtol=1e-13, symmetric_grad=symmetric_grad
    )
    (X * G).sum().backward()
    dense_values = A.values().clone().requires_grad_(True)
    dense = torch.sparse_coo_tensor(A.indices(), dense_values, A.shape).to_dense()
    (torch.linalg.solve(dense, B) * G).sum().backward()
    expected = dense_values.grad
    if symmetric_grad is not False:  # (g + gᵀ)/2 on the pattern: the transpose of entry (i, j) is entry (j, i)
        i, j = A.indices()
        transpose = torch.sparse_coo_tensor(torch.stack([j, i]), expected, A.shape).coalesce().values()
        expected = 0.5 * (expected + transpose)
    torch.testing.assert_close(values.grad, expected, rtol=1e-8, atol=1e-10)


def test_symmetric_grad_errors():
    with pytest.raises(ValueError, match="symmetric_grad=True needs a symmetric matrix"):
        gpsparse.solve(build("nonsym-40"), torch.ones(40, dtype=torch.float64), method="bicgstab", symmetric_grad=True)
    with pytest.raises(ValueError, match="served by the Krylov road"):
        gpsparse.solve(build("lattice5-6x6"), torch.ones(36, dtype=torch.float64), road="banded", symmetric_grad=False)
