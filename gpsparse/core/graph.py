"""Graph Laplacians of undirected weighted graphs (core layer: scipy and torch only).

:func:`graph_laplacian` builds ``L = D − A`` or the normalised
``I − D^{-1/2} A D^{-1/2}`` (isolated nodes get a zero row and column) from
edge lists, torch or SciPy sparse adjacency matrices, checking that both
directions of an edge agree. ``scipy.sparse.csgraph.laplacian`` was measured
as an alternative (SciPy 1.17, 1 thread): it gives the same matrices after
dropping explicitly stored zeros and symmetrising the normalised form, but is
2.7–6× slower for ``D − A`` at 10⁵–10⁶ nodes and no faster normalised, and its
``symmetrized=True`` sums ``A + Aᵀ`` (doubling edges given in both directions)
instead of validating them; so gpsparse keeps its own construction and uses
SciPy's ``connected_components`` for the null space.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components
from torch import Tensor

__all__ = ["graph_laplacian", "adjacency", "laplacian_from_adjacency", "null_space"]

#: Relative tolerance of the check that both directions of an edge carry the same weight.
_SYMMETRY_RTOL = 1e-12


# ------------------------------------------------------------------ the graph
def graph_laplacian(graph, num_nodes: int | None = None, *, edge_weight=None, normalized: bool = False):
    r"""The Laplacian of an undirected graph with non-negative edge weights (SciPy CSR, N × N).

    * ``normalized=False``: ``L = D − A`` (``D`` the weighted degrees).
    * ``normalized=True``: ``L = I − D^{−1/2} A D^{−1/2}``, with the rows and
        columns of isolated nodes (degree 0) defined as 0 (so ``L`` stays
        positive semi-definite with eigenvalues in ``[0, 2]``).

    Parameters
    ----------
    graph : Tensor, numpy.ndarray, torch sparse tensor or scipy.sparse matrix/array
        Either an edge index ``(2, E)`` of integer node ids (torch or NumPy;
        ``graph[0, e]`` – ``graph[1, e]`` is edge ``e``) or a sparse adjacency
        matrix ``(N, N)`` whose stored values are the edge weights.
    num_nodes : int, optional
        ``N``. Default: ``max(edge index) + 1``, or the adjacency's size. Nodes
        without edges (isolated nodes) are allowed.
    edge_weight : Tensor or array, optional
        ``(E,)`` non-negative weights of an edge index (default 1).
    normalized : bool
        Symmetric normalised Laplacian instead of ``D − A``.

    Returns
    -------
    scipy.sparse.csr_matrix
        Symmetric positive semi-definite ``L``, sorted indices.

    Notes
    -----
    *Undirected.* An edge given in one direction only is mirrored; an edge
    given in both directions must carry the same weight in both (else
    ``ValueError``). Repeated entries of the same directed edge are summed
    (the multigraph convention of SciPy's and torch's COO formats).
    *Self-loops* are ignored (dropped): in ``D − A`` a loop adds its weight to
    both ``D`` and ``A`` and cancels, and dropping it in the normalised
    Laplacian too keeps both depending on the edges between distinct nodes
    only. Zero weights are dropped. Edge weights are constants (detached).

    Raises
    ------
    TypeError
        A graph of another type (e.g. a dense adjacency matrix).
    ValueError
        A malformed edge index (shape, non-integer dtype, ids out of range),
        negative or non-finite weights, a non-square adjacency, weights that
        differ between the two directions of an edge.

    Examples
    --------
    >>> import torch
    >>> L = graph_laplacian(torch.tensor([[0, 1], [1, 2]]))  # the path 0 – 1 – 2
    >>> L.toarray()
    array([[ 1., -1.,  0.],
           [-1.,  2., -1.],
           [ 0., -1.,  1.]])
    """
    return laplacian_from_adjacency(adjacency(graph, num_nodes, edge_weight), normalized)


def adjacency(graph, num_nodes, edge_weight) -> sp.csr_matrix:
    """Symmetric adjacency without self-loops and zeros (float64 CSR) from an edge index or a sparse matrix."""
    if num_nodes is not None and (int(num_nodes) != num_nodes or num_nodes < 1):
        raise ValueError(f"num_nodes must be a positive integer, got {num_nodes}")
    if sp.issparse(graph) or (isinstance(graph, Tensor) and graph.layout != torch.strided):
        if edge_weight is not None:
            raise ValueError("edge_weight is only used with an edge index; a sparse adjacency holds its own weights")
        adjacency = _from_sparse(graph, num_nodes)
    elif isinstance(graph, (Tensor, np.ndarray)):
        adjacency = _from_edge_index(graph, num_nodes, edge_weight)
    else:
        raise TypeError(
            "graph must be an edge index (an integer torch tensor or NumPy array of shape (2, E)) or a sparse "
            f"adjacency matrix (torch sparse or scipy.sparse), got {type(graph).__name__}"
        )
    adjacency.setdiag(0)  # self-loops are ignored (see graph_laplacian)
    adjacency.eliminate_zeros()
    return _symmetrized(adjacency)


def _from_sparse(graph, num_nodes) -> sp.csr_matrix:
    if isinstance(graph, Tensor):
        coo = graph.detach().to_sparse_coo().coalesce().cpu()
        if coo.dim() != 2:
            raise ValueError(f"a sparse adjacency must be a 2-D (N, N) matrix, got shape {tuple(coo.shape)}")
        row, col = coo.indices().numpy()
        matrix = sp.csr_matrix((coo.values().double().numpy(), (row, col)), shape=tuple(coo.shape))
    else:
        matrix = sp.csr_matrix(graph, dtype=np.float64)
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"a sparse adjacency must be square, got shape {matrix.shape}")
    if num_nodes is not None and int(num_nodes) != matrix.shape[0]:
        raise ValueError(f"num_nodes={num_nodes} but the adjacency has shape {matrix.shape}")
    matrix.sum_duplicates()
    _check_weights(matrix.data)
    return matrix


def _from_edge_index(edge_index, num_nodes, edge_weight) -> sp.csr_matrix:
    index = edge_index.detach().cpu().numpy() if isinstance(edge_index, Tensor) else np.asarray(edge_index)
    if index.ndim != 2 or index.shape[0] != 2:
        raise ValueError(
            f"an edge index must have shape (2, E), got {tuple(index.shape)} (a sparse adjacency must be a torch "
            "sparse tensor or a scipy.sparse matrix; dense adjacency matrices are not accepted: use .to_sparse())"
        )
    if not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"an edge index must have an integer dtype, got {edge_index.dtype}")
    num_edges = index.shape[1]
    if num_edges and index.min() < 0:
        raise ValueError(f"edge index holds a negative node id ({index.min()})")
    largest = int(index.max()) if num_edges else -1
    if num_nodes is None:
        if not num_edges:
            raise ValueError("an empty edge index needs num_nodes")
        num_nodes = largest + 1
    elif largest >= num_nodes:
        raise ValueError(f"edge index holds node id {largest}, out of range for num_nodes={num_nodes}")
    if edge_weight is None:
        weight = np.ones(num_edges)
    else:
        weight = edge_weight.detach().cpu().double().numpy() if isinstance(edge_weight, Tensor) else edge_weight
        weight = np.asarray(weight, dtype=np.float64)
        if weight.shape != (num_edges,):
            raise ValueError(f"edge_weight must have shape (E,) = ({num_edges},), got {weight.shape}")
    _check_weights(weight)
    n = int(num_nodes)
    return sp.csr_matrix((weight, (index[0].astype(np.int64), index[1].astype(np.int64))), shape=(n, n))


def _check_weights(weight: np.ndarray) -> None:
    if not np.isfinite(weight).all():
        raise ValueError("edge weights must be finite")
    if (weight < 0).any():
        raise ValueError(f"edge weights must be non-negative, got {weight.min()}")


def _symmetrized(adjacency: sp.csr_matrix) -> sp.csr_matrix:
    """``max(A, Aᵀ)`` after checking that edges given in both directions agree (see graph_laplacian)."""
    transposed = adjacency.T.tocsr()
    both = adjacency.multiply(transposed != 0).tocoo()  # entries (i, j) whose reverse (j, i) is also given
    reverse = np.asarray(transposed[both.row, both.col]).ravel()
    scale = max(float(np.abs(adjacency.data).max(initial=0.0)), 1.0)
    bad = np.abs(both.data - reverse) > _SYMMETRY_RTOL * scale
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        i, j = int(both.row[k]), int(both.col[k])
        raise ValueError(
            f"the graph must be undirected: edge ({i}, {j}) has weight {both.data[k]} but ({j}, {i}) has weight "
            f"{reverse[k]}"
        )
    result = adjacency.maximum(transposed).tocsr()
    result.sort_indices()
    return result


def laplacian_from_adjacency(adjacency: sp.csr_matrix, normalized: bool) -> sp.csr_matrix:
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    n = adjacency.shape[0]
    if not normalized:
        laplacian = sp.diags(degree) - adjacency
    else:
        connected = degree > 0
        inv_sqrt = np.zeros(n)
        inv_sqrt[connected] = 1.0 / np.sqrt(degree[connected])
        scale = sp.diags(inv_sqrt)
        laplacian = sp.diags(connected.astype(np.float64)) - scale @ adjacency @ scale
        laplacian = 0.5 * (laplacian + laplacian.T)  # exact symmetry despite the order of the products
    laplacian = sp.csr_matrix(laplacian)
    laplacian.sum_duplicates()
    laplacian.sort_indices()
    return laplacian


def null_space(adjacency: sp.csr_matrix, normalized: bool) -> tuple[int, np.ndarray, np.ndarray]:
    """Orthonormal null vectors of ``L``, one per connected component, with disjoint supports.

    Returns ``(c, labels, u)``: the number of components, the component of
    every node ``(N,)`` and the entries ``u (N,)`` of the null vectors
    (``u_C = 1_C / √|C|`` for ``D − A``; ``D^{1/2} 1_C / ‖·‖`` for the
    normalised Laplacian, ``e_i`` for an isolated node).
    """
    count, labels = connected_components(adjacency, directed=False)
    weight = np.ones(adjacency.shape[0])
    if normalized:
        degree = np.asarray(adjacency.sum(axis=1)).ravel()
        weight = np.where(degree > 0, np.sqrt(degree), 1.0)  # isolated nodes are their own component: e_i
    norms = np.sqrt(np.bincount(labels, weights=weight**2, minlength=count))
    return count, labels, weight / norms[labels]


# ---------------------------------------------------------------- the kernel
