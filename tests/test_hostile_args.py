"""Hostile arguments: every public entry point turns extreme or wrongly typed arguments
into the documented ValueError / TypeError naming the argument (or simply works),
never an internal error, a hang or a crash (conventions of tests/test_bad_input.py).

1. k and recall_target: ints beyond int64 / float, NaN, inf, numpy scalars, bools, in
   every function that takes them.
2. recall targets so close to 1 that the bins outnumber the rows held: every search
   path gives the exact top-k without allocating anything sized by the bin count (run
   in a subprocess with a timeout and an address-space limit).
3. torch tensors without plain data (meta, nested, sparse, mkldnn, float8, quantized)
   and ring tensors that require grad.
4. knnmem.jax: non-array queries, bad state fields, capacity_axis outside shard_map,
   sharded_search / init arguments.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import knnmem  # noqa: E402
import knnmem.jax as kj  # noqa: E402
import knnmem.torch as kt  # noqa: E402
from knnmem import eval as keval  # noqa: E402
from knnmem import ops  # noqa: E402

SHAPE, CAP, KD = (2,), 16, 4
NAN, INF = float("nan"), float("inf")
RECALL = r"^recall_target: expected a number in \(0, 1\], got "
K_RANGE = rf"^k: expected an integer in \[1, capacity={CAP}\], got "
NOT_FLOAT = r"expected a floating-point array \(float16, bfloat16, float32, float64\), got dtype"
DENSE = r"expected a dense \(strided\) tensor, got "


def case(case_id: str, *values):
    return pytest.param(*values, id=case_id)


def rand(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


QUERIES = rand(1, *SHAPE, 3, KD)
KEYS, VALUES = rand(2, *SHAPE, 10, KD), rand(3, *SHAPE, 10, KD)


# -- 1. k and recall_target --------------------------------------------------------------
@pytest.fixture(scope="module")
def searches() -> dict:
    """name -> search(k, recall_target) for every public entry point taking them."""
    mem = knnmem.Memory(SHAPE, CAP, KD)
    mem.add(KEYS, VALUES)
    ring = ops.init(SHAPE, CAP, KD)
    ops.add(*ring, KEYS, VALUES)
    state = kj.add(kj.init(SHAPE, CAP, KD), KEYS, VALUES)
    mesh = jax.make_mesh((1,), ("x",))
    tmem = kt.KNNMemory(SHAPE, CAP, KD)
    tmem.add(torch.from_numpy(KEYS), torch.from_numpy(VALUES))
    q, tq = jnp.asarray(QUERIES), torch.from_numpy(QUERIES)
    return {
        "Memory.search": lambda k, rt: mem.search(QUERIES, k=k, recall_target=rt).indices,
        "ops.search": lambda k, rt: ops.search(*ring, QUERIES, k=k, recall_target=rt).indices,
        "jax.search": lambda k, rt: kj.search(state, q, k, rt).indices,
        "jax.search_reference": lambda k, rt: kj.search_reference(state, q, k, rt).indices,
        "jax.sharded_search": lambda k, rt: kj.sharded_search(mesh, state, q, k, rt).indices,
        "jax.memorizing_attention": lambda k, rt: kj.memorizing_attention(
            q, q, q, state, 0.0, k=k, recall_target=rt
        )[0],
        "torch.KNNMemory.search": lambda k, rt: tmem.search(tq, k=k, recall_target=rt).indices,
        "torch.MemorizingAttention": lambda k, rt: kt.MemorizingAttention(
            8, 2, 2, capacity=CAP, k=k, recall_target=rt
        ),
    }


SEARCH_NAMES = [
    "Memory.search",
    "ops.search",
    "jax.search",
    "jax.search_reference",
    "jax.sharded_search",
    "jax.memorizing_attention",
    "torch.KNNMemory.search",
    "torch.MemorizingAttention",
]

RT_CASES = [
    case("1e400", 10**400, ValueError, RECALL + r"an integer of 1329 bits$"),
    case("-1e400", -(10**400), ValueError, RECALL + r"a negative integer of 1329 bits$"),
    case("1e5000", 10**5000, ValueError, RECALL),  # too many digits for str()
    case("2**64", 2**64, ValueError, RECALL + r"18446744073709551616\.0$"),  # as a float
    case("nan", NAN, ValueError, RECALL + "nan$"),
    case("inf", INF, ValueError, RECALL + "inf$"),
    case("-inf", -INF, ValueError, RECALL + "-inf$"),
    case("np.float64-nan", np.float64(NAN), ValueError, RECALL + "nan$"),
    case("np.float32-inf", np.float32(INF), ValueError, RECALL + "inf$"),
    case("np.longdouble-1e4000", np.longdouble("1e4000"), ValueError, RECALL),
    case("np.int64-2", np.int64(2), ValueError, RECALL + r"2\.0$"),
    case("np.uint64-max", np.uint64(2**64 - 1), ValueError, RECALL),
    case("True", True, TypeError, RECALL + "bool$"),
    case("np.True_", np.bool_(True), TypeError, RECALL + "bool$"),
    case("jnp-0.9", jnp.float32(0.9), TypeError, RECALL),
    case("torch-0.9", torch.tensor(0.9), TypeError, RECALL),
]
RT_OK = [np.float32(0.5), np.float16(1.0), np.int64(1), 1, np.longdouble(0.75)]

K_CASES = [
    case("1e30", 10**30, ValueError, K_RANGE + "1000000000000000000000000000000$"),
    case("-1e30", -(10**30), ValueError, K_RANGE + "-1000000000000000000000000000000$"),
    case("1e5000", 10**5000, ValueError, K_RANGE + "an integer of 16610 bits$"),
    case("-1e5000", -(10**5000), ValueError, K_RANGE + "a negative integer of 16610 bits$"),
    case("2**63", 2**63, ValueError, K_RANGE + "9223372036854775808$"),
    case("np.uint64-max", np.uint64(2**64 - 1), ValueError, K_RANGE + "18446744073709551615$"),
    case("True", True, TypeError, r"^k: expected an integer, got bool"),
    case("np.False_", np.bool_(False), TypeError, r"^k: expected an integer, got bool"),
    case("np.float64-3", np.float64(3), TypeError, r"^k: expected an integer, got float64"),
    case("nan", NAN, TypeError, r"^k: expected an integer, got float"),
]
K_OK = [np.int64(3), np.uint8(3), np.int32(CAP)]


def ends(match: str) -> str:
    """match, its $ also before a newline: errors raised under jax.shard_map come with a
    note on JAX's traceback filtering appended."""
    return match[:-1] + r"(\n|$)" if match.endswith("$") else match


