"""Pure-torch implementation of the knnmem ring: add and strided-bin search.

It runs on any device torch supports and follows the C++ core's algorithm step
for step on the same ring (keys [*shape, capacity, key_dim], values
[*shape, capacity, value_dim], written [*shape] int64; see knnmem.ops); scores
agree with the core's to float rounding (dot products summed in another order),
so the rows found agree up to near-ties:

* row p of a memory's stream lives in slot ``slot_of[p % capacity]``
  (knnmem.ops.placement);
* a memory holding n = min(written, capacity) rows scans the slots whose stream
  offset is < written;
* with L = bins_for_search(k, recall_target, precision) bins (0 = exact), if L == 0 or
  L >= n the answer is the exact top-k, else each query keeps the best slot of
  every bin (bin = slot % L; ties: lowest slot) and returns the exact top-k of
  those winners; if fewer than min(k, n) bins hold a row, the exact top-k;
* results are ordered by (score desc, slot asc); indices are stream positions.

The custom ops of knnmem.torch run it for tensors the C++ core and the CUDA
kernels do not serve: devices other than the CPU and CUDA, CUDA without the
kernels (knnmem.cuda.available() False), and CUDA searches with precision
"bfloat16" / "int8" (the kernels score float32 only). The tests use it as the
reference of the custom ops (knnmem.torch.use_reference runs it on CPU and CUDA
tensors too). It materialises a [grid, query chunk, capacity] score block, so it
is a correctness path, not a fast one. Public path: knnmem.torch_reference.
"""

from __future__ import annotations

import threading

import torch

from .. import eval as _eval
from .. import ops as _ops

__all__ = ["placement", "add", "search"]

_INT64_MIN = -(2**63)
_LOW32 = 2**32 - 1
_PLACEMENT: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
_PLACEMENT_LOCK = threading.Lock()
# Elements of the [grid, queries, slots] score block computed at a time.
_SCORE_BLOCK = 1 << 24


def placement(
    capacity: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_of, offset_of) of knnmem.ops.placement as int64 tensors on `device` (cached)."""
    device = torch.device(device)
    key = (int(capacity), str(device))
    with _PLACEMENT_LOCK:
        hit = _PLACEMENT.get(key)
        if hit is None:
            slot_of, offset_of = _ops.placement(capacity)
            hit = (
                torch.from_numpy(slot_of).to(device=device, dtype=torch.int64),
                torch.from_numpy(offset_of).to(device=device, dtype=torch.int64),
            )
            _PLACEMENT[key] = hit
    return hit


def add(
    keys: torch.Tensor,
    values: torch.Tensor,
    written: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
) -> None:
    """Appends new_keys [*shape, T, key_dim] / new_values [*shape, T, value_dim]
    to the ring in place (FIFO; a segment longer than the capacity keeps its last
    `capacity` rows and positions advance by T). No argument checks."""
    grid = written.numel()
    capacity = keys.shape[-2]
    t = new_keys.shape[-2]
    if grid == 0 or t == 0:
        return
    kept = min(t, capacity)
    slot_of, _ = placement(capacity, keys.device)
    w = written.reshape(grid).to(torch.int64)
    rows = torch.arange(t - kept, t, device=keys.device)
    slots = slot_of[(w[:, None] + rows[None, :]) % capacity]  # [G, kept], distinct per memory
    cells = torch.arange(grid, device=keys.device)[:, None].expand_as(slots)
    k = keys.view(grid, capacity, keys.shape[-1])
    v = values.view(grid, capacity, values.shape[-1])
    nk = new_keys.reshape(grid, t, -1)[:, t - kept :]
    nv = new_values.reshape(grid, t, -1)[:, t - kept :]
    k[cells, slots] = nk.to(k.dtype)
    v[cells, slots] = nv.to(v.dtype)
    written.add_(t)


def _scores(
    k: torch.Tensor, q: torch.Tensor, metric: str, key_aux: torch.Tensor, q_sq: torch.Tensor
) -> torch.Tensor:
    """[G, Q, C] float32 scores as the core computes them (q_sq: |q|^2 of the
    queries before any rounding, for l2)."""
    dots = torch.bmm(q, k.transpose(1, 2))
    if metric == "ip":
        return dots
    if metric == "cosine":
        return dots * key_aux[:, None, :]
    return -(q_sq[:, :, None] + key_aux[:, None, :] - 2.0 * dots).clamp_min(0.0)


def _round_int8(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Rows rounded to `levels` steps of max|row| / levels (halves away from zero)."""
    amax = x.abs().amax(-1, keepdim=True)
    r = x * torch.where(amax > 0, levels / amax, torch.zeros_like(amax))
    steps = torch.trunc(r + torch.copysign(torch.full_like(r, 0.5), r)).clamp(-levels, levels)
    return steps * (amax / levels)


def _round_keys(keys: torch.Tensor, precision: str) -> torch.Tensor:
    """Keys as the core scores them in `precision` (bfloat16: rounded to nearest
    even; int8: per-row scale max|k| / 127)."""
    if precision == "bfloat16":
        return keys.to(torch.bfloat16).to(torch.float32)
    if precision == "int8":
        return _round_int8(keys, 127)
    return keys


