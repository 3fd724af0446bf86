"""Figures for the benchmark report, drawn from the JSON files in ``benchmarks/results/``.

* ``logdet_accuracy.png`` — relative error of the stochastic log-determinant against CHOLMOD's
  exact value vs matrix–vector products (16 probes × K Lanczos steps, or 16 × CG iterations for
  Hutchinson), per preconditioner (``logdet.json``);
* ``precision_scaling.png`` — time of one marginal likelihood + gradient and peak memory vs N,
  per configuration (``precision_cpu_1thread.json``);
* ``markov_scaling.png`` — the same for the Markov Matérn kernels against dense GPyTorch
  (``markov_cpu_1thread.json``, when present).

    python benchmarks/plot_results.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROBES = "16"


def logdet_accuracy(results: Path) -> Path | None:
    path = results / "logdet.json"
    if not path.exists():
        return None
    groups = json.loads(path.read_text())["results"]["accuracy"]
    groups = [g for g in groups if any(PROBES in row["rms_rel"] for row in g["rows"])]
    colors: dict[str, str] = {}
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        lines: dict[str, list[tuple[float, float]]] = {}
        for row in group["rows"]:
            if PROBES not in row["rms_rel"]:
                continue
            steps = row["K"] if isinstance(row["K"], (int, float)) else row.get("cg_iterations")
            if steps is None:
                continue
            label = f"{row['gradient']}, {row['precond']}"
            lines.setdefault(label, []).append((int(PROBES) * float(steps), row["rms_rel"][PROBES]))
        for label, points in sorted(lines.items()):
            points.sort()
            color = colors.setdefault(label, f"C{len(colors)}")
            ax.loglog(*zip(*points), marker="o", ms=3, label=label, color=color)
        ax.set_title(f"{group['matrix']}, n = {group['n']:,}")
        ax.set_xlabel("matrix–vector products (16 probes)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("relative error vs CHOLMOD")
    for ax in axes[0]:
        ax.legend(fontsize=6)
    return _save(fig, results / "logdet_accuracy.png")


def scaling(results: Path, name: str, title: str) -> Path | None:
    path = results / f"{name}.json"
    if not path.exists():
        return None
    rows = json.loads(path.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 3.8))
    by_config: dict[str, list[dict]] = {}
    for row in rows:
        row = _normalise(row)
        if "error" not in row and row.get("total_s") is not None:
            by_config.setdefault(row["name"], []).append(row)
    for config, points in sorted(by_config.items()):
        points.sort(key=lambda r: r["N"])
        sizes = [r["N"] for r in points]
        totals = [r["total_s"] if r["total_s"] == r["total_s"] else r["forward_s"] for r in points]
        ax_time.loglog(sizes, totals, marker="o", ms=3, label=config)
        ax_mem.loglog(sizes, [r["peak_mib"] for r in points], marker="o", ms=3, label=config)
    ax_time.set_ylabel("one MLL + gradient (s, steady state)")
    ax_mem.set_ylabel("peak memory (MiB)")
    for ax in (ax_time, ax_mem):
        ax.set_xlabel("N")
        ax.grid(True, which="both", alpha=0.3)
    ax_time.set_title(title)
    ax_time.legend(fontsize=7)
    return _save(fig, results / f"{name.replace('_cpu_1thread', '')}_scaling.png")


def _normalise(row: dict) -> dict:
    """Rows of the Markov benchmark (``n``, ``kernel``, ``nu``, ``steady_s``) in the precision benchmark's keys."""
    if "kernel" not in row:
        return row
    seconds = row["steady_s"] if row.get("steady_s") is not None else row.get("first_s")
    label = {"dense": "dense GPyTorch", "markov": "Kalman", "banded": "banded precision", "peer": "value-only peer"}
    name = f"{label.get(row['kernel'], row['kernel'])} ν = {row['nu']}"
    return {**row, "name": name, "N": row["n"], "total_s": seconds}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    made = [
        logdet_accuracy(args.results),
        scaling(args.results, "precision_cpu_1thread", "lattice GMRF + noise, 1 thread"),
        scaling(args.results, "markov_cpu_1thread", "Markov Matérn: Kalman, banded, peer, dense; 1 thread"),
    ]
    for path in made:
        if path is not None:
            print(f"written {path}")


if __name__ == "__main__":
    main()
