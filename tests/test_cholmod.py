"""Exact sparse Cholesky (CHOLMOD via scikit-sparse): values and sparse gradients against dense float64.

Every test except the ImportError one needs scikit-sparse and is skipped
without it (``requires_cholmod``); the ImportError test hides the package.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
import time
import weakref

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import tolerance

from gpsparse.core.pattern import SparsityPattern
from gpsparse.core.preconditioners import Preconditioner
from gpsparse.errors import NotPositiveDefiniteError

requires_cholmod = pytest.mark.skipif(
    importlib.util.find_spec("sksparse") is None,
    reason='scikit-sparse is not installed (pip install "gpsparse[cholmod]")',
)

DIRECT = tolerance(torch.float64, "direct")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch (and, through it, BLAS) thread: on the shared 2-core machines 2 threads can be 5-25x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# Test matrices, built here with scipy
# ---------------------------------------------------------------------------


def _laplacian_1d(m: int) -> sp.csr_matrix:
    main = np.full(m, 2.0)
    main[[0, -1]] = 1.0
    return sp.diags([-np.ones(m - 1), main, -np.ones(m - 1)], [-1, 0, 1], format="csr")


def lattice_precision(m: int, kappa: float = 0.3, tau: float = 2.0, noise: float = 0.5) -> sp.csr_matrix:
    """``τ(κ²I + L)² + σ⁻²I`` on an ``m × m`` Neumann lattice (13 nonzeros per interior row)."""
    one, eye = _laplacian_1d(m), sp.identity(m, format="csr")
    base = kappa**2 * sp.identity(m * m) + sp.kron(one, eye) + sp.kron(eye, one)
    return (tau * (base @ base) + noise**-2 * sp.identity(m * m)).tocsr()


def lattice_5pt(m: int, kappa: float = 0.5) -> sp.csr_matrix:
    """``κ²I + L``, 5-point stencil."""
    one, eye = _laplacian_1d(m), sp.identity(m, format="csr")
    return (kappa**2 * sp.identity(m * m) + sp.kron(one, eye) + sp.kron(eye, one)).tocsr()


def random_spd(n: int, density: float = 0.04, seed: int = 0) -> sp.csr_matrix:
    """Random sparse symmetric matrix made positive definite by a (weak) diagonal shift."""
    rng = np.random.default_rng(seed)
    a = sp.random(n, n, density=density, random_state=rng, data_rvs=lambda k: rng.standard_normal(k))
    a = (a + a.T).tocsr()
    lam_min = np.linalg.eigvalsh(a.toarray())[0]
    return (a + sp.identity(n) * (0.1 - lam_min)).tocsr()


def as_pattern(matrix: sp.spmatrix) -> tuple[torch.Tensor, SparsityPattern, torch.Tensor]:
    """``(values, symmetric pattern, dense)`` of a scipy matrix, float64."""
    csr = sp.csr_matrix(matrix)
    csr.sum_duplicates()
    csr.sort_indices()
    pattern = SparsityPattern(
        torch.from_numpy(csr.indptr.astype(np.int64)),
        torch.from_numpy(csr.indices.astype(np.int64)),
        csr.shape,
        symmetric=True,
    )
    return torch.from_numpy(csr.data.copy()), pattern, torch.from_numpy(csr.toarray())


MATRICES = {
    "lattice13-20x20": lambda: lattice_precision(20),
    "random-spd-150": lambda: random_spd(150),
}


@pytest.fixture(params=list(MATRICES), ids=list(MATRICES))
def spd(request):
    return as_pattern(MATRICES[request.param]())


def at_pattern(dense: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    return dense[..., pattern.row, pattern.col_long]


def symmetrised(grad_dense: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Value gradient of a symmetric matrix from a dense gradient: ``(G + Gᵀ)/2`` at the entries."""
    return at_pattern(0.5 * (grad_dense + grad_dense.transpose(-1, -2)), pattern)


# ---------------------------------------------------------------------------
# Optional dependency
# ---------------------------------------------------------------------------


