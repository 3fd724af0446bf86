"""Meshes for SPDE (finite-element) Matérn fields: geometry, P1 finite-element matrices, interpolation.

Mesh
:   A validated 1-D interval mesh, planar triangulation or triangulated
    sphere, with constructors ``from_points_and_boundary`` (Triangle: a polygon
    with holes and an outer extension, quality controls), ``icosphere``,
    ``regular_grid`` and ``interval``; the mass ``C``, lumped mass ``C̃`` and
    stiffness ``G`` (``gpsparse.mesh.fem``) and the barycentric interpolation
    ``W`` (``gpsparse.mesh.locate``).

cells_in_polygon
:   Indices of the triangles whose centroid lies in a polygon (e.g. the
    barrier triangles of [`BarrierMaternKernel`][gpsparse.kernels.BarrierMaternKernel];
    ``gpsparse.mesh.barrier``).

lonlat_to_cartesian
:   Longitude/latitude in degrees to points on a sphere (for spherical meshes).

The Matérn kernel on a mesh is [`MeshMaternKernel`][gpsparse.kernels.MeshMaternKernel];
its precision structure is ``gpsparse.mesh.spde``.
"""

from gpsparse.mesh.barrier import cells_in_polygon
from gpsparse.mesh.builders import lonlat_to_cartesian
from gpsparse.mesh.mesh import Mesh

__all__ = ["Mesh", "cells_in_polygon", "lonlat_to_cartesian"]
