"""knnmem.jax's lean results: fields=, row_dtype=, which= (search and add) and out=
(donated result buffers). Every lean result equals the full search's bit for bit (rows
in bfloat16 / float16: the float32 rows rounded to nearest even), on the CPU custom
call and on the pure-JAX backends, under jit, vmap and grad."""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import knnmem  # noqa: E402
import knnmem.jax as kj  # noqa: E402
from knnmem.jax._ffi import _result_types  # noqa: E402

pytestmark = pytest.mark.skipif(not kj.ffi_available(), reason="built without the FFI handlers")

FIELDS = knnmem.SearchResult._fields
SUBSETS = [s for r in range(1, 6) for s in itertools.combinations(FIELDS, r)]  # all 31
ROW_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def rows(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def filled(metric: str = "ip", seed: int = 0, shape=(2, 3), cap=300, d=12, dv=5):
    """A grid with wrapped rings, and one memory holding fewer rows than k (misses)."""
    rng = np.random.default_rng(seed)
    state = kj.init(shape, cap, d, dv, metric=metric)
    state = kj.add(state, rows(rng, *shape, 420, d), rows(rng, *shape, 420, dv))
    state = kj.reset(state, np.arange(np.prod(shape)).reshape(shape) == 1)
    sub = (np.arange(np.prod(shape)) == 1).reshape(shape)
    state = kj.add(state, rows(rng, 1, 3, d), rows(rng, 1, 3, dv), which=sub)
    return state, rng


def expect(
    got: knnmem.SearchResult, full: knnmem.SearchResult, fields, row_dtype="float32", close=False
):
    """got has exactly `fields`, each equal to full's (rows rounded to row_dtype); with
    `close`, scores to float32 rounding (XLA's dot may round a gathered sub-grid's
    scores differently from the whole grid's)."""
    for name in FIELDS:
        have = getattr(got, name)
        if name not in fields:
            assert have is None, name
            continue
        want = np.asarray(getattr(full, name))
        if name in ("keys", "values"):
            want = np.asarray(jnp.asarray(want).astype(ROW_DTYPES[row_dtype]))
        have = np.asarray(have)
        assert have.dtype == want.dtype, (name, have.dtype, want.dtype)
        assert have.shape == want.shape, (name, have.shape, want.shape)
        if close and name == "scores":
            np.testing.assert_allclose(have, want, rtol=1e-6, atol=1e-6)
            continue
        assert np.array_equal(have.view(np.uint8), want.view(np.uint8)), name


# -- fields and row_dtype ------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("recall", [1.0, 0.9])
def test_every_field_subset_and_row_dtype_equals_the_full_result(metric, recall) -> None:
    state, rng = filled(metric, seed=1)
    q = rows(rng, 2, 3, 7, 12)
    k = 8
    for impl in ("ffi", "reference"):
        # the custom call: every subset in every row dtype; the pure-JAX backends, whose
        # drop-and-round step is shared, a sample (one jit each: the arguments are static)
        if impl == "ffi":
            cases = list(itertools.product(SUBSETS, ROW_DTYPES))
        elif recall < 1:  # (exact searches take the same drop-and-round step)
            cases = list(zip(SUBSETS[::5], itertools.cycle(ROW_DTYPES)))
        else:
            continue

        @jax.jit
        def lean(s, q, impl=impl, cases=cases):
            full = kj.search(s, q, k, recall, impl=impl)
            return full, [
                kj.search(s, q, k, recall, impl=impl, fields=f, row_dtype=r) for f, r in cases
            ]

        full, got = lean(state, q)
        assert not np.asarray(full.mask)[0, 1].all()  # the sparse memory has misses
        for (fields, row_dtype), res in zip(cases, got):
            expect(res, full, fields, row_dtype)
    # the custom call's rounded rows are the numpy core's (knnmem.ops, row_dtype=)
    ring = [np.asarray(a) for a in (state.keys, state.values, state.written)]
    for row_dtype in ("bfloat16", "float16"):
        want = knnmem.ops.search(
            *ring, q, k=k, recall_target=recall, metric=metric, row_dtype=row_dtype
        )
        got = kj.search(state, q, k, recall, fields=("keys", "values"), row_dtype=row_dtype)
        for name in ("keys", "values"):
            a, b = np.asarray(getattr(got, name)), getattr(want, name)
            assert a.dtype.name == row_dtype and np.array_equal(
                a.view(np.uint16), b.view(np.uint16)
            )


def test_a_name_dtype_objects_and_precision() -> None:
    state, rng = filled("cosine", seed=2)
    q = rows(rng, 2, 3, 4, 12)
    dtypes = (jnp.bfloat16, np.float16, np.dtype("float32"))

    @jax.jit
    def lean(s, q):
        search = functools.partial(kj.search, s, q, 5, 0.9, precision="int8")
        return search(), search(fields="values"), [search(row_dtype=d) for d in dtypes]

    full, values, rounded = lean(state, q)
    expect(values, full, ("values",))
    for dtype, got in zip(dtypes, rounded):
        expect(got, full, FIELDS, jnp.dtype(dtype).name)
    # search_reference, and the Pallas route (a capacity under 128 slots: its exact
    # fallback, so no interpreted kernel here)
    small = kj.init(2, 64, 8, 3)
    small = kj.add(small, rows(rng, 2, 50, 8), rows(rng, 2, 50, 3))
    sq = rows(rng, 2, 3, 8)

    @jax.jit
    def backends(s, q):
        full = kj.search(s, q, 4, 0.9, impl="pallas")
        lean = kj.search(
            s, q, 4, 0.9, impl="pallas", fields=("indices", "keys"), row_dtype="float16"
        )
        return full, lean, kj.search_reference(s, q[1:], 4, 0.9, fields="mask", which=[1])

    full, lean, got = backends(small, sq)
    expect(lean, full, ("indices", "keys"), "float16")
    expect(got, jax.tree.map(lambda a: np.asarray(a)[[1]], full), ("mask",))


def test_the_custom_call_computes_only_what_is_asked() -> None:
    """Fields not asked for are zero-size results of the custom call (the handler gets a
    null pointer); rows are results of their dtype."""
    state, rng = filled()
    q = rows(rng, 2, 3, 4, 12)
    f = jax.jit(lambda s, q: kj.search(s, q, 6, fields=("scores", "values"), row_dtype="bfloat16"))
    text = f.lower(state, q).as_text()
    call = next(line for line in text.splitlines() if "@knnmem_search(" in line)
    results = call.rsplit("->", 1)[1]
    assert "tensor<2x3x4x6xf32>" in results and "tensor<2x3x4x6x5xbf16>" in results
    assert results.count("tensor<0x") == 3, results  # indices, keys, mask


# -- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_scores_differentiate_without_keys_among_the_fields(metric) -> None:
    state, rng = filled(metric, seed=3)
    q = jnp.asarray(rows(rng, 2, 3, 5, 12))
    dq = jnp.asarray(rows(rng, 2, 3, 5, 12))
    weights = jnp.asarray(rows(rng, 2, 3, 5, 6))

    def scores(q, fields=None, row_dtype="float32"):
        return kj.search(state, q, 6, 0.9, fields=fields, row_dtype=row_dtype).scores

    def loss(q, fields=None, row_dtype="float32"):
        s = scores(q, fields, row_dtype)
        return jnp.sum(jnp.where(jnp.isfinite(s), s, 0) * weights)

    @jax.jit
    def derivatives(q, dq):
        return (
            [
                jax.grad(loss)(q, f, r)
                for f, r in (
                    (None, "float32"),
                    ("scores", "float32"),
                    (("scores", "keys"), "bfloat16"),
                )
            ],
            [jax.jvp(lambda q, f=f: scores(q, f), (q,), (dq,)) for f in (None, "scores")],
            jax.grad(lambda q: jnp.sum(kj.search(state, q, 6, 0.9, fields="values").values))(q),
        )

    grads, jvps, none = derivatives(q, dq)
    assert np.count_nonzero(np.asarray(grads[0])) > 0
    for g in grads[1:]:
        np.testing.assert_array_equal(np.asarray(g), np.asarray(grads[0]))
    # forward mode: the primal of a differentiated search is the plain search's
    np.testing.assert_array_equal(np.asarray(jvps[1][0]), np.asarray(scores(q)))
    np.testing.assert_array_equal(np.asarray(jvps[1][1]), np.asarray(jvps[0][1]))
    assert np.count_nonzero(np.asarray(jvps[1][1])) > 0
    assert not np.any(np.asarray(none))  # values carry no gradient
    # the keys are fetched (as float32 results of the custom call) only when differentiating
    for f, shape in ((loss, "0xf32"), (jax.grad(loss), "2x3x5x6x12xf32")):
        text = jax.jit(functools.partial(f, fields="scores")).lower(q).as_text()
        call = next(line for line in text.splitlines() if "@knnmem_search(" in line)
        assert f"tensor<{shape}>" in call.rsplit("->", 1)[1].split(",")[2], call


# -- which ---------------------------------------------------------------------------------


WHICH = [
    np.array([[True, False, True], [False, True, True]]),  # a mask
    1,  # a row of the grid
    ([1, 0], [2, 2]),  # pairs of indices, in that order
    (slice(None), [0]),
]


@pytest.mark.parametrize("impl", ["ffi", "reference"])
def test_search_on_a_sub_grid_is_those_rows_of_the_full_result(impl) -> None:
    state, rng = filled("l2", seed=4)
    q = rows(rng, 2, 3, 6, 12)

    # the custom call reads the selected memories in place; the other backends gather
    # them (the same step for every selection, so fewer cases there)
    recalls, lean_which = ((1.0, 0.9), WHICH) if impl == "ffi" else ((0.9,), WHICH[:1])
    close = impl != "ffi"  # the custom call: bit for bit

    @jax.jit
    def searches(s, q):
        out = []
        for recall in recalls:
            search = functools.partial(kj.search, s, k=7, recall_target=recall, impl=impl)
            subs = [search(q[w], which=w) for w in WHICH]
            lean = [
                search(q[w], which=w, fields=("indices", "values"), row_dtype="bfloat16")
                for w in lean_which
            ]
            out.append((search(q), subs, lean))
        return out

    for full, subs, leans in searches(state, q):
        full = jax.tree.map(np.asarray, full)
        for which, sub in zip(WHICH, subs):
            want = knnmem.SearchResult(*(a[which] for a in full))
            expect(sub, want, FIELDS, close=close)
        for which, lean in zip(lean_which, leans):
            want = knnmem.SearchResult(*(a[which] for a in full))
            expect(lean, want, ("indices", "values"), "bfloat16")
    # eagerly too (one memory: a sub-grid of shape ()), and an empty selection gives
    # empty results
    which = (1, 2)
    got = kj.search(state, q[which], 7, 0.9, impl=impl, which=which, fields="scores")
    assert got.scores.shape == (6, 7)
    expect(got, knnmem.SearchResult(*(a[which] for a in full)), ("scores",), close=close)
    got = kj.search(state, q[[]], 7, which=[], fields="keys")
    assert got.keys.shape == (0, 3, 6, 7, 12) and got.scores is None
    assert kj.search(state, q, 7, fields=()) == (None,) * 5


def test_vmap_over_queries_and_states_with_fields_and_which() -> None:
    state, rng = filled("cosine", seed=5)
    qs = rows(rng, 3, 2, 3, 4, 12)
    search = functools.partial(kj.search, k=5, recall_target=0.9)
    got = jax.vmap(lambda q: search(state, q, fields=("scores", "values"), row_dtype="float16"))(qs)
    for i in range(3):
        want = search(state, qs[i])
        expect(jax.tree.map(lambda a, i=i: a[i], got), want, ("scores", "values"), "float16")
    # a batch of states (two grids), each searched on a sub-grid
    other, _ = filled("cosine", seed=6)
    states = jax.tree.map(lambda a, b: jnp.stack([a, b]), state, other)
    which = ([1, 0], [2, 0])
    got = jax.jit(jax.vmap(lambda s, q: search(s, q, which=which, fields=("indices", "keys"))))(
        states, qs[:2][:, [1, 0], [2, 0]]
    )
    for i, st in enumerate((state, other)):
        full = jax.tree.map(lambda a: np.asarray(a)[which], search(st, qs[i]))
        expect(jax.tree.map(lambda a, i=i: a[i], got), full, ("indices", "keys"))


@pytest.mark.parametrize("t", [5, 700])  # within the ring; longer than it (kept: the last)
def test_add_on_a_sub_grid_equals_the_numpy_path(t) -> None:
    rng = np.random.default_rng(7)
    shape, cap, d, dv = (3, 2), 300, 6, 4
    state = kj.init(shape, cap, d, dv)
    ring = knnmem.ops.init(shape, cap, d, dv)
    for which in (None, np.array([[True, False], [False, False], [True, True]]), (2, 1), [0]):
        sub = np.zeros(shape)[which].shape if which is not None else shape
        nk, nv = rows(rng, *sub, t, d), rows(rng, *sub, t, dv)
        knnmem.ops.add(*ring, nk, nv, which=which)
        add = jax.jit(functools.partial(kj.add, which=which), donate_argnums=0)
        state = add(state, nk, nv)
        for a, b in zip((state.keys, state.values, state.written), ring):
            assert np.array_equal(np.asarray(a), b)
    # searches agree too
    q = rows(rng, *shape, 4, d)
    res = kj.search(state, q, 3)
    want = knnmem.ops.search(*ring, q, k=3)
    expect(res, want._replace(indices=want.indices.astype(np.int32)), FIELDS)


def test_add_on_a_sub_grid_is_in_place_under_donation() -> None:
    """The compiled add aliases the donated state and its temporaries do not grow with
    the capacity: only the selected memories' new rows are written."""
    d, t = 32, 8
    temps = []
    add = jax.jit(functools.partial(kj.add, which=(1, 2)), donate_argnums=0)
    for cap in (2048, 65536):
        state = kj.init((2, 4), cap, d)
        seg = jnp.ones((t, d))
        compiled = add.lower(state, seg, seg).compile()
        m = compiled.memory_analysis()
        assert m.alias_size_in_bytes >= 2 * 8 * cap * d * 4
        temps.append(m.temp_size_in_bytes)
        before = state.keys.unsafe_buffer_pointer()
        state = add(state, seg, seg)
        assert state.keys.unsafe_buffer_pointer() == before
        assert np.asarray(state.written).tolist() == [[0] * 4, [0, 0, t, 0]]
    assert temps[0] == temps[1], temps


# -- out -----------------------------------------------------------------------------------


def test_out_buffers_are_reused_eagerly_and_under_donation() -> None:
    state, rng = filled("ip", seed=8)
    q, q2 = rows(rng, 2, 3, 9, 12), rows(rng, 2, 3, 9, 12)
    full = kj.search(state, q, 6)
    # eager: out's arrays are donated, the results live in their buffers
    prev = kj.search(state, q2, 6, row_dtype="bfloat16")
    ptrs = [a.unsafe_buffer_pointer() for a in prev]
    got = kj.search(state, q, 6, out=prev)
    assert [a.unsafe_buffer_pointer() for a in got] == ptrs
    assert all(a.is_deleted() for a in prev)
    expect(got, full, FIELDS, "bfloat16")  # rows in the dtype of out's arrays
    # under jit with donation: the custom call's results alias the donated parameters,
    # with no copy and no temporary
    step = jax.jit(lambda s, q, o: kj.search(s, q, 6, 0.9, o), donate_argnums=2)
    prev = kj.search(state, q2, 6)
    out_bytes = sum(a.nbytes for a in prev)
    compiled = step.lower(state, q, prev).compile()
    hlo = compiled.as_text()
    assert "input_output_alias={ {0}: (4, {}, may-alias), {1}: (5, {}" in hlo
    assert " copy(" not in hlo
    m = compiled.memory_analysis()
    assert m.temp_size_in_bytes == 0 and m.alias_size_in_bytes == out_bytes
    ptrs = [a.unsafe_buffer_pointer() for a in prev]
    got = step(state, q, prev)
    assert [a.unsafe_buffer_pointer() for a in got] == ptrs
    expect(got, full, FIELDS)
    # a loop carrying its results as the next search's out
    loop = jax.jit(lambda s, q, o: kj.search(s, q, 6, 0.9, o, which=(0, [2])), donate_argnums=2)
    res = kj.search(state, q[0, [2]], 6, which=(0, [2]))
    for _ in range(3):
        res = loop(state, q[0, [2]], res)
    expect(res, jax.tree.map(lambda a: np.asarray(a)[0, [2]], full), FIELDS)


def test_out_sets_the_fields_and_mixes_with_new_ones() -> None:
    state, rng = filled("l2", seed=9)
    q = rows(rng, 2, 3, 4, 12)
    full = kj.search(state, q, 5)
    prev = kj.search(state, q, 5, fields=("scores", "values"), row_dtype="float16")
    got = kj.search(state, q, 5, out=prev._replace(scores=None))  # default: out's fields
    expect(got, full, ("values",), "float16")
    prev = kj.search(state, q, 5, fields=("scores", "values"))
    got = kj.search(state, q, 5, out=prev, fields=("values", "indices"))
    expect(got, full, ("values", "indices"))
    assert prev.values.is_deleted() and not prev.scores.is_deleted()  # scores not asked for
    # the pure-JAX backend takes out= too (XLA may reuse the donated buffers)
    want = kj.search(state, q, 5, impl="reference")
    got = kj.search(state, q, 5, out=kj.search(state, q, 5, fields="values"), impl="reference")
    expect(got, want, ("values",))


# -- errors --------------------------------------------------------------------------------


def test_bad_arguments_name_the_argument() -> None:
    state, rng = filled()
    q = rows(rng, 2, 3, 4, 12)
    res = kj.search(state, q, 5)
    cases = [
        (ValueError, r"^fields: expected names among", dict(fields="score")),
        (TypeError, r"^fields: expected a name or names", dict(fields=3)),
        (
            ValueError,
            r"^row_dtype: expected one of \('float32', 'bfloat16', 'float16'\)",
            dict(row_dtype="int8"),
        ),
        (ValueError, r"^row_dtype: expected one of", dict(row_dtype=jnp.float64)),
        (TypeError, r"^out: expected a SearchResult", dict(out=res[:3])),
        (
            TypeError,
            r"^out.scores: expected a jax array",
            dict(out=res._replace(scores=np.asarray(res.scores))),
        ),
        (
            ValueError,
            r"^out.indices: expected shape \(2, 3, 4, 5\), got \(2, 3, 4, 4\)",
            dict(out=res._replace(indices=res.indices[..., :4])),
        ),
        (
            TypeError,
            r"^out.mask: expected dtype bool, got int32",
            dict(out=res._replace(mask=res.indices)),
        ),
        (
            TypeError,
            r"^out.keys: expected dtype float32, bfloat16 or float16, got int32",
            dict(out=res._replace(keys=res.keys.astype(jnp.int32))),
        ),
        (IndexError, r"^which: index 2 is out of bounds", dict(which=2)),
        (ValueError, r"^queries: expected shape \(3, Q, key_dim=12\)", dict(which=(0,) * 1)),
    ]
    for error, message, kwargs in cases:
        with pytest.raises(error, match=message):
            kj.search(state, q, 5, **kwargs)
    with pytest.raises(TypeError, match=r"^which: expected concrete indices"):
        jax.jit(lambda s, q, w: kj.search(s, q[0], 5, which=w))(state, q, jnp.int32(1))
    nk = rows(rng, 2, 2, 12)
    with pytest.raises(ValueError, match=r"^which: memory 4 is selected twice \(at 0 and 1\)"):
        kj.add(state, nk[:1].repeat(2, 0), nk[:1, :, :5].repeat(2, 0), which=([1, 1], [1, 1]))
    with pytest.raises(ValueError, match=r"^keys: expected shape \(2, T, key_dim=12\)"):
        kj.add(state, rows(rng, 2, 3, 2, 12), rows(rng, 2, 3, 2, 5), which=([0, 1], [0, 0]))
    with pytest.raises(TypeError, match=r"^which: expected concrete indices"):
        jax.jit(lambda s, w: kj.add(s, nk[:1], nk[:1, :, :5], which=w))(state, jnp.int32(1))


def test_the_handler_checks_cells_and_row_results() -> None:
    state, rng = filled()
    q = rows(rng, 2, 3, 12)  # two memories of the flattened grid, 3 queries each

    def call(cells, key_dtype="float32"):
        args = (state.keys, state.values, state.written, q)
        types = _result_types(*args, 4, FIELDS, key_dtype)
        f = jax.ffi.ffi_call("knnmem_search", types, vmap_method="broadcast_all")
        attrs = dict(k=np.int64(4), recall_target=np.float64(0.9), metric="ip", precision="float32")
        return jax.block_until_ready(f(*args, jnp.asarray(cells, jnp.int32), **attrs))

    got = call([5, 0])
    flat = jax.tree.map(lambda a: np.asarray(a).reshape(6, *a.shape[2:]), state)
    want = kj.search(flat, q, 4, which=[5, 0])
    expect(knnmem.SearchResult(*got), want, FIELDS)
    with pytest.raises(Exception, match=r"which: memory 6 at position 1 is outside the grid of 6"):
        call([5, 6])
    with pytest.raises(
        Exception, match=r"result keys: expected dtype float32, bfloat16 or float16"
    ):
        call([5, 0], key_dtype="int32")


# -- a capacity spread over devices ----------------------------------------------------------


def test_fields_on_a_capacity_sharded_memory() -> None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lean sharded checks passed" in proc.stdout, proc.stdout + proc.stderr


def _sharded_main() -> None:
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:4]), ("mem",))
    rng = np.random.default_rng(10)
    x, v = rows(rng, 2, 900, 8), rows(rng, 2, 900, 3)
    q = rows(rng, 2, 5, 8)
    flat = kj.add(kj.init(2, 512, 8, 3), x, v)
    sharded = kj.sharded_add(
        mesh, kj.init(2, 512, 8, 3, capacity_shards=4), x, v, capacity_axis="mem"
    )
    specs = kj.partition_specs(sharded, None, "mem")
    for fields, row_dtype in ((("values", "indices"), "bfloat16"), (("keys",), "float16")):
        body = lambda s, q, f=fields, r=row_dtype: kj.search(  # noqa: E731
            s, q, 6, 1.0, capacity_axis="mem", fields=f, row_dtype=r
        )
        got = jax.shard_map(body, mesh=mesh, in_specs=(specs, P()), out_specs=P())(sharded, q)
        expect(got, kj.search(flat, q, 6, 1.0), fields, row_dtype)
    print("lean sharded checks passed")


if __name__ == "__main__":
    _sharded_main()
