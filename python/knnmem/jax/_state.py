"""The memory grid as a pytree: MemoryState, init, count, add, reset, and the argument
checks the other modules share.

The state is the ring layout of knnmem.ops (keys [*shape, capacity, key_dim], values
[*shape, capacity, value_dim], written [*shape]): row p of a memory's stream lives in
slot slot_of[p % capacity]. A memory whose capacity is spread over a mesh axis of D
devices (``capacity_axis``) is D interleaved rings: row p of the stream goes to ring
p % D, each an ordinary ring of capacity / D slots.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._arrays import as_array, check_int
from .._contract import METRICS, check_sizes, normalize_shape, select_cells
from ._reference import _slot_table

# -- the state -------------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["keys", "values", "written"],
    meta_fields=["metric"],
)
@dataclasses.dataclass(frozen=True)
class MemoryState:
    """A grid of FIFO key/value memories (a pytree; ``metric`` is static).

    keys    [*shape, capacity, key_dim]   float32
    values  [*shape, capacity, value_dim] float32
    written [*shape] int32 (int64 with jax_enable_x64): rows added since the last reset.
            With int32 counters a memory takes at most 2**31 - 1 rows between resets.
    """

    keys: Any
    values: Any
    written: Any
    metric: str = "ip"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.written.shape)

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[-2])

    @property
    def key_dim(self) -> int:
        return int(self.keys.shape[-1])

    @property
    def value_dim(self) -> int:
        return int(self.values.shape[-1])

    def replace(self, **changes: Any) -> MemoryState:
        return dataclasses.replace(self, **changes)


def _index_dtype() -> Any:
    return jnp.int64 if jax.config.jax_enable_x64 else jnp.int32


def init(
    shape: int | tuple[int, ...],
    capacity: int,
    key_dim: int,
    value_dim: int | None = None,
    metric: str = "ip",
    *,
    capacity_shards: int = 1,
) -> MemoryState:
    """An empty grid. For a memory spread over a mesh axis of D devices (``capacity_axis``
    in add/search), capacity must be a multiple of D: this is the global state, whose
    capacity axis is to be sharded over that mesh axis (see :func:`partition_specs`)."""
    shape = normalize_shape(shape)
    capacity, key_dim, value_dim = check_sizes(capacity, key_dim, value_dim)
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    capacity_shards = check_int(capacity_shards, "capacity_shards", minimum=1)
    if capacity % capacity_shards:
        raise ValueError(
            f"capacity: expected a multiple of capacity_shards={capacity_shards}, got {capacity}"
        )
    return MemoryState(
        jnp.zeros((*shape, capacity, key_dim), jnp.float32),
        jnp.zeros((*shape, capacity, value_dim), jnp.float32),
        jnp.zeros(shape, _index_dtype()),
        metric,
    )


def count(state: MemoryState) -> jax.Array:
    """Rows held per memory, [*shape] (for a capacity-sharded state: of the global memory,
    when called outside shard_map)."""
    return jnp.minimum(state.written, state.capacity)


# -- argument checks (shared by search, sharding and attention) ------------------------------


def _check_state(state: Any, name: str = "state") -> MemoryState:
    if not isinstance(state, MemoryState):
        raise TypeError(f"{name}: expected a knnmem.jax.MemoryState, got {type(state).__name__}")
    for arr, what in ((state.keys, "keys"), (state.values, "values"), (state.written, "written")):
        if not all(hasattr(arr, a) for a in ("shape", "ndim", "dtype")):
            raise TypeError(f"{name}.{what}: expected an array, got {type(arr).__name__}")
    shape = state.shape
    for arr, what in ((state.keys, "keys"), (state.values, "values")):
        if arr.ndim != len(shape) + 2 or tuple(arr.shape[: len(shape)]) != shape:
            raise ValueError(
                f"{name}.{what}: expected shape (*written.shape={shape}, capacity, dim), "
                f"got {tuple(arr.shape)}"
            )
        if arr.shape[-1] == 0:
            raise ValueError(f"{name}.{what}: expected dim >= 1, got shape {tuple(arr.shape)}")
        if arr.dtype != jnp.float32:
            raise TypeError(f"{name}.{what}: expected dtype float32, got {arr.dtype}")
    if state.values.shape[-2] != state.keys.shape[-2]:
        raise ValueError(
            f"{name}.values: expected capacity {state.keys.shape[-2]} (as keys), "
            f"got shape {tuple(state.values.shape)}"
        )
    if not jnp.issubdtype(state.written.dtype, jnp.integer):
        raise TypeError(f"{name}.written: expected an integer array, got {state.written.dtype}")
    if state.metric not in METRICS:
        raise ValueError(f"{name}.metric: expected one of {METRICS}, got {state.metric!r}")
    return state


def _as_array(x: Any, name: str) -> Any:
    """x as an array with a message naming the argument where it cannot be one (other
    than JAX arrays and tracers, inputs go through numpy: lists, torch tensors, ...)."""
    return x if isinstance(x, jax.Array) else as_array(x, name)


def _check_rows(
    x: Any, name: str, shape: tuple, rows: int | None, dim: int, dim_name: str, rows_name="T"
):
    x = _as_array(x, name)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    x = jnp.asarray(x)
    n = len(shape)
    if (
        x.ndim != n + 2
        or tuple(x.shape[:n]) != shape
        or (rows is not None and x.shape[-2] != rows)
        or x.shape[-1] != dim
    ):
        spelled = ", ".join(
            [
                *map(str, shape),
                rows_name if rows is None else f"{rows_name}={rows}",
                f"{dim_name}={dim}",
            ]
        )
        raise ValueError(f"{name}: expected shape ({spelled}), got {tuple(x.shape)}")
    return x.astype(jnp.float32)


def _leaves(x: Any) -> list:
    return [y for part in x for y in _leaves(part)] if isinstance(x, (tuple, list)) else [x]


def _select_cells(which: Any, shape: tuple, distinct: bool = False) -> tuple[Any, tuple]:
    """(flat int32 indices of the memories `which` selects, in numpy's order, and the
    sub-grid's shape), or (None, shape) for which=None. `which` is what numpy takes to
    index a [*shape] array (a bool mask of the grid's shape, ints, int arrays, slices, a
    tuple of them), and must be concrete: its size sets the shapes of the inputs and
    results, which are static under jit."""
    if which is None:
        return None, shape
    if any(isinstance(x, jax.core.Tracer) for x in _leaves(which)):
        raise TypeError(
            "which: expected concrete indices or a bool mask (numpy or Python values: the "
            "selection sets the shapes, which are static under jit), got a traced array"
        )
    cells, sub_shape = select_cells(which, shape)
    if distinct:
        order = np.argsort(cells, kind="stable")
        twice = np.flatnonzero(np.diff(cells[order]) == 0)
        if twice.size:
            i, j = order[twice[0]], order[twice[0] + 1]
            raise ValueError(
                f"which: memory {cells[i]} is selected twice (at {i} and {j}); an add "
                "writes each memory once"
            )
    return cells.astype(np.int32), sub_shape


# -- the rings of a capacity-sharded memory --------------------------------------------------


def _shard_position(capacity_axis: Any) -> tuple[Any, int]:
    """(this device's index, number of devices) along the capacity axis, or (0, 1)."""
    if capacity_axis is None:
        return 0, 1
    return lax.axis_index(capacity_axis), lax.axis_size(capacity_axis)


def _check_capacity_axis(capacity_axis: Any) -> None:
    """ValueError unless capacity_axis is None or names an axis bound here (inside
    shard_map), checked at trace time instead of failing inside the jitted function."""
    if capacity_axis is None:
        return
    try:
        hash(capacity_axis)
        lax.axis_size(capacity_axis)
    except (TypeError, NameError, ValueError) as e:
        raise ValueError(
            f"capacity_axis: expected the name of a mesh axis of the enclosing shard_map, got "
            f"{capacity_axis!r} ({e})"
        ) from None


def _local_written(written: jax.Array, shard: Any, shards: int) -> jax.Array:
    """Rows of the global stream that went to ring `shard` of `shards` (row p -> p % shards)."""
    if shards == 1:
        return written
    return jnp.maximum(written - shard + (shards - 1), 0) // shards


# -- add / reset -----------------------------------------------------------------------------


def add(
    state: MemoryState, keys: Any, values: Any, *, capacity_axis: Any = None, which: Any = None
) -> MemoryState:
    """Appends keys [*shape, T, key_dim] and values [*shape, T, value_dim] to every memory
    (FIFO: a segment longer than the capacity keeps its last rows; counters advance by T).

    A scatter of the new rows into their slots: under jit with the state donated it
    updates the buffers in place, so its cost is O(T) whatever the capacity. No gradient
    flows into the memory. With ``capacity_axis`` (inside shard_map) each device writes
    only the rows of the segment that its ring owns.

    which: add to some memories only -- a bool mask of the grid's shape, or indices as
    numpy takes them for a [*shape] array; concrete (not traced), each memory at most
    once. keys and values then have the sub-grid's shape in place of the grid's. The
    new state differs from the old in the selected memories' rows and counters only;
    the scatter touches those rows alone (O(T) per selected memory, nothing per other
    memory) and is in place under donation."""
    state = _check_state(state)
    _check_capacity_axis(capacity_axis)
    cells, shape = _select_cells(which, state.shape, distinct=True)
    keys = _check_rows(keys, "keys", shape, None, state.key_dim, "key_dim")
    t = keys.shape[-2]
    values = _check_rows(values, "values", shape, t, state.value_dim, "value_dim")
    if t == 0 or (cells is not None and cells.size == 0):
        return state
    return _add(state, keys, values, cells, capacity_axis=capacity_axis)


@functools.partial(jax.jit, static_argnames="capacity_axis")
def _add(state: MemoryState, keys: jax.Array, values: jax.Array, cells: Any, capacity_axis: Any):
    keys, values = lax.stop_gradient(keys), lax.stop_gradient(values)
    g = math.prod(state.shape)
    n = g if cells is None else cells.shape[0]  # memories written
    t = keys.shape[-2]
    keys = keys.reshape(n, t, state.key_dim)
    values = values.reshape(n, t, state.value_dim)
    cap = state.capacity  # of this device's ring
    shard, shards = _shard_position(capacity_axis)
    all_written = state.written.reshape(g)
    written = all_written if cells is None else all_written[cells]  # [n]
    local0 = _local_written(written, shard, shards)
    if shards == 1:
        # the last min(T, capacity) rows, at stream offsets written + t
        m = min(t, cap)
        rows = jnp.arange(t - m, t, dtype=written.dtype)
        take = rows
        slot_rows = local0[..., None] + rows
        valid = None
    else:
        # rows t = t0 + j * D of the segment belong to this ring (t0 = (shard - written) % D)
        m = -(-t // shards)
        j = jnp.arange(m, dtype=written.dtype)
        t0 = (shard - written) % shards
        take = t0[..., None] + shards * j  # [n, m]
        mine = _local_written(written + t, shard, shards) - local0  # rows this ring gets
        valid = (take < t) & (j >= mine[..., None] - cap)
        slot_rows = local0[..., None] + j
        take = jnp.minimum(take, t - 1)
    slot_of = jnp.asarray(_slot_table(cap))
    slots = slot_of[(slot_rows % cap).astype(jnp.int32)]
    if valid is not None:
        slots = jnp.where(valid, slots, cap)  # out of bounds: dropped
        new_k = jnp.take_along_axis(keys, take[..., None].astype(jnp.int32), axis=-2)
        new_v = jnp.take_along_axis(values, take[..., None].astype(jnp.int32), axis=-2)
    else:
        new_k = keys[..., t - m :, :]
        new_v = values[..., t - m :, :]

    ids = jnp.arange(g, dtype=jnp.int32) if cells is None else cells
    cell = jnp.broadcast_to(ids[:, None], (n, m))
    mode = "drop" if valid is not None else "promise_in_bounds"
    kk = state.keys.reshape(g, cap, state.key_dim)
    vv = state.values.reshape(g, cap, state.value_dim)
    kk = kk.at[cell, slots].set(new_k, mode=mode, unique_indices=valid is None)
    vv = vv.at[cell, slots].set(new_v, mode=mode, unique_indices=valid is None)
    step = jnp.asarray(t, written.dtype)
    if cells is None:
        all_written = all_written + step
    else:
        all_written = all_written.at[cells].add(step, unique_indices=True)
    return state.replace(
        keys=kk.reshape(state.keys.shape),
        values=vv.reshape(state.values.shape),
        written=all_written.reshape(state.shape),
    )


def reset(state: MemoryState, mask: Any = None) -> MemoryState:
    """Clears the memories where mask is True (all when mask is None): O(1) each, the rows
    stay in the buffers but are no longer live. mask: bool [*shape], or a leading prefix
    of shape (e.g. [batch] for a (batch, heads) grid), broadcast over the rest."""
    state = _check_state(state)
    if mask is None:
        return state.replace(written=jnp.zeros_like(state.written))
    mask = jnp.asarray(_as_array(mask, "mask"))
    shape = state.shape
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask: expected a bool array, got dtype {mask.dtype}")
    if mask.ndim > len(shape) or tuple(mask.shape) != shape[: mask.ndim]:
        raise ValueError(
            f"mask: expected shape {shape} or a leading prefix of it, got {tuple(mask.shape)}"
        )
    mask = mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
    return state.replace(written=jnp.where(mask, jnp.zeros_like(state.written), state.written))
