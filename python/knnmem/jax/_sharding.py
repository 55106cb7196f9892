"""Sharding helpers: PartitionSpecs for a state, and add / search under jax.shard_map.

Split the grid over a mesh axis (``batch_axis``) and nothing changes: each device
searches its own memories. Spread each memory's capacity over a mesh axis of D devices
(``capacity_axis``) and the memory is D interleaved rings (row p of the stream goes to
device p % D): each device searches its ring with the bins of the global recall target
and the per-device top-k are merged (knnmem/jax/_search.py). Exact searches equal the
unsharded ones; approximate ones have at least the unsharded expected recall.

The same functions run unchanged with one JAX process per host (jax.distributed, a mesh
over every process's devices): each process makes the same calls, holds only the shards
of its own devices, and sees its part of the results (``addressable_shards``).
:func:`sharded_init` allocates a state shard by shard (no host holds the whole grid), and
:func:`save_shards` / :func:`load_shards` checkpoint each process's shards to its own file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .._contract import SearchResult, check_sizes, normalize_shape
from ._search import search
from ._state import MemoryState, _check_state, add, init


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


# -- a state placed shard by shard, and its checkpoint per process ---------------------------


def _axis_size(mesh: Any, axis: Any) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, (tuple, list)) else (axis,)
    return math.prod(mesh.shape[n] for n in names)


def sharded_init(
    mesh: Any,
    shape: int | tuple[int, ...],
    capacity: int,
    key_dim: int,
    value_dim: int | None = None,
    metric: str = "ip",
    *,
    batch_axis: Any = None,
    capacity_axis: Any = None,
) -> MemoryState:
    """An empty grid placed on `mesh` with :func:`partition_specs`: each device allocates
    only its shard, so no process ever holds the whole grid (with one process per host,
    every process makes this call). capacity: of each whole memory, a multiple of the
    size of capacity_axis; the grid's first axis a multiple of the size of batch_axis."""
    _check_mesh_axes(mesh, batch_axis=batch_axis, capacity_axis=capacity_axis)
    shape = normalize_shape(shape)
    capacity, key_dim, value_dim = check_sizes(capacity, key_dim, value_dim)
    shards = _axis_size(mesh, capacity_axis)
    split = _axis_size(mesh, batch_axis)
    if capacity % shards:
        raise ValueError(
            f"capacity: expected a multiple of the size {shards} of "
            f"capacity_axis={capacity_axis!r}, got {capacity}"
        )
    if batch_axis is not None and (not shape or shape[0] % split):
        raise ValueError(
            f"shape: expected a first axis that is a multiple of the size {split} of "
            f"batch_axis={batch_axis!r}, got {shape}"
        )

    def make() -> MemoryState:
        return init(shape, capacity, key_dim, value_dim, metric, capacity_shards=shards)

    abstract = jax.eval_shape(make)  # checks the arguments, allocates nothing
    specs = partition_specs(abstract, batch_axis, capacity_axis)
    out = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    return jax.jit(make, out_shardings=out)()


_SHARDS_FORMAT = "knnmem.jax.shards"
_LEAVES = ("keys", "values", "written")


def _bounds(index: tuple, shape: tuple) -> tuple[tuple[int, int], ...]:
    """A shard's index (a tuple of slices) as ((start, stop), ...) over every dimension."""
    out = []
    for i, dim in enumerate(shape):
        sl = index[i] if i < len(index) else slice(None)
        start, stop, _ = sl.indices(dim)
        out.append((start, stop))
    return tuple(out)


def save_shards(state: MemoryState, path: Any) -> None:
    """Writes the shards of `state` that this process holds (one copy of each, replicas
    skipped) to `path`, an .npz file, atomically. With one process per host, call it on
    every process with a path of its own, e.g. ``f"memory.{jax.process_index()}.npz"``;
    :func:`load_shards` reads it back on the same mesh layout."""
    state = _check_state(state)
    path = os.fspath(path)
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {
        "format": _SHARDS_FORMAT,
        "format_version": 1,
        "metric": state.metric,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
    }
    for name in _LEAVES:
        arr = getattr(state, name)
        if not isinstance(arr, jax.Array):
            raise TypeError(f"state.{name}: expected a jax.Array, got {type(arr).__name__}")
        seen = set()
        for shard in arr.addressable_shards:
            bounds = _bounds(shard.index, arr.shape)
            if bounds in seen:
                continue
            seen.add(bounds)
            n = len(seen) - 1
            arrays[f"{name}.{n}"] = np.asarray(shard.data)
            arrays[f"{name}.{n}.bounds"] = np.array(bounds, np.int64).reshape(-1, 2)
        meta[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "shards": len(seen)}
    arrays["__meta__"] = np.array(json.dumps(meta, sort_keys=True))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_shards(
    path: Any, mesh: Any, *, batch_axis: Any = None, capacity_axis: Any = None
) -> MemoryState:
    """A state written by :func:`save_shards`, placed on `mesh` with the same axes as when
    it was saved. Each process reads its own file; ValueError (naming the path) when the
    file lacks a shard this process's devices need (another mesh layout or process)."""
    _check_mesh_axes(mesh, batch_axis=batch_axis, capacity_axis=capacity_axis)
    path = os.fspath(path)
    not_ours = ValueError(f"path: {path} is not a file written by save_shards")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {name: f[name] for name in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise not_ours from None
    try:
        meta = json.loads(str(data["__meta__"]))
        if meta["format"] != _SHARDS_FORMAT:
            raise KeyError("format")
        version = meta["format_version"]
    except (KeyError, ValueError, TypeError):
        raise not_ours from None
    if version != 1:
        raise ValueError(f"path: {path} has format_version {version}, expected 1")
    shapes = {name: tuple(meta[name]["shape"]) for name in _LEAVES}
    abstract = MemoryState(
        *(jax.ShapeDtypeStruct(shapes[n], np.dtype(meta[n]["dtype"])) for n in _LEAVES),
        meta["metric"],
    )
    specs = partition_specs(abstract, batch_axis, capacity_axis)
    leaves = []
    for name, spec in zip(_LEAVES, (specs.keys, specs.values, specs.written)):
        shape = shapes[name]
        stored = {}
        for n in range(meta[name]["shards"]):
            bounds = tuple(map(tuple, data[f"{name}.{n}.bounds"].tolist()))
            stored[bounds] = data[f"{name}.{n}"]

        def piece(index: tuple, name=name, shape=shape, stored=stored) -> np.ndarray:
            bounds = _bounds(index, shape)
            if bounds not in stored:
                raise ValueError(
                    f"path: {path} holds no shard {bounds} of {name} (saved on another "
                    f"mesh layout or by another process; it holds {sorted(stored)})"
                )
            return stored[bounds]

        leaves.append(jax.make_array_from_callback(shape, NamedSharding(mesh, spec), piece))
    return _check_state(MemoryState(*leaves, meta["metric"]))
