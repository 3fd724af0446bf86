"""Tests of gpsparse.core.preconditioners against dense float64 torch.linalg references."""

from __future__ import annotations

import pytest
import torch
from helpers import tolerance

import gpsparse.core.preconditioners as pc_package
import gpsparse.core.preconditioners.ic0 as pc_module  # the IC(0) module: its numba switch and CPU solve flag
import gpsparse.core.preconditioners.registry as registry
from gpsparse.core.preconditioners import (
    IC_SHIFTS,
    IncompleteCholeskyPreconditioner,
    JacobiPreconditioner,
    Preconditioner,
    build_preconditioner,
    incomplete_cholesky_with_shift,
    stale_cholesky,
)
from gpsparse.errors import NotPositiveDefiniteError

DTYPES = [torch.float64, torch.float32]
HAS_NUMBA = pc_module._numba is not None


# ---------------------------------------------------------------------------
# Test matrices (torch only, sparse COO/CSR)
# ---------------------------------------------------------------------------


def _coo(rows, cols, vals, n, dtype=torch.float64):
    idx = torch.stack([torch.as_tensor(rows), torch.as_tensor(cols)])
    return torch.sparse_coo_tensor(idx, torch.as_tensor(vals, dtype=dtype), (n, n)).coalesce()


def laplacian_1d(n: int, kappa2: float = 0.0, dtype=torch.float64) -> torch.Tensor:
    """Dirichlet 1-D Laplacian ``κ²I + tridiag(-1, 2, -1)`` (CSR)."""
    i = torch.arange(n)
    rows = torch.cat([i, i[1:], i[:-1]])
    cols = torch.cat([i, i[:-1], i[1:]])
    vals = torch.cat([torch.full((n,), 2.0 + kappa2), -torch.ones(2 * (n - 1))])
    return _coo(rows, cols, vals, n, dtype).to_sparse_csr()


def lattice_5pt(m: int, kappa2: float = 0.0, dtype=torch.float64) -> torch.Tensor:
    """``κ²I + L`` with L the Dirichlet 5-point Laplacian on an m×m grid (COO)."""
    n = m * m
    ij = torch.arange(n)
    x, y = ij % m, ij // m
    rows, cols, vals = [ij], [ij], [torch.full((n,), 4.0 + kappa2)]
    for dx, dy in [(1, 0), (-1, 0), (0, 1), (0, -1)]:
        ok = (x + dx >= 0) & (x + dx < m) & (y + dy >= 0) & (y + dy < m)
        rows.append(ij[ok])
        cols.append((ij + dx + dy * m)[ok])
        vals.append(-torch.ones(int(ok.sum())))
    return _coo(torch.cat(rows), torch.cat(cols), torch.cat(vals), n, dtype)


def lattice_13pt(m: int, kappa2: float, tau: float = 1.0, noise_precision: float = 1.0, dtype=torch.float64):
    """``τ(κ²I + L)² + σ⁻²I`` on an m×m grid: 13 nonzeros per interior row (CSR)."""
    K = lattice_5pt(m, kappa2)
    K2 = torch.sparse.mm(K, K).coalesce()
    eye = _coo(torch.arange(m * m), torch.arange(m * m), torch.ones(m * m), m * m)
    return (tau * K2 + noise_precision * eye).coalesce().to(dtype).to_sparse_csr()


