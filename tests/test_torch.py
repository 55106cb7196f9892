"""knnmem.torch: custom ops (== the numpy path, == the pure-torch reference, opcheck,
torch.compile without graph breaks), KNNMemory and MemorizingAttention."""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch.library import opcheck  # noqa: E402

import knnmem  # noqa: E402
import knnmem.torch as kt  # noqa: E402
from conftest import score_tol, untied  # noqa: E402
from knnmem import torch_reference as ref  # noqa: E402

METRICS = ["ip", "cosine", "l2"]


def rand(rng: np.random.Generator, *dims: int) -> np.ndarray:
    return rng.standard_normal(dims, dtype=np.float32)


def fill(shape, capacity, d, dv, adds, seed=0):
    """The same stream added to a numpy ring (knnmem.ops) and a torch ring (reference add)."""
    rng = np.random.default_rng(seed)
    ring = knnmem.ops.init(shape, capacity, d, dv)
    tring = (
        torch.zeros(*shape, capacity, d),
        torch.zeros(*shape, capacity, dv),
        torch.zeros(shape, dtype=torch.int64),
    )
    for t in adds:
        nk, nv = rand(rng, *shape, t, d), rand(rng, *shape, t, dv)
        knnmem.ops.add(*ring, nk, nv)
        ref.add(*tring, torch.from_numpy(nk), torch.from_numpy(nv))
    return ring, tring, rng


def assert_same_result(got, want, queries, keys, exact_scores=False) -> None:
    """got/want: (scores, indices, keys, values, mask) as numpy. Indices must agree
    wherever the wanted score is untied (float tolerance); rows at equal indices
    are the same rows."""
    g = [np.asarray(x) for x in got]
    w = [np.asarray(x) for x in want]
    np.testing.assert_array_equal(g[4], w[4])
    tol = score_tol(keys, queries)
    sel = untied(w[0], tol)
    np.testing.assert_array_equal(g[1][sel], w[1][sel])
    m = w[4]
    if exact_scores:
        np.testing.assert_array_equal(g[0], w[0])
    else:
        np.testing.assert_allclose(g[0][m], w[0][m], rtol=0, atol=tol)
    assert np.all(np.isneginf(g[0][~m])) and np.all(g[1][~m] == -1)
    same = g[1] == w[1]
    np.testing.assert_array_equal(g[2][same], w[2][same])
    np.testing.assert_array_equal(g[3][same], w[3][same])
    assert np.all(g[2][~m] == 0) and np.all(g[3][~m] == 0)
    assert same[sel].all() and same.mean() > 0.99


# Fill states: partly written block, wrapped ring, more than one placement block
# (65536) with a partly written last one, sparse memory where bins fall back to exact.
FILLS = {
    "partial": (1000, [300]),
    "wrapped": (500, [100, 0, 1000, 33]),
    "two-blocks": (70000, [66000]),
    "fallback": (65536, [200]),
}


@pytest.mark.parametrize("fill_id", list(FILLS))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("k", "recall_target"), [(32, 0.9), (7, 1.0), (100, 0.5)])
def test_reference_and_op_match_numpy_path(fill_id, metric, k, recall_target) -> None:
    capacity, adds = FILLS[fill_id]
    shape, d, dv = (2, 3), 8, 5
    if capacity > 10000:
        shape, d = (1,), 4
    ring, tring, rng = fill(shape, capacity, d, dv, adds, seed=len(fill_id))
    for a, b in zip(ring, tring):  # reference add == core add
        np.testing.assert_array_equal(a, b.numpy())
    q = rand(rng, *shape, 37, d)
    want = knnmem.ops.search(*ring, q, k=k, recall_target=recall_target, metric=metric)
    args = (torch.from_numpy(q), k, recall_target, metric)
    op = torch.ops.knnmem.search(*map(torch.from_numpy, ring), *args)
    assert_same_result(op, want, q, ring[0], exact_scores=True)  # same core, same bits
    got = ref.search(*tring, *args)
    live = ring[0].reshape(-1, d)
    assert_same_result([x.numpy() for x in got], want, q, live)


