"""The strided-bin partial reduction as a Pallas TPU kernel (see docs/pallas.md).

Grid (cell, query block, key block); the key axis is the innermost, sequential one. Each
step scores a [bq, d] query block against a [bk, d] key block on the MXU (f32
accumulation) and folds the [bq, bk] scores into per-query running (max, slot) pairs held
in VMEM scratch. Nothing is sorted inside the kernel: the fold is max / compare / select
and one lane rotation per 128 slots.

Bins are strided over physical slots, bin(slot) = slot mod L, with L = bins_for_search
(any L works here; the engine's is a multiple of 16, rarely of 128). Instead of
scattering lanes into bins, the kernel keeps W = 128 * ((L - 1) // 128 + 2) positions
per query: the 128 slots of the chunk that starts at slot c go to positions o .. o +
127, o = c mod L (the chunk rotated by o mod 128 lanes, split between two 128-lane
blocks of the accumulator). Position p only ever receives slots with slot mod L == p mod
L, in increasing slot order, so a strict ``>`` keeps the lowest slot among equal scores,
as the reference's argmax does. The 2-3 positions of each bin are folded into the L bin
winners outside the kernel (plain JAX).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
SLOT_NONE = 2**31 - 1  # the slot of an empty bin (as in the reference)
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 1024


def num_positions(num_bins: int) -> int:
    """Accumulator width: the 128-lane blocks that chunk offsets 0 .. L-1 (+127) reach."""
    return LANES * ((num_bins - 1) // LANES + 2)


VMEM_BUDGET = 12 * 2**20  # under the 16 MiB of VMEM of v4 and the default scoped limit


def _tile_bytes(rows: int, cols: int, itemsize: int) -> int:
    """VMEM bytes of a [rows, cols] block: (8 * 4 / itemsize, 128) tiles."""
    sub = 8 * 4 // itemsize
    return -(-rows // sub) * sub * -(-cols // LANES) * LANES * itemsize


def vmem_bytes(bq: int, bk: int, d: int, itemsize: int, num_bins: int, metric: str) -> int:
    """VMEM one grid step needs: double-buffered input and output blocks, the two
    accumulators, and ~2 [bq, bk] float32 score temporaries (an estimate of Mosaic's)."""
    w = num_positions(num_bins)
    rows = {"ip": 1, "cosine": 2, "l2": 2}[metric]  # [1, bk] rows: offsets (+ norms)
    inputs = _tile_bytes(bq, d, itemsize) + _tile_bytes(bk, d, itemsize)
    inputs += rows * _tile_bytes(1, bk, 4) + (_tile_bytes(bq, 1, 4) if metric == "l2" else 0)
    outputs = 2 * _tile_bytes(bq, w, 4)
    scratch = 2 * (w // LANES) * _tile_bytes(bq, LANES, 4)  # scores and slots
    return 2 * (inputs + outputs) + scratch + 2 * bq * bk * 4


def block_sizes(
    num_queries: int,
    capacity: int,
    block_q: int,
    block_k: int,
    *,
    key_dim: int = 128,
    itemsize: int = 4,
    num_bins: int = 145,
    metric: str = "ip",
) -> tuple[int, int]:
    """(bq, bk) obeying TPU tiling: bq all queries, or (more than block_q of them) the
    fewest blocks of at most block_q rows, of equal size rounded up to a multiple of 8;
    bk a multiple of 128 (capacity >= 128 is required: smaller memories take the
    plain-JAX path). Both are halved while a grid step would need more than VMEM_BUDGET."""
    if block_q % 8 or block_q < 8:
        raise ValueError(f"block_q: expected a positive multiple of 8, got {block_q}")
    if block_k % LANES or block_k < LANES:
        raise ValueError(f"block_k: expected a positive multiple of {LANES}, got {block_k}")
    if num_queries <= block_q:
        bq = num_queries
    else:  # equal blocks, rounded up to 8 rows: Q = 300 -> 2 x 152, not 256 + 44
        blocks = -(-num_queries // block_q)
        bq = 8 * -(-num_queries // (8 * blocks))
    bk = min(block_k, LANES * (capacity // LANES))

    def need(bq, bk):
        return vmem_bytes(bq, bk, key_dim, itemsize, num_bins, metric)

    while need(bq, bk) > VMEM_BUDGET and bk > LANES:
        bk = LANES * max(1, bk // (2 * LANES))
    while need(bq, bk) > VMEM_BUDGET and bq > 8 and bq % 16 == 0:
        bq //= 2
    return bq, bk


def _kernel(
    held_ref,  # scalar prefetch (SMEM): [G] int32 rows held per cell
    q_ref,  # [bq, d]
    k_ref,  # [bk, d]
    off_ref,  # [1, bk] int32: stream offset of each slot (placement table)
    *rest,
    capacity: int,
    num_bins: int,
    metric: str,
    block_k: int,
    exact_f32: bool,
):
    if metric == "ip":
        extra, (best_ref, slot_ref, acc_s, acc_i) = (), rest
    elif metric == "cosine":
        (invk_ref,), (best_ref, slot_ref, acc_s, acc_i) = rest[:1], rest[1:]
        extra = (invk_ref,)
    else:
        extra, (best_ref, slot_ref, acc_s, acc_i) = rest[:2], rest[2:]
    cell, kb = pl.program_id(0), pl.program_id(2)
    nblk = acc_s.shape[0]

    @pl.when(kb == 0)
    def _init():
        acc_s[...] = jnp.full(acc_s.shape, -jnp.inf, jnp.float32)
        acc_i[...] = jnp.full(acc_i.shape, SLOT_NONE, jnp.int32)

    precision = lax.Precision.HIGHEST if exact_f32 else None
    s = lax.dot_general(
        q_ref[...],
        k_ref[...],
        (((1,), (1,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )  # [bq, bk]
    if metric == "cosine":
        s = s * extra[0][...]
    elif metric == "l2":
        qsq_ref, ksq_ref = extra
        s = -jnp.maximum(qsq_ref[...] + ksq_ref[...] - 2 * s, 0)

    base = kb * block_k
    lane_k = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    live = (base + lane_k < capacity) & (off_ref[...] < held_ref[cell])
    # Masks stay [1, lanes] rows: a slot's eligibility enters the comparison as an
    # additive bias (0 or -inf), so no boolean is broadcast over sublanes, and the value
    # kept is the score itself (-0.0 stays -0.0). A NaN score, or +inf + -inf, never
    # wins: NaN > x is False.
    live_bias = jnp.where(live, 0.0, -jnp.inf).astype(jnp.float32)

    lane = lax.broadcasted_iota(jnp.int32, (1, LANES), 1)
    for t in range(block_k // LANES):
        chunk = slice(t * LANES, (t + 1) * LANES)
        c0 = base + t * LANES  # slot of lane 0 of this chunk
        # its position (lax.rem/div: the operands are >= 0, and jnp's floor-mod would
        # lower to a sign op that needs to know the TPU generation)
        o = lax.rem(c0, jnp.int32(num_bins))
        a, r = lax.div(o, jnp.int32(LANES)), lax.rem(o, jnp.int32(LANES))
        # rolled[:, l] = chunk[:, (l - r) mod 128]: lanes l >= r go to block a, the rest
        # (wrapped) to block a + 1
        rolled = pltpu.roll(s[:, chunk], r, 1)
        bias = pltpu.roll(live_bias[:, chunk], r, 1)
        lo = lane >= r
        slot = c0 + jnp.where(lo, lane - r, lane - r + LANES)
        for blk, part in ((a, lo), (a + 1, ~lo)):
            cur_s, cur_i = acc_s[blk], acc_i[blk]
            take = rolled + jnp.where(part, bias, -jnp.inf) > cur_s
            acc_s[blk] = jnp.where(take, rolled, cur_s)
            acc_i[blk] = jnp.where(take, slot, cur_i)

    @pl.when(kb == pl.num_programs(2) - 1)
    def _done():
        for j in range(nblk):
            best_ref[:, j * LANES : (j + 1) * LANES] = acc_s[j]
            slot_ref[:, j * LANES : (j + 1) * LANES] = acc_i[j]


def position_winners(
    queries,
    keys,
    held,
    offsets,
    extra,
    *,
    num_bins: int,
    metric: str,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    interpret=False,
):
    """Per-position (max score, slot) of the strided-bin reduction.

    queries [G, Q, d] and keys [G, C, d] (float32 or bfloat16, the same), held [G] int32,
    offsets [C] int32 (stream offset of each slot), extra: () for "ip", (inv_key_norm
    [G, 1, C],) for "cosine", (q_sq [G, Q, 1], k_sq [G, 1, C]) for "l2". Returns scores
    [G, Q, W] float32 and slots [G, Q, W] int32 (SLOT_NONE where empty), W =
    num_positions(num_bins); position p belongs to bin p mod num_bins."""
    g, nq, d = queries.shape
    cap = keys.shape[1]
    item = jnp.dtype(keys.dtype).itemsize
    bq, bk = block_sizes(
        nq, cap, block_q, block_k, key_dim=d, itemsize=item, num_bins=num_bins, metric=metric
    )
    w = num_positions(num_bins)
    grid = (g, pl.cdiv(nq, bq), pl.cdiv(cap, bk))
    q_spec = pl.BlockSpec((None, bq, d), lambda c, i, j, held: (c, i, 0))
    k_spec = pl.BlockSpec((None, bk, d), lambda c, i, j, held: (c, j, 0))
    row_spec = pl.BlockSpec((None, 1, bk), lambda c, i, j, held: (c, 0, j))
    in_specs = [q_spec, k_spec, pl.BlockSpec((1, bk), lambda c, i, j, held: (0, j))]
    if metric == "cosine":
        in_specs.append(row_spec)
    elif metric == "l2":
        in_specs += [pl.BlockSpec((None, bq, 1), lambda c, i, j, held: (c, i, 0)), row_spec]
    out_spec = pl.BlockSpec((None, bq, w), lambda c, i, j, held: (c, i, 0))
    kernel = functools.partial(
        _kernel,
        capacity=cap,
        num_bins=num_bins,
        metric=metric,
        block_k=bk,
        exact_f32=keys.dtype == jnp.float32,
    )
    nblk = w // LANES
    operands, mat = _same_varying_axes([held, queries, keys, offsets.reshape(1, cap), *extra])
    call = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=grid,
            in_specs=in_specs,
            out_specs=[out_spec, out_spec],
            scratch_shapes=[
                pltpu.VMEM((nblk, bq, LANES), jnp.float32),
                pltpu.VMEM((nblk, bq, LANES), jnp.int32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((g, nq, w), jnp.float32, manual_axis_type=mat),
            jax.ShapeDtypeStruct((g, nq, w), jnp.int32, manual_axis_type=mat),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="knnmem_strided_bins",
        cost_estimate=pl.CostEstimate(
            flops=2 * g * nq * cap * d,
            transcendentals=0,
            bytes_accessed=g * (grid[1] * cap * (d * item + 4) + nq * d * item + 2 * nq * w * 4),
        ),
    )
    return call(*operands)


def _varying(x) -> frozenset:
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def _same_varying_axes(operands):
    """Inside shard_map (check_vma): make every operand vary along the union of the mesh
    axes any operand varies along, and return the type the outputs take from them."""
    axes = frozenset().union(*map(_varying, operands))
    operands = [
        lax.pcast(x, tuple(sorted(axes - _varying(x), key=str)), to="varying")
        if axes - _varying(x)
        else x
        for x in operands
    ]
    return operands, getattr(jax.typeof(operands[2]), "manual_axis_type", None)


def fold_positions(scores, slots, num_bins: int):
    """[..., W] per-position winners -> [..., L] per-bin (max score, lowest slot among the
    maxima; SLOT_NONE where the bin is empty), as the reference's max/argmax."""
    w = scores.shape[-1]
    rows = -(-w // num_bins)
    pad = [(0, 0)] * (scores.ndim - 1) + [(0, rows * num_bins - w)]
    s = jnp.pad(scores, pad, constant_values=-jnp.inf)
    i = jnp.pad(slots, pad, constant_values=SLOT_NONE)
    s = s.reshape(*s.shape[:-1], rows, num_bins)
    i = i.reshape(*i.shape[:-1], rows, num_bins)
    best = jnp.max(s, axis=-2)
    slot = jnp.min(jnp.where(s == best[..., None, :], i, SLOT_NONE), axis=-2)
    slot = jnp.where(best > -jnp.inf, slot, SLOT_NONE)
    return best, slot
