"""Compare two sets of benchmark result files (before / after a change) measured in the same session.

Reads the JSON files that ``precision_benchmark.py`` and ``solve_benchmark.py`` write (one or more
repeats per side), takes the median time of every case per side and prints a Markdown table of
the ratios after / before, with their median and geometric mean.

    python benchmarks/compare_runs.py --kind precision --before old1.json old2.json --after new1.json new2.json
    python benchmarks/compare_runs.py --kind solve --before solve_old.json --after solve_new.json --out table.md

A same-session before/after run: clone the earlier commit beside the working tree and alternate
``(cd BEFORE && PYTHONPATH=BEFORE python benchmarks/X.py --out before_i)`` with the same command in
the working tree, at 1 thread, so that both sides see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

#: Per kind: the fields naming a case, and the timed fields to compare.
KINDS = {
    "precision": (("N", "name"), ("total_s", "first_s", "forward_s", "peak_mib")),
    "solve": (("kind", "matrix", "n", "k", "method", "precond", "path"), ("fwdbwd_s", "fwd_s", "peak_mib")),
}


def rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return data["rows"] if isinstance(data, dict) and "rows" in data else data


def medians(paths: list[Path], key_fields, fields) -> dict:
    cases: dict = {}
    for path in paths:
        for row in rows(path):
            if row.get("error"):
                continue
            entry = cases.setdefault(tuple(row.get(k) for k in key_fields), {f: [] for f in fields})
            for f in fields:
                if isinstance(row.get(f), int | float):
                    entry[f].append(float(row[f]))
    return {k: {f: statistics.median(v) for f, v in e.items() if v} for k, e in cases.items()}


def table(kind: str, before: list[Path], after: list[Path]) -> str:
    key_fields, fields = KINDS[kind]
    old, new = medians(before, key_fields, fields), medians(after, key_fields, fields)
    main = fields[0]
    lines = [
        f"{len(before)} run(s) before, {len(after)} after; medians per side; ratio = after / before\n",
        "| " + " | ".join(key_fields) + " | " + " | ".join(f"{f} before / after (ratio)" for f in fields) + " |",
        "|" + "---|" * (len(key_fields) + len(fields)),
    ]
    ratios = []
    for key in sorted(set(old) & set(new), key=str):
        cells = []
        for f in fields:
            a, b = old[key].get(f), new[key].get(f)
            if a is None or b is None or a == 0:
                cells.append("–")
                continue
            cells.append(f"{a:.3g} / {b:.3g} ({b / a:.2f})")
            if f == main:
                ratios.append(b / a)
        lines.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")
    if ratios:
        lines.append(
            f"\n{main}: median ratio {statistics.median(ratios):.3f}, geometric mean "
            f"{statistics.geometric_mean(ratios):.3f}, range {min(ratios):.2f}–{max(ratios):.2f} "
            f"over {len(ratios)} cases"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=tuple(KINDS), required=True)
    parser.add_argument("--before", type=Path, nargs="+", required=True)
    parser.add_argument("--after", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    text = table(args.kind, args.before, args.after)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
