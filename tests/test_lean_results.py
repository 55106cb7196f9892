"""Searches that write only what the caller reads: fields=, out= (caller buffers of
any row dtype and equally spaced rows), row_dtype=, and sub-grid operations (which=)
on knnmem.Memory and knnmem.ops."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

import knnmem
from knnmem import SearchResult, ops

FIELDS = SearchResult._fields


def _rows(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _filled(rng, shape, capacity, d, dv, rows, dtype="float32", metric="ip"):
    mem = knnmem.Memory(shape, capacity, d, dv, dtype=dtype, metric=metric)
    mem.add(_rows(rng, *shape, rows, d), _rows(rng, *shape, rows, dv))
    return mem


def _same(got: SearchResult, want: SearchResult, fields) -> None:
    for name in FIELDS:
        have = getattr(got, name)
        if name not in fields:
            assert have is None, name
        else:
            np.testing.assert_array_equal(np.asarray(have), getattr(want, name), err_msg=name)


SUBSETS = [
    ("scores",),
    ("values",),
    ("scores", "indices"),
    ("scores", "values"),
    ("keys", "mask"),
    ("scores", "indices", "values", "mask"),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("recall", [0.9, 1.0])
def test_fields_equal_the_full_result(dtype, recall) -> None:
    rng = np.random.default_rng(1)
    # 20 rows fewer than k=32 in one memory: misses (zero rows) are covered too.
    mem = _filled(rng, (2, 2), 3000, 24, 12, 2500, dtype=dtype, metric="cosine")
    mem.clear((1, 1))
    mem.add(_rows(rng, 1, 20, 24), _rows(rng, 1, 20, 12), which=([1], [1]))
    q = _rows(rng, 2, 2, 9, 24)
    full = mem.search(q, 32, recall)
    assert not full.mask[1, 1].all()
    for fields in SUBSETS:
        _same(mem.search(q, 32, recall, fields=fields), full, fields)


def test_fields_on_memories_big_enough_to_gather_and_stream() -> None:
    # 40000 x 32 float32 keys = 5 MB per memory (gathered after the scan), and 16 MB of
    # result rows (written around the caches): the other copy paths of the core.
    rng = np.random.default_rng(2)
    mem = _filled(rng, (2,), 40000, 32, 32, 40000)
    q = _rows(rng, 2, 1024, 32)
    full = mem.search(q, 32)
    for fields in SUBSETS:
        _same(mem.search(q, 32, fields=fields), full, fields)
    kv = np.empty((2, 1024, 32, 2, 32), np.float32)
    got = mem.search(q, 32, out=SearchResult(None, None, kv[..., 0, :], kv[..., 1, :], None))
    np.testing.assert_array_equal(kv[..., 0, :], full.keys)
    np.testing.assert_array_equal(kv[..., 1, :], full.values)
    assert got.scores is None and got.keys is not None


def test_a_name_is_one_field_and_out_sets_the_default() -> None:
    rng = np.random.default_rng(3)
    mem = _filled(rng, (3,), 100, 8, 4, 60)
    q = _rows(rng, 3, 5, 8)
    full = mem.search(q, 4)
    _same(mem.search(q, 4, fields="values"), full, ("values",))
    values = np.empty((3, 5, 4, 4), np.float32)
    got = mem.search(q, 4, out=SearchResult(None, None, None, values, None))
    assert got.values is values
    _same(got, full, ("values",))
    # fields beyond out's arrays are returned new; out's arrays of fields not asked
    # for are left alone.
    scores = np.full((3, 5, 4), 7.0, np.float32)
    got = mem.search(q, 4, out=SearchResult(scores, None, None, values, None), fields="indices")
    np.testing.assert_array_equal(got.indices, full.indices)
    assert got.scores is None and (scores == 7.0).all()


@pytest.mark.parametrize("row_dtype", ["bfloat16", "float16"])
def test_row_dtype_rounds_the_float32_rows(row_dtype) -> None:
    rng = np.random.default_rng(4)
    mem = _filled(rng, (2, 3), 200, 16, 8, 150)
    q = _rows(rng, 2, 3, 6, 16)
    full = mem.search(q, 5)
    dt = ml_dtypes.bfloat16 if row_dtype == "bfloat16" else np.float16
    got = mem.search(q, 5, row_dtype=row_dtype)
    assert got.keys.dtype == dt and got.values.dtype == dt
    np.testing.assert_array_equal(got.keys, full.keys.astype(dt))
    np.testing.assert_array_equal(got.values, full.values.astype(dt))
    np.testing.assert_array_equal(got.scores, full.scores)
    # torch queries give torch tensors of that dtype
    tq = torch.from_numpy(q)
    tgot = mem.search(tq, 5, fields="values", row_dtype=getattr(torch, row_dtype))
    assert tgot.values.dtype == getattr(torch, row_dtype)
    want = torch.from_numpy(full.values).to(getattr(torch, row_dtype))
    assert torch.equal(tgot.values, want)


def test_out_takes_torch_tensors_and_interleaved_views() -> None:
    rng = np.random.default_rng(5)
    mem = _filled(rng, (2, 2), 300, 16, 16, 280)
    q = _rows(rng, 2, 2, 7, 16)
    full = mem.search(q, 6)
    kv = torch.empty(2, 2, 7, 6, 2, 16, dtype=torch.bfloat16)
    scores = torch.empty(2, 2, 7, 6)
    got = mem.search(
        torch.from_numpy(q), 6, out=SearchResult(scores, None, kv[..., 0, :], kv[..., 1, :], None)
    )
    assert got.scores is scores
    assert torch.equal(scores, torch.from_numpy(full.scores))
    assert torch.equal(kv[..., 0, :], torch.from_numpy(full.keys).to(torch.bfloat16))
    assert torch.equal(kv[..., 1, :], torch.from_numpy(full.values).to(torch.bfloat16))
    # uint16 arrays take the bits of row_dtype
    bits = np.empty((2, 2, 7, 6, 16), np.uint16)
    mem.search(q, 6, out=SearchResult(None, None, None, bits, None), row_dtype="bfloat16")
    np.testing.assert_array_equal(
        bits.view(ml_dtypes.bfloat16), full.values.astype(ml_dtypes.bfloat16)
    )


def test_bad_out_fields_and_row_dtype_raise_naming_them() -> None:
    rng = np.random.default_rng(6)
    mem = _filled(rng, (2, 2), 50, 8, 4, 40)
    q = _rows(rng, 2, 2, 3, 8)
    r = SearchResult
    cases = [
        (dict(fields=("vals",)), ValueError, r"^fields: expected names among \('scores'"),
        (dict(fields=3), TypeError, r"^fields: expected a name or names"),
        (dict(fields=(b"keys",)), TypeError, r"^fields: expected names \(str\), got bytes"),
        (dict(row_dtype="int8"), ValueError, r"^row_dtype: expected one of \('float32'"),
        (dict(out=(1, 2)), TypeError, r"^out: expected a SearchResult \(5 fields\), got tuple"),
        (
            dict(out=r(None, None, np.empty((2, 2, 3, 4, 9), np.float32), None, None)),
            ValueError,
            r"^out: keys must have shape \(2, 2, 3, 4, 8\), got \(2, 2, 3, 4, 9\)$",
        ),
        (
            dict(out=r(None, None, None, np.empty((2, 2, 3, 4, 4), np.int32), None)),
            TypeError,
            r"^out: values must have dtype float32, float16 or bfloat16",
        ),
        (
            dict(out=r(None, None, None, np.empty((2, 2, 3, 4, 4), np.uint16), None)),
            TypeError,
            r"^out: values must have dtype float32",  # bits need row_dtype bfloat16/float16
        ),
        (
            dict(
                out=r(
                    None,
                    None,
                    np.empty((4, 3, 2, 2, 8), np.float32).transpose(3, 2, 1, 0, 4),
                    None,
                    None,
                )
            ),
            ValueError,
            r"^out: keys must be a view whose rows are equally spaced",
        ),
        (
            dict(out=r(None, None, None, np.empty((2, 2, 3, 4, 8), np.float32)[..., ::2], None)),
            ValueError,
            r"^out: values must have a contiguous last axis",
        ),
        (
            dict(out=r(None, np.empty((2, 2, 3, 4), np.int32), None, None, None)),
            ValueError,
            r"^out: indices must be a writeable C-contiguous array of dtype int64",
        ),
        (
            dict(out=r(None, None, None, None, [[True]])),
            TypeError,
            r"^out: mask must be a numpy array or a torch tensor",
        ),
    ]
    read_only = np.empty((2, 2, 3, 4, 4), np.float32)
    read_only.flags.writeable = False
    cases.append(
        (
            dict(out=r(None, None, None, read_only, None)),
            ValueError,
            r"^out: values must be writeable",
        )
    )
    for kwargs, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            mem.search(q, 4, **kwargs)


@pytest.mark.parametrize(
    "which, picked",
    [
        ([1], (slice(1, 2),)),
        ((slice(None), [2, 0]), (slice(None), [2, 0])),
        (np.array([[True, False, True], [False, False, True]]), None),
        ((1, 2), (1, 2)),
    ],
)
def test_sub_grid_search_equals_the_rows_of_the_full_search(which, picked) -> None:
    rng = np.random.default_rng(7)
    mem = _filled(rng, (2, 3), 500, 8, 4, 400, dtype="bfloat16")
    q = _rows(rng, 2, 3, 5, 8)
    full = mem.search(q, 4)
    if picked is None:  # a mask selects in C order, as numpy does
        sub_q, want = q[which], SearchResult(*(a[which] for a in full))
    else:
        sub_q, want = q[picked], SearchResult(*(a[picked] for a in full))
    got = mem.search(sub_q, 4, which=which)
    _same(got, want, FIELDS)


def test_sub_grid_add_writes_only_the_selected_memories() -> None:
    rng = np.random.default_rng(8)
    k1, v1 = _rows(rng, 4, 3, 30, 8), _rows(rng, 4, 3, 30, 4)
    k2, v2 = _rows(rng, 2, 3, 50, 8), _rows(rng, 2, 3, 50, 4)
    sub = knnmem.Memory((4, 3), 64, 8, 4)
    sub.add(k1, v1)
    sub.add(k2, v2, which=[3, 1])
    # the same rows given to the whole grid, the other memories getting nothing
    ref = knnmem.Memory((4, 3), 64, 8, 4)
    ref.add(k1, v1)
    for b, rows in ((3, 0), (1, 1)):
        one = knnmem.Memory((1, 3), 64, 8, 4)
        one.add(k1[b : b + 1], v1[b : b + 1])
        one.add(k2[rows : rows + 1], v2[rows : rows + 1])
        q = _rows(rng, 1, 3, 4, 8)
        _same(sub.search(q, 10, 1.0, which=[b]), one.search(q, 10, 1.0), FIELDS)
    np.testing.assert_array_equal(sub.written, [[30] * 3, [80] * 3, [30] * 3, [80] * 3])
    q = _rows(rng, 4, 3, 4, 8)
    for b in (0, 2):
        _same(
            sub.search(q[[b]], 10, which=[b]),
            ref.search(q, 10).__class__(*(a[[b]] for a in ref.search(q, 10))),
            FIELDS,
        )


def test_sub_grid_add_refuses_bad_selections_and_changes_nothing() -> None:
    rng = np.random.default_rng(9)
    mem = _filled(rng, (2, 3), 64, 8, 4, 10)
    before = mem.written.copy()
    k, v = _rows(rng, 2, 5, 8), _rows(rng, 2, 5, 4)
    with pytest.raises(ValueError, match=r"^which: memory 1 is selected twice \(at 0 and 1\)"):
        mem.add(k, v, which=(0, [1, 1]))
    with pytest.raises(IndexError, match=r"^which: index 3 is out of bounds"):
        mem.add(k, v, which=(0, [1, 3]))
    with pytest.raises(ValueError, match=r"^keys: expected shape \(3, T, key_dim=8\)"):
        mem.add(k, v, which=0)
    with pytest.raises(TypeError, match=r"^which: expected None, a bool mask or integer indices"):
        mem.add(k, v, which=[0.5])
    np.testing.assert_array_equal(mem.written, before)


def test_ops_sub_grids_and_lean_results_match_memory() -> None:
    rng = np.random.default_rng(10)
    keys, values, written = ops.init((3, 2), 128, 8, 8)
    mem = knnmem.Memory((3, 2), 128, 8, 8)
    for step in range(3):
        nk, nv = _rows(rng, 3, 2, 40, 8), _rows(rng, 3, 2, 40, 8)
        ops.add(keys, values, written, nk, nv)
        mem.add(nk, nv)
        sk, sv = _rows(rng, 1, 2, 7, 8), _rows(rng, 1, 2, 7, 8)
        ops.add(keys, values, written, sk, sv, which=[step])
        mem.add(sk, sv, which=[step])
    np.testing.assert_array_equal(written, mem.written)
    q = _rows(rng, 2, 2, 5, 8)
    want = mem.search(q, 6, which=[2, 0])
    got = ops.search(keys, values, written, q, k=6, which=[2, 0])
    _same(got, want, FIELDS)
    lean = ops.search(keys, values, written, q, k=6, which=[2, 0], fields=("scores", "values"))
    _same(lean, want, ("scores", "values"))
    before = written.copy()
    with pytest.raises(ValueError, match=r"^which: memory 4 is selected twice"):
        ops.add(keys, values, written, _rows(rng, 2, 1, 8), _rows(rng, 2, 1, 8), which=(2, [0, 0]))
    np.testing.assert_array_equal(written, before)


# -- torch: KNNMemory and the custom ops ---------------------------------------------------------


def _torch_memory(seed=11, shape=(2, 3), capacity=256, d=16, rows=200):
    from knnmem.torch import KNNMemory

    gen = torch.Generator().manual_seed(seed)
    mem = KNNMemory(shape, capacity, d, d)
    mem.add(
        torch.randn(*shape, rows, d, generator=gen), torch.randn(*shape, rows, d, generator=gen)
    )
    return mem, torch.randn(*shape, 5, d, generator=gen)


@pytest.mark.parametrize("reference", [False, True])
def test_torch_fields_row_dtype_and_sub_grids(reference) -> None:
    from knnmem.torch import use_reference

    mem, q = _torch_memory()
    ctx = use_reference("cpu") if reference else torch.no_grad()
    with ctx:
        full = mem.search(q, 4, 1.0)
        lean = mem.search(q, 4, 1.0, fields=("scores", "values"))
        sub = mem.search(q[:, [2, 0]], 4, 1.0, which=(slice(None), [2, 0]))
        bf = mem.search(q, 4, 1.0, fields="values", row_dtype=torch.bfloat16)
    assert lean.keys is None and lean.indices is None and lean.mask is None
    assert torch.equal(lean.scores, full.scores) and torch.equal(lean.values, full.values)
    for a, b in zip(sub, full):
        assert torch.equal(a, b[:, [2, 0]])
    assert bf.values.dtype == torch.bfloat16 and torch.equal(bf.values, full.values.bfloat16())


def test_torch_out_writes_into_interleaved_and_sub_grid_views() -> None:
    mem, q = _torch_memory(12)
    full = mem.search(q, 4)
    kv = torch.empty(2, 3, 5, 4, 2, 16, dtype=torch.bfloat16)
    out = SearchResult(None, None, kv[..., 0, :], kv[..., 1, :], None)
    assert mem.search(q, 4, out=out) is out
    assert torch.equal(kv[..., 0, :], full.keys.bfloat16())
    assert torch.equal(kv[..., 1, :], full.values.bfloat16())
    scores = torch.empty(1, 3, 5, 4)
    mem.search(q[[1]], 4, which=[1], out=SearchResult(scores, None, None, None, None))
    assert torch.equal(scores, full.scores[[1]])
    with pytest.raises(ValueError, match=r"^out: give either out or fields"):
        mem.search(q, 4, out=out, fields="values")


def test_torch_sub_grid_add_touches_only_the_selected_memories() -> None:
    from knnmem.torch import use_reference

    for reference in (False, True):
        mem, q = _torch_memory(13)
        keys_before = mem.keys.clone()
        new_k, new_v = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
        ctx = use_reference("cpu") if reference else torch.no_grad()
        with ctx:
            mem.add(new_k[:, [1]], new_v[:, [1]], which=(slice(None), [1]))
            with pytest.raises(ValueError, match=r"^which: .*selected twice"):
                mem.add(new_k[0, [1, 1]], new_v[0, [1, 1]], which=(0, [1, 1]))
        assert mem.written.tolist() == [[200, 207, 200], [200, 207, 200]]
        assert torch.equal(mem.keys[:, [0, 2]], keys_before[:, [0, 2]])


def test_torch_gradient_without_keys_fetches_them_only_for_the_backward() -> None:
    mem, q = _torch_memory(14)
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    lean = mem.search(q1, 4, fields=("scores", "values"))
    assert lean.keys is None
    (lean.scores * torch.arange(4.0)).sum().backward()
    (mem.search(q2, 4).scores * torch.arange(4.0)).sum().backward()
    assert torch.equal(q1.grad, q2.grad)
    raw = torch.ops.knnmem.search(
        mem.keys, mem.values, mem.written, q1, 4, 0.9, "ip", "float32", "scores"
    )
    with pytest.raises(RuntimeError, match=r"the gradient of scores needs the retrieved keys"):
        raw[0].sum().backward()


def test_torch_lean_search_compiles_without_graph_breaks() -> None:
    mem, q = _torch_memory(15)
    fn = torch.compile(
        lambda x: mem.search(x, 4, fields=("scores", "values")).values, fullgraph=True
    )
    assert torch.equal(fn(q), mem.search(q, 4).values)


def test_big_results_are_never_reused_while_referenced() -> None:
    # Results of 1 MiB and more take their memory from a cache of freed result blocks:
    # a result still referenced (directly, through a view or a torch tensor) must keep
    # its values while later searches run; dropped ones may be recycled.
    rng = np.random.default_rng(16)
    mem = _filled(rng, (4,), 4096, 32, 32, 4096)
    q1, q2 = _rows(rng, 4, 256, 32), _rows(rng, 4, 256, 32)  # 4 MiB of key rows each
    first = mem.search(q1, 32)
    saved = SearchResult(*(a.copy() for a in first))
    view = first.values[1:3]
    tensor = torch.from_numpy(mem.search(q1, 32).keys)
    for _ in range(3):
        other = mem.search(q2, 32)
        del other
        again = mem.search(q1, 32)
        _same(again, saved, FIELDS)
        del again
    _same(first, saved, FIELDS)
    np.testing.assert_array_equal(view, saved.values[1:3])
    assert torch.equal(tensor, torch.from_numpy(saved.keys))


@pytest.mark.parametrize("recall", [1.0, 0.9])
def test_torch_layer_with_lean_search_keeps_outputs_and_gradients(recall) -> None:
    # MemorizingAttention takes its memory logits from the search's scores (keys fetched
    # for the backward only); the earlier formulation recomputed q.k from returned keys.
    import knnmem.torch as kt

    def run(lean):
        torch.manual_seed(0)
        layer = kt.MemorizingAttention(
            dim=64, num_heads=4, batch_size=2, capacity=256, k=8, recall_target=recall
        )
        layer._lean_search = lean
        loss = 0.0
        for i in range(4):  # the memory fills, wraps (256 rows, 4 x 64), and one row resets
            y = layer(torch.randn(2, 64, 64), reset=torch.tensor([i == 2, False]))
            loss = loss + (y**2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}

    loss, grads = run(True)
    loss0, grads0 = run(False)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=0)
    assert grads.keys() == grads0.keys()
    for name in grads0:
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-5, atol=1e-8, msg=name)
