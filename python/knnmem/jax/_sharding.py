"""Sharding helpers: PartitionSpecs for a state, and add / search under jax.shard_map.

Split the grid over a mesh axis (``batch_axis``) and nothing changes: each device
searches its own memories. Spread each memory's capacity over a mesh axis of D devices
(``capacity_axis``) and the memory is D interleaved rings (row p of the stream goes to
device p % D): each device searches its ring with the bins of the global recall target
and the per-device top-k are merged (knnmem/jax/_search.py). Exact searches equal the
unsharded ones; approximate ones have at least the unsharded expected recall.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from .._contract import SearchResult
from ._search import search
from ._state import MemoryState, _check_state, add


def partition_specs(
    state: MemoryState, batch_axis: Any = None, capacity_axis: Any = None
) -> MemoryState:
    """PartitionSpecs for a state: the first grid axis over ``batch_axis`` (data parallel),
    the capacity axis over ``capacity_axis``. Use them as shard_map in/out specs or with
    NamedSharding to place the state."""
    rest = (None,) * (len(state.shape) - 1)
    ring = P(batch_axis, *rest, capacity_axis, None)
    return MemoryState(ring, ring, P(batch_axis, *rest), state.metric)


def _grid_spec(ndim_extra: int, grid_ndim: int, batch_axis: Any) -> P:
    return P(batch_axis, *((None,) * (grid_ndim - 1 + ndim_extra)))


def _check_mesh_axes(mesh: Any, **axes: Any) -> None:
    """TypeError for a mesh that is not one, ValueError for an axis name it lacks."""
    names = getattr(mesh, "axis_names", None)
    if not isinstance(names, tuple):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    for arg, axis in axes.items():
        for name in axis if isinstance(axis, (tuple, list)) else (axis,):
            if name is not None and name not in names:
                raise ValueError(f"{arg}: expected an axis of the mesh {names}, got {axis!r}")


def sharded_search(
    mesh: Any,
    state: MemoryState,
    queries: Any,
    k: int = 32,
    recall_target: float = 0.9,
    *,
    batch_axis: Any = None,
    capacity_axis: Any = None,
    precision: str = "float32",
    impl: str = "auto",
) -> SearchResult:
    """search() under jax.shard_map over `mesh`: the grid's first axis split over
    batch_axis, the capacity over capacity_axis (queries replicated along it)."""
    state = _check_state(state)
    _check_mesh_axes(mesh, batch_axis=batch_axis, capacity_axis=capacity_axis)
    n = len(state.shape)
    specs = partition_specs(state, batch_axis, capacity_axis)
    res_spec = SearchResult(*(_grid_spec(e, n, batch_axis) for e in (2, 2, 3, 3, 2)))

    def body(s, q):
        return search(
            s, q, k, recall_target, precision=precision, impl=impl, capacity_axis=capacity_axis
        )

    return jax.shard_map(
        body, mesh=mesh, in_specs=(specs, _grid_spec(2, n, batch_axis)), out_specs=res_spec
    )(state, queries)


def sharded_add(
    mesh: Any,
    state: MemoryState,
    keys: Any,
    values: Any,
    *,
    batch_axis: Any = None,
    capacity_axis: Any = None,
) -> MemoryState:
    """add() under jax.shard_map over `mesh` (see :func:`sharded_search`)."""
    state = _check_state(state)
    _check_mesh_axes(mesh, batch_axis=batch_axis, capacity_axis=capacity_axis)
    n = len(state.shape)
    specs = partition_specs(state, batch_axis, capacity_axis)
    rows = _grid_spec(2, n, batch_axis)

    def body(s, kk, vv):
        return add(s, kk, vv, capacity_axis=capacity_axis)

    return jax.shard_map(body, mesh=mesh, in_specs=(specs, rows, rows), out_specs=specs)(
        state, keys, values
    )
