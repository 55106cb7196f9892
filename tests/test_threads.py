"""Concurrency: adders, searchers and a clearer share one Memory from Python threads.

Every row ever added is unique and self-describing: its value row holds a unique
id and the grid cell it was added to, and its key row is a fixed function of the
id. So each search result can be checked on its own, whatever the interleaving:
a returned (key, value) is a whole row that was added to that very cell, its
score is the dot product with the query, and the bookkeeping (indices, mask,
order) is consistent.
"""

from __future__ import annotations

import threading
import time
import traceback

import numpy as np
import pytest

import knnmem

SHAPE = (3, 2)
GRID = 6
CAP, KD, VD = 257, 19, 5
MAX_IDS = 1 << 24  # ids stay exact in float32 (<= 2**24)

_MIX = np.random.default_rng(12345).integers(1, 2**63, size=(2, KD), dtype=np.uint64) | 1


def key_rows(ids: np.ndarray) -> np.ndarray:
    """[..., KD] float32, a fixed function of the id; column 0 is the id itself
    (scaled), so distinct ids give distinct rows. Pure integer hashing plus exact
    float32 arithmetic: the same bits every time it is computed."""
    x = ids.astype(np.uint64)[..., None] * _MIX[0] + _MIX[1]
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(29)
    keys = ((x >> np.uint64(40)).astype(np.float32) - 2**23) / np.float32(2**23)  # [-1, 1)
    keys[..., 0] = ids.astype(np.float32) / np.float32(MAX_IDS)
    return keys


