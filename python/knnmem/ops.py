"""Functional search on caller-owned arrays.

A memory grid here is three arrays in the ring layout the core uses, so a
framework that keeps its own state (a JAX pytree, torch buffers) runs the same
kernels on it:

    keys    [*shape, capacity, key_dim]    float32
    values  [*shape, capacity, value_dim]  float32
    written [*shape]                       int64, rows added since the last clear

Row p of a memory's stream lives in slot ``slot_of[p % capacity]`` (see
:func:`placement`). ``init`` makes an empty grid, ``add`` appends in place,
``search`` answers queries; results equal those of a knnmem.Memory fed the
same rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core
from ._arrays import as_float32, check_grid_array, framework_of
from .memory import METRICS, SearchResult, check_search_args, normalize_shape, wrap_result

__all__ = ["init", "add", "search", "placement"]


def placement(capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(slot_of, offset_of): int32 [capacity]. Row p lands in slot_of[p % capacity];
    offset_of is the inverse permutation."""
    return _core.placement(capacity)


def init(
    shape: int | tuple[int, ...], capacity: int, key_dim: int, value_dim: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zeroed (keys, values, written) for an empty grid of memories."""
    shape = normalize_shape(shape)
    value_dim = key_dim if value_dim is None else value_dim
    return (
        np.zeros((*shape, capacity, key_dim), np.float32),
        np.zeros((*shape, capacity, value_dim), np.float32),
        np.zeros(shape, np.int64),
    )


def _flat(keys: np.ndarray, values: np.ndarray, written: np.ndarray):
    shape = tuple(written.shape)
    if keys.ndim != len(shape) + 2 or keys.shape[: len(shape)] != shape:
        raise ValueError(
            f"keys: expected shape (*written.shape={shape}, capacity, key_dim), "
            f"got {tuple(keys.shape)}"
        )
    grid = int(np.prod(shape, dtype=np.int64))
    capacity, key_dim = keys.shape[-2:]
    check_grid_array(values, "values", shape, capacity, values.shape[-1], "capacity", "value_dim")
    return (
        shape,
        keys.reshape(grid, capacity, key_dim),
        values.reshape(grid, capacity, values.shape[-1]),
        written.reshape(grid),
    )


def add(
    keys: np.ndarray,
    values: np.ndarray,
    written: np.ndarray,
    new_keys: Any,
    new_values: Any,
) -> None:
    """Appends new_keys [*shape, T, key_dim] / new_values [*shape, T, value_dim] in
    place (FIFO). keys, values must be writeable C-contiguous float32 numpy arrays
    and written a writeable int64 array; they are checked before anything changes."""
    for arr, name in ((keys, "keys"), (values, "values"), (written, "written")):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name}: expected a numpy array (updated in place), got {type(arr)}")
    shape, k, v, w = _flat(keys, values, written)
    nk = as_float32(new_keys, "new_keys")
    nv = as_float32(new_values, "new_values")
    t = check_grid_array(nk, "new_keys", shape, None, k.shape[-1], "T", "key_dim")
    check_grid_array(nv, "new_values", shape, t, v.shape[-1], "T", "value_dim")
    grid = w.shape[0]
    _core.add(k, v, w, nk.reshape(grid, t, -1), nv.reshape(grid, t, -1))


def search(
    keys: Any,
    values: Any,
    written: Any,
    queries: Any,
    *,
    k: int = 32,
    recall_target: float = 0.9,
    metric: str = "ip",
) -> SearchResult:
    """knnmem.Memory.search on a caller-owned grid (see the module docstring)."""
    framework = framework_of(queries)
    keys = as_float32(keys, "keys")
    values = as_float32(values, "values")
    written = np.ascontiguousarray(np.asarray(written))
    if written.dtype.kind not in "iu":
        raise TypeError(f"written: expected an integer array, got dtype {written.dtype}")
    written = written.astype(np.int64, copy=False)
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    shape, k_, v_, w_ = _flat(keys, values, written)
    k, recall_target = check_search_args(k, recall_target, k_.shape[1])
    q = as_float32(queries, "queries")
    nq = check_grid_array(q, "queries", shape, None, k_.shape[-1], "Q", "key_dim")
    raw = _core.search(k_, v_, w_, q.reshape(w_.shape[0], nq, -1), k, recall_target, metric)
    return wrap_result(raw, shape, framework)