def random_spd(n: int, density: float = 0.2, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Sparse, strictly diagonally dominant (hence SPD) with mixed-sign entries (CSR)."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    B = B * (torch.rand(n, n, generator=g) < density)
    S = torch.tril(B, -1)
    S = S + S.T
    A = S + torch.diag(S.abs().sum(1) + 1.0)
    return A.to(dtype).to_sparse_csr()


MATRICES = {
    "lattice5": lambda dtype: lattice_5pt(5, 0.5, dtype).to_sparse_csr(),
    "lattice13": lambda dtype: lattice_13pt(5, 0.5, dtype=dtype),
    "random": lambda dtype: random_spd(20, dtype=dtype),
}


def dense_ic0(A: torch.Tensor) -> torch.Tensor:
    """Independent dense IC(0) oracle (right-looking, pattern-masked), float64."""
    A = A.to_dense().to(torch.float64)
    n = A.shape[0]
    mask = torch.tril(A != 0)
    L = torch.tril(A).clone()
    for k in range(n):
        L[k, k] = L[k, k].sqrt()
        L[k + 1 :, k] = L[k + 1 :, k] / L[k, k]
        update = torch.outer(L[k + 1 :, k], L[k + 1 :, k])
        L[k + 1 :, k + 1 :] -= torch.tril(update) * mask[k + 1 :, k + 1 :]
    return L


def dense_ref(P: Preconditioner, A: torch.Tensor):
    """Dense float64 ``(C, M)`` of a preconditioner built from ``A``."""
    if isinstance(P, JacobiPreconditioner):
        C = torch.diag(A.to_dense().to(torch.float64).diagonal().sqrt())
    else:
        C = dense_ic0(A)
    return C, C @ C.T


def build(kind: str, A: torch.Tensor) -> Preconditioner:
    cls = {"jacobi": JacobiPreconditioner, "ic0": IncompleteCholeskyPreconditioner}[kind]
    return cls.from_matrix(A)


# (kind, CPU backend) pairs: Jacobi has one code path, IC(0) three.
KIND_BACKENDS = [("jacobi", "numba"), ("ic0", "numba"), ("ic0", "torch"), ("ic0", "torch-upper")]


@pytest.fixture
def backend(request, monkeypatch):
    """IC(0) solve backend on the CPU (indirect parameter): numba kernels;
    torch.triangular_solve on L (the no-numba CPU path); or
    torch.triangular_solve with an explicit CSR Lᵀ (the CUDA code path, run
    here on MKL)."""
    if request.param == "numba" and not HAS_NUMBA:
        if request.getfixturevalue("kind") == "ic0":
            pytest.skip("numba not installed")
        return "torch"
    if request.param.startswith("torch"):
        monkeypatch.setattr(pc_module, "_numba", None)
    if request.param == "torch-upper":
        monkeypatch.setattr(pc_module, "_CPU_TRANSPOSED_SOLVE", False)
    return request.param


# ---------------------------------------------------------------------------
# Values against dense references
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "backend"), KIND_BACKENDS, indirect=["backend"])
@pytest.mark.parametrize("name", sorted(MATRICES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_matches_dense(kind, name, dtype, backend):
    A = MATRICES[name](dtype)
    P = build(kind, A)
    C, M = dense_ref(P, A)
    n = A.shape[0]
    tol = tolerance(dtype, "direct")
    r = torch.randn(n, 3, dtype=torch.float64)
    rd = r.to(dtype)
    assert P.dtype == dtype and P.size == n
    torch.testing.assert_close(P(rd), torch.linalg.solve(M, r).to(dtype), **tol)
    torch.testing.assert_close(P.solve(rd), P(rd))
    torch.testing.assert_close(
        P.apply_inv_factor(rd), torch.linalg.solve_triangular(C, r, upper=False).to(dtype), **tol
    )
    torch.testing.assert_close(
        P.apply_inv_factor_t(rd), torch.linalg.solve_triangular(C.T, r, upper=True).to(dtype), **tol
    )
    # C⁻ᵀ(C⁻¹ r) = M⁻¹ r
    torch.testing.assert_close(P.apply_inv_factor_t(P.apply_inv_factor(rd)), P(rd), **tol)
    # C, rebuilt from the applies alone: C⁻ᵀ is the transpose of C⁻¹ and C Cᵀ = M
    eye = torch.eye(n, dtype=dtype)
    C_inv, C_inv_t = P.apply_inv_factor(eye), P.apply_inv_factor_t(eye)
    torch.testing.assert_close(C_inv_t, C_inv.T, **tol)
    C_from_apply = torch.linalg.inv(C_inv.double())
    torch.testing.assert_close(C_from_apply @ C_from_apply.T, M, **tolerance(dtype, "direct"))
    torch.testing.assert_close(P.logdet(), torch.logdet(M).to(dtype), **tol)
    assert P.logdet().dtype == dtype


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_ic0_factor_defining_property(name):
    """(L Lᵀ)_ij = A_ij on the pattern of A, L has exactly tril(A)'s pattern, C Cᵀ = M."""
    A = MATRICES[name](torch.float64)
    P = IncompleteCholeskyPreconditioner.from_matrix(A)
    L = P.factor.to_dense()
    Ad = A.to_dense()
    pattern = Ad != 0
    torch.testing.assert_close((L @ L.T)[pattern], Ad[pattern], **tolerance(torch.float64, "direct"))
    torch.testing.assert_close(L, dense_ic0(A), **tolerance(torch.float64, "direct"))
    lower = A.to_sparse_coo().coalesce()
    keep = lower.indices()[0] >= lower.indices()[1]
    expected = lower.indices()[:, keep]
    got = P.factor.to_sparse_coo().coalesce().indices()
    assert torch.equal(got, expected)
    # M = C Cᵀ, probed through the applies: C⁻¹ M C⁻ᵀ = I
    Minv_cols = P(torch.eye(A.shape[0], dtype=torch.float64))
    torch.testing.assert_close(Minv_cols, torch.linalg.inv(L @ L.T), **tolerance(torch.float64, "direct"))


def test_ic0_keeps_explicit_zeros_in_pattern():
    A = laplacian_1d(6, 1.0).to_dense()
    A[4, 1] = A[1, 4] = 0.0
    rows, cols = torch.tril_indices(6, 6)
    keep = (cols >= rows - 1) | ((rows == 4) & (cols == 1))  # stored zero at (4, 1)
    S = _coo(rows[keep], cols[keep], A[rows[keep], cols[keep]], 6)
    P = IncompleteCholeskyPreconditioner.from_matrix(S.to_sparse_csr())
    assert P.factor.values().numel() == int(keep.sum())


@pytest.mark.parametrize("matrix", ["laplacian_1d", "arrow_free_banded"])
def test_ic0_equals_cholesky_without_fill_in(matrix):
    if matrix == "laplacian_1d":
        A = laplacian_1d(30, 0.1)
    else:  # full band of half-width 3: Cholesky has no fill-in
        n, w = 25, 3
        g = torch.Generator().manual_seed(3)
        B = torch.randn(n, n, generator=g, dtype=torch.float64)
        band = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= w
        S = (B + B.T) * band
        A = (S + torch.diag(S.abs().sum(1) + 1)).to_sparse_csr()
    P = IncompleteCholeskyPreconditioner.from_matrix(A)
    Ad = A.to_dense()
    tol = tolerance(torch.float64, "direct")
    torch.testing.assert_close(P.factor.to_dense(), torch.linalg.cholesky(Ad), **tol)
    torch.testing.assert_close(P.logdet(), torch.logdet(Ad), **tol)
    r = torch.randn(A.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(P(r), torch.linalg.solve(Ad, r), **tol)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
def test_ic0_python_kernel_equals_numba(monkeypatch):
    A = lattice_13pt(8, 0.3)
    fast = IncompleteCholeskyPreconditioner.from_matrix(A)
    monkeypatch.setattr(pc_module, "_numba", None)
    slow = IncompleteCholeskyPreconditioner.from_matrix(A)
    torch.testing.assert_close(fast.factor.values(), slow.factor.values(), rtol=0, atol=0)


def test_ic0_shift_factorises_shifted_matrix():
    A = random_spd(15, seed=4)
    shift = 0.25
    Ad = A.to_dense()
    shifted = (Ad + shift * torch.diag(Ad.diagonal())).to_sparse_csr()
    P = IncompleteCholeskyPreconditioner.from_matrix(A, shift=shift)
    Q = IncompleteCholeskyPreconditioner.from_matrix(shifted)
    torch.testing.assert_close(P.factor.to_dense(), Q.factor.to_dense(), **tolerance(torch.float64, "direct"))


# ---------------------------------------------------------------------------
# Shapes, batches, layouts, dtypes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "backend"), KIND_BACKENDS, indirect=["backend"])
@pytest.mark.parametrize("shape", [(16, 1), (16, 5), (2, 16, 3), (2, 3, 16, 1)])
def test_apply_shapes(kind, shape, backend):
    A = lattice_5pt(4, 0.2).to_sparse_csr()
    P = build(kind, A)
    C, M = dense_ref(P, A)
    r = torch.randn(shape, dtype=torch.float64)
    tol = tolerance(torch.float64, "direct")
    for out, ref in [
        (P(r), torch.linalg.solve(M, r)),
        (P.apply_inv_factor(r), torch.linalg.solve_triangular(C, r, upper=False)),
        (P.apply_inv_factor_t(r), torch.linalg.solve_triangular(C.T, r, upper=True)),
    ]:
        assert out.shape == r.shape
        torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize(("kind", "backend"), KIND_BACKENDS, indirect=["backend"])
def test_apply_non_contiguous_rhs(kind, backend):
    """Column slices and transposed views (torch.triangular_solve's MKL path
    silently mis-solves some strided right-hand sides; the wrapper must not)."""
    A = random_spd(12, seed=5)
    P = build(kind, A)
    _, M = dense_ref(P, A)
    base = torch.randn(12, 4, dtype=torch.float64)
    for r in [base[:, :1], base[:, 1:3], base.T.contiguous().T, base.T.contiguous().T[:, 2:3], base[::1, ::2]]:
        torch.testing.assert_close(P(r), torch.linalg.solve(M, r), **tolerance(torch.float64, "direct"))


def test_apply_empty_columns():
    P = IncompleteCholeskyPreconditioner.from_matrix(laplacian_1d(5))
    assert P(torch.zeros(5, 0, dtype=torch.float64)).shape == (5, 0)


def test_jacobi_batched_diagonal():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(2, 3, 7, generator=g, dtype=torch.float64) + 0.5
    P = JacobiPreconditioner(d)
    assert P.batch_shape == (2, 3) and P.size == 7
    r = torch.randn(2, 3, 7, 4, dtype=torch.float64)
    torch.testing.assert_close(P(r), torch.linalg.solve(torch.diag_embed(d), r))
    torch.testing.assert_close(P.logdet(), torch.logdet(torch.diag_embed(d)))
    assert P.logdet().shape == (2, 3)
    # unbatched r broadcasts against the batched diagonal
    r2 = torch.randn(7, 4, dtype=torch.float64)
    assert P(r2).shape == (2, 3, 7, 4)
    torch.testing.assert_close(P.apply_inv_factor(r2) * d.sqrt().unsqueeze(-1), r2.expand(2, 3, 7, 4))


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_jacobi_from_batched_matrix(layout):
    A1 = random_spd(6, seed=1).to_dense()
    A2 = random_spd(6, seed=2).to_dense()
    dense = torch.stack([A1, A2])
    shared = ((A1 != 0) | (A2 != 0)).to_sparse_csr()  # batched CSR needs one pattern
    crow, col = shared.crow_indices(), shared.col_indices()
    rows = torch.repeat_interleave(torch.arange(6), crow.diff())
    vals = dense[:, rows, col]
    if layout == "csr":
        S = torch.sparse_csr_tensor(crow.expand(2, -1), col.expand(2, -1), vals, (2, 6, 6))
    else:
        S = dense.to_sparse()
    torch.testing.assert_close(S.to_dense(), dense)
    P = JacobiPreconditioner.from_matrix(S)
    torch.testing.assert_close(P.diagonal, dense.diagonal(dim1=-2, dim2=-1))


def test_input_layouts_agree():
    """CSR, coalesced COO, uncoalesced COO (duplicates summed), unsorted CSR,
    int32-index CSR and an object with to_sparse_csr() all give the same
    preconditioner."""
    A = random_spd(10, seed=7)
    Ad = A.to_dense()
    coo = A.to_sparse_coo().coalesce()
    idx, vals = coo.indices(), coo.values()
    # split every value into two duplicates, and shuffle the entries
    perm = torch.randperm(2 * vals.numel(), generator=torch.Generator().manual_seed(0))
    uncoalesced = torch.sparse_coo_tensor(
        torch.cat([idx, idx], 1)[:, perm], torch.cat([0.25 * vals, 0.75 * vals])[perm], (10, 10)
    )
    assert not uncoalesced.is_coalesced()
    # CSR with columns reversed inside every row
    crow, col = A.crow_indices(), A.col_indices()
    order = torch.cat([torch.arange(int(crow[i]), int(crow[i + 1])).flip(0) for i in range(10)])
    unsorted = torch.sparse_csr_tensor(crow, col[order], A.values()[order], (10, 10))
    torch.testing.assert_close(unsorted.to_dense(), Ad)

    class HasCSR:
        def to_sparse_csr(self):
            return A

    int32 = torch.sparse_csr_tensor(crow.int(), col.int(), A.values(), (10, 10))

    inputs = [A, coo, uncoalesced, unsorted, HasCSR(), int32]
    ref_ic = IncompleteCholeskyPreconditioner.from_matrix(A).factor.to_dense()
    for X in inputs:
        torch.testing.assert_close(IncompleteCholeskyPreconditioner.from_matrix(X).factor.to_dense(), ref_ic)
        torch.testing.assert_close(JacobiPreconditioner.from_matrix(X).diagonal, Ad.diagonal())


@pytest.mark.parametrize("kind", ["jacobi", "ic0"])
def test_to_dtype(kind):
    A = lattice_5pt(4, 0.5).to_sparse_csr()
    P = build(kind, A)
    P32 = P.to(dtype=torch.float32)
    assert P32.dtype == torch.float32 and P.dtype == torch.float64
    assert P32.logdet().dtype == torch.float32
    r = torch.randn(16, 2, dtype=torch.float64)
    torch.testing.assert_close(P32(r.float()), P(r).float(), **tolerance(torch.float32, "direct"))
    assert P.to().dtype == torch.float64


@pytest.mark.parametrize("kind", ["jacobi", "ic0"])
def test_inputs_not_modified_and_state_detached(kind):
    A = random_spd(10, seed=8)
    values = A.values().clone().requires_grad_(True)
    A_grad = torch.sparse_csr_tensor(A.crow_indices(), A.col_indices(), values, A.shape)
    before = values.detach().clone()
    P = build(kind, A_grad)
    assert torch.equal(values.detach(), before)
    r = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    r_before = r.detach().clone()
    for out in [P(r), P.apply_inv_factor(r), P.apply_inv_factor_t(r), P.logdet()]:
        assert not out.requires_grad
    assert torch.equal(r.detach(), r_before)


def test_jacobi_copies_diagonal():
    d = torch.tensor([1.0, 2.0, 4.0])
    P = JacobiPreconditioner(d)
    d[0] = -1.0
    assert P.diagonal[0] == 1.0


@pytest.mark.parametrize("kind", ["jacobi", "ic0"])
def test_device(kind, device):
    A = lattice_13pt(4, 0.5).to(device)
    P = build(kind, A)
    assert P.device.type == device.type
    Pc = P.to(device="cpu")
    r = torch.randn(2, 16, 3, dtype=torch.float64)
    out = P(r.to(device))
    assert out.device.type == device.type
    torch.testing.assert_close(out.cpu(), Pc(r), **tolerance(torch.float64, "direct"))
    torch.testing.assert_close(P.apply_inv_factor_t(r.to(device)).cpu(), Pc.apply_inv_factor_t(r))
    torch.testing.assert_close(P.logdet().cpu(), Pc.logdet())
    P32 = P.to(dtype=torch.float32)
    assert P32.device.type == device.type
    torch.testing.assert_close(
        P32(r.to(device, torch.float32)).cpu(), Pc(r).float(), **tolerance(torch.float32, "direct")
    )


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [JacobiPreconditioner, IncompleteCholeskyPreconditioner])
def test_from_matrix_input_errors(cls):
    A = random_spd(6)
    with pytest.raises(TypeError, match="dense tensor.*to_sparse_csr"):
        cls.from_matrix(A.to_dense())
    with pytest.raises(TypeError, match="to_sparse_csr"):
        cls.from_matrix([[1.0]])
    with pytest.raises(ValueError, match="square"):
        cls.from_matrix(torch.ones(3, 4).to_sparse_csr())
    with pytest.raises(TypeError, match="float32 or float64"):
        cls.from_matrix(torch.eye(3, dtype=torch.int64).to_sparse_csr())
    with pytest.raises(TypeError, match="unsupported sparse layout"):
        cls.from_matrix(A.to_sparse_csc())
    bad = A.to_dense()
    bad[2, 3] = bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        cls.from_matrix(bad.to_sparse_csr())


def test_jacobi_non_positive_diagonal():
    with pytest.raises(NotPositiveDefiniteError, match=r"index 2 is -1\.0"):
        JacobiPreconditioner(torch.tensor([1.0, 2.0, -1.0, -3.0]))
    with pytest.raises(NotPositiveDefiniteError, match=r"index 1 is 0\.0"):
        JacobiPreconditioner(torch.tensor([1.0, 0.0]))
    with pytest.raises(NotPositiveDefiniteError, match=r"index 0 is nan"):
        JacobiPreconditioner(torch.tensor([float("nan"), 1.0]))
    with pytest.raises(NotPositiveDefiniteError, match=r"index \(1, 0\) is inf"):
        JacobiPreconditioner(torch.tensor([[1.0, 1.0], [float("inf"), 1.0]]))
    A = laplacian_1d(4).to_dense()
    A[3, 3] = -2.0
    with pytest.raises(NotPositiveDefiniteError, match="index 3"):
        JacobiPreconditioner.from_matrix(A.to_sparse_csr())
    A[3, 3] = 0.0  # missing from the sparse pattern
    with pytest.raises(NotPositiveDefiniteError, match="index 3 is 0.0"):
        JacobiPreconditioner.from_matrix(A.to_sparse_csr())
    with pytest.raises(TypeError, match="float32 or float64"):
        JacobiPreconditioner(torch.tensor([1, 2]))


def test_ic0_non_positive_pivot():
    A = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.5], [0.0, 0.5, 3.0]], dtype=torch.float64)
    with pytest.raises(NotPositiveDefiniteError, match=r"row 1 .*shift=1e-2"):
        IncompleteCholeskyPreconditioner.from_matrix(A.to_sparse_csr())
    with pytest.raises(NotPositiveDefiniteError, match=r"row 1 .*larger shift"):
        IncompleteCholeskyPreconditioner.from_matrix(A.to_sparse_csr(), shift=0.5)
    # a large enough shift makes the pivots positive
    P = IncompleteCholeskyPreconditioner.from_matrix(A.to_sparse_csr(), shift=2.0)
    assert torch.isfinite(P.logdet())
    with pytest.raises(NotPositiveDefiniteError, match=r"row 0"):
        IncompleteCholeskyPreconditioner.from_matrix((-torch.eye(3)).to_sparse_csr())