def test_fallback_case_is_exercised() -> None:
    """The 'fallback' fill: L < rows held but fewer than k bins hold a row."""
    k, capacity, n = 100, 65536, 200
    bins = knnmem.eval.bins_for_recall(k, 0.5)
    _, offset_of = knnmem.ops.placement(capacity)
    occupied = len(np.unique(np.flatnonzero(offset_of < n) % bins))
    assert bins < n and occupied < k


def test_cpu_op_is_zero_copy_and_in_place() -> None:
    rng = np.random.default_rng(1)
    mem = kt.KNNMemory((2, 2), capacity=64, key_dim=6, value_dim=3)
    ptrs = [t.data_ptr() for t in (mem.keys, mem.values, mem.written)]
    views = [t.numpy() for t in (mem.keys, mem.values, mem.written)]
    ring = knnmem.ops.init((2, 2), 64, 6, 3)
    for t in (40, 50):
        nk, nv = rand(rng, 2, 2, t, 6), rand(rng, 2, 2, t, 3)
        mem.add(torch.from_numpy(nk), torch.from_numpy(nv))
        knnmem.ops.add(*ring, nk, nv)
    assert ptrs == [t.data_ptr() for t in (mem.keys, mem.values, mem.written)]
    for view, want in zip(views, ring):
        np.testing.assert_array_equal(view, want)  # the core wrote into the tensors' memory
    np.testing.assert_array_equal(mem.count.numpy(), np.full((2, 2), 64))


@pytest.mark.parametrize("metric", METRICS)
def test_opcheck_search(metric) -> None:
    ring, _, rng = fill((2, 3), 50, 8, 5, [30], seed=2)
    q = torch.from_numpy(rand(rng, 2, 3, 4, 8)).requires_grad_()
    opcheck(torch.ops.knnmem.search.default, (*map(torch.from_numpy, ring), q, 7, 0.9, metric))
    args = (*map(torch.from_numpy, ring), q, 7, 0.9, metric, "int8")
    opcheck(torch.ops.knnmem.search.default, args)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_rounded_precision_matches_the_numpy_path_and_the_reference(metric, precision) -> None:
    """The op is the numpy path bit for bit; the pure-torch reference rounds keys
    (and int8 queries) the same way, so it finds nearly the same rows with scores
    equal to rounding."""
    ring, tring, rng = fill((2, 3), 3000, 24, 5, [2000, 1500], seed=11)
    q = rand(rng, 2, 3, 40, 24)
    want = knnmem.ops.search(*ring, q, k=16, recall_target=0.9, metric=metric, precision=precision)
    args = (torch.from_numpy(q), 16, 0.9, metric, precision)
    op = torch.ops.knnmem.search(*map(torch.from_numpy, ring), *args)
    for got, exp in zip(op, want):
        np.testing.assert_array_equal(got.numpy(), exp)
    got = ref.search(*tring, *args)
    same = (got[1].numpy()[..., :, None] == want.indices[..., None, :]).any(-1)
    assert same.mean() > 0.97
    scale = np.abs(want.scores[np.isfinite(want.scores)]).max()
    # bfloat16: the core may round the queries too (vdpbf16ps), 2^-9 relative each
    tol = 2.0**-8 if precision == "bfloat16" else 1e-5
    np.testing.assert_allclose(got[0].numpy()[same], want.scores[same], atol=tol * scale)


def test_opcheck_add_and_clear() -> None:
    ring, _, rng = fill((2, 3), 50, 8, 5, [30], seed=3)
    ring = tuple(map(torch.from_numpy, ring))
    new = (torch.from_numpy(rand(rng, 2, 3, 9, 8)), torch.from_numpy(rand(rng, 2, 3, 9, 5)))
    opcheck(torch.ops.knnmem.add.default, (*ring, *new))
    mask = torch.tensor([[True, False, True], [False, False, True]])
    opcheck(torch.ops.knnmem.clear.default, (ring[2], mask))


