"""The package's import layers, checked statically (ast, nothing executed).

Layers, lowest first (DESIGN.md §1): ``errors`` → ``core`` → ``autograd`` →
``linalg`` → ``operators`` → ``kernels`` → the package root. A module may import
its own layer and the layers below it, never above; ``settings`` is read only
from ``linalg`` upwards; the core imports neither gpytorch, linear_operator,
torch's autograd machinery nor ``gpsparse.settings``; and the import graph
(function-level imports included) has no cycle.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gpsparse"

#: Rank of every layer; a module may import modules of equal or lower rank only.
RANKS = {"errors": 0, "core": 1, "autograd": 2, "settings": 3, "linalg": 3, "operators": 4, "kernels": 5, "": 6}
#: GPyTorch-facing adapters beside the kernels (issue 14): likelihoods, models and their marginal likelihoods.
RANKS.update({"likelihoods": 5, "models": 5, "mlls": 5})
#: Meshes (issue 15): geometry and FEM (NumPy/SciPy), the SPDE precision structure and its operator — the
#: operators' rank (``Mesh.interpolation`` returns a SparseLinearOperator; ``gpsparse.kernels.mesh`` builds on it).
RANKS.update({"mesh": 4})
#: Probe-parallel runs (issue 16): the public context manager beside ``linalg`` — it reads nothing but
#: ``torch.distributed`` and sets the setting that ``linalg.config`` passes down as a ``ProbePartition``.
RANKS.update({"distributed": 3})
#: Third-party packages a layer must not import (prefix match), with the reason.
FORBIDDEN = {
    "core": ("gpytorch", "linear_operator", "torch.autograd"),
    "autograd": ("gpytorch", "linear_operator"),
    "linalg": ("gpytorch", "linear_operator"),
    "settings": ("gpytorch", "linear_operator"),
    "distributed": ("gpytorch", "linear_operator"),
}


def module_name(path: pathlib.Path) -> str:
    root = next(p for p in path.parents if p.name == "gpsparse").parent
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """``gpsparse.core.krylov.cg`` → ``core``; ``gpsparse`` → ``""`` (the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else ""


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """Every imported module name (absolute; ``from a import b`` gives ``a.b`` when ``a.b`` is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                names.append((node.lineno, candidate if _is_module(candidate) else base))
    return names


def _is_module(name: str) -> bool:
    if not name.startswith("gpsparse"):
        return False
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def violations(package: pathlib.Path = PACKAGE) -> list[str]:
    """Human-readable layer violations of every module under ``package``."""
    found = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(path)
        layer = layer_of(module)
        for line, name in imports_of(path):
            where = f"{path.relative_to(package.parent)}:{line}"
            for banned in FORBIDDEN.get(layer, ()):
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{where}: the {layer} layer imports {name}")
            if not name.startswith("gpsparse"):
                continue
            target = layer_of(name)
            if RANKS[target] > RANKS[layer] or (target == "" and layer != ""):
                found.append(
                    f"{where}: {module} ({layer or 'root'}) imports {name} ({target or 'root'}), a higher layer"
                )
    return found


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    graph = {}
    for path in package.rglob("*.py"):
        module = module_name(path)
        targets = set()
        for _, name in imports_of(path):
            if not name.startswith("gpsparse"):
                continue
            while name and not _is_module(name):  # an attribute import: its module
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                targets.add(name)  # a package importing its own submodules is not a cycle
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Elementary cycles found by depth-first search (one per back edge)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_imports_point_down_only():
    assert violations() == []


def test_no_import_cycles():
    graph = import_graph()
    # Packages re-exporting their submodules (``gpsparse.core.krylov`` → ``.cg``) are not edges back up:
    assert cycles(graph) == []


def test_every_module_has_a_layer():
    unknown = [
        module_name(p)
        for p in PACKAGE.rglob("*.py")
        if module_name(p).count(".") >= 1 and layer_of(module_name(p)) == ""
    ]
    assert unknown == [], "modules outside the layer folders; give them a layer in tests/test_layers.py"


def test_the_check_catches_an_upward_import(tmp_path):
    """A deliberate violation in a copy of the package: core importing an operator is reported."""
    import shutil

    copy = tmp_path / "gpsparse"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    bad = copy / "core" / "pattern.py"
    bad.write_text(bad.read_text() + "\nfrom gpsparse.operators.sparse import SparseLinearOperator\nimport gpytorch\n")
    found = violations(copy)
    assert any("core/pattern.py" in v and "gpsparse.operators.sparse" in v for v in found), found
    assert any("core/pattern.py" in v and "imports gpytorch" in v for v in found), found


def test_settings_are_read_only_at_the_boundary():
    """``gpsparse.settings`` is read by ``linalg.config`` (the functions' boundary), operators and kernels only."""
    readers = set()
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        if any(name == "gpsparse.settings" or name.startswith("gpsparse.settings.") for _, name in imports_of(path)):
            readers.add(module)
    # gpsparse.distributed writes a setting (probe_parallel is a public context manager, like gpsparse.settings'
    # own); linalg.config reads it.
    allowed = {"gpsparse", "gpsparse.linalg.config", "gpsparse.distributed"}
    below = sorted(m for m in readers if m not in allowed and layer_of(m) not in ("operators", "kernels"))
    assert below == [], f"modules below the boundary read gpsparse.settings: {below}"
    assert "gpsparse.linalg.config" in readers  # the check sees imports at all