def _order_keys(scores: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (score, -slot): the largest key is the best slot
    (highest score, lowest slot among equal scores). Dead slots get INT64_MIN."""
    s = scores + 0.0  # -0.0 -> +0.0
    bits = s.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    c = scores.shape[-1]
    slot_part = _LOW32 - torch.arange(c, device=scores.device, dtype=torch.int64)
    key = ordered * (2**32) + slot_part
    return key.masked_fill(~live[:, None, :], _INT64_MIN)


def _decode_slots(key: torch.Tensor) -> torch.Tensor:
    return _LOW32 - (key & _LOW32)


def search(
    keys: torch.Tensor,
    values: torch.Tensor,
    written: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    recall_target: float,
    metric: str,
    precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Strided-bin search of queries [*shape, Q, key_dim] in the ring; returns
    (scores, indices, keys, values, mask) shaped like knnmem.SearchResult. No
    argument checks (the knnmem.torch ops check before calling). precision "bfloat16" /
    "int8" scores rounded keys (and 7-bit queries for int8) as the core does;
    their scores match the core's to rounding, not bit for bit."""
    shape = tuple(written.shape)
    grid = written.numel()
    capacity, key_dim = keys.shape[-2], keys.shape[-1]
    value_dim = values.shape[-1]
    nq = queries.shape[-2]
    device = keys.device
    kk = keys.reshape(grid, capacity, key_dim).to(torch.float32)
    vv = values.reshape(grid, capacity, value_dim).to(torch.float32)
    w = written.reshape(grid).to(device=device, dtype=torch.int64)
    q = queries.reshape(grid, nq, key_dim).to(device=device, dtype=torch.float32)

    _, offset_of = placement(capacity, device)
    live = offset_of[None, :] < w[:, None]  # [G, C]
    n = torch.clamp(w, max=capacity)
    num_bins = _eval.bins_for_search(k, recall_target, precision)
    if num_bins >= capacity:  # >= the rows any memory holds: exact, and no [grid, L] table
        num_bins = 0
    sk = _round_keys(kk, precision)  # what is scored; kk is what is returned

    if metric == "cosine":
        q_sq = (q * q).sum(-1, keepdim=True)
        q = torch.where(q_sq > 0, q * torch.rsqrt(q_sq.clamp_min(1e-38)), q)
        k_sq = (sk * sk).sum(-1)
        key_aux = torch.where(k_sq > 0, 1.0 / torch.sqrt(k_sq), torch.zeros_like(k_sq))
    elif metric == "l2":
        key_aux = (sk * sk).sum(-1)
    else:
        key_aux = kk.new_zeros(())
    q_sq = (q * q).sum(-1)
    if precision == "int8":
        q = _round_int8(q, 63)

    # Memories answered by bins: L > 0, L < n, and at least min(k, n) bins hold a row.
    bins = None
    binned = torch.zeros(grid, dtype=torch.bool, device=device)
    if num_bins > 0:
        bins = torch.arange(capacity, device=device) % num_bins
        occupied = torch.zeros(grid, num_bins, dtype=torch.int64, device=device)
        occupied.scatter_reduce_(1, bins.expand(grid, capacity), live.long(), reduce="amax")
        binned = (num_bins < n) & (occupied.sum(-1) >= torch.clamp(n, max=k))

    best = torch.full((grid, nq, k), _INT64_MIN, dtype=torch.int64, device=device)
    scores = torch.full((grid, nq, k), float("-inf"), dtype=torch.float32, device=device)
    use_bins = bins is not None and bool(binned.any())
    chunk = max(1, _SCORE_BLOCK // max(1, grid * capacity))
    for q0 in range(0, nq, chunk):
        q1 = min(nq, q0 + chunk)
        s = _scores(sk, q[:, q0:q1], metric, key_aux, q_sq[:, q0:q1])
        order = _order_keys(s, live)  # [G, q, C]
        top = order.topk(k, dim=-1).values
        if use_bins:
            winners = torch.full(
                (grid, q1 - q0, num_bins), _INT64_MIN, dtype=torch.int64, device=device
            )
            winners.scatter_reduce_(2, bins.expand_as(order), order, reduce="amax")
            approx = winners.topk(min(k, num_bins), dim=-1).values
            if approx.shape[-1] < k:
                pad = approx.new_full((grid, q1 - q0, k - approx.shape[-1]), _INT64_MIN)
                approx = torch.cat([approx, pad], -1)
            top = torch.where(binned[:, None, None], approx, top)
        best[:, q0:q1] = top
        hit = top != _INT64_MIN
        slot = torch.where(hit, _decode_slots(top), torch.zeros_like(top))
        picked = torch.gather(s, 2, slot)
        scores[:, q0:q1] = picked.masked_fill(~hit, float("-inf"))

    mask = best != _INT64_MIN
    slots = torch.where(mask, _decode_slots(best), torch.zeros_like(best))
    cells = torch.arange(grid, device=device)[:, None, None]
    out_keys = torch.where(mask[..., None], kk[cells, slots], 0.0)
    out_values = torch.where(mask[..., None], vv[cells, slots], 0.0)
    r = offset_of[slots]
    wg = w[:, None, None]
    positions = r + capacity * torch.div(wg - 1 - r, capacity, rounding_mode="floor")
    indices = torch.where(mask, positions, torch.full_like(positions, -1))

    def back(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*shape, *x.shape[1:])

    return back(scores), back(indices), back(out_keys), back(out_values), back(mask)
