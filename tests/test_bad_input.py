"""Bad input: a clear exception naming the argument, and nothing changed.

The rules (README "Guarantees"): wrong rank/shape/dtype, NaN or Inf, k or recall_target
out of range, grid index out of range, sizes that overflow or cannot be
allocated each raise ValueError / TypeError / IndexError / MemoryError whose
message names the argument, and the memory is exactly as before the call.

Every bad call on an existing memory (a knnmem.Memory or a caller-owned ring of
knnmem.ops) runs inside `raises_unchanged`, which compares the counters and an
exact search of everything held before and after the call.

"""

from __future__ import annotations

import contextlib
import resource
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

import knnmem
from knnmem import ops

ml_dtypes = pytest.importorskip("ml_dtypes")

SHAPE = (3, 2)
CAP, KD, VD = 13, 7, 5
BASE = dict(shape=SHAPE, capacity=CAP, key_dim=KD, value_dim=VD)
NAN, INF = float("nan"), float("inf")


def case(case_id: str, *values, marks=()):
    return pytest.param(*values, id=case_id, marks=marks)


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


PROBE = rand(np.random.default_rng(100), *SHAPE, 4, KD)


# -- state snapshots -----------------------------------------------------------------
def snapshot(state) -> dict[str, np.ndarray]:
    """Counters and an exact search of everything a memory (or ops ring) holds."""
    if isinstance(state, knnmem.Memory):
        res = state.search(PROBE, k=CAP, recall_target=1.0)
        return {"count": state.count, "written": state.written, **res._asdict()}
    keys, values, written = state
    res = ops.search(keys, values, written, PROBE, k=CAP, recall_target=1.0)
    return {
        "ring.keys": keys.copy(),
        "ring.values": values.copy(),
        "ring.written": written.copy(),
        **res._asdict(),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@contextlib.contextmanager
def raises_unchanged(state, exc, match: str):
    """pytest.raises(exc, match=match), and `state` is exactly as before the call."""
    before = snapshot(state)
    with pytest.raises(exc, match=match) as info:
        yield info
    assert_same(before, snapshot(state))


@pytest.fixture
def mem() -> knnmem.Memory:
    """A memory with different counts per cell, some wrapped around."""
    rng = np.random.default_rng(0)
    m = knnmem.Memory(**BASE)
    m.add(rand(rng, *SHAPE, 9, KD), rand(rng, *SHAPE, 9, VD))
    m.clear((2, 1))
    m.add(rand(rng, *SHAPE, 6, KD), rand(rng, *SHAPE, 6, VD))
    assert m.count.tolist() == [[13, 13], [13, 13], [13, 6]]
    return m


@pytest.fixture
def ring() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An ops ring (keys, values, written) holding rows, some wrapped around."""
    rng = np.random.default_rng(1)
    keys, values, written = ops.init(SHAPE, CAP, KD, VD)
    ops.add(keys, values, written, rand(rng, *SHAPE, 17, KD), rand(rng, *SHAPE, 17, VD))
    return keys, values, written


def segment(t: int = 4, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rand(rng, *SHAPE, t, KD), rand(rng, *SHAPE, t, VD)


def with_value(x: np.ndarray, index: tuple, value) -> np.ndarray:
    x = x.copy()
    x[index] = value
    return x


# -- Memory(...) -----------------------------------------------------------------------
SHAPE_CASES = [
    case("shape=0", dict(shape=0), ValueError, r"^shape: expected an integer >= 1, got 0$"),
    case("shape=(3,0)", dict(shape=(3, 0)), ValueError, r"^shape: expected an integer >= 1"),
    case("shape=(3,-2)", dict(shape=(3, -2)), ValueError, r"^shape: .*got -2$"),
    case("shape=()", dict(shape=()), ValueError, r"^shape: expected at least one grid dim"),
    case("shape=2.0", dict(shape=2.0), TypeError, r"^shape: expected an int or a tuple"),
    case("shape=None", dict(shape=None), TypeError, r"^shape: expected an int or a tuple"),
    case("shape=(3,2.0)", dict(shape=(3, 2.0)), TypeError, r"^shape: expected an integer, got"),
    case("shape=(3,True)", dict(shape=(3, True)), TypeError, r"^shape: expected an integer"),
    case("shape=True", dict(shape=True), TypeError, r"^shape: expected an integer"),
    case("shape='3'", dict(shape="3"), TypeError, r"^shape: expected an integer, got str"),
]

SIZE_CASES = [
    case(f"{arg}={value!r}", {arg: value}, exc, rf"^{arg}: expected an integer")
    for arg in ("capacity", "key_dim", "value_dim")
    for value, exc in [
        (0, ValueError),
        (-1, ValueError),
        (8.0, TypeError),
        (True, TypeError),
        ("8", TypeError),
        (np.float32(8), TypeError),
    ]
] + [
    case("capacity=2**31", dict(capacity=2**31), ValueError, r"^capacity: .*\[1, 2147483647\]"),
    case("key_dim=None", dict(key_dim=None), TypeError, r"^key_dim: expected an integer"),
]

DTYPE_MESSAGE = r"^dtype: expected one of \('float32', 'bfloat16', 'float16', 'int8'\)"
STORAGE_CASES = (
    [
        case(f"dtype={d!r}", dict(dtype=d), ValueError, DTYPE_MESSAGE)
        for d in ("float64", "int16", "half", "bogus", np.float64, None)
    ]
    + [
        case("dtype=123", dict(dtype=123), (TypeError, ValueError), r"^dtype:"),
    ]
    + [
        case(f"metric={m!r}", dict(metric=m), ValueError, r"^metric: expected one of \('ip', 'cos")
        for m in ("dot", "IP", "", None, "l1")
    ]
)


@pytest.mark.parametrize(("kwargs", "exc", "match"), SHAPE_CASES + SIZE_CASES + STORAGE_CASES)
def test_memory_constructor_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        knnmem.Memory(**{**BASE, **kwargs})


OVERFLOW_CASES = [
    case(
        "capacity=2**31-1,key_dim=2**40",
        dict(shape=1, capacity=2**31 - 1, key_dim=2**40, value_dim=1),
        MemoryError,
        r"^keys: 1 x \d+ x 1099511627776 float32 overflows",
    ),
    case(
        "shape=(2**20,2**20)",
        dict(shape=(2**20, 2**20), capacity=65536, key_dim=128),
        MemoryError,
        r"^keys: 1099511627776 x 65536 x 128 float32 overflows",
    ),
    case(
        "value_dim=2**62",
        dict(shape=1, capacity=2**20, key_dim=1, value_dim=2**62),
        MemoryError,
        r"^values: .* overflows",
    ),
    case(  # 2**40 memories x 8 x 16 floats: 512 TiB, no int64 overflow but never allocatable
        "shape=(2**20,2**20),small-rows",
        dict(shape=(2**20, 2**20), capacity=8, key_dim=4, value_dim=4),
        (MemoryError, ValueError),
        r"^(shape|keys|capacity|key_dim): ",
    ),
    case(
        "key_dim=2**63-1",
        dict(shape=1, capacity=8, key_dim=2**63 - 1),
        MemoryError,
        r"^keys: 1 x \d+ x 9223372036854775807 float32 overflows",
    ),
    case(
        "shape=(2**40,2**40)",
        dict(shape=(2**40, 2**40)),
        (MemoryError, ValueError),
        r"^shape: ",
    ),
    case(
        "key_dim=2**64",
        dict(key_dim=2**64),
        (MemoryError, ValueError),
        r"^key_dim: ",
    ),
    case(
        "value_dim=2**64",
        dict(value_dim=2**64),
        (MemoryError, ValueError),
        r"^value_dim: ",
    ),
]


@contextlib.contextmanager
def fast_and_small():
    """The block runs in well under a second and does not grow the peak RSS."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    yield
    assert time.perf_counter() - t0 < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 100 * 1024


@pytest.mark.parametrize(("kwargs", "exc", "match"), OVERFLOW_CASES)
def test_memory_constructor_rejects_sizes_that_overflow_before_allocating(kwargs, exc, match):
    with fast_and_small(), pytest.raises(exc, match=match):
        knnmem.Memory(**{**BASE, **kwargs})


# -- Memory.add ----------------------------------------------------------------------
# Cases are (argument, transform of a good array, exception, message regex).
KEYS = r"^keys: expected shape \(3, 2, T, key_dim=7\), got "
VALUES = r"^values: expected shape \(3, 2, T=4, value_dim=5\), got "
NOT_FLOAT = r"expected a floating-point array \(float16, bfloat16, float32, float64\), got dtype"
DTYPES = ("int32", "int64", "uint8", "bool", "object", "complex64")

ADD_CASES = [
    case("keys-rank-3", "keys", lambda x: x[0], ValueError, KEYS + r"\(2, 4, 7\)$"),
    case("keys-rank-5", "keys", lambda x: x[None], ValueError, KEYS + r"\(1, 3, 2, 4, 7\)$"),
    case("keys-grid", "keys", lambda x: x.reshape(2, 3, 4, KD), ValueError, KEYS + r"\(2, 3, "),
    case("keys-key_dim", "keys", lambda x: x[..., :6], ValueError, KEYS + r"\(3, 2, 4, 6\)$"),
    case("keys-scalar", "keys", lambda x: x[0, 0, 0, 0], ValueError, KEYS + r"\(\)$"),
    case("values-rank", "values", lambda x: x[0], ValueError, VALUES + r"\(2, 4, 5\)$"),
    case("values-grid", "values", lambda x: x.reshape(6, 4, VD), ValueError, VALUES + r"\(6, "),
    case(
        "values-value_dim", "values", lambda x: x[..., :4], ValueError, VALUES + r"\(3, 2, 4, 4\)"
    ),
    case("values-T", "values", lambda x: x[..., :3, :], ValueError, VALUES + r"\(3, 2, 3, 5\)$"),
    case("keys-None", "keys", lambda x: None, TypeError, rf"^keys: {NOT_FLOAT} object$"),
    case(
        "keys-str", "keys", lambda x: np.full(x.shape, "a"), TypeError, rf"^keys: {NOT_FLOAT} str"
    ),
    case("keys-int-list", "keys", lambda x: x.astype(int).tolist(), TypeError, r"^keys: .* int64$"),
    case(
        "values-fp8", "values", lambda x: x.astype(ml_dtypes.float8_e4m3fn), TypeError, r"^values"
    ),
    case("keys-ragged", "keys", lambda x: [[1.0], [1.0, 2.0]], ValueError, r"^keys"),
] + [
    case(
        f"{arg}-{dt}", arg, lambda x, dt=dt: x.astype(dt), TypeError, rf"^{arg}: {NOT_FLOAT} {dt}$"
    )
    for arg in ("keys", "values")
    for dt in DTYPES
]


@pytest.mark.parametrize(("arg", "transform", "exc", "match"), ADD_CASES)
def test_add_rejects(mem, arg, transform, exc, match):
    args = dict(zip(("keys", "values"), segment()))
    args[arg] = transform(args[arg])
    with raises_unchanged(mem, exc, match):
        mem.add(**args)


NONFINITE = [NAN, INF, -INF]
NONFINITE_IDS = ["nan", "inf", "-inf"]
FINITE = r"expected finite values, got"


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "bfloat16"])
@pytest.mark.parametrize(("bad", "tag"), list(zip(NONFINITE, NONFINITE_IDS)), ids=NONFINITE_IDS)
@pytest.mark.parametrize(("arg", "index"), [("keys", (2, 1, 3, 6)), ("values", (0, 1, 0, 4))])
def test_add_rejects_nonfinite(mem, arg, index, bad, tag, dtype):
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    args = {name: x.astype(dt) for name, x in zip(("keys", "values"), segment())}
    args[arg][index] = bad
    with raises_unchanged(mem, ValueError, rf"^{arg}: {FINITE} {tag} at index \["):
        mem.add(**args)