def test_ic0_missing_diagonal():
    A = laplacian_1d(4).to_dense()
    A[2, 2] = 0.0
    with pytest.raises(NotPositiveDefiniteError, match="row 2 .*no stored diagonal"):
        IncompleteCholeskyPreconditioner.from_matrix(A.to_sparse_csr())


def test_ic0_batched_and_bad_shift():
    A = torch.stack([torch.eye(3), 2 * torch.eye(3)]).to_sparse_csr()
    with pytest.raises(NotImplementedError, match="batched"):
        IncompleteCholeskyPreconditioner.from_matrix(A)
    with pytest.raises(ValueError, match="shift"):
        IncompleteCholeskyPreconditioner.from_matrix(laplacian_1d(3), shift=-0.1)
    with pytest.raises(ValueError, match="shift"):
        IncompleteCholeskyPreconditioner.from_matrix(laplacian_1d(3), shift=float("nan"))


@pytest.mark.parametrize("kind", ["jacobi", "ic0"])
def test_rhs_errors(kind):
    P = build(kind, laplacian_1d(5))
    with pytest.raises(ValueError, match=r"\(\*batch, n, k\) with n = 5.*unsqueeze"):
        P(torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="n = 5"):
        P(torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        P(torch.ones(5, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="meta"):
        P.apply_inv_factor(torch.ones(5, 2, dtype=torch.float64, device="meta"))
    with pytest.raises(TypeError, match="dense torch.Tensor"):
        P.apply_inv_factor_t(laplacian_1d(5))
    with pytest.raises(TypeError, match="float32 or float64"):
        P.to(dtype=torch.int32)


def test_ic0_cpu_without_numba_or_mkl(monkeypatch):
    P = IncompleteCholeskyPreconditioner.from_matrix(laplacian_1d(5))
    monkeypatch.setattr(pc_module, "_numba", None)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install numba"):
        P(torch.ones(5, 1, dtype=torch.float64))


def test_abstract_base():
    with pytest.raises(TypeError):
        Preconditioner()
    assert "size=5" in repr(JacobiPreconditioner(torch.ones(5)))


# ---------------------------------------------------------------------------
# Usefulness: preconditioned CG on an ill-conditioned 13-point lattice precision
# ---------------------------------------------------------------------------


def _pcg_iterations(A, b, M_inv, rtol=1e-8, max_iters=2000):
    """Textbook preconditioned CG; returns the iterations to ‖r‖ ≤ rtol‖b‖."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = M_inv(r)
    p = z.clone()
    rz = (r * z).sum()
    for it in range(1, max_iters + 1):
        Ap = A @ p
        alpha = rz / (p * Ap).sum()
        x += alpha * p
        r -= alpha * Ap
        if r.norm() <= rtol * b.norm():
            return it
        z = M_inv(r)
        rz_new = (r * z).sum()
        p = z + (rz_new / rz) * p
        rz = rz_new
    return max_iters


def test_ic0_reduces_cg_iterations():
    """κ² = 1e-3, σ⁻² = 1e-2 on a 24×24 grid: plain CG ~310 iterations, Jacobi
    no better (the interior diagonal is constant), IC(0) with shift 1e-2 ~35.
    Without a shift IC(0) breaks down here: (κ²I + L)² is not an M-matrix."""
    A = lattice_13pt(24, kappa2=1e-3, tau=1.0, noise_precision=1e-2)
    b = torch.randn(A.shape[0], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A_coo = A.to_sparse_coo()  # CSR matmul can be ~100x slower on a busy 2-core machine
    plain = _pcg_iterations(A_coo, b, lambda r: r)
    jacobi = _pcg_iterations(A_coo, b, JacobiPreconditioner.from_matrix(A))
    ic0 = _pcg_iterations(A_coo, b, IncompleteCholeskyPreconditioner.from_matrix(A, shift=1e-2))
    assert ic0 < plain / 4, (plain, jacobi, ic0)
    assert ic0 < jacobi / 4, (plain, jacobi, ic0)
    with pytest.raises(NotPositiveDefiniteError, match="shift"):
        IncompleteCholeskyPreconditioner.from_matrix(A)


# ---------------------------------------------------------------------------
# The registry: names → builders, build_preconditioner, the stale CHOLMOD factor
# ---------------------------------------------------------------------------


def _on_pattern(A: torch.Tensor):
    """``(pattern, values (1, nnz))`` of a sparse ``A``."""
    from gpsparse.core.pattern import SparsityPattern

    coo = A.to_sparse_coo().coalesce()
    pattern, order = SparsityPattern.from_indices(coo.indices()[0], coo.indices()[1], tuple(coo.shape))
    return pattern, coo.values()[order].unsqueeze(0)


def test_registry_names_follow_the_builders():
    from gpsparse.core import config

    assert registry.PRECONDITIONER_NAMES == tuple(registry.PRECONDITIONER_BUILDERS) == ("jacobi", "ic0", "cholesky")
    assert pc_package.PRECONDITIONER_NAMES is registry.PRECONDITIONER_NAMES
    assert config.DEFAULT_CHOLESKY_REFRESH == registry.DEFAULT_CHOLESKY_REFRESH
    with pytest.raises(TypeError):
        registry.PRECONDITIONER_BUILDERS["new"] = None  # read-only: add entries in registry.py


def test_build_preconditioner_passes_objects_through_and_rejects_unknown_names():
    pattern, values = _on_pattern(laplacian_1d(4))
    P = JacobiPreconditioner(torch.ones(4, dtype=torch.float64))

    def fn(r):
        return r

    for spec in (None, P, fn):
        assert build_preconditioner(spec, values, pattern) is spec
    with pytest.raises(ValueError, match="unknown preconditioner 'nope'"):
        build_preconditioner("nope", values, pattern)


def test_build_jacobi_and_ic0_from_values():
    A = laplacian_1d(6, kappa2=0.5)
    pattern, values = _on_pattern(A)
    r = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values = values.requires_grad_()
    jacobi = build_preconditioner("jacobi", values, pattern)
    assert isinstance(jacobi, JacobiPreconditioner) and jacobi.batch_shape == (1,)
    torch.testing.assert_close(jacobi(r.unsqueeze(0))[0], JacobiPreconditioner.from_matrix(A)(r), rtol=0, atol=0)
    assert not jacobi.diagonal.requires_grad
    ic0 = build_preconditioner("ic0", values, pattern)
    assert isinstance(ic0, IncompleteCholeskyPreconditioner)
    torch.testing.assert_close(ic0(r), IncompleteCholeskyPreconditioner.from_matrix(A)(r), rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="single"):
        build_preconditioner("ic0", values.detach().expand(2, -1), pattern)


def test_incomplete_cholesky_with_shift_takes_the_first_shift_that_works():
    A = lattice_13pt(24, kappa2=1e-3, tau=1.0, noise_precision=1e-2)  # IC(0) breaks down without a shift
    with pytest.raises(NotPositiveDefiniteError):
        IncompleteCholeskyPreconditioner.from_matrix(A)
    P = incomplete_cholesky_with_shift(A)
    first = next(s for s in IC_SHIFTS[1:] if _factorises(A, s))
    expected = IncompleteCholeskyPreconditioner.from_matrix(A, shift=first)
    torch.testing.assert_close(P.factor.values(), expected.factor.values(), rtol=0, atol=0)
    negative = _coo([0, 1], [0, 1], [-1.0, 1.0], 2).to_sparse_csr()
    with pytest.raises(NotPositiveDefiniteError, match=f"diagonal shift of {IC_SHIFTS[-1]}"):
        incomplete_cholesky_with_shift(negative)


def test_a_shifted_incomplete_cholesky_leaves_no_reference_cycles():
    """The failed attempts' exceptions are not kept: their tracebacks would hold the frames (and the callers'
    frames with their arrays) in a cycle that only the cyclic collector frees — in the Laplace Newton loop at
    N = 9·10⁴ that was 170 MB of peak memory (gigabytes at 10⁶)."""
    import gc

    A = lattice_13pt(24, kappa2=1e-3, tau=1.0, noise_precision=1e-2)  # breaks down without a shift
    incomplete_cholesky_with_shift(A)  # compile and warm up first
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        incomplete_cholesky_with_shift(A)
        assert gc.collect() == 0
    finally:
        if enabled:
            gc.enable()


def _factorises(A, shift) -> bool:
    try:
        IncompleteCholeskyPreconditioner.from_matrix(A, shift=shift)
    except NotPositiveDefiniteError:
        return False
    return True


@pytest.fixture
def fake_cholmod(monkeypatch):
    """Replace the CHOLMOD factorisation by a Jacobi stand-in that counts calls (no scikit-sparse needed)."""
    from gpsparse.core import cholmod

    calls = []

    def from_matrix(values, pattern):
        calls.append(values.clone())
        pos = pattern.diagonal_positions
        return JacobiPreconditioner(values[:, pos])

    monkeypatch.setattr(cholmod.CholeskyPreconditioner, "from_matrix", staticmethod(from_matrix))
    return calls


def test_stale_cholesky_refreshes_every_cholesky_refresh_uses(fake_cholmod):
    pattern, values = _on_pattern(laplacian_1d(5, kappa2=1.0))
    factors = []
    for step in range(7):
        factors.append(build_preconditioner("cholesky", values + step, pattern, cholesky_refresh=3))
    assert len(fake_cholmod) == 3  # uses 1, 4 and 7 factorise
    assert factors[0] is factors[1] is factors[2] and factors[3] is factors[5] and factors[6] is not factors[5]
    torch.testing.assert_close(fake_cholmod[1], values + 3)  # refactorised from the current values
    assert "_stale_cholesky" not in pattern.__dict__  # cached through pattern.derived, not the instance dict
    build_preconditioner("cholesky", (values + 1).expand(2, -1), pattern, cholesky_refresh=3)
    assert len(fake_cholmod) == 4  # a new batch size refactorises
    pattern.drop_derived("preconditioners.stale_cholesky")
    stale_cholesky(values, pattern)
    assert len(fake_cholmod) == 5
    for _ in range(registry.DEFAULT_CHOLESKY_REFRESH - 1):
        stale_cholesky(values, pattern)
    assert len(fake_cholmod) == 5  # the default refresh
    with pytest.raises(ValueError, match="cholesky_refresh"):
        build_preconditioner("cholesky", values, pattern, cholesky_refresh=0)


@pytest.mark.parametrize("module", ["base", "jacobi", "ic0", "registry"])
def test_docstring_examples(module):
    import doctest
    import importlib

    failures, _ = doctest.testmod(importlib.import_module(f"gpsparse.core.preconditioners.{module}"), verbose=False)
    assert failures == 0


def test_no_sparse_invariant_warning():
    """IC(0) builds its CSR tensors without torch's "invariant checks are implicitly disabled" warning.

    Run in a fresh interpreter: torch emits that warning once per process.
    """
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "from gpsparse import IncompleteCholeskyPreconditioner\n"
        "i = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]])\n"
        "A = torch.sparse_coo_tensor(i, torch.tensor([4.0, 1.0, 1.0, 3.0], dtype=torch.float64), (2, 2),\n"
        "                            check_invariants=False).to_sparse_csr()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    IncompleteCholeskyPreconditioner.from_matrix(A)(torch.ones(2, 1, dtype=torch.float64))\n"
        "print(sum('invariant' in str(w.message) for w in caught))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stdout + out.stderr
