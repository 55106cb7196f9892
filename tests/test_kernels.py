"""Every CPU kernel variant this machine supports agrees with the portable one."""

from __future__ import annotations

import numpy as np
import pytest

import knnmem
from conftest import score_tol, untied
from knnmem import _core

VARIANTS = _core.supported_kernels()


@pytest.fixture
def kernel():
    """Restores the automatic choice after a test that forces a variant."""
    yield _core.set_kernel
    _core.set_kernel("")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def search_with(kernel_name: str, mem: knnmem.Memory, q: np.ndarray, **kw):
    _core.set_kernel(kernel_name)
    assert _core.get_kernel() == kernel_name
    return mem.search(q, **kw)


def test_portable_is_always_supported() -> None:
    assert "portable" in VARIANTS
    assert _core.get_kernel() == VARIANTS[0]  # the best one is the default


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("capacity, d, written", [(113, 59, 100), (1000, 128, 2500), (7, 3, 5)])
def test_variant_matches_portable(kernel, dtype, variant, metric, capacity, d, written) -> None:
    rng = np.random.default_rng(capacity + d)
    mem = knnmem.Memory((2,), capacity=capacity, key_dim=d, value_dim=3, metric=metric, dtype=dtype)
    keys = rng.standard_normal((2, written, d)).astype(np.float32)
    mem.add(keys, rng.standard_normal((2, written, 3)))
    q = rng.standard_normal((2, 53, d)).astype(np.float32)
    k = min(capacity, 17)
    for target in (1.0, 0.9, 0.5):
        want = search_with("portable", mem, q, k=k, recall_target=target)
        got = search_with(variant, mem, q, k=k, recall_target=target)
        tol = score_tol(unit(keys), unit(q)) if metric == "cosine" else score_tol(keys, q)
        if variant == "avx512_vnni_bf16" and dtype == "bfloat16":
            # vdpbf16ps rounds the queries to bfloat16 too: |q - q~| <= 2^-8 |q|.
            tol += 2.0**-7 * tol / (4 * d * np.finfo(np.float32).eps)
        np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=tol)
        np.testing.assert_array_equal(got.mask, want.mask)
        sure = untied(want.scores, tol)
        sure[..., -1] = False  # the k-th may tie with the (k+1)-th, which is not returned
        # Indices agree wherever the score decides them (a different rounding can
        # swap near-ties, and in approximate mode change a bin's winner).
        native_bf16 = variant == "avx512_vnni_bf16" and dtype == "bfloat16"
        assert sure.sum() > (0.05 if native_bf16 else 0.5) * sure.size
        agree = np.mean(got.indices[sure] == want.indices[sure])
        if dtype == "int8":  # every variant computes the same integer dot products
            np.testing.assert_array_equal(got.indices, want.indices)
        # With bfloat16 queries a bin's winner can change whenever two of its
        # scores are within the rounding: more approximate-mode disagreement.
        assert agree == 1.0 if target == 1.0 else agree > (0.9 if native_bf16 else 0.99)


def test_unknown_or_unsupported_kernel(kernel) -> None:
    with pytest.raises(
        ValueError, match=r"^kernel: expected one of 'avx512_vnni_bf16', 'avx512', "
    ):
        _core.set_kernel("sse9")
    for name in {"avx512_vnni_bf16", "avx512", "avx_vnni", "avx2"} - set(VARIANTS):
        with pytest.raises(ValueError, match=r"^kernel: '.*' is not (supported|built)"):
            _core.set_kernel(name)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k", [1, 32, 300])
def test_exact_top_k_keeps_the_first_of_equal_scores(kernel, variant, k) -> None:
    """Exact search of one memory big enough to be cut into slot ranges (whose buffers
    share a lower bound on each query's k-th score) on small-integer data full of equal
    scores: the float64 top-k by (score desc, slot asc), ties included."""
    rng = np.random.default_rng(k)
    capacity, d, written = 40_000, 16, 39_000
    keys = rng.integers(-1, 2, (written, d)).astype(np.float32)
    queries = rng.integers(-1, 2, (40, d)).astype(np.float32)
    mem = knnmem.Memory((1,), capacity=capacity, key_dim=d, value_dim=1)
    mem.add(keys[None], np.zeros((1, written, 1), np.float32))
    got = search_with(variant, mem, queries[None], k=k, recall_target=1.0)
    # one bin per slot: the reference's exact top-k
    want_scores, want_positions = strided_bins_reference(
        keys, written, capacity, queries, k, capacity
    )
    np.testing.assert_array_equal(got.scores[0], want_scores)
    np.testing.assert_array_equal(got.indices[0], want_positions)


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_top_k_keeps_ties_at_another_ranges_bound(kernel, variant) -> None:
    """The slot ranges of an exact search share a bound on each query's k-th score; a
    range that adopts another's bound must keep scores equal to it, which may belong to
    lower slots. Here the second range has 100 scores of 1.0 in its first slots (its
    first compaction publishes 1.0); the first range compacts every few hundred slots on
    rising scores below 1.0 and has its own 1.0s only at its end: they are the answer."""
    capacity, d, k, nq = 40_000, 64, 32, 150  # enough work that the two ranges overlap
    score = np.zeros(capacity, np.float32)
    score[:9900] = np.arange(9900) / 20000  # rising, < 0.5: the first range compacts often
    score[9900:10100] = 1.0  # the end of the first range and the start of the second
    slot_of, _ = knnmem.ops.placement(capacity)
    keys = np.zeros((capacity, d), np.float32)
    keys[:, 0] = score[slot_of]  # row p lands in slot slot_of[p]
    mem = knnmem.Memory((1,), capacity=capacity, key_dim=d, value_dim=1)
    mem.add(keys[None], np.zeros((1, capacity, 1), np.float32))
    q = np.zeros((1, nq, d), np.float32)
    q[..., 0] = 1.0
    threads = knnmem.get_num_threads()
    knnmem.set_num_threads(2)  # the two ranges run at once
    try:
        got = search_with(variant, mem, q, k=k, recall_target=1.0)
    finally:
        knnmem.set_num_threads(threads)
    pos_of_slot = np.argsort(slot_of)
    np.testing.assert_array_equal(got.scores[0], np.ones((nq, k), np.float32))
    np.testing.assert_array_equal(got.indices[0], np.tile(pos_of_slot[9900 : 9900 + k], (nq, 1)))