@pytest.mark.parametrize("metric", METRICS)
def test_scores_gradient_wrt_queries(metric) -> None:
    """d scores / d queries equals autograd through the score formula with the
    returned keys held constant; nothing flows into the memory."""
    ring, _, rng = fill((2, 2), 40, 6, 3, [25], seed=4)
    keys, values, written = map(torch.from_numpy, ring)
    q = torch.from_numpy(rand(rng, 2, 2, 5, 6)).requires_grad_()
    scores, _, rk, rv, mask = torch.ops.knnmem.search(keys, values, written, q, 30, 1.0, metric)
    assert not rk.requires_grad and not rv.requires_grad and scores.requires_grad
    weight = torch.from_numpy(rand(rng, *scores.shape))
    (grad,) = torch.autograd.grad((torch.where(mask, scores, 0.0) * weight).sum(), q)
    q2 = q.detach().clone().requires_grad_()
    dots = torch.einsum("...qd,...qkd->...qk", q2, rk)
    if metric == "cosine":
        redo = dots / (q2.norm(dim=-1)[..., None] * rk.norm(dim=-1).clamp_min(1e-30))
    elif metric == "l2":
        redo = -((q2[..., None, :] - rk) ** 2).sum(-1)
    else:
        redo = dots
    np.testing.assert_allclose(redo[mask].detach(), scores[mask].detach(), rtol=1e-5, atol=1e-5)
    (want,) = torch.autograd.grad((torch.where(mask, redo, 0.0) * weight).sum(), q2)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)


@pytest.fixture
def reference_path():
    """Runs the ops' non-CPU code path (the pure-torch reference) on CPU tensors."""
    with kt.use_reference("cpu"):
        yield


@pytest.mark.parametrize("metric", METRICS)
def test_op_reference_path_matches_core(reference_path, metric) -> None:
    rng = np.random.default_rng(5)
    a = kt.KNNMemory((2, 2), capacity=300, key_dim=16, value_dim=4, metric=metric)
    b = kt.KNNMemory((2, 2), capacity=300, key_dim=16, value_dim=4, metric=metric)
    for t in (120, 250, 7):
        nk = torch.from_numpy(rand(rng, 2, 2, t, 16))
        nv = torch.from_numpy(rand(rng, 2, 2, t, 4))
        a.add(nk, nv)  # reference path (patched)
        ring = tuple(x.numpy() for x in (b.keys, b.values, b.written))
        knnmem.ops.add(*ring, nk.numpy(), nv.numpy())  # core
    for x, y in zip(a.buffers(), b.buffers()):
        assert torch.equal(x, y)
    a.clear(torch.tensor([False, True]))
    b.written[1] = 0
    q = rand(rng, 2, 2, 33, 16)
    got = a.search(torch.from_numpy(q), k=32, recall_target=0.9)
    want = knnmem.ops.search(b.keys, b.values, b.written, q, k=32, metric=metric)
    assert_same_result([x.numpy() for x in got], [np.asarray(x) for x in want], q, b.keys.numpy())
    with pytest.raises(ValueError, match=r"queries: expected finite values, got nan at index"):
        a.search(torch.full((2, 2, 1, 16), float("nan")))
    before = [x.clone() for x in a.buffers()]
    bad = torch.zeros(2, 2, 3, 4)
    bad[1, 0, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"new_values: expected finite values"):
        a.add(torch.zeros(2, 2, 3, 16), bad)
    assert all(torch.equal(x, y) for x, y in zip(before, a.buffers()))