@pytest.mark.parametrize(("recall_target", "exc", "match"), RT_CASES)
@pytest.mark.parametrize("entry", SEARCH_NAMES)
def test_recall_target_hostile_values(searches, entry, recall_target, exc, match):
    with pytest.raises(exc, match=ends(match)):
        searches[entry](3, recall_target)


@pytest.mark.parametrize(("k", "exc", "match"), K_CASES)
@pytest.mark.parametrize("entry", SEARCH_NAMES)
def test_k_hostile_values(searches, entry, k, exc, match):
    with pytest.raises(exc, match=ends(match)):
        searches[entry](k, 0.9)


@pytest.mark.parametrize("entry", SEARCH_NAMES)
def test_numpy_scalars_in_range_work(searches, entry):
    for recall_target in RT_OK:
        searches[entry](3, recall_target)
    for k in K_OK:
        out = searches[entry](k, 0.9)
        if entry.endswith("search"):
            assert tuple(out.shape) == (*SHAPE, 3, int(k))


EVAL_K_CASES = [
    case("1e30", 10**30, ValueError, r"^{arg}: expected an integer in \[1, 9223372036854775807\]"),
    case("1e5000", 10**5000, ValueError, r"^{arg}: .*an integer of 16610 bits$"),
    case("-1e30", -(10**30), ValueError, r"^{arg}: expected an integer >= 1, got -10{{30}}$"),
    case("0", 0, ValueError, r"^{arg}: expected an integer >= 1, got 0$"),
    case("np.uint64-max", np.uint64(2**64 - 1), ValueError, r"^{arg}: expected an integer in"),
    case("True", True, TypeError, r"^{arg}: expected an integer, got bool"),
    case("3.0", 3.0, TypeError, r"^{arg}: expected an integer, got float"),
]
EVAL_K_CALLS = {
    "bins_for_recall": ("k", lambda v: keval.bins_for_recall(v, 0.9)),
    "bins_for_search": ("k", lambda v: keval.bins_for_search(v, 0.9)),
    "expected_recall-num_bins": ("num_bins", lambda v: keval.expected_recall(v, 3)),
    "expected_recall-k": ("k", lambda v: keval.expected_recall(3, v)),
    "exact_search": ("k", lambda v: keval.exact_search(KEYS[0], QUERIES[0], v)),
}


