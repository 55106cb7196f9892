"""search: the backend choice, the batching rule, the gradient rule and the merge of a
capacity-sharded memory's per-device results.

``impl="auto"`` picks per platform with ``lax.platform_dependent``: the CPU custom call
(knnmem._core), the Pallas kernel on TPU (knnmem.pallas, imported when first traced),
the CUDA custom call (knnmem._cuda) on GPUs when it is registered, and the pure-JAX
reference anywhere else or when a custom call is missing.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .._contract import PRECISIONS, SearchResult, check_search_args
from ._ffi import (
    _FFI_MISSING,
    _search_ffi,
    _search_ffi_cuda,
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


# -- gradients -------------------------------------------------------------------------------


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


# -- one device's search, merged over the capacity axis --------------------------------------


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
    if capacity_axis is None:  # a capacity axis, even of size 1, needs the merge's psums
        return scores, indices, rk, rv, mask  # (they type the results as replicated on it)
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


# -- public ----------------------------------------------------------------------------------


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
    rounding; the Pallas kernel and the CUDA custom call take float32 only, so on TPU
    and GPUs these use the reference).
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