def test_use_reference_switches_the_backend_for_a_block() -> None:
    mem = kt.KNNMemory(2, capacity=8, key_dim=4)
    mem.written[0] = -1  # the C++ core and the pure-torch reference word this error differently
    rows = torch.zeros(2, 1, 4)
    core = r"written: expected counts >= 0, got -1 at index \[0\]"
    reference = r"written: expected counts >= 0$"
    with pytest.raises(ValueError, match=core):
        mem.add(rows, rows)
    for devices in [(), ("cpu",), ("cuda", "cpu")]:
        with kt.use_reference(*devices), pytest.raises(ValueError, match=reference):
            mem.add(rows, rows)
    with kt.use_reference("cuda"), pytest.raises(ValueError, match=core):
        mem.add(rows, rows)  # CPU tensors still go to the core
    with pytest.raises(ValueError, match=core):
        mem.add(rows, rows)  # restored after the blocks (which raised)
    with pytest.raises(ValueError, match=r"device_types: expected names in \('cpu', 'cuda'\)"):
        with kt.use_reference("gpu"):
            pass
    with pytest.raises(TypeError, match=r"device_types: expected str, got device"):
        with kt.use_reference(torch.device("cpu")):
            pass


def test_package_api_and_layout() -> None:
    """The public names, the documented module paths knnmem.torch_reference and
    knnmem.torch_distributed, and no import loop: each private module of the package
    imports only the ones before it in `layers` (__init__ imports them all)."""
    import ast
    import importlib
    from pathlib import Path

    import knnmem.torch_distributed
    import knnmem.torch_reference

    assert set(kt.__all__) == {
        *("search", "add", "clear", "use_reference", "SearchResult"),
        *("KNNMemory", "MemorizingAttention", "ShardedKNNMemory", "ddp_ignore_memories"),
        "at_batch_size",
    }
    assert all(getattr(kt, name) is not None for name in kt.__all__)
    assert kt.SearchResult is knnmem.SearchResult
    assert knnmem.torch_distributed.ShardedKNNMemory is kt.ShardedKNNMemory
    assert knnmem.torch_reference.__all__ == ["placement", "add", "search"]
    for name in knnmem.torch_reference.__all__:  # the functions the ops run
        assert getattr(knnmem.torch_reference, name).__module__ == "knnmem.torch._reference"
    assert hasattr(torch.ops.knnmem, "search") and hasattr(torch.ops.knnmem, "clear")
    layers = ["_reference", "_checks", "_ops", "_memory", "_attention", "_distributed"]
    root = Path(kt.__file__).parent
    assert sorted(p.stem for p in root.glob("_*.py") if p.stem != "__init__") == sorted(layers)
    for i, name in enumerate(layers):
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("knnmem") for a in node.names), name
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            if node.level == 1:  # the package's own modules: lower layers only
                used = [node.module] if node.module else [a.name for a in node.names]
                assert all(m in layers[:i] for m in used), f"{name} imports {used}"
            else:  # knnmem's: never the front end's own paths
                used = [node.module] if node.module else [a.name for a in node.names]
                assert not any(m.split(".")[0].startswith("torch") for m in used), name
        importlib.import_module(f"knnmem.torch.{name}")


# -- torch.compile ---------------------------------------------------------------------


