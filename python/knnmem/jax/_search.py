"""search: the backend choice, the batching rule, the gradient rule and the merge of a
capacity-sharded memory's per-device results.

``impl="auto"`` picks per platform with ``lax.platform_dependent``: the CPU custom call
(knnmem._core), the Pallas kernel on TPU (knnmem.pallas, imported when first traced),
the CUDA custom call (knnmem._cuda) on GPUs when it is registered, and the pure-JAX
reference anywhere else or when a custom call is missing.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._contract import (
    FIELDS,
    PRECISIONS,
    ROW_DTYPES,
    SearchResult,
    check_fields,
    check_row_dtype,
    check_search_args,
)
from ._ffi import (
    _FFI_MISSING,
    _search_ffi,
    _search_ffi_cuda,
    _vary_like,
    ffi_available,
    ffi_cuda_available,
)
from ._reference import _flat_call, _search_ref
from ._state import (
    MemoryState,
    _check_capacity_axis,
    _check_rows,
    _check_state,
    _local_written,
    _select_cells,
    _shard_position,
)

IMPLS = ("auto", "ffi", "reference", "pallas")


# -- backends --------------------------------------------------------------------------------


def _search_pallas(keys, values, written, queries, k, recall_target, metric, interpret=False):
    from ..pallas import search_flat  # the Pallas TPU kernel (knnmem/pallas/)

    fn = functools.partial(search_flat, interpret=interpret)
    return _flat_call(fn, keys, values, written, queries, k, recall_target, metric)


@functools.lru_cache(maxsize=1)
def _pallas_importable() -> bool:
    try:
        from .. import pallas  # noqa: F401
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


class _Request(NamedTuple):
    """What one raw search writes (static): the fields computed, in FIELDS order, the
    dtypes of the key and value rows, the fields written into operand buffers (their
    results alias those operands; only the CPU custom call uses them), and whether the
    memories searched are a sub-grid (cells) of the storage."""

    fields: tuple[str, ...] = FIELDS
    key_dtype: str = "float32"
    value_dtype: str = "float32"
    aliased: tuple[str, ...] = ()
    sub_grid: bool = False


def _placeholder(name: str, request: _Request, index_dtype: Any) -> jax.Array:
    """A field not asked for: shape (0,), in the dtype the field would have."""
    dtypes = {
        "scores": jnp.float32,
        "indices": index_dtype,
        "keys": request.key_dtype,
        "values": request.value_dtype,
        "mask": jnp.bool_,
    }
    return jnp.zeros((0,), dtypes[name])


def _finish(out: tuple, request: _Request, index_dtype: Any) -> tuple:
    """A backend's full float32 result as the request asks: placeholders for the fields
    not asked for, key and value rows converted (round to nearest even, as the core)."""
    dtypes = {"keys": request.key_dtype, "values": request.value_dtype}
    return tuple(
        (o.astype(dtypes[name]) if name in dtypes else o)
        if name in request.fields
        else _placeholder(name, request, index_dtype)
        for name, o in zip(FIELDS, out)
    )


def _on_cells(keys, values, written, cells, sub_grid: bool):
    """The memories a search runs on: the grid, or its sub-grid `cells` (gathered: the
    backends other than the CPU custom call search whole grids)."""
    if not sub_grid:
        return keys, values, written
    g = math.prod(written.shape)
    flat = lambda x: x.reshape(g, *x.shape[written.ndim :])[cells]  # noqa: E731
    return flat(keys), flat(values), written.reshape(g)[cells]


@functools.lru_cache(maxsize=256)
def _raw_search(
    k: int, recall_target: float, metric: str, precision: str, impl: str, request: _Request
):
    """search(keys, values, written, queries, cells, *outs) -> 5 arrays (shape (0,) for
    the fields not asked for), for fixed static arguments, with a batching rule: extra
    leading dims of the memory join the grid; queries batched over an unbatched memory
    join the query axis (the memory is not copied). cells: int32 [n] with
    request.sub_grid (queries [n, Q, d] then), else an empty placeholder; outs: the
    buffers of request.aliased."""
    static = (k, recall_target, metric, precision)

    def full(search_fn):
        # a backend that computes every field in float32 on whole grids
        def go(keys, values, written, queries, cells, *outs):
            kv = _on_cells(keys, values, written, cells, request.sub_grid)
            out = _finish(search_fn(*kv, queries), request, written.dtype)
            return _vary_like(out, (keys, values, written, queries))  # the placeholders too

        return go

    def ffi(keys, values, written, queries, cells, *outs):
        return _search_ffi(keys, values, written, queries, cells, outs, *static, request)

    ref = full(lambda *a: _search_ref(*a, *static))
    tpu = full(lambda *a: _search_tpu(*a, *static))
    cuda = full(lambda *a: _search_ffi_cuda(*a, *static))

    def pallas(interpret):
        return full(lambda *a: _search_pallas(*a, k, recall_target, metric, interpret))

    def run(*args):
        if impl == "reference":
            return ref(*args)
        if impl == "ffi":
            return ffi(*args)
        if impl == "pallas":  # compiled on TPU, interpreted elsewhere
            return lax.platform_dependent(*args, tpu=pallas(False), default=pallas(True))
        # CUDA: the custom call of knnmem._cuda when it is built with its XLA handler.
        on_cuda = {"cuda": cuda} if ffi_cuda_available() else {}
        return lax.platform_dependent(
            *args, cpu=ffi if ffi_available() else ref, tpu=tpu, **on_cuda, default=ref
        )

    present = tuple(name in request.fields for name in FIELDS)

    @jax.custom_batching.custom_vmap
    def raw(keys, values, written, queries, cells, *outs):
        return run(keys, values, written, queries, cells, *outs)

    @raw.def_vmap
    def _rule(axis_size, in_batched, keys, values, written, queries, cells, *outs):
        kb, vb, wb, qb, cb = in_batched[:5]
        # The batched calls write new buffers unless every out buffer is batched like
        # the results (then the batch joins the grid and they stay aliased).
        keep = bool(outs) and all(in_batched[5:])
        plain = _raw_search(*static, impl, request._replace(aliased=()))
        if qb and not (kb or vb or wb or cb):
            # [B, *grid, Q, d] -> [*grid, B * Q, d]
            n = queries.ndim - 3
            q = jnp.moveaxis(queries, 0, n)
            nq = q.shape[n + 1]
            q = q.reshape(*q.shape[:n], axis_size * nq, q.shape[-1])
            out = plain(keys, values, written, q, cells)
            out = tuple(
                jnp.moveaxis(o.reshape(*o.shape[:n], axis_size, nq, *o.shape[n + 1 :]), n, 0)
                if p
                else o
                for o, p in zip(out, present)
            )
            return out, present
        grow = lambda x, b: x if b else jnp.broadcast_to(x, (axis_size, *x.shape))  # noqa: E731
        keys, values, written = grow(keys, kb), grow(values, vb), grow(written, wb)
        queries = grow(queries, qb)
        call, outs = (raw, outs) if keep else (plain, ())
        if not request.sub_grid:
            return call(keys, values, written, queries, cells, *outs), present
        # the batch joins the storage grid: cells index the flattened [B, *grid]
        g = math.prod(written.shape[1:])
        cells = grow(cells, cb) + (jnp.arange(axis_size, dtype=cells.dtype) * g)[:, None]
        nsub = queries.shape[1]
        flat = lambda x: x.reshape(axis_size * nsub, *x.shape[2:])  # noqa: E731
        out = call(keys, values, written, flat(queries), cells.reshape(-1), *map(flat, outs))
        out = tuple(
            o.reshape(axis_size, nsub, *o.shape[1:]) if p else o for o, p in zip(out, present)
        )
        return out, present

    return raw


# -- one device's search, merged over the capacity axis --------------------------------------


class _Config(NamedTuple):
    """The static arguments of a search."""

    k: int
    recall_target: float
    metric: str
    precision: str
    impl: str
    capacity_axis: Any
    fields: tuple[str, ...]  # in FIELDS order
    key_dtype: str
    value_dtype: str
    aliased: tuple[str, ...]  # fields with a donated out= buffer
    sub_shape: tuple[int, ...] | None  # the sub-grid's shape (which=), or None


def _gather_last(x, axis, shard, shards):
    """all_gather along the last dimension, as a psum of one-hot placements so that the
    result is typed as replicated over `axis` (shard_map's check_vma can infer it)."""
    here = (jnp.arange(shards) == shard)[:, None]
    placed = jnp.where(here, x[..., None, :], jnp.zeros((), x.dtype))
    return lax.psum(placed, axis).reshape(*x.shape[:-1], shards * x.shape[-1])


def _local_search(cfg: _Config, keys, values, written, queries, cells, outs) -> tuple:
    """The 5 fields (shape (0,) where not asked for) on this device, merged over the
    capacity axis."""
    axis = cfg.capacity_axis
    shard, shards = _shard_position(axis)
    written = _local_written(written, shard, shards)
    # the merge ranks the devices' candidates by score and needs their positions
    merged = ("scores", "indices", "mask") if axis is not None else ()
    request = _Request(
        tuple(f for f in FIELDS if f in cfg.fields or f in merged),
        cfg.key_dtype,
        cfg.value_dtype,
        cfg.aliased if axis is None else (),
        cfg.sub_shape is not None,
    )
    raw = _raw_search(cfg.k, cfg.recall_target, cfg.metric, cfg.precision, cfg.impl, request)
    stop = lax.stop_gradient
    outs = outs if request.aliased else ()
    out = raw(stop(keys), stop(values), stop(written), stop(queries), cells, *map(stop, outs))
    if axis is None:  # a capacity axis, even of size 1, needs the merge's psums
        return out  # (they type the results as replicated on it)
    scores, indices, rk, rv, mask = out
    k = cfg.k
    # local position j of ring `shard` is global position j * D + shard
    indices = jnp.where(mask, indices * shards + shard.astype(indices.dtype), -1)
    # the best k of the D * k candidates; ties: lower device first (lax.top_k is stable)
    all_scores = _gather_last(scores, axis, shard, shards)  # [..., Q, D*k]
    all_indices = _gather_last(indices, axis, shard, shards)
    top, pick = lax.top_k(all_scores, k)
    gidx = jnp.take_along_axis(all_indices, pick, -1)
    mask_out = top > -jnp.inf
    # keys/values: each device contributes the winners it holds, zeros elsewhere
    owner, rank = pick // k, pick % k
    mine = (owner == shard) & mask_out

    def rows(r, name):
        if name not in cfg.fields:
            return r
        r_mine = jnp.take_along_axis(r, rank[..., None], -2)
        return lax.psum(jnp.where(mine[..., None], r_mine, jnp.zeros((), r.dtype)), axis)

    gidx = jnp.where(mask_out, gidx, -1)
    return top, gidx, rows(rk, "keys"), rows(rv, "values"), mask_out


# -- gradients -------------------------------------------------------------------------------


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


def _zero_tangent(x):
    if x is None:
        return None
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _searched(cfg: _Config, keys, values, written, queries, cells, outs) -> tuple:
    """The search's 5 fields, None for those not asked for. A constant w.r.t. the memory;
    the scores' tangent w.r.t. the queries is that of the retrieved keys' scores,
    recomputed (_searched_jvp)."""
    out = _local_search(cfg, keys, values, written, queries, cells, outs)
    return tuple(o if name in cfg.fields else None for name, o in zip(FIELDS, out))


@_searched.defjvp
def _searched_jvp(cfg: _Config, primals, tangents):
    keys, values, written, queries, cells, outs = primals
    if "scores" not in cfg.fields:  # nothing differentiable is returned
        out = _searched(cfg, *primals)
        return out, tuple(map(_zero_tangent, out))
    # The tangent needs the retrieved keys: fetched here, as float32, also when the
    # caller did not ask for them (only a differentiated search pays for them).
    aliased = tuple(a for a in cfg.aliased if a != "keys" or cfg.key_dtype == "float32")
    full = cfg._replace(
        fields=tuple(f for f in FIELDS if f in cfg.fields or f == "keys"),
        key_dtype="float32",
        aliased=aliased,
    )
    kept = tuple(o for a, o in zip(cfg.aliased, outs) if a in aliased)
    scores, indices, rk, rv, mask = _searched(full, keys, values, written, queries, cells, kept)
    _, ds = jax.jvp(lambda q: _rescore(q, rk, cfg.metric), (queries,), (tangents[3],))
    ds = jnp.where(jnp.isfinite(scores), ds, 0)
    rk_out = rk.astype(cfg.key_dtype) if "keys" in cfg.fields else None
    out = (scores, indices, rk_out, rv, mask)
    return out, (ds, *map(_zero_tangent, out[1:]))


# -- public ----------------------------------------------------------------------------------


def _check_row_dtype(row_dtype: Any) -> str:
    """row_dtype as a name in ROW_DTYPES (names, numpy / jax dtypes and types accepted)."""
    if isinstance(row_dtype, str):
        return check_row_dtype(row_dtype)
    try:
        name = None if row_dtype is None else jnp.dtype(row_dtype).name
    except TypeError:
        name = None
    if name not in ROW_DTYPES:
        raise ValueError(f"row_dtype: expected one of {ROW_DTYPES}, got {row_dtype!r}")
    return name


def _check_out(
    out: Any, fields: tuple | None, row_dtype: str, lead: tuple, dims: dict, index_dtype: Any
) -> tuple[tuple, str, str, dict]:
    """(fields, key dtype, value dtype, {field: out array} for the fields asked for):
    out= checked against the results' shapes lead + (k,) [+ (dim,)] and dtypes."""
    arrays = {}
    if out is not None:
        if not isinstance(out, tuple) or len(out) != 5:
            raise TypeError(f"out: expected a SearchResult (5 fields), got {type(out).__name__}")
        for name, arr in zip(FIELDS, out):
            if arr is None:
                continue
            if not isinstance(arr, jax.Array):
                raise TypeError(
                    f"out.{name}: expected a jax array (its buffer is donated to the "
                    f"result), got {type(arr).__name__}"
                )
            arrays[name] = arr
    if fields is None:  # every field, or those of out's arrays
        fields = tuple(arrays) if out is not None else FIELDS
    fields = tuple(f for f in FIELDS if f in fields)
    arrays = {name: a for name, a in arrays.items() if name in fields}
    row = {}
    for name in ("keys", "values"):
        row[name] = arrays[name].dtype.name if name in arrays else row_dtype
        if row[name] not in ROW_DTYPES:
            raise TypeError(
                f"out.{name}: expected dtype float32, bfloat16 or float16, got {row[name]}"
            )
    want_dtype = {"scores": "float32", "indices": jnp.dtype(index_dtype).name, "mask": "bool"}
    for name, arr in arrays.items():
        shape = lead + dims.get(name, ())
        if tuple(arr.shape) != shape:
            raise ValueError(f"out.{name}: expected shape {shape}, got {tuple(arr.shape)}")
        want = want_dtype.get(name, arr.dtype.name)
        if arr.dtype.name != want:
            raise TypeError(f"out.{name}: expected dtype {want}, got {arr.dtype.name}")
    return fields, row["keys"], row["values"], arrays


def search(
    state: MemoryState,
    queries: Any,
    k: int = 32,
    recall_target: float = 0.9,
    out: SearchResult | None = None,
    *,
    precision: str = "float32",
    impl: str = "auto",
    capacity_axis: Any = None,
    fields: Any = None,
    row_dtype: Any = "float32",
    which: Any = None,
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
    rounding; the Pallas kernel and the CUDA custom call take float32 only, so on TPU
    and GPUs these use the reference).
    fields: a name or names of SearchResult fields to return; the others are None.
    Default: all five, or, with out=, the fields of out's arrays. The CPU custom call
    computes only those (keys and values not asked for are never read); the other
    backends compute all and drop the rest.
    row_dtype: "float32", "bfloat16" or "float16" (or that dtype): the dtype of the key
    and value rows returned (the float32 rows rounded to nearest even).
    which: search some memories only (a bool mask of the grid's shape, or indices as
    numpy takes them for a [*shape] array; concrete, not traced): queries and results
    have the sub-grid's shape in place of the grid's. The CPU custom call reads only
    those memories; the other backends gather them first.
    out: a SearchResult of jax arrays shaped like this search's results (None for
    fields without one): their buffers are donated and the results written into them
    (the CPU custom call aliases them to its results). Called eagerly, out's arrays are
    consumed (deleted); under jit, donate them (donate_argnums) to reuse the buffers --
    without donation XLA copies them first. Key and value rows take the dtype of out's
    arrays.
    Results are constants w.r.t. the memory; scores are differentiable w.r.t. queries
    (whatever the fields: a differentiated search fetches the keys it needs)."""
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
    fields = check_fields(fields)
    row_dtype = _check_row_dtype(row_dtype)
    cells, shape = _select_cells(which, state.shape)
    queries = _check_rows(queries, "queries", shape, None, state.key_dim, "key_dim", rows_name="Q")
    lead = (*shape, queries.shape[-2], k)
    fields, key_dtype, value_dtype, arrays = _check_out(
        out,
        fields,
        row_dtype,
        lead,
        {"keys": (state.key_dim,), "values": (state.value_dim,)},
        state.written.dtype,
    )
    if not fields:  # nothing asked for: nothing to compute
        return SearchResult(None, None, None, None, None)
    if cells is not None and cells.size == 0:  # an empty sub-grid
        request = _Request(fields, key_dtype, value_dtype)
        return SearchResult(
            *(
                jnp.zeros(lead + dims, _placeholder(name, request, state.written.dtype).dtype)
                if name in fields
                else None
                for name, dims in zip(FIELDS, ((), (), (state.key_dim,), (state.value_dim,), ()))
            )
        )
    cfg = _Config(
        k,
        recall_target,
        state.metric,
        precision,
        impl,
        capacity_axis,
        fields,
        key_dtype,
        value_dtype,
        tuple(arrays),
        None if cells is None else shape,
    )
    cells = _NO_CELLS if cells is None else cells
    outs = tuple(arrays.values())
    res = _search(cfg, state.keys, state.values, state.written, queries, cells, outs)
    return SearchResult(*res)


_NO_CELLS = np.zeros((0,), np.int32)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=6)
def _search(cfg: _Config, keys, values, written, queries, cells, outs):
    if cfg.sub_shape is None:
        return _searched(cfg, keys, values, written, queries, cells, outs)
    # a sub-grid: its memories flattened to one axis for the call
    n = cells.shape[0]
    flat = lambda x: x.reshape(n, *x.shape[len(cfg.sub_shape) :])  # noqa: E731
    out = _searched(cfg, keys, values, written, flat(queries), cells, tuple(map(flat, outs)))
    return tuple(None if o is None else o.reshape(cfg.sub_shape + o.shape[1:]) for o in out)


def search_reference(
    state: MemoryState,
    queries: Any,
    k: int = 32,
    recall_target: float = 0.9,
    out: SearchResult | None = None,
    *,
    fields: Any = None,
    row_dtype: Any = "float32",
    which: Any = None,
) -> SearchResult:
    """search(..., impl="reference"): the strided-bin algorithm in pure JAX."""
    return search(
        state,
        queries,
        k,
        recall_target,
        out,
        impl="reference",
        fields=fields,
        row_dtype=row_dtype,
        which=which,
    )
