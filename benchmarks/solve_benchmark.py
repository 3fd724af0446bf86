#!/usr/bin/env python
"""Benchmark of ``gpsparse.solve`` (forward and forward+backward) on 2-D lattice precision matrices.

For every (matrix, n, k) one worker process (fresh imports, its own thread setting) measures:

* the floor: one bare torch CSR SpMM with int32 indices (as gpsparse stores them) and the
  same number of columns k, the faster of ``A @ X`` and ``torch.addmm(Y, A, X, beta=0,
  out=Y)`` (gpsparse's form), median of several calls, just before every case;
* ``gpsparse.solve(A, B, method=m, preconditioner=p, rtol=1e-6)`` for m in cg, minres,
  bicgstab and p in None, "jacobi", "ic0": forward time, forward+backward time
  (backward: ``(X * G).sum().backward()``, gradients for the values and for B),
  iterations of the forward and of the backward (transpose) solve, time per iteration
  split into SpMM / preconditioner / the rest (the core's dense vector work and Python
  overhead), its ratio to the bare SpMM, and peak memory;
* the baseline ``torchsparsegradutils.sparse_generic_solve`` with its ``linear_cg``
  and ``minres`` (tolerance 1e-6, the same solver as transpose solve, which is correct
  because every matrix here is symmetric): forward and forward+backward times;
* on ill-conditioned variants, CG with each preconditioner (iteration reductions, and
  the diagonal shift gpsparse's "ic0" needed).

How things are measured
-----------------------
* Times: ``time.perf_counter`` around the call (CPU, synchronous); forward and
  forward+backward come from the same call (the forward time is read when ``solve``
  returns); median over the repeats. A case stops at ``--case-timeout`` (SIGALRM).
* Iterations and the per-iteration split: the worker replaces ``gpsparse.core.krylov.cg`` /
  ``minres`` / ``bicgstab`` (looked up at call time by ``gpsparse.core.solver.run_solver``)
  by thin wrappers that time the matvec and preconditioner callables they are given and
  read ``SolverInfo.iterations``; ``build_preconditioner`` and
  ``IncompleteCholeskyPreconditioner.from_matrix`` are wrapped the same way (construction
  time, shifts tried). Nothing in the library is modified.
  ``dense`` = core time − SpMM − preconditioner.
* Peak memory: growth of the worker's peak resident set size (Linux ``VmHWM``, reset
  through ``/proc/self/clear_refs`` after ``malloc_trim``) over the first timed
  forward+backward call of the case; the matrix, B and G exist before and are not counted;
  everything the solve allocates (its vectors, X, the gradients, torch temporaries) is.
* gpsparse is called on a ``SparseLinearOperator`` whose pattern is built once
  (``path=op``; what a training loop does) and, for CG without preconditioner, also on a
  torch COO tensor (``path=tensor``), which pays the conversion (sorting the indices,
  detecting symmetry) at every call.
* The baseline gets a CSR leaf tensor with int32 indices and ``requires_grad=True`` (its
  gradient is a CSR tensor at the nonzeros); its matvec is ``A.matmul``.

Usage::

    python benchmarks/solve_benchmark.py --quick                      # n = 10⁴ only, ~4 min
    python benchmarks/solve_benchmark.py --threads 1 --out benchmarks/results/solve_cpu_1thread
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np

RTOL = 1e-6
MAX_ITERS = 10_000

# name -> (stencil, kappa, tau, noise precision σ⁻²)
MATRICES = {
    "A5": dict(stencil=5, kappa=0.5),
    "A13": dict(stencil=13, kappa=0.5, tau=1.0, noise_prec=1.0),
    "A5-ill": dict(stencil=5, kappa=0.05),
    "A13-ill": dict(stencil=13, kappa=0.05, tau=1.0, noise_prec=1e-2),
}


def describe_matrix(name: str) -> str:
    p = MATRICES[name]
    if p["stencil"] == 5:
        return f"κ²I + L, κ = {p['kappa']}"
    return f"τ(κ²I + L)² + σ⁻²I, τ = {p['tau']}, κ = {p['kappa']}, σ⁻² = {p['noise_prec']}"


# --------------------------------------------------------------------------------------------------
# matrices
# --------------------------------------------------------------------------------------------------


def lattice_matrix(name: str, m: int):
    """scipy CSR matrix (sorted indices, exactly symmetric) of the named lattice precision."""
    import scipy.sparse as sp

    p = MATRICES[name]
    d = np.full(m, 2.0)
    d[[0, -1]] = 1.0
    one = sp.diags([-np.ones(m - 1), d, -np.ones(m - 1)], [-1, 0, 1], format="csr")
    eye = sp.identity(m, format="csr")
    lap = (sp.kron(one, eye) + sp.kron(eye, one)).tocsr()
    a5 = (p["kappa"] ** 2 * sp.identity(m * m) + lap).tocsr()
    if p["stencil"] == 5:
        a = a5
    else:
        a = (p["tau"] * (a5 @ a5) + p["noise_prec"] * sp.identity(m * m)).tocsr()
    a = ((a + a.T) * 0.5).tocsr()  # remove rounding-level asymmetry of the product
    a.sum_duplicates()
    a.sort_indices()
    return a


def cached_matrix(cache: str, name: str, m: int):
    """(crow int32, col int32, values float64) of the matrix, cached as .npy files in ``cache``."""
    stem = os.path.join(cache, f"{name}_{m}")
    if not os.path.exists(stem + "_data.npy"):
        a = lattice_matrix(name, m)
        np.save(stem + "_crow.npy", a.indptr.astype(np.int32))
        np.save(stem + "_col.npy", a.indices.astype(np.int32))
        np.save(stem + "_data.npy", a.data.astype(np.float64))
    return np.load(stem + "_crow.npy"), np.load(stem + "_col.npy"), np.load(stem + "_data.npy")


# --------------------------------------------------------------------------------------------------
# worker-side helpers
# --------------------------------------------------------------------------------------------------

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


class PeakMemory:
    """Peak RSS growth (MiB) over a region: VmHWM reset via /proc/self/clear_refs."""

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.method = "VmHWM"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.method = "VmHWM (not resettable: upper bound)"
        self.start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak_mib = (_status_kib("VmHWM") - self.start) / 1024.0
        return False


def spmm_floor(A, n: int, k: int, seconds: float = 0.6) -> dict:
    """Median time (s) of one bare CSR SpMM with X (n, k) contiguous float64.

    Two forms: ``A @ X`` (fresh output) and ``torch.addmm(Y, A, X, beta=0, out=Y)`` into a
    reused buffer (gpsparse's form since commit e79c396); the floor is the faster median.
    """
    import torch

    X = torch.randn(n, k, dtype=torch.float64)
    Y = torch.empty(n, k, dtype=torch.float64)
    forms = {
        "matmul": lambda: A @ X,
        "addmm_out": lambda: torch.addmm(Y, A, X, beta=0.0, out=Y),
    }
    out = {}
    for name, call in forms.items():
        for _ in range(2):
            call()
        times = []
        t_end = time.perf_counter() + seconds
        while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 200):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        out[name] = {"median_s": statistics.median(times), "min_s": min(times), "calls": len(times)}
    out["median_s"] = min(out["matmul"]["median_s"], out["addmm_out"]["median_s"])
    return out


def csr(crow, col, values, n):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False)


def lattice_arrays(name, m):
    a = lattice_matrix(name, m)
    return a.indptr.astype(np.int32), a.indices.astype(np.int32), a.data.astype(np.float64)


def _relres(A_plain, X, B) -> float:
    import torch

    with torch.no_grad():
        X = X.detach().reshape(B.shape)
        R = B - A_plain @ X
        return float((torch.linalg.vector_norm(R, dim=0) / torch.linalg.vector_norm(B, dim=0)).max())


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout("per-case timeout")


class Instrumentation:
    """Wraps gpsparse's Krylov cores and preconditioner construction (in this process only)."""

    def __init__(self):
        import gpsparse.autograd.sparse as functions
        import gpsparse.core.krylov as krylov
        import gpsparse.core.solver as solver_config
        from gpsparse.core.preconditioners import IncompleteCholeskyPreconditioner

        self.records: list[dict] = []
        self.builds: list[float] = []
        self.ic0_attempts: list[tuple[float, bool]] = []
        for name in ("cg", "minres", "bicgstab"):
            setattr(krylov, name, self._core(getattr(krylov, name)))
        # build_preconditioner is looked up in solver_config (run_solver) and, since commit 159238f,
        # imported by name into functions (SparseSolve.forward builds one for forward and backward)
        build = solver_config.build_preconditioner
        timed = self._timed_build(build)
        solver_config.build_preconditioner = timed
        if getattr(functions, "build_preconditioner", None) is build:
            functions.build_preconditioner = timed
        original = IncompleteCholeskyPreconditioner.from_matrix.__func__
        attempts = self.ic0_attempts

        def from_matrix(cls, A, *, shift=0.0):
            try:
                out = original(cls, A, shift=shift)
            except Exception:
                attempts.append((shift, False))
                raise
            attempts.append((shift, True))
            return out

        IncompleteCholeskyPreconditioner.from_matrix = classmethod(from_matrix)

    def reset(self):
        self.records.clear()
        self.builds.clear()
        self.ic0_attempts.clear()

    def _timed_build(self, build):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return build(*a, **kw)
            finally:
                self.builds.append(time.perf_counter() - t0)

        return timed

    def _core(self, core):
        records = self.records

        def wrapped(matvec, rhs, /, **kw):
            rec = {"matvec_s": 0.0, "precond_s": 0.0, "matvecs": 0, "preconds": 0}

            def mv(v):
                t0 = time.perf_counter()
                out = matvec(v)
                rec["matvec_s"] += time.perf_counter() - t0
                rec["matvecs"] += 1
                return out

            P = kw.get("preconditioner")
            if P is not None:

                def pc(r):
                    t0 = time.perf_counter()
                    out = P(r)
                    rec["precond_s"] += time.perf_counter() - t0
                    rec["preconds"] += 1
                    return out

                kw["preconditioner"] = pc
            t0 = time.perf_counter()
            x, info = core(mv, rhs, **kw)
            rec["core_s"] = time.perf_counter() - t0
            rec["iterations"] = int(info.iterations)
            rec["converged"] = bool(info.converged.all())
            rec["residual"] = float(info.residual_norm.max())
            records.append(rec)
            return x, info

        return wrapped


def worker_group(spec: dict) -> None:
    """Run every case of one (matrix, n, k) in this process; print one RESULT line per case."""
    import signal

    import torch

    torch.set_num_threads(spec["threads"])
    from torchsparsegradutils import sparse_generic_solve
    from torchsparsegradutils.utils import MINRESSettings, linear_cg, minres

    import gpsparse
    from gpsparse import SparseLinearOperator, SparsityPattern
    from gpsparse.linalg.functional import matrix_parts

    inst = Instrumentation()
    m, k = spec["m"], spec["k"]
    n = m * m
    crow, col, data = cached_matrix(spec["cache"], spec["matrix"], m)
    crow_t, col_t, values0 = torch.from_numpy(crow), torch.from_numpy(col), torch.from_numpy(data)
    gen = torch.Generator().manual_seed(0)
    B0 = torch.randn(n, k, dtype=torch.float64, generator=gen)
    G = torch.randn(n, k, dtype=torch.float64, generator=gen)
    A_plain = csr(crow_t, col_t, values0, n)
    pattern = SparsityPattern(crow_t, col_t, (n, n), symmetric=True)
    # the pattern's lazily built index arrays (row, transpose permutation, diagonal positions) are
    # cached on the pattern, as in a training loop after its first step: build them before timing
    for name in ("row", "col_long", "transpose_perm", "diagonal_positions"):
        getattr(pattern, name, None)

    # ---- baseline solvers: the matvec is counted and timed, tolerance as for gpsparse
    base_records: list[dict] = []

    def counted(A):
        rec = {"matvec_s": 0.0, "matvecs": 0}
        base_records.append(rec)

        def mm(v):
            t0 = time.perf_counter()
            out = A.matmul(v)
            rec["matvec_s"] += time.perf_counter() - t0
            rec["matvecs"] += 1
            return out

        return mm, rec

    def tsgu_solver(name):
        core = linear_cg if name == "cg" else minres

        def solve(A, B, **kw):
            mm, rec = counted(A)
            t0 = time.perf_counter()
            out = core(mm, B, **kw)
            rec["core_s"] = time.perf_counter() - t0
            return out

        return solve

    tsgu_kwargs = {
        "cg": dict(tolerance=RTOL, max_iter=MAX_ITERS),
        "minres": dict(max_iter=MAX_ITERS, settings=MINRESSettings(max_cg_iterations=MAX_ITERS, minres_tolerance=RTOL)),
    }

    # ---- warm-up on a tiny lattice of the same kind (numba kernels, torch and MKL paths)
    cw, colw, dw = (torch.from_numpy(a) for a in lattice_arrays(spec["matrix"], 8))
    pw = SparsityPattern(cw, colw, (64, 64), symmetric=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in spec["cases"]:
            try:
                if case["kind"] == "gpsparse":
                    vw = dw.clone().requires_grad_()
                    X = gpsparse.solve(SparseLinearOperator(vw, pattern=pw), torch.ones(64, k, dtype=torch.float64), method=case["method"], preconditioner=case["precond"], rtol=RTOL)
                else:
                    Aw = csr(cw, colw, dw.clone(), 64).requires_grad_()
                    solver = tsgu_solver(case["method"])
                    X = sparse_generic_solve(Aw, torch.ones(64, k, dtype=torch.float64), solve=solver, transpose_solve=solver, **tsgu_kwargs[case["method"]])
                X.sum().backward()
            except Exception:
                pass
    coo_index = None
    signal.signal(signal.SIGALRM, _alarm)

    for index, case in enumerate(spec["cases"]):
        result = {"spmm_floor": spmm_floor(A_plain, n, k), "runs": [], "loadavg": os.getloadavg(), "gpsparse_file": gpsparse.__file__}
        caught: list[str] = []
        kind, method, precond, path = case["kind"], case["method"], case["precond"], case["path"]
        if path == "tensor" and coo_index is None:
            coo_index = torch.stack([pattern.row, pattern.col_long])
        signal.alarm(int(spec["case_timeout"]))
        try:
            for rep in range(spec["repeats"]):
                inst.reset()
                base_records.clear()
                B = B0.clone().requires_grad_()
                values = values0.clone().requires_grad_()
                A_base = csr(crow_t, col_t, values0.clone(), n).requires_grad_() if kind == "baseline" else None
                run: dict = {}
                with warnings.catch_warnings(record=True) as wlist:
                    warnings.simplefilter("always")
                    try:
                        mem = PeakMemory() if rep == 0 else None
                        if mem:
                            mem.__enter__()
                        t0 = time.perf_counter()
                        if kind == "gpsparse":
                            if path == "op":
                                A = SparseLinearOperator(values, pattern=pattern)
                            else:
                                A = torch.sparse_coo_tensor(coo_index, values, (n, n), is_coalesced=True)
                            X = gpsparse.solve(A, B, method=method, preconditioner=precond, rtol=RTOL)
                        else:
                            solver = tsgu_solver(method)  # Aᵀ = A here: the transpose solve is the same solver
                            X = sparse_generic_solve(A_base, B, solve=solver, transpose_solve=solver, **tsgu_kwargs[method])
                        t1 = time.perf_counter()
                        (X * G).sum().backward()
                        t2 = time.perf_counter()
                        if mem:
                            mem.__exit__(None, None, None)
                            run["peak_mib"] = mem.peak_mib
                            result["memory_method"] = mem.method
                        run.update(fwd_s=t1 - t0, fwdbwd_s=t2 - t0, bwd_s=t2 - t1)
                        grad = values.grad if kind == "gpsparse" else A_base.grad.values()
                        assert grad is not None and grad.shape == values0.shape, "no value gradient"
                        assert B.grad is not None and B.grad.shape == B.shape, "no gradient for B"
                        if rep == 0:
                            result["true_relres"] = _relres(A_plain, X, B0)
                    except CaseTimeout:
                        raise
                    except Exception as err:
                        run["error"] = f"{type(err).__name__}: {err}"
                    caught.extend(str(w.message)[:300] for w in wlist if "converge" in str(w.message))
                run["solves"] = [dict(r) for r in (inst.records if kind == "gpsparse" else base_records)]
                run["precond_build_s"] = list(inst.builds)
                run["ic0_attempts"] = list(inst.ic0_attempts)
                result["runs"].append(run)
                X = A = A_base = values = B = None
                if "error" in run:
                    break
            if path == "tensor":
                A = torch.sparse_coo_tensor(coo_index, values0.clone().requires_grad_(), (n, n), is_coalesced=True)
                t0 = time.perf_counter()
                matrix_parts(A)
                result["convert_s"] = time.perf_counter() - t0
                A = None
        except CaseTimeout:
            result["timeout"] = f"timeout after {spec['case_timeout']:.0f} s ({len(result['runs'])} runs done)"
        finally:
            signal.alarm(0)
        result["warnings"] = sorted(set(caught))
        print(f"RESULT {index} " + json.dumps(result), flush=True)


def profile_core(matrix: str, n_req: float, k: int, method: str, iterations: int, threads: int) -> str:
    """torch.profiler table of ``iterations`` iterations of a gpsparse Krylov core (the solve's own matvec)."""
    import torch
    from torch.profiler import profile

    import gpsparse.core.krylov as krylov
    from gpsparse import SparsityPattern
    from gpsparse.core.solver import buffered_matvec

    torch.set_num_threads(threads)
    m = int(round(n_req**0.5))
    n = m * m
    crow, col, data = (torch.from_numpy(a) for a in lattice_arrays(matrix, m))
    pattern = SparsityPattern(crow, col, (n, n), symmetric=True)
    rhs = torch.randn(1, n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    matvec = buffered_matvec(data.reshape(1, -1), pattern)
    core = getattr(krylov, method)
    core(matvec, rhs, max_iters=3)  # warm-up
    with profile() as prof:
        t0 = time.perf_counter()
        core(matvec, rhs, max_iters=iterations, rtol=0.0)
        wall = time.perf_counter() - t0
    head = (
        f"# gpsparse.core.krylov.{method}, {matrix}, n = {m}² , k = {k}, {iterations} iterations, {threads} thread(s), "
        f"load average {os.getloadavg()[0]:.2f}: {wall / iterations * 1e3:.1f} ms per iteration "
        f"(profiler on; addmm = the SpMM)\n"
    )
    return head + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        worker_group(spec)
    except Exception:
        print("WORKER-ERROR " + json.dumps(traceback.format_exc()), flush=True)
        raise


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict:
    import torch

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            model = m.group(1).strip() if m else model
    except OSError:
        pass
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    from importlib import metadata

    for mod in ("gpsparse", "torchsparsegradutils", "numba", "scipy"):
        try:
            versions[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            versions[mod] = "not installed"
    try:
        import importlib.util

        repo = os.path.dirname(importlib.util.find_spec("gpsparse").submodule_search_locations[0])
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except (OSError, AttributeError):
        commit = "?"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": threads,
        "versions": versions,
        "git_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": os.getloadavg(),
    }


def median_of(runs, key):
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def summarise(case: dict, raw: dict) -> dict:
    """Flat summary row of one case (medians, iterations, per-iteration split)."""
    runs = [r for r in raw.get("runs", []) if "error" not in r]
    errors = [r["error"] for r in raw.get("runs", []) if "error" in r]
    row = {k: case[k] for k in ("kind", "matrix", "n", "k", "method", "precond", "path")}
    floor = raw.get("spmm_floor", {})
    row["spmm_ms"] = floor["median_s"] * 1e3 if floor else None
    row["spmm_matmul_ms"] = floor["matmul"]["median_s"] * 1e3 if floor else None
    row["spmm_addmm_ms"] = floor["addmm_out"]["median_s"] * 1e3 if floor else None
    row["error"] = errors[0] if errors else (raw.get("timeout") or raw.get("worker_error") or None)
    row["warnings"] = raw.get("warnings", [])
    row["true_relres"] = raw.get("true_relres")
    row["fwd_s"] = median_of(runs, "fwd_s")
    row["fwdbwd_s"] = median_of(runs, "fwdbwd_s")
    row["peak_mib"] = runs[0].get("peak_mib") if runs else None
    row["repeats"] = len(runs)
    row["loadavg"] = raw.get("loadavg")
    if "convert_s" in raw:
        row["convert_s"] = raw["convert_s"]
    all_runs = raw.get("runs", [])
    if all_runs and all_runs[0].get("ic0_attempts"):
        row["ic0_attempts"] = all_runs[0]["ic0_attempts"]
        ok = [s for s, good in all_runs[0]["ic0_attempts"] if good]
        row["ic0_shift"] = ok[0] if ok else None
    if runs and runs[0].get("solves"):
        fwd = [r["solves"][0] for r in runs if r.get("solves")]
        bwd = [r["solves"][1] for r in runs if len(r.get("solves", [])) > 1]
        row["matvecs_fwd"] = fwd[0]["matvecs"]
        row["matvecs_bwd"] = bwd[0]["matvecs"] if bwd else None
        core = statistics.median(s["core_s"] for s in fwd)
        mv = statistics.median(s["matvec_s"] for s in fwd)
        row["core_fwd_s"] = core
        if case["kind"] == "gpsparse":
            its = fwd[0]["iterations"]
            row["its_fwd"] = its
            row["its_bwd"] = bwd[0]["iterations"] if bwd else None
            if its:
                pc = statistics.median(s["precond_s"] for s in fwd)
                row["per_it_ms"] = core / its * 1e3
                row["per_it_spmm_ms"] = mv / its * 1e3
                row["per_it_precond_ms"] = pc / its * 1e3
                row["per_it_dense_ms"] = (core - mv - pc) / its * 1e3
                if row["spmm_ms"]:
                    row["per_it_over_spmm"] = row["per_it_ms"] / row["spmm_ms"]
                    row["matvec_over_spmm"] = (mv / fwd[0]["matvecs"] * 1e3) / row["spmm_ms"]
            row["precond_build_s"] = statistics.median(sum(r.get("precond_build_s", [])) for r in runs)
        elif fwd[0]["matvecs"]:
            row["per_it_ms"] = core / fwd[0]["matvecs"] * 1e3
            if row["spmm_ms"]:
                row["per_it_over_spmm"] = row["per_it_ms"] / row["spmm_ms"]
                row["matvec_over_spmm"] = (mv / fwd[0]["matvecs"] * 1e3) / row["spmm_ms"]
    return row


def snapshot_library(cache: str) -> dict:
    """Copy the gpsparse package into ``cache`` so that every worker of this run imports the same code.

    The repository is edited while benchmarks run; without a snapshot, workers started later
    would import whatever state the files are in then (or fail mid-edit).
    """
    import hashlib
    import importlib.util

    source = importlib.util.find_spec("gpsparse").submodule_search_locations[0]
    target = os.path.join(cache, "snapshot")
    shutil.copytree(source, os.path.join(target, "gpsparse"), ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(os.path.join(target, "gpsparse"))):
        path = os.path.join(target, "gpsparse", name)
        if name.endswith(".py"):
            with open(path, "rb") as f:
                digest.update(name.encode() + f.read())
    repo = os.path.dirname(source)
    try:
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--", "gpsparse"], capture_output=True, text=True
        ).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except OSError:
        dirty = []
    return {"path": target, "source": source, "sha256": digest.hexdigest()[:12], "uncommitted": dirty}


def run_group(script: str, group: dict, threads: int, on_result, pythonpath: str | None = None) -> None:
    """Run one worker process for a group of cases; ``on_result(index, raw)`` for every case."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONWARNINGS"] = "ignore::UserWarning"
    # hard limit: every case's own timeout plus start-up, matrix loading and warm-up
    limit = group["case_timeout"] * len(group["cases"]) + 300
    done = set()
    t_case = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, script, "--worker", json.dumps(group)], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        t_start = time.perf_counter()
        try:
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    _, index, payload = line.split(" ", 2)
                    raw = json.loads(payload)
                    raw["wall_s"] = time.perf_counter() - t_case
                    t_case = time.perf_counter()
                    done.add(int(index))
                    on_result(int(index), raw)
                if time.perf_counter() - t_start > limit:
                    proc.kill()
                    break
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.seek(0)
        tail = err.read()[-800:]
    for index in range(len(group["cases"])):
        if index not in done:
            why = f"worker exited with code {proc.returncode} before this case finished: {tail.strip()[-400:]}"
            on_result(index, {"runs": [], "worker_error": why})


def build_groups(args, cache: str) -> list[dict]:
    """One group (one worker process) per (matrix, n, k).

    Within a group each baseline case runs right after the gpsparse case it is compared with, so
    that both see the same machine load.
    """
    groups = []
    sizes = [int(float(s)) for s in args.sizes]
    for n_req in sizes:
        m = int(round(n_req**0.5))
        n = m * m
        for k in args.columns:
            reps = args.repeats or (5 if n <= 20_000 else 3 if n <= 200_000 else 2 if k == 1 else 1)
            base = dict(m=m, n=n, k=k, repeats=reps, threads=args.threads, cache=cache, case_timeout=args.case_timeout)
            full = n <= args.full_grid_max_n
            baseline = not args.no_baseline and n <= args.skip_baseline_above
            for mat in ("A5", "A13"):
                cases = []
                for method in ("cg", "minres", "bicgstab"):
                    for pc in (None, "jacobi", "ic0"):
                        # above --full-grid-max-n: CG with every preconditioner (Jacobi only for k = 1),
                        # MINRES and BiCGSTAB without
                        if full or (method == "cg" and (pc != "jacobi" or k == 1)) or pc is None:
                            cases.append(dict(kind="gpsparse", method=method, precond=pc, path="op"))
                        if pc is None and baseline and (method == "cg" or (method == "minres" and n <= args.baseline_minres_max_n)):
                            cases.append(dict(kind="baseline", method=method, precond=None, path="tsgu"))
                        if method == "cg" and pc is None and (full or k == 1):
                            cases.append(dict(kind="gpsparse", method="cg", precond=None, path="tensor"))
                groups.append(dict(base, matrix=mat, cases=cases))
            if n <= args.ill_max_n and (k == 1 or n <= args.ill_max_n_wide):
                ill_reps = args.repeats or (reps if n <= 20_000 else 1)
                for mat in ("A5-ill", "A13-ill"):
                    cases = [dict(kind="gpsparse", method="cg", precond=pc, path="op") for pc in (None, "jacobi", "ic0")]
                    groups.append(dict(base, matrix=mat, cases=cases, repeats=ill_reps))
    return groups


def fmt(x, spec=".3g", none="–"):
    if x is None:
        return none
    return format(x, spec)


def fmt_ms(x) -> str:
    """Milliseconds with 3 significant digits, never in exponent notation."""
    if x is None:
        return "–"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt_n(n: int) -> str:
    """n of an m×m lattice as ``m²`` (10⁴ = 100², 10⁵ ≈ 316², 10⁶ = 1000²)."""
    return f"{int(round(n ** 0.5))}²"


def fmt_s(x):
    if x is None:
        return "–"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def markdown(info: dict, rows: list[dict], args) -> str:
    out = []
    out.append("# gpsparse solve benchmark\n")
    la0, la1 = info["loadavg_start"], info.get("loadavg_end", (None,) * 3)
    v = info["versions"]
    out.append(
        f"* machine: {info['cpu']}, {info['cores']} cores; torch {v['torch']} (CPU), Python {v['python']}, "
        f"gpsparse {v['gpsparse']} (git {info['git_commit']}), torchsparsegradutils {v['torchsparsegradutils']}, numba {v['numba']}\n"
        + snapshot_line(info)
        + f"* torch threads: **{info['threads']}** (`torch.set_num_threads`, OMP/MKL_NUM_THREADS); one worker process per (matrix, n, k)\n"
        f"* date: {info['date']}; load average at start {la0[0]:.2f} / {la0[1]:.2f} / {la0[2]:.2f}, "
        f"at end {fmt(la1[0], '.2f')} / {fmt(la1[1], '.2f')} / {fmt(la1[2], '.2f')} (other jobs shared the 2 cores); wall time {info.get('wall_s', 0):.0f} s\n"
        f"* command: `{info.get('command', '')}`\n"
        f"* float64, rtol = {RTOL:g} (relative residual per column), B and G ~ N(0, 1), values and B require grad; "
        f"fwd+bwd = `X = solve(A, B)` then `(X * G).sum().backward()`\n"
        f"* matrices on an m×m lattice (n = m²), L the Neumann 5-point Laplacian: "
        + "; ".join(f"**{k}** = {describe_matrix(k)}" for k in MATRICES)
        + "\n"
        "* SpMM = median time of one bare torch CSR SpMM (int32 indices) with k columns, the faster of `A @ X` and "
        "`torch.addmm(Y, A, X, beta=0, out=Y)`, measured in the same process just before the case; "
        "per-it = forward core time / iterations (BiCGSTAB makes 2 SpMMs per iteration), split into SpMM / preconditioner / "
        "dense (the rest of the core: vector updates, dot products, convergence checks, Python); its = forward/backward iterations\n"
        "* peak = growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after malloc_trim) during the first "
        "fwd+bwd call; the matrix, B and G exist before and are not counted. Times are medians over the repeats "
        "(n = 10⁴: 5, 10⁵: 3, 10⁶: 2 with k = 1 and 1 with k = 16; ill-conditioned n ≥ 10⁵: 1; unless `--repeats`)\n"
    )

    out.extend(summary_table(rows))

    out.append("\n## gpsparse.solve (SparseLinearOperator with a prebuilt pattern)\n")
    out.append(
        "| matrix | n | k | method | precond | its fwd/bwd | SpMM ms | per-it ms | per-it / SpMM | SpMM / precond / dense ms per it | fwd s | fwd+bwd s | peak MiB |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "gpsparse" and r["path"] == "op" and not r["matrix"].endswith("-ill"):
            out.append(row_gp(r))

    base_rows = [r for r in rows if r["kind"] == "baseline"]
    if base_rows:
        out.append("\n## vs torchsparsegradutils.sparse_generic_solve (no preconditioner)\n")
        out.append(
            "Speed-up = time(torchsparsegradutils) / time(gpsparse). gpsparse `op`: SparseLinearOperator with a prebuilt "
            "pattern; `tensor`: a torch COO tensor passed to `gpsparse.solve` and converted at every call (CG only). "
            "tsgu gets an int32 CSR leaf tensor; `mv` = its SpMMs in the forward solve (linear_cg: iterations + 2; minres: "
            "iterations + 1, stopping on a relative-update test checked every 10 iterations, hence the residual column).\n"
        )
        out.append(
            "| matrix | n | k | solver | tsgu mv | tsgu fwd s | tsgu fwd+bwd s | tsgu peak MiB | tsgu rel. res. | gpsparse its | gpsparse fwd+bwd s (op) | speed-up fwd (op) | speed-up fwd+bwd (op) | speed-up fwd+bwd (tensor) |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for b in base_rows:
            gp = find(rows, "gpsparse", b["matrix"], b["n"], b["k"], b["method"], None, "op")
            gt = find(rows, "gpsparse", b["matrix"], b["n"], b["k"], b["method"], None, "tensor") if b["method"] == "cg" else None
            err = f" ({short(b['error'], 60)})" if b["error"] else ""
            out.append(
                f"| {b['matrix']} | {fmt_n(b['n'])} | {b['k']} | {'linear_cg' if b['method'] == 'cg' else 'minres'} | {fmt(b.get('matvecs_fwd'), 'd')} | "
                f"{fmt_s(b['fwd_s'])}{err} | {fmt_s(b['fwdbwd_s'])} | {fmt(b['peak_mib'], '.0f')} | "
                f"{fmt(b['true_relres'], '.1e')} | {its(gp) if gp else '–'} | {fmt_s(gp and gp['fwdbwd_s'])} | {ratio(b['fwd_s'], gp and gp['fwd_s'])} | "
                f"{ratio(b['fwdbwd_s'], gp and gp['fwdbwd_s'])} | {ratio(b['fwdbwd_s'], gt and gt['fwdbwd_s'])} |"
            )

    tens = [r for r in rows if r["kind"] == "gpsparse" and r["path"] == "tensor"]
    if tens:
        out.append("\n## Torch tensor input: per-call conversion (CG, no preconditioner)\n")
        out.append(
            "`gpsparse.solve(A_coo, B)` converts the tensor at every call (`gpsparse.linalg.functional.matrix_parts`: sorting the "
            "indices, the transpose permutation, symmetry detection); `convert s` times that call alone.\n"
        )
        out.append("| matrix | n | k | convert s | fwd s (tensor) | fwd s (op) | fwd+bwd s (tensor) | fwd+bwd s (op) | peak MiB (tensor) | peak MiB (op) |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for t in tens:
            gp = find(rows, "gpsparse", t["matrix"], t["n"], t["k"], "cg", None, "op")
            out.append(
                f"| {t['matrix']} | {fmt_n(t['n'])} | {t['k']} | {fmt(t.get('convert_s'), '.3g')} | {fmt_s(t['fwd_s'])} | {fmt_s(gp and gp['fwd_s'])} | "
                f"{fmt_s(t['fwdbwd_s'])} | {fmt_s(gp and gp['fwdbwd_s'])} | {fmt(t['peak_mib'], '.0f')} | {fmt(gp and gp['peak_mib'], '.0f')} |"
            )

    ill = [r for r in rows if r["matrix"].endswith("-ill")]
    if ill:
        out.append("\n## Preconditioning on the ill-conditioned variants (CG)\n")
        out.append(
            "`ic0`: gpsparse's `preconditioner=\"ic0\"`, which factorises A + s·diag(A) for the first s in "
            "(0, 1e-3, 1e-2, 0.1, 1) without a breakdown (`shift` column; the shifts that broke down in brackets). "
            "build s = preconditioner construction per fwd+bwd call (one factorisation serves forward and backward).\n"
        )
        out.append("| matrix | n | k | precond | shift (failed) | its fwd/bwd | its none / its | per-it ms (precond part) | build s | fwd s | fwd+bwd s | fwd+bwd none / this | peak MiB | note |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in ill:
            none = find(rows, "gpsparse", r["matrix"], r["n"], r["k"], "cg", None, "op")
            red = ratio(none and none.get("its_fwd"), r.get("its_fwd")) if r.get("its_fwd") else "–"
            note = short(r["error"], 160) if r["error"] else "; ".join(short(w, 90) for w in r["warnings"])
            shift = "–"
            if r.get("ic0_attempts"):
                failed = [f"{s:g}" for s, good in r["ic0_attempts"] if not good]
                shift = f"{fmt(r.get('ic0_shift'), 'g')}" + (f" ({', '.join(failed)})" if failed else "")
            out.append(
                f"| {r['matrix']} | {fmt_n(r['n'])} | {r['k']} | {r['precond'] or 'none'} | {shift} | {its(r)} | {red} | "
                f"{fmt_ms(r.get('per_it_ms'))} ({fmt_ms(r.get('per_it_precond_ms'))}) | {fmt(r.get('precond_build_s'), '.3f')} | "
                f"{fmt_s(r['fwd_s'])} | {fmt_s(r['fwdbwd_s'])} | {ratio(none and none['fwdbwd_s'], r['fwdbwd_s'])} | "
                f"{fmt(r['peak_mib'], '.0f')} | {note} |"
            )
    problems = [r for r in rows if (r["error"] or r["warnings"]) and not r["matrix"].endswith("-ill")]
    if problems:
        out.append("\n## Errors and warnings\n")
        for r in problems:
            msg = r["error"] or "; ".join(r["warnings"])
            out.append(f"* {r['kind']} {r['matrix']} n={r['n']} k={r['k']} {r['method']} {r['precond']} {r['path']}: {short(msg, 300)}")
    return "\n".join(out) + "\n"


def snapshot_line(info: dict) -> str:
    snap = info.get("library_snapshot")
    if not snap:
        return ""
    dirty = f"; uncommitted changes in {', '.join(snap['uncommitted'])}" if snap["uncommitted"] else ""
    return f"* gpsparse code: snapshot {snap['sha256']} (sha256 of its .py files) taken at the start of the run from git {info['git_commit']}{dirty}\n"


def summary_table(rows: list[dict]) -> list[str]:
    """The key numbers: CG without preconditioner against the floor and against torchsparsegradutils."""
    out = ["\n## Summary: CG without preconditioner\n"]
    out.append(
        "per-it / SpMM: forward CG time per iteration over one bare SpMM with the same columns (target ≤ 1.5 on A13); "
        "speed-up: torchsparsegradutils `linear_cg` fwd+bwd time / gpsparse fwd+bwd time (target ≥ 3 with 16 columns, "
        "≥ 1 with 1 column); gpsparse on a SparseLinearOperator (pattern built once), in brackets on a torch COO tensor "
        "converted at every call.\n"
    )
    out.append(
        "| matrix | n | k | its | SpMM ms | per-it ms (SpMM / dense) | per-it / SpMM | gpsparse fwd s | gpsparse fwd+bwd s | tsgu fwd+bwd s | speed-up fwd+bwd | peak MiB gpsparse / tsgu |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if (r["kind"], r["method"], r["precond"], r["path"]) != ("gpsparse", "cg", None, "op") or r["matrix"].endswith("-ill"):
            continue
        b = find(rows, "baseline", r["matrix"], r["n"], r["k"], "cg", None, "tsgu")
        t = find(rows, "gpsparse", r["matrix"], r["n"], r["k"], "cg", None, "tensor")
        speed = ratio(b and b["fwdbwd_s"], r["fwdbwd_s"])
        if t and b:
            speed += f" ({ratio(b['fwdbwd_s'], t['fwdbwd_s'])})"
        if b and b["error"]:
            speed = short(b["error"], 40)
        out.append(
            f"| {r['matrix']} | {fmt_n(r['n'])} | {r['k']} | {its(r)} | {fmt_ms(r['spmm_ms'])} | "
            f"{fmt_ms(r.get('per_it_ms'))} ({fmt_ms(r.get('per_it_spmm_ms'))} / {fmt_ms(r.get('per_it_dense_ms'))}) | "
            f"{fmt(r.get('per_it_over_spmm'), '.2f')} | {fmt_s(r['fwd_s'])} | {fmt_s(r['fwdbwd_s'])} | {fmt_s(b and b['fwdbwd_s'])} | "
            f"{speed} | {fmt(r['peak_mib'], '.0f')} / {fmt(b and b['peak_mib'], '.0f')} |"
        )
    return out


def its(r):
    if r.get("its_fwd") is None:
        return "–"
    return f"{r['its_fwd']}/{fmt(r.get('its_bwd'), 'd')}"


def row_gp(r):
    if r["error"]:
        return (
            f"| {r['matrix']} | {fmt_n(r['n'])} | {r['k']} | {r['method']} | {r['precond'] or 'none'} | – | {fmt(r['spmm_ms'], '.3g')} | "
            f"– | – | – | – | – | {short(r['error'])} |"
        )
    split = f"{fmt_ms(r.get('per_it_spmm_ms'))} / {fmt_ms(r.get('per_it_precond_ms'))} / {fmt_ms(r.get('per_it_dense_ms'))}"
    flag = "" if not r["warnings"] else " ⚠"
    return (
        f"| {r['matrix']} | {fmt_n(r['n'])} | {r['k']} | {r['method']} | {r['precond'] or 'none'} | {its(r)}{flag} | "
        f"{fmt_ms(r['spmm_ms'])} | {fmt_ms(r.get('per_it_ms'))} | {fmt(r.get('per_it_over_spmm'), '.2f')} | {split} | "
        f"{fmt_s(r['fwd_s'])} | {fmt_s(r['fwdbwd_s'])} | {fmt(r['peak_mib'], '.0f')} |"
    )


def short(msg, n=120):
    if not msg:
        return ""
    msg = str(msg).replace("|", "/").replace("\n", " ")
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def ratio(a, b, suffix="×"):
    if not a or not b:
        return "–"
    return f"{a / b:.2f}{suffix}"


def find(rows, kind, matrix, n, k, method, precond, path):
    for r in rows:
        if (r["kind"], r["matrix"], r["n"], r["k"], r["method"], r["precond"], r["path"]) == (kind, matrix, n, k, method, precond, path):
            return r
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1e4", "1e5", "1e6"], help="n (rounded to a square m²)")
    parser.add_argument("--columns", nargs="+", type=int, default=[1, 16], help="right-hand side columns k")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed fwd+bwd calls per case (default 5/3/1 by size)")
    parser.add_argument("--quick", action="store_true", help="n = 10⁴ only")
    parser.add_argument("--out", default="benchmarks/results/solve", help="output stem: <out>.md and <out>.json")
    parser.add_argument("--skip-baseline-above", type=float, default=1e6, help="run torchsparsegradutils only for n ≤ this")
    parser.add_argument("--baseline-minres-max-n", type=float, default=1e5, help="run the baseline's minres only for n ≤ this")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--case-timeout", type=float, default=300.0, help="seconds per case (all its repeats)")
    parser.add_argument("--full-grid-max-n", type=float, default=1e5, help="above this n only CG gets jacobi/ic0")
    parser.add_argument("--ill-max-n", type=float, default=1e6, help="largest n of the ill-conditioned cases")
    parser.add_argument("--ill-max-n-wide", type=float, default=1e4, help="largest n of ill-conditioned cases with k > 1")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the markdown of an earlier run from its .json")
    parser.add_argument(
        "--profile", nargs=3, metavar=("MATRIX", "N", "K"), help="only print a torch.profiler table of 20 CG iterations, e.g. A13 1e6 16"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    if args.profile:
        matrix, n_req, k = args.profile
        print(profile_core(matrix, float(n_req), int(k), "cg", 20, args.threads))
        return
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        md = markdown(saved["info"], saved["rows"], args)
        with open(os.path.splitext(args.render)[0] + ".md", "w") as f:
            f.write(md)
        print(md)
        return
    if args.quick:
        args.sizes = ["1e4"]

    info = machine_info(args.threads)
    info["command"] = "python benchmarks/solve_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(
        f"# {info['cpu']} ({info['cores']} cores), torch {info['versions']['torch']}, threads={args.threads}, "
        f"load average {info['loadavg_start'][0]:.2f}, {info['date']}",
        flush=True,
    )
    cache = tempfile.mkdtemp(prefix="gpsparse_solve_bench_")
    script = os.path.abspath(__file__)
    t_start = time.perf_counter()
    rows, raws = [], []
    try:
        snapshot = snapshot_library(cache)
        info["library_snapshot"] = {k: v for k, v in snapshot.items() if k != "path"}
        print(
            f"# gpsparse snapshot {snapshot['sha256']} of {snapshot['source']} (git {info['git_commit']}"
            + (f", uncommitted: {', '.join(snapshot['uncommitted'])}" if snapshot["uncommitted"] else "")
            + ")",
            flush=True,
        )
        groups = build_groups(args, cache)
        for group in groups:
            cached_matrix(cache, group["matrix"], group["m"])
        print(f"# {sum(len(g['cases']) for g in groups)} cases in {len(groups)} worker processes", flush=True)
        print(
            f"{'kind':8} {'matrix':8} {'n':>8} {'k':>3} {'method':9} {'precond':8} {'path':6} {'its/mv':>11} "
            f"{'SpMM ms':>8} {'it/SpMM':>7} {'fwd s':>8} {'f+b s':>8} {'MiB':>7} {'wall s':>7}",
            flush=True,
        )
        for group in groups:
            common = {key: group[key] for key in ("matrix", "n", "k")}

            def on_result(index, raw, group=group, common=common):
                case = dict(group["cases"][index], **common)
                row = summarise(case, raw)
                row["wall_s"] = raw.get("wall_s")
                rows.append(row)
                raws.append({"case": case, "raw": raw})
                if row["kind"] == "gpsparse":
                    its_str = its(row)
                else:
                    its_str = f"{fmt(row.get('matvecs_fwd'), 'd')}/{fmt(row.get('matvecs_bwd'), 'd')}mv"
                line = (
                    f"{row['kind']:8} {row['matrix']:8} {row['n']:8d} {row['k']:3d} {row['method']:9} {str(row['precond']):8} "
                    f"{row['path']:6} {its_str:>11} {fmt(row['spmm_ms'], '8.3f'):>8} {fmt(row.get('per_it_over_spmm'), '7.2f'):>7} "
                    f"{fmt(row['fwd_s'], '8.3f'):>8} {fmt(row['fwdbwd_s'], '8.3f'):>8} {fmt(row['peak_mib'], '7.0f'):>7} "
                    f"{fmt(row['wall_s'], '7.1f'):>7}"
                )
                if row["error"]:
                    line += "  ERROR " + short(row["error"], 150)
                elif row["warnings"]:
                    line += "  WARN " + short(row["warnings"][0], 100)
                if row.get("ic0_attempts") and len(row["ic0_attempts"]) > 1:
                    line += f"  ic0 shift {row.get('ic0_shift')}"
                print(line, flush=True)

            run_group(script, group, args.threads, on_result, pythonpath=snapshot["path"])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    info["wall_s"] = time.perf_counter() - t_start
    info["loadavg_end"] = os.getloadavg()
    info["args"] = {k: v for k, v in vars(args).items() if k != "worker"}
    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    md = markdown(info, rows, args)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    with open(args.out + ".json", "w") as f:
        json.dump({"info": info, "rows": rows, "raw": raws}, f, indent=1)
    print()
    print(md)
    print(f"wrote {args.out}.md and {args.out}.json", flush=True)


if __name__ == "__main__":
    main()
