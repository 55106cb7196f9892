"""Exact search (recall_target=1.0) equals a float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

import knnmem
from conftest import Stream, score_tol, untied
from knnmem.eval import exact_search


def check_exact(stream: Stream, queries: np.ndarray, k: int) -> None:
    mem = stream.mem
    res = mem.search(queries, k=k, recall_target=1.0)
    grid = int(np.prod(mem.shape))
    q = queries.reshape(grid, -1, mem.key_dim)
    for cell in range(grid):
        keys, values, first = stream.live(cell)
        at = np.unravel_index(cell, mem.shape)
        # One more than k, so a tie with the first row left out is seen.
        ext_s, ext_i = exact_search(keys, q[cell], k + 1, metric=mem.metric)
        ref_s, ref_i = ext_s[:, :k], ext_i[:, :k]
        tol = score_tol(keys, q[cell])
        got_s, got_i = res.scores[at], res.indices[at]
        live = np.isfinite(ref_s)
        np.testing.assert_array_equal(res.mask[at], live)
        np.testing.assert_allclose(got_s[live], ref_s[live], rtol=0, atol=tol)
        assert np.all(got_s[~live] == -np.inf) and np.all(got_i[~live] == -1)
        sure = untied(ext_s, tol)[:, :k]
        np.testing.assert_array_equal(got_i[sure], ref_i[sure] + first)
        # Keys and values are the rows at the returned positions.
        rows = np.where(live, got_i - first, 0)
        np.testing.assert_array_equal(res.keys[at][live], keys[rows][live])
        np.testing.assert_array_equal(res.values[at][live], values[rows][live])
        assert np.all(res.keys[at][~live] == 0) and np.all(res.values[at][~live] == 0)
        # Best first.
        assert np.all(np.diff(np.maximum(got_s, np.finfo(np.float32).min), axis=-1) <= 0)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("d", [1, 3, 59, 128])
@pytest.mark.parametrize("capacity", [1, 7, 1000])
def test_exact_matches_numpy(metric: str, d: int, capacity: int) -> None:
    rng = np.random.default_rng(d * 1000 + capacity)
    mem = knnmem.Memory((2,), capacity=capacity, key_dim=d, value_dim=5, metric=metric)
    stream = Stream(mem)
    # Segments that under-fill, fill and wrap the ring.
    for t in (capacity // 2 + 1, 3, 2 * capacity + 1):
        stream.add(
            rng.standard_normal((2, t, d)).astype(np.float32),
            rng.standard_normal((2, t, 5)).astype(np.float32),
        )
        queries = rng.standard_normal((2, 9, d)).astype(np.float32)
        for k in sorted({1, min(5, capacity), capacity}):
            check_exact(stream, queries, k)


def test_exact_with_fewer_rows_than_k() -> None:
    rng = np.random.default_rng(5)
    mem = knnmem.Memory((3,), capacity=64, key_dim=8, value_dim=2)
    stream = Stream(mem)
    stream.add(rng.standard_normal((3, 5, 8)), rng.standard_normal((3, 5, 2)))
    check_exact(stream, rng.standard_normal((3, 4, 8)).astype(np.float32), k=12)


def test_approximate_search_is_exact_when_bins_cover_the_memory() -> None:
    # L = bins_for_recall(32, 0.9) = 145 >= 100 rows held: the search is exact.
    rng = np.random.default_rng(6)
    mem = knnmem.Memory(1, capacity=100, key_dim=16, value_dim=16)
    stream = Stream(mem)
    stream.add(rng.standard_normal((1, 100, 16)), rng.standard_normal((1, 100, 16)))
    q = rng.standard_normal((1, 20, 16)).astype(np.float32)
    exact = mem.search(q, k=32, recall_target=1.0)
    approx = mem.search(q, k=32, recall_target=0.9)
    np.testing.assert_array_equal(approx.indices, exact.indices)
    np.testing.assert_array_equal(approx.scores, exact.scores)


def test_metric_scores_on_known_vectors() -> None:
    keys = np.array([[[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]]], np.float32)
    q = np.array([[[2.0, 0.0]]], np.float32)
    values = np.eye(3, dtype=np.float32)[None]
    expect = {
        "ip": ([6.0, 2.0, 0.0], [0, 1, 2]),
        "cosine": ([1.0, 0.6, 0.0], [1, 0, 2]),
        "l2": ([-1.0, -4.0, -17.0], [1, 2, 0]),
    }
    for metric, (scores, order) in expect.items():
        mem = knnmem.Memory(1, capacity=3, key_dim=2, value_dim=3, metric=metric)
        mem.add(keys, values)
        res = mem.search(q, k=3, recall_target=1.0)
        np.testing.assert_allclose(res.scores[0, 0], scores, rtol=1e-6)
        np.testing.assert_array_equal(res.indices[0, 0], order)
        np.testing.assert_array_equal(res.values[0, 0], values[0][order])


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_bfloat16_keys(metric: str) -> None:
    # bfloat16 storage: exact search equals the float64 reference over the keys
    # rounded to bfloat16 (queries may be rounded too, on CPUs with AVX512_BF16);
    # the keys returned are the rounded keys, the values exact.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(8)
    d = 37
    keys = rng.standard_normal((2, 300, d)).astype(np.float32)
    values = rng.standard_normal((2, 300, 4)).astype(np.float32)
    mem = knnmem.Memory(2, capacity=256, key_dim=d, value_dim=4, metric=metric, dtype="bfloat16")
    mem.add(keys, values)
    assert mem.dtype == "bfloat16"
    rounded = keys.astype(ml_dtypes.bfloat16).astype(np.float32)[:, -256:]
    q = rng.standard_normal((2, 11, d)).astype(np.float32)
    res = mem.search(q, k=10, recall_target=1.0)
    ref_s, ref_i = exact_search(rounded, q, 10, metric=metric)
    scale = np.abs(ref_s).max() if metric != "cosine" else 1.0
    np.testing.assert_allclose(res.scores, ref_s, rtol=0, atol=2.0**-7 * scale)
    hits = res.indices - 44  # positions 44..299 are held
    held_keys = np.take_along_axis(rounded[:, None], hits[..., None], 2)
    np.testing.assert_array_equal(res.keys, held_keys)
    np.testing.assert_array_equal(
        res.values, np.take_along_axis(values[:, -256:][:, None], hits[..., None], 2)
    )
    assert np.mean(res.indices == ref_i + 44) > 0.9


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_float16_keys(metric: str) -> None:
    # float16 storage: exact search equals the float64 reference over the keys
    # rounded to float16 (queries stay float32); the keys returned are the rounded
    # keys, bit for bit, and keys beyond float16's range are refused.
    rng = np.random.default_rng(12)
    d = 37
    keys = (rng.standard_normal((2, 300, d)) * [[[1e-6]], [[300.0]]]).astype(np.float32)
    keys[0, :, 0] = 6e-8  # float16 subnormals
    mem = knnmem.Memory(2, capacity=256, key_dim=d, value_dim=1, metric=metric, dtype="float16")
    mem.add(keys, np.zeros((2, 300, 1), np.float32))
    assert mem.dtype == "float16" and mem.nbytes < 2 * 256 * (2 * d + 8) + 4096
    rounded = keys.astype(np.float16).astype(np.float32)[:, -256:]
    q = rng.standard_normal((2, 11, d)).astype(np.float32)
    res = mem.search(q, k=10, recall_target=1.0)
    ref_s, ref_i = exact_search(rounded, q, 10, metric=metric)
    # (l2 cannot rank keys of size 1e-6 against queries of size 6 in float32)
    decided = [1] if metric == "l2" else [0, 1]
    np.testing.assert_array_equal(res.indices[decided], ref_i[decided] + 44)
    for cell in range(2):  # keys of size ~1e-6 and ~300
        scale = np.abs(ref_s[cell]).max()
        np.testing.assert_allclose(res.scores[cell], ref_s[cell], rtol=0, atol=1e-5 * scale)
    held = np.take_along_axis(rounded[:, None], (res.indices - 44)[..., None], 2)
    np.testing.assert_array_equal(res.keys, held)
    big = np.zeros((2, 1, d), np.float32)
    big[1, 0, 3] = 70000.0
    with pytest.raises(
        ValueError, match=r"^keys: expected values within \+-65504 for float16 keys, got 70000"
    ):
        mem.add(big, np.zeros((2, 1, 1), np.float32))
    np.testing.assert_array_equal(mem.written, [300, 300])  # unchanged


def int8_rows(x: np.ndarray) -> np.ndarray:
    """The keys an int8 memory stores for float32 rows x (same float32 steps as the core)."""
    amax = np.abs(x).max(axis=-1, keepdims=True)
    scale = amax / np.float32(127)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0))
    r = x * inv.astype(np.float32)
    q = np.clip(np.trunc(np.where(r < 0, r - np.float32(0.5), r + np.float32(0.5))), -127, 127)
    return (q * scale).astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_int8_keys(metric: str) -> None:
    # int8 storage: scores are those of the stored (quantised) keys against the
    # query quantised to 7 bits; the keys returned are the stored keys exactly.
    rng = np.random.default_rng(10)
    d = 37
    keys = rng.standard_normal((2, 300, d)).astype(np.float32)
    mem = knnmem.Memory(2, capacity=256, key_dim=d, value_dim=1, metric=metric, dtype="int8")
    mem.add(keys, np.zeros((2, 300, 1), np.float32))
    assert mem.dtype == "int8"
    stored = int8_rows(keys[:, -256:])
    q = rng.standard_normal((2, 11, d)).astype(np.float32)
    res = mem.search(q, k=10, recall_target=1.0)
    ref_s, ref_i = exact_search(stored, q, 10, metric=metric)
    scale = np.abs(ref_s).max() if metric != "cosine" else 1.0
    np.testing.assert_allclose(res.scores, ref_s, rtol=0, atol=0.03 * scale)
    held_keys = np.take_along_axis(stored[:, None], (res.indices - 44)[..., None], 2)
    np.testing.assert_array_equal(res.keys, held_keys)
    assert np.mean(res.indices == ref_i + 44) > 0.8


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
def test_quantised_keys_keep_the_recall_target(dtype: str) -> None:
    # Recall against float32 exact top-k on clustered keys: rounding the keys moves
    # near-ties across the k-th, which the bins make up for (README). (Neighbours
    # closer than the rounding -- bfloat16 ~2^-8, int8 ~1/127 of a row's size --
    # cannot be told apart by any search over the rounded keys.)
    rng = np.random.default_rng(9)
    d, n = 64, 16384
    centres = rng.standard_normal((128, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    noise = 0.8 / np.sqrt(d)  # rows about 0.8 from their centre, as in bench/run.py
    keys = centres[np.repeat(rng.integers(0, 128, n // 8), 8)] + noise * rng.standard_normal((n, d))
    keys = (keys / np.linalg.norm(keys, axis=-1, keepdims=True)).astype(np.float32)[None]
    q = centres[rng.integers(0, 128, 1000)] + noise * rng.standard_normal((1000, d))
    q = (q / np.linalg.norm(q, axis=-1, keepdims=True)).astype(np.float32)[None]
    _, truth = exact_search(keys, q, 32)
    mem = knnmem.Memory(1, capacity=n, key_dim=d, value_dim=1, dtype=dtype)
    mem.add(keys, np.zeros((1, n, 1)))
    from knnmem.eval import recall

    assert recall(mem.search(q, k=32, recall_target=0.9).indices, truth) >= 0.9
    assert recall(mem.search(q, k=32, recall_target=1.0).indices, truth) > 0.97
