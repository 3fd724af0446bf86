"""GPyTorch kernels that return sparse operators (adapters, DESIGN.md §1).

SparsePrecisionKernel
:   Base class of kernels with covariance ``W Q⁻¹ Wᵀ`` (sparse precision ``Q``);
    hooks GPyTorch's prediction through the posterior precision.

SparsePrecisionAdditiveKernel
:   ``k1 + k2 + …`` of sparse-precision kernels (each possibly in ``ScaleKernel``):
    one block-diagonal precision, trained and predicted through the sparse
    posterior precision; ``component_predictions`` gives each component's
    posterior mean and variance.

LatticeMaternKernel
:   SPDE/Matérn field on a regular 1-, 2- or 3-D grid, ``Q = τ(κ²I + L)^α``,
    read at arbitrary inputs by multilinear interpolation; exact ``log det Q``.

GraphMaternKernel
:   Matérn on the nodes of a graph, ``Q = τ(κ²I + L)^α`` with ``L`` the graph
    Laplacian; inputs are node indices.

MarkovMaternKernel
:   Matérn ν = 1/2, 3/2, 5/2 on 1-D inputs through its exact block-tridiagonal
    state-space precision (exact banded path, O(n)).

WendlandKernel
:   Compactly supported Wendland φ₃,₁ covariance (inputs of dimension ≤ 3)
    as a [`SparseLinearOperator`][gpsparse.SparseLinearOperator], with a cached grid
    neighbour-search pattern.

SpaceTimeKernel
:   Separable space–time field ``k_s · k_t`` with precision ``Q_t ⊗ Q_s``
    (Kronecker structure kept, ``log det Q`` from the factors), observed
    through ``W = W_t ⊙ W_s`` at arbitrary space–time points.

AR1Kernel, OrnsteinUhlenbeckKernel
:   AR(1) chains on a fixed sorted time grid (tridiagonal precision, closed-form
    log det): a regular grid with correlation ``ρ``, or Matérn ν = 1/2 at any knots.

RandomWalkKernel, BesagKernel, BYM2Kernel
:   Intrinsic GMRFs with linear constraints: RW1/RW2 on 1-D knots, the Besag
    (ICAR) field on a graph and the BYM2 area effect (scaled Besag + i.i.d.,
    learnable mixing ``φ`` and precision ``τ``); covariance ``Q⁺`` of the
    constrained field, exact marginal likelihood (generalised determinant,
    conditioning by kriging) and constrained posteriors;
    ``IntrinsicAdditiveKernel`` for their sums with other sparse-precision terms.

MeshMaternKernel
:   SPDE/Matérn field on a triangulated mesh (planar domain with holes, sphere,
    interval; ``gpsparse.mesh``), R-INLA's ``Q = τ²(κ²C̃ + G)C̃⁻¹(κ²C̃ + G)``
    with range/σ parameters, optional non-stationary ``κ(s)``, ``τ(s)`` and
    anisotropy; ``log det Q`` from the first-order factor (exact by CHOLMOD).

BarrierMaternKernel
:   The barrier model (Bakka et al. 2019, R-INLA's ``inla.barrier.pcmatern``) on a
    mesh: a short range ``f·r`` on barrier triangles, so that correlation flows
    around barriers instead of across them.

MaternPrecision
:   The shared structure of ``τ(κ²I + L)^α`` on a fixed sparse Laplacian.

FractionalMaternPrecision
:   ``(κ²I + L)^{−α}`` for a non-integer ``α`` as a sum of ``m + 1`` GMRFs
    (positive partial fractions of ``y^β``, ``gpsparse.core.rational``).
"""

from gpsparse.kernels.barrier import BarrierMaternKernel
from gpsparse.kernels.base import SparsePrecisionAdditiveKernel, SparsePrecisionKernel, is_sparse_precision_kernel
from gpsparse.kernels.fractional import FractionalMaternPrecision
from gpsparse.kernels.graph import GraphMaternKernel, graph_laplacian
from gpsparse.kernels.intrinsic import BesagKernel, BYM2Kernel, IntrinsicAdditiveKernel, RandomWalkKernel
from gpsparse.kernels.lattice import LatticeMaternKernel
from gpsparse.kernels.markov import MarkovMaternKernel
from gpsparse.kernels.mesh import MeshMaternKernel, PCMaternRangePrior, PCMaternSigmaPrior
from gpsparse.kernels.prediction import component_predictions
from gpsparse.kernels.space_time import SpaceTimeKernel
from gpsparse.kernels.spde import MaternPrecision
from gpsparse.kernels.temporal import AR1Kernel, OrnsteinUhlenbeckKernel, TemporalPrecisionKernel
from gpsparse.kernels.wendland import WendlandKernel, wendland_phi31

__all__ = [
    "SparsePrecisionKernel",
    "SparsePrecisionAdditiveKernel",
    "is_sparse_precision_kernel",
    "component_predictions",
    "LatticeMaternKernel",
    "GraphMaternKernel",
    "graph_laplacian",
    "MarkovMaternKernel",
    "MeshMaternKernel",
    "BarrierMaternKernel",
    "PCMaternRangePrior",
    "PCMaternSigmaPrior",
    "RandomWalkKernel",
    "BesagKernel",
    "BYM2Kernel",
    "IntrinsicAdditiveKernel",
    "MaternPrecision",
    "FractionalMaternPrecision",
    "SpaceTimeKernel",
    "AR1Kernel",
    "OrnsteinUhlenbeckKernel",
    "TemporalPrecisionKernel",
    "WendlandKernel",
    "wendland_phi31",
]
