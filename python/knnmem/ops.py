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
from ._arrays import INT64_MAX, as_array, as_float32, check_grid_array, framework_of, index_str
from ._contract import (
    METRICS,
    PRECISIONS,
    SearchResult,
    cells_first,
    check_fields,
    check_row_dtype,
    check_search_args,
    check_sizes,
    normalize_shape,
    prepare_out,
    select_cells,
    wrap_result,
)

__all__ = ["init", "add", "search", "placement"]


def placement(capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(slot_of, offset_of): int32 [capacity]. Row p lands in slot_of[p % capacity];
    offset_of is the inverse permutation."""
    capacity, _, _ = check_sizes(capacity, 1, 1)
    return _core.placement(capacity)


def init(
    shape: int | tuple[int, ...], capacity: int, key_dim: int, value_dim: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zeroed (keys, values, written) for an empty grid of memories."""
    shape = normalize_shape(shape)
    capacity, key_dim, value_dim = check_sizes(capacity, key_dim, value_dim)
    out = []
    for name, dims, dtype in (
        ("keys", (*shape, capacity, key_dim), np.float32),
        ("values", (*shape, capacity, value_dim), np.float32),
        ("written", shape, np.int64),
    ):
        try:
            out.append(np.zeros(dims, dtype))
        except (MemoryError, ValueError):
            raise MemoryError(f"{name}: cannot allocate an array of shape {dims}") from None
    return out[0], out[1], out[2]


def _ring(keys: np.ndarray, values: np.ndarray, written: np.ndarray, in_place: bool = False):
    """Checks the ring's shapes (and, for in-place updates, that reshaping makes views);
    returns (grid shape, keys, values, written) viewed as [G, capacity, key_dim],
    [G, capacity, value_dim], [G]."""
    shape = tuple(written.shape)
    if keys.ndim != len(shape) + 2 or keys.shape[: len(shape)] != shape or 0 in keys.shape[-2:]:
        raise ValueError(
            f"keys: expected shape (*written.shape={shape}, capacity, key_dim) with capacity "
            f"and key_dim >= 1, got {tuple(keys.shape)}"
        )
    capacity = keys.shape[-2]
    if (
        values.ndim != len(shape) + 2
        or values.shape[: len(shape) + 1] != (*shape, capacity)
        or values.shape[-1] == 0
    ):
        spelled = ", ".join([*map(str, shape), f"capacity={capacity}", "value_dim"])
        raise ValueError(f"values: expected shape ({spelled}), got {tuple(values.shape)}")
    if in_place:
        for arr, name in ((keys, "keys"), (values, "values"), (written, "written")):
            if not arr.flags.c_contiguous:
                raise ValueError(f"{name}: expected a C-contiguous array (it is updated in place)")
    grid = int(np.prod(shape, dtype=np.int64))
    return (
        shape,
        keys.reshape(grid, *keys.shape[-2:]),
        values.reshape(grid, *values.shape[-2:]),
        written.reshape(grid),
    )


def _check_written(written: np.ndarray) -> None:
    if written.dtype.kind not in "iu":
        raise TypeError(f"written: expected an integer array, got dtype {written.dtype}")
    if written.size and (written.min() < 0 or written.max() > INT64_MAX):
        bad = written < 0 if written.min() < 0 else written > INT64_MAX
        at = np.unravel_index(int(np.argmax(bad)), written.shape)
        raise ValueError(
            f"written: expected counts in [0, 2**63-1], got {written[at]} at index {index_str(at)}"
        )


def add(
    keys: np.ndarray,
    values: np.ndarray,
    written: np.ndarray,
    new_keys: Any,
    new_values: Any,
    *,
    which: Any = None,
) -> None:
    """Appends new_keys [*shape, T, key_dim] / new_values [*shape, T, value_dim] in
    place (FIFO). keys and values must be writeable C-contiguous float32 numpy arrays,
    written a writeable C-contiguous int64 array; everything is checked before
    anything changes. which: add to selected memories only (as knnmem.Memory.add);
    new_keys and new_values then have the sub-grid's shape. The other memories'
    rows are neither read nor copied."""
    for arr, name, dtype in (
        (keys, "keys", np.float32),
        (values, "values", np.float32),
        (written, "written", np.int64),
    ):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name}: expected a numpy array (updated in place), got {type(arr)}")
        if arr.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {arr.dtype}")
    shape, k, v, w = _ring(keys, values, written, in_place=True)
    _check_written(written)
    cells, shape = select_cells(which, shape)
    nk = as_float32(new_keys, "new_keys")
    nv = as_float32(new_values, "new_values")
    t = check_grid_array(nk, "new_keys", shape, None, k.shape[-1], "T", "key_dim")
    check_grid_array(nv, "new_values", shape, t, v.shape[-1], "T", "value_dim")
    _core.add(k, v, w, cells_first(nk), cells_first(nv), which=cells)


def search(
    keys: Any,
    values: Any,
    written: Any,
    queries: Any,
    *,
    k: int = 32,
    recall_target: float = 0.9,
    metric: str = "ip",
    precision: str = "float32",
    out: SearchResult | None = None,
    fields: Any = None,
    which: Any = None,
    row_dtype: Any = "float32",
) -> SearchResult:
    """knnmem.Memory.search on a caller-owned grid (see the module docstring);
    out, fields, which and row_dtype as there.

    precision: the format keys are scored in -- "float32", or "bfloat16" / "int8",
    which round each key as a knnmem.Memory of that dtype stores it (bins chosen
    as for that dtype) while the returned keys stay the stored float32 rows. The
    rounding is redone every search (O(capacity * key_dim), amortised over the
    queries), so it pays off for blocks of queries, not for one query at a time.
    """
    framework = framework_of(queries)
    keys = as_float32(keys, "keys")
    values = as_float32(values, "values")
    written = np.ascontiguousarray(as_array(written, "written"))
    _check_written(written)
    written = written.astype(np.int64, copy=False)
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    shape, k_, v_, w_ = _ring(keys, values, written)
    k, recall_target = check_search_args(k, recall_target, k_.shape[1])
    fields = check_fields(fields)
    row_dtype = check_row_dtype(row_dtype)
    cells, shape = select_cells(which, shape)
    q = as_float32(queries, "queries")
    nq = check_grid_array(q, "queries", shape, None, k_.shape[-1], "Q", "key_dim")
    core_out, key_dtype, value_dtype = prepare_out(
        out, shape, nq, k, k_.shape[-1], v_.shape[-1], row_dtype
    )
    raw = _core.search(
        k_,
        v_,
        w_,
        cells_first(q),
        k,
        recall_target,
        metric,
        precision,
        out=core_out,
        fields=fields,
        which=cells,
        key_dtype=key_dtype,
        value_dtype=value_dtype,
    )
    return wrap_result(raw, shape, framework, out)
