"""FIFO order, wrap-around, clear, positions, empty memories, and the functional ops."""

from __future__ import annotations

import numpy as np
import pytest

import knnmem
from conftest import Stream


def rows(rng: np.random.Generator, shape: tuple, t: int, d: int) -> np.ndarray:
    return rng.standard_normal((*shape, t, d)).astype(np.float32)


def held(mem: knnmem.Memory, cell: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, keys, values) a memory holds, read back by an exact search of
    k=capacity with a zero query (every live row scores 0 and is returned)."""
    q = np.zeros((*mem.shape, 1, mem.key_dim), np.float32)
    res = mem.search(q, k=mem.capacity, recall_target=1.0)
    m = res.mask[cell][0]
    order = np.argsort(res.indices[cell][0][m])
    return (
        res.indices[cell][0][m][order],
        res.keys[cell][0][m][order],
        res.values[cell][0][m][order],
    )


def test_fifo_order_and_wrap_around() -> None:
    rng = np.random.default_rng(0)
    mem = knnmem.Memory((2, 2), capacity=10, key_dim=3, value_dim=2)
    stream = Stream(mem)
    total = 0
    for t in (4, 0, 5, 3, 11, 25, 1):
        stream.add(rows(rng, (2, 2), t, 3), rows(rng, (2, 2), t, 2))
        total += t
        np.testing.assert_array_equal(mem.written, np.full((2, 2), total))
        np.testing.assert_array_equal(mem.count, np.full((2, 2), min(total, 10)))
        for cell in np.ndindex(2, 2):
            keys, values, first = stream.live(int(np.ravel_multi_index(cell, (2, 2))))
            pos, k, v = held(mem, cell)
            np.testing.assert_array_equal(pos, np.arange(first, total))
            np.testing.assert_array_equal(k, keys)
            np.testing.assert_array_equal(v, values)


def test_segment_longer_than_capacity_keeps_the_last_rows() -> None:
    rng = np.random.default_rng(1)
    mem = knnmem.Memory(1, capacity=7, key_dim=4, value_dim=4)
    keys = rows(rng, (1,), 30, 4)
    mem.add(keys, keys)
    pos, k, _ = held(mem, (0,))
    np.testing.assert_array_equal(pos, np.arange(23, 30))
    np.testing.assert_array_equal(k, keys[0, 23:])
    assert mem.written[0] == 30 and mem.count[0] == 7


@pytest.mark.parametrize(
    "which, cleared",
    [
        (None, [0, 1, 2, 3, 4, 5]),
        (np.array([[True, False, False], [False, False, True]]), [0, 5]),
        ((1, 2), [5]),
        (([0, 1], [1, 0]), [1, 3]),
        (1, [3, 4, 5]),
        ([0], [0, 1, 2]),
        (-1, [3, 4, 5]),
    ],
)
def test_clear_single_memories(which, cleared: list[int]) -> None:
    rng = np.random.default_rng(2)
    mem = knnmem.Memory((2, 3), capacity=16, key_dim=5, value_dim=1)
    stream = Stream(mem)
    stream.add(rows(rng, (2, 3), 20, 5), rows(rng, (2, 3), 20, 1))
    before = {cell: held(mem, cell) for cell in np.ndindex(2, 3)}
    mem.clear(which)
    for flat, cell in enumerate(np.ndindex(2, 3)):
        if flat in cleared:
            assert mem.count[cell] == 0 and mem.written[cell] == 0
            assert held(mem, cell)[0].size == 0
        else:
            assert mem.count[cell] == 16 and mem.written[cell] == 20
            for a, b in zip(held(mem, cell), before[cell]):
                np.testing.assert_array_equal(a, b)


def test_positions_restart_after_clear() -> None:
    rng = np.random.default_rng(3)
    mem = knnmem.Memory(2, capacity=8, key_dim=2, value_dim=2)
    mem.add(rows(rng, (2,), 13, 2), rows(rng, (2,), 13, 2))
    mem.clear([0])
    new = rows(rng, (2,), 3, 2)
    mem.add(new, new)
    pos, k, _ = held(mem, (0,))
    np.testing.assert_array_equal(pos, [0, 1, 2])
    np.testing.assert_array_equal(k, new[0])
    pos, _, _ = held(mem, (1,))
    np.testing.assert_array_equal(pos, np.arange(8, 16))


def test_empty_and_partly_filled_memories() -> None:
    rng = np.random.default_rng(4)
    mem = knnmem.Memory((3,), capacity=100, key_dim=6, value_dim=3)
    q = rows(rng, (3,), 4, 6)
    res = mem.search(q, k=5)
    assert res.scores.shape == (3, 4, 5) and res.keys.shape == (3, 4, 5, 6)
    assert res.values.shape == (3, 4, 5, 3)
    assert np.all(res.scores == -np.inf) and np.all(res.indices == -1)
    assert not res.mask.any() and not res.keys.any() and not res.values.any()
    mem.add(rows(rng, (3,), 2, 6), rows(rng, (3,), 2, 3))
    res = mem.search(q, k=5, recall_target=0.5)
    assert res.mask[..., :2].all() and not res.mask[..., 2:].any()
    assert np.all(res.indices[..., 2:] == -1) and np.all(res.indices[..., :2] >= 0)
    assert np.all(np.isfinite(res.scores[..., :2]))


@pytest.mark.parametrize("held", [32, 33, 40, 200])
def test_a_memory_holding_k_rows_returns_k_entries(held: int) -> None:
    # Bins are strided over physical slots; in a memory that is far from full most
    # bins are empty, and a search must still return min(k, held) entries.
    rng = np.random.default_rng(held)
    mem = knnmem.Memory(2, capacity=65536, key_dim=8, value_dim=1)
    mem.add(rows(rng, (2,), held, 8), rows(rng, (2,), held, 1))
    for target in (0.5, 0.9):
        res = mem.search(rows(rng, (2,), 16, 8), k=32, recall_target=target)
        assert res.mask.all()
        assert np.all((res.indices >= 0) & (res.indices < held))


def test_search_with_no_queries_and_add_with_no_rows() -> None:
    mem = knnmem.Memory((2,), capacity=4, key_dim=3, value_dim=3)
    mem.add(np.zeros((2, 0, 3)), np.zeros((2, 0, 3)))
    assert mem.written.tolist() == [0, 0]
    res = mem.search(np.zeros((2, 0, 3), np.float32), k=2)
    assert res.indices.shape == (2, 0, 2) and res.keys.shape == (2, 0, 2, 3)


def test_description() -> None:
    mem = knnmem.Memory((2, 8), capacity=64, key_dim=33, value_dim=7, metric="cosine")
    assert mem.shape == (2, 8) and mem.capacity == 64 and mem.key_dim == 33
    assert mem.value_dim == 7 and mem.dtype == "float32" and mem.metric == "cosine"
    assert mem.count.shape == (2, 8) and mem.count.dtype == np.int64
    # float32 keys, a norm term per slot and values; counters; placement tables.
    assert mem.nbytes == 16 * 64 * (33 + 1 + 7) * 4 + 16 * 8 + 64 * 8
    assert knnmem.Memory(3, capacity=5, key_dim=2).value_dim == 2
    assert "capacity=64" in repr(mem)


def test_placement_is_a_blockwise_permutation() -> None:
    block = knnmem._core.PLACEMENT_BLOCK
    for capacity in (1, 7, 1000, block + 1234):
        slot_of, offset_of = knnmem.ops.placement(capacity)
        np.testing.assert_array_equal(np.sort(slot_of), np.arange(capacity))
        np.testing.assert_array_equal(offset_of[slot_of], np.arange(capacity))
        np.testing.assert_array_equal(slot_of // block, np.arange(capacity) // block)
    slot_of, _ = knnmem.ops.placement(1000)
    assert np.mean(np.diff(slot_of) == 1) < 0.05  # not the identity in disguise


def check_memory_equals_ops(
    shape: tuple, capacity: int, d: int, metric: str, target: float, dtype: str, steps: tuple
) -> None:
    """Adds the segments of `steps` (rows per memory; 0 clears the first memory) to a
    Memory(dtype) and to ops arrays, and after each compares Memory.search with
    ops.search(precision=dtype): they score exactly alike; only the returned keys
    differ (the rows, not their rounding)."""
    rng = np.random.default_rng(5)
    dv = 5
    mem = knnmem.Memory(shape, capacity, d, dv, metric=metric, dtype=dtype)
    keys, values, written = knnmem.ops.init(shape, capacity, d, dv)
    cells = np.arange(int(np.prod(shape))).reshape(shape)
    for t in steps:
        if t == 0:
            first = np.zeros(shape, bool)
            first.flat[0] = True
            mem.clear(first)
            written[first] = 0  # the ops state of an empty memory
            continue
        k, v = rows(rng, shape, t, d), rows(rng, shape, t, dv)
        mem.add(k, v)
        knnmem.ops.add(keys, values, written, k, v)
        np.testing.assert_array_equal(written, mem.written)
        q = rows(rng, shape, 33, d)
        a = mem.search(q, k=40, recall_target=target)
        b = knnmem.ops.search(
            keys, values, written, q, k=40, recall_target=target, metric=metric, precision=dtype
        )
        for name in ("scores", "indices", "values", "mask"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        if dtype == "float32":
            np.testing.assert_array_equal(a.keys, b.keys)
        else:  # the stored rows at the returned positions, and Memory's rounding of them
            slots = knnmem.ops.placement(capacity)[0][b.indices % capacity]
            flat = keys.reshape(cells.size, capacity, d)
            want = flat[cells[..., None, None], np.where(b.mask, slots, 0)]
            np.testing.assert_array_equal(b.keys, np.where(b.mask[..., None], want, 0))
            tol = 1 / 64 if dtype == "int8" else 1 / 128
            np.testing.assert_allclose(a.keys, b.keys, atol=tol * np.abs(keys).max())


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("target", [0.9, 1.0])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_ops_equal_memory(metric: str, target: float, dtype: str) -> None:
    check_memory_equals_ops((2, 3), 300, 59, metric, target, dtype, (100, 250, 7))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_results_of_big_memories_equal_ops(dtype: str) -> None:
    """Memories with over 4 MiB of keys copy their results' keys and values panel by
    panel once every memory is searched (search.cpp, Gather), smaller ones per piece of
    queries: same results, including a memory holding fewer rows than k (zero
    keys/values for the misses)."""
    check_memory_equals_ops((2,), 36_000, 130, "ip", 0.9, dtype, (20_000, 0, 30, 16_500))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "float16"])
def test_results_bigger_than_the_caches(dtype: str) -> None:
    """Keys and values of results over 8 MiB are written with streaming stores, the keys
    straight from the panels (float32, bfloat16, int8): the same results as the same
    queries searched a few at a time (small results, copied through a row), and for
    float32 keys the same as knnmem.ops."""
    rng = np.random.default_rng(11)
    shape, capacity, d = (4,), 4096, 64
    mem = knnmem.Memory(shape, capacity, d, d, dtype=dtype)
    keys, values, written = knnmem.ops.init(shape, capacity, d, d)
    for _ in range(2):
        k, v = rows(rng, shape, 3000, d), rows(rng, shape, 3000, d)
        mem.add(k, v)
        knnmem.ops.add(keys, values, written, k, v)
    q = rows(rng, shape, 300, d)  # 4 x 300 x 32 results x 128 floats: 19.7 MB
    a = mem.search(q, k=32)
    parts = [mem.search(q[:, i : i + 50], k=32) for i in range(0, 300, 50)]  # 3.3 MB each
    for name in ("scores", "indices", "keys", "values", "mask"):
        small = np.concatenate([getattr(r, name) for r in parts], axis=1)
        np.testing.assert_array_equal(getattr(a, name), small, err_msg=name)
    if dtype == "float32":
        b = knnmem.ops.search(keys, values, written, q, k=32)
        for name in ("scores", "indices", "keys", "values", "mask"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_zero_keys_tie_by_slot() -> None:
    """Under cosine a zero key scores 0 (its 1/|k| is 0): with every other key scoring
    below 0, the top k are all ties at 0 (more of them than k in every bin), returned
    lowest slot first in both modes, as by the reference."""
    rng = np.random.default_rng(12)
    capacity, d = 2048, 8
    k = -np.abs(rows(rng, (1,), capacity, d))  # every key scores < 0 against q > 0 ...
    k[0, ::3] = 0.0  # ... but a third, the zero keys
    mem = knnmem.Memory(1, capacity, d, 1, metric="cosine")
    keys, values, written = knnmem.ops.init((1,), capacity, d, 1)
    v = rows(rng, (1,), capacity, 1)
    mem.add(k, v)
    knnmem.ops.add(keys, values, written, k, v)
    q = np.abs(rows(rng, (1,), 5, d))
    for target in (0.9, 1.0):
        a = mem.search(q, k=32, recall_target=target)
        b = knnmem.ops.search(keys, values, written, q, k=32, recall_target=target, metric="cosine")
        assert np.all(a.scores == 0.0)
        np.testing.assert_array_equal(a.indices, b.indices)


def test_results_follow_the_queries_framework() -> None:
    torch = pytest.importorskip("torch")
    mem = knnmem.Memory(1, capacity=8, key_dim=4)
    x = np.eye(4, dtype=np.float32)[None]
    mem.add(torch.from_numpy(x), x)
    res = mem.search(torch.from_numpy(x), k=1)
    assert isinstance(res.indices, torch.Tensor)
    assert res.indices[0, :, 0].tolist() == [0, 1, 2, 3]


def test_search_into_given_result_arrays() -> None:
    rng = np.random.default_rng(6)
    mem = knnmem.Memory((2, 3), capacity=50, key_dim=5, value_dim=2)
    mem.add(rows(rng, (2, 3), 60, 5), rows(rng, (2, 3), 60, 2))
    q = rows(rng, (2, 3), 7, 5)
    out = mem.search(q, k=4)
    fresh = mem.search(q * 2, k=4)
    again = mem.search(q * 2, k=4, out=out)
    assert again is out
    for a, b in zip(out, fresh):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(
        ValueError, match=r"^out: scores must have shape \(2, 3, 7, 5\), got \(2, 3, 7, 4\)$"
    ):
        mem.search(q, k=5, out=out)
    bad = out._replace(keys=out.keys.astype(np.float64))
    with pytest.raises(TypeError, match=r"^out: keys must have dtype float32, float16 or bfloat16"):
        mem.search(q, k=4, out=bad)
    bad = out._replace(scores=out.scores.astype(np.float64))
    with pytest.raises(ValueError, match=r"^out: scores must be a writeable C-contiguous array"):
        mem.search(q, k=4, out=bad)
    with pytest.raises(TypeError, match=r"^out: expected a SearchResult"):
        mem.search(q, k=4, out=[1, 2])
