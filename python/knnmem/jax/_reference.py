"""The strided-bin search in pure JAX, and the pieces the Pallas search shares with it.

:func:`search_reference` (``impl="reference"``) runs :func:`_search_ref`; it is also what
the tests compare the custom calls and the Pallas kernel against. ``knnmem.pallas``
replaces only the bin winners (:func:`_bin_winners`) by its kernel and imports the rest
from here: the placement tables, the scores as the core defines them, the top-k of the
bin winners, the gather of the results and the reference itself (its exact fallback).
This module imports nothing else from knnmem.jax and nothing from knnmem.pallas, so the
two packages can be imported in either order.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _core

# -- placement tables ------------------------------------------------------------------------

PLACEMENT_BLOCK = int(_core.PLACEMENT_BLOCK)


@functools.lru_cache(maxsize=32)
def _slot_table(capacity: int) -> np.ndarray:
    """slot_of: stream offset -> slot (knnmem.ops.placement(capacity)[0])."""
    return np.asarray(_core.placement(capacity)[0])


@functools.lru_cache(maxsize=32)
def _offset_table(capacity: int) -> np.ndarray:
    """offset_of: slot -> stream offset (knnmem.ops.placement(capacity)[1])."""
    return np.asarray(_core.placement(capacity)[1])


# -- scores ----------------------------------------------------------------------------------


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


# -- the search on a flat grid ---------------------------------------------------------------


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


# -- on the grid -----------------------------------------------------------------------------


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


def _search_ref(keys, values, written, queries, k, recall_target, metric, precision):
    """The reference on keys [*shape, C, d], values, written [*shape], queries [*shape, Q, d]."""
    return _flat_call(
        _search_reference_flat, keys, values, written, queries, k, recall_target, metric, precision
    )
