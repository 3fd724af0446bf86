"""Input bookkeeping shared by gpsparse's kernels: the input cache and batch-shape checks.

Every kernel caches structure derived from its inputs only (an interpolation
matrix, a selection, a sparsity pattern, a node ordering) in a short
most-recently-used list of ``CachedInputs`` entries: the payload, and
what is needed to recognise the inputs again — a weak reference and the
in-place version counter of each input tensor (an O(1) test) and a detached
copy (the O(n·d) fallback, so that a new tensor holding the same inputs still
hits the cache). ``cache_lookup`` and ``cache_insert`` keep the list.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import Tensor

__all__ = ["CachedInputs", "cache_lookup", "cache_insert", "input_version", "same_input", "check_batch_shapes"]

P = TypeVar("P")


def input_version(x: Tensor) -> int:
    """The in-place version counter of ``x`` (``-1`` for inference tensors, which have none)."""
    try:
        return x._version
    except RuntimeError:
        return -1


def same_input(ref: weakref.ref, version: int, copy: Tensor, x: Tensor) -> bool:
    """Whether ``x`` equals the cached input: the same object at the same version, else ``torch.equal`` to ``copy``.

    The identity test is O(1); the fallback compares values in O(n·d) (a new
    tensor holding the same inputs still hits the cache).
    """
    if version >= 0 and ref() is x and input_version(x) == version:
        return True
    return x.shape == copy.shape and x.dtype == copy.dtype and x.device == copy.device and torch.equal(x.detach(), copy)


@dataclass(eq=False)
class CachedInputs(Generic[P]):
    """A payload derived from input tensors, with what is needed to recognise those inputs again.

    Attributes
    ----------
    refs : tuple of weakref.ref
        One weak reference per input (the cache never keeps an input alive).
    versions : tuple of int
        The in-place version counters of the inputs when the entry was built
        (``input_version``).
    copies : tuple of Tensor
        Detached copies of the inputs, for the equality fallback.
    payload : P
        What the kernel derived from the inputs.

    The number of inputs is part of the key: a kernel caches ``(x1,)`` for a
    symmetric call and ``(x1, x2)`` otherwise, and the two never match each
    other.
    """

    refs: tuple[weakref.ref, ...]
    versions: tuple[int, ...]
    copies: tuple[Tensor, ...]
    payload: P

    @classmethod
    def of(cls, inputs: Sequence[Tensor], payload: P) -> CachedInputs[P]:
        """An entry for ``inputs`` (copied, detached) holding ``payload``."""
        return cls(
            refs=tuple(weakref.ref(x) for x in inputs),
            versions=tuple(input_version(x) for x in inputs),
            copies=tuple(x.detach().clone() for x in inputs),
            payload=payload,
        )

    def matches(self, inputs: Sequence[Tensor], *, any_dtype: bool = False) -> bool:
        """Whether ``inputs`` are the inputs of this entry (``same_input`` for each).

        ``any_dtype=True`` compares the values after casting the stored copy to
        each input's dtype (node ids given as integers or as floats).
        """
        if len(inputs) != len(self.copies):
            return False
        for ref, version, copy, x in zip(self.refs, self.versions, self.copies, inputs):
            if not same_input(ref, version, copy.to(x.dtype) if any_dtype else copy, x):
                return False
        return True


def cache_lookup(
    cache: list[CachedInputs[P]],
    inputs: Sequence[Tensor],
    *,
    accept: Callable[[P], bool] | None = None,
    evict_rejected: bool = False,
    any_dtype: bool = False,
) -> CachedInputs[P] | None:
    """The most recent entry of ``cache`` built for ``inputs`` whose payload passes ``accept``, moved to the front.

    An entry with matching inputs whose payload ``accept`` rejects is skipped
    (another entry for the same inputs may follow), or, with
    ``evict_rejected=True``, removed and the search ends (the caller rebuilds
    it). Returns ``None`` on a miss.
    """
    for k, entry in enumerate(cache):
        if not evict_rejected and accept is not None and not accept(entry.payload):
            continue  # the cheap payload test first
        if not entry.matches(inputs, any_dtype=any_dtype):
            continue
        if accept is None or accept(entry.payload):
            cache.insert(0, cache.pop(k))
            return entry
        if evict_rejected:
            del cache[k]
            return None
    return None


def cache_insert(cache: list[CachedInputs[P]], entry: CachedInputs[P], size: int) -> CachedInputs[P]:
    """Put ``entry`` first in ``cache`` and keep at most ``size`` entries; returns ``entry``."""
    cache.insert(0, entry)
    del cache[size:]
    return entry


def check_batch_shapes(x1: Tensor, x2: Tensor, batch_shape: torch.Size) -> None:
    """Raise ``ValueError`` unless the batch shapes of ``x1 (*b1, n, d)``, ``x2 (*b2, m, d)`` and the kernel agree."""
    try:
        torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], batch_shape)
    except RuntimeError:
        raise ValueError(
            f"batch shapes of x1 {tuple(x1.shape[:-2])}, x2 {tuple(x2.shape[:-2])} and the kernel "
            f"{tuple(batch_shape)} do not broadcast"
        ) from None