def test_missing_scikit_sparse_raises_import_error(monkeypatch):
    from gpsparse.autograd import cholmod as cholmod_autograd
    from gpsparse.core import cholmod

    monkeypatch.setitem(sys.modules, "sksparse", None)  # `import sksparse` raises ImportError
    monkeypatch.setitem(sys.modules, "sksparse.cholmod", None)
    values, pattern, _ = as_pattern(lattice_5pt(3))
    assert cholmod.cholmod_available() is False
    match = r'pip install "gpsparse\[cholmod\]".*libsuitesparse-dev'
    with pytest.raises(ImportError, match=match):
        cholmod_autograd.cholesky_logdet(values, pattern)
    with pytest.raises(ImportError, match=match):
        cholmod_autograd.cholesky_solve(values, pattern, torch.ones(9, dtype=torch.float64))
    with pytest.raises(ImportError, match=match):
        cholmod.CholeskyPreconditioner.from_matrix(values, pattern)


# ---------------------------------------------------------------------------
# Log-determinant and selected inverse
# ---------------------------------------------------------------------------


@requires_cholmod
def test_available():
    from gpsparse.core.cholmod import cholmod_available

    assert cholmod_available()


@requires_cholmod
def test_logdet_value_and_gradient(spd):
    from gpsparse.autograd.cholmod import cholesky_logdet

    values, pattern, dense = spd
    values = values.clone().requires_grad_()
    logdet = cholesky_logdet(values, pattern)
    logdet.backward()
    torch.testing.assert_close(logdet.detach(), torch.linalg.slogdet(dense)[1], **DIRECT)
    # ∂ log det A / ∂a[e] = (A⁻¹)[i_e, j_e]
    torch.testing.assert_close(values.grad, at_pattern(torch.linalg.inv(dense), pattern), **DIRECT)


@requires_cholmod
def test_logdet_gradient_matches_dense_autograd(spd):
    from gpsparse.autograd.cholmod import cholesky_logdet

    values, pattern, _ = spd
    weight = 0.7
    v1 = values.clone().requires_grad_()
    (weight * cholesky_logdet(v1, pattern)).backward()
    v2 = values.clone().requires_grad_()
    dense = torch.zeros(pattern.size, dtype=torch.float64).index_put((pattern.row, pattern.col_long), v2)
    (weight * torch.logdet(dense)).backward()
    grad = v2.grad
    torch.testing.assert_close(v1.grad, 0.5 * (grad + grad[pattern.transpose_perm]), **DIRECT)


@requires_cholmod
def test_selected_inverse(spd):
    from gpsparse.autograd.cholmod import cholesky_selected_inverse

    values, pattern, dense = spd
    out = cholesky_selected_inverse(values, pattern)
    torch.testing.assert_close(out, at_pattern(torch.linalg.inv(dense), pattern), **DIRECT)


@requires_cholmod
def test_selected_inverse_supernodal_blocks_match_columns():
    """The dense supernodal blocks and the column-by-column recurrence give the same Z on L's pattern."""
    from gpsparse.core import cholmod, selinv

    values, pattern, _ = as_pattern(lattice_precision(30))
    analysis, _ = cholmod._analysis(pattern, "test")
    L = cholmod._factorize(analysis, values, "test").L()
    starts = selinv._supernodes(L.indptr, L.indices)
    assert np.diff(starts).max() > 8  # the factor has wide supernodes: the dense path runs
    data = np.ascontiguousarray(L.data)
    z_blocks, z_columns = np.empty_like(data), np.empty_like(data)
    selinv._takahashi_kernel(L.indptr, L.indices, data, z_blocks, starts, 2)
    selinv._takahashi_kernel(L.indptr, L.indices, data, z_columns, starts, 2**62)
    np.testing.assert_allclose(z_blocks, z_columns, rtol=1e-10, atol=1e-13)