@pytest.mark.parametrize(("value", "exc", "match"), EVAL_K_CASES)
@pytest.mark.parametrize("call", list(EVAL_K_CALLS))
def test_eval_integer_arguments(call, value, exc, match):
    arg, fn = EVAL_K_CALLS[call]
    with pytest.raises(exc, match=match.format(arg=arg)):
        fn(value)


@pytest.mark.parametrize(("recall_target", "exc", "match"), RT_CASES)
@pytest.mark.parametrize("call", ["bins_for_recall", "bins_for_search"])
def test_eval_recall_target(call, recall_target, exc, match):
    with pytest.raises(exc, match=match):
        getattr(keval, call)(3, recall_target)


def test_eval_bins_for_search_dtype():
    with pytest.raises(ValueError, match=r"^dtype: expected one of \('float32', 'bfloat16'"):
        keval.bins_for_search(3, 0.9, None)
    assert keval.bins_for_search(np.int64(3), np.float32(1.0), "int8") == 0


TORCH_OP_CASES = [
    case("rt-nan", dict(recall_target=NAN), ValueError, RECALL + "nan$"),
    case("rt-inf", dict(recall_target=INF), ValueError, RECALL + "inf$"),
    case("rt-np.float32-nan", dict(recall_target=np.float32(NAN)), ValueError, RECALL),
    case("rt-longdouble", dict(recall_target=np.longdouble("1e4000")), ValueError, RECALL),
    case("k-int64-max", dict(k=2**63 - 1), ValueError, K_RANGE + "9223372036854775807$"),
    case("k-int64-min", dict(k=-(2**63)), ValueError, K_RANGE + "-9223372036854775808$"),
    # Values the op's schema (int k, float recall_target) cannot hold are refused by
    # torch's argument parser before knnmem runs, with torch's RuntimeError naming them.
    case("k-1e30", dict(k=10**30), RuntimeError, r"for argument 'k'"),
    case("k-uint64", dict(k=np.uint64(2**64 - 1)), RuntimeError, r"for argument 'k'"),
    case("rt-1e400", dict(recall_target=10**400), RuntimeError, r"for argument 'recall_target'"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), TORCH_OP_CASES)
def test_torch_op_scalar_arguments(kwargs, exc, match):
    mem = kt.KNNMemory(SHAPE, CAP, KD)
    args = {"k": 3, "recall_target": 0.9, **kwargs}
    with pytest.raises(exc, match=match):
        torch.ops.knnmem.search(mem.keys, mem.values, mem.written, torch.ones(2, 3, KD), **args)


# -- 2. recall targets next to 1: bins beyond the rows held ---------------------------------
NEAR_ONE = [  # (recall_target, k) on a memory of capacity 2050
    (0.9999999999999999, 2050),
    (1 - 1e-12, 2049),
    (1 - 1e-9, 2),  # ~5e8 bins: exact, not a [grid, 5e8] table
    (0.999999, 16),  # ~7.5e6 bins
]
NEAR_ONE_PATHS = [
    "Memory",
    "ops-float32",
    "ops-bfloat16",
    "ops-int8",
    "jax-auto",
    "jax-ffi",
    "jax-reference",
    "jax-pallas",
    "torch-op",
    "torch-reference",
    "torch-reference-bfloat16",
    "torch-reference-int8",
]


@pytest.fixture(scope="module")
def near_one_results() -> dict:
    """Runs every path in one child process (a hang fails the tests, an allocation sized
    by the bin count fails fast against the child's address-space limit)."""
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "near-one"], capture_output=True, text=True, timeout=240
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the near-1 searches did not finish in {e.timeout} s")
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", NEAR_ONE_PATHS)
def test_recall_target_next_to_one_is_exact_and_small(near_one_results, path):
    got = {case: status for (p, case), status in _items(near_one_results) if p == path}
    assert len(got) == len(NEAR_ONE)
    assert all(status == "ok" for status in got.values()), got


def _items(results: dict):
    for key, status in results.items():
        path, case = key.split("|")
        yield (path, case), status


