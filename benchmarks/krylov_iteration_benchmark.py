"""Per-iteration cost of gpsparse's CG against the bare SpMM with the same number of columns.

Matrix: the 2-D lattice precision ``(κ²I + L)²`` (Neumann 5-point Laplacian L on an m×m grid,
κ = 0.5), 13 nnz per interior row, n = m², float64, int32 CSR indices. For each k the worker
measures, in one process:

* the floor: one bare SpMM ``gpsparse.core.sparse_ops.spmm`` (torch CSR ``addmm`` into a
  reused buffer, the matvec CG itself calls) with k columns;
* CG on the same matrix (``gpsparse.core.krylov.cg`` with the solves' ``buffered_matvec``,
  no preconditioner, ``rtol = 0``): per-iteration time ``(t(N) − t(1)) / (N − 1)`` from the
  medians of runs with ``max_iters = N`` and ``1`` (the set-up cancels).

Shared machines are noisy: each number is a median over runs and rounds, with the value from
the minima beside it. "before" runs the same worker on another checkout (``--before PATH``, e.g. a worktree of the
commit before the fused kernels: ``git worktree add /tmp/old <commit>``) through PYTHONPATH;
"after" on this repository. Both share the machine's load; rounds alternate before/after.

    python benchmarks/krylov_iteration_benchmark.py --before /tmp/old \\
        --out benchmarks/results/krylov_iteration_cpu_1thread
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def lattice13(m: int, kappa: float = 0.5):
    """scipy CSR ``(κ²I + L)²`` on an m×m Neumann lattice (sorted, exactly symmetric)."""
    import scipy.sparse as sp

    d = np.full(m, 2.0)
    d[[0, -1]] = 1.0
    one = sp.diags([-np.ones(m - 1), d, -np.ones(m - 1)], [-1, 0, 1], format="csr")
    eye = sp.identity(m, format="csr")
    a5 = (kappa**2 * sp.identity(m * m) + sp.kron(one, eye) + sp.kron(eye, one)).tocsr()
    a = (a5 @ a5).tocsr()
    a = ((a + a.T) * 0.5).tocsr()
    a.sum_duplicates()
    a.sort_indices()
    return a


def _median_time(call, repeats: int) -> tuple[float, float]:
    call()  # warm-up (numba load, buffers)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def _case(values, pattern, n: int, k: int, iterations: int, repeats: int, method: str = "cg") -> dict:
    """SpMM and CG (or Lanczos without re-orthogonalisation) timings with ``k`` columns (medians and minima, ms)."""
    import torch

    from gpsparse.core.krylov import cg
    from gpsparse.core.lanczos import lanczos
    from gpsparse.core.solver import buffered_matvec
    from gpsparse.core.sparse_ops import spmm

    rhs = torch.randn(1, n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    buf = torch.empty_like(rhs)
    spmm_med, spmm_min = _median_time(lambda: spmm(values, pattern, rhs, out=buf), max(repeats, 9))
    matvec = buffered_matvec(values, pattern)

    def run(its):
        if method == "lanczos":
            return lanczos(matvec, rhs, its, reorthogonalize=False)
        return cg(matvec, rhs, rtol=0.0, max_iters=its)

    one_med, one_min = _median_time(lambda: run(1), repeats)
    many_med, many_min = _median_time(lambda: run(iterations), repeats)
    if method == "cg":
        assert run(iterations)[1].iterations == iterations
    per_med = (many_med - one_med) / (iterations - 1)
    per_min = (many_min - one_min) / (iterations - 1)
    return {
        "k": k,
        "spmm_ms": 1e3 * spmm_med,
        "spmm_min_ms": 1e3 * spmm_min,
        "cg_per_iteration_ms": 1e3 * per_med,
        "cg_per_iteration_min_ms": 1e3 * per_min,
        "ratio": per_med / spmm_med,
        "ratio_min": per_min / spmm_min,
        "loadavg": os.getloadavg()[0],
    }


def worker(m: int, columns: list[int], iterations: int, repeats: int, method: str = "cg") -> dict:
    """Measure SpMM and CG per-iteration times in this process (the gpsparse found on sys.path)."""
    import torch

    torch.set_num_threads(1)
    import gpsparse
    from gpsparse import SparsityPattern

    a = lattice13(m)
    n = m * m
    crow = torch.from_numpy(a.indptr.astype(np.int32))
    col = torch.from_numpy(a.indices.astype(np.int32))
    values = torch.from_numpy(a.data.astype(np.float64)).reshape(1, -1)
    pattern = SparsityPattern(crow, col, (n, n), symmetric=True)
    out = {"library": os.path.dirname(os.path.dirname(gpsparse.__file__)), "n": n, "nnz": int(a.nnz), "cases": []}
    for k in columns:
        out["cases"].append(_case(values, pattern, n, k, iterations, repeats, method))
    return out


def run_worker(tree: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    spec = {
        "m": args.m,
        "columns": args.columns,
        "iterations": args.iterations,
        "repeats": args.repeats,
        "method": args.method,
    }
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        raise RuntimeError(f"worker on {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(meta: dict, rows: list[dict]) -> str:
    lanczos = meta.get("method") == "lanczos"
    name = "Lanczos" if lanczos else "CG"
    detail = "Lanczos without re-orthogonalisation (basis stored)" if lanczos else "CG without preconditioner"
    lines = [
        f"# {name} per iteration vs bare SpMM — n = {meta['n']:,}, {meta['nnz'] / meta['n']:.1f} nnz/row, float64",
        "",
        f"Machine: {meta['cpu']}, {meta['cores']} cores; torch {meta['torch']}, numba {meta['numba']}, "
        f"python {meta['python']}; **1 thread** (torch, numba, MKL); {meta['date']}; "
        f"load average {meta['load_start']:.2f} at start, {meta['load_end']:.2f} at end (shared machine). "
        f"Matrix (κ²I + L)², κ = 0.5, on a {meta['m']}² Neumann lattice; {detail}, "
        f"per iteration = (t({meta['iterations']} its) − t(1 it)) / {meta['iterations'] - 1}, medians of "
        f"{meta['repeats']} runs per round; median over {meta['rounds']} rounds of the medians, and in brackets "
        "from the minima (min over runs and rounds of t(N), t(1), SpMM); SpMM = "
        "torch CSR addmm (int32) into a reused buffer, same k, same process.",
        "",
        f"| code | k | SpMM ms | {name} per-iteration ms | per-iteration / SpMM | load (median) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['code']} | {r['k']} | {r['spmm_ms']:.1f} ({r['spmm_min_ms']:.1f}) | "
            f"{r['cg_per_iteration_ms']:.1f} ({r['cg_per_iteration_min_ms']:.1f}) | "
            f"{r['ratio']:.2f} ({r['ratio_min']:.2f}) | {r['loadavg']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--before", help="checkout with the previous code (PYTHONPATH root)")
    parser.add_argument("--m", type=int, default=1000, help="lattice side (n = m²), default 1000")
    parser.add_argument("--columns", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", choices=("cg", "lanczos"), default="cg", help="lanczos: no re-orthogonalisation")
    parser.add_argument("--out", help="default results/krylov_iteration_cpu_1thread (lanczos: lanczos_iteration_…)")
    args = parser.parse_args()
    if args.out is None:
        stem = "krylov_iteration_cpu_1thread" if args.method == "cg" else "lanczos_iteration_cpu_1thread"
        args.out = os.path.join(HERE, "results", stem)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec["m"], spec["columns"], spec["iterations"], spec["repeats"], spec["method"])))
        return

    import numba
    import torch

    trees = ([("before", os.path.abspath(args.before))] if args.before else []) + [("after", REPO)]
    load_start = os.getloadavg()[0]
    results: dict[str, list[dict]] = {name: [] for name, _ in trees}
    for _ in range(args.rounds):
        for name, tree in trees:
            results[name].append(run_worker(tree, args))
            print(name, json.dumps(results[name][-1]["cases"]), flush=True)
    rows = []
    for name, _ in trees:
        for i, k in enumerate(args.columns):
            cases = [r["cases"][i] for r in results[name]]
            med = {key: statistics.median(c[key] for c in cases) for key in ("spmm_ms", "cg_per_iteration_ms")}
            low = {key: min(c[key] for c in cases) for key in ("spmm_min_ms", "cg_per_iteration_min_ms")}
            rows.append(
                {
                    "code": name,
                    "k": k,
                    **med,
                    **low,
                    "ratio": med["cg_per_iteration_ms"] / med["spmm_ms"],
                    "ratio_min": low["cg_per_iteration_min_ms"] / low["spmm_min_ms"],
                    "loadavg": statistics.median(c["loadavg"] for c in cases),
                }
            )
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    meta = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": commit.stdout.strip(),
        "threads": 1,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "m": args.m,
        "n": args.m * args.m,
        "nnz": results["after"][0]["nnz"],
        "iterations": args.iterations,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "method": args.method,
        "trees": dict(trees),
    }
    table = render(meta, rows)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "raw": results}, f, indent=1)


if __name__ == "__main__":
    main()