class CountGraphs:
    """A torch.compile backend that counts graphs and runs them with aot_eager
    (fake tensors, functionalised mutation: what inductor sees)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def test_compile_fullgraph_ops_no_graph_breaks() -> None:
    torch._dynamo.reset()
    rng = np.random.default_rng(6)
    eager = kt.KNNMemory((2, 3), capacity=128, key_dim=8, value_dim=4, metric="cosine")
    compiled = kt.KNNMemory((2, 3), capacity=128, key_dim=8, value_dim=4, metric="cosine")

    def step(mem, keys, values, queries, reset):
        mem.clear(reset)
        res = mem.search(queries, k=16, recall_target=0.9)
        mem.add(keys, values)
        return res.scores.sum(-1), res.indices, res.values, res.mask

    backend = CountGraphs()
    fn = torch.compile(step, backend=backend, fullgraph=True)
    for i in range(4):
        args = (
            torch.from_numpy(rand(rng, 2, 3, 40, 8)),
            torch.from_numpy(rand(rng, 2, 3, 40, 4)),
            torch.from_numpy(rand(rng, 2, 3, 10, 8)),
            torch.tensor([i == 2, False]),
        )
        want = step(eager, *args)
        got = fn(compiled, *args)
        for x, y in zip(got, want):
            assert torch.equal(x, y)
        for x, y in zip(compiled.buffers(), eager.buffers()):
            assert torch.equal(x, y)  # the buffer mutations happened
    assert backend.graphs == 1
    np.testing.assert_array_equal(compiled.written.numpy(), [[80] * 3, [160] * 3])
    explained = torch._dynamo.explain(step)(eager, *args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.parametrize("context", [False, True])
def test_compile_fullgraph_memorizing_attention_training_step(context: bool) -> None:
    """No graph breaks; with context=True one more graph, for the calls that have a
    previous segment."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = kt.MemorizingAttention(32, 4, batch_size=2, capacity=256, k=8, context=context)
    compiled = kt.MemorizingAttention(32, 4, batch_size=2, capacity=256, k=8, context=context)
    compiled.load_state_dict(eager.state_dict())
    backend = CountGraphs()
    fn = torch.compile(compiled, backend=backend, fullgraph=True)
    for i in range(3):
        x = torch.randn(2, 16, 32)
        reset = torch.tensor([False, i == 2])
        want, got = eager(x, reset), fn(x, reset)
        torch.testing.assert_close(got, want)
        want.square().mean().backward()
        got.square().mean().backward()
        for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert backend.graphs == (2 if context else 1)
    np.testing.assert_array_equal(compiled.memory.written.numpy(), [[48] * 4, [16] * 4])
    assert torch.equal(compiled.memory.keys, eager.memory.keys)


# -- KNNMemory -------------------------------------------------------------------------


def test_knn_memory_matches_knnmem_memory() -> None:
    rng = np.random.default_rng(7)
    mem = kt.KNNMemory((2, 3), capacity=100, key_dim=12, value_dim=5, metric="l2")
    ref_mem = knnmem.Memory((2, 3), capacity=100, key_dim=12, value_dim=5, metric="l2")
    for t in (60, 70):
        nk, nv = rand(rng, 2, 3, t, 12), rand(rng, 2, 3, t, 5)
        mem.add(torch.from_numpy(nk).to(torch.bfloat16), torch.from_numpy(nv).double())
        ref_mem.add(torch.from_numpy(nk).to(torch.bfloat16), nv)
    mem.clear((1, 2))
    ref_mem.clear((1, 2))
    q = rand(rng, 2, 3, 9, 12)
    got = mem.search(torch.from_numpy(q).half(), k=20, recall_target=0.95)
    want = ref_mem.search(torch.from_numpy(q).half(), k=20, recall_target=0.95)
    assert isinstance(got, knnmem.SearchResult)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    np.testing.assert_array_equal(mem.count.numpy(), ref_mem.count)
    assert "capacity=100" in repr(mem)


def test_knn_memory_state_dict_round_trip_and_dtype() -> None:
    rng = np.random.default_rng(8)
    mem = kt.KNNMemory(4, capacity=50, key_dim=8)
    mem.add(torch.from_numpy(rand(rng, 4, 70, 8)), torch.from_numpy(rand(rng, 4, 70, 8)))
    buf = io.BytesIO()
    torch.save(mem.state_dict(), buf)
    buf.seek(0)
    other = kt.KNNMemory(4, capacity=50, key_dim=8)
    other.load_state_dict(torch.load(buf))
    q = torch.from_numpy(rand(rng, 4, 5, 8))
    for x, y in zip(mem.search(q), other.search(q)):
        assert torch.equal(x, y)
    assert set(mem.state_dict()) == {"keys", "values", "written"}
    keys = mem.keys.clone()
    mem.half()  # storage stays float32 and is not rounded
    assert mem.keys.dtype == torch.float32 and torch.equal(mem.keys, keys)
    mem.to("cpu", torch.bfloat16)
    assert mem.values.dtype == torch.float32 and mem.written.dtype == torch.int64