def _near_one_child() -> None:
    """The child of near_one_results: prints {"path|target,k": "ok" or the failure}."""
    import resource
    import traceback

    cap, d, dv = 2050, 8, 3
    a, b = rand(10, 2, 2500, d), rand(11, 2, 300, d)
    av, bv = rand(12, 2, 2500, dv), rand(13, 2, 300, dv)
    queries = rand(14, 2, 5, d)
    # cell 0: 2800 rows (wrapped, positions 750..2799 live); cell 1: cleared, then 300 rows
    ring = ops.init(2, cap, d, dv)
    ops.add(*ring, a, av)
    ring[2][1] = 0
    ops.add(*ring, b, bv)
    live = [np.concatenate([a[0], b[0]])[750:], b[1]]
    first = [750, 0]
    mem = knnmem.Memory(2, cap, d, dv)
    mem.add(a, av)
    mem.clear(1)
    mem.add(b, bv)
    state = kj.MemoryState(*(jnp.asarray(x) for x in ring[:2]), jnp.asarray(ring[2], jnp.int32))
    tring = tuple(torch.from_numpy(x) for x in ring)
    tq = torch.from_numpy(queries)

    def torch_op(k, rt, precision, core=True):
        if core:
            return torch.ops.knnmem.search(*tring, tq, k, rt, "ip", precision)[:2]
        with kt.use_reference("cpu"):
            return torch.ops.knnmem.search(*tring, tq, k, rt, "ip", precision)[:2]

    def jax_search(k, rt, impl):
        res = kj.search(state, queries, k, rt, impl=impl)
        return res.scores, res.indices

    paths = {
        "Memory": lambda k, rt: mem.search(queries, k, rt)[:2],
        "ops-float32": lambda k, rt: ops.search(*ring, queries, k=k, recall_target=rt)[:2],
        "ops-bfloat16": lambda k, rt: ops.search(
            *ring, queries, k=k, recall_target=rt, precision="bfloat16"
        )[:2],
        "ops-int8": lambda k, rt: ops.search(
            *ring, queries, k=k, recall_target=rt, precision="int8"
        )[:2],
        "jax-auto": lambda k, rt: jax_search(k, rt, "auto"),
        "jax-ffi": lambda k, rt: jax_search(k, rt, "ffi"),
        "jax-reference": lambda k, rt: jax_search(k, rt, "reference"),
        "jax-pallas": lambda k, rt: jax_search(k, rt, "pallas"),
        "torch-op": lambda k, rt: torch_op(k, rt, "float32"),
        "torch-reference": lambda k, rt: torch_op(k, rt, "float32", core=False),
        "torch-reference-bfloat16": lambda k, rt: torch_op(k, rt, "bfloat16", core=False),
        "torch-reference-int8": lambda k, rt: torch_op(k, rt, "int8", core=False),
    }
    # Nothing here needs more than a few hundred MiB: a [grid, bins] table of ~5e8 bins
    # (8 GiB) must fail at once instead of swapping the machine.
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + 3 * 2**30, resource.RLIM_INFINITY))

    results = {}
    for path, search in paths.items():
        for rt, k in NEAR_ONE:
            key = f"{path}|{rt!r},{k}"
            try:
                scores, indices = (np.asarray(x) for x in search(k, rt))
                if path.endswith(("bfloat16", "int8")):  # rounded keys: == the exact search
                    want_scores, want_indices = (np.asarray(x) for x in search(k, 1.0))
                else:
                    want = [keval.exact_search(live[g], queries[g], k) for g in range(2)]
                    want_scores = np.stack([s for s, _ in want])
                    want_indices = np.stack(
                        [np.where(i >= 0, i + first[g], -1) for g, (_, i) in enumerate(want)]
                    )
                np.testing.assert_array_equal(indices, want_indices)
                finite = np.isfinite(want_scores)
                np.testing.assert_array_equal(np.isfinite(scores), finite)
                np.testing.assert_allclose(
                    scores[finite], want_scores[finite], rtol=1e-5, atol=1e-5
                )
                results[key] = "ok"
            except Exception as e:  # noqa: BLE001 - reported to the parent
                results[key] = f"{type(e).__name__}: {e}"[:500]
                traceback.print_exc()
    print(json.dumps(results))