def test_add_rejects_float64_beyond_float32_range_naming_the_value(mem):
    keys, values = segment()
    keys = with_value(keys.astype(np.float64), (0, 0, 1, 2), 1e300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "overflow encountered in cast" on the way
        with raises_unchanged(mem, ValueError, r"^keys: .*1e\+300"):
            mem.add(keys, values)


def test_add_bad_values_after_good_keys_changes_nothing(mem):
    """keys are valid, values are not: nothing of the keys is written either."""
    keys, values = segment()
    with raises_unchanged(mem, ValueError, rf"^values: {FINITE} nan"):
        mem.add(keys, with_value(values, (2, 1, 3, 4), NAN))


# -- NaN/Inf index in the caller's coordinates (Memory and ops) ---------------------------
def call_with_nan(where: str, shape: tuple[int, ...], index: tuple) -> None:
    rng = np.random.default_rng(3)
    keys, values = rand(rng, *shape, 5, KD), rand(rng, *shape, 5, VD)
    m = knnmem.Memory(shape, capacity=CAP, key_dim=KD, value_dim=VD)
    ring = ops.init(shape, CAP, KD, VD)
    if where == "keys":
        m.add(with_value(keys, index, NAN), values)
    elif where == "values":
        m.add(keys, with_value(values, index, NAN))
    elif where == "queries":
        m.search(with_value(keys, index, NAN), k=3)
    elif where == "ops-new_keys":
        ops.add(*ring, with_value(keys, index, NAN), values)
    elif where == "ops-new_values":
        ops.add(*ring, keys, with_value(values, index, NAN))
    else:
        ops.search(*ring, with_value(keys, index, NAN), k=3)


@pytest.mark.parametrize(
    ("shape", "index"),
    [((6,), (4, 2, 3)), ((3, 2), (2, 0, 2, 3))],
    ids=["grid-1d", "grid-2d"],
)
@pytest.mark.parametrize(
    "where", ["keys", "values", "queries", "ops-new_keys", "ops-new_values", "ops-queries"]
)
def test_nonfinite_message_gives_the_index_in_caller_coordinates(where, shape, index):
    name = where.split("-")[-1]
    spelled = ", ".join(map(str, index))
    with pytest.raises(ValueError, match=rf"^{name}: {FINITE} nan at index \[{spelled}\]$"):
        call_with_nan(where, shape, index)


# -- Memory.search ---------------------------------------------------------------------
QUERIES = r"^queries: expected shape \(3, 2, Q, key_dim=7\), got "

QUERY_CASES = (
    [
        case("rank-3", lambda q: q[0], ValueError, QUERIES + r"\(2, 4, 7\)$"),
        case("rank-2", lambda q: q[0, 0], ValueError, QUERIES + r"\(4, 7\)$"),
        case("grid", lambda q: q.reshape(2, 3, 4, KD), ValueError, QUERIES + r"\(2, 3, 4, 7\)$"),
        case("grid-prefix", lambda q: q[:2], ValueError, QUERIES + r"\(2, 2, 4, 7\)$"),
        case("key_dim", lambda q: q[..., :5], ValueError, QUERIES + r"\(3, 2, 4, 5\)$"),
        case("key_dim-wider", lambda q: np.concatenate([q, q], -1), ValueError, QUERIES),
    ]
    + [
        case(dt, lambda q, dt=dt: q.astype(dt), TypeError, rf"^queries: {NOT_FLOAT} {dt}$")
        for dt in DTYPES
    ]
    + [
        case(
            f"{tag}-{dt}",
            lambda q, b=b, dt=dt: with_value(q, (1, 0, 3, 2), b).astype(dt),
            ValueError,
            rf"^queries: {FINITE} {tag} at index \[",
        )
        for b, tag in zip(NONFINITE, NONFINITE_IDS)
        for dt in ("float32", "float64", "float16")
    ]
)

K_RANGE = r"^k: expected an integer in \[1, capacity=13\], got "
K_CASES = [case(f"k={k!r}", k, ValueError, rf"{K_RANGE}{k}$") for k in (0, -1, CAP + 1, 2**70)]
K_CASES += [
    case(f"k={k!r}", k, TypeError, r"^k: expected an integer, got ")
    for k in (1.0, 2.5, True, False, "3", None, np.float64(3), np.bool_(True), [3])
]

RECALL = r"^recall_target: expected a number in \(0, 1\], got "
RECALL_CASES = [
    case(f"rt={r!r}", r, ValueError, RECALL)
    for r in (0, 0.0, -0.5, -1, 1.0000001, 2, NAN, INF, -INF, np.float32(0))
]
RECALL_CASES += [
    case(f"rt={r!r}", r, TypeError, RECALL) for r in ("0.9", None, True, False, [0.9], 0.5j)
]
RECALL_CASES += [
    case(
        "rt=np.complex128",
        np.complex128(0.5 + 1j),
        TypeError,
        RECALL,
        marks=[pytest.mark.filterwarnings("ignore:Casting complex values")],
    )
]


@pytest.mark.parametrize(("transform", "exc", "match"), QUERY_CASES)
def test_search_rejects_queries(mem, transform, exc, match):
    with raises_unchanged(mem, exc, match):
        mem.search(transform(PROBE), k=3)


@pytest.mark.parametrize(("k", "exc", "match"), K_CASES)
def test_search_rejects_k(mem, k, exc, match):
    with raises_unchanged(mem, exc, match):
        mem.search(PROBE, k=k)


@pytest.mark.parametrize(("recall_target", "exc", "match"), RECALL_CASES)
def test_search_rejects_recall_target(mem, recall_target, exc, match):
    with raises_unchanged(mem, exc, match):
        mem.search(PROBE, k=3, recall_target=recall_target)


# -- Memory.clear ----------------------------------------------------------------------
OUT_OF_RANGE = r"^which: index (-?\d+) is out of bounds for axis \d with size \d"
MASK = r"^which: expected a bool mask of shape \(3, 2\), got shape "
NOT_INDEX = r"^which: expected None, a bool mask or integer indices, got dtype "

CLEAR_CASES = [
    case("3", 3, IndexError, OUT_OF_RANGE),
    case("-4", -4, IndexError, OUT_OF_RANGE),
    case("(0,2)", (0, 2), IndexError, OUT_OF_RANGE),
    case("(3,0)", (3, 0), IndexError, OUT_OF_RANGE),
    case("[0,3]", [0, 3], IndexError, OUT_OF_RANGE),
    case("index-arrays", (np.array([0, 1]), np.array([1, 2])), IndexError, OUT_OF_RANGE),
    case("(0,1,0)", (0, 1, 0), IndexError, r"^which: too many indices"),
    case("2**70", 2**70, IndexError, r"^which: "),
    case("mask-transposed", np.ones((2, 3), bool), ValueError, MASK + r"\(2, 3\)$"),
    case("mask-flat", np.ones(6, bool), ValueError, MASK + r"\(6,\)$"),
    case("mask-extra-dim", np.ones((3, 2, 1), bool), ValueError, MASK + r"\(3, 2, 1\)$"),
    case("mask-list", [True, False], ValueError, MASK + r"\(2,\)$"),
    case("mask-scalar", True, ValueError, MASK + r"\(\)$"),
    case("1.5", 1.5, TypeError, NOT_INDEX + "float64$"),
    case("1.0", 1.0, TypeError, NOT_INDEX + "float64$"),
    case("[0.0]", [0.0], TypeError, NOT_INDEX + "float64$"),
    case("float-array", np.array([1.0, 2.0], np.float32), TypeError, NOT_INDEX + "float32$"),
    case("str", "a", TypeError, NOT_INDEX),
    case("object", object(), TypeError, NOT_INDEX + "object$"),
    case("(0,1.5)", (0, 1.5), TypeError, r"^which: "),
    case("ragged", [[0, 1], [0]], (TypeError, ValueError), r"^which: "),
]


@pytest.mark.parametrize(("which", "exc", "match"), CLEAR_CASES)
def test_clear_rejects(mem, which, exc, match):
    with raises_unchanged(mem, exc, match):
        mem.clear(which)


@pytest.mark.parametrize(
    ("which", "cleared"), [([], []), (slice(None), [0, 1, 2])], ids=["empty-list", "slice"]
)
def test_clear_accepts_numpy_index_forms(mem, which, cleared):
    expected = mem.count
    expected[cleared] = 0
    mem.clear(which)
    np.testing.assert_array_equal(mem.count, expected)


# -- ops.init --------------------------------------------------------------------------
INIT_SIZE_CASES = [
    case(f"{arg}={v!r}", {arg: v}, exc, rf"^{arg}: expected an integer")
    for arg in ("capacity", "key_dim", "value_dim")
    for v, exc in [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)]
] + [
    case(
        "capacity=2**31",
        dict(capacity=2**31),
        ValueError,
        r"^capacity: .*2147483647",
    ),
    case(
        "shape=(2**20,2**20)",
        dict(shape=(2**20, 2**20)),
        (MemoryError, ValueError),
        r"^(shape|keys|capacity): ",
    ),
    case(
        "capacity=2**31-1,key_dim=2**40",
        dict(shape=1, capacity=2**31 - 1, key_dim=2**40),
        (MemoryError, ValueError),
        r"^(keys|key_dim|capacity): ",
    ),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), SHAPE_CASES + INIT_SIZE_CASES)
