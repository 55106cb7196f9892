"""The engine under attack: derived sizes at their limits, caller-owned rings changed
mid-call, fork and interpreter exit with calls in flight, scores that overflow, buffers
changed between check and copy, and what failed allocations leave behind.

Each test here failed before the fix it names. Anything that could hang or crash runs in
a child process with a timeout, so a regression fails the test instead of the run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import knnmem
from knnmem import _core, ops
from knnmem.eval import bins_for_recall, bins_for_search

MAX_BINS = 2**31


def run_child(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter; a hang fails the calling test."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- 1. sizes derived from the caller's numbers ------------------------------------


@pytest.mark.parametrize("k", [1, 2, 32, 2050, 10**6, 2**31 - 1, 2**40])
@pytest.mark.parametrize(
    "target", [0.9, 0.999999, 1 - 1e-12, 0.9999999999999999, float(np.nextafter(1.0, 0.0))]
)
def test_bins_stay_within_their_stated_bounds(k, target):
    for bins in (
        bins_for_recall(k, target),
        *(bins_for_search(k, target, d) for d in ("float32", "int8")),
    ):
        assert bins == 0 or k <= bins <= MAX_BINS, (k, target, bins)


def test_bins_near_one_mean_exact_search():
    # 2049 / (2 * 1.1e-16) bins overflowed int64 to a negative count.
    assert bins_for_recall(2050, 0.9999999999999999) == 0
    assert bins_for_search(2050, 0.9999999999999999) == 0
    assert bins_for_recall(32, 0.9) == 145  # ordinary targets unchanged


def test_search_with_recall_target_near_one_finishes_exact():
    # This search looped forever holding the memory's read lock (and so blocked add/clear).
    code = """
        import numpy as np, knnmem
        from knnmem import ops
        from knnmem.eval import exact_search
        rng = np.random.default_rng(1)
        keys = rng.standard_normal((2, 2050, 16), dtype=np.float32)
        q = rng.standard_normal((2, 3, 16), dtype=np.float32)
        mem = knnmem.Memory(shape=(2,), capacity=2050, key_dim=16, value_dim=16)
        mem.add(keys, keys)
        truth_scores, _ = exact_search(keys, q, 2050)
        ring = ops.init((2,), 2050, 16, 16)
        ops.add(*ring, keys, keys)
        for res in (mem.search(q, k=2050, recall_target=0.9999999999999999),
                    ops.search(*ring, q, k=2050, recall_target=1 - 1e-16)):
            # exact: every row, in score order (float32 vs the float64 reference)
            assert (np.sort(res.indices, axis=-1) == np.arange(2050)).all()
            assert np.allclose(res.scores, truth_scores, rtol=1e-5, atol=1e-4)
        mem.add(keys[:, :5], keys[:, :5])  # the lock was released
        print("ok")
    """
    r = run_child(code, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# --- 2. caller-owned rings changed by another thread during a call -----------------


def test_ring_counters_changed_mid_search_give_results_not_crashes():
    # Another thread rewrote `written` (each value valid) while ops.search ran: the core
    # read it several times per call and crashed within seconds.
    code = """
        import threading, numpy as np
        from knnmem import ops
        G, C, d = 4, 4096, 16
        rng = np.random.default_rng(2)
        keys, values, written = ops.init((G,), C, d, d)
        keys[:] = rng.standard_normal(keys.shape, dtype=np.float32)
        values[:] = rng.standard_normal(values.shape, dtype=np.float32)
        q = rng.standard_normal((G, 64, d), dtype=np.float32)
        stop = threading.Event()
        def mutate():
            r = np.random.default_rng(3)
            while not stop.is_set():
                written[:] = r.integers(0, 3 * C, size=G)
        def add_clear():
            r = np.random.default_rng(4)
            while not stop.is_set():
                nk = r.standard_normal((G, 300, d), dtype=np.float32)
                ops.add(keys, values, written, nk, nk)
                written[r.integers(0, G)] = 0
        ts = [threading.Thread(target=f) for f in (mutate, add_clear)]
        for t in ts: t.start()
        n = 0
        try:
            for _ in range(400):
                for recall in (0.9, 1.0):
                    res = ops.search(keys, values, written, q, k=8, recall_target=recall)
                    live = res.indices[res.mask]
                    assert (live >= 0).all() and (res.indices[~res.mask] == -1).all()
                    assert np.isfinite(res.scores[res.mask]).all()
                    n += 1
        finally:
            stop.set()
            for t in ts: t.join()
        print(n)
    """
    r = run_child(code, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == 800


def test_core_rejects_a_negative_counter_it_reads():
    keys, values, written = ops.init((2,), 64, 4, 4)
    written[1] = -5
    with pytest.raises(ValueError, match=r"written: expected counts >= 0, got -5 at index \[1\]"):
        _core.search(keys, values, written, np.zeros((2, 1, 4), np.float32), 1, 0.9, "ip")


# --- 3. fork while another thread works ---------------------------------------------

_FORK_MEM = None


def _child_work(seed: int) -> tuple:
    mem = _FORK_MEM
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((2, 64, 16), dtype=np.float32)
    knnmem.set_num_threads(2)  # a new pool in the child
    mem.add(k, k)  # the write lock is free in the child
    res = mem.search(k[:, :4], k=1, recall_target=1.0)
    mem.clear()
    return int(mem.count.sum()), res.scores.shape


def test_fork_while_searching_gives_children_a_working_engine():
    # A fork during a search left the child with the read lock held (add/clear hung, 12
    # of 12) and a pool without workers (set_num_threads crashed or hung).
    global _FORK_MEM
    _FORK_MEM = knnmem.Memory(shape=(2,), capacity=8192, key_dim=16, value_dim=16)
    rng = np.random.default_rng(5)
    k = rng.standard_normal((2, 8192, 16), dtype=np.float32)
    _FORK_MEM.add(k, k)
    q = rng.standard_normal((2, 256, 16), dtype=np.float32)
    stop = threading.Event()

    def search_loop():
        while not stop.is_set():
            _FORK_MEM.search(q, k=32, recall_target=1.0)

    threads = [threading.Thread(target=search_loop) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        ctx = mp.get_context("fork")
        for i in range(12):
            with ctx.Pool(1) as pool:
                count, shape = pool.apply_async(_child_work, (i,)).get(timeout=60)
            assert count == 0 and shape == (2, 4, 1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    _FORK_MEM.add(k[:, :3], k[:, :3])  # the parent's lock was released after each fork
    assert (_FORK_MEM.count == 8192).all()


# --- 4. interpreter exit with calls in flight --------------------------------------


@pytest.mark.parametrize("call", ["search", "add", "ops_search", "save"])
def test_exit_with_daemon_threads_inside_the_core_is_clean(call, tmp_path):
    # pybind11 took the GIL back in a destructor; Python ends such threads at exit with
    # a forced unwind, and the process aborted ("terminate called without an active
    # exception", 6 of 6).
    code = f"""
        import threading, time, numpy as np, knnmem
        from knnmem import ops
        mem = knnmem.Memory(shape=(4, 4), capacity=32768, key_dim=64, value_dim=64)
        rng = np.random.default_rng(0)
        k = rng.standard_normal((4, 4, 4096, 64), dtype=np.float32)
        mem.add(k, k)
        q = rng.standard_normal((4, 4, 256, 64), dtype=np.float32)
        ring = ops.init((16,), 8192, 64, 64)
        ops.add(*ring, k.reshape(16, 4096, 64), k.reshape(16, 4096, 64))
        def loop(i):
            while True:
                if "{call}" == "search": mem.search(q, k=32)
                elif "{call}" == "add": mem.add(k, k)
                elif "{call}" == "ops_search": ops.search(*ring, q.reshape(16, 256, 64), k=32)
                else: mem.save({str(tmp_path)!r} + f"/m{{i}}.knnmem")
        for i in range(2):
            threading.Thread(target=loop, args=(i,), daemon=True).start()
        time.sleep(0.5)
        print("exiting")
    """
    for _ in range(3):
        r = run_child(code, timeout=120)
        assert r.returncode == 0 and "terminate" not in r.stderr, (r.returncode, r.stderr)


# --- 5. scores that overflow --------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_rows_whose_scores_overflow_are_still_found(dtype, metric):
    # l2 with a 1e20 key gave count 2 but mask [True, False]: a score of -inf or NaN
    # was taken for an empty bin. Now such a row ranks as the lowest finite score.
    big = 6e4 if dtype == "float16" else (3.0e38 if metric == "ip" else 1e20)
    keys = np.array([[[1.0, 0.0], [big, -big]]], np.float32)
    mem = knnmem.Memory(shape=(1,), capacity=4, key_dim=2, value_dim=1, metric=metric, dtype=dtype)
    mem.add(keys, np.array([[[1.0], [2.0]]], np.float32))
    for q in ([1.0, 0.0], [-3.0e38, 3.0e38], [3.0e38, 3.0e38]):
        for recall in (0.9, 1.0):
            res = mem.search(np.array([[q]], np.float32), k=2, recall_target=recall)
            assert res.mask.tolist() == [[[True, True]]], (q, recall, res.scores)
            assert sorted(res.indices[0, 0].tolist()) == [0, 1]
            assert not np.isnan(res.scores).any()


def test_non_finite_scores_rank_deterministically_in_caller_rings():
    # A NaN written into a caller's own ring scores NaN: ranked lowest, row kept.
    keys, values, written = ops.init((1,), 8, 2, 1)
    slot_of, _ = ops.placement(8)  # row p of the stream lives in slot slot_of[p]
    keys[0, slot_of[:3]] = [[1.0, 0.0], [np.nan, 1.0], [0.5, 0.0]]
    written[0] = 3
    for recall in (0.5, 1.0):
        res = ops.search(
            keys, values, written, np.array([[[1.0, 0.0]]], np.float32), k=3, recall_target=recall
        )
        assert res.mask.all()
        assert res.indices[0, 0].tolist() == [0, 2, 1]
        assert res.scores[0, 0, 2] == np.finfo(np.float32).min


def test_bfloat16_keys_that_round_to_infinity_are_refused():
    # 3.4e38 became inf in a bfloat16 memory; save then wrote a file load refused.
    mem = knnmem.Memory(shape=(1,), capacity=4, key_dim=2, value_dim=1, dtype="bfloat16")
    limit = np.frombuffer(np.uint32(0x7F7F7FFF).tobytes(), np.float32)[0]
    with pytest.raises(
        ValueError,
        match=r"keys: expected values within \+-3.39617\d*e\+38 for "
        r"bfloat16 keys, got -3.4e\+38 at index \[0, 0, 1\]",
    ):
        mem.add(np.array([[[1.0, -3.4e38]]], np.float32), np.zeros((1, 1, 1), np.float32))
    assert mem.count.tolist() == [0]
    mem.add(np.array([[[limit, -limit]]], np.float32), np.zeros((1, 1, 1), np.float32))
    assert np.isfinite(mem.search(np.ones((1, 1, 2), np.float32), k=1).keys).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
def test_whatever_add_accepts_survives_save_and_load(dtype, tmp_path):
    big = {"float32": 3.4e38, "bfloat16": 3.39e38, "float16": 65504.0, "int8": 3.4e38}[dtype]
    if dtype == "int8":  # int8 refuses only +-FLT_MAX itself (scale * 127 would overflow)
        with pytest.raises(ValueError, match="within"):
            knnmem.Memory(shape=(1,), capacity=2, key_dim=1, value_dim=1, dtype=dtype).add(
                np.full((1, 1, 1), np.finfo(np.float32).max), np.ones((1, 1, 1), np.float32)
            )
    mem = knnmem.Memory(shape=(2,), capacity=8, key_dim=3, value_dim=1, dtype=dtype, metric="l2")
    keys = np.array([[[big, -big, 1.0]] * 3, [[-big, 0.0, big]] * 3], np.float32)
    mem.add(keys, np.ones((2, 3, 1), np.float32))
    mem.save(tmp_path / "m.knnmem")
    back = knnmem.Memory.load(tmp_path / "m.knnmem")
    q = np.ones((2, 2, 3), np.float32)
    a, b = mem.search(q, k=3), back.search(q, k=3)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.keys, b.keys)


def test_int8_scale_that_overflows_a_key_is_refused_on_import():
    mem = knnmem.Memory(shape=(1,), capacity=2, key_dim=2, value_dim=1, dtype="int8")
    keys = np.array([[[127, 1], [0, 0]]], np.int8)
    values = np.zeros((1, 2, 1), np.float32)
    written = np.array([1], np.int64)
    with pytest.raises(
        ValueError,
        match=r"key_scale: expected a scale in \[0, 2.679\d*e\+36\], "
        r"got 3e\+38 at \[0, 0\]",
    ):
        mem._core._import_state(keys, np.array([[3e38, 0]], np.float32), values, written)
    assert mem.count.tolist() == [0]
    top = np.nextafter(np.finfo(np.float32).max / np.float32(127), np.float32(0))
    mem._core._import_state(keys, np.array([[top, 0]], np.float32), values, written)
    assert np.isfinite(mem.search(np.ones((1, 1, 2), np.float32), k=1).keys).all()


# --- 6. inputs changed between the check and the copy ------------------------------


@pytest.mark.parametrize("target", ["memory", "ring"])
def test_values_written_during_add_are_checked_where_stored(target):
    # add checked the caller's buffer, then copied it: a NaN written in between was stored.
    rng = np.random.default_rng(6)
    G, T, d = 2, 4096, 32
    keys = rng.standard_normal((G, T, d), dtype=np.float32)
    mem = knnmem.Memory(shape=(G,), capacity=T, key_dim=d, value_dim=d)
    ring = ops.init((G,), T, d, d)
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            keys[1, T // 2, 3] = np.nan
            keys[1, T // 2, 3] = 1.0

    t = threading.Thread(target=flip)
    t.start()
    refused = 0
    try:
        for i in range(2000):  # until the race has been hit a few times
            if refused >= 3 and i >= 100:
                break
            try:
                if target == "memory":
                    mem.add(keys, keys)
                else:
                    ops.add(*ring, keys, keys)
            except ValueError as e:
                assert "expected finite values, got nan at index [1, 2048, 3]" in str(e)
                refused += 1
    finally:
        stop.set()
        t.join()
    stored = mem._core._export_state()[0] if target == "memory" else ring[0]
    assert np.isfinite(stored).all()
    assert refused > 0, refused  # the race was exercised


# --- 7. what failed or finished allocations leave behind ---------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_memories_that_cannot_be_allocated_or_are_deleted_give_their_memory_back():
    # Memory(1, capacity=2**28, key_dim=64) raised MemoryError after building (and
    # caching) a 2 GiB placement table; up to 16 such tables stayed cached.
    code = """
        import os, resource, knnmem
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        base = rss()
        for _ in range(3):
            try:
                knnmem.Memory(shape=(1,), capacity=2**28, key_dim=64, value_dim=64)
            except MemoryError as e:
                assert "keys" in str(e) or "values" in str(e), e
            else:
                raise AssertionError("expected MemoryError")
        after_failures = rss() - base
        for i in range(40):  # 40 tables of 8 MiB, none in use at the end
            m = knnmem.Memory(shape=(1,), capacity=2**20 + 16 * i, key_dim=1, value_dim=1)
            del m
        print(after_failures, rss() - base)
    """
    r = run_child(code, timeout=300)
    assert r.returncode == 0, r.stderr
    after_failures, after_churn = map(float, r.stdout.split())
    assert after_failures < 64, after_failures
    assert after_churn < 200, after_churn  # the cache keeps at most 128 MiB of tables
