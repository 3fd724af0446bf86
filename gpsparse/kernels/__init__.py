"""GPyTorch kernels that return sparse operators (adapters, DESIGN.md §1).

WendlandKernel
    Compactly supported Wendland φ₃,₁ covariance (inputs of dimension ≤ 3)
    as a :class:`~gpsparse.SparseLinearOperator`, with a cached grid
    neighbour-search pattern.
"""

from gpsparse.kernels.wendland import WendlandKernel, wendland_phi31

__all__ = ["WendlandKernel", "wendland_phi31"]
