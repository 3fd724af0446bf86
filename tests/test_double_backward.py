"""Double backward (Hessian-vector products) through the Krylov road's solve and inverse quadratic form."""

from __future__ import annotations

import pytest
import torch
from matrices import build

import gpsparse
from gpsparse import SparseLinearOperator


def _dense(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The dense matrix of values ``v`` on ``A``'s pattern, twice differentiable (unlike torch's sparse → dense)."""
    i, j = A.indices()
    return torch.zeros(A.shape, dtype=v.dtype).index_put((i, j), v)


def _hvp(fn, values: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∇f, (∇²f) u)`` by double backward."""
    (grad,) = torch.autograd.grad(fn(values), values, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * direction).sum(), values)
    return grad.detach(), hvp


@pytest.mark.parametrize("symmetric_grad", [None, False])
def test_solve_hessian_vector_product_matches_dense(symmetric_grad):
    A = build("lattice13-5x5")  # half-bandwidth 10: the Krylov road
    i, j = A.indices()
    B = torch.randn(25, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G = torch.randn(25, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u = torch.randn(A.values().shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    transpose = torch.sparse_coo_tensor(torch.stack([j, i]), torch.arange(i.numel()), A.shape).coalesce().values()

    csr = A.to_sparse_csr()  # a coalesced COO tensor is in CSR order already

    pattern = SparseLinearOperator.from_tensor(A).pattern  # symmetric; values in CSR (= coalesced COO) order

    def sparse_loss(v):
        # torch's own sparse tensors are differentiable once in their values (a torch limitation):
        # double backward takes the values through a SparseLinearOperator. from_csr would symmetrise them
        # (a symmetric gradient whatever symmetric_grad says), so the raw values go on the pattern directly.
        op = (
            SparseLinearOperator(v, pattern=pattern)
            if symmetric_grad is False
            else SparseLinearOperator.from_csr(csr.crow_indices(), csr.col_indices(), v, A.shape)
        )
        X = gpsparse.solve(op, B, rtol=1e-13, symmetric_grad=symmetric_grad)
        return (X * G).sum()

    def dense_loss(v):
        if symmetric_grad is not False:  # the symmetric convention: the matrix is a function of sym(v)
            v = 0.5 * (v + v[transpose])
        return (torch.linalg.solve(_dense(A, v), B) * G).sum()

    v = A.values().clone().requires_grad_(True)
    grad, hvp = _hvp(sparse_loss, v, u)
    v_dense = A.values().clone().requires_grad_(True)
    grad_dense, hvp_dense = _hvp(dense_loss, v_dense, u)
    torch.testing.assert_close(grad, grad_dense, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(hvp, hvp_dense, rtol=1e-8, atol=1e-10)


def test_rhs_hessian_of_solve_and_inv_quad():
    """Second derivatives in the right-hand side and the values: inv_quad's double backward."""
    A = build("lattice13-5x5")
    y0 = torch.randn(25, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    u = torch.randn(A.values().shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def sparse_loss(v):
        op = SparseLinearOperator(v, pattern=SparseLinearOperator.from_tensor(A).pattern)
        with gpsparse.settings.solver_defaults(rtol=1e-13):
            return op.inv_quad(y0)

    def dense_loss(v):
        dense = _dense(A, v)
        dense = 0.5 * (dense + dense.mT)  # the symmetric convention of a symmetric pattern
        return (y0 * torch.linalg.solve(dense, y0)).sum()

    pattern = SparseLinearOperator.from_tensor(A).pattern
    order = torch.sparse_coo_tensor(A.indices(), torch.arange(A.values().numel()), A.shape).to_sparse_csr().values()
    v = A.values()[order].clone().requires_grad_(True)  # values in the pattern's CSR order
    grad, hvp = _hvp(sparse_loss, v, u[order])
    assert pattern.nnz == v.numel()
    v_dense = A.values().clone().requires_grad_(True)
    grad_dense, hvp_dense = _hvp(dense_loss, v_dense, u)
    torch.testing.assert_close(grad, grad_dense[order], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(hvp, hvp_dense[order], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("road", ["banded", "slq", "cholesky", "funm"])
def test_first_order_roads_name_double_backward(road):
    from gpsparse.core.cholmod import cholmod_available
    from gpsparse.errors import DoubleBackwardError

    if road == "cholesky" and not cholmod_available():
        pytest.skip("scikit-sparse (CHOLMOD) not installed")

    A = build("lattice5-6x6")  # half-bandwidth 6: the banded road
    csr = A.to_sparse_csr()
    v = A.values().clone().requires_grad_(True)
    op = SparseLinearOperator.from_csr(csr.crow_indices(), csr.col_indices(), v, A.shape)
    if road == "banded":
        out = gpsparse.solve(op, torch.ones(36, dtype=torch.float64)).sum()
    elif road == "cholesky":
        with (
            gpsparse.settings.solver_defaults(max_banded_bandwidth=0),
            gpsparse.settings.logdet_defaults(method="cholesky"),
        ):
            out = gpsparse.logdet(op)
    elif road == "funm":
        out = gpsparse.funm(op, torch.ones(36, dtype=torch.float64), "inv_sqrt", num_lanczos=10).sum()
    else:
        out = gpsparse.logdet(op, road="krylov", generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(out, v, create_graph=True)
    with pytest.raises(DoubleBackwardError, match="double backward .* not supported through"):
        torch.autograd.grad(grad.sum(), v)
    if road == "banded":  # first derivatives are unchanged under create_graph
        (plain,) = torch.autograd.grad(gpsparse.solve(op, torch.ones(36, dtype=torch.float64)).sum(), v)
        torch.testing.assert_close(plain, grad.detach())
