"""gpsparse.mesh: validation, constructors, P1 finite-element matrices (hand values and invariants), interpolation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from gpsparse.mesh import Mesh, lonlat_to_cartesian
from gpsparse.mesh.polygon import buffered_hull, check_simple, points_in_polygon

RIGHT = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
SQUARE = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])


def _wavy(num: int = 60) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, num, endpoint=False)
    radius = 1 + 0.3 * np.cos(3 * t)
    return np.c_[radius * np.cos(t), radius * np.sin(t)]


def _disk(centre, radius, num=16) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, num, endpoint=False)
    return np.c_[centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)]


# ------------------------------------------------------------------ FEM hand values
def test_single_right_triangle_hand_values():
    mesh = Mesh(RIGHT, [[0, 1, 2]])
    G = mesh.stiffness_matrix().toarray()
    C = mesh.mass_matrix().toarray()
    np.testing.assert_allclose(G, 0.5 * np.array([[2, -1, -1], [-1, 1, 0], [-1, 0, 1]]), atol=1e-15)
    np.testing.assert_allclose(C, 0.5 / 12 * np.array([[2, 1, 1], [1, 2, 1], [1, 1, 2]]), atol=1e-15)
    np.testing.assert_allclose(mesh.lumped_mass(), np.full(3, 0.5 / 3), atol=1e-15)


def test_orientation_does_not_change_the_matrices():
    a, b = Mesh(RIGHT, [[0, 1, 2]]), Mesh(RIGHT, [[0, 2, 1]])
    np.testing.assert_allclose(a.stiffness_matrix().toarray(), b.stiffness_matrix().toarray(), atol=1e-15)
    assert np.array_equal(b.cells, [[0, 1, 2]])  # reoriented counterclockwise


def test_equilateral_triangle_hand_values():
    # All angles 60°: G_ij = −cot(60°)/2 off the diagonal, cot(60°) on it.
    v = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    G = Mesh(v, [[0, 1, 2]]).stiffness_matrix().toarray()
    c = 1 / math.sqrt(3)
    np.testing.assert_allclose(G, np.array([[c, -c / 2, -c / 2], [-c / 2, c, -c / 2], [-c / 2, -c / 2, c]]), atol=1e-14)


def test_two_triangles_square_hand_values():
    # The unit square cut along (0,0)-(1,1): the diagonal coupling vanishes (cot 90° = 0).
    mesh = Mesh(SQUARE, [[0, 1, 2], [0, 2, 3]])
    G = mesh.stiffness_matrix().toarray()
    expected = 0.5 * np.array([[2, -1, 0, -1], [-1, 2, -1, 0], [0, -1, 2, -1], [-1, 0, -1, 2]])
    np.testing.assert_allclose(G, expected, atol=1e-15)
    np.testing.assert_allclose(mesh.lumped_mass(), [1 / 3, 1 / 6, 1 / 3, 1 / 6], atol=1e-15)


def test_interval_hand_values():
    mesh = Mesh.interval([0.0, 0.5, 2.0])
    G = mesh.stiffness_matrix().toarray()
    np.testing.assert_allclose(G, [[2, -2, 0], [-2, 2 + 2 / 3, -2 / 3], [0, -2 / 3, 2 / 3]], atol=1e-14)
    C = mesh.mass_matrix().toarray()
    np.testing.assert_allclose(C, [[1 / 6, 1 / 12, 0], [1 / 12, 1 / 6 + 1 / 2, 1 / 4], [0, 1 / 4, 1 / 2]], atol=1e-14)
    np.testing.assert_allclose(mesh.lumped_mass(), [0.25, 1.0, 0.75], atol=1e-15)


def test_anisotropic_stiffness_is_linear_in_H_and_matches_the_isotropic_one():
    mesh = (
        Mesh.from_points_and_boundary(None, _wavy(), max_area=0.05)
        if _has_triangle()
        else Mesh.regular_grid([[0, 0], [1, 1]], 6)
    )
    iso = mesh.stiffness_matrix().toarray()
    np.testing.assert_allclose(mesh.stiffness_matrix(np.eye(2)).toarray(), iso, atol=1e-12)
    H = np.array([[2.0, 0.3], [0.3, 0.5]])
    xx, yy, xy = (m.toarray() for m in mesh.stiffness_components())
    np.testing.assert_allclose(mesh.stiffness_matrix(H).toarray(), 2.0 * xx + 0.5 * yy + 0.3 * xy, atol=1e-12)
    # The quadratic form of a linear function u = aᵀx is ∫ aᵀHa (exact for P1): area · aᵀHa.
    a = np.array([0.7, -1.3])
    u = mesh.vertices @ a
    np.testing.assert_allclose(u @ mesh.stiffness_matrix(H) @ u, mesh.measure * a @ H @ a, rtol=1e-12)


def _has_triangle() -> bool:
    try:
        import triangle  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ invariants
@pytest.mark.parametrize("kind", ["grid", "alternate", "sphere", "interval"])
def test_fem_invariants(kind):
    mesh = {
        "grid": lambda: Mesh.regular_grid([[0, 0], [2, 1]], (9, 5)),
        "alternate": lambda: Mesh.regular_grid([[0, 0], [2, 1]], (9, 5), diagonal="alternate"),
        "sphere": lambda: Mesh.icosphere(3, radius=2.0),
        "interval": lambda: Mesh.interval(np.sort(np.random.default_rng(0).uniform(0, 3, 20))),
    }[kind]()
    G, C, lumped = mesh.stiffness_matrix(), mesh.mass_matrix(), mesh.lumped_mass()
    ones = np.ones(mesh.num_vertices)
    np.testing.assert_allclose(G @ ones, 0.0, atol=1e-12 * abs(G).max())  # constants in the kernel of G
    np.testing.assert_allclose(C.sum(), mesh.measure, rtol=1e-13)  # sum(C) = total area
    np.testing.assert_allclose(np.asarray(C.sum(axis=1)).ravel(), lumped, rtol=1e-13)  # C̃ = row sums
    assert abs(G - G.T).max() == 0 and abs(C - C.T).max() == 0
    assert np.linalg.eigvalsh(G.toarray()).min() > -1e-10  # positive semi-definite
    if kind in ("grid", "alternate"):
        np.testing.assert_allclose(mesh.measure, 2.0, rtol=1e-14)


def test_sphere_area_converges_to_four_pi_r_squared():
    radius = 3.0
    errors = [
        abs(Mesh.icosphere(s, radius).measure - 4 * math.pi * radius**2) / (4 * math.pi * radius**2)
        for s in range(2, 6)
    ]
    assert errors[-1] < 2e-3
    # second order in the edge length: each subdivision (h/2) divides the error by ~4
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.5 < r < 4.5 for r in ratios), ratios


def test_fem_assembly_is_sparse_and_vectorised():
    mesh = Mesh.regular_grid([[0, 0], [1, 1]], 300)  # 90 000 vertices, 178 802 triangles
    G = mesh.stiffness_matrix()
    assert isinstance(G, sp.csr_matrix) and G.has_sorted_indices
    assert G.indices.dtype == np.int32
    assert G.nnz <= 7 * mesh.num_vertices


def test_regular_grid_stiffness_is_the_five_point_laplacian_inside():
    m, h = 7, 0.5
    mesh = Mesh.regular_grid([[0, 0], [h * (m - 1), h * (m - 1)]], m)
    G = mesh.stiffness_matrix().toarray()
    interior = np.arange(m * m).reshape(m, m)[1:-1, 1:-1].reshape(-1)
    for i in interior:
        row = G[i]
        assert row[i] == pytest.approx(4.0)
        neighbours = [i - 1, i + 1, i - m, i + m]
        np.testing.assert_allclose(row[neighbours], -1.0, atol=1e-14)
        row = row.copy()
        row[[i, *neighbours]] = 0
        np.testing.assert_allclose(row, 0.0, atol=1e-14)
    np.testing.assert_allclose(mesh.lumped_mass()[interior], h * h, rtol=1e-14)


def test_icosphere_counts_and_radius():
    for s in range(4):
        mesh = Mesh.icosphere(s, radius=6371.0)
        assert mesh.num_vertices == 10 * 4**s + 2 and mesh.num_cells == 20 * 4**s
        np.testing.assert_allclose(np.linalg.norm(mesh.vertices, axis=1), 6371.0, rtol=1e-14)
        assert mesh.kind == "sphere" and mesh.radius == pytest.approx(6371.0)


# ------------------------------------------------------------------ interpolation
def test_planar_interpolation_reproduces_linear_functions():
    mesh = Mesh.regular_grid([[0, 0], [1, 2]], (11, 13), diagonal="alternate")
    rng = np.random.default_rng(1)
    points = rng.uniform([0, 0], [1, 2], (500, 2))
    W = mesh.interpolation(points)
    assert W.shape == (500, mesh.num_vertices) and W.pattern.nnz == 1500
    u = torch.from_numpy(mesh.vertices @ np.array([0.3, -2.0]) + 1.0)
    np.testing.assert_allclose((W._matmul(u[:, None]))[:, 0].numpy(), points @ [0.3, -2.0] + 1.0, atol=1e-12)
    rows = W.to_dense().sum(-1)
    np.testing.assert_allclose(rows.numpy(), 1.0, atol=1e-14)
    assert float(W.values.min()) >= 0.0


def test_interpolation_at_vertices_and_edges():
    mesh = Mesh(SQUARE, [[0, 1, 2], [0, 2, 3]])
    W = mesh.interpolation(np.r_[SQUARE, [[0.5, 0.5], [1.0, 0.5]]]).to_dense().numpy()
    np.testing.assert_allclose(W[:4], np.eye(4), atol=1e-15)
    np.testing.assert_allclose(W[4], [0.5, 0, 0.5, 0], atol=1e-15)
    np.testing.assert_allclose(W[5], [0, 0.5, 0.5, 0], atol=1e-15)


def test_interval_interpolation():
    mesh = Mesh.interval([0.0, 1.0, 3.0])
    W = mesh.interpolation([[0.5], [2.0], [3.0], [0.0]]).to_dense().numpy()
    np.testing.assert_allclose(W, [[0.5, 0.5, 0], [0, 0.5, 0.5], [0, 0, 1], [1, 0, 0]], atol=1e-15)


def test_sphere_interpolation_is_the_central_projection():
    mesh = Mesh.icosphere(3)
    rng = np.random.default_rng(2)
    p = rng.standard_normal((400, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    cells, ids, bary = mesh.locate(p)
    assert (bary >= 0).all()
    np.testing.assert_allclose(bary.sum(1), 1.0, atol=1e-14)
    projected = np.einsum("qk,qkd->qd", bary, mesh.vertices[ids])  # the point on the flat triangle
    cos = np.einsum("qd,qd->q", projected / np.linalg.norm(projected, axis=1, keepdims=True), p)
    np.testing.assert_allclose(cos, 1.0, atol=1e-12)  # on the ray from the origin through p
    # lon/lat helper: the north pole is a vertex of the icosphere? not necessarily; it is located anyway
    W = mesh.interpolation(lonlat_to_cartesian([[10.0, 45.0], [-170.0, -80.0]]))
    assert W.shape == (2, mesh.num_vertices)


def test_interpolation_weights_are_differentiable():
    for mesh, points in (
        (Mesh.regular_grid([[0, 0], [1, 1]], 5), torch.tensor([[0.3, 0.6], [0.9, 0.1]], dtype=torch.float64)),
        (Mesh.interval([0.0, 0.4, 1.0]), torch.tensor([[0.2], [0.7]], dtype=torch.float64)),
        (
            Mesh.icosphere(2),
            torch.nn.functional.normalize(torch.tensor([[1.0, 2.0, 0.5], [-0.2, 0.1, 1.0]]), dim=-1).double(),
        ),
    ):
        cells, ids, bary = mesh.locate(points.numpy())
        w = mesh.interpolation_weights(points, cells, ids)
        np.testing.assert_allclose(w.numpy(), bary, atol=1e-13)
        x = points.clone().requires_grad_(True)
        torch.autograd.gradcheck(lambda y, m=mesh, c=cells, i=ids: m.interpolation_weights(y, c, i), (x,))


def test_point_location_is_fast_and_exact_on_a_large_mesh():
    mesh = Mesh.regular_grid([[0, 0], [1, 1]], 200, diagonal="alternate")
    points = np.random.default_rng(3).uniform(0, 1, (50_000, 2))
    cells, ids, bary = mesh.locate(points)
    recon = np.einsum("qk,qkd->qd", bary, mesh.vertices[ids])
    np.testing.assert_allclose(recon, points, atol=1e-12)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("vertices", "cells", "match"),
    [
        ([[0, 0], [1, 0], [2, 0]], [[0, 1, 2]], "degenerate"),
        ([[0, 0], [1, 0], [0, 1]], [[0, 1, 3]], "out of range"),
        ([[0, 0], [1, 0], [0, 1]], [[0, 1, -1]], "out of range"),
        ([[0, 0], [1, 0], [0, 1], [0, 1]], [[0, 1, 2], [1, 3, 0]], "duplicates"),
        ([[0, 0], [1, 0], [0, 1], [5, 5]], [[0, 1, 2]], "belongs to no cell"),
        ([[0, 0], [1, 0], [0, 1]], [[0, 1, 1]], "repeats a vertex"),
        ([[0, 0], [1, 0], [0, 1]], [[0, 1, 2], [2, 1, 0]], "more than once"),
        ([[0, 0], [1, 0], [0, 1], [1, 1], [0.2, -1]], [[0, 1, 2], [1, 3, 2], [0, 1, 4], [1, 2, 4]], "shared by 3"),
        ([[0, 0], [1, 0], [0, np.nan]], [[0, 1, 2]], "non-finite"),
        ([[0, 0], [1, 0], [0, 1]], [[0, 1]], "shape"),
        ([[0, 0, 1], [0, 1, 0], [1, 0, 0.5]], [[0, 1, 2]], "sphere"),
        ([[0.0], [1.0], [2.0]], [[0, 2], [1, 2]], "one interval"),
        ([[0.0], [1.0], [1.0]], [[0, 1], [1, 2]], "duplicates"),
        ([[0, 0], [1, 0], [0, 1]], [[0.5, 1, 2]], "integer"),
    ],
)
def test_bad_meshes_raise(vertices, cells, match):
    with pytest.raises(ValueError, match=match):
        Mesh(np.asarray(vertices, dtype=float), cells)


def test_points_outside_the_mesh_raise_naming_the_point():
    mesh = Mesh.regular_grid([[0, 0], [1, 1]], 5)
    with pytest.raises(ValueError, match=r"point 1 at \[1.5, 0.5\] lies outside the mesh"):
        mesh.interpolation([[0.5, 0.5], [1.5, 0.5]])
    with pytest.raises(ValueError, match="outside the mesh"):
        Mesh.interval([0.0, 1.0]).interpolation([[1.5]])
    with pytest.raises(ValueError, match="off the mesh's sphere"):
        Mesh.icosphere(1).interpolation([[0.0, 0.0, 2.0]])
    with pytest.raises(ValueError, match="shape"):
        mesh.interpolation([[0.5, 0.5, 0.5]])
    with pytest.raises(ValueError, match="non-finite"):
        mesh.interpolation([[0.5, np.inf]])


def test_point_in_a_hole_is_outside():
    pytest.importorskip("triangle")
    mesh = Mesh.from_points_and_boundary(None, SQUARE * 2, [_disk((1, 1), 0.4)], max_area=0.01)
    with pytest.raises(ValueError, match="lies outside the mesh"):
        mesh.interpolation([[1.0, 1.0]])
    mesh.interpolation([[0.3, 0.3], [1.0, 1.6]])


# ------------------------------------------------------------------ construction from polygons
def test_from_points_and_boundary_quality_and_regions():
    pytest.importorskip("triangle")
    rng = np.random.default_rng(4)
    points = rng.uniform(-0.5, 0.5, (200, 2))
    hole = _disk((0.3, 0.1), 0.2)
    points = points[np.linalg.norm(points - [0.3, 0.1], axis=1) > 0.25]
    mesh = Mesh.from_points_and_boundary(points, _wavy(), [hole], extension=0.4, max_area=0.003, min_angle=28)
    v, t = mesh.vertices, mesh.cells
    # every data point is a vertex
    dist = np.min(np.linalg.norm(v[None, :, :] - points[:, None, :], axis=-1), axis=1)
    assert dist.max() < 1e-12
    # quality: no angle below the bound, areas below the bounds per region
    e = [v[t[:, (k + 1) % 3]] - v[t[:, k]] for k in range(3)]
    angles = []
    for k in range(3):
        a, b = e[k], -e[(k + 2) % 3]
        angles.append(np.degrees(np.arccos((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))))
    assert np.min(angles) >= 28 - 1e-6
    assert mesh.regions is not None and set(np.unique(mesh.regions)) == {0, 1}
    assert mesh.cell_sizes[mesh.regions == 0].max() <= 0.003 * (1 + 1e-9)
    assert mesh.cell_sizes[mesh.regions == 1].max() <= 16 * 0.003 * (1 + 1e-9)
    # the hole is not meshed, the extension is: the inner region's area is the polygon's minus the hole's
    from gpsparse.mesh.polygon import signed_area

    inner = mesh.cell_sizes[mesh.regions == 0].sum()
    np.testing.assert_allclose(inner, abs(signed_area(_wavy())) - abs(signed_area(hole)), rtol=1e-10)
    centroids = v[t].mean(1)
    assert not points_in_polygon(centroids, hole).any()
    outside = ~points_in_polygon(centroids, _wavy())
    assert (mesh.regions[outside] == 1).all()
    # the outer ring contains the boundary grown by (almost) the extension
    ring = buffered_hull(_wavy(), 0.4)
    assert points_in_polygon(_wavy() * 1.05, ring).all()


def test_from_points_and_boundary_without_extension_and_bounds():
    pytest.importorskip("triangle")
    mesh = Mesh.from_points_and_boundary(None, SQUARE)
    assert mesh.regions is not None and (mesh.regions == 0).all()
    np.testing.assert_allclose(mesh.measure, 1.0, rtol=1e-12)
    fine = Mesh.from_points_and_boundary(None, SQUARE, max_area=1e-3, min_angle=30)
    assert fine.num_vertices > 400
    # duplicates among the points are merged; points on a boundary vertex are dropped
    mesh = Mesh.from_points_and_boundary([[0.5, 0.5], [0.5, 0.5], [0.0, 0.0], [0.5, 0.5 + 1e-4]], SQUARE, cutoff=1e-3)
    assert mesh.num_vertices == 5


@pytest.mark.parametrize(
    ("boundary", "holes", "kwargs", "match"),
    [
        ([[0, 0], [1, 1], [1, 0], [0, 1]], None, {}, "not simple"),  # a bow tie
        ([[0, 0], [2, 0], [2, 2], [1, 0], [0, 2]], None, {}, "not simple"),  # touches itself at a vertex
        ([[0, 0], [2, 0], [2, 2], [1, 2], [1, 3], [1, 2.0], [0, 2]], None, {}, "not simple"),  # a vertex twice
        ([[0, 0], [1, 0], [1, 0], [0, 1]], None, {}, "repeats vertex"),
        ([[0, 0], [2, 0], [2, 2], [1, 2], [1, 3], [1, 2.5], [1, 1.99], [0, 2]], None, {}, "not simple"),  # a spike
        ([[0, 0], [1, 0], [2, 0]], None, {}, "not simple"),  # collinear
        ([[0, 0], [1, 0]], None, {}, "at least 3"),
        (SQUARE, [_disk((0.9, 0.5), 0.3)], {}, "not simple"),  # a hole crossing the boundary
        (SQUARE, [_disk((3, 3), 0.1)], {}, "not inside the boundary"),
        (SQUARE, [_disk((0.3, 0.5), 0.15), _disk((0.5, 0.5), 0.15)], {}, "not simple"),  # holes crossing
        (SQUARE, [_disk((0.5, 0.5), 0.3), _disk((0.5, 0.5), 0.1)], {}, "inside hole"),
        (SQUARE, None, {"min_angle": 40}, "min_angle"),
        (SQUARE, None, {"max_area": -1.0}, "max_area"),
        (SQUARE, None, {"extension": 0.0}, "extension"),
        (SQUARE, None, {"max_area": (0.1, 0.2, 0.3)}, "pair"),
    ],
)
def test_bad_domains_raise(boundary, holes, kwargs, match):
    pytest.importorskip("triangle")
    with pytest.raises(ValueError, match=match):
        Mesh.from_points_and_boundary(None, boundary, holes, **kwargs)


def test_bad_points_raise():
    pytest.importorskip("triangle")
    with pytest.raises(ValueError, match=r"point 1 at \[2.0, 2.0\] lies outside the boundary"):
        Mesh.from_points_and_boundary([[0.5, 0.5], [2.0, 2.0]], SQUARE)
    with pytest.raises(ValueError, match="inside hole 0"):
        Mesh.from_points_and_boundary([[0.5, 0.5]], SQUARE, [_disk((0.5, 0.5), 0.2)])
    # with an extension, points outside the boundary are meshed in the ring
    mesh = Mesh.from_points_and_boundary([[1.2, 0.5]], SQUARE, extension=0.5)
    assert np.min(np.linalg.norm(mesh.vertices - [1.2, 0.5], axis=1)) < 1e-12


def test_check_simple_large_polygon_is_accepted():
    t = np.linspace(0, 2 * np.pi, 3000, endpoint=False)
    ring = np.c_[np.cos(t) * (1 + 0.2 * np.sin(7 * t)), np.sin(t) * (1 + 0.2 * np.sin(7 * t))]
    check_simple([ring], ["ring"])
    ring[1500] *= 1.01  # a small bump: still simple
    check_simple([ring], ["ring"])
    ring[10] = [-2.0, 0.0]  # this one crosses the left part of the ring
    with pytest.raises(ValueError, match="not simple"):
        check_simple([ring], ["ring"])


def test_missing_triangle_package_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "triangle":
            raise ImportError("No module named 'triangle'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"gpsparse\[mesh\]"):
        Mesh.from_points_and_boundary(None, SQUARE)


def test_mesh_pickles():
    import pickle

    mesh = Mesh.regular_grid([[0, 0], [1, 1]], 4)
    mesh.interpolation([[0.5, 0.5]])  # builds the locator
    copy = pickle.loads(pickle.dumps(mesh))
    np.testing.assert_array_equal(copy.cells, mesh.cells)
    assert copy.interpolation([[0.5, 0.5]]).shape == (1, 16)


def test_mesh_spatial_example_runs(tmp_path):
    """The example end to end with 3 Adam steps: its dense float64 check and its figure."""
    import subprocess
    import sys
    from pathlib import Path

    for module in ("triangle", "libpysal", "geopandas", "matplotlib"):
        pytest.importorskip(module)
    script = Path(__file__).resolve().parent.parent / "examples" / "mesh_spatial.py"
    out = subprocess.run(
        [sys.executable, str(script), "--steps", "3", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    mll_error = float(out.split("MLL relative difference ")[1].split(",")[0])
    mean_error = float(out.split("posterior mean relative difference ")[1].split()[0])
    from gpsparse.core.cholmod import cholmod_available

    bound = 1e-8 if cholmod_available() else 5e-2  # exact with CHOLMOD (~1e-14); SLQ and CG without it
    assert mll_error < bound and mean_error < bound
    assert (tmp_path / "mesh_spatial.png").stat().st_size > 10_000