def test_ops_init_rejects(kwargs, exc, match):
    args = {**BASE, **kwargs}
    with fast_and_small(), pytest.raises(exc, match=match):
        ops.init(args["shape"], args["capacity"], args["key_dim"], args["value_dim"])


# -- ops.add ---------------------------------------------------------------------------
def readonly(x: np.ndarray) -> np.ndarray:
    view = x.view()
    view.flags.writeable = False
    return view


def strided(x: np.ndarray) -> np.ndarray:
    """A non-contiguous view holding the same values as x (not sharing its memory)."""
    wide = np.zeros((*x.shape, 2), x.dtype)
    wide[..., 0] = x
    return wide[..., 0]


NEW_KEYS = r"^new_keys: expected shape \(3, 2, T, key_dim=7\), got "
NEW_VALUES = r"^new_values: expected shape \(3, 2, T=4, value_dim=5\), got "
RING_KEYS = r"^keys: expected shape \(\*written.shape="
RING_VALUES = r"^values: expected shape \(3, 2, capacity=13, value_dim(=5)?\), got "
NOT_NUMPY = r"expected a numpy array \(updated in place\)"
RING = ("keys", "values", "written")
C_ORDER = "expected a C-contiguous array"

OPS_ADD_CASES = (
    [
        # the ring: keys, values, written
        *(
            case(f"{arg}-list", arg, np.ndarray.tolist, TypeError, f"^{arg}: {NOT_NUMPY}")
            for arg in RING
        ),
        case(
            "keys-f64", "keys", lambda x: x.astype(np.float64), TypeError, r"^keys: .*got float64$"
        ),
        case(
            "values-f16",
            "values",
            lambda x: x.astype(np.float16),
            TypeError,
            r"^values: .*float16$",
        ),
        case(
            "written-i32", "written", lambda x: x.astype(np.int32), TypeError, r"^written: .*int32$"
        ),
        case(
            "written-f64", "written", lambda x: x.astype(float), TypeError, r"^written: .*float64$"
        ),
        *(
            case(
                f"{arg}-readonly",
                arg,
                readonly,
                ValueError,
                rf"^{arg}: expected a writeable array$",
            )
            for arg in ("keys", "values", "written")
        ),
        case(
            "written<0",
            "written",
            lambda x: x - 18,
            ValueError,
            r"^written: .* got -1 at index \[0, 0\]$",
        ),
        case("written-shape", "written", lambda x: x[:2], ValueError, RING_KEYS + r"\(2, 2\)"),
        case("keys-rank", "keys", lambda x: x[0], ValueError, RING_KEYS + r"\(3, 2\)"),
        case("values-capacity", "values", lambda x: x[:, :, :5], ValueError, RING_VALUES),
        case("keys-strided", "keys", strided, ValueError, rf"^keys: {C_ORDER}"),
        case(
            "keys-fortran",
            "keys",
            np.asfortranarray,
            ValueError,
            rf"^keys: {C_ORDER}",
        ),
        case(
            "written-F",
            "written",
            np.asfortranarray,
            ValueError,
            rf"^written: {C_ORDER}",
        ),
        # the new rows: new_keys, new_values
        case("new_keys-rank", "new_keys", lambda x: x[0], ValueError, NEW_KEYS + r"\(2, 4, 7\)$"),
        case("new_keys-grid", "new_keys", lambda x: x.reshape(6, 1, 4, KD), ValueError, NEW_KEYS),
        case(
            "new_keys-key_dim",
            "new_keys",
            lambda x: x[..., 1:],
            ValueError,
            NEW_KEYS + r"\(3, 2, 4, 6",
        ),
        case(
            "new_values-v_dim",
            "new_values",
            lambda x: x[..., 1:],
            ValueError,
            NEW_VALUES + r"\(3, 2, 4, 4",
        ),
        case(
            "new_values-T",
            "new_values",
            lambda x: x[:, :, 1:],
            ValueError,
            NEW_VALUES + r"\(3, 2, 3, 5",
        ),
    ]
    + [
        case(
            f"{arg}-{dt}",
            arg,
            lambda x, dt=dt: x.astype(dt),
            TypeError,
            rf"^{arg}: {NOT_FLOAT} {dt}$",
        )
        for arg in ("new_keys", "new_values")
        for dt in ("int64", "bool", "object")
    ]
    + [
        case(
            f"{arg}-{tag}",
            arg,
            lambda x, b=b: with_value(x, (1, 1, 2, 0), b),
            ValueError,
            rf"^{arg}: {FINITE} {tag} at index \[",
        )
        for arg in ("new_keys", "new_values")
        for b, tag in zip(NONFINITE, NONFINITE_IDS)
    ]
)


