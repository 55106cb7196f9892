"""knnmem.pallas: the TPU kernel, run by the Pallas interpreters on CPU, finds the same bin
winners as knnmem.jax's pure-JAX reference, bin for bin, and search(impl="pallas") equals
the reference field for field; the kernel lowers for TPU (Mosaic) on this CPU machine.

Most data here are small integers: every dot product is then exact in float32 whatever
the order of summation, so the comparison sees only the reduction (and scores tie often,
which exercises the lowest-slot rule). Gaussian data are compared to rounding."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402

pl = pytest.importorskip("jax.experimental.pallas")
pltpu = pytest.importorskip("jax.experimental.pallas.tpu")

import knnmem  # noqa: E402
import knnmem.jax as kj  # noqa: E402
import knnmem.pallas as kp  # noqa: E402
from knnmem import _core  # noqa: E402

# The reference's internals that the kernel replaces or shares (its scores and its bin
# winners): the tests compare the kernel with them piece by piece, below the public search.
from knnmem.jax._reference import _bin_winners, _scores  # noqa: E402

FIELDS = knnmem.SearchResult._fields


def small_ints(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(-3, 4, shape).astype(np.float32)


def unit_dyadic_queries(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Queries with four entries +-1 (norm 2): normalised for cosine they stay exact."""
    *lead, d = shape
    q = np.zeros(shape, np.float32)
    for idx in np.ndindex(*lead):
        q[idx][rng.choice(d, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return q


def reference_winners(queries, keys, held, num_bins, metric):
    """The reference's bin winners (_bin_winners over its masked scores)."""
    cap = keys.shape[1]
    s = _scores(jnp.asarray(queries, jnp.float32), jnp.asarray(keys, jnp.float32), metric)
    offsets = jnp.asarray(knnmem.ops.placement(cap)[1])
    live = offsets[None, :] < jnp.asarray(held)[:, None]
    s = jnp.where(live[:, None, :] & ~jnp.isnan(s), s, -jnp.inf)
    return _bin_winners(s, num_bins)


def assert_same_winners(ref, got, what=""):
    (rb, rs), (gb, gs) = (tuple(map(np.asarray, x)) for x in (ref, got))
    assert rb.shape == gb.shape, (what, rb.shape, gb.shape)
    assert np.array_equal(rb, gb), (what, "scores", np.mean(rb != gb))
    assert np.array_equal(rs, gs), (what, "slots", np.mean(rs != gs))


# (dtype, metric, grid, Q, capacity, d, k, recall_target, held, block_q, block_k):
# partial query and key blocks, d not a multiple of 128, L from 1 to 300 (1 to 4
# 128-lane blocks of positions), empty, sparse, full memories
CASES = [
    ("float32", "ip", 2, 13, 1000, 59, 32, 0.9, [1000, 700], 8, 256),
    ("float32", "cosine", 2, 1, 389, 128, 8, 0.9, [389, 200], 8, 128),
    ("float32", "l2", 3, 40, 640, 16, 32, 0.95, [640, 1, 0], 16, 128),
    ("float32", "ip", 1, 7, 300, 5, 1, 0.5, [300], 8, 512),
    ("bfloat16", "ip", 2, 9, 777, 33, 32, 0.9, [777, 500], 8, 256),
    ("bfloat16", "l2", 1, 24, 1024, 64, 4, 0.9, [1000], 16, 256),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-C{c[4]}-d{c[5]}")
def test_bin_winners_equal_reference(case) -> None:
    dtype, metric, g, nq, cap, d, k, target, held, bq, bk = case
    rng = np.random.default_rng(cap + d)
    keys = small_ints(rng, g, cap, d)
    queries = (unit_dyadic_queries if metric == "cosine" else small_ints)(rng, g, nq, d)
    nb = _core.bins_for_recall(k, target)
    assert 0 < nb < cap
    ref = reference_winners(queries, keys, held, nb, metric)
    got = kp.bin_winners(
        jnp.asarray(queries, dtype),
        jnp.asarray(keys, dtype),
        jnp.asarray(held, jnp.int32),
        nb,
        metric,
        block_q=bq,
        block_k=bk,
        interpret=True,
    )
    assert_same_winners(ref, got, case)
    # not vacuous: exactly the bins that hold a live slot have winners
    offsets = knnmem.ops.placement(cap)[1]
    for cell, h in enumerate(held):
        occupied = np.unique(np.nonzero(offsets < h)[0] % nb).size
        assert np.all(np.isfinite(np.asarray(got[0])[cell]).sum(-1) == occupied), (cell, h)


@pytest.mark.skipif(not hasattr(pltpu, "InterpretParams"), reason="no TPU interpret mode")
def test_tpu_interpret_mode_equals_reference() -> None:
    """pltpu.InterpretParams: the TPU interpreter (scalar prefetch in SMEM, VMEM scratch,
    the grid run in order) gives the same winners."""
    rng = np.random.default_rng(5)
    g, nq, cap, d, nb = 2, 11, 700, 40, 145
    keys, queries = small_ints(rng, g, cap, d), small_ints(rng, g, nq, d)
    held = [700, 333]
    got = kp.bin_winners(
        jnp.asarray(queries),
        jnp.asarray(keys),
        jnp.asarray(held, jnp.int32),
        nb,
        "ip",
        block_q=8,
        block_k=256,
        interpret=pltpu.InterpretParams(),
    )
    assert_same_winners(reference_winners(queries, keys, held, nb, "ip"), got)


def test_gaussian_data_agree_to_rounding() -> None:
    """On real-valued data the kernel's dot sums in another order than the reference's
    einsum: scores agree to float32 rounding, slots wherever a bin has no near-tie."""
    rng = np.random.default_rng(9)
    g, nq, cap, d, nb = 2, 16, 1500, 64, 145
    keys = rng.standard_normal((g, cap, d), dtype=np.float32)
    queries = rng.standard_normal((g, nq, d), dtype=np.float32)
    held = [1500, 1200]
    rb, rs = map(np.asarray, reference_winners(queries, keys, held, nb, "ip"))
    gb, gs = map(
        np.asarray,
        kp.bin_winners(
            jnp.asarray(queries),
            jnp.asarray(keys),
            jnp.asarray(held, jnp.int32),
            nb,
            "ip",
            block_k=512,
            interpret=True,
        ),
    )
    np.testing.assert_allclose(gb, rb, rtol=1e-5, atol=1e-5)
    # the runner-up score in each bin, to find near-ties
    s = np.asarray(_scores(jnp.asarray(queries), jnp.asarray(keys), "ip"))
    live = knnmem.ops.placement(cap)[1][None, :] < np.asarray(held)[:, None]
    s = np.where(live[:, None, :], s, -np.inf)
    rows = -(-cap // nb)
    sp = np.pad(s, ((0, 0), (0, 0), (0, rows * nb - cap)), constant_values=-np.inf)
    second = np.sort(sp.reshape(g, nq, rows, nb), axis=2)[:, :, -2, :]
    firm = rb - second > 1e-4
    assert firm.mean() > 0.99
    assert np.array_equal(gs[firm], rs[firm])


def fill(rng, state, n, d, dv):
    shape = state.shape
    return kj.add(state, small_ints(rng, *shape, n, d), small_ints(rng, *shape, n, dv))


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_search_pallas_equals_reference(metric: str) -> None:
    """search(impl="pallas") == search(impl="reference") in every field: wrapped rings,
    a reset memory, one with fewer rows than bins (the exact fallback), an empty one;
    exact mode and vmap (ip)."""
    rng = np.random.default_rng({"ip": 1, "cosine": 2, "l2": 3}[metric])
    shape, cap, d, dv, nq = (2, 2), 600, 24, 3, 10
    state = fill(rng, kj.init(shape, cap, d, dv, metric=metric), 1100, d, dv)  # wrapped
    state = kj.reset(state, jnp.asarray([[False, True], [False, False]]))
    state = fill(rng, state, 90, d, dv)  # cell (0, 1): 90 rows < L = 145
    state = state.replace(written=state.written.at[1, 1].set(0))  # an empty memory
    make_q = unit_dyadic_queries if metric == "cosine" else small_ints
    queries = make_q(rng, *shape, nq, d)
    if metric == "l2":  # stored keys as queries: exact matches, scores of zero
        # (their sign, -0.0 or 0.0, follows XLA's fusion of -max(d2, 0) even in the
        # reference alone; equality here is numeric)
        queries[0, 0, :3] = np.asarray(state.keys)[0, 0, :3]
    configs = ((32, 0.9), (5, 0.8)) + (((32, 1.0),) if metric == "ip" else ())
    for k, target in configs:
        ref = kj.search(state, queries, k, target, impl="reference")
        got = kj.search(state, queries, k, target, impl="pallas")
        for name, a, b in zip(FIELDS, ref, got):
            assert np.array_equal(np.asarray(a), np.asarray(b)), (metric, k, target, name)
        assert np.asarray(got.mask)[0, 0].all() and not np.asarray(got.mask)[1, 1].any()
    if metric != "ip":
        return
    # queries batched over the state (vmap joins them to the query axis)
    qb = jnp.stack([jnp.asarray(queries), -jnp.asarray(queries)])
    vs = jax.vmap(lambda q: kj.search(state, q, 8, 0.9, impl="pallas"))(qb)
    vr = jax.vmap(lambda q: kj.search(state, q, 8, 0.9, impl="reference"))(qb)
    for name, a, b in zip(FIELDS, vr, vs):
        assert np.array_equal(np.asarray(a), np.asarray(b)), (metric, "vmap", name)


def test_scores_gradient_through_pallas_path() -> None:
    rng = np.random.default_rng(4)
    state = fill(rng, kj.init((1,), 256, 8, 2), 300, 8, 2)
    q = jnp.asarray(small_ints(rng, 1, 3, 8))

    def loss(q, impl):
        return jnp.sum(kj.search(state, q, 4, 0.9, impl=impl).scores)

    np.testing.assert_array_equal(jax.grad(loss)(q, "pallas"), jax.grad(loss)(q, "reference"))


# -- lowering for TPU on this CPU machine ------------------------------------------------


def lower_for_tpu(fn, *args) -> str:
    return export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_kernel_lowers_for_tpu(metric: str, dtype: str) -> None:
    """Every op of the kernel has a Mosaic lowering (a sort, say, would raise here)."""
    g, nq, cap, d = 4, 512, 65536 + 77, 128
    spec = jax.ShapeDtypeStruct

    def run(q, k, held):
        return kp.bin_winners(q, k, held, 145, metric)  # default block sizes

    text = lower_for_tpu(
        run, spec((g, nq, d), dtype), spec((g, cap, d), dtype), spec((g,), jnp.int32)
    )
    assert "tpu_custom_call" in text and "knnmem_strided_bins" in text


def test_search_exports_for_tpu_with_the_kernel() -> None:
    """search(impl="auto") exported for TPU holds the kernel and no CPU custom call."""
    state = kj.init((2, 4), 8192, 64)
    q = jax.ShapeDtypeStruct((2, 4, 512, 64), jnp.float32)
    text = lower_for_tpu(lambda s, q: kj.search(s, q, 32, 0.9), state, q)
    assert text.count("tpu_custom_call") == 1
    assert "knnmem_search" not in text


def test_lowering_check_catches_ops_mosaic_lacks() -> None:
    """The check above can fail: a kernel that sorts does not lower for TPU."""

    def sorting_kernel(x_ref, o_ref):
        o_ref[...] = jnp.sort(x_ref[...], axis=-1)

    def run(x):
        return pl.pallas_call(sorting_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    with pytest.raises(NotImplementedError, match="sort"):
        lower_for_tpu(run, jax.ShapeDtypeStruct((8, 128), jnp.float32))


def test_block_sizes_follow_tpu_tiling() -> None:
    assert kp.block_sizes(512, 65536, 256, 1024) == (256, 1024)
    assert kp.block_sizes(5, 1000, 256, 1024) == (5, 896)  # all queries; bk <= capacity
    assert kp.block_sizes(300, 4096, 256, 1024) == (152, 1024)  # 2 equal query blocks
    assert kp.num_positions(145) == 384 and kp.num_positions(1) == 256
    # the documented budget: 5.56 MiB for the defaults at d=128, f32, L=145 (docs/pallas.md)
    assert kp.vmem_bytes(256, 1024, 128, 4, 145, "ip") == 5_832_704
    # wide keys: the key block shrinks to stay within the VMEM budget
    wide = kp.block_sizes(512, 65536, 256, 1024, key_dim=1024, itemsize=4, num_bins=145)
    assert wide == (256, 512) and kp.vmem_bytes(*wide, 1024, 4, 145, "ip") <= 12 * 2**20
    with pytest.raises(ValueError, match="block_q"):
        kp.block_sizes(512, 4096, 100, 1024)
    with pytest.raises(ValueError, match="block_k"):
        kp.block_sizes(512, 4096, 256, 1000)