def value_rows(ids: np.ndarray, cells: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
    """[..., VD] float32: (id, cell, three more numbers derived from the id)."""
    keys = key_rows(ids) if keys is None else keys
    values = np.empty((*ids.shape, VD), np.float32)
    values[..., 0] = ids
    values[..., 1] = cells
    values[..., 2:] = keys[..., 1 : VD - 1] * np.float32(4)
    return values


class Book:
    """What has been handed to the memory: ids -> cell, and per-cell row totals.
    Updated *before* each add, so anything a search can see is already here."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next_id = 0
        self.cell_of = np.full(MAX_IDS, -1, np.int8)
        self.total = np.zeros(GRID, np.int64)  # rows ever added per cell (>= written)

    def room(self, t: int) -> bool:
        """Whether ids for another segment of t rows per cell remain (a fast machine can
        add for a bounded time faster than a test expects: adders then idle)."""
        with self.lock:
            return self.next_id + GRID * t < MAX_IDS

    def issue(self, t: int) -> np.ndarray:
        """Ids for a segment of t rows per cell, [*SHAPE, t], registered to their cells."""
        with self.lock:
            ids = np.arange(self.next_id, self.next_id + GRID * t).reshape(GRID, t)
            self.next_id += GRID * t
            assert self.next_id < MAX_IDS
            self.cell_of[ids] = np.arange(GRID)[:, None]
            self.total += t
        return ids.reshape(*SHAPE, t)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cell each id was issued to, -1 if never issued; rows ever added per cell)."""
        with self.lock:
            return self.cell_of[ids], self.total.copy()


def check_result(res: knnmem.SearchResult, queries: np.ndarray, k: int, book: Book) -> int:
    """Checks one search result; returns how many entries were found."""
    q = queries.shape[-2]
    assert res.scores.shape == (*SHAPE, q, k) and res.scores.dtype == np.float32
    assert res.indices.shape == (*SHAPE, q, k) and res.indices.dtype == np.int64
    assert res.mask.shape == (*SHAPE, q, k) and res.mask.dtype == np.bool_
    assert res.keys.shape == (*SHAPE, q, k, KD) and res.values.shape == (*SHAPE, q, k, VD)
    mask = res.mask
    # found entries come first: the mask is a prefix of each row
    assert not (~mask[..., :-1] & mask[..., 1:]).any()
    # empty entries: index -1, score -inf, zero key and value
    assert (res.indices[~mask] == -1).all()
    assert np.isneginf(res.scores[~mask]).all()
    assert not res.keys[~mask].any() and not res.values[~mask].any()
    if not mask.any():
        return 0
    # found entries: a whole row that was added to this cell
    cells = np.broadcast_to(np.arange(GRID).reshape(*SHAPE, 1, 1), mask.shape)[mask]
    values, keys = res.values[mask], res.keys[mask]
    ids = values[:, 0].astype(np.int64)
    np.testing.assert_array_equal(values[:, 0], ids)  # an integral id...
    assert ((ids >= 0) & (ids < MAX_IDS)).all()
    issued_to, total = book.lookup(ids)  # read after the search returned
    np.testing.assert_array_equal(issued_to, cells)  # ...issued to this cell
    expected_keys = key_rows(ids)
    np.testing.assert_array_equal(keys, expected_keys)
    np.testing.assert_array_equal(values, value_rows(ids, cells, expected_keys))
    # positions: below the rows ever added to the cell; distinct within a query
    idx = res.indices[mask]
    assert (idx >= 0).all() and (idx < total[cells]).all()
    distinct = np.sort(np.where(mask, res.indices, -1 - np.arange(k)), axis=-1)
    assert (distinct[..., 1:] != distinct[..., :-1]).all()
    # scores: the dot product with the query, best first
    qrows = np.broadcast_to(queries[..., None, :], (*mask.shape, KD))[mask].astype(np.float64)
    dots = np.einsum("nd,nd->n", qrows, keys.astype(np.float64))
    bound = np.linalg.norm(qrows, axis=-1) * np.linalg.norm(keys, axis=-1)
    np.testing.assert_array_less(np.abs(res.scores[mask] - dots), 4 * KD * 1.2e-7 * bound + 1e-6)
    s = np.where(mask, res.scores, -np.inf)
    assert (s[..., :-1] >= s[..., 1:]).all()
    return int(mask.sum())


def test_concurrent_add_search_clear():
    mem = knnmem.Memory(shape=SHAPE, capacity=CAP, key_dim=KD, value_dim=VD)
    book = Book()
    n_adds, n_searches, n_clears = 2500, 300, 400
    done: dict[str, int] = {}
    found: dict[str, int] = {}
    errors: list[tuple[str, BaseException]] = []
    stop = threading.Event()
    start = threading.Barrier(6)
    check_lock = threading.Lock()

    def adder(name: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for i in range(n_adds):
            if stop.is_set():
                return
            t = int(rng.choice([1, 3, 17, 64])) if i % 25 else CAP + 40  # sometimes wraps
            ids = book.issue(t)
            mem.add(key_rows(ids), value_rows(ids, np.arange(GRID).reshape(*SHAPE, 1)))
            done[name] = i + 1

    def searcher(name: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        found[name] = 0
        for i in range(n_searches):
            if stop.is_set():
                return
            k = int(rng.choice([1, 8, 32, CAP]))
            q = int(rng.choice([1, 5] if k == CAP else [1, 5, 33]))  # results stay < 1 MB
            recall_target = float(rng.choice([0.5, 0.9, 1.0]))
            queries = rng.standard_normal((*SHAPE, q, KD)).astype(np.float32)
            res = mem.search(queries, k=k, recall_target=recall_target)
            with check_lock:  # one at a time: numpy-heavy checks in 3 threads convoy on the GIL
                found[name] += check_result(res, queries, k, book)
            done[name] = i + 1

    def clearer(name: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for i in range(n_clears):
            if stop.is_set():
                return
            time.sleep(0.002)
            if i % 20 == 19:
                mem.clear()  # everything
            elif i % 3 == 0:
                mem.clear((int(rng.integers(3)), int(rng.integers(2))))  # one memory
            elif i % 3 == 1:
                mem.clear(rng.random(SHAPE) < 0.3)  # a mask
            else:
                mem.clear(int(rng.integers(3)))  # a row of the grid
            count, written = mem.count, mem.written
            assert ((count >= 0) & (count <= CAP)).all() and (written >= 0).all()
            done[name] = i + 1

    def run(fn, name: str, seed: int) -> None:
        try:
            start.wait(timeout=30)
            fn(name, seed)
        except BaseException as e:
            errors.append((name, e))
            stop.set()

    roles = [
        (adder, "adder-0"),
        (adder, "adder-1"),
        (searcher, "searcher-0"),
        (searcher, "searcher-1"),
        (searcher, "searcher-2"),
        (clearer, "clearer"),
    ]
    threads = [
        threading.Thread(target=run, args=(fn, name, 1000 + i), name=name, daemon=True)
        for i, (fn, name) in enumerate(roles)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"threads still running after 120 s (deadlock?): {hung}"
    if errors:  # re-raised here, with the thread's traceback chained
        name, first = errors[0]
        raise AssertionError(f"{len(errors)} thread(s) failed, first {name}: {first!r}") from first
    elapsed = time.perf_counter() - t0

    expected = {"clearer": n_clears}
    expected.update({name: n_adds for _, name in roles[:2]})
    expected.update({name: n_searches for _, name in roles[2:5]})
    assert done == expected, f"work done per thread: {done}"
    for name in ("searcher-0", "searcher-1", "searcher-2"):
        assert found[name] > n_searches, f"{name} found only {found[name]} entries"
    # at rest: an exact search of k=capacity returns exactly the live rows, positions
    # [written - count, written) of each memory
    queries = np.ones((*SHAPE, 2, KD), np.float32)
    res = mem.search(queries, k=CAP, recall_target=1.0)
    check_result(res, queries, CAP, book)
    written, count = mem.written, mem.count
    assert (count == np.minimum(written, CAP)).all()
    for cell in np.ndindex(*SHAPE):
        live = np.arange(written[cell] - count[cell], written[cell])
        for q in range(2):
            np.testing.assert_array_equal(np.sort(res.indices[cell][q][res.mask[cell][q]]), live)
    assert elapsed < 60


def test_set_num_threads_gives_identical_results():
    rng = np.random.default_rng(7)
    mem = knnmem.Memory(shape=SHAPE, capacity=CAP, key_dim=KD, value_dim=VD)
    ids = np.arange(GRID * 400).reshape(*SHAPE, 400)
    mem.add(key_rows(ids), value_rows(ids, np.arange(GRID).reshape(*SHAPE, 1)))
    queries = rng.standard_normal((*SHAPE, 70, KD)).astype(np.float32)  # > 1 query chunk

    original = knnmem.get_num_threads()
    assert isinstance(original, int) and original >= 1
    try:
        results = {}
        for n in (2, 1, 3):
            knnmem.set_num_threads(n)
            assert knnmem.get_num_threads() == n
            results[n] = [
                mem.search(queries, k=k, recall_target=rt)
                for k, rt in [(1, 0.9), (32, 0.9), (32, 1.0), (CAP, 0.5)]
            ]
        for n in (1, 3):
            for got, ref in zip(results[n], results[2]):
                for field in ref._fields:
                    np.testing.assert_array_equal(
                        getattr(got, field), getattr(ref, field), err_msg=f"{n} threads: {field}"
                    )
        with pytest.raises(ValueError, match=r"^num_threads: expected an integer >= 1, got 0$"):
            knnmem.set_num_threads(0)
        with pytest.raises(ValueError, match=r"^num_threads: expected an integer >= 1, got -3$"):
            knnmem.set_num_threads(-3)
        assert knnmem.get_num_threads() == 3
    finally:
        knnmem.set_num_threads(original)
    assert knnmem.get_num_threads() == original


def test_set_num_threads_while_searching():
    """Resizing the pool while other threads search neither hangs nor changes results."""
    rng = np.random.default_rng(8)
    mem = knnmem.Memory(shape=SHAPE, capacity=CAP, key_dim=KD, value_dim=VD)
    ids = np.arange(GRID * 300).reshape(*SHAPE, 300)
    mem.add(key_rows(ids), value_rows(ids, np.arange(GRID).reshape(*SHAPE, 1)))
    queries = rng.standard_normal((*SHAPE, 70, KD)).astype(np.float32)
    ref = mem.search(queries, k=32, recall_target=0.9)
    errors: list[str] = []
    searches = [0, 0]
    stop = threading.Event()

    def search(slot: int) -> None:
        try:
            while not stop.is_set():
                res = mem.search(queries, k=32, recall_target=0.9)
                for field in ref._fields:
                    np.testing.assert_array_equal(getattr(res, field), getattr(ref, field))
                searches[slot] += 1
        except BaseException:
            errors.append(traceback.format_exc())

    original = knnmem.get_num_threads()
    threads = [threading.Thread(target=search, args=(i,), daemon=True) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for i in range(400):
            knnmem.set_num_threads(1 + i % 3)
            if i % 100 == 99:
                time.sleep(0.05)  # let the searchers through
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        knnmem.set_num_threads(original)
    assert not any(t.is_alive() for t in threads), "searchers hung"
    assert not errors, "\n".join(errors)
    assert min(searches) >= 5, searches


def test_save_and_load_while_others_add_search_and_clear(tmp_path) -> None:
    """For a bounded time (3 s), adders, a searcher and a clearer share a memory while
    another thread saves it and loads every file back: each file is one consistent
    snapshot -- whole rows, each in the cell it was added to, counts matching the
    counters -- and the loaded memory answers searches like any other."""
    mem = knnmem.Memory(shape=SHAPE, capacity=CAP, key_dim=KD, value_dim=VD)
    book = Book()
    errors: list[str] = []
    stop = threading.Event()
    saves = [0]

    def guarded(fn):
        def run(*args):
            try:
                while not stop.is_set():
                    fn(*args)
            except BaseException:
                errors.append(traceback.format_exc())
                stop.set()

        return run

    def add(rng):
        t = int(rng.choice([1, 9, 64, CAP + 3]))
        if not book.room(t):
            time.sleep(0.01)
            return
        ids = book.issue(t)
        mem.add(key_rows(ids), value_rows(ids, np.arange(GRID).reshape(*SHAPE, 1)))

    def search(rng):
        queries = rng.standard_normal((*SHAPE, 3, KD)).astype(np.float32)
        check_result(mem.search(queries, k=16, recall_target=0.9), queries, 16, book)

    def clear(rng):
        time.sleep(0.005)
        mem.clear(rng.random(SHAPE) < 0.3)

    def save_and_load(rng):
        path = tmp_path / f"m{saves[0] % 2}.safetensors"
        mem.save(path)
        loaded = knnmem.Memory.load(path, mmap=bool(saves[0] % 2))
        keys, _, values, written = loaded._core._export_state()
        count = np.minimum(written, CAP)
        np.testing.assert_array_equal(loaded.count.reshape(-1), count)
        for g in range(GRID):
            ids = values[g, : count[g], 0].astype(np.int64)
            assert len(set(ids.tolist())) == count[g]
            issued_to, _ = book.lookup(ids)
            assert (issued_to == g).all()
            np.testing.assert_array_equal(keys[g, : count[g]], key_rows(ids))
            np.testing.assert_array_equal(
                values[g, : count[g]], value_rows(ids, np.full(count[g], g))
            )
            assert not values[g, count[g] :].any()
        queries = rng.standard_normal((*SHAPE, 2, KD)).astype(np.float32)
        check_result(loaded.search(queries, k=8, recall_target=1.0), queries, 8, book)
        saves[0] += 1

    roles = [add, add, search, clear, save_and_load]
    threads = [
        threading.Thread(target=guarded(fn), args=(np.random.default_rng(50 + i),), daemon=True)
        for i, fn in enumerate(roles)
    ]
    for t in threads:
        t.start()
    stop.wait(3.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "threads hung"
    assert not errors, "\n".join(errors)
    assert saves[0] >= 5, saves
