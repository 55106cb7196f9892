"""The argument contract every front end shares: names of key dtypes, precisions and
metrics, the SearchResult type, and the rules for grid shapes, sizes, k and
recall_target. knnmem.Memory, knnmem.ops, the JAX and PyTorch front ends and the file
loader all check their arguments here (the C++ core checks again what its kernels rely
on), so a rule and its message live in one place."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from . import _core
from ._arrays import INT64_MAX, check_int, int_str, to_framework

KEY_DTYPES = ("float32", "bfloat16", "float16", "int8")
# Formats a search can score float32 rows in (knnmem.ops / jax / torch precision=).
PRECISIONS = ("float32", "bfloat16", "int8")
METRICS = ("ip", "cosine", "l2")


class SearchResult(NamedTuple):
    """Top-k of each query, best first. Shapes for queries [*shape, Q, key_dim]:

    scores  [*shape, Q, k] float32; -inf where no entry. For metric "l2" the
            score is the negated squared distance (higher is nearer).
    indices [*shape, Q, k] int64: position of the row in its memory's stream
            (0 = first row added since the last clear); -1 where no entry.
    keys    [*shape, Q, k, key_dim] float32 (zeros where no entry).
    values  [*shape, Q, k, value_dim] float32 (zeros where no entry).
    mask    [*shape, Q, k] bool: False where no entry (fewer than k rows held).
    """

    scores: Any
    indices: Any
    keys: Any
    values: Any
    mask: Any


def normalize_shape(shape: Any) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(
            f"shape: expected an int or a tuple of ints, got {type(shape).__name__}"
        ) from None
    if len(dims) == 0:
        raise ValueError("shape: expected at least one grid dimension, got ()")
    dims = tuple(check_int(d, "shape", minimum=1, maximum=2**256) for d in dims)
    if math.prod(dims) > INT64_MAX:
        raise MemoryError(
            f"shape: a grid of {int_str(math.prod(dims))} memories cannot be allocated"
        )
    return dims


MAX_CAPACITY = 2**31 - 1  # slots are int32 in the placement tables


def check_sizes(capacity: Any, key_dim: Any, value_dim: Any) -> tuple[int, int, int]:
    """(capacity, key_dim, value_dim) as ints; value_dim None means key_dim."""
    capacity = check_int(capacity, "capacity", minimum=1, maximum=MAX_CAPACITY)
    key_dim = check_int(key_dim, "key_dim", minimum=1)
    value_dim = key_dim if value_dim is None else check_int(value_dim, "value_dim", minimum=1)
    return capacity, key_dim, value_dim


def check_recall_target(recall_target: Any) -> float:
    """recall_target converted to a float: TypeError for non-numbers (bool included).
    The range rule, (0, 1], is the core's (knnmem._core.check_search_options /
    bins_for_search), applied by whatever the value is passed to; only ints beyond a
    float's range, which the core cannot be given, are refused here."""
    real = (int, float, np.integer, np.floating)
    if isinstance(recall_target, (bool, np.bool_)) or not isinstance(recall_target, real):
        raise TypeError(
            f"recall_target: expected a number in (0, 1], got {type(recall_target).__name__}"
        )
    if isinstance(recall_target, (int, np.integer)):
        value = int(recall_target)
        try:
            return float(value)
        except OverflowError:
            shown = int_str(value)
            raise ValueError(f"recall_target: expected a number in (0, 1], got {shown}") from None
    return float(recall_target)


def check_search_args(k: Any, recall_target: Any, capacity: int) -> tuple[int, float]:
    """(k, recall_target) converted and checked against the core's rules."""
    k = check_int(k, "k", maximum=None)
    recall_target = check_recall_target(recall_target)
    if not -INT64_MAX - 1 <= k <= INT64_MAX:  # beyond what the core can be given
        raise ValueError(f"k: expected an integer in [1, capacity={capacity}], got {int_str(k)}")
    _core.check_search_options(k, recall_target, capacity)
    return k, recall_target


def wrap_result(raw: tuple, shape: tuple[int, ...], framework: str) -> SearchResult:
    """Reshapes the core's [G, Q, k, ...] arrays to [*shape, Q, k, ...]."""
    out = []
    for arr in raw:
        arr = arr.reshape(shape + arr.shape[1:])
        out.append(to_framework(arr, framework))
    scores, indices, keys, values, mask = out
    return SearchResult(scores, indices, keys, values, mask)
