"""knnmem.jax: the custom call equals the numpy path bit for bit, the pure-JAX reference
agrees with both, and everything holds under jit, vmap, scan, grad and donation."""

from __future__ import annotations

import time

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import knnmem  # noqa: E402
import knnmem.jax as kj  # noqa: E402
from conftest import untied  # noqa: E402
from knnmem.eval import exact_search  # noqa: E402

# The result layout search passes to the custom call: _raw_call calls the handler
# directly (past search's checks) with what search would send, attributes changed.
from knnmem.jax._ffi import _result_types  # noqa: E402

pytestmark = pytest.mark.skipif(not kj.ffi_available(), reason="built without the FFI handlers")

FIELDS = knnmem.SearchResult._fields


def rows(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def assert_identical(ref: knnmem.SearchResult, got: knnmem.SearchResult, what: str = "") -> None:
    for name, a, b in zip(FIELDS, ref, got):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, (what, name, a.shape, b.shape)
        assert np.array_equal(a, b), (what, name, np.mean(a != b))


def assert_close(ref: knnmem.SearchResult, got: knnmem.SearchResult, what: str = "") -> None:
    """The pure-JAX reference rounds scores differently: indices must agree wherever the
    reference's scores are not tied within float32 error; everything else to tolerance."""
    rs, gs = np.asarray(ref.scores), np.asarray(got.scores)
    assert np.array_equal(np.asarray(ref.mask), np.asarray(got.mask)), what
    np.testing.assert_allclose(gs, rs, rtol=1e-5, atol=1e-5, err_msg=what)
    firm = untied(rs, 1e-5 * max(1.0, float(np.max(np.abs(rs[np.isfinite(rs)]), initial=1))))
    ri, gi = np.asarray(ref.indices), np.asarray(got.indices)
    assert not firm.any() or np.mean(ri[firm] == gi[firm]) >= 0.999, what
    same = ri == gi
    for name in ("keys", "values"):
        a, b = np.asarray(getattr(ref, name)), np.asarray(getattr(got, name))
        assert np.array_equal(a[same], b[same]), (what, name)


# -- equality with knnmem.ops ----------------------------------------------------------------


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_search_and_add_match_numpy_path(metric: str) -> None:
    rng = np.random.default_rng(1)
    shape, cap, d, dv, t, k = (2, 3), 700, 19, 5, 260, 9  # odd sizes; the rings wrap
    state = kj.init(shape, cap, d, dv, metric=metric)
    keys, values, written = knnmem.ops.init(shape, cap, d, dv)
    add = jax.jit(kj.add, donate_argnums=0)
    search = jax.jit(kj.search, static_argnums=(2, 3), static_argnames="impl")
    for step in range(4):
        nk = rows(rng, *shape, t, d)
        nk[0, 1, :3] = nk[0, 1, 3]  # exact duplicates: ties are broken by slot
        nv = rows(rng, *shape, t, dv)
        q = rows(rng, *shape, 33, d)
        for target in (0.6, 1.0):
            ref = knnmem.ops.search(
                keys, values, written, q, k=k, recall_target=target, metric=metric
            )
            assert_identical(ref, search(state, q, k, target), f"{metric} {step} {target}")
            got = search(state, q, k, target, impl="reference")
            assert_close(ref, got, f"reference {metric} {step} {target}")
        knnmem.ops.add(keys, values, written, nk, nv)
        state = add(state, nk, nv)
        assert np.array_equal(np.asarray(state.keys), keys)
        assert np.array_equal(np.asarray(state.values), values)
        assert np.array_equal(np.asarray(state.written), written)


@pytest.mark.parametrize(
    "rows_added",
    [0, 5, 400, 65536 + 300, 140000],  # empty, < k, sparse (< bins), two blocks, wrapped
)
def test_placement_blocks_and_sparse_memories(rows_added: int) -> None:
    """Capacity over one placement block: partly written blocks, memories with fewer rows
    than k or than bins (exact fallback), and a wrapped memory."""
    rng = np.random.default_rng(2)
    cap, d, k = 70000, 8, 16
    keys, values, written = knnmem.ops.init((1,), cap, d, 2)
    nk = rows(rng, 1, rows_added, d)
    nv = rows(rng, 1, rows_added, 2)
    knnmem.ops.add(keys, values, written, nk, nv)
    state = kj.add(kj.init((1,), cap, d, 2), nk, nv)
    assert np.array_equal(np.asarray(state.keys), keys)
    q = rows(rng, 1, 20, d)
    for target in (0.9, 1.0):
        ref = knnmem.ops.search(keys, values, written, q, k=k, recall_target=target)
        assert_identical(ref, kj.search(state, q, k, target), f"{rows_added} {target}")
        assert_close(ref, kj.search_reference(state, q, k, target), f"ref {rows_added}")
    # and the stream positions are those of a float64 exact search, in exact mode
    if 0 < rows_added <= cap:
        _, truth = exact_search(nk, q, k)
        found = np.asarray(kj.search(state, q, k, 1.0).indices)
        assert np.mean(found == truth) > 0.99


def test_matches_memory_with_resets() -> None:
    rng = np.random.default_rng(3)
    shape, cap, d = (3, 2), 300, 8
    mem = knnmem.Memory(shape, capacity=cap, key_dim=d)
    state = kj.init(shape, cap, d)
    for step in range(5):
        x = rows(rng, *shape, 130, d)
        if step == 2:
            which = np.array([True, False, True])  # a prefix mask: whole batch rows
            mem.clear(np.repeat(which[:, None], 2, axis=1))
            state = kj.reset(state, which)
        if step == 3:
            mem.clear()
            state = kj.reset(state)
        mem.add(x, -x)
        state = kj.add(state, x, -x)
        assert np.array_equal(np.asarray(kj.count(state)), mem.count)
        q = rows(rng, *shape, 7, d)
        assert_identical(mem.search(q, k=12, recall_target=0.9), kj.search(state, q, 12, 0.9))


def test_int64_counters() -> None:
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        state = kj.init((2,), 64, 4)
        assert state.written.dtype == jnp.int64
        x = rows(rng, 2, 150, 4)
        state = kj.add(state, x, x)
        q = rows(rng, 2, 3, 4)
        res = kj.search(state, q, 5, 0.9)
        assert res.indices.dtype == jnp.int64
        ref = knnmem.ops.search(
            np.asarray(state.keys), np.asarray(state.values), np.asarray(state.written), q, k=5
        )
        assert_identical(ref, res)
        assert_close(ref, kj.search_reference(state, q, 5, 0.9))


# -- transformations ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def filled() -> tuple:
    rng = np.random.default_rng(5)
    state = kj.init((2,), 512, 16)
    x = rows(rng, 2, 400, 16)
    return kj.add(state, x, rows(rng, 2, 400, 16)), rng


def test_vmap(filled: tuple) -> None:
    state, rng = filled
    qb = rows(rng, 3, 2, 7, 16)
    # queries batched over one memory grid: folded into the query axis, memory not copied
    got = jax.jit(jax.vmap(lambda q: kj.search(state, q, 4, 0.9)))(qb)
    for i in range(3):
        assert_identical(kj.search(state, qb[i], 4, 0.9), jax.tree.map(lambda a, i=i: a[i], got))
    # a batch of states (extra leading grid dims), nested vmap over queries too
    states = jax.vmap(lambda x: kj.add(state, x, x))(rows(rng, 3, 2, 5, 16))
    qbb = rows(rng, 4, 3, 2, 7, 16)
    f = jax.vmap(jax.vmap(lambda s, q: kj.search(s, q, 4, 0.9)), in_axes=(None, 0))
    got = jax.jit(f)(states, qbb)
    assert got.keys.shape == (4, 3, 2, 7, 4, 16)
    for j in (0, 3):
        for i in (0, 2):
            s_i = jax.tree.map(lambda a, i=i: a[i], states)
            want = kj.search(s_i, qbb[j, i], 4, 0.9)
            assert_identical(want, jax.tree.map(lambda a, i=i, j=j: a[j, i], got))
    # the reference under the same batching
    ref = jax.vmap(lambda s, q: kj.search(s, q, 4, 0.9, impl="reference"))(states, qbb[0])
    assert_close(jax.vmap(lambda s, q: kj.search(s, q, 4, 0.9))(states, qbb[0]), ref)


def test_scan_over_segments() -> None:
    rng = np.random.default_rng(6)
    segs = rows(rng, 6, 2, 100, 8)

    def step(state, seg):
        res = kj.search(state, seg[:, :10], 4, 0.9)  # search, then add
        return kj.add(state, seg, seg), res

    state, res = jax.jit(lambda s: jax.lax.scan(step, s, segs))(kj.init((2,), 256, 8))
    assert np.array_equal(np.asarray(state.written), [600, 600])
    assert not np.asarray(res.mask[0]).any()  # nothing before the first segment
    mem = knnmem.Memory(2, capacity=256, key_dim=8)
    for i in range(6):
        assert_identical(
            mem.search(segs[i, :, :10], k=4, recall_target=0.9),
            jax.tree.map(lambda a, i=i: a[i], res),
        )
        mem.add(segs[i], segs[i])


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_grad_flows_to_queries_not_memory(filled: tuple, metric: str) -> None:
    state, rng = filled
    state = state.replace(metric=metric)
    q = jnp.asarray(rows(rng, 2, 5, 16))

    def loss(q, state):
        res = kj.search(state, q, 6, 0.9)
        w = jax.nn.softmax(jnp.where(res.mask, res.scores, -jnp.inf), -1)
        return jnp.sum(w[..., None] * res.values) + jnp.sum(res.keys)

    gq, gs = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(q, state)
    assert not np.asarray(gs.keys).any() and not np.asarray(gs.values).any()
    # the same loss with the retrieved keys/values as constants and scores recomputed
    res = kj.search(state, q, 6, 0.9)
    rk, rv = np.asarray(res.keys), np.asarray(res.values)

    def direct(q):
        dot = jnp.einsum("gqd,gqkd->gqk", q, rk)
        if metric == "cosine":
            dot = dot / jnp.linalg.norm(q, axis=-1)[..., None] / jnp.linalg.norm(rk, axis=-1)
        if metric == "l2":
            dot = -jnp.sum((q[..., None, :] - rk) ** 2, -1)
        w = jax.nn.softmax(dot, -1)
        return jnp.sum(w[..., None] * rv)

    np.testing.assert_allclose(gq, jax.grad(direct)(q), rtol=2e-3, atol=1e-5)
    # forward scores are the kernel's, untouched by the gradient path
    assert np.array_equal(np.asarray(res.scores), np.asarray(kj.search(state, q, 6, 0.9).scores))


def test_add_in_place_under_donation() -> None:
    """add's cost does not grow with capacity: the compiled scatter aliases the donated
    state (no copy, temporaries independent of capacity), and a 64x larger memory
    is not measurably slower."""
    d, t = 64, 16
    seg = jnp.ones((1, t, d))
    add = jax.jit(kj.add, donate_argnums=0)
    temps, times = [], []
    for cap in (4096, 262144):
        state = kj.init((1,), cap, d)
        m = add.lower(state, seg, seg).compile().memory_analysis()
        state_bytes = 2 * cap * d * 4
        assert m.alias_size_in_bytes >= state_bytes
        temps.append(m.temp_size_in_bytes)
        state = add(state, seg, seg)
        samples = []
        for _ in range(30):
            t0 = time.perf_counter()
            state = add(state, seg, seg)
            jax.block_until_ready(state.written)
            samples.append(time.perf_counter() - t0)
        times.append(float(np.median(samples)))
        assert int(state.written[0]) == 31 * t
    assert temps[0] == temps[1], temps
    # a copy of the large state (128 MiB) would take > 10 ms; an in-place add ~ 20 us
    assert times[1] < 10 * times[0] + 2e-3, times


def test_cuda_lowers_to_its_own_custom_call_or_the_reference() -> None:
    """CPU lowers to knnmem_search; CUDA to knnmem_search_cuda where knnmem._cuda has its
    XLA handler, else to the pure-JAX reference (no knnmem custom call at all)."""
    state = kj.init((2,), 256, 8)
    q = jnp.ones((2, 3, 8))
    f = jax.jit(lambda s, q: kj.search(s, q, 4, 0.9))
    assert "knnmem_search" in f.lower(state, q).as_text()
    from jax import export

    if not kj.ffi_cuda_available():
        exported = export.export(f, platforms=["cuda"])(state, q)
        assert "knnmem_search" not in exported.mlir_module()
        return
    # With knnmem._cuda built, CUDA lowers to its own custom call (docs/cuda.md).
    unchecked = [export.DisabledSafetyCheck.custom_call("knnmem_search_cuda")]
    text = export.export(f, platforms=["cuda"], disabled_checks=unchecked)(state, q).mlir_module()
    assert "@knnmem_search_cuda(" in text and "@knnmem_search(" not in text


# -- bad input -------------------------------------------------------------------------------


def test_bad_arguments_raise_at_trace_time(filled: tuple) -> None:
    state, rng = filled
    q = rows(rng, 2, 3, 16)
    with pytest.raises(ValueError, match="k: expected an integer in"):
        kj.search(state, q, 0)
    with pytest.raises(ValueError, match="k: expected an integer in"):
        jax.jit(lambda s, q: kj.search(s, q, 513))(state, q)
    with pytest.raises(ValueError, match="recall_target"):
        kj.search(state, q, 4, 1.5)
    with pytest.raises(
        ValueError, match=r"queries: expected shape \(2, Q, key_dim=16\), got \(2, 3, 8\)"
    ):
        kj.search(state, q[..., :8], 4)
    with pytest.raises(TypeError, match="queries: expected a floating-point"):
        kj.search(state, q.astype(np.int32), 4)
    with pytest.raises(ValueError, match=r"values: expected shape \(2, T=3, value_dim=16\)"):
        kj.add(state, q, q[..., :2, :])
    with pytest.raises(ValueError, match="impl"):
        kj.search(state, q, 4, impl="cuda")
    with pytest.raises(ValueError, match="mask: expected shape"):
        kj.reset(state, np.ones((3,), bool))
    with pytest.raises(TypeError, match="MemoryState"):
        kj.search((state.keys, state.values, state.written), q)
    with pytest.raises(ValueError, match="metric"):
        kj.init(2, 16, 4, metric="dot")


def _raw_call(state, q, **attrs):
    args = (state.keys, state.values, state.written, q, jnp.zeros((0,), jnp.int32))
    types = _result_types(*args[:4], 4)  # (an empty result would not run the call)
    call = jax.ffi.ffi_call("knnmem_search", types, vmap_method="broadcast_all")
    attrs = {
        "k": np.int64(4),
        "recall_target": np.float64(0.9),
        "metric": "ip",
        "precision": "float32",
        **attrs,
    }
    return jax.block_until_ready(call(*args, **attrs))


def test_handler_returns_errors_never_crashes(filled: tuple) -> None:
    state, rng = filled
    q = rows(rng, 2, 3, 16)
    q[1, 2, 5] = np.nan
    with pytest.raises(Exception, match=r"queries: expected finite values, got nan at grid cell 1"):
        jax.block_until_ready(kj.search(state, q, 4))
    q = rows(rng, 2, 3, 16)
    for attrs, message in (
        ({"k": np.int64(0)}, "k: expected an integer in"),
        ({"recall_target": np.float64(0.0)}, "recall_target: expected a number in"),
        ({"metric": "dot"}, "metric"),
        ({"precision": "float16"}, r"precision: expected one of 'float32', 'bfloat16', 'int8'"),
    ):
        with pytest.raises(Exception, match=message):
            _raw_call(state, q, **attrs)
    with pytest.raises(Exception, match="written: expected counts >= 0"):
        _raw_call(state.replace(written=jnp.asarray([-1, 3], jnp.int32)), q)
    with pytest.raises(Exception, match="queries: expected shape"):
        _raw_call(state, q[..., :8])
    # the state is untouched and the handler still works
    assert_identical(
        knnmem.ops.search(
            *(np.asarray(a) for a in (state.keys, state.values, state.written)), q, k=4
        ),
        kj.search(state, q, 4),
    )


def test_readme_jax_example_runs() -> None:
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme.read_text(), re.S) if "kj." in b]
    assert blocks, "README.md has no knnmem.jax example"
    namespace: dict = {}
    exec(compile(blocks[0], str(readme), "exec"), namespace)
    assert namespace["res"].keys.shape == (2, 4, 128, 32, 32)
    assert np.asarray(namespace["state"].written).tolist() == [[128] * 4] * 2


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_rounded_precision(metric: str, precision: str) -> None:
    """precision= scores rounded keys: the custom call equals knnmem.ops.search bit for
    bit, and the pure-JAX reference finds nearly the same rows with scores equal to
    rounding (bfloat16: the core may round the queries too, 2^-9 relative)."""
    rng = np.random.default_rng(3)
    state = kj.init((2, 3), 3000, 24, 5, metric=metric)
    for t in (2000, 1500):
        state = kj.add(state, rows(rng, 2, 3, t, 24), rows(rng, 2, 3, t, 5))
    q = rows(rng, 2, 3, 40, 24)
    ring = tuple(np.asarray(a) for a in (state.keys, state.values, state.written))
    want = knnmem.ops.search(*ring, q, k=16, metric=metric, precision=precision)
    got = kj.search(state, q, 16, precision=precision)
    for name in ("scores", "indices", "keys", "values", "mask"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), getattr(want, name))
    ref = kj.search(state, q, 16, precision=precision, impl="reference")
    ref_idx = np.asarray(ref.indices)
    same = (ref_idx[..., :, None] == want.indices[..., None, :]).any(-1)
    assert same.mean() > 0.97
    scale = np.abs(want.scores).max()
    tol = 2.0**-8 if precision == "bfloat16" else 1e-5
    np.testing.assert_allclose(np.asarray(ref.scores)[same], want.scores[same], atol=tol * scale)
    with pytest.raises(ValueError, match=r"^precision: expected one of"):
        kj.search(state, q, 16, precision="fp8")


def test_sharded_search_with_a_capacity_axis_of_one_device() -> None:
    # A capacity axis of size 1 skipped the merge, whose psums are what type the results
    # as replicated on the axis: shard_map's check_vma refused the out_specs.
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "mem"))
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 2, 40, 8)).astype(np.float32)
    q = rng.standard_normal((2, 2, 3, 8)).astype(np.float32)
    state = kj.sharded_add(
        mesh, kj.init((2, 2), capacity=64, key_dim=8), x, x, batch_axis="data", capacity_axis="mem"
    )
    res = kj.sharded_search(
        mesh, state, q, k=4, recall_target=1.0, batch_axis="data", capacity_axis="mem"
    )
    want = kj.search(kj.add(kj.init((2, 2), capacity=64, key_dim=8), x, x), q, 4, 1.0)
    np.testing.assert_array_equal(np.asarray(res.indices), np.asarray(want.indices))
    np.testing.assert_array_equal(np.asarray(res.values), np.asarray(want.values))
    np.testing.assert_allclose(np.asarray(res.scores), np.asarray(want.scores), rtol=1e-6)
