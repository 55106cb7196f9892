"""Stateful property test: random interleavings of add / search / clear / save / load,
with random grid shapes, key dtypes, metrics, k, recall targets, masks, NaN/Inf and
malformed inputs, checked against a pure-numpy model of the memory.

The model stores keys exactly as the core does (float32; bfloat16 rounded to nearest
even; int8 with a per-row scale), so returned keys and values must match it bit for bit.
Scores are compared within a tolerance derived from the key dtype (bfloat16 and int8
searches also round the query). Exact searches must return a top-k of the model's
scores; every search must return min(k, count) whole, live, distinct rows, best first.
Every bad input must raise the documented exception and leave the memory unchanged.

The CI-sized run is derandomized; `pytest -m long tests/test_state_machine.py` runs
many more, randomized examples.
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

import knnmem

F32 = np.float32


def stored_keys(keys: np.ndarray, dtype: str) -> np.ndarray:
    """float32 keys [..., d] as the core stores them, returned as float32."""
    if dtype == "float32":
        return keys.astype(F32)
    if dtype == "bfloat16":
        return keys.astype(ml_dtypes.bfloat16).astype(F32)  # round to nearest even
    if dtype == "float16":
        return keys.astype(np.float16).astype(F32)
    # int8: q = round half away from zero of x * (127 / amax), scale = amax / 127
    amax = np.max(np.abs(keys), axis=-1, keepdims=True).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, F32(127) / amax, F32(0)).astype(F32)
    r = (keys * inv).astype(F32)
    q = np.trunc(np.where(r < 0, r - F32(0.5), r + F32(0.5))).clip(-127, 127)
    return (q.astype(F32) * (amax / F32(127)).astype(F32)).astype(F32)


class Model:
    """Per cell: the live rows (stored keys, values), oldest first, and the counter."""

    def __init__(self, grid: int, capacity: int) -> None:
        self.capacity = capacity
        self.keys: list[list[np.ndarray]] = [[] for _ in range(grid)]
        self.values: list[list[np.ndarray]] = [[] for _ in range(grid)]
        self.written = np.zeros(grid, np.int64)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:  # [G, T, d]
        for g in range(len(self.keys)):
            self.keys[g] = (self.keys[g] + list(keys[g]))[-self.capacity :]
            self.values[g] = (self.values[g] + list(values[g]))[-self.capacity :]
        self.written += keys.shape[1]

    def clear(self, mask: np.ndarray) -> None:
        for g in np.flatnonzero(mask):
            self.keys[g], self.values[g] = [], []
            self.written[g] = 0


def scores_of(q: np.ndarray, keys: np.ndarray, metric: str) -> np.ndarray:
    q, keys = q.astype(np.float64), keys.astype(np.float64)
    if metric == "ip":
        return keys @ q
    if metric == "l2":
        return -np.sum((keys - q) ** 2, axis=-1)
    qn, kn = np.linalg.norm(q), np.linalg.norm(keys, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((qn > 0) & (kn > 0), keys @ q / (qn * kn), 0.0)


class MemoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.saves = 0

    def teardown(self) -> None:
        self.tmp.cleanup()

    @initialize(
        shape=st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple),
        capacity=st.integers(1, 24),
        key_dim=st.integers(1, 9),
        value_dim=st.integers(1, 4),
        dtype=st.sampled_from(["float32", "bfloat16", "float16", "int8"]),
        metric=st.sampled_from(["ip", "cosine", "l2"]),
    )
    def init(self, shape, capacity, key_dim, value_dim, dtype, metric) -> None:
        self.mem = knnmem.Memory(
            shape, capacity=capacity, key_dim=key_dim, value_dim=value_dim, dtype=dtype,
            metric=metric,
        )  # fmt: skip
        self.shape, self.grid = shape, math.prod(shape)
        self.model = Model(self.grid, capacity)
        self.dtype, self.metric = dtype, metric

    # -- helpers ----------------------------------------------------------------------
    def snapshot(self) -> list:
        return [None if a is None else a.copy() for a in self.mem._core._export_state()]

    def assert_unchanged(self, before: list) -> None:
        for a, b in zip(before, self.mem._core._export_state()):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a, b)

    def rejects(self, exc, match: str, fn, *args, **kwargs) -> None:
        before = self.snapshot()
        with pytest.raises(exc, match=match):
            fn(*args, **kwargs)
        self.assert_unchanged(before)

    def rows(self, rng, t: int, d: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((*self.shape, t, d)) * scale).astype(F32)

    # -- rules ------------------------------------------------------------------------
    @rule(
        t=st.integers(0, 60),
        seed=st.integers(0, 2**32 - 1),
        scale=st.sampled_from([1.0, 1e-3, 300.0]),
        bad=st.sampled_from([None] * 6 + ["nan", "inf", "rows", "dim", "dtype", "grid"]),
    )
    def add(self, t, seed, scale, bad) -> None:
        rng = np.random.default_rng(seed)
        keys = self.rows(rng, t, self.mem.key_dim, scale)
        values = self.rows(rng, t, self.mem.value_dim, scale)
        if t and rng.random() < 0.1:  # duplicate keys: exact ties
            keys[...] = keys[..., :1, :]
        if bad in ("nan", "inf") and t > 0:
            arr, name = (keys, "keys") if rng.random() < 0.5 else (values, "values")
            arr.reshape(-1)[rng.integers(arr.size)] = np.nan if bad == "nan" else -np.inf
            self.rejects(ValueError, f"^{name}: expected finite values", self.mem.add, keys, values)
        elif bad == "rows":
            wrong = self.rows(rng, t + 1, self.mem.value_dim, 1.0)
            self.rejects(ValueError, r"^values: expected shape", self.mem.add, keys, wrong)
        elif bad == "dim":
            self.rejects(ValueError, r"^keys: expected shape", self.mem.add, keys[..., :0], values)
        elif bad == "dtype":
            self.rejects(
                TypeError,
                r"^keys: expected a floating-point array",
                self.mem.add,
                keys.astype(np.int32),
                values,
            )
        elif bad == "grid":
            self.rejects(ValueError, r"^keys: expected shape", self.mem.add, keys[None], values)
        else:
            self.mem.add(keys, values)
            self.model.add(
                stored_keys(keys.reshape(self.grid, t, self.mem.key_dim), self.dtype),
                values.reshape(self.grid, t, self.mem.value_dim),
            )

    @rule(
        nq=st.integers(1, 4),
        k=st.integers(1, 24),
        recall=st.sampled_from([1.0, 1.0, 0.9, 0.5, 0.05]),
        seed=st.integers(0, 2**32 - 1),
        bad=st.sampled_from([None] * 6 + ["nan", "k0", "kbig", "t0", "tbig", "shape"]),
    )
    def search(self, nq, k, recall, seed, bad) -> None:
        target = recall
        rng = np.random.default_rng(seed)
        cap = self.mem.capacity
        k = min(k, cap)
        queries = self.rows(rng, nq, self.mem.key_dim, 1.0)
        if bad == "nan":
            queries.reshape(-1)[rng.integers(queries.size)] = np.inf
            self.rejects(
                ValueError, r"^queries: expected finite values", self.mem.search, queries, k, target
            )
        elif bad == "k0":
            self.rejects(
                ValueError,
                r"^k: expected an integer in \[1, capacity=",
                self.mem.search,
                queries,
                0,
                target,
            )
        elif bad == "kbig":
            self.rejects(
                ValueError,
                r"^k: expected an integer in \[1, capacity=",
                self.mem.search,
                queries,
                cap + 1,
                target,
            )
        elif bad == "t0":
            self.rejects(
                ValueError,
                r"^recall_target: expected a number in \(0, 1\]",
                self.mem.search,
                queries,
                k,
                0.0,
            )
        elif bad == "tbig":
            self.rejects(
                ValueError,
                r"^recall_target: expected a number in \(0, 1\]",
                self.mem.search,
                queries,
                k,
                1.5,
            )
        elif bad == "shape":
            self.rejects(
                ValueError,
                r"^queries: expected shape",
                self.mem.search,
                queries[..., 1:],
                k,
                target,
            )
        else:
            self.check_search(queries, k, target)

    def check_search(self, queries: np.ndarray, k: int, target: float) -> None:
        res = self.mem.search(queries, k=k, recall_target=target)
        nq = queries.shape[-2]
        scores, indices, mask = (
            np.asarray(a).reshape(self.grid, nq, k) for a in (res.scores, res.indices, res.mask)
        )
        keys = np.asarray(res.keys).reshape(self.grid, nq, k, self.mem.key_dim)
        values = np.asarray(res.values).reshape(self.grid, nq, k, self.mem.value_dim)
        q_all = queries.reshape(self.grid, nq, -1)
        for g in range(self.grid):
            live_k = self.model.keys[g]
            count = len(live_k)
            first = int(self.model.written[g]) - count
            stored = np.asarray(live_k, F32).reshape(count, self.mem.key_dim)
            stored_v = np.asarray(self.model.values[g], F32).reshape(count, self.mem.value_dim)
            for i in range(nq):
                m = mask[g, i]
                n = int(m.sum())
                assert n == min(k, count) and m[:n].all(), (n, k, count)
                assert (indices[g, i, n:] == -1).all() and np.isneginf(scores[g, i, n:]).all()
                assert not keys[g, i, n:].any() and not values[g, i, n:].any()
                pos = indices[g, i, :n]
                assert len(set(pos.tolist())) == n
                assert ((pos >= first) & (pos < first + count)).all()
                rows = pos - first
                np.testing.assert_array_equal(keys[g, i, :n], stored[rows])
                np.testing.assert_array_equal(values[g, i, :n], stored_v[rows])
                assert (np.diff(scores[g, i, :n]) <= 0).all()
                if count == 0:
                    continue
                q = q_all[g, i]
                model = scores_of(q, stored, self.metric)
                big = max(float(np.abs(model).max()), 1.0 if self.metric == "cosine" else 0.0)
                scale = (
                    float(np.linalg.norm(q)) + float(np.linalg.norm(stored, axis=-1).max())
                ) ** 2
                if self.metric == "cosine":
                    scale = 4.0
                rel = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3, "int8": 5e-2}[self.dtype]
                tol = rel * max(scale, big) + 1e-30
                np.testing.assert_allclose(scores[g, i, :n], model[rows], rtol=0, atol=tol)
                if target == 1.0:  # exact: no row outside the result beats its worst by > tol
                    kth = np.sort(model)[::-1][n - 1]
                    assert scores[g, i, n - 1] >= kth - 2 * tol

    @rule(
        kind=st.sampled_from(["all", "mask", "int", "tuple", "bad-int", "bad-mask"]),
        seed=st.integers(0, 2**32 - 1),
    )
    def clear(self, kind, seed) -> None:
        rng = np.random.default_rng(seed)
        mask = np.zeros(self.shape, bool)
        if kind == "all":
            self.mem.clear()
            mask[...] = True
        elif kind == "mask":
            mask = rng.random(self.shape) < 0.5
            self.mem.clear(mask)
        elif kind == "int":
            i = int(rng.integers(self.shape[0]))
            self.mem.clear(i)
            mask[i] = True
        elif kind == "tuple":
            idx = tuple(int(rng.integers(s)) for s in self.shape)
            self.mem.clear(idx)
            mask[idx] = True
        elif kind == "bad-int":
            self.rejects(IndexError, r"^which: ", self.mem.clear, self.shape[0])
        else:
            self.rejects(
                ValueError,
                r"^which: expected a bool mask of shape",
                self.mem.clear,
                np.ones((*self.shape, 2), bool),
            )
        self.model.clear(mask.reshape(-1))

    @rule(mmap=st.booleans())
    def save_and_load(self, mmap) -> None:
        path = Path(self.tmp.name) / f"m{self.saves % 2}"
        self.saves += 1
        before = self.snapshot()
        self.mem.save(path)
        loaded = knnmem.Memory.load(path, mmap=mmap)
        self.assert_unchanged(before)  # saving changes nothing
        self.mem = loaded
        self.assert_unchanged(before)  # the loaded memory holds the same state

    @rule(seed=st.integers(0, 2**32 - 1))
    def load_corrupt(self, seed) -> None:
        """A damaged file never replaces the memory: load raises, nothing is built."""
        rng = np.random.default_rng(seed)
        path = Path(self.tmp.name) / "corrupt"
        self.mem.save(path)
        raw = bytearray(path.read_bytes())
        if rng.random() < 0.5:
            raw = raw[: int(rng.integers(len(raw)))]
        else:
            raw[int(rng.integers(len(raw)))] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(raw))
        before = self.snapshot()
        with pytest.raises(ValueError, match="^" + re.escape(str(path)) + ": "):
            knnmem.Memory.load(path)
        self.assert_unchanged(before)

    # -- invariants -------------------------------------------------------------------
    @invariant()
    def counters(self) -> None:
        if not hasattr(self, "mem"):
            return
        np.testing.assert_array_equal(self.mem.written.reshape(-1), self.model.written)
        counts = [len(rows) for rows in self.model.keys]
        np.testing.assert_array_equal(self.mem.count.reshape(-1), counts)
        assert self.mem.shape == self.shape


CI = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
LONG = settings(
    max_examples=1500,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestMemoryMachine = MemoryMachine.TestCase
TestMemoryMachine.settings = CI


@pytest.mark.long
def test_memory_machine_long() -> None:
    run = MemoryMachine.TestCase("runTest")
    run.settings = LONG
    run.runTest()