@pytest.mark.parametrize(
    ("which", "cleared"),
    [
        (None, [0, 1, 2, 3, 4, 5]),
        (torch.tensor([False, True]), [3, 4, 5]),
        (torch.tensor([[True, False, False], [False, False, True]]), [0, 5]),
        ((1, 2), [5]),
        ([0], [0, 1, 2]),
        (torch.tensor([1]), [3, 4, 5]),
    ],
)
def test_knn_memory_clear_forms(which, cleared) -> None:
    mem = kt.KNNMemory((2, 3), capacity=8, key_dim=2)
    mem.add(torch.ones(2, 3, 5, 2), torch.ones(2, 3, 5, 2))
    mem.clear(which)
    want = np.full(6, 5)
    want[cleared] = 0
    np.testing.assert_array_equal(mem.written.numpy().reshape(-1), want)


def ones(*dims, **kw):
    return torch.ones(dims, **kw)


NAN = float("nan")
BAD_CALLS = {
    "add-key-dim": (
        lambda m: m.add(ones(2, 3, 5, 3), ones(2, 3, 5, 2)),
        ValueError,
        r"new_keys: expected shape \(2, 3, T, key_dim=4\), got \(2, 3, 5, 3\)",
    ),
    "add-rows": (
        lambda m: m.add(ones(2, 3, 5, 4), ones(2, 3, 4, 2)),
        ValueError,
        r"new_values: expected shape \(2, 3, T=5, value_dim=2\)",
    ),
    "add-int": (
        lambda m: m.add(ones(2, 3, 1, 4, dtype=torch.int32), ones(2, 3, 1, 2)),
        TypeError,
        "new_keys: expected a floating-point tensor",
    ),
    "add-nan": (
        lambda m: m.add(ones(2, 3, 1, 4), torch.full((2, 3, 1, 2), NAN)),
        ValueError,
        r"new_values: expected finite values, got nan at index \[0, 0, 0, 0\]",
    ),
    "search-grid": (
        lambda m: m.search(ones(3, 3, 1, 4), k=4),
        ValueError,
        r"queries: expected shape \(2, 3, Q, key_dim=4\)",
    ),
    "search-k": (
        lambda m: m.search(ones(2, 3, 1, 4), k=17),
        ValueError,
        r"k: expected an integer in \[1, capacity=16\], got 17",
    ),
    "search-recall": (
        lambda m: m.search(ones(2, 3, 1, 4), k=4, recall_target=0),
        ValueError,
        r"recall_target: expected a number in \(0, 1\]",
    ),
    "search-nan": (
        lambda m: m.search(torch.full((2, 3, 1, 4), NAN), k=4),
        ValueError,
        r"queries: expected finite values, got nan at index \[0, 0, 0, 0\]",
    ),
    "search-float64-range": (
        lambda m: m.search(torch.full((2, 3, 1, 4), 1e39, dtype=torch.float64), k=4),
        ValueError,
        r"queries: expected values within the float32 range, got 1e\+39 at index \[0, 0, 0, 0\]",
    ),
    "search-device": (
        lambda m: m.search(ones(2, 3, 1, 4, device="meta"), k=4),
        ValueError,
        "queries: expected a tensor on cpu",
    ),
    "clear-mask": (
        lambda m: m.clear(torch.tensor([True])),
        ValueError,
        r"which: expected a bool mask of shape \(2, 3\) or a prefix",
    ),
    "clear-index": (lambda m: m.clear(7), IndexError, "which"),
    "op-keys-dtype": (
        lambda m: torch.ops.knnmem.add(
            m.keys.double(), m.values, m.written, ones(2, 3, 1, 4), ones(2, 3, 1, 2)
        ),
        TypeError,
        "keys: expected dtype torch.float32, got torch.float64",
    ),
    "op-written-dtype": (
        lambda m: torch.ops.knnmem.search(m.keys, m.values, m.written.int(), ones(2, 3, 1, 4), 4),
        TypeError,
        "written: expected dtype torch.int64",
    ),
    "op-metric": (
        lambda m: torch.ops.knnmem.search(
            m.keys, m.values, m.written, ones(2, 3, 1, 4), 4, 0.9, "dot"
        ),
        ValueError,
        "metric: expected one of",
    ),
    "op-values-shape": (
        lambda m: torch.ops.knnmem.search(m.keys, m.values[:, :, :3], m.written, ones(2, 3, 1, 4)),
        ValueError,
        r"values: expected shape \(2, 3, capacity=16, value_dim\), got \(2, 3, 3, 2\)",
    ),
    "op-clear-shape": (
        lambda m: torch.ops.knnmem.clear(m.written, ones(3, 2, dtype=torch.bool)),
        ValueError,
        r"mask: expected shape \(2, 3\) \(as written\), got \(3, 2\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_and_changes_nothing(case) -> None:
    call, exc, match = BAD_CALLS[case]
    mem = kt.KNNMemory((2, 3), capacity=16, key_dim=4, value_dim=2)
    mem.add(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 2))
    before = [x.clone() for x in mem.buffers()]
    with pytest.raises(exc, match=match):
        call(mem)
    assert all(torch.equal(x, y) for x, y in zip(before, mem.buffers()))


def test_non_contiguous_ring() -> None:
    ring = (torch.zeros(2, 8, 4)[:, ::2], torch.zeros(2, 4, 2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="keys: expected a contiguous tensor"):
        torch.ops.knnmem.add(*ring, ones(2, 1, 4), ones(2, 1, 2))
    # A non-contiguous ring is fine for a search (read only).
    res = torch.ops.knnmem.search(*ring, ones(2, 1, 4), 2, 1.0, "ip")
    assert not res[4].any()


# -- MemorizingAttention ---------------------------------------------------------------


def make_pair(**kwargs):
    torch.manual_seed(0)
    a = kt.MemorizingAttention(32, 4, batch_size=2, capacity=128, k=8, **kwargs)
    b = kt.MemorizingAttention(32, 4, batch_size=2, capacity=128, k=8, use_memory=False)
    b.load_state_dict({n: p for n, p in a.state_dict().items() if not n.startswith("memory.")})
    return a, b


def test_memorizing_attention_empty_memory_is_local_attention() -> None:
    layer, local = make_pair()
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(layer(x), local(x))  # searched before adding: empty memory
    np.testing.assert_array_equal(layer.memory.written.numpy(), np.full((2, 4), 16))
    y = layer(torch.randn(2, 16, 32))
    assert not torch.allclose(y, local(x))


def test_memorizing_attention_reset_single_batch_elements() -> None:
    layer, _ = make_pair()
    fresh, _ = make_pair()
    for _ in range(3):
        layer(torch.randn(2, 16, 32))
    x = torch.randn(2, 16, 32)
    y = layer(x, reset=torch.tensor([True, False]))
    np.testing.assert_array_equal(layer.memory.written.numpy(), [[16] * 4, [64] * 4])
    torch.testing.assert_close(y[0], fresh(x)[0])  # batch element 0 starts a new document
    assert not torch.allclose(y[1], fresh(x)[1])
    layer.reset()
    assert int(layer.memory.written.sum()) == 0


def test_memorizing_attention_memory_holds_normalised_keys() -> None:
    layer, _ = make_pair()
    x = torch.randn(2, 16, 32)
    layer(x)
    q, k, v = layer.qkv(x).view(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    res = layer.memory.search(F.normalize(k, dim=-1).detach(), k=1, recall_target=1.0)
    np.testing.assert_array_equal(
        res.indices[..., 0].numpy(), np.broadcast_to(np.arange(16), (2, 4, 16))
    )
    torch.testing.assert_close(res.values[..., 0, :], v.detach())
    torch.testing.assert_close(res.scores[..., 0], torch.ones(2, 4, 16))


def test_memorizing_attention_gradients_reach_queries_not_memory() -> None:
    layer, _ = make_pair()
    layer(torch.randn(2, 16, 32))
    with torch.no_grad():
        layer.gate.fill_(float("inf"))  # g = 1: the output is the memory attention alone
    layer(torch.randn(2, 16, 32)).sum().backward()
    grad = layer.qkv.weight.grad.view(3, 32, 32)
    assert grad[0].abs().sum() > 0  # queries
    assert torch.all(grad[1] == 0) and torch.all(grad[2] == 0)  # keys and values: none
    assert layer.log_scale.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in layer.memory.buffers())


def test_memorizing_attention_context_is_the_previous_segment() -> None:
    """context=True: local attention over [previous segment, segment] equals causal
    attention over the two concatenated (the rotary positions run on); a reset hides a
    batch element's context; segments may change length."""
    torch.manual_seed(0)
    ctx = kt.MemorizingAttention(32, 4, batch_size=2, use_memory=False, context=True)
    full = kt.MemorizingAttention(32, 4, batch_size=2, use_memory=False)
    full.load_state_dict(ctx.state_dict())  # the context is not state: same parameters
    s1, s2, s3 = (torch.randn(2, 16, 32) for _ in range(3))
    s4 = torch.randn(2, 8, 32)
    torch.testing.assert_close(ctx(s1), full(s1))  # nothing before the first segment
    torch.testing.assert_close(ctx(s2), full(torch.cat([s1, s2], 1))[:, 16:])
    y = ctx(s3, reset=torch.tensor([True, False]))  # element 0 starts a new document
    torch.testing.assert_close(y[0], full(s3)[0])
    torch.testing.assert_close(y[1], full(torch.cat([s2, s3], 1))[1, 16:])
    torch.testing.assert_close(ctx(s4), full(torch.cat([s3, s4], 1))[:, 16:])
    ctx.reset()
    torch.testing.assert_close(ctx(s1), full(s1))
    with pytest.raises(ValueError, match="x: expected batch size 2 .the previous segment's"):
        ctx(torch.randn(3, 16, 32))


def test_memorizing_attention_context_with_memory() -> None:
    """context and memory together: the memory part is unchanged by the context, and no
    gradient reaches the previous segment's keys or values."""
    torch.manual_seed(1)
    a = kt.MemorizingAttention(32, 4, batch_size=2, capacity=128, k=8, context=True)
    b = kt.MemorizingAttention(32, 4, batch_size=2, capacity=128, k=8)
    b.load_state_dict(a.state_dict())
    segs = [torch.randn(2, 16, 32) for _ in range(3)]
    for x in segs[:2]:
        a(x), b(x)
    with torch.no_grad():
        for layer in (a, b):
            layer.gate.fill_(float("inf"))  # g = 1: memory attention alone
    torch.testing.assert_close(a(segs[2]), b(segs[2]))
    with torch.no_grad():
        a.gate.zero_()
    a(segs[0]).sum().backward()
    assert all(not t.requires_grad for t in a._context)


def test_memorizing_attention_bfloat16_and_bad_batch() -> None:
    layer, _ = make_pair()
    layer.to(torch.bfloat16)
    assert layer.qkv.weight.dtype == torch.bfloat16 and layer.memory.keys.dtype == torch.float32
    for _ in range(2):
        y = layer(torch.randn(2, 16, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="x: expected batch size 2"):
        layer(torch.randn(3, 16, 32, dtype=torch.bfloat16))