@requires_cholmod
def test_selected_inverse_larger_lattice_against_unit_solves():
    """n = 4900 (wide supernodes): entries of A⁻¹ at the pattern against solves with unit vectors."""
    from gpsparse.autograd.cholmod import cholesky_selected_inverse, cholesky_solve

    values, pattern, _ = as_pattern(lattice_precision(70, kappa=0.1))
    n = pattern.size[0]
    zsel = cholesky_selected_inverse(values, pattern)
    cols = torch.tensor([0, 1, 37, n // 2, n // 2 + 70, n - 1])
    columns = cholesky_solve(values, pattern, unit_columns(n, cols))  # A⁻¹ e_c
    for t, c in enumerate(cols.tolist()):
        rows = pattern.col_long[pattern.crow[c] : pattern.crow[c + 1]]  # entries (r, c), pattern symmetric
        pos, found = pattern.positions(rows, torch.full_like(rows, c))
        assert bool(found.all())
        torch.testing.assert_close(zsel[pos], columns[rows, t], rtol=1e-9, atol=1e-12)


@requires_cholmod
def test_logdet_gradcheck_tiny():
    from gpsparse.autograd.cholmod import cholesky_logdet

    values, pattern, _ = as_pattern(lattice_precision(3))
    perm = pattern.transpose_perm

    def f(v):  # a symmetric parameterisation, so that each perturbation stays a symmetric matrix
        return cholesky_logdet(0.5 * (v + v[perm]), pattern)

    assert torch.autograd.gradcheck(f, (values.clone().requires_grad_(),))


@requires_cholmod
def test_batched_logdet():
    from gpsparse.autograd.cholmod import cholesky_logdet

    values, pattern, dense = as_pattern(lattice_precision(12))
    scale = torch.tensor([[1.0, 2.0, 0.5], [3.0, 1.5, 0.25]], dtype=torch.float64)
    batched = (values * scale.unsqueeze(-1)).requires_grad_()  # (2, 3, nnz)
    logdet = cholesky_logdet(batched, pattern)
    assert logdet.shape == (2, 3)
    weights = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (logdet * weights).sum().backward()
    dense_b = dense * scale[..., None, None]
    torch.testing.assert_close(logdet.detach(), torch.linalg.slogdet(dense_b)[1], **DIRECT)
    expected = weights.unsqueeze(-1) * at_pattern(torch.linalg.inv(dense_b), pattern)
    torch.testing.assert_close(batched.grad, expected, **DIRECT)


@requires_cholmod
def test_float32_in_float32_out():
    from gpsparse.autograd.cholmod import cholesky_logdet, cholesky_solve

    values, pattern, dense = as_pattern(lattice_precision(8))
    v32 = values.float().requires_grad_()
    logdet = cholesky_logdet(v32, pattern)
    logdet.backward()
    assert logdet.dtype == torch.float32 and v32.grad.dtype == torch.float32
    tol = tolerance(torch.float32, "direct")
    torch.testing.assert_close(logdet.double(), torch.linalg.slogdet(dense)[1], **tol)
    torch.testing.assert_close(v32.grad.double(), at_pattern(torch.linalg.inv(dense), pattern), **tol)
    x = cholesky_solve(v32.detach(), pattern, torch.ones(64, 2))
    assert x.dtype == torch.float32


@requires_cholmod
def test_symbolic_analysis_cached_per_pattern_and_released():
    from gpsparse.autograd.cholmod import cholesky_logdet, cholesky_solve
    from gpsparse.core import cholmod

    def cached(p):  # the analysis cached on the pattern; fails if there is none
        def missing():
            raise AssertionError("no symbolic analysis cached on the pattern")

        return p.derived(cholmod._ANALYSIS_KEY, missing)

    values, pattern, dense = as_pattern(lattice_precision(10))
    cholesky_logdet(values, pattern)
    analysis = cached(pattern)
    cholesky_solve(values * 2, pattern, torch.ones(100, dtype=torch.float64))
    assert cached(pattern) is analysis
    # the gradients reuse the factor-pattern lookup built by the first backward
    for scale in (1.0, 2.0):
        v = (scale * values).requires_grad_()
        cholesky_logdet(v, pattern).backward()
        torch.testing.assert_close(v.grad, at_pattern(torch.linalg.inv(scale * dense), pattern), **DIRECT)
    assert analysis.lookup is not None
    # a pattern with the same indices but another object gets its own analysis
    other = SparsityPattern(pattern.crow, pattern.col, pattern.size, symmetric=True)
    cholesky_logdet(values, other)
    assert cached(other) is not analysis
    released = weakref.ref(cached(other))
    del other
    gc.collect()
    assert released() is None  # the cache lives on the pattern: its analysis goes with it


def test_cuda_round_trip(device):
    pytest.importorskip("sksparse")
    from gpsparse.autograd.cholmod import cholesky_logdet, cholesky_solve

    values, pattern, dense = as_pattern(lattice_precision(6))
    values = values.to(device).requires_grad_()
    pattern = pattern.to(device)
    logdet = cholesky_logdet(values, pattern)
    logdet.backward()
    assert logdet.device == values.device and values.grad.device == values.device
    torch.testing.assert_close(logdet.cpu(), torch.linalg.slogdet(dense)[1], **DIRECT)
    x = cholesky_solve(values.detach(), pattern, torch.ones(36, 1, dtype=torch.float64, device=device))
    assert x.device == values.device


# ---------------------------------------------------------------------------
# Solve
# ---------------------------------------------------------------------------


@requires_cholmod
@pytest.mark.parametrize("shape", [(), (3,)], ids=["vector", "k3"])
def test_solve_values_and_gradients(spd, shape):
    from gpsparse.autograd.cholmod import cholesky_solve

    values, pattern, dense = spd
    n = pattern.size[0]
    gen = torch.Generator().manual_seed(1)
    rhs = torch.randn(n, *shape, dtype=torch.float64, generator=gen)
    upstream = torch.randn(n, *shape, dtype=torch.float64, generator=gen)

    v1, b1 = values.clone().requires_grad_(), rhs.clone().requires_grad_()
    x1 = cholesky_solve(v1, pattern, b1)
    (x1 * upstream).sum().backward()

    d2, b2 = dense.clone().requires_grad_(), rhs.clone().requires_grad_()
    x2 = torch.linalg.solve(d2, b2.unsqueeze(-1) if not shape else b2)
    x2 = x2.squeeze(-1) if not shape else x2
    (x2 * upstream).sum().backward()

    assert x1.shape == rhs.shape
    torch.testing.assert_close(x1.detach(), x2.detach(), **DIRECT)
    torch.testing.assert_close(b1.grad, b2.grad, **DIRECT)
    torch.testing.assert_close(v1.grad, symmetrised(d2.grad, pattern), **DIRECT)


@requires_cholmod
def test_solve_batched_and_broadcast():
    from gpsparse.autograd.cholmod import cholesky_solve

    values, pattern, dense = as_pattern(lattice_precision(10))
    n = pattern.size[0]
    gen = torch.Generator().manual_seed(2)
    scale = torch.tensor([1.0, 0.5], dtype=torch.float64)
    # batched values (2, nnz) with one right-hand side block broadcast to both
    v = (values * scale[:, None]).requires_grad_()
    rhs = torch.randn(n, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    x = cholesky_solve(v, pattern, rhs)
    upstream = torch.randn(2, n, 4, dtype=torch.float64, generator=gen)
    (x * upstream).sum().backward()
    d = (dense * scale[:, None, None]).requires_grad_()
    rhs2 = rhs.detach().clone().requires_grad_()
    x2 = torch.linalg.solve(d, rhs2.expand(2, n, 4))
    (x2 * upstream).sum().backward()
    torch.testing.assert_close(x.detach(), x2.detach(), **DIRECT)
    torch.testing.assert_close(rhs.grad, rhs2.grad, **DIRECT)
    torch.testing.assert_close(v.grad, symmetrised(d.grad, pattern), **DIRECT)
    # one matrix, batched right-hand sides (3, 2, n, 1): one factorisation for all columns
    b = torch.randn(3, 2, n, 1, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(cholesky_solve(values, pattern, b), torch.linalg.solve(dense, b), **DIRECT)


@requires_cholmod
def test_solve_gradcheck_tiny():
    from gpsparse.autograd.cholmod import cholesky_solve

    values, pattern, _ = as_pattern(lattice_precision(3))
    perm = pattern.transpose_perm
    rhs = torch.randn(9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def f(v, b):
        return cholesky_solve(0.5 * (v + v[perm]), pattern, b)

    assert torch.autograd.gradcheck(f, (values.clone().requires_grad_(), rhs.requires_grad_()))


# ---------------------------------------------------------------------------
# Preconditioner
# ---------------------------------------------------------------------------


@requires_cholmod
@pytest.mark.parametrize(
    "build, m",
    [("sparse_csr", 9), ("values_pattern", 9), ("tuple", 9), ("values_pattern", 30)],
    ids=["sparse_csr", "values_pattern", "tuple", "supernodal-900"],
)
def test_preconditioner_contract(build, m):
    from gpsparse.core.cholmod import CholeskyPreconditioner

    values, pattern, dense = as_pattern(lattice_precision(m))
    n = m * m
    if build == "sparse_csr":
        P = CholeskyPreconditioner.from_matrix(dense.to_sparse_csr())
    elif build == "values_pattern":
        P = CholeskyPreconditioner.from_matrix(values, pattern)
    else:
        P = CholeskyPreconditioner.from_matrix((values, pattern))
    assert isinstance(P, Preconditioner) and P.size == n and P.batch_shape == torch.Size([])
    r = torch.randn(2, n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(P(r), torch.linalg.solve(dense, r), **DIRECT)
    torch.testing.assert_close(P.solve(r), P(r), rtol=0, atol=0)
    # C = Pᵀ L with L Lᵀ = A[p][:, p], i.e. C[p] = L
    L = P.factor().to_dense()
    C = torch.empty_like(L)
    C[P.perm] = L
    torch.testing.assert_close(C @ C.T, dense, **DIRECT)
    assert torch.equal(L, L.tril())
    torch.testing.assert_close(P.apply_inv_factor(r), torch.linalg.solve(C, r), **DIRECT)
    torch.testing.assert_close(P.apply_inv_factor_t(r), torch.linalg.solve(C.T, r), **DIRECT)
    torch.testing.assert_close(P.apply_inv_factor_t(P.apply_inv_factor(r)), P(r), **DIRECT)
    torch.testing.assert_close(P.logdet(), torch.linalg.slogdet(dense)[1], **DIRECT)
    out = P(r.requires_grad_())
    assert not out.requires_grad


@requires_cholmod
def test_preconditioner_reads_lower_triangle_of_sparse_input():
    from gpsparse.core.cholmod import CholeskyPreconditioner

    _, _, dense = as_pattern(lattice_precision(5))
    P = CholeskyPreconditioner.from_matrix(dense.tril().to_sparse())
    r = torch.ones(25, 1, dtype=torch.float64)
    torch.testing.assert_close(P(r), torch.linalg.solve(dense, r), **DIRECT)


@requires_cholmod
def test_preconditioner_batched_and_to():
    from gpsparse.core.cholmod import CholeskyPreconditioner

    values, pattern, dense = as_pattern(lattice_precision(6))
    scale = torch.tensor([1.0, 4.0], dtype=torch.float64)
    P = CholeskyPreconditioner.from_matrix(values * scale[:, None], pattern)
    assert P.batch_shape == (2,)
    dense_b = dense * scale[:, None, None]
    r = torch.randn(3, 1, 36, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(P(r), torch.linalg.solve(dense_b, r), **DIRECT)  # broadcast to (3, 2, 36, 2)
    torch.testing.assert_close(P.logdet(), torch.linalg.slogdet(dense_b)[1], **DIRECT)
    P32 = P.to(dtype=torch.float32)
    assert P32.dtype == torch.float32 and P32.logdet().dtype == torch.float32
    assert P32(r.float()).dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        P32(r)


@requires_cholmod
def test_preconditioner_errors():
    from gpsparse.core.cholmod import CholeskyPreconditioner

    _, _, dense = as_pattern(lattice_precision(4))
    with pytest.raises(TypeError, match="dense tensor"):
        CholeskyPreconditioner.from_matrix(dense)
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        CholeskyPreconditioner.from_matrix((dense - 100 * torch.eye(16, dtype=torch.float64)).to_sparse_csr())


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@requires_cholmod
@pytest.mark.parametrize(
    "matrix, path",
    [
        (lambda: lattice_5pt(4) - sp.identity(16), "pivot"),  # simplicial LDLᵀ: a negative pivot in D
        (lambda: lattice_precision(30) - 10.0 * sp.identity(900), "CHOLMOD"),  # supernodal: CHOLMOD raises
    ],
    ids=["simplicial", "supernodal"],
)
def test_not_positive_definite(matrix, path):
    from gpsparse.autograd.cholmod import cholesky_logdet, cholesky_solve

    values, pattern, _ = as_pattern(matrix())
    n = pattern.size[0]
    with pytest.raises(NotPositiveDefiniteError, match=f"not positive definite.*{path}"):
        cholesky_logdet(values, pattern)
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        cholesky_solve(values, pattern, torch.ones(n, dtype=torch.float64))


@requires_cholmod
def test_input_errors():
    from gpsparse.autograd.cholmod import cholesky_logdet, cholesky_solve

    values, pattern, _ = as_pattern(lattice_precision(4))
    with pytest.raises(ValueError, match="declared symmetric"):
        cholesky_logdet(values, pattern.with_symmetric(False))
    with pytest.raises(ValueError, match=r"shape \(\*batch, nnz\)"):
        cholesky_logdet(values[:-1], pattern)
    with pytest.raises(TypeError, match="float32 or float64"):
        cholesky_logdet(values.long(), pattern)
    bad = values.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        cholesky_logdet(bad, pattern)
    with pytest.raises(TypeError, match="SparsityPattern"):
        cholesky_logdet(values, "pattern")
    with pytest.raises(ValueError, match="does not match"):
        cholesky_solve(values, pattern, torch.ones(5, dtype=torch.float64))


# ---------------------------------------------------------------------------
# Size
# ---------------------------------------------------------------------------


@requires_cholmod
@pytest.mark.slow
def test_size_one_million():
    """n = 10⁶ (1000 × 1000 5-point lattice): logdet and its gradient by selected inversion finish.

    Checked against the exact log-determinant of the separable operator (the
    eigenvalues of the Neumann lattice Laplacian are closed-form) and against
    solves with unit vectors at a few columns. Prints the timings (``-s``).
    """
    from gpsparse.autograd.cholmod import cholesky_logdet, cholesky_solve

    m, kappa = 1000, 0.5
    values, pattern, _ = as_pattern_large(lattice_5pt(m, kappa))
    values.requires_grad_()
    start = time.perf_counter()
    logdet = cholesky_logdet(values, pattern)
    forward = time.perf_counter() - start
    logdet.backward()
    total = time.perf_counter() - start
    print(
        f"\nn = 10^6: logdet {forward:.1f} s, logdet + gradient {total:.1f} s (torch threads {torch.get_num_threads()})"
    )
    eig = 2.0 - 2.0 * np.cos(np.pi * np.arange(m) / m)  # Neumann 1-D Laplacian
    exact = np.log(kappa**2 + eig[:, None] + eig[None, :]).sum()
    assert abs(logdet.item() - exact) <= 1e-9 * abs(exact)
    cols = torch.tensor([0, 123_456, 500_500, 999_999])
    columns = cholesky_solve(values.detach(), pattern, unit_columns(m * m, cols))
    for t, c in enumerate(cols.tolist()):
        rows = pattern.col_long[pattern.crow[c] : pattern.crow[c + 1]]
        pos, _ = pattern.positions(rows, torch.full_like(rows, c))
        torch.testing.assert_close(values.grad[pos], columns[rows, t], rtol=1e-9, atol=1e-12)


def as_pattern_large(matrix: sp.spmatrix) -> tuple[torch.Tensor, SparsityPattern, None]:
    """:func:`as_pattern` without the dense copy."""
    csr = sp.csr_matrix(matrix)
    csr.sort_indices()
    pattern = SparsityPattern(
        torch.from_numpy(csr.indptr.astype(np.int64)),
        torch.from_numpy(csr.indices.astype(np.int64)),
        csr.shape,
        symmetric=True,
    )
    return torch.from_numpy(csr.data.copy()), pattern, None


def unit_columns(n: int, cols: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(n, cols.numel(), dtype=torch.float64)
    out[cols, torch.arange(cols.numel())] = 1.0
    return out
