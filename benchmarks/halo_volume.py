"""Halo volume of a row-partitioned SpMM on a 2-D lattice precision (issue 16, item 4: the design note's numbers).

For an ``s × s`` lattice with the 5-point (``κ²I + L``, α = 1) or 13-point (``(κ²I + L)²``, α = 2)
precision, the rows are split over ``R`` ranks either in strips (natural order, contiguous row blocks)
or in ``√R × √R`` blocks (nodes renumbered block by block). The halo of a rank is the set of columns
its rows touch outside its own block: the entries it must receive from other ranks before each SpMM
(per right-hand-side column). This script builds the patterns (scipy) and counts them exactly for
``s`` up to ``--max-side``, and fits the exact linear law in ``s`` that extrapolates to
``s = 10⁴`` (10⁸ nodes).

    python benchmarks/halo_volume.py [--sides 500 1000 2000] [--ranks 4 16 64]

Writes benchmarks/results/halo_volume.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]


def precision_pattern(side: int, stencil: int) -> sp.csr_matrix:
    lap1 = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(side, side))
    eye = sp.identity(side)
    A = (sp.kron(lap1, eye) + sp.kron(eye, lap1) + 0.1 * sp.identity(side * side)).tocsr()
    return A if stencil == 5 else (A @ A).tocsr()


def block_order(side: int, ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """Node permutation that numbers ``√R × √R`` blocks consecutively, and each node's owner."""
    q = math.isqrt(ranks)
    assert q * q == ranks, "block partitions need a square number of ranks"
    i, j = np.divmod(np.arange(side * side), side)
    bi = np.minimum(i * q // side, q - 1)
    bj = np.minimum(j * q // side, q - 1)
    owner = bi * q + bj
    return np.argsort(owner, kind="stable"), owner


def halo_sizes(A: sp.csr_matrix, owner: np.ndarray, ranks: int) -> np.ndarray:
    """Per rank: distinct columns outside its block that its rows reference."""
    coo = A.tocoo()
    outside = owner[coo.row] != owner[coo.col]
    pairs = np.unique(np.stack([owner[coo.row[outside]], coo.col[outside]]), axis=1)
    return np.bincount(pairs[0], minlength=ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--target-side", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "halo_volume")
    args = parser.parse_args()
    rows = []
    for stencil in (5, 13):
        for layout in ("strips", "blocks"):
            for ranks in args.ranks:
                measured = []
                for side in args.sides:
                    A = precision_pattern(side, stencil)
                    if layout == "strips":
                        owner = np.minimum(np.arange(side * side) * ranks // (side * side), ranks - 1)
                    else:
                        _, owner = block_order(side, ranks)
                    sizes = halo_sizes(A, owner, ranks)
                    measured.append((side, int(sizes.max()), float(sizes.mean())))
                (s1, m1, _), (s2, m2, _) = measured[-2], measured[-1]
                slope = (m2 - m1) / (s2 - s1)
                predicted = m2 + slope * (args.target_side - s2)
                local_rows = args.target_side**2 / ranks
                row = {
                    "stencil": stencil,
                    "layout": layout,
                    "ranks": ranks,
                    "measured": measured,
                    "halo_max_at_target": predicted,
                    "halo_bytes_per_column_float64": 8 * predicted,
                    "halo_over_local_rows": predicted / local_rows,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = [
        "# Halo volume of a row-partitioned SpMM, 2-D lattice precisions\n",
        f"Measured exactly (scipy patterns) at sides {args.sides}; the largest rank's halo grows linearly in "
        f"the side (exact at the measured sides), extrapolated to a {args.target_side}² lattice "
        f"({args.target_side**2:.0e} nodes). Volume per SpMM and right-hand-side column (float64), received by "
        "the busiest rank.\n",
        "| stencil | layout | ranks | halo entries at the largest measured side | extrapolated halo at 10⁸ nodes "
        "| MB per column per SpMM | halo / local rows |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        side, mx, _ = r["measured"][-1]
        lines.append(
            f"| {r['stencil']}-point | {r['layout']} | {r['ranks']} | {mx:,} (side {side}) | "
            f"{r['halo_max_at_target']:,.0f} | {r['halo_bytes_per_column_float64'] / 1e6:.2f} | "
            f"{r['halo_over_local_rows']:.1e} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
