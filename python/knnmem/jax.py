"""knnmem for JAX: a memory grid as a pytree, searched by an XLA custom call.

    import knnmem.jax as kj
    state = kj.init((batch, heads), capacity=65536, key_dim=128)
    state = kj.add(state, keys, values)              # [*shape, T, d]; in place under donation
    res = kj.search(state, queries, k=32, recall_target=0.9)
    res.scores, res.indices, res.keys, res.values, res.mask    # like knnmem.Memory.search
    state = kj.reset(state, new_document)            # bool [*shape] (or a leading prefix)

Every function is pure and works under jit, vmap (extra leading batch dimensions on the
state and/or the queries), lax.scan and shard_map. The state is the ring layout of
knnmem.ops (keys [*shape, capacity, key_dim], values [*shape, capacity, value_dim],
written [*shape]): row p of a memory's stream lives in slot slot_of[p % capacity], so
a state fed the same rows as a knnmem.Memory gives bit-identical search results.

search is the XLA FFI custom call ``knnmem_search`` on CPU: its handler (bindings/
xla_ffi.cpp, part of knnmem._core) runs the same C++ kernels as knnmem.ops.search on
XLA's buffers, zero-copy. On TPU it is a Pallas kernel (knnmem.pallas, docs/pallas.md).
Other backends (until the CUDA kernels land) run :func:`search_reference`, a pure-JAX
implementation of the same strided-bin algorithm, which is also the reference the tests
compare the custom call and the kernel against.

Gradients: a search is a constant with respect to the memory. Indices, mask and the
retrieved keys and values carry no gradient into the memory; ``res.scores`` is
differentiable with respect to the queries (the score of each retrieved key, recomputed
for the tangent), so a loss over memory attention trains the query projection, as in
Memorizing Transformers. :func:`memorizing_attention` is that layer.

Sharding (inside jax.shard_map; see :func:`sharded_search` for a wrapper): split the
grid over a mesh axis and nothing changes (each device searches its own memories). To
spread one memory's capacity over a mesh axis of D devices, pass ``capacity_axis``: the
memory is then D interleaved rings (row p of the stream goes to device p % D), each
device searches its ring with the bins of the global recall target, and the per-device
top-k are merged. Exact searches equal the unsharded ones; approximate ones have at least
the unsharded expected recall.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from . import _core
from ._arrays import as_array, check_int
from .memory import (
    METRICS,
    PRECISIONS,
    SearchResult,
    check_search_args,
    check_sizes,
    normalize_shape,
)

__all__ = [
    "MemoryState",
    "SearchResult",
    "init",
    "add",
    "reset",
    "search",
    "search_reference",
    "count",
    "memorizing_attention",
    "partition_specs",
    "sharded_add",
    "sharded_search",
    "ffi_available",
]

PLACEMENT_BLOCK = int(_core.PLACEMENT_BLOCK)
_FFI_TARGET = "knnmem_search"
_FFI_ABI_VERSION = 2
IMPLS = ("auto", "ffi", "reference", "pallas")


# -- the custom call -----------------------------------------------------------------------


def _register_ffi() -> str | None:
    """Registers the CPU handler exported by knnmem._core; returns why not, or None."""
    try:
        lib = ctypes.CDLL(_core.__file__)
        handler = lib.KnnmemSearch
        version = lib.KnnmemFfiAbiVersion
    except (OSError, AttributeError):
        return "knnmem._core was built without the XLA FFI handlers (jax was not found)"
    version.restype = ctypes.c_int64
    if version() != _FFI_ABI_VERSION:
        return f"knnmem._core has FFI ABI {version()}, knnmem.jax expects {_FFI_ABI_VERSION}"
    jax.ffi.register_ffi_target(_FFI_TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    return None


_FFI_MISSING = _register_ffi()


def _register_ffi_cuda() -> str | None:
    """Registers the CUDA handler exported by knnmem._cuda; returns why not, or None."""
    from . import cuda as _kcuda

    if not _kcuda.built():
        return _kcuda.unavailable_reason()
    try:
        lib = ctypes.CDLL(_kcuda._cuda.__file__)
        handler = lib.KnnmemSearchCuda
    except (OSError, AttributeError):
        return "knnmem._cuda was built without the XLA FFI handler (jax was not found)"
    jax.ffi.register_ffi_target(_FFI_TARGET_CUDA, jax.ffi.pycapsule(handler), platform="CUDA")
    return None


_FFI_TARGET_CUDA = "knnmem_search_cuda"
_FFI_CUDA_MISSING = _register_ffi_cuda()


def ffi_cuda_available() -> bool:
    """True when the CUDA custom call is registered (knnmem._cuda built with jax's headers)."""
    return _FFI_CUDA_MISSING is None


def ffi_available() -> bool:
    """True when the CPU custom call is registered (knnmem._core built with jax's headers)."""
    return _FFI_MISSING is None


# -- state ---------------------------------------------------------------------------------


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


# -- add / reset ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _slot_table(capacity: int) -> np.ndarray:
    return np.asarray(_core.placement(capacity)[0])


@functools.lru_cache(maxsize=32)
def _offset_table(capacity: int) -> np.ndarray:
    return np.asarray(_core.placement(capacity)[1])


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


def add(state: MemoryState, keys: Any, values: Any, *, capacity_axis: Any = None) -> MemoryState:
    """Appends keys [*shape, T, key_dim] and values [*shape, T, value_dim] to every memory
    (FIFO: a segment longer than the capacity keeps its last rows; counters advance by T).

    A scatter of the new rows into their slots: under jit with the state donated it
    updates the buffers in place, so its cost is O(T) whatever the capacity. No gradient
    flows into the memory. With ``capacity_axis`` (inside shard_map) each device writes
    only the rows of the segment that its ring owns."""
    state = _check_state(state)
    _check_capacity_axis(capacity_axis)
    shape = state.shape
    keys = _check_rows(keys, "keys", shape, None, state.key_dim, "key_dim")
    t = keys.shape[-2]
    values = _check_rows(values, "values", shape, t, state.value_dim, "value_dim")
    if t == 0:
        return state
    return _add(state, keys, values, capacity_axis=capacity_axis)


@functools.partial(jax.jit, static_argnames="capacity_axis")
def _add(state: MemoryState, keys: jax.Array, values: jax.Array, capacity_axis: Any):
    keys, values = lax.stop_gradient(keys), lax.stop_gradient(values)
    shape = state.shape
    t = keys.shape[-2]
    cap = state.capacity  # of this device's ring
    shard, shards = _shard_position(capacity_axis)
    written = state.written
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
        take = t0[..., None] + shards * j  # [*shape, m]
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

    g = math.prod(shape)
    flat_slots = slots.reshape(g, m)
    cell = jnp.broadcast_to(jnp.arange(g, dtype=jnp.int32)[:, None], (g, m))
    mode = "drop" if valid is not None else "promise_in_bounds"
    kk = state.keys.reshape(g, cap, state.key_dim)
    vv = state.values.reshape(g, cap, state.value_dim)
    kk = kk.at[cell, flat_slots].set(
        new_k.reshape(g, m, state.key_dim), mode=mode, unique_indices=valid is None
    )
    vv = vv.at[cell, flat_slots].set(
        new_v.reshape(g, m, state.value_dim), mode=mode, unique_indices=valid is None
    )
    return state.replace(
        keys=kk.reshape(state.keys.shape),
        values=vv.reshape(state.values.shape),
        written=written + jnp.asarray(t, written.dtype),
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


# -- search: reference implementation ------------------------------------------------------


def _scores(queries: jax.Array, keys: jax.Array, metric: str, q_sq: Any = None) -> jax.Array:
    """[G, Q, C] scores as the core defines them (q_sq: |q|^2 of the queries before any
    rounding; by default of the queries given)."""
    dot = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)
    if metric == "ip":
        return dot("gqd,gcd->gqc", queries, keys)
    if q_sq is None:
        q_sq = jnp.sum(queries * queries, -1)
    k_sq = jnp.sum(keys * keys, -1)
    if metric == "cosine":
        q = queries * jnp.where(q_sq > 0, lax.rsqrt(jnp.where(q_sq > 0, q_sq, 1)), 0)[..., None]
        inv_k = jnp.where(k_sq > 0, lax.rsqrt(jnp.where(k_sq > 0, k_sq, 1)), 0)
        return dot("gqd,gcd->gqc", q, keys) * inv_k[:, None, :]
    d2 = q_sq[..., :, None] + k_sq[..., None, :] - 2 * dot("gqd,gcd->gqc", queries, keys)
    return -jnp.maximum(d2, 0)


def _round_int8(x, levels):
    """Rows rounded to `levels` steps of max|row| / levels (halves away from zero)."""
    amax = jnp.max(jnp.abs(x), -1, keepdims=True)
    r = x * jnp.where(amax > 0, levels / jnp.where(amax > 0, amax, 1), 0)
    steps = jnp.clip(jnp.trunc(r + jnp.copysign(jnp.float32(0.5), r)), -levels, levels)
    return steps * (amax / levels)


def _rounded(keys, queries, metric, precision):
    """(queries, keys, q_sq) as _scores takes them to score in `precision`: bfloat16
    keys rounded to nearest even; int8 keys with a per-row scale max|k| / 127 and
    7-bit queries, normalised first for cosine (then q_sq = 1). q_sq is |q|^2 of
    the queries as given. Scores then match the core's to rounding."""
    q_sq = jnp.sum(queries * queries, -1)
    if precision == "bfloat16":
        return queries, keys.astype(jnp.bfloat16).astype(jnp.float32), q_sq
    if precision == "int8":
        if metric == "cosine":
            inv = jnp.where(q_sq > 0, lax.rsqrt(jnp.where(q_sq > 0, q_sq, 1)), 0)
            queries, q_sq = queries * inv[..., None], jnp.ones_like(q_sq)
        return _round_int8(queries, 63), _round_int8(keys, 127), q_sq
    return queries, keys, q_sq


def _search_reference_flat(keys, values, written, queries, k, recall_target, metric, precision):
    """The strided-bin search on [G, C, d] / [G, C, dv] / [G] / [G, Q, d] in pure JAX."""
    g, cap, _ = keys.shape
    num_bins = int(_core.bins_for_search(k, recall_target, precision))
    w = written.astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    offset_of = jnp.asarray(_offset_table(cap))
    live = (w[:, None] >= cap) | (offset_of[None, :] < w[:, None])  # [G, C]
    held = jnp.minimum(w, cap)
    neg_inf = jnp.float32(-jnp.inf)
    rq, rk, q_sq = _rounded(keys, queries, metric, precision)
    s = _scores(rq, rk, metric, q_sq)
    s = jnp.where(live[:, None, :] & ~jnp.isnan(s), s, neg_inf)

    def exact(s):
        top, slot = lax.top_k(s, k)  # ties: lowest slot first
        return top, slot.astype(jnp.int32)

    if num_bins == 0 or num_bins >= cap:
        top, slot = exact(s)
    else:
        nb = num_bins
        rows = -(-cap // nb)
        pad = rows * nb - cap
        top, slot = _top_of_bins(*_bin_winners(s, nb), k)
        # bins that hold a live slot (the same for every query)
        livep = jnp.pad(live, ((0, 0), (0, pad))).reshape(g, rows, nb)
        occupied = jnp.sum(jnp.any(livep, axis=1), axis=-1)
        use_exact = (num_bins >= held) | (occupied < jnp.minimum(k, held))
        top, slot = lax.cond(
            jnp.any(use_exact),
            lambda: tuple(
                jnp.where(use_exact[:, None, None], a, b) for a, b in zip(exact(s), (top, slot))
            ),
            lambda: (top, slot),
        )
    return _results(top, slot, keys, values, w, offset_of)


def _bin_winners(s: jax.Array, nb: int) -> tuple[jax.Array, jax.Array]:
    """Scores [G, Q, C] -> each strided bin's (best score, slot) [G, Q, nb], bin = slot
    mod nb; ties to the lowest slot; slot 2**31 - 1 where the bin holds only -inf."""
    g, nq, cap = s.shape
    rows = -(-cap // nb)
    pad = rows * nb - cap
    sp = jnp.pad(s, ((0, 0), (0, 0), (0, pad)), constant_values=-jnp.inf)
    sp = sp.reshape(g, nq, rows, nb)
    best = jnp.max(sp, axis=2)  # [G, Q, L]
    row = jnp.argmax(sp, axis=2).astype(jnp.int32)  # first max: lowest slot
    bin_slot = row * nb + jnp.arange(nb, dtype=jnp.int32)
    return best, jnp.where(best > -jnp.inf, bin_slot, jnp.int32(2**31 - 1))


def _top_of_bins(best: jax.Array, bin_slot: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The best k of the bin winners, ordered by (score desc, slot asc)."""
    neg, srt = lax.sort((-best, bin_slot), dimension=-1, num_keys=2)
    return -neg[..., :k], srt[..., :k]


def _results(top, slot, keys, values, w, offset_of):
    """(scores, indices, keys, values, mask) from the k best (score, slot) per query."""
    g, nq, k = top.shape
    cap = keys.shape[1]
    mask = top > -jnp.inf
    slot = jnp.where(mask, slot, 0)
    r = offset_of[slot].astype(w.dtype)
    pos = r + cap * ((w[:, None, None] - 1 - r) // cap)
    indices = jnp.where(mask, pos, -1).astype(w.dtype)
    scores = jnp.where(mask, top, -jnp.inf)
    flat = slot.reshape(g, nq * k, 1)
    rk = jnp.take_along_axis(keys, flat, axis=1).reshape(g, nq, k, keys.shape[-1])
    rv = jnp.take_along_axis(values, flat, axis=1).reshape(g, nq, k, values.shape[-1])
    rk = jnp.where(mask[..., None], rk, 0)
    rv = jnp.where(mask[..., None], rv, 0)
    return scores, indices, rk, rv, mask


def _flat_call(fn, keys, values, written, queries, *static):
    """fn on the grid flattened to one axis (static: its further arguments)."""
    shape = tuple(written.shape)
    g = math.prod(shape)
    cap, d = keys.shape[-2:]
    out = fn(
        keys.reshape(g, cap, d),
        values.reshape(g, cap, values.shape[-1]),
        written.reshape(g),
        queries.reshape(g, *queries.shape[-2:]),
        *static,
    )
    return tuple(o.reshape(shape + o.shape[1:]) for o in out)


def _result_types(keys, values, written, queries, k):
    lead = tuple(written.shape) + (queries.shape[-2], k)
    return (
        jax.ShapeDtypeStruct(lead, jnp.float32),
        jax.ShapeDtypeStruct(lead, written.dtype),
        jax.ShapeDtypeStruct(lead + (keys.shape[-1],), jnp.float32),
        jax.ShapeDtypeStruct(lead + (values.shape[-1],), jnp.float32),
        jax.ShapeDtypeStruct(lead, jnp.bool_),
    )


def _varying_axes(x: Any) -> frozenset:
    """Mesh axes along which x varies inside shard_map (empty outside)."""
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(t, "vma", ()))


def _search_ffi(keys, values, written, queries, k, recall_target, metric, precision):
    call = jax.ffi.ffi_call(
        _FFI_TARGET,
        _result_types(keys, values, written, queries, k),
        vmap_method="broadcast_all",
    )
    out = call(
        keys,
        values,
        written,
        queries,
        k=np.int64(k),
        recall_target=np.float64(recall_target),
        metric=metric,
        precision=precision,
    )
    return _vary_like(out, (keys, values, written, queries))


def _vary_like(out, operands) -> tuple:
    # Inside shard_map the results vary along every axis an operand varies along (the
    # custom call's abstract evaluation does not say so).
    axes = frozenset().union(*map(_varying_axes, operands))
    return tuple(
        lax.pcast(o, tuple(sorted(axes - _varying_axes(o), key=str)), to="varying")
        if axes - _varying_axes(o)
        else o
        for o in out
    )


def _search_ffi_cuda(keys, values, written, queries, k, recall_target, metric, precision):
    """The CUDA custom call (bindings/xla_ffi_cuda.cpp) on XLA's stream; its workspace
    is one more result, so XLA allocates it with the others. float32 scoring only:
    other precisions take the reference (docs/cuda.md)."""
    from . import cuda as _kcuda

    if precision != "float32":
        return _search_ref(keys, values, written, queries, k, recall_target, metric, precision)
    grid = math.prod(written.shape)
    capacity, key_dim = keys.shape[-2], keys.shape[-1]
    ws = _kcuda._cuda.search_workspace_bytes(
        grid, capacity, key_dim, queries.shape[-2], k, recall_target, jnp.dtype(keys.dtype).name
    )
    offset_of = jnp.asarray(_offset_table(capacity))
    call = jax.ffi.ffi_call(
        _FFI_TARGET_CUDA,
        (
            *_result_types(keys, values, written, queries, k),
            jax.ShapeDtypeStruct((max(ws, 1),), jnp.uint8),
        ),
    )
    out = call(
        keys,
        values,
        written,
        queries,
        offset_of,
        k=np.int64(k),
        recall_target=np.float64(recall_target),
        metric=metric,
    )
    return _vary_like(out[:5], (keys, values, written, queries))


def _search_ref(keys, values, written, queries, k, recall_target, metric, precision):
    return _flat_call(
        _search_reference_flat, keys, values, written, queries, k, recall_target, metric, precision
    )


def _search_pallas(keys, values, written, queries, k, recall_target, metric, interpret=False):
    from .pallas import search_flat  # the Pallas TPU kernel (knnmem/pallas/)

    fn = functools.partial(search_flat, interpret=interpret)
    return _flat_call(fn, keys, values, written, queries, k, recall_target, metric)


@functools.lru_cache(maxsize=1)
def _pallas_importable() -> bool:
    try:
        from . import pallas  # noqa: F401
    except ImportError:  # pragma: no cover - a jax without Pallas TPU
        return False
    return True


def _search_tpu(keys, values, written, queries, k, recall_target, metric, precision):
    """search(impl="auto")'s TPU branch (traced on every platform): the Pallas kernel,
    or the reference where this jax has no Pallas TPU or the keys are scored rounded
    (precision other than float32: not in the kernel yet)."""
    args = (keys, values, written, queries, k, recall_target, metric)
    if precision == "float32" and _pallas_importable():
        return _search_pallas(*args)
    return _search_ref(*args, precision)


@functools.lru_cache(maxsize=256)
def _raw_search(k: int, recall_target: float, metric: str, precision: str, impl: str):
    """search(keys, values, written, queries) -> 5 arrays, for fixed static arguments,
    with a batching rule: extra leading dims of the memory join the grid; queries
    batched over an unbatched memory join the query axis (the memory is not copied)."""

    def run(keys, values, written, queries):
        args = (keys, values, written, queries, k, recall_target, metric, precision)
        if impl == "reference":
            return _search_ref(*args)
        if impl == "ffi":
            return _search_ffi(*args)
        if impl == "pallas":  # compiled on TPU, interpreted elsewhere
            return lax.platform_dependent(
                *args[:4],
                tpu=lambda *a: _search_pallas(*a, k, recall_target, metric),
                default=lambda *a: _search_pallas(*a, k, recall_target, metric, interpret=True),
            )
        # CUDA: the custom call of knnmem._cuda when it is built with its XLA handler.
        cuda = {"cuda": lambda *a: _search_ffi_cuda(*a, *args[4:])} if ffi_cuda_available() else {}
        return lax.platform_dependent(
            *args[:4],
            cpu=lambda *a: (_search_ffi if ffi_available() else _search_ref)(*a, *args[4:]),
            tpu=lambda *a: _search_tpu(*a, *args[4:]),
            **cuda,
            default=lambda *a: _search_ref(*a, *args[4:]),
        )

    @jax.custom_batching.custom_vmap
    def raw(keys, values, written, queries):
        return run(keys, values, written, queries)

    @raw.def_vmap
    def _rule(axis_size, in_batched, keys, values, written, queries):
        kb, vb, wb, qb = in_batched
        if not (kb or vb or wb):
            # [B, *shape, Q, d] -> [*shape, B * Q, d]
            n = written.ndim
            q = jnp.moveaxis(queries, 0, n)
            nq = q.shape[n + 1]
            q = q.reshape(*q.shape[:n], axis_size * nq, q.shape[-1])
            out = raw(keys, values, written, q)
            out = tuple(
                jnp.moveaxis(o.reshape(*o.shape[:n], axis_size, nq, *o.shape[n + 1 :]), n, 0)
                for o in out
            )
            return out, (True,) * 5
        grow = lambda x, b: x if b else jnp.broadcast_to(x, (axis_size, *x.shape))  # noqa: E731
        out = raw(grow(keys, kb), grow(values, vb), grow(written, wb), grow(queries, qb))
        return out, (True,) * 5

    return raw


# -- search: public ------------------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _scores_for_queries(scores, queries, rkeys, metric):
    """scores, with the tangent of the retrieved keys' scores w.r.t. the queries."""
    return scores


def _rescore(queries, rkeys, metric):
    dot = jnp.einsum("...qd,...qkd->...qk", queries, rkeys, precision=lax.Precision.HIGHEST)
    if metric == "ip":
        return dot
    q_sq = jnp.sum(queries * queries, -1)
    k_sq = jnp.sum(rkeys * rkeys, -1)
    if metric == "cosine":
        inv_q = jnp.where(q_sq > 0, lax.rsqrt(jnp.where(q_sq > 0, q_sq, 1)), 0)
        inv_k = jnp.where(k_sq > 0, lax.rsqrt(jnp.where(k_sq > 0, k_sq, 1)), 0)
        return dot * inv_q[..., None] * inv_k
    return -jnp.maximum(q_sq[..., None] + k_sq - 2 * dot, 0)


@_scores_for_queries.defjvp
def _scores_for_queries_jvp(metric, primals, tangents):
    scores, queries, rkeys = primals
    _, dq, _ = tangents
    _, ds = jax.jvp(lambda q: _rescore(q, rkeys, metric), (queries,), (dq,))
    return scores, jnp.where(jnp.isfinite(scores), ds, 0)


def _gather_last(x, axis, shard, shards):
    """all_gather along the last dimension, as a psum of one-hot placements so that the
    result is typed as replicated over `axis` (shard_map's check_vma can infer it)."""
    here = (jnp.arange(shards) == shard)[:, None]
    placed = jnp.where(here, x[..., None, :], jnp.zeros((), x.dtype))
    return lax.psum(placed, axis).reshape(*x.shape[:-1], shards * x.shape[-1])


def _local_search(state, queries, k, recall_target, metric, precision, impl, capacity_axis):
    shard, shards = _shard_position(capacity_axis)
    written = _local_written(state.written, shard, shards)
    raw = _raw_search(k, recall_target, metric, precision, impl)
    scores, indices, rk, rv, mask = raw(
        lax.stop_gradient(state.keys),
        lax.stop_gradient(state.values),
        lax.stop_gradient(written),
        lax.stop_gradient(queries),
    )
    if shards == 1:
        return scores, indices, rk, rv, mask
    # local position j of ring `shard` is global position j * D + shard
    indices = jnp.where(mask, indices * shards + shard.astype(indices.dtype), -1)
    # the best k of the D * k candidates; ties: lower device first (lax.top_k is stable)
    all_scores = _gather_last(scores, capacity_axis, shard, shards)  # [..., Q, D*k]
    all_indices = _gather_last(indices, capacity_axis, shard, shards)
    top, pick = lax.top_k(all_scores, k)
    gidx = jnp.take_along_axis(all_indices, pick, -1)
    mask_out = top > -jnp.inf
    # keys/values: each device contributes the winners it holds, zeros elsewhere
    owner, rank = pick // k, pick % k
    mine = (owner == shard) & mask_out
    rk_mine = jnp.take_along_axis(rk, rank[..., None], -2)
    rv_mine = jnp.take_along_axis(rv, rank[..., None], -2)
    rk_out = lax.psum(jnp.where(mine[..., None], rk_mine, 0), capacity_axis)
    rv_out = lax.psum(jnp.where(mine[..., None], rv_mine, 0), capacity_axis)
    gidx = jnp.where(mask_out, gidx, -1)
    return top, gidx, rk_out, rv_out, mask_out


def search(
    state: MemoryState,
    queries: Any,
    k: int = 32,
    recall_target: float = 0.9,
    *,
    precision: str = "float32",
    impl: str = "auto",
    capacity_axis: Any = None,
) -> SearchResult:
    """Approximate top-k of queries [*shape, Q, key_dim] in each memory of the grid.

    Returns a SearchResult like knnmem.Memory.search (scores, indices, keys, values,
    mask; indices have the dtype of state.written). ``recall_target=1.0`` is exact.
    impl: "auto" (the custom call on CPU, the Pallas kernel on TPU, the CUDA custom
    call on GPUs when knnmem._cuda is built with its XLA handler (docs/cuda.md), the
    reference elsewhere), "ffi" (CPU only), "reference" (pure JAX) or "pallas" (the TPU kernel;
    run by the Pallas interpreter off TPU: slow, for tests). capacity_axis: inside
    shard_map, the mesh axis over which each memory's capacity is spread (k may be at
    most the per-device capacity).
    precision: "float32", or "bfloat16" / "int8" to score the keys rounded to that
    format as knnmem.ops.search does (2-3x faster on CPU for blocks of queries; the
    returned keys stay the stored rows; the reference matches the custom call to
    rounding; the Pallas kernel takes float32 only, so on TPU these use the reference).
    Results are constants w.r.t. the memory; scores are differentiable w.r.t. queries."""
    state = _check_state(state)
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if impl == "pallas" and precision != "float32":
        raise ValueError(f"precision: impl='pallas' scores float32 keys, got {precision!r}")
    if impl == "ffi" and not ffi_available():
        raise RuntimeError(f"impl='ffi': {_FFI_MISSING}")
    if state.written.dtype not in (jnp.int32, jnp.int64):  # the custom call's index types
        raise TypeError(f"state.written: expected dtype int32 or int64, got {state.written.dtype}")
    _check_capacity_axis(capacity_axis)
    k, recall_target = check_search_args(k, recall_target, state.capacity)
    queries = _check_rows(
        queries, "queries", state.shape, None, state.key_dim, "key_dim", rows_name="Q"
    )
    return _search(state, queries, k, recall_target, precision, impl, capacity_axis)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _search(state, queries, k, recall_target, precision, impl, capacity_axis):
    out = _local_search(
        state, queries, k, recall_target, state.metric, precision, impl, capacity_axis
    )
    scores, indices, rk, rv, mask = out
    scores = _scores_for_queries(scores, queries, rk, state.metric)
    return SearchResult(scores, indices, rk, rv, mask)


def search_reference(
    state: MemoryState, queries: Any, k: int = 32, recall_target: float = 0.9
) -> SearchResult:
    """search(..., impl="reference"): the strided-bin algorithm in pure JAX."""
    return search(state, queries, k, recall_target, impl="reference")


# -- sharding helpers ----------------------------------------------------------------------


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


# -- memorizing attention ------------------------------------------------------------------


def _normalize(x: jax.Array) -> jax.Array:
    sq = jnp.sum(x * x, -1, keepdims=True)
    return x * jnp.where(sq > 0, lax.rsqrt(jnp.where(sq > 0, sq, 1)), 0)


def _softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    logits = jnp.where(mask, logits, -jnp.inf)
    top = jnp.max(logits, -1, keepdims=True)
    top = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0))
    e = jnp.where(mask, jnp.exp(logits - top), 0)
    z = jnp.sum(e, -1, keepdims=True)
    return e / jnp.where(z > 0, z, 1)


def memorizing_attention(
    queries: Any,
    keys: Any,
    values: Any,
    state: MemoryState,
    gate_bias: Any,
    *,
    scale: Any = None,
    k: int = 32,
    recall_target: float = 0.9,
    reset_mask: Any = None,
    context_keys: Any = None,
    context_values: Any = None,
    local_bias: Any = None,
    impl: str = "auto",
    capacity_axis: Any = None,
) -> tuple[jax.Array, MemoryState]:
    """The kNN-augmented attention layer of Memorizing Transformers (Wu et al., 2022).

    queries, keys, values: [*shape, T, head_dim] for one segment, where state.shape is the
    grid (e.g. (batch, heads)). Queries and keys are L2-normalised; each query attends
    (a) causally over the segment, after the optional ``context_keys/values``
    [*shape, Tc, head_dim] (e.g. the previous segment, Transformer-XL), with the optional
    additive ``local_bias`` [..., T, Tc + T], and (b) over its k memories retrieved from
    the state (no position bias). The two are combined by a per-memory learned gate
    g = sigmoid(gate_bias) (gate_bias broadcastable to state.shape, e.g. [heads]):
    out = g * memory + (1 - g) * local; a query with nothing in memory uses local only.
    ``scale`` multiplies the cosine logits, a scalar or broadcastable to state.shape
    (default sqrt(head_dim); pass a learned temperature to train it).

    Per segment: reset (``reset_mask``, bool [*shape] or a leading prefix: memories of new
    documents are cleared, and their context is hidden) -> search -> add (the segment's
    normalised keys and values), so a query never sees its own segment in memory.
    Gradients flow through queries, keys and values of the segment and through the
    retrieved keys/values' scores into the queries, never into the memory. The state
    should use metric "ip" (keys are stored normalised). Returns (out, new_state)."""
    state = _check_state(state)
    shape = state.shape
    q = _check_rows(queries, "queries", shape, None, state.key_dim, "key_dim", rows_name="T")
    t = q.shape[-2]
    kk = _check_rows(keys, "keys", shape, t, state.key_dim, "key_dim")
    vv = _check_rows(values, "values", shape, t, state.value_dim, "value_dim")
    if scale is None:
        scale = math.sqrt(state.key_dim)
    scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), shape)[..., None, None]
    qn, kn = _normalize(q), _normalize(kk)

    visible_context = None
    if reset_mask is not None:
        state = reset(state, reset_mask)
        m = jnp.asarray(reset_mask)
        visible_context = ~m.reshape(m.shape + (1,) * (len(shape) - m.ndim))

    # (b) memory
    res = search(state, qn, k, recall_target, impl=impl, capacity_axis=capacity_axis)
    # (-inf scores of empty entries must not meet the scale: -inf * 0 is a NaN gradient)
    w_mem = _softmax(scale * jnp.where(res.mask, res.scores, 0), res.mask)
    mem_out = jnp.einsum("...qk,...qkd->...qd", w_mem, res.values)
    has_mem = jnp.any(res.mask, -1, keepdims=True)

    # (a) local causal attention (after the optional context)
    causal = jnp.tril(jnp.ones((t, t), bool))
    if context_keys is not None:
        ck = _check_rows(context_keys, "context_keys", shape, None, state.key_dim, "key_dim")
        tc = ck.shape[-2]
        cv = _check_rows(context_values, "context_values", shape, tc, state.value_dim, "value_dim")
        all_k = jnp.concatenate([_normalize(ck), kn], -2)
        all_v = jnp.concatenate([cv, vv], -2)
        ctx = jnp.ones((t, tc), bool)
        allowed = jnp.concatenate([ctx, causal], -1)
        if visible_context is not None:
            vis = jnp.concatenate(
                [
                    jnp.broadcast_to(visible_context[..., None, None], (*shape, t, tc)),
                    jnp.ones((*shape, t, t), bool),
                ],
                -1,
            )
            allowed = allowed & vis
    else:
        all_k, all_v, allowed = kn, vv, causal
    logits = scale * jnp.einsum("...qd,...kd->...qk", qn, all_k)
    if local_bias is not None:
        logits = logits + local_bias
    local_out = jnp.einsum("...qk,...kd->...qd", _softmax(logits, allowed), all_v)

    gate = jax.nn.sigmoid(jnp.asarray(gate_bias, jnp.float32))
    gate = jnp.broadcast_to(gate, shape)[..., None, None]
    out = jnp.where(has_mem, gate * mem_out + (1 - gate) * local_out, local_out)
    new_state = add(state, kn, vv, capacity_axis=capacity_axis)
    return out, new_state


def _warn_missing_ffi() -> None:  # pragma: no cover - depends on the build
    if _FFI_MISSING is not None:
        warnings.warn(
            f"knnmem.jax: {_FFI_MISSING}; search runs the pure-JAX reference on CPU too",
            RuntimeWarning,
            stacklevel=3,
        )


_warn_missing_ffi()
