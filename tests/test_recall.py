"""Approximate search: recall follows the formula on random AND structured streams.

The structured streams are the cases where a naive placement (bins of
consecutive rows, or rows strided by stream order) loses recall: consecutive
near-duplicates, segments that repeat with a period, and a few very popular
keys. The placement of rows randomises which bin a row lands in, so the mean
recall must match r(L) whatever the stream.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import knnmem
from knnmem.eval import bins_for_recall, bins_for_search, expected_recall, recall

CAPACITY = 32768
DIM = 16
NUM_QUERIES = 3000
SEGMENT = 512


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_stream(rng: np.random.Generator, n: int) -> np.ndarray:
    return unit(rng.standard_normal((n, DIM)))


def near_duplicate_stream(rng: np.random.Generator, n: int) -> np.ndarray:
    # A slow random walk that jumps every ~200 rows: neighbours are near-duplicates.
    steps = 0.05 * rng.standard_normal((n, DIM))
    jumps = rng.random(n) < 1 / 200
    steps[jumps] = rng.standard_normal((int(jumps.sum()), DIM))
    return unit(np.cumsum(steps, axis=0) + 0.01 * rng.standard_normal((n, DIM)))


def periodic_stream(rng: np.random.Generator, n: int, period: int = 160 * 3) -> np.ndarray:
    # One segment repeated with small noise; the period is a multiple of the
    # bin count at k=32/0.9 (L=160), the worst case for modular strides.
    base = rng.standard_normal((period, DIM))
    reps = -(-n // period)
    return unit(np.tile(base, (reps, 1))[:n] + 0.05 * rng.standard_normal((n, DIM)))


def popular_stream(rng: np.random.Generator, n: int) -> np.ndarray:
    # One row in eight is a noisy copy of one of 16 popular keys.
    rows = rng.standard_normal((n, DIM))
    popular = rng.standard_normal((16, DIM))
    hot = np.flatnonzero(rng.random(n) < 1 / 8)
    rows[hot] = popular[rng.integers(0, 16, hot.size)] + 0.05 * rng.standard_normal((hot.size, DIM))
    return unit(rows)


STREAMS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "random": random_stream,
    "near_duplicates": near_duplicate_stream,
    "periodic": periodic_stream,
    "popular": popular_stream,
}


@pytest.fixture(scope="module", params=list(STREAMS))
def filled(request: pytest.FixtureRequest) -> tuple[knnmem.Memory, np.ndarray, dict]:
    """A memory that has wrapped (1.5 x capacity rows, in segments), queries near
    its live rows, and the exact top-k of each query per k."""
    rng = np.random.default_rng(list(STREAMS).index(request.param) + 11)
    n = CAPACITY + CAPACITY // 2
    stream = STREAMS[request.param](rng, n)
    mem = knnmem.Memory(1, capacity=CAPACITY, key_dim=DIM, value_dim=1)
    for start in range(0, n, SEGMENT):
        seg = stream[None, start : start + SEGMENT]
        mem.add(seg, np.zeros(seg.shape[:-1] + (1,), np.float32))
    live = stream[n - CAPACITY :]
    picks = rng.integers(0, CAPACITY, NUM_QUERIES)
    queries = unit(live[picks] + 0.05 * rng.standard_normal((NUM_QUERIES, DIM)))[None]
    exact = {k: mem.search(queries, k=k, recall_target=1.0).indices for k in (1, 8, 32, 128)}
    return mem, queries, exact


@pytest.mark.parametrize("k", [1, 8, 32, 128])
@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_recall_follows_formula(filled, k: int, target: float) -> None:
    mem, queries, exact = filled
    num_bins = bins_for_search(k, target)
    predicted = expected_recall(num_bins, k)
    assert predicted >= target
    found = mem.search(queries, k=k, recall_target=target)
    measured = recall(found.indices, exact[k])
    assert abs(measured - predicted) <= 0.01, (measured, predicted, num_bins)


def test_bins_for_recall_values() -> None:
    # docs/design.md: k=32 needs 145 bins for 0.9 and 300 for 0.95.
    assert bins_for_recall(32, 0.9) == 145
    assert bins_for_recall(32, 0.95) == 300
    assert bins_for_recall(1, 0.5) == 1
    assert bins_for_recall(7, 1.0) == 0
    for k in (1, 8, 32, 128):
        for target in (0.5, 0.8, 0.9, 0.95, 0.99):
            L = bins_for_recall(k, target)
            assert expected_recall(L, k) >= target
            assert L == k or expected_recall(L - 1, k) < target


def test_bins_for_search_raise_the_target_for_rounded_keys() -> None:
    assert bins_for_recall(32, 0.92) == 184
    assert bins_for_search(32, 0.9, "bfloat16") == 192
    assert bins_for_search(32, 0.9, "int8") == 192
    assert bins_for_search(32, 1.0, "int8") == 0


def test_bins_for_search_come_in_groups_of_16() -> None:
    # 16 or more bins are rounded up to a multiple of 16 (the CPU kernels' vectors).
    assert bins_for_search(32, 0.9) == 160 and bins_for_search(32, 0.95) == 304
    assert bins_for_search(1, 0.5) == 1 and bins_for_search(7, 1.0) == 0
    for k in (1, 8, 32, 128):
        for target in (0.5, 0.8, 0.9, 0.95, 0.99):
            least, bins = bins_for_recall(k, target), bins_for_search(k, target)
            assert bins == least if least < 16 else (bins % 16 == 0 and least <= bins < least + 16)


def test_expected_recall_formula() -> None:
    for L, k in [(145, 32), (300, 32), (10, 3), (1000, 128)]:
        assert expected_recall(L, k) == pytest.approx((L / k) * (1 - (1 - 1 / L) ** k), rel=1e-12)
    assert expected_recall(1, 1) == 1.0
    assert expected_recall(1, 4) == 0.25


def test_recall_at_default_target_with_many_memories() -> None:
    # The same promise holds per memory of a grid filled with structured rows.
    rng = np.random.default_rng(3)
    mem = knnmem.Memory((2, 3), capacity=8192, key_dim=DIM, value_dim=DIM)
    rows = np.stack([near_duplicate_stream(rng, 8192) for _ in range(6)]).reshape(2, 3, 8192, DIM)
    mem.add(rows, rows)
    queries = unit(rows[:, :, ::16] + 0.05 * rng.standard_normal((2, 3, 512, DIM)))
    exact = mem.search(queries, k=32, recall_target=1.0)
    approx = mem.search(queries, k=32)
    predicted = expected_recall(bins_for_search(32, 0.9), 32)
    for cell in np.ndindex(2, 3):
        assert abs(recall(approx.indices[cell], exact.indices[cell]) - predicted) <= 0.02
    # Returned keys/values are the stored rows of the returned positions.
    np.testing.assert_array_equal(approx.keys, approx.values)


def test_bins_strided_in_stream_order_would_fail_the_periodic_stream() -> None:
    # Why rows are placed pseudo-randomly: lay the same rows out in stream order
    # (slot = position, bins strided over it) through knnmem.ops and the periodic
    # stream, whose period is a multiple of L, loses almost all of its top-k.
    rng = np.random.default_rng(4)
    rows = periodic_stream(rng, CAPACITY)
    queries = unit(rows[rng.integers(0, CAPACITY, 500)] + 0.05 * rng.standard_normal((500, DIM)))
    values = np.zeros((1, CAPACITY, 1), np.float32)
    written = np.array([CAPACITY])
    slot_of, _ = knnmem.ops.placement(CAPACITY)
    in_stream_order = knnmem.ops.search(rows[None], values, written, queries[None], k=32)
    exact = knnmem.ops.search(rows[None], values, written, queries[None], k=32, recall_target=1.0)
    # The ring holds stream row `slot` in each slot; positions map back through slot_of.
    assert recall(slot_of[in_stream_order.indices], slot_of[exact.indices]) < 0.2
    placed = np.empty_like(rows)
    placed[slot_of] = rows  # the layout knnmem.Memory writes
    approx = knnmem.ops.search(placed[None], values, written, queries[None], k=32)
    exact = knnmem.ops.search(placed[None], values, written, queries[None], k=32, recall_target=1.0)
    assert abs(recall(approx.indices, exact.indices) - expected_recall(160, 32)) <= 0.02
