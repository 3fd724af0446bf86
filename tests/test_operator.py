"""SparseLinearOperator behaviour beyond the conformance suite: types kept, gradients, limits, errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import tolerance
from linear_operator.operators import ConstantDiagLinearOperator, DenseLinearOperator, DiagLinearOperator
from matrices import build, lattice_precision_5pt, nonsymmetric, scipy_to_torch

import gpsparse
from gpsparse import DenseSizeError, SparseLinearOperator, SparsityPattern

TOL = tolerance(torch.float64, "direct")


def _op(name="lattice13-5x5", **kwargs):
    return SparseLinearOperator.from_tensor(build(name), **kwargs)


def _without_diagonal():
    """A symmetric matrix missing some diagonal entries."""
    i = torch.tensor([[0, 0, 1, 2, 3], [0, 1, 0, 3, 2]])
    v = torch.tensor([2.0, 1.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    return torch.sparse_coo_tensor(i, v, (4, 4)).coalesce()


def test_from_tensor_gradients_reach_the_tensor_values():
    coo = build("nonsym-40")
    values = coo.values().clone().requires_grad_(True)
    A = torch.sparse_coo_tensor(coo.indices(), values, coo.shape).to_sparse_csr()
    op = SparseLinearOperator.from_tensor(A)
    assert not op.is_symmetric
    x = torch.randn(40, 3, dtype=torch.float64)
    (op @ x).pow(2).sum().backward()
    values_ref = coo.values().clone().requires_grad_(True)
    dense = torch.sparse_coo_tensor(coo.indices(), values_ref, coo.shape).to_dense()
    (dense @ x).pow(2).sum().backward()
    torch.testing.assert_close(values.grad, values_ref.grad, **TOL)


def test_symmetry_detection_and_declaration():
    assert _op().is_symmetric
    assert not _op("nonsym-40").is_symmetric
    assert not _op("lattice13-5x5", symmetric=False).is_symmetric
    with pytest.raises(ValueError, match="not symmetric"):
        _op("nonsym-40", symmetric=True)


def test_transpose_permutes_values():
    op = _op("nonsym-40")
    torch.testing.assert_close(op.mT.to_dense(), op.to_dense().T, **TOL)
    assert op.mT.mT.pattern is op.pattern
    sym = _op()
    assert sym.mT is sym


def test_add_diagonal_keeps_type_and_reaches_diagonal():
    base = _without_diagonal()
    op = SparseLinearOperator.from_tensor(base)
    noise = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    per_entry = (1.0 + torch.rand(4, dtype=torch.float64)).requires_grad_(True)
    for diag, expected in ((noise, noise * torch.eye(4, dtype=torch.float64)), (per_entry, torch.diag(per_entry))):
        out = op.add_diagonal(diag)
        assert isinstance(out, SparseLinearOperator) and out.is_symmetric
        torch.testing.assert_close(out.to_dense(), base.to_dense() + expected, **TOL)
    x = torch.randn(4, 2, dtype=torch.float64)
    (op.add_diagonal(noise).inv_quad(x)).backward()
    dense = base.to_dense() + noise.detach() * torch.eye(4, dtype=torch.float64)
    sol = torch.linalg.solve(dense, x)
    torch.testing.assert_close(noise.grad, -(sol * sol).sum(), **tolerance(torch.float64))


def test_add_diag_operators_as_gpytorch_does():
    op = _op()
    noise = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    for other in (
        ConstantDiagLinearOperator(noise, diag_shape=25),
        DiagLinearOperator(torch.rand(25, dtype=torch.float64)),
    ):
        out = op + other
        assert isinstance(out, SparseLinearOperator)
        torch.testing.assert_close(out.to_dense(), op.to_dense() + other.to_dense(), **TOL)
    out = op + ConstantDiagLinearOperator(noise, diag_shape=25)
    out.inv_quad(torch.ones(25, 1, dtype=torch.float64)).backward()
    assert noise.grad is not None and noise.grad.shape == (1,)


def test_add_sparse_operators_union_pattern():
    a = _op("lattice5-6x6")
    b = SparseLinearOperator.from_tensor(scipy_to_torch(lattice_precision_5pt(6, kappa=0.3) @ lattice_precision_5pt(6)))
    out = a + b
    assert isinstance(out, SparseLinearOperator)
    torch.testing.assert_close(out.to_dense(), a.to_dense() + b.to_dense(), **TOL)
    same = a + a
    assert same.pattern is a.pattern


def test_scaling_keeps_type_and_gradient():
    op = _op()
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    out = op * scale
    assert isinstance(out, SparseLinearOperator)
    torch.testing.assert_close(out.to_dense(), 2.5 * op.to_dense(), **TOL)
    out.inv_quad(torch.ones(25, 1, dtype=torch.float64)).backward()
    assert scale.grad is not None
    batch = SparseLinearOperator(op.values.expand(3, -1), pattern=op.pattern) * torch.tensor(
        [1.0, 2.0, 3.0], dtype=torch.float64
    ).view(3, 1, 1)
    assert isinstance(batch, SparseLinearOperator) and batch.shape == (3, 25, 25)


def test_elementwise_product_stays_sparse():
    a = _op("lattice5-6x6")
    b = SparseLinearOperator.from_tensor(scipy_to_torch(lattice_precision_5pt(6) @ lattice_precision_5pt(6)))
    for other in (a, b, DenseLinearOperator(torch.randn(36, 36, dtype=torch.float64))):
        out = a * other
        assert isinstance(out, SparseLinearOperator) and out.pattern.nnz == a.pattern.nnz
        torch.testing.assert_close(out.to_dense(), a.to_dense() * other.to_dense(), **TOL)


def test_broadcast_products_keep_type():
    """(b, 1, 1) constants (batched ScaleKernel) and row/column scalings broadcast against the pattern."""
    op = _op()
    dense = op.to_dense()
    for other in (
        torch.rand(2, 1, 1, dtype=torch.float64),
        torch.rand(25, 1, dtype=torch.float64),
        torch.rand(3, 1, 25, dtype=torch.float64),
    ):
        out = op.mul(other)
        assert isinstance(out, SparseLinearOperator)
        torch.testing.assert_close(out.to_dense(), dense * other, **TOL)
    assert op.mul(torch.rand(2, 1, 1, dtype=torch.float64)).is_symmetric
    assert not op.mul(torch.rand(25, 1, dtype=torch.float64)).is_symmetric


def test_getitem_stays_sparse():
    op = _op("nonsym-40")
    dense = op.to_dense()
    rows = torch.tensor([3, 1, 1, 39])
    for index in (
        (slice(2, 9), slice(None)),
        (slice(None), slice(5, 30, 3)),
        (rows, slice(0, 10)),
        (slice(1, 4), rows),
    ):
        out = op[index]
        assert isinstance(out, SparseLinearOperator), index
        torch.testing.assert_close(out.to_dense(), dense[index], **TOL)
    torch.testing.assert_close(op[rows, torch.tensor([0, 1, 2, 39])], dense[rows, torch.tensor([0, 1, 2, 39])], **TOL)
    torch.testing.assert_close(op.diagonal(), dense.diagonal(), **TOL)
    sym = _op()
    assert sym[2:7, 2:7].is_symmetric and not sym[2:7, 3:8].is_symmetric


def test_batch_methods_share_pattern():
    op = _op()
    batch = op.expand(2, 3, 25, 25)
    assert isinstance(batch, SparseLinearOperator) and batch.pattern is op.pattern
    assert batch.sum(0).shape == (3, 25, 25) and isinstance(batch.sum(0), SparseLinearOperator)
    assert batch.permute(1, 0, 2, 3).shape == (3, 2, 25, 25)
    assert batch.unsqueeze(1).shape == (2, 1, 3, 25, 25)
    x = torch.randn(2, 3, 25, 4, dtype=torch.float64)
    torch.testing.assert_close(batch @ x, op.to_dense() @ x, **TOL)


def test_dense_limits_raise_clear_errors():
    op = _op("lattice5-6x6")
    with gpsparse.settings.max_dense_size(100):
        with pytest.raises(DenseSizeError, match="max_dense_size"):
            op.to_dense()
        with pytest.raises(DenseSizeError, match="Cholesky"):
            op.cholesky()
    assert op.to_dense().shape == (36, 36)


def test_device_and_dtype_moves(device):
    op = _op()
    moved = op.to(device)
    assert moved.device.type == device.type and moved.pattern.device.type == device.type
    assert op.float().dtype == torch.float32 and op.float().pattern is op.pattern
    assert op.double().dtype == torch.float64
    x = torch.randn(25, 2, dtype=torch.float64, device=device)
    torch.testing.assert_close((moved @ x).cpu(), op @ x.cpu(), **TOL)
    torch.testing.assert_close(moved.solve(x).cpu(), op.solve(x.cpu()), **tolerance(torch.float64))


def test_pickle_roundtrip():
    op = _op("nonsym-40")
    clone = pickle.loads(pickle.dumps(op))
    torch.testing.assert_close(clone.to_dense(), op.to_dense())


def test_operator_solve_below_max_cholesky_size_uses_gpsparse():
    """linear_operator would factorise densely below max_cholesky_size; gpsparse always solves iteratively."""
    from unittest.mock import patch

    op = _op()
    with patch("torch.linalg.cholesky_ex", side_effect=AssertionError("dense Cholesky called")):
        op.solve(torch.ones(25, 2, dtype=torch.float64))
        op.inv_quad(torch.ones(25, 2, dtype=torch.float64))
        op.inv_quad_logdet(torch.ones(25, 2, dtype=torch.float64), logdet=False)


def test_operator_nonsymmetric_solve_uses_bicgstab():
    op = SparseLinearOperator.from_tensor(scipy_to_torch(nonsymmetric(30)))
    b = torch.randn(30, 2, dtype=torch.float64)
    with gpsparse.settings.solver_defaults(rtol=1e-11):
        x = op.solve(b)
    torch.testing.assert_close(x, torch.linalg.solve(op.to_dense(), b), **tolerance(torch.float64))


def test_constructor_validation():
    pattern, _ = SparsityPattern.from_indices(torch.tensor([0, 1]), torch.tensor([0, 1]), (2, 2))
    with pytest.raises(ValueError, match="nnz=2"):
        SparseLinearOperator(torch.ones(3), pattern=pattern)
    with pytest.raises(TypeError, match="floating"):
        SparseLinearOperator(torch.ones(2, dtype=torch.long), pattern=pattern)
    with pytest.raises(TypeError, match="SparsityPattern"):
        SparseLinearOperator(torch.ones(2), pattern=None)
    with pytest.raises(ValueError, match="duplicate"):
        SparsityPattern.from_indices(torch.tensor([0, 0]), torch.tensor([1, 1]), (2, 2))
    with pytest.raises(ValueError, match="out of range"):
        SparsityPattern.from_indices(torch.tensor([0, 2]), torch.tensor([1, 1]), (2, 2))
    with pytest.raises(ValueError, match="2-D"):
        SparseLinearOperator.from_tensor(torch.eye(3).to_sparse().unsqueeze(0))


def test_union_of_nested_patterns_takes_the_subset_path_and_equals_the_general_merge():
    """``P = Q + WᵀD⁻¹W`` with the Gram pattern inside ``Q``'s: the union is ``Q``'s pattern (no merge sort)."""
    from gpsparse.core.pattern import SparsityPattern

    big = SparseLinearOperator.from_tensor(
        scipy_to_torch(lattice_precision_5pt(6, kappa=0.3) @ lattice_precision_5pt(6))
    )  # 13-point stencil
    small = _op("lattice5-6x6")  # 5-point stencil, inside it
    for first, second in ((big, small), (small, big)):
        pattern, position = first.pattern.union(second.pattern)
        assert pattern.nnz == big.pattern.nnz and torch.equal(pattern.keys, big.pattern.keys)
        if first is big:
            assert pattern is big.pattern  # same object: its cached structure is reused
        # the general merge, forced by a pattern that is contained in neither
        keys = torch.unique(torch.cat([first.pattern.keys, second.pattern.keys]), return_inverse=True)[1]
        torch.testing.assert_close(position, keys)
        out = first + second
        torch.testing.assert_close(out.to_dense(), first.to_dense() + second.to_dense(), **TOL)
    # neither contains the other: the general path
    shifted = SparsityPattern.from_indices(torch.tensor([0, 35]), torch.tensor([35, 0]), (36, 36))[0]
    pattern, _ = small.pattern.union(shifted)
    assert pattern.nnz == small.pattern.nnz + 2