@pytest.mark.parametrize(("arg", "transform", "exc", "match"), OPS_ADD_CASES)
def test_ops_add_rejects(ring, arg, transform, exc, match):
    """`ring` keeps the caller's arrays; a bad one is a transformed copy or view of them."""
    args = dict(zip(("keys", "values", "written", "new_keys", "new_values"), (*ring, *segment())))
    args[arg] = transform(args[arg])
    with raises_unchanged(ring, exc, match):
        ops.add(**args)


def test_ops_add_rejects_written_that_would_overflow():
    """Run in a child process: this can segfault."""
    code = textwrap.dedent(
        """
        import numpy as np
        from knnmem import ops
        keys, values, written = ops.init((3, 2), 8, 4, 3)
        written[:] = 2**63 - 3
        try:
            ops.add(keys, values, written, np.ones((3, 2, 5, 4), np.float32),
                    np.ones((3, 2, 5, 3), np.float32))
        except ValueError as e:
            print("ValueError:", e)
        print("written", written.min(), written.max(), "keys", keys.any())
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    assert "ValueError: written: " in proc.stdout or "ValueError: new_keys: " in proc.stdout
    assert "written 9223372036854775805 9223372036854775805 keys False" in proc.stdout


# -- ops.search ------------------------------------------------------------------------
OPS_SEARCH_CASES = [
    case("keys-int", "keys", lambda x: x.astype(int), TypeError, rf"^keys: {NOT_FLOAT} int64$"),
    case("values-bool", "values", lambda x: x > 0, TypeError, rf"^values: {NOT_FLOAT} bool$"),
    case("written-f64", "written", lambda x: x.astype(float), TypeError, r"^written: .*float64$"),
    case("written-bool", "written", lambda x: x > 0, TypeError, r"^written: .*got dtype bool$"),
    case("written<0", "written", lambda x: x - 100, ValueError, r"^written: .* got -83 at index"),
    case("written-shape", "written", lambda x: x[:, :1], ValueError, RING_KEYS + r"\(3, 1\)"),
    case("keys-rank", "keys", lambda x: x[0], ValueError, RING_KEYS + r".*got \(2, 13, 7\)$"),
    case("values-capacity", "values", lambda x: x[:, :, 1:], ValueError, RING_VALUES),
    case(
        "values-rank",
        "values",
        lambda x: x[..., 0],
        ValueError,
        r"^values: expected shape \(3, 2, capacity=13, value_dim\), got \(3, 2, 13\)$",
    ),
    case("keys-key_dim=0", "keys", lambda x: x[..., :0], ValueError, r"^(keys|queries): .*key_dim"),
    case("values-value_dim=0", "values", lambda x: x[..., :0], ValueError, r"^values: .*value_dim"),
]


@pytest.mark.parametrize(("arg", "transform", "exc", "match"), OPS_SEARCH_CASES)
def test_ops_search_rejects_ring(ring, arg, transform, exc, match):
    args = dict(zip(("keys", "values", "written"), ring))
    args[arg] = transform(args[arg])
    with raises_unchanged(ring, exc, match):
        ops.search(**args, queries=PROBE, k=3)


def test_ops_search_rejects_a_ring_of_capacity_0(ring):
    keys, values, written = ring
    with raises_unchanged(ring, ValueError, r"^(keys|k): .*capacity"):
        ops.search(keys[:, :, :0], values[:, :, :0], written, PROBE, k=1)


@pytest.mark.parametrize("metric", ["dot", "IP", "", None])
def test_ops_search_rejects_metric(ring, metric):
    with raises_unchanged(ring, ValueError, r"^metric: expected one of \('ip', 'cosine', 'l2'\)"):
        ops.search(*ring, PROBE, k=3, metric=metric)


@pytest.mark.parametrize("precision", ["float16", "fp32", "", None])
def test_ops_search_rejects_precision(ring, precision):
    with raises_unchanged(
        ring, ValueError, r"^precision: expected one of \('float32', 'bfloat16', 'int8'\), got"
    ):
        ops.search(*ring, PROBE, k=3, precision=precision)


@pytest.mark.parametrize(("transform", "exc", "match"), QUERY_CASES)
def test_ops_search_rejects_queries(ring, transform, exc, match):
    with raises_unchanged(ring, exc, match):
        ops.search(*ring, transform(PROBE), k=3)


@pytest.mark.parametrize(("k", "exc", "match"), K_CASES)
def test_ops_search_rejects_k(ring, k, exc, match):
    with raises_unchanged(ring, exc, match):
        ops.search(*ring, PROBE, k=k)


@pytest.mark.parametrize(("recall_target", "exc", "match"), RECALL_CASES)
def test_ops_search_rejects_recall_target(ring, recall_target, exc, match):
    with raises_unchanged(ring, exc, match):
        ops.search(*ring, PROBE, k=3, recall_target=recall_target)


# -- inputs that are fine: any float dtype, any layout ------------------------------------
def variant(x: np.ndarray, form: str) -> tuple[np.ndarray, np.ndarray]:
    """(x in `form`, the C-contiguous float32 array holding the same values)."""
    x = x if form == "float64" else x.astype(np.float32)
    if form == "float64":
        xin = x.astype(np.float64)
    elif form in ("float16", "bfloat16"):
        xin = x.astype(ml_dtypes.bfloat16 if form == "bfloat16" else form)
    elif form == "transposed":  # a swapaxes view of a [..., d, T] array
        xin = np.ascontiguousarray(x.swapaxes(-1, -2)).swapaxes(-1, -2)
    elif form == "sliced":  # every other row and column of a bigger array
        big = np.zeros((*x.shape[:-2], 2 * x.shape[-2], 2 * x.shape[-1]), np.float32)
        big[..., ::2, 1::2] = x
        xin = big[..., ::2, 1::2]
    elif form == "reversed":  # negative strides
        xin = np.ascontiguousarray(x[..., ::-1, :])[..., ::-1, :]
    elif form == "fortran":
        xin = np.asfortranarray(x)
    elif form == "readonly":
        xin = readonly(x)
    else:
        raise AssertionError(form)
    assert form in ("float16", "float64", "bfloat16", "readonly") or not xin.flags.c_contiguous
    return xin, np.ascontiguousarray(xin, dtype=np.float32)


FORMS = ["float16", "float64", "bfloat16", "transposed", "sliced", "reversed", "fortran"]
FORMS += ["readonly"]


def assert_results_equal(a: knnmem.SearchResult, b: knnmem.SearchResult) -> None:
    for name in a._fields:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.parametrize("form", FORMS)
def test_any_float_dtype_and_layout_gives_the_float32_contiguous_result(form):
    rng = np.random.default_rng(4)
    keys, keys32 = variant(rng.standard_normal((*SHAPE, 17, KD)), form)
    values, values32 = variant(rng.standard_normal((*SHAPE, 17, VD)), form)
    queries, queries32 = variant(rng.standard_normal((*SHAPE, 6, KD)), form)
    # Memory
    m_in, m_ref = knnmem.Memory(**BASE), knnmem.Memory(**BASE)
    m_in.add(keys, values)
    m_ref.add(keys32, values32)
    for k, recall_target in [(4, 0.5), (CAP, 1.0)]:
        ref = m_ref.search(queries32, k=k, recall_target=recall_target)
        assert_results_equal(m_in.search(queries, k=k, recall_target=recall_target), ref)
        assert_results_equal(m_in.search(queries32, k=k, recall_target=recall_target), ref)
        assert_results_equal(m_ref.search(queries, k=k, recall_target=recall_target), ref)
    np.testing.assert_array_equal(m_in.written, m_ref.written)
    # ops: new rows and queries in `form`, then the ring itself read in `form`
    ring = ops.init(SHAPE, CAP, KD, VD)
    ops.add(*ring, keys, values)
    ref = m_ref.search(queries32, k=4, recall_target=0.5)
    assert_results_equal(ops.search(*ring, queries, k=4, recall_target=0.5), ref)
    if form not in ("float16", "bfloat16"):  # those would round the stored float32 rows
        ring_keys, _ = variant(ring[0], form)
        ring_values, _ = variant(ring[1], form)
        got = ops.search(ring_keys, ring_values, ring[2], queries, k=4, recall_target=0.5)
        assert_results_equal(got, ref)