# -- 3. torch tensors without plain data ------------------------------------------------------
def hostile_tensors(x: torch.Tensor) -> dict:
    """name -> (a hostile version of x, expected exception, message after the name)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the nested-tensor prototype warning
        rows = list(x.reshape(-1, *x.shape[-2:]))
        out = {
            "meta": (torch.empty(x.shape, device="meta"), ValueError, None),
            "sparse_coo": (x.to_sparse(), TypeError, DENSE + "layout torch.sparse_coo"),
            "sparse_csr": (
                x.reshape(-1, x.shape[-1]).to_sparse_csr(),
                TypeError,
                DENSE + "layout torch.sparse_csr",
            ),
            "nested": (torch.nested.nested_tensor(rows), TypeError, DENSE + "a nested tensor"),
            "nested_jagged": (
                torch.nested.nested_tensor(rows, layout=torch.jagged),
                TypeError,
                DENSE + "a nested tensor",
            ),
            "mkldnn": (x.to_mkldnn(), TypeError, DENSE + "layout torch._mkldnn"),
        }
    return out


def torch_calls() -> dict:
    """name -> (argument, call(mem, ring, x)) with x in place of that argument."""
    k, v = torch.from_numpy(KEYS[:, :3]), torch.from_numpy(VALUES[:, :3])
    return {
        "Memory.add-keys": ("keys", lambda m, r, x: m.add(x, v)),
        "Memory.add-values": ("values", lambda m, r, x: m.add(k, x)),
        "Memory.search-queries": ("queries", lambda m, r, x: m.search(x, k=3)),
        "ops.search-queries": ("queries", lambda m, r, x: ops.search(*r, x, k=3)),
        "ops.add-new_keys": ("new_keys", lambda m, r, x: ops.add(*r, x, v)),
        "jax.search-queries": (
            "queries",
            lambda m, r, x: kj.search(kj.init(SHAPE, CAP, KD), x, k=3),
        ),
        "op.add-new_keys": ("new_keys", lambda m, r, x: torch.ops.knnmem.add(*r, x, v)),
        "op.add-new_values": ("new_values", lambda m, r, x: torch.ops.knnmem.add(*r, k, x)),
        "KNNMemory.search-queries": ("queries", lambda m, r, x: m.search(x, k=3)),
        "KNNMemory.add-keys": ("new_keys", lambda m, r, x: m.add(x, v)),
        "op.search-queries": ("queries", lambda m, r, x: torch.ops.knnmem.search(*r, x, 3)),
        "op.search-queries-via-CustomOpDef": ("queries", lambda m, r, x: kt.search(*r, x, 3)),
    }


TORCH_KINDS = ("meta", "sparse_coo", "sparse_csr", "nested", "nested_jagged", "mkldnn")
TORCH_CASES = [
    pytest.param(call, kind, id=f"{call}-{kind}") for call in torch_calls() for kind in TORCH_KINDS
]


def _memory_pair():
    mem = knnmem.Memory(SHAPE, CAP, KD)
    mem.add(KEYS, VALUES)
    tmem = kt.KNNMemory(SHAPE, CAP, KD)
    tmem.add(torch.from_numpy(KEYS), torch.from_numpy(VALUES))
    return mem, tmem


def _snapshot(mem, tmem, ring) -> list:
    res = mem.search(QUERIES, k=CAP, recall_target=1.0)
    return [*(np.array(a) for a in res), *(t.clone() for t in tmem.buffers()), *map(np.copy, ring)]


def _same(a: list, b: list) -> bool:
    return all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else np.array_equal(x, y)
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize(("call", "kind"), TORCH_CASES)
def test_torch_tensors_without_plain_data(call, kind):
    arg, fn = torch_calls()[call]
    mem, tmem = _memory_pair()
    np_ring = ops.init(SHAPE, CAP, KD)
    ops.add(*np_ring, KEYS, VALUES)
    is_op = call.startswith(("op.", "KNNMemory"))  # tensors checked against the ring's device
    shape = (*SHAPE, 3, KD)
    x, exc, message = hostile_tensors(torch.from_numpy(rand(4, *shape)))[kind]
    if message is None:  # meta: no data to read, or not on the memory's device
        message = "expected a tensor on cpu" if is_op else "expected a tensor holding data"
    before = _snapshot(mem, tmem, np_ring)
    target = tmem if call.startswith("KNNMemory") else mem
    ring = (tmem.keys, tmem.values, tmem.written) if call.startswith("op.") else np_ring
    with pytest.raises(exc, match=rf"^{arg}: {message}"):
        fn(target, ring, x)
    assert _same(before, _snapshot(mem, tmem, np_ring))


RING_KINDS = ("sparse_coo", "nested", "nested_jagged", "mkldnn")


@pytest.mark.parametrize("kind", RING_KINDS)
@pytest.mark.parametrize("arg", ["keys", "values"])
@pytest.mark.parametrize("op", ["search", "add"])
def test_torch_op_ring_tensors_without_plain_data(op, arg, kind):
    tmem = kt.KNNMemory(SHAPE, CAP, KD)
    tmem.add(torch.from_numpy(KEYS), torch.from_numpy(VALUES))
    ring = dict(keys=tmem.keys, values=tmem.values, written=tmem.written)
    before = [t.clone() for t in ring.values()]
    bad, exc, message = hostile_tensors(ring[arg].clone())[kind]
    ring[arg] = bad
    new = torch.ones(*SHAPE, 1, KD)
    with pytest.raises(exc, match=rf"^{arg}: {message}"):
        if op == "search":
            torch.ops.knnmem.search(*ring.values(), new, 3)
        else:
            torch.ops.knnmem.add(*ring.values(), new, new)
    assert all(torch.equal(x, y) for x, y in zip(before, (tmem.keys, tmem.values, tmem.written)))


@pytest.mark.parametrize("kind", ["sparse", "nested", "meta"])
@pytest.mark.parametrize("arg", ["written", "mask"])
def test_torch_op_clear_tensors_without_plain_data(arg, kind):
    written = torch.tensor([3, 5])
    tensors = {"written": written, "mask": torch.tensor([True, False])}
    x = tensors[arg]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = {
            "sparse": x.to_sparse(),
            "nested": torch.nested.nested_tensor([x[:1], x]),
            "meta": x.to("meta"),
        }[kind]
    tensors[arg] = bad
    exc, message = (ValueError, "expected a tensor on") if kind == "meta" else (TypeError, DENSE)
    name = "mask" if kind == "meta" else arg  # a meta written: the mask is on another device
    with pytest.raises(exc, match=rf"^{name}: {message}"):
        torch.ops.knnmem.clear(tensors["written"], tensors["mask"])
    assert written.tolist() == [3, 5]


WHICH_CASES = [
    case("meta-bool", torch.ones(2, dtype=torch.bool, device="meta"), ValueError, r"^which: "),
    case("sparse-bool", torch.tensor([True, False]).to_sparse(), TypeError, rf"^which: {DENSE}"),
    case(
        "float-requires-grad",
        torch.zeros(2, requires_grad=True),
        TypeError,
        r"^which: expected None, a bool mask or integer indices, got dtype float32$",
    ),
    case("meta-int", torch.zeros(2, dtype=torch.int64, device="meta"), ValueError, r"^which: "),
]


@pytest.mark.parametrize(("which", "exc", "match"), WHICH_CASES)
def test_knn_memory_clear_tensors_without_plain_data(which, exc, match):
    mem, tmem = _memory_pair()
    before = [t.clone() for t in tmem.buffers()]
    with pytest.raises(exc, match=match):
        tmem.clear(which)
    with pytest.raises(exc, match=match):
        mem.clear(which)
    assert all(torch.equal(x, y) for x, y in zip(before, tmem.buffers()))
    assert mem.count.tolist() == [10, 10]


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        (torch.float8_e4m3fn, "float8_e4m3fn"),
        (torch.complex64, "complex64"),
        (torch.int64, "int64"),
    ],
)
def test_memory_rejects_torch_dtypes_numpy_lacks(dtype, name):
    mem, _ = _memory_pair()
    x = torch.from_numpy(QUERIES).to(dtype)
    if dtype == torch.complex64:
        x = x.conj()  # a conjugate view: numpy cannot take it as is
    with pytest.raises(TypeError, match=rf"^queries: {NOT_FLOAT} {name}$"):
        mem.search(x, k=3)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_memory_rejects_quantized_torch_tensors():
    mem, _ = _memory_pair()
    qint = torch.quantize_per_tensor(torch.from_numpy(KEYS), 0.1, 0, torch.qint8)
    with pytest.raises(TypeError, match=rf"^keys: {NOT_FLOAT} qint8$"):
        mem.add(qint, VALUES)
    assert mem.count.tolist() == [10, 10]


def test_torch_views_and_grad_are_read_as_their_values():
    """requires_grad, negative and conjugate views, CUDA-less .cpu(): same results."""
    mem, tmem = _memory_pair()
    q = torch.from_numpy(QUERIES)
    want = mem.search(QUERIES, k=4)
    for x in (q.clone().requires_grad_(), torch._neg_view(-q), (-q).neg().conj()):
        got = mem.search(x, k=4)
        np.testing.assert_array_equal(got.indices.numpy(), want.indices)
        got = ops.search(*ops.init(SHAPE, CAP, KD), x, k=4)
        assert got.indices.shape == (*SHAPE, 3, 4)
    written = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match=r"^written: expected an integer array, got dtype float64"):
        ops.search(*ops.init(SHAPE, CAP, KD)[:2], written, QUERIES, k=3)


@pytest.mark.parametrize("arg", ["keys", "values"])
def test_torch_op_add_refuses_ring_tensors_that_require_grad(arg):
    tmem = kt.KNNMemory(SHAPE, CAP, KD)
    ring = dict(keys=tmem.keys.clone(), values=tmem.values.clone(), written=tmem.written.clone())
    ring[arg].requires_grad_()
    new = torch.ones(*SHAPE, 2, KD)
    with pytest.raises(ValueError, match=rf"^{arg}: expected a tensor that does not require grad"):
        torch.ops.knnmem.add(*ring.values(), new, new)
    assert ring["written"].tolist() == [0, 0]
    # searching such a ring, and new rows or queries that require grad, are fine
    torch.ops.knnmem.search(*ring.values(), new.requires_grad_(), 2)
    tmem.add(new, new)
    assert tmem.written.tolist() == [2, 2]


def test_meta_and_fake_tensors_still_run_the_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mem = kt.KNNMemory(SHAPE, CAP, KD, device="meta")
    q = torch.empty(*SHAPE, 3, KD, device="meta")
    mem.add(q, q)
    res = mem.search(q, k=4)
    assert res.scores.device.type == "meta" and res.indices.shape == (*SHAPE, 3, 4)
    with FakeTensorMode():
        ring = (
            torch.zeros(*SHAPE, CAP, KD),
            torch.zeros(*SHAPE, CAP, KD),
            torch.zeros(SHAPE).long(),
        )
        out = torch.ops.knnmem.search(*ring, torch.zeros(*SHAPE, 3, KD), 4)
        assert out[3].shape == (*SHAPE, 3, 4, KD) and out[3].device.type == "cpu"


@pytest.mark.parametrize(
    ("kind", "exc", "match"),
    [
        ("nested", TypeError, rf"^x: {DENSE}a nested tensor"),
        ("sparse", TypeError, rf"^x: {DENSE}layout torch.sparse_coo"),
        ("meta", ValueError, r"^x: expected a tensor on cpu \(as the module\), got meta"),
        ("rank", ValueError, r"^x: expected shape \(B, T, dim=8\), got \(4, 8\)"),
    ],
)
def test_memorizing_attention_forward_rejects_x(kind, exc, match):
    layer = kt.MemorizingAttention(8, 2, 2, capacity=CAP, k=3)
    x = torch.randn(2, 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = {
            "nested": torch.nested.nested_tensor([x[0], x[1, :2]]),
            "sparse": x.to_sparse(),
            "meta": x.to("meta"),
            "rank": x[0],
        }[kind]
    with pytest.raises(exc, match=match):
        layer(bad)
    assert layer.memory.written.sum() == 0


# -- 4. knnmem.jax arguments -------------------------------------------------------------------
def _state():
    return kj.add(kj.init(SHAPE, CAP, KD), KEYS, VALUES)


JAX_QUERY_CASES = [
    case("None", None, TypeError, r"^queries: expected a floating-point array, got dtype object"),
    case("str", "abc", TypeError, r"^queries: expected a floating-point array, got dtype <U3"),
    case("object", object(), TypeError, r"^queries: expected a floating-point array, got dtype"),
    case("dict", {}, TypeError, r"^queries: expected a floating-point array, got dtype object"),
    case("ragged", [[1.0], [1.0, 2.0]], ValueError, r"^queries: expected an array, got list"),
    case(
        "object-array",
        np.array([[1.0]], dtype=object),
        TypeError,
        r"^queries: expected a floating-point array, got dtype object",
    ),
    case("scalar", 1.0, ValueError, r"^queries: expected shape \(2, Q, key_dim=4\), got \(\)"),
    case(
        "torch-meta",
        torch.empty(2, 3, KD, device="meta"),
        ValueError,
        r"^queries: expected a tensor holding data",
    ),
    case(
        "torch-sparse",
        torch.ones(2, 3, KD).to_sparse(),
        TypeError,
        rf"^queries: {DENSE}layout torch.sparse_coo",
    ),
]


@pytest.mark.parametrize(("queries", "exc", "match"), JAX_QUERY_CASES)
def test_jax_search_rejects_queries(queries, exc, match):
    with pytest.raises(exc, match=match):
        kj.search(_state(), queries, k=3)


@pytest.mark.parametrize("impl", ["auto", "ffi", "reference", "pallas"])
def test_jax_search_of_no_queries(impl):
    res = kj.search(_state(), jnp.ones((*SHAPE, 0, KD)), k=3, impl=impl)
    assert res.indices.shape == (*SHAPE, 0, 3) and res.keys.shape == (*SHAPE, 0, 3, KD)
    # and the queries of a torch tensor that requires grad are read as values
    q = torch.from_numpy(QUERIES).requires_grad_()
    want = kj.search(_state(), QUERIES, k=3, impl=impl).indices
    np.testing.assert_array_equal(kj.search(_state(), q, k=3, impl=impl).indices, want)


def _bad_state(change: str):
    s = _state()
    return {
        "keys-list": lambda: s.replace(keys=np.asarray(s.keys).tolist()),
        "values-None": lambda: s.replace(values=None),
        "written-None": lambda: s.replace(written=None),
        "written-int8": lambda: s.replace(written=s.written.astype(jnp.int8)),
        "written-int16": lambda: s.replace(written=s.written.astype(jnp.int16)),
        "written-uint32": lambda: s.replace(written=s.written.astype(jnp.uint32)),
        "value_dim-0": lambda: s.replace(values=s.values[..., :0]),
    }[change]()


JAX_STATE_CASES = [
    case("keys-list", "keys-list", TypeError, r"^state.keys: expected an array, got list"),
    case(
        "values-None", "values-None", TypeError, r"^state.values: expected an array, got NoneType"
    ),
    case(
        "written-None",
        "written-None",
        TypeError,
        r"^state.written: expected an array, got NoneType",
    ),
    case("value_dim-0", "value_dim-0", ValueError, r"^state.values: expected dim >= 1"),
    *(
        case(w, w, TypeError, r"^state.written: expected dtype int32 or int64, got " + w[8:])
        for w in ("written-int8", "written-int16", "written-uint32")
    ),
]


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize(("change", "exc", "match"), JAX_STATE_CASES)
def test_jax_search_rejects_state_fields(change, exc, match, impl):
    with pytest.raises(exc, match=match):
        kj.search(_bad_state(change), QUERIES, k=3, impl=impl)


CAPACITY_AXIS = r"^capacity_axis: expected the name of a mesh axis of the enclosing shard_map"


@pytest.mark.parametrize("axis", ["x", 0, ("x",), ["x"]], ids=["str", "int", "tuple", "list"])
def test_jax_capacity_axis_outside_shard_map(axis):
    s = _state()
    with pytest.raises(ValueError, match=CAPACITY_AXIS):
        kj.search(s, QUERIES, k=3, capacity_axis=axis)
    with pytest.raises(ValueError, match=CAPACITY_AXIS):
        kj.add(s, KEYS, VALUES, capacity_axis=axis)


def test_jax_sharded_and_init_arguments():
    s, mesh = _state(), jax.make_mesh((1,), ("x",))
    for kwargs, exc, match in [
        (dict(state=None), TypeError, r"^state: expected a knnmem.jax.MemoryState, got NoneType"),
        (dict(recall_target=10**400), ValueError, RECALL),
        (dict(k=10**30), ValueError, K_RANGE),
        (dict(batch_axis="y"), ValueError, r"^batch_axis: expected an axis of the mesh \('x',\)"),
        (dict(capacity_axis="y"), ValueError, r"^capacity_axis: expected an axis of the mesh"),
        (dict(mesh=None), TypeError, r"^mesh: expected a jax.sharding.Mesh, got NoneType"),
    ]:
        args = {"mesh": mesh, "state": s, "queries": QUERIES, "k": 3, **kwargs}
        with pytest.raises(exc, match=match):
            kj.sharded_search(args.pop("mesh"), args.pop("state"), args.pop("queries"), **args)
    with pytest.raises(TypeError, match=r"^state: expected a knnmem.jax.MemoryState"):
        kj.sharded_add(mesh, None, KEYS, VALUES)
    with pytest.raises(ValueError, match=r"^batch_axis: expected an axis of the mesh"):
        kj.sharded_add(mesh, s, KEYS, VALUES, batch_axis=("x", "z"))
    for shards, exc in [(2.0, TypeError), (True, TypeError), (0, ValueError), (10**30, ValueError)]:
        with pytest.raises(exc, match=r"^capacity_shards: expected an integer"):
            kj.init(SHAPE, CAP, KD, capacity_shards=shards)
    with pytest.raises(ValueError, match=r"^mask: expected a tensor holding data"):
        kj.reset(s, torch.ones(2, dtype=torch.bool, device="meta"))


if __name__ == "__main__" and sys.argv[1:] == ["near-one"]:
    _near_one_child()
