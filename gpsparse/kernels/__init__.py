"""GPyTorch kernels that return sparse operators (adapters, DESIGN.md §1).

SparsePrecisionKernel
    Base class of kernels with covariance ``W Q⁻¹ Wᵀ`` (sparse precision ``Q``);
    hooks GPyTorch's prediction through the posterior precision.

WendlandKernel
    Compactly supported Wendland φ₃,₁ covariance (inputs of dimension ≤ 3)
    as a :class:`~gpsparse.SparseLinearOperator`, with a cached grid
    neighbour-search pattern.
"""

from gpsparse.kernels.base import SparsePrecisionKernel
from gpsparse.kernels.wendland import WendlandKernel, wendland_phi31

__all__ = ["SparsePrecisionKernel", "WendlandKernel", "wendland_phi31"]