def strided_bins_reference(keys, written, capacity, queries, k, num_bins):
    """Scores, positions of knnmem's strided-bin search in float64: bin = physical slot
    mod L; a bin keeps its best score and, among equal ones, its lowest slot; the
    top-k of the winners by (score desc, slot asc)."""
    slot_of, _ = knnmem.ops.placement(capacity)
    first = max(0, written - capacity)
    pos_of_slot = np.full(capacity, -1)
    pos_of_slot[slot_of[np.arange(first, written) % capacity]] = np.arange(first, written)
    live = np.nonzero(pos_of_slot >= 0)[0]
    key_at = np.zeros((capacity, keys.shape[-1]))
    key_at[slot_of[np.arange(first, written) % capacity]] = keys[first:written]
    scores, positions = [], []
    for q in queries.astype(np.float64):
        s = key_at[live] @ q
        order = np.lexsort((live, -s, live % num_bins))  # by bin, best first
        first_of_bin = np.r_[True, np.diff((live % num_bins)[order]) != 0]
        win = order[first_of_bin]
        top = win[np.lexsort((live[win], -s[win]))][:k]
        scores.append(s[top])
        positions.append(pos_of_slot[live[top]])
    return np.array(scores), np.array(positions)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k, target", [(32, 0.9), (8, 0.95), (5, 0.6)])
def test_bins_keep_the_first_of_equal_scores(kernel, dtype, variant, k, target) -> None:
    """Keys and queries of small integers score exactly in every format, with many
    equal scores: every variant's bins (strided tiles reduced in registers, blocks
    of slots, ranges split over threads, a partly written block) pick the winners
    of the float64 reference, ties included."""
    rng = np.random.default_rng(k)
    capacity, d, written = 20_000, 16, 19_000
    keys = rng.integers(-1, 2, (written, d)).astype(np.float32)
    queries = rng.integers(-1, 2, (40, d)).astype(np.float32)
    mem = knnmem.Memory((1,), capacity=capacity, key_dim=d, value_dim=1, dtype=dtype)
    mem.add(keys[None], np.zeros((1, written, 1), np.float32))
    got = search_with(variant, mem, queries[None], k=k, recall_target=target)
    num_bins = knnmem.eval.bins_for_search(k, target, dtype)
    want_scores, want_positions = strided_bins_reference(
        keys, written, capacity, queries, k, num_bins
    )
    np.testing.assert_array_equal(got.scores[0], want_scores)
    np.testing.assert_array_equal(got.indices[0], want_positions)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["int8", "bfloat16", "float32"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("d", [3, 16, 59, 128])
def test_row_pack_matches_memory(kernel, variant, dtype, metric, d) -> None:
    """knnmem.ops with a precision converts its rows with the variant's pack
    (cpu/pack_impl.hpp; AVX-512 intrinsics for int8 and bfloat16); Memory(dtype)
    stores them with the baseline store_key. Same words, scales, sums and norms, so
    the same scores, bit for bit -- denormal rows included."""
    kernel(variant)
    rng = np.random.default_rng(d)
    shape, capacity = (2,), 700
    keys, values, written = knnmem.ops.init(shape, capacity, d, 2)
    mem = knnmem.Memory(shape, capacity, d, 2, metric=metric, dtype=dtype)
    rows = rng.standard_normal((*shape, 900, d)) * rng.uniform(0.1, 10, (*shape, 900, 1))
    rows[:, ::50] *= 1e-39  # denormal floats: rounded to bfloat16 as the scalar code does
    rows = rows.astype(np.float32)
    vals = rng.standard_normal((*shape, 900, 2)).astype(np.float32)
    knnmem.ops.add(keys, values, written, rows, vals)
    mem.add(rows, vals)
    q = rng.standard_normal((*shape, 21, d)).astype(np.float32)
    for target in (0.9, 1.0):
        a = mem.search(q, k=16, recall_target=target)
        b = knnmem.ops.search(
            keys, values, written, q, k=16, recall_target=target, metric=metric, precision=dtype
        )
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.indices, b.indices)
