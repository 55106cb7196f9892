"""knnmem's strided-bin search with the Pallas kernel for the bin winners.

The kernel (``_kernel.py``) produces each bin's best score and slot; the top-k of those L
winners, the positions, the gather of keys and values, and the fallbacks for nearly
empty memories are plain JAX, the same functions as ``knnmem.jax``'s reference
(``knnmem/jax/_reference.py``), so the results equal the reference's field for field
whenever the bin winners do. That module imports nothing from knnmem.pallas, and
knnmem.jax imports knnmem.pallas only when a search is first traced, so either package
can be imported first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .. import _core
from ..jax._reference import (
    _offset_table,
    _results,
    _scores,
    _search_reference_flat,
    _slot_table,
    _top_of_bins,
)
from ._kernel import (
    DEFAULT_BLOCK_K,
    DEFAULT_BLOCK_Q,
    LANES,
    fold_positions,
    position_winners,
)


def _inv_norm(sq):
    return jnp.where(sq > 0, lax.rsqrt(jnp.where(sq > 0, sq, 1)), 0)


def _kernel_operands(queries, keys, metric):
    """(queries for the MXU, extra operands): the same expressions as the reference's
    _scores (knnmem/jax/_reference.py), so that the kernel's scores equal the reference's."""
    if metric == "ip":
        return queries, ()
    qf, kf = queries.astype(jnp.float32), keys.astype(jnp.float32)
    q_sq = jnp.sum(qf * qf, -1)
    k_sq = jnp.sum(kf * kf, -1)
    if metric == "cosine":
        q = (qf * _inv_norm(q_sq)[..., None]).astype(queries.dtype)
        return q, (_inv_norm(k_sq)[:, None, :],)
    return queries, (q_sq[..., None], k_sq[:, None, :])


def bin_winners(
    queries,
    keys,
    held,
    num_bins: int,
    metric: str = "ip",
    *,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    interpret=False,
):
    """Each strided bin's winner, computed by the Pallas kernel.

    queries [G, Q, d], keys [G, C, d] in knnmem's ring layout (float32, or bfloat16 for
    both: bf16 inputs, f32 accumulation), held [G] rows held per memory (its live slots
    are those whose stream offset, ``knnmem.ops.placement``, is below it); C >= 128.
    Returns (best [G, Q, L] float32, slot [G, Q, L] int32): the maximum score over the
    live slots s with s mod L == bin, and the lowest such slot reaching it (-inf and
    2**31 - 1 for a bin without a live slot), as ``knnmem.jax``'s reference computes
    them. ``interpret``: False (compile for TPU), True, or a
    ``pltpu.InterpretParams``."""
    cap = keys.shape[1]
    if keys.dtype != queries.dtype or keys.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(
            f"keys, queries: expected both float32 or both bfloat16, got {keys.dtype}, "
            f"{queries.dtype}"
        )
    if cap < LANES:
        raise ValueError(f"keys: expected a capacity of at least {LANES}, got {cap}")
    offsets = jnp.asarray(_offset_table(cap), jnp.int32)
    q, extra = _kernel_operands(queries, keys, metric)
    pos_s, pos_i = position_winners(
        q,
        keys,
        jnp.asarray(held, jnp.int32),
        offsets,
        extra,
        num_bins=num_bins,
        metric=metric,
        block_q=block_q,
        block_k=block_k,
        interpret=interpret,
    )
    return fold_positions(pos_s, pos_i, num_bins)


def search_flat(
    keys,
    values,
    written,
    queries,
    k,
    recall_target,
    metric,
    *,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    interpret=False,
):
    """knnmem.jax's search on [G, C, d] / [G, C, dv] / [G] / [G, Q, d] with the bin
    winners from the kernel. Exact searches (L == 0 or L >= C) and memories of fewer
    than 128 slots run the plain-JAX reference."""
    g, cap, _ = keys.shape
    nb = int(_core.bins_for_search(k, recall_target))
    if nb == 0 or nb >= cap or cap < LANES:
        return _search_reference_flat(
            keys, values, written, queries, k, recall_target, metric, "float32"
        )
    w = written.astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    held = jnp.minimum(w, cap)
    offset_of = jnp.asarray(_offset_table(cap))
    best, bin_slot = bin_winners(
        queries,
        keys,
        held.astype(jnp.int32),
        nb,
        metric,
        block_q=block_q,
        block_k=block_k,
        interpret=interpret,
    )
    top, slot = _top_of_bins(best, bin_slot, k)

    # Where the bins cannot deliver k rows the reference takes the exact top-k; so do we,
    # without the [G, Q, C] score array where we can.
    live = offset_of[None, :] < held[:, None]  # [G, C]
    rows = -(-cap // nb)
    livep = jnp.pad(live, ((0, 0), (0, rows * nb - cap))).reshape(g, rows, nb)
    occupied = jnp.sum(jnp.any(livep, axis=1), axis=-1)
    few = nb >= held  # rows held are stream offsets 0 .. held-1 < nb: score only those
    clustered = ~few & (occupied < jnp.minimum(k, held))  # rare: all slots

    def exact_few():
        slots = jnp.asarray(_slot_table(cap)[:nb], jnp.int32)  # slots of offsets < nb
        s = _scores(queries, keys[:, slots, :], metric)  # [G, Q, nb]
        ok = jnp.arange(nb)[None, :] < held[:, None]
        s = jnp.where(ok[:, None, :] & ~jnp.isnan(s), s, -jnp.inf)
        by_slot = jnp.broadcast_to(slots, s.shape)
        neg, srt = lax.sort((-s, by_slot), dimension=-1, num_keys=2)
        return -neg[..., :k], srt[..., :k]

    def exact_all():
        s = _scores(queries, keys, metric)
        s = jnp.where(live[:, None, :] & ~jnp.isnan(s), s, -jnp.inf)
        t, i = lax.top_k(s, k)  # ties: lowest slot first
        return t, i.astype(jnp.int32)

    for use, fn in ((few, exact_few), (clustered, exact_all)):
        top, slot = lax.cond(
            jnp.any(use),
            lambda use=use, fn=fn, cur=(top, slot): tuple(
                jnp.where(use[:, None, None], a, b) for a, b in zip(fn(), cur)
            ),
            lambda cur=(top, slot): cur,
        )
    return _results(top, slot, keys, values, w, offset_of)
